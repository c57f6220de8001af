#!/usr/bin/env bash
# The length-extension measurement of benchmarks/RESULTS.md on one H200: LoRAs trained at 4x (113
# frames) and 2x (57) the testbed video length, with radial attention and dense, same steps, then
# judged window by window (benchmarks/length.py).
#   bash benchmarks/length_round.sh check            # the GPU gradient test, 20-step probes of both
#   bash benchmarks/length_round.sh train4           # radial and dense LoRAs at 113 frames (800 steps each)
#   bash benchmarks/length_round.sh train2           # ... at 57 frames
#   bash benchmarks/length_round.sh eval             # both lengths, 64 held-out prompts
#   bash benchmarks/length_round.sh compile          # s/step at 113 frames, eager vs --compile true, both methods
# Writes logs, LoRAs and JSON to ${OUT:-/tmp/out}; the data caches go to ${DATA:-/tmp/lendata}.
# Env: STEPS, CLIPS, BATCH, METHODS, EXTRA (more trainer flags), ROWS4 / ROWS2 (eval rows), R2 (the
# radial LoRA judged at 57 frames; default the one trained at 57).
set -uo pipefail
OUT=${OUT:-/tmp/out}
DATA=${DATA:-/tmp/lendata}
STEPS=${STEPS:-800}
CLIPS=${CLIPS:-2048}
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
part=${1:-all}
BATCH=${BATCH:-32}
common=(--dense-blocks 1 --lora-rank 32 --batch-size "$BATCH" --lr 5e-4 --warmup 50 --checkpoint-every 400 --self-generate "$CLIPS"
        --gradient-checkpointing "${CHECKPOINTING:-false}" ${EXTRA:-})  # EXTRA: more trainer flags

train() {  # train FRAMES METHOD STEPS OUTNAME [more trainer flags]
  python3 -P -m diffattn.app.cli train length --frames "$1" --method "$2" --steps "$3" "${common[@]}" "${@:5}" \
    --data-cache "$DATA/f$1" --out "$OUT/$4" 2>&1 | grep -v "it/s\]" | tail -6
  # the device returns at most 8 files: keep the LoRA, its JSON and log once it is exported
  [[ -f $OUT/$4/pytorch_lora_weights.safetensors ]] && rm -rf "$OUT/$4/checkpoints" "$OUT/$4/logs"
  python3 - "$OUT/$4" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl")]
s = [r["step_seconds"] for r in rows[1:]]
print(f"{sys.argv[1]}: {len(rows)} steps, median {statistics.median(s):.4f} s/step, total {sum(r['step_seconds'] for r in rows):.1f} s, "
      f"loss first 50 {statistics.mean(r['loss'] for r in rows[:50]):.4f} last 50 {statistics.mean(r['loss'] for r in rows[-50:]):.4f}")
EOF
}

if [[ $part == all || $part == check ]]; then
  python3 -P -m pytest -q -m gpu tests/test_length.py -p no:cacheprovider 2>&1 | tail -4
  for m in radial dense; do train 113 $m 20 "probe-$m"; done
fi
if [[ $part == compile ]]; then  # the GPU tests, then per-step cost with and without torch.compile (same data, STEPS steps)
  python3 -P -m pytest -q -m gpu tests/test_length.py -p no:cacheprovider 2>&1 | tail -4
  for c in false true; do for m in ${METHODS:-radial dense}; do train 113 $m "$STEPS" "cost-$m-compile-$c" --compile $c; done; done
fi
if [[ $part == all || $part == train4 ]]; then
  for m in ${METHODS:-radial dense}; do train 113 $m "$STEPS" "len4x-$m"; done
fi
if [[ $part == all || $part == train2 ]]; then
  for m in ${METHODS:-radial dense}; do train 57 $m "$STEPS" "len2x-$m"; done
fi
evaluate() {  # evaluate FRAMES TAG ROWS RADIAL_LORA DENSE_LORA
  args=()
  [[ -f $4/pytorch_lora_weights.safetensors ]] && args+=(--radial-lora "$4")
  [[ -f $5/pytorch_lora_weights.safetensors ]] && args+=(--dense-lora "$5")
  python3 benchmarks/length.py --frames "$1" --prompts 64 --rows "$3" "${args[@]}" --json "$OUT/length_$2.json" 2>&1 \
    | grep -v "^{" | grep "^|"
}
if [[ $part == all || $part == eval ]]; then  # LoRAs from $RUNS (default $OUT)
  R=${RUNS:-$OUT}
  evaluate 113 4x "${ROWS4:-truth,reference,dense,radial,dense-lora,radial-lora}" "$R/len4x-radial" "$R/len4x-dense"
  evaluate 57 2x "${ROWS2:-truth,dense,radial,dense-lora,radial-lora}" "${R2:-$R/len2x-radial}" "$R/len2x-dense"
fi
