#!/usr/bin/env bash
# The guidance session's GPU checks and timings (H200):
#   bash benchmarks/guidance_round.sh search    # HeadHunter head search on the 3 testbed pipelines (search split)
#   bash benchmarks/guidance_round.sh quality   # (video) CFG vs PAG / SoftPAG (u sweep) / STG / SEG / searched heads / radial + SoftPAG
#   bash benchmarks/guidance_round.sh quality-images   # the same on the image DiT and the U-Net
#   bash benchmarks/guidance_round.sh speed     # Wan2.1-14B 720p per-step cost, CFG vs CFG + SoftPAG, dense and radial
# logs and JSON go to ${OUT:-/tmp/out}; the quality part reads the search part's heads_*.json there
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
part=${1:-quality}
if [[ $part == search ]]; then
  for kind in ${KINDS:-video image-dit image-unet}; do
    python3 app/headhunter.py --kind $kind --scale ${SCALE:-1.0} --prompts 16 --rounds 2 --top-k 2 --batch 16 --out "$OUT/heads_$kind.json" \
      2>&1 | tee "$OUT/search_$kind.log" | grep -v "it/s\]$"
  done
fi
if [[ $part == quality ]]; then
  common="pag,soft-pag:u=0.25,soft-pag:u=0.5,soft-pag:u=0.75,soft-pag:u=0.5;scale=1.0,soft-pag:u=0.5;layers='all';scale=1.0,stg,seg"
  python3 benchmarks/quality.py --kinds video --prompts 64 --json "$OUT/quality_video.json" \
    --methods "$common,soft-pag:u=0.5;layers=[4],headhunter:heads='${HEADS:-$OUT}/heads_video.json';u=1.0,headhunter:heads='${HEADS:-$OUT}/heads_video.json';u=0.5,radial,radial:guidance='soft-pag'" \
    2>&1 | tee "$OUT/quality_video.log" | grep -v "^{"
fi
if [[ $part == quality2 ]]; then  # the searched heads, radial + SoftPAG, and everything with CFG off
  python3 benchmarks/quality.py --kinds video --prompts 64 --json "$OUT/quality_video2.json" \
    --methods "headhunter:heads='${HEADS:-$OUT}/heads_video.json';u=1.0,headhunter:heads='${HEADS:-$OUT}/heads_video.json';u=0.5,headhunter:heads='${HEADS:-$OUT}/heads_video.json';u=0.5;scale=1.0,radial,radial:guidance='soft-pag'" \
    2>&1 | tee "$OUT/quality_video2.log" | grep -v "^{"
  python3 benchmarks/quality.py --kinds video --prompts 64 --cfg 1.0 --json "$OUT/quality_video_nocfg.json" \
    --methods "pag,soft-pag:u=0.5,soft-pag:u=0.5;scale=1.0,stg,seg,headhunter:heads='${HEADS:-$OUT}/heads_video.json';u=0.5" \
    2>&1 | tee "$OUT/quality_video_nocfg.log" | grep -v "^{"
fi
if [[ $part == quality-images ]]; then
  common="pag,soft-pag:u=0.5,soft-pag:u=0.5;scale=1.0,stg:scale=1.0,seg:scale=1.0"
  python3 benchmarks/quality.py --kinds image-dit --prompts 64 --cfg ${CFG:-0} --json "$OUT/quality_dit.json" \
    --methods "$common,clear,clear:guidance='soft-pag'" 2>&1 | tee "$OUT/quality_dit.log" | grep -v "^{"
  python3 benchmarks/quality.py --kinds image-unet --prompts 64 --cfg ${CFG:-0} --json "$OUT/quality_unet.json" \
    --methods "$common,msw-msa,msw-msa:guidance='soft-pag'" 2>&1 | tee "$OUT/quality_unet.log" | grep -v "^{"
fi
if [[ $part == speed ]]; then
  python3 benchmarks/guidance_speed.py --model 14b --json "$OUT/speed_wan14b.json" 2>&1 | tee "$OUT/speed_wan14b.log"
fi
