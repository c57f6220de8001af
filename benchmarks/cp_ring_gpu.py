"""One ring rank's attention work under diffattn's sparse ring, on one GPU.

    python benchmarks/cp_ring_gpu.py [--json out.json] [--quick]

A ring rank runs the block-sparse kernel on its own query rows (``pipelines.parallel.ring_plan``:
every other query block reduced to one placeholder block) and computes the global rows (text,
radial's frame 0) by parts over its own keys (``kernels.partial``). For Wan2.1-14B 720p and
HunyuanVideo 720p (129 frames; 509 frames forward only), radial at the family defaults, bf16,
W = 2, 4, 8: milliseconds of the busiest rank's kernel call and of its global-row part against the
whole attention on one GPU, the implied ring compute efficiency (whole / (W x busiest)), and the
rank rows' largest error against the whole attention's same rows (the placeholders must not leak).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffattn.app.bench import time_call
from diffattn.app.mask import build_method, layout_of
from diffattn.kernels import block_sparse
from diffattn.pipelines import parallel

CASES = [  # name, preset, frames, heads, backward
    ("Wan2.1-14B 720p 81f", "wan", 81, 40, True),
    ("HunyuanVideo 720p 129f", "hunyuan", 129, 24, True),
    ("HunyuanVideo 720p 509f", "hunyuan", 509, 24, False),
]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="W = 2 only, no backward")
    args = parser.parse_args(argv)
    dev = "cuda"
    rows = []
    for name, preset, frames, heads, backward in CASES:
        grid, layout = layout_of(preset, 720, 1280, frames)
        method = build_method("radial", grid.family, {})
        sparsity = method.describe(layout, dev)
        g = torch.Generator(dev).manual_seed(0)
        q, k, v = (torch.randn(1, heads, layout.seq_len, 128, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        bits = block_sparse.element_bits(sparsity) if sparsity.rule is not None else None
        whole = lambda s=sparsity, b=bits: block_sparse.block_sparse_attention(q, k, v, s, bits=b)  # noqa: E731
        t_whole = time_call(whole, dev)
        ref = whole()
        t_whole_bwd = None
        if backward and not args.quick:
            grad = torch.randn_like(q)
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            t_whole_bwd = time_call(lambda: torch.autograd.grad(block_sparse.block_sparse_attention(qg, kg, vg, sparsity, bits=bits),
                                                                 (qg, kg, vg), grad), dev) - t_whole
        for world in ((2,) if args.quick else (2, 4, 8)):
            members = [parallel.positions(layout, world, r, dev) for r in range(world)]
            worst = None
            for rank in range(world):
                plan = parallel.ring_plan(sparsity, layout, members, rank)
                rb = block_sparse.element_bits(plan.rows) if plan.rows.rule is not None else None
                fn = lambda p=plan, b=rb: block_sparse.block_sparse_attention(q, k, v, p.rows, bits=b)  # noqa: E731
                t = time_call(fn, dev, rep_ms=100)
                main_rows = plan.mine[~torch.isin(torch.arange(plan.mine.numel(), device=dev), plan.glob)]
                err = float((fn().index_select(2, main_rows) - ref.index_select(2, main_rows)).abs().max())
                finite = bool(torch.isfinite(fn()).all())
                t_glob = 0.0
                if sum(plan.glob_counts):
                    ng = sum(plan.glob_counts)
                    qg_all = torch.randn(1, heads, ng, 128, device=dev, dtype=torch.bfloat16, generator=g)
                    kl, vl = k.index_select(2, plan.mine), v.index_select(2, plan.mine)
                    t_glob = time_call(lambda: parallel.part_attention(qg_all, kl, vl, None), dev, rep_ms=100)
                t_bwd = None
                if backward and not args.quick:
                    qg, kg, vg = (t_.detach().requires_grad_(True) for t_ in (q, k, v))
                    gr = torch.zeros_like(q)
                    gr[:, :, main_rows] = 1.0  # the rank's rows only, as ring_attention's index_select gives
                    t_bwd = time_call(lambda p=plan, b=rb: torch.autograd.grad(
                        block_sparse.block_sparse_attention(qg, kg, vg, p.rows, bits=b), (qg, kg, vg), gr), dev, rep_ms=100) - t
                row = dict(case=name, world=world, rank=rank, ms=t, ms_global=t_glob, ms_bwd=t_bwd, err=err, finite=finite,
                           keys_moved=plan.tokens_moved, keys_all_gather=plan.tokens_dense, global_rows=sum(plan.glob_counts))
                if worst is None or t + t_glob > worst["ms"] + worst["ms_global"]:
                    worst = row
                rows.append({**row, "whole_ms": t_whole, "whole_bwd_ms": t_whole_bwd})
            eff = t_whole / (world * (worst["ms"] + worst["ms_global"]))
            eff_bwd = (t_whole_bwd / (world * worst["ms_bwd"])) if worst["ms_bwd"] else None
            errs = max(r["err"] for r in rows if r["case"] == name and r["world"] == world)
            print(f"{name:24s} W={world}: whole {t_whole:8.2f} ms, busiest rank {worst['ms']:7.2f} ms + global rows "
                  f"{worst['ms_global']:6.2f} ms -> compute efficiency {eff:.2f}"
                  + (f"; bwd whole {t_whole_bwd:8.2f} ms, busiest {worst['ms_bwd']:7.2f} ms -> {eff_bwd:.2f}" if eff_bwd else "")
                  + f"; max err {errs:.2e}, finite {all(r['finite'] for r in rows if r['case'] == name)}", flush=True)
        q = k = v = ref = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
