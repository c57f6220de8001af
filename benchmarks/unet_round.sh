#!/usr/bin/env bash
# The U-Net session's GPU checks and timings (H200): quality of the U-Net methods on the testbed
# U-Net at 1x, 2x and 4x its trained size, then U-Net speed at the SD1.5 and SDXL configs.
#   bash benchmarks/unet_round.sh quality|sd15|sdxl     (logs and JSON to ${OUT:-/tmp/out})
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
part=${1:-quality}
if [[ $part == quality ]]; then
  python3 benchmarks/quality.py --kinds image-unet --sizes 128,256,512 --prompts 64 --json "$OUT/quality_unet.json" \
    --methods "hidiffusion,msw-msa,rau-net,tome,agent+tome,hidiffusion+tome" 2>&1 | tee "$OUT/quality_unet.log" | grep -v "^{"
fi
if [[ $part == sweep ]]; then
  python3 benchmarks/quality.py --kinds image-unet --sizes 256,512 --prompts 64 --json "$OUT/quality_unet_t1.json" \
    --methods "hidiffusion:t1=0.6,hidiffusion:t1=0.8,rau-net:t1=0.8" 2>&1 | tee "$OUT/quality_unet_t1.log" | grep -v "^{"
fi
if [[ $part == sweep2 ]]; then
  python3 benchmarks/quality.py --kinds image-unet --sizes 256 --prompts 64 --json "$OUT/quality_unet_sweep2.json" \
    --methods "rau-net:t1=0.6,rau-net:t1=0.6;t2=0.3,rau-net:t1=1.0,hidiffusion:t1=0.6;seed=1,hidiffusion:t1=0.6;shifts='cyclic',msw-msa:start=0.4" \
    2>&1 | tee "$OUT/quality_unet_sweep2.log" | grep -v "^{"
fi
if [[ $part == sd15 ]]; then
  python3 benchmarks/unet_speed.py --models sd1.5 --steps 10 --json "$OUT/speed_sd15.json" \
    --methods msw-msa hidiffusion tome "tome:ratio=0.75" agent+tome hidiffusion+tome 2>&1 | tee "$OUT/speed_sd15.log"
fi
if [[ $part == sdxl ]]; then
  python3 benchmarks/unet_speed.py --models sdxl --sizes ${SIZES:-2048 4096} --steps 50 --json "$OUT/speed_sdxl_${SIZES:-all}.json" \
    --methods ${METHODS:-msw-msa hidiffusion hidiffusion+tome} 2>&1 | tee "$OUT/speed_sdxl_${SIZES:-all}.log"
fi
