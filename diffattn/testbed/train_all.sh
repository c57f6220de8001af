#!/usr/bin/env bash
# Train every testbed model at once on one GPU (the processes share it), as the committed weights were:
#   bash diffattn/testbed/train_all.sh OUT_DIR [MINUTES]
# OUT_DIR receives video/, image-vae/, image-dit/, image-unet/, judge-*.safetensors, previews/ and logs/.
# MINUTES (default 9) is the wall-clock budget: every script stops in time and saves (see --max-minutes).
set -euo pipefail
out=${1:?usage: train_all.sh OUT_DIR [MINUTES]}
minutes=${2:-9}
mkdir -p "$out/logs" "$out/previews"
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
m() { python3 -c "print(round($minutes * $1, 2))"; }  # a fraction of the budget

python3 -m diffattn.testbed.train_judge --kind video --out "$out/judge-video.safetensors" --workers 3 \
    --scenes 24000 --max-minutes "$(m 0.5)" > "$out/logs/judge-video.log" 2>&1 &
python3 -m diffattn.testbed.train_judge --kind image --out "$out/judge-image.safetensors" --workers 2 \
    --scenes 24000 --max-minutes "$(m 0.4)" > "$out/logs/judge-image.log" 2>&1 &
python3 -m diffattn.testbed.train_video --out "$out/video" --workers 6 --steps 1000000 \
    --vae-max-minutes "$(m 0.17)" --max-minutes "$(m 0.95)" --preview "$out/previews/video.png" \
    > "$out/logs/video.log" 2>&1 &
(
    python3 -m diffattn.testbed.train_image --kind vae --out "$out/image-vae" --workers 3 \
        --max-minutes "$(m 0.15)" > "$out/logs/image-vae.log" 2>&1
    left=$(python3 -c "print(round($minutes * 0.95 - $minutes * 0.15 - 0.3, 2))")
    for kind in image-dit image-unet; do
        python3 -m diffattn.testbed.train_image --kind "$kind" --vae "$out/image-vae" --out "$out/$kind" \
            --workers 2 --steps 1000000 --max-minutes "$left" --preview "$out/previews/$kind.png" \
            > "$out/logs/$kind.log" 2>&1 &
    done
    wait
) &
wait
