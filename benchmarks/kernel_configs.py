"""What each autotune candidate of the Triton kernels costs at one real shape: the autotuner's own
timings of every config of the forward (and, with ``--backward``, of the dK/dV and dQ passes), per
pattern and precision, on the GPU. The attention benchmark prints only the winners; this says by
how much they win, which is what a new config or a kernel change has to beat (kernels/NOTES.md).

    python benchmarks/kernel_configs.py --shapes wan14b --patterns radial nb-time nb-3d --block-n 128
    python benchmarks/kernel_configs.py --shapes wan14b --precision int8 --backward

The on-disk tuning cache is off here (every config is timed in this process). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["DIFFATTN_AUTOTUNE_CACHE"] = "0"  # before the kernels are imported: time, never read back

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import SHAPES, case_arguments, sparse_patterns  # noqa: E402

from diffattn.kernels import block_sparse as bs  # noqa: E402
from diffattn.kernels.block_sparse import block_sparse_attention, element_bits  # noqa: E402


def _describe(config) -> str:
    kw = ", ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    cap = f", maxnreg={config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    return f"{kw}, warps={config.num_warps}, stages={config.num_stages}{cap}"


def _timings(kernel) -> list[tuple[float, str]]:
    """The autotuner's timings of its last benchmarked key, fastest first (ms; inf: did not run)."""
    timings = getattr(kernel, "configs_timings", None) or {}
    rows = []
    for config, t in timings.items():
        ms = t[0] if isinstance(t, (list, tuple)) else t
        rows.append((float(ms), _describe(config)))
    return sorted(rows)


def run(shape_key: str, patterns, block_n: int, precisions, backward: bool) -> None:
    shape = SHAPES[shape_key]
    s, h, d = shape.seq, shape.heads, shape.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    print(f"{shape.name}: S={s}, H={h}, D={d}", flush=True)
    for label, (sp, order) in sparse_patterns(shape, patterns, block_n=block_n).items():
        if order is not None:
            qq, kk, vv = (x.index_select(-2, order[0]) for x in (q, k, v))
        else:
            qq, kk, vv = q, k, v
        bits = element_bits(sp) if sp.rule is not None else None
        for prec in (None, *precisions):
            name = f"{label} {prec or 'bf16'} forward"
            for kernel in (bs._fwd_kernel, bs._dkdv_kernel, bs._dq_kernel):
                kernel.cache.clear()  # tune this call's key afresh
                kernel.configs_timings = {}
            grad = backward and prec is None
            args = [x.detach().requires_grad_(grad) for x in (qq, kk, vv)]
            out = block_sparse_attention(*args, sp, bits=bits, precision=prec)
            torch.cuda.synchronize()
            passes = [(name, bs._fwd_kernel)]
            if grad:
                out.backward(torch.randn_like(out))
                torch.cuda.synchronize()
                passes += [(f"{label} dK/dV", bs._dkdv_kernel), (f"{label} dQ", bs._dq_kernel)]
            for title, kernel in passes:
                rows = _timings(kernel)
                print(f"  {title}: {len(rows)} configs timed", flush=True)
                best = rows[0][0] if rows else float("nan")
                for ms, desc in rows:
                    print(f"    {ms:9.3f} ms  x{ms / best:5.2f}  {desc}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    case_arguments(parser, shapes=["wan14b"])
    parser.add_argument("--backward", action="store_true", help="also the dK/dV and dQ passes (bf16)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernel_configs.py: needs a CUDA GPU (the autotuner's timings are the measurement)")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for key in args.shapes:
        run(key, args.patterns, args.block_n, args.precision, args.backward)


if __name__ == "__main__":
    main()
