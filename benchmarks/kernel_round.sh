#!/usr/bin/env bash
# One device session's kernel checks and timings (H200, issue 20): GPU kernel tests, the attention
# benchmark with the 8-bit forward and both backwards, the on-disk autotune cache, the Wan2.1-14B
# forward end to end at each precision, and the testbed video quality of the 8-bit forward.
# Run from the repo root on the GPU machine; writes logs to ${OUT:-/tmp/out}. Parts: tests, wan,
# hunyuan, tune, e2e, quality (default: all); nb and nb-e2e (issue 11: element-rule blocks, forward,
# backward and the Wan2.1-14B forward with 3-D windows), regs (two-CTA forward configs, the
# backward's unmasked full blocks: GPU tests, Wan2.1-14B forward and backward, the tune cache), regs2
# (the same after the size class joined the tuning key, with HunyuanVideo 129) and regs3 (HunyuanVideo
# 509 forward, the Wan2.1-14B forward end to end) run only when named, as do fa4 (the FlashAttention-4
# backend: its GPU tests, Wan2.1-14B and HunyuanVideo 129 forward + backward, HunyuanVideo 509
# forward), fa4-rules (element rules on FA4: Wan2.1-14B 3-D windows at 128 x 128 blocks) and fa4-e2e
# (the Wan2.1-14B and 1.3B forwards end to end, triton vs fa4), fa4-flex (FA4, Triton and FlexAttention
# with the same block masks in one run: Wan2.1-14B and HunyuanVideo 129 forward + backward) and
# fa4-flex509 (HunyuanVideo 509 forward, the same three). They need flash-attn-4
# importable (pip install flash-attn-4, or FA4_SITE=DIR holding it unpacked).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
part=${1:-all}
if [[ -n ${FA4_SITE:-} ]]; then  # an unpacked flash-attn-4 + nvidia-cutlass-dsl site (its .pth is not read from PYTHONPATH)
  export PYTHONPATH=$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ $part == all || $part == tests ]]; then
  python3 -P -c "from diffattn.kernels import block_sparse as b; print('bulk reduce-add through descriptors:', b._TMA_REDUCE)"
  python3 -P -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -s -k "${TESTS:-8bit or fused}" 2>&1 | tee "$OUT/gpu_tests.log"

fi
if [[ $part == all || $part == wan ]]; then
  python3 benchmarks/attention.py --shapes wan14b --precision int8 fp8 int8-qk ${WAN_FLAGS:---compare-backward} --json "$OUT/attention_wan14b.json" 2>&1 | tee "$OUT/attention_wan.log"
fi
if [[ $part == all || $part == hunyuan ]]; then
  python3 benchmarks/attention.py --shapes hunyuan129 hunyuan509 --precision int8 fp8 int8-qk --compare-backward --json "$OUT/attention_hv.json" 2>&1 | tee "$OUT/attention_hv.log"
fi
if [[ $part == all || $part == tune ]]; then
  python3 benchmarks/tune_cache.py 2>&1 | tee "$OUT/tune_cache.log"
fi
if [[ $part == all || $part == e2e ]]; then
  python3 benchmarks/e2e.py --models 14b --repeats 2 --backends triton --methods radial "radial:precision='int8'" "radial:precision='fp8'" "radial:precision='int8-qk'" 2>&1 | tee "$OUT/e2e.log"
fi
if [[ $part == all || $part == quality ]]; then
  python3 benchmarks/quality.py --kinds video --prompts 64 --json "$OUT/quality_video.json" --versus radial \
    --methods "radial,radial:precision='int8',radial:precision='fp8',radial:precision='int8-qk'" 2>&1 | tail -9 | tee "$OUT/quality.log"
fi
if [[ $part == nb ]]; then
  timeout 160 python3 -P -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -k "predicates or bits_where" 2>&1 | tail -15 | tee "$OUT/gpu_tests_rules.log"
  timeout 290 python3 -P benchmarks/attention.py --shapes wan14b --no-backward --no-flex-sparse --compare-bound \
    --patterns radial nb-time nb-3d nb-preset nb-gna nb-3d-tiles nb-gna-tiles --json "$OUT/attention_nb64.json" 2>&1 | tee "$OUT/attention_nb64.log"
  timeout 120 python3 -P benchmarks/attention.py --shapes wan14b --no-backward --no-flex-sparse --compare-lazy \
    --patterns radial nb-time --json "$OUT/attention_lazy.json" 2>&1 | tee "$OUT/attention_lazy.log"
