#!/usr/bin/env bash
# Train every testbed model at once on one GPU (the processes share it):
#   bash testbed/train_all.sh OUT_DIR [MINUTES] [INIT_DIR]
# OUT_DIR receives video/, image-vae/, image-dit/, image-unet/, judge-*.safetensors, previews/ and logs/.
# MINUTES (default 9) is the wall-clock budget: every script stops in time and saves (--max-minutes).
# INIT_DIR, an earlier OUT_DIR: its judges and image VAE are kept as they are, and the video, image-dit
# and image-unet pipelines found there continue training (fresh optimizer).
# The committed weights (benchmarks/RESULTS.md, 2026-11-22): rounds `train_all.sh A 9`, `train_all.sh B 9 A`,
# `train_all.sh C 9 B` (rounds 1-2 used smaller batches and VAE crops than today's defaults; each
# testbed.json keeps every round's config), then a 4th round of the video pipeline (VAE kept:
# --vae-steps 0) and image-dit only, 6.3 minutes each, in parallel:
#   python -m diffattn_testbed.train_video --init C/video --out D/video --vae-steps 0 --workers 10 --max-minutes 6.3
#   python -m diffattn_testbed.train_image --kind image-dit --init C/image-dit --vae A/image-vae --out D/image-dit --max-minutes 6.3
# Rounds 5-8 (second session; benchmarks/RESULTS.md) of video and image-dit, in parallel, each round --init from the last:
#   5: train_video --init D/video --out E/video --vae-steps 0 --batch 96 --decay 0.3 --compile true --max-minutes 7.2
#      train_video --init D/video --out E/video-vae --vae-train decoder --vae-crop 29 --vae-steps 100000 --vae-batch 8 \
#          --vae-lr 3e-4 --vae-scenes 1024 --vae-max-minutes 4.5 --steps 0
#      train_image --kind image-dit --init D/image-dit --vae A/image-vae --out E/image-dit --batch 256 --decay 0.3 --compile true --max-minutes 7.2
#   (rounds 1-5 padded text to 512 tokens; from round 6 on, TEXT_TOKENS = 32)
#   6: train_video --init E/video --vae-from E/video-vae --out F/video --vae-steps 0 --scenes 10000 --scene-offset 16000 \
#          --steps 2300 --batch 96 --decay 0.3 --compile true ; image-dit as in 5 from E, --max-minutes 7.3
#   7: as 6 from F, --scene-offset 26000 --steps 1900 ; image-dit --max-minutes 6.5
#   8: as 6 from G, --scene-offset 36000 --steps 1900 ; image-dit --max-minutes 6.3
# Rounds 9-13 (third session; no --steps cap: the loss log no longer holds each step's loss buffer), --init from the last:
#   9: train_video --init H/video --out I/video --vae-steps 0 --scenes 10000 --scene-offset 46000 --batch 96 --decay 0.3 \
#          --compile true --max-minutes 6.8 ; image-dit as in 5 from H, --max-minutes 6.8
#  10: as 9 from I, --scenes 8000 --scene-offset 56000 --lr 3e-4 --decay 0.5 --max-minutes 8.2 ;
#      image-dit from I with --lr 3e-4 --decay 0.5 --max-minutes 8.2 (the committed image-dit)
#  11-13: video only (alone on the GPU), as 10 with --scene-offset 64000 / 72000 / 80000, --max-minutes 8.5 / 8.6 / 8.6
# Rounds 14-16 (fourth session), --init from the last, lr 3e-4, decay 0.5:
#  14: video as 10 with --scene-offset 88000 --workers 14 --max-minutes 8.2 ; image-dit from J (round 10) as in 10
#  15: video only, --scene-offset 96000 --workers 15 --max-minutes 8.0
#  16: video as 15 with --scene-offset 104000 --max-minutes 7.6 ; image-dit from round 14 as in 10, --max-minutes 7.6
#      (round 16 is the committed video, its image-dit run the committed image-dit; sampled at guidance 3.0)
set -euo pipefail
out=${1:?usage: train_all.sh OUT_DIR [MINUTES] [INIT_DIR]}
minutes=${2:-9}
init=${3:-}
mkdir -p "$out/logs" "$out/previews"
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
m() { python3 -c "print(round($minutes * $1, 2))"; }  # a fraction of the budget
from() { if [ -n "$init" ] && [ -e "$init/$1/model_index.json" ]; then echo "--init $init/$1"; fi; }

if [ -n "$init" ]; then
    cp -r "$init/image-vae" "$init/judge-video.safetensors" "$init/judge-image.safetensors" "$out/"
    workers=10
else
    python3 -m diffattn_testbed.train_judge --kind video --out "$out/judge-video.safetensors" --workers 3 \
        --scenes 24000 --max-minutes "$(m 0.5)" > "$out/logs/judge-video.log" 2>&1 &
    python3 -m diffattn_testbed.train_judge --kind image --out "$out/judge-image.safetensors" --workers 2 \
        --scenes 24000 --max-minutes "$(m 0.4)" > "$out/logs/judge-image.log" 2>&1 &
    workers=6
fi
python3 -m diffattn_testbed.train_video --out "$out/video" --workers $workers --batch 96 --decay 0.3 --compile true $(from video) \
    --vae-max-minutes "$(m 0.3)" --max-minutes "$(m 0.95)" \
    --preview "$out/previews/video.png" > "$out/logs/video.log" 2>&1 &
(
    if [ -z "$init" ]; then
        python3 -m diffattn_testbed.train_image --kind vae --out "$out/image-vae" --workers 3 \
            --max-minutes "$(m 0.15)" > "$out/logs/image-vae.log" 2>&1
        left=$(python3 -c "print(round($minutes * 0.8 - 0.3, 2))")
    else
        left=$(m 0.95)
    fi
    for kind in image-dit image-unet; do
        extra=""; [ "$kind" = image-dit ] && extra="--batch 256 --decay 0.3 --compile true"
        python3 -m diffattn_testbed.train_image --kind "$kind" $extra --vae "$out/image-vae" --out "$out/$kind" \
            --workers 2 --steps 1000000 --max-minutes "$left" --preview "$out/previews/$kind.png" $(from $kind) \
            > "$out/logs/$kind.log" 2>&1 &
    done
    wait
) &
wait
