#!/usr/bin/env bash
# One device session's checks and timings (H200): GPU tests, the attention benchmark with radial
# and neighborhood patterns, the Wan2.1-14B forward end to end, and quality on the testbed video
# pipeline (part "images": FLUX.1-dev forwards, CLEAR distillation and quality on the testbed FLUX).
# Run from the repo root on the GPU machine with diffattn and diffattn_testbed importable;
# writes logs and JSON to ${OUT:-/tmp/out}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
part=${1:-all}
if [[ $part == all || $part == tests ]]; then
  python3 -P -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi
if [[ $part == all || $part == attention ]]; then
  python3 benchmarks/attention.py --shapes wan14b --no-flex-sparse --compare-rule --patterns radial nb-time nb-3d nb-preset nb-gna \
    --json "$OUT/attention_wan14b.json" 2>&1 | tee "$OUT/attention.log"
fi
if [[ $part == all || $part == e2e ]]; then
  python3 benchmarks/e2e.py --models 14b --repeats 2 --backends triton --methods radial \
    "neighborhood:kernel_size=(5,45,80)" "neighborhood:kernel_size=(9,23,40)" neighborhood 2>&1 | tee "$OUT/e2e.log"
fi
if [[ $part == all || $part == quality ]]; then
  python3 benchmarks/quality.py --kinds video --prompts 64 --json "$OUT/quality_video.json" \
    --methods "radial,neighborhood,neighborhood:kernel_size=(3,5,5),neighborhood:kernel_size=(5,9,9)" 2>&1 | tail -12 | tee "$OUT/quality.log"
fi
if [[ $part == images || $part == flux ]]; then
  python3 benchmarks/flux_e2e.py --repeats 2 2>&1 | tee "$OUT/flux_e2e.log"
fi
if [[ $part == images || $part == distill ]]; then
  python3 -P -m diffattn.app.cli train clear --pipeline testbed --radius 4 --attn-every 1 --num-samples 512 \
    --steps 2000 --batch-size 16 --lr 2e-4 --checkpoint-every 500 --max-minutes ${DISTILL_MINUTES:-5} \
    --out "$OUT/clear-testbed" 2>&1 | grep -v "it/s" | tail -20 | tee "$OUT/distill.log"
  tail -3 "$OUT/clear-testbed/log.jsonl" | tee -a "$OUT/distill.log"
  rm -rf "$OUT/clear-testbed/data" "$OUT/clear-testbed/checkpoints"
fi
if [[ $part == images || $part == quality-image ]]; then
  python3 benchmarks/quality.py --kinds image-dit --prompts 64 --sizes 128,256,512 --json "$OUT/quality_image.json" \
    --methods "clear,clear:lora='$OUT/clear-testbed',neighborhood" 2>&1 | tail -16 | tee "$OUT/quality_image.log"
fi
