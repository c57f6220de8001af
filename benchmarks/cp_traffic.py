"""Context-parallel communication per attention call, on paper (CPU: block descriptions only).

    python benchmarks/cp_traffic.py [--json out.json]

For Wan2.1-14B 720p (81 frames, 40 heads) and HunyuanVideo 720p at 4x length (509 frames, 24 heads,
256 text tokens), radial and neighborhood attention at their family defaults (and neighborhood with a local (9, 23, 40) window), on 2, 4 and 8 ranks:
the bytes one rank moves per attention call (bf16 K and V; Ulysses also Q and the output) under

- Ulysses (all-to-all of q, k, v and the output: every rank keeps (W-1)/W of each on the wire),
- an all-gather ring (diffusers' ``rotate_method="allgather"``: every rank receives every other chunk),
- diffattn's sparse ring (``pipelines.parallel.ring_plan``: only the key tokens its query blocks list),

and the ring's compute balance (listed blocks of the busiest rank / the mean).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffattn.app.mask import build_method, layout_of
from diffattn.pipelines import parallel

CASES = [  # (name, model preset, frames, heads, head_dim)
    ("Wan2.1-14B 720p 81f", "wan", 81, 40, 128),
    ("HunyuanVideo 720p 509f (4x)", "hunyuan", 509, 24, 128),
]
METHODS = (("radial", {}), ("neighborhood", {}), ("neighborhood", {"kernel_size": (9, 23, 40)}))  # preset, then a local 3-D window
WORLDS = (2, 4, 8)
GB = 1e9


def balance(sparsity, layout, world: int) -> float:
    """Listed (query block, key block) pairs of the busiest ring rank over the mean."""
    per_row = sparsity.mask.any(0).sum(-1).float()  # [nq] key blocks per query block
    loads = []
    for r in range(world):
        pos = parallel.positions(layout, world, r, "cpu")
        rows = torch.unique(torch.div(pos, sparsity.block_m, rounding_mode="floor"))
        loads.append(float(per_row[rows].sum()))
    return max(loads) / (sum(loads) / world)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'case':30s} {'method':34s} {'W':>2s} {'density':>7s} {'ulysses GB':>10s} {'ring GB':>8s} "
          f"{'sparse GB':>9s} {'max GB':>7s} {'saved':>6s} {'balance':>7s}")
    for name, preset, frames, heads, head_dim in CASES:
        _, layout = layout_of(preset, 720, 1280, frames)
        for method_name, options in METHODS:
            method = build_method(method_name, layout_of(preset, 720, 1280, frames)[0].family, options)
            label = method_name + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items()).replace(" ", ""))
            sparsity = method.describe(layout, "cpu")
            for world in WORLDS:
                t = parallel.traffic(sparsity, layout, world, heads=heads, head_dim=head_dim)
                local = layout.seq_len // world
                ulysses = 4 * local * (world - 1) / world * heads * head_dim * 2  # q, k, v in and the output back
                row = {"case": name, "method": label, "world": world, "tokens": layout.seq_len,
                       "density": sparsity.density, "ulysses_bytes": ulysses, **t, "balance": balance(sparsity, layout, world)}
                rows.append(row)
                print(f"{name:30s} {label:34s} {world:2d} {sparsity.density:7.3f} {ulysses / GB:10.3f} "
                      f"{t['dense_bytes'] / GB:8.3f} {t['sparse_bytes_mean'] / GB:9.3f} {t['sparse_bytes_max'] / GB:7.3f} "
                      f"{t['saved']:6.1%} {row['balance']:7.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
