"""Per-step cost of guidance on Wan2.1-14B 720p (random bf16 weights): CFG vs CFG + SoftPAG, dense
and radial, with and without the shared prefix, in one run.

    python benchmarks/guidance_speed.py                                   # 14B, 720x1280x81
    python benchmarks/guidance_speed.py --model 1.3b --layers 15 --repeats 2

One "step" is what WanPipeline does per denoising step: the conditional call under
``cache_context("cond")`` and the unconditional one under ``("uncond")``; with guidance the
conditional call also runs the weak branch (separate calls, as Wan's pipeline does). Radial runs
every step sparse (dense_steps=0). Prints ms per step and the cost relative to plain CFG of the same
attention; the shared-prefix rows reuse the blocks before the perturbed layer. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import diffattn
from e2e import CONFIGS, build


def time_step(model, cond, uncond, repeats: int, warm: bool) -> float:
    def step():
        with model.cache_context("cond"):
            model(**cond)
        with model.cache_context("uncond"):
            model(**uncond)

    with torch.no_grad():
        if warm:
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="14b", choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="perturbed layers (default: the family's)")
    parser.add_argument("--u", type=float, default=0.5)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/guidance_speed.py needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    model = build(args.model)
    _, latent, clip = CONFIGS[args.model]
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, *latent, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.tensor([500], device="cuda")
    cond, uncond = ({"hidden_states": x, "timestep": t, "return_dict": False,
                     "encoder_hidden_states": torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)}
                    for _ in range(2))
    spag = dict(u=args.u, **({"layers": args.layers} if args.layers else {}))
    runs = [
        ("dense", None, None), ("dense", "soft-pag", False), ("dense", "soft-pag", True),
        ("radial", None, None), ("radial", "soft-pag", False), ("radial", "soft-pag", True),
    ]
    rows, base = [], {}
    for attention, guidance, share in runs:
        handle = None
        if attention == "radial" or guidance:
            branch = diffattn.guide(guidance, share_prefix=share, **spag) if guidance else None
            if attention == "radial":
                handle = diffattn.apply(model, "radial", dense_steps=0, guidance=branch)
            else:
                handle = diffattn.apply(model, guidance, share_prefix=share, **spag)
        try:
            ms = time_step(model, cond, uncond, args.repeats, warm=guidance is None)
            summary = handle.summary() if handle is not None else {}
        finally:
            if handle is not None:
                handle.remove()
        if guidance is None:
            base[attention] = ms
        label = f"{attention} CFG" + (f" + SoftPAG u={args.u}" + (" (shared prefix)" if share else "") if guidance else "")
        row = {"model": args.model, "clip": clip, "run": label, "ms_per_step": round(ms), "vs_cfg": round(ms / base[attention], 3),
               "vs_dense_cfg": round(ms / base["dense"], 3), "guidance": summary.get("guidance")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'run':48s} {'ms/step':>9s} {'x CFG':>7s} {'x dense CFG':>12s}")
    for r in rows:
        print(f"{r['run']:48s} {r['ms_per_step']:9d} {r['vs_cfg']:7.3f} {r['vs_dense_cfg']:12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