fi
if [[ $part == nb-e2e ]]; then
  timeout 110 python3 -P benchmarks/attention.py --shapes wan14b --no-backward --no-flex-sparse --compare-bound --block-n 128 \
    --patterns nb-3d nb-preset --json "$OUT/attention_nb128.json" 2>&1 | tee "$OUT/attention_nb128.log"
  timeout 170 python3 -P benchmarks/attention.py --shapes wan14b --no-flex-sparse --patterns radial ${NB_PATTERNS:-nb-3d} \
    ${NB_FLAGS:-} --json "$OUT/attention_nb_bwd.json" 2>&1 | tee "$OUT/attention_nb_bwd.log"
  timeout 280 python3 -P benchmarks/e2e.py --models 14b --repeats 2 --backends triton --methods radial ${NB_METHODS:-"neighborhood:kernel_size=(9,23,40)"} 2>&1 | tee "$OUT/e2e_nb.log"
fi
if [[ $part == regs ]]; then
  timeout 260 python3 -P -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -k "matches_reference_gpu or fused_backward or (predicates and ((neighborhood3d_128_padded and rule) or (circle and bits)))" 2>&1 | tail -15 | tee "$OUT/gpu_tests_regs.log"
  timeout 240 python3 -P benchmarks/attention.py --shapes wan14b --no-flex-sparse --patterns radial --precision int8 fp8 int8-qk \
    --json "$OUT/attention_regs_wan.json" 2>&1 | tee "$OUT/attention_regs_wan.log"
  timeout 150 python3 -P benchmarks/tune_cache.py 2>&1 | tee "$OUT/tune_cache.log"
fi
if [[ $part == regs2 ]]; then  # after the size class joined the tuning key: Wan2.1-14B and HunyuanVideo 129, fwd + bwd
  timeout 250 python3 -P benchmarks/attention.py --shapes wan14b --no-flex-sparse --patterns radial --precision int8 fp8 int8-qk \
    --json "$OUT/attention_regs2_wan.json" 2>&1 | tee "$OUT/attention_regs2_wan.log"
  timeout 230 python3 -P benchmarks/attention.py --shapes hunyuan129 --no-flex-sparse --patterns radial \
    --json "$OUT/attention_regs2_hv.json" 2>&1 | tee "$OUT/attention_regs2_hv.log"
  timeout 90 python3 -P -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -k "fused_backward" 2>&1 | tail -5 | tee "$OUT/gpu_tests_fused.log"
fi
if [[ $part == regs3 ]]; then  # the same, HunyuanVideo 509 frames forward and the Wan2.1-14B forward end to end
  timeout 170 python3 -P benchmarks/attention.py --shapes hunyuan509 --no-backward --no-flex-sparse --precision int8 \
    --json "$OUT/attention_regs3_hv509.json" 2>&1 | tee "$OUT/attention_regs3_hv509.log"
  timeout 300 python3 -P benchmarks/e2e.py --models 14b --repeats 2 --backends triton --methods radial "radial:precision='int8'" 2>&1 | tee "$OUT/e2e_regs3.log"
fi
if [[ $part == fa4 ]]; then
  python3 -P -c "import flash_attn.cute, cutlass, importlib.metadata as m; print('flash-attn-4', m.version('flash-attn-4'), 'cutlass-dsl', m.version('nvidia-cutlass-dsl'))"
  timeout 200 python3 -P -m pytest -q -m gpu tests/test_fa4.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests_fa4.log"
  timeout 200 python3 -P benchmarks/attention.py --shapes wan14b hunyuan129 --no-flex-sparse --patterns radial \
    --json "$OUT/attention_fa4.json" 2>&1 | tee "$OUT/attention_fa4.log"
  timeout 150 python3 -P benchmarks/attention.py --shapes hunyuan509 --no-backward --no-flex-sparse \
    --json "$OUT/attention_fa4_hv509.json" 2>&1 | tee "$OUT/attention_fa4_hv509.log"
fi
if [[ $part == fa4-rules ]]; then  # element rules through the bits mask_mod: 128 x 128 windows, fwd + bwd
  timeout 250 python3 -P benchmarks/attention.py --shapes wan14b --no-flex-sparse --block-n 128 --patterns radial nb-3d \
    --json "$OUT/attention_fa4_rules.json" 2>&1 | tee "$OUT/attention_fa4_rules.log"
fi
if [[ $part == fa4-flex ]]; then
  timeout 330 python3 -P benchmarks/attention.py --shapes wan14b hunyuan129 --patterns radial \
    --json "$OUT/attention_fa4_flex.json" 2>&1 | tee "$OUT/attention_fa4_flex.log"
fi
if [[ $part == fa4-flex509 ]]; then
  timeout 250 python3 -P benchmarks/attention.py --shapes hunyuan509 --no-backward --patterns radial \
    --json "$OUT/attention_fa4_flex509.json" 2>&1 | tee "$OUT/attention_fa4_flex509.log"
fi
if [[ $part == fa4-e2e ]]; then
  timeout 400 python3 -P benchmarks/e2e.py --models 14b --repeats 2 --backends triton fa4 --methods radial 2>&1 | tee "$OUT/e2e_fa4.log"
  timeout 200 python3 -P benchmarks/e2e.py --models 1.3b --repeats 3 --backends triton fa4 --methods radial 2>&1 | tee -a "$OUT/e2e_fa4.log"
fi
