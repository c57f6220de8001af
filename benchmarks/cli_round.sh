#!/usr/bin/env bash
# The command-line tools on the GPU (H200), as a user runs them:
#   bash benchmarks/cli_round.sh bench      # diffattn bench: Wan2.1-14B, HunyuanVideo (fwd+bwd), FLUX CLEAR 2K/4K, neighborhood
#   bash benchmarks/cli_round.sh bench wan hunyuan   # only those cases (wan hunyuan wan_nb flux2k flux4k others)
#   bash benchmarks/cli_round.sh generate   # diffattn generate on the testbed image pipelines, with and without guidance, on CUDA
#                                           # (VIDEO=1: the video pipeline too; it needs imageio-ffmpeg, which the H200 image lacks)
# logs go to ${OUT:-/tmp/out}. The diffattn script is the installed one (DIFFATTN, default: diffattn on PATH).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
D=${DIFFATTN:-diffattn}
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
part=${1:-bench}
cases=" ${*:2} "
[[ $cases == "  " ]] && cases=" wan hunyuan wan_nb flux2k flux4k others "
run() {  # one command, its time and its log
  local name=$1; shift
  local start=$(date +%s.%N)
  timeout ${LIMIT:-300} "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name (rc $rc, $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s): $*"
  grep -v "it/s\]$\|s/it\]$\|^\[transformers\]\|Loading" "$OUT/$name.log" | tail -${TAIL:-12}
}
if [[ $part == bench ]]; then
  [[ $cases == *" wan "* ]] && run bench_wan $D bench --json "$OUT/bench_wan.json"
  [[ $cases == *" hunyuan "* ]] && run bench_hunyuan $D bench --model hunyuan --backward --json "$OUT/bench_hunyuan.json"
  [[ $cases == *" wan_nb "* ]] && run bench_wan_nb $D bench --model wan --method neighborhood --json "$OUT/bench_wan_nb.json"
  [[ $cases == *" flux2k "* ]] && run bench_flux2k $D bench --model flux --height 2048 --width 2048 --method clear --radius 16 --json "$OUT/bench_flux2k.json"
  [[ $cases == *" flux4k "* ]] && run bench_flux4k $D bench --model flux --height 4096 --width 4096 --method clear --radius 16 --json "$OUT/bench_flux4k.json"
  [[ $cases == *" others "* ]] && run bench_others $D bench --model mochi cogvideox ltx --json "$OUT/bench_others.json"
fi
if [[ $part == generate ]]; then
  mkdir -p "${GEN_DIR:-$OUT}" && cd "${GEN_DIR:-$OUT}"  # the images (GEN_DIR keeps them apart from the logs)
  if [[ ${VIDEO:-0} == 1 ]]; then
    run gen_default $D generate --prompt "a red circle moving right" --out clip.mp4
    run gen_guided $D generate --guide soft-pag --guide-scale 1 --out guided.mp4
  fi
  run gen_flux $D generate --pipeline image-dit --method clear --out flux.png
  run gen_flux_stg $D generate --pipeline image-dit --method stg --guide-scale 1 --out flux_stg.png
  run gen_unet $D generate --pipeline image-unet --method hidiffusion --out unet.png
  run gen_unet_512 $D generate --pipeline image-unet --method hidiffusion --height 512 --width 512 --prompt "a red circle and a blue star" --out unet512.png
fi
