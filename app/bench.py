"""``diffattn bench``: one attention call of a model at its real size, timed on this GPU: dense cuDNN
SDPA, dense FlashAttention-2 SDPA, FlexAttention with the method's mask and diffattn's Triton kernel
with the method's blocks, same inputs, one run; the table printed.

    diffattn bench                                              # Wan2.1-14B 720p 81 frames, radial
    diffattn bench --model hunyuan --method radial --backward   # HunyuanVideo 720p 129 frames, fwd + bwd
    diffattn bench --model wan --height 480 --width 832 --heads 12 --method neighborhood --kernel-size 9 15 25
    diffattn bench --model flux --height 2048 --width 2048 --method clear --radius 16
    diffattn bench --model wan hunyuan flux --method neighborhood  # several models, each at its default size

The token grid comes from the model preset (``diffattn mask``'s: VAE compression, patch size, text
tokens), the heads and head size from ``HEADS`` (the largest public config of the family; change
them with ``--heads``/``--head-dim``). q, k, v are random bf16 ``[1, heads, S, D]``. The method runs
as it does inside a pipeline (its token order, appended tokens, element rules from per-block bits
built once, none of that set-up timed), once through each backend; its output through Triton is
compared with the FlexAttention one (max abs error column). Where flash-attn-4 is installed
(Hopper), FA4 dense joins the dense baselines and the method also runs on the fa4 backend when its
description fits FA4 (128 x 128 blocks; element rules as forced, though ``auto`` leaves them to
Triton; otherwise a line says why not).

Columns: ms per call (median, ``triton.testing.do_bench``), TFLOP/s on the computed part, speed-up
against dense cuDNN, and efficiency = density x t(best dense) / t: 1.0 means as fast per computed
block as the best dense kernel over all blocks. ``--device cpu`` checks the tool on a machine
without a GPU (Triton interpreted, SDPA math); its times say nothing about GPU speed. The longer
research suite (more shapes, neighborhood variants, TMA and rule comparisons) is
``benchmarks/attention.py``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffattn.app import mask as mask_tool
from diffattn.core.context import AttnContext
from diffattn.kernels import fa4

# heads x head size per preset: the largest public config of the family (Wan2.1-14B, HunyuanVideo 13B,
# Mochi 1, CogVideoX-5B, LTX-Video, LTX-2 19B's video stream, FLUX.1-dev, SD3.5-Large; the testbed's own)
HEADS = {"wan": (40, 128), "wan2.2": (40, 128), "hunyuan": (24, 128), "mochi": (24, 128), "cogvideox": (48, 64),
         "ltx": (32, 64), "ltx2": (32, 128), "flux": (24, 128), "sd3": (38, 64), "testbed": (2, 32), "testbed-flux": (2, 32)}


@dataclass
class Row:
    model: str
    kernel: str
    density: float
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_speedup: float | None = None
    bwd_speedup: float | None = None
    fwd_eff: float | None = None
    bwd_eff: float | None = None
    tflops: float | None = None
    max_err: float | None = None
    note: str = ""


def time_call(fn, device: str, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median ms of ``fn()``: ``triton.testing.do_bench`` on CUDA, a wall-clock loop elsewhere."""
    if device.startswith("cuda"):
        import triton

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return min(times)


def time_pair(attn, q, k, v, backward: bool, device: str = "cuda") -> tuple[float, float | None]:
    """(forward ms, backward ms or None) of ``attn(q, k, v)``; backward = fwd+bwd minus fwd."""
    fwd = time_call(lambda: attn(q, k, v), device)
    if not backward:
        return fwd, None
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    grad = torch.randn_like(q)

    def step():
        torch.autograd.grad(attn(qg, kg, vg), (qg, kg, vg), grad)

    return fwd, max(time_call(step, device) - fwd, 0.0)


def _dense_kernels(device: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    if not device.startswith("cuda"):
        return {"SDPA math (dense)": sdpa_with(SDPBackend.MATH)}
    kernels = {"cuDNN SDPA (dense)": sdpa_with(SDPBackend.CUDNN_ATTENTION),
               "FA2 SDPA (dense)": sdpa_with(SDPBackend.FLASH_ATTENTION)}
    if fa4.installed()[0]:  # the user's FlashAttention-4, a dense baseline too
        from flash_attn.cute import flash_attn_func

        kernels["FA4 (dense)"] = lambda q, k, v: flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)))[0].transpose(1, 2)
    return kernels


def _cache():
    store = {}

    def cache(key, build):
        if key not in store:
            store[key] = build()
        return store[key]

    return cache


def method_runner(model: str, method: str, options: dict, layout, backend: str):
    """``attn(q, k, v)`` running ``method`` on ``backend`` exactly as a pipeline call would."""
    grid = mask_tool.MODELS[model]
    m = mask_tool.build_method(method, grid.family, {**options, "backend": backend})
    ctx = AttnContext(layout=layout, step=0, num_steps=None, layer=0, site=f"bench.{backend}", cache=_cache())
    return m, lambda q, k, v: m(q, k, v, ctx)


def check_case(model: str, method: str, height: int, width: int, frames: int, options: dict) -> tuple:
    """(layout, method) of a case, raising ValueError naming the fix (no GPU work)."""
    from diffattn.methods.base import BlockSparseMethod
    from diffattn.methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; one of {sorted(METHODS)}")
    if not issubclass(METHODS[method], BlockSparseMethod):
        timed = sorted(n for n, c in METHODS.items() if issubclass(c, BlockSparseMethod))
        raise ValueError(f"{method} is not a block-sparse attention (nothing for the kernels to time); bench times {timed}; "
                         "the U-Net methods are timed end to end by benchmarks/unet_speed.py")
    grid, layout = mask_tool.layout_of(model, height, width, frames)
    m = mask_tool.build_method(method, grid.family, options)
    m.check_layout(layout)
    return layout, m


def run_case(model: str, method: str, height: int, width: int, frames: int, options: dict, *, heads: int, head_dim: int,
             backward: bool, device: str, log=print) -> list[Row]:
    layout, m = check_case(model, method, height, width, frames, options)
    seq = layout.seq_len
    name = f"{model} {height}x{width}x{frames} S={seq} H={heads}"
    description = m.describe(layout, "cpu")
    kernel_seq = description.q_len
    density = description.density * (kernel_seq / seq) ** 2  # computed area over the model's S x S (tile order pads)
    log(f"{name}: {method} {m.config}, density {density:.4f} over {layout}", flush=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))  # [B, H, S, D]
    flops_dense = 4.0 * heads * seq * seq * head_dim

    kernels = {label: (fn, 1.0) for label, fn in _dense_kernels(device).items()}
    dense = list(kernels)
    names = {"flex": "FlexAttention", "triton": "diffattn Triton", "sdpa": "SDPA token mask", "fa4": "diffattn FA4"}
    backends = ["flex", "triton"] if device.startswith("cuda") else ["sdpa", "triton"]
    if device.startswith("cuda") and fa4.PRESENT:  # where the user has flash-attn-4 and it can run the method
        ok, why = fa4.can_run(q, description, forced=True)  # a comparison: element rules too, though auto skips them
        if ok:
            backends.append("fa4")
        else:
            log(f"  no diffattn FA4 row: {why}", flush=True)
    for backend in backends:
        _, attn = method_runner(model, method, options, layout, backend)
        kernels[f"{names[backend]} ({method})"] = (attn, density)
    outputs = {}  # the method's output per backend, compared below
    times, failed = {}, {}
    for label, (fn, dens) in kernels.items():
        try:
            if label not in dense:
                with torch.no_grad():
                    outputs[label] = fn(q, k, v).float()
            times[label] = time_pair(fn, q, k, v, backward, device)
        except Exception as exc:  # one failing baseline must not hide the rest; the row says why
            failed[label] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            log(f"  {label}: {failed[label]}", flush=True)
            continue
        f, b = times[label]
        log(f"  {label}: fwd {f:.2f} ms" + (f", bwd {b:.2f} ms" if b is not None else ""), flush=True)
    dense = [label for label in dense if label in times]
    best_fwd = min((times[n][0] for n in dense), default=None)
    best_bwd = min((times[n][1] for n in dense if times[n][1] is not None), default=None)
    base = dense[0] if dense else None  # cuDNN on CUDA
    reference = next((label for label in outputs if not label.startswith("diffattn")), None)
    rows = []
    for label, (fn, dens) in kernels.items():
        if label in failed:
            rows.append(Row(name, label, round(dens, 4), note=failed[label]))
            continue
        f, b = times[label]
        row = Row(name, label, round(dens, 4), round(f, 3), None if b is None else round(b, 3))
        if base is not None:
            row.fwd_speedup = round(times[base][0] / f, 2)
            if b is not None and times[base][1] is not None:
                row.bwd_speedup = round(times[base][1] / b, 2)
        if label not in dense:
            row.fwd_eff = round(dens * best_fwd / f, 3) if best_fwd else None
            row.bwd_eff = round(dens * best_bwd / b, 3) if best_bwd and b is not None else None
        row.tflops = round(flops_dense * dens / f / 1e9, 1)
        if label.startswith("diffattn") and reference is not None and label in outputs:
            row.max_err = float((outputs[label] - outputs[reference]).abs().max())
            row.note = f"max abs error vs {reference}"
        rows.append(row)
    del q, k, v, outputs
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def format_table(rows: list[Row]) -> str:
    def cell(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| model | kernel | density | fwd ms | x cuDNN | eff | bwd ms | x cuDNN | eff | TFLOP/s | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.fwd_ms is None:
            lines.append(f"| {r.model} | {r.kernel} | {r.density:.3f} | {r.note} |||||||")
            continue
        lines.append(f"| {r.model} | {r.kernel} | {r.density:.3f} | {r.fwd_ms:.2f} | {cell(r.fwd_speedup, '.2f')} | "
                     f"{cell(r.fwd_eff, '.2f')} | {cell(r.bwd_ms, '.2f')} | {cell(r.bwd_speedup, '.2f')} | "
                     f"{cell(r.bwd_eff, '.2f')} | {cell(r.tflops, '.0f')} | {cell(r.max_err, '.1e')} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    parser.add_argument("--model", nargs="+", default=["wan"], help=f"model presets, each one of {sorted(mask_tool.MODELS)} "
                        "(default wan: Wan2.1-14B)")
    parser.add_argument("--method", default=method, help="a block-sparse method: radial, neighborhood or clear (default radial)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: each preset's, e.g. 720 for wan)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: each preset's, e.g. 1280 for wan)")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames (default: each preset's; 1 for image models)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: the preset's, e.g. 40 for wan)")
    parser.add_argument("--head-dim", type=int, default=None, help="head size (default: the preset's, e.g. 128)")
    parser.add_argument("--backward", action="store_true", help="also time the backward (training)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the tool without a GPU")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")


def run(args, options: dict) -> list[Row]:
    import json
    from dataclasses import asdict

    if args.json and not args.json.endswith(".json"):
        raise ValueError(f"--json must name a .json file, got {args.json!r}")
    if args.json:
        import os
        from pathlib import Path

        folder = Path(args.json).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"the folder of --json ({folder}) does not exist or is not writable; create it or pick another path")
    cases = []
    for model in args.model:  # every case checked before any kernel runs
        if model not in mask_tool.MODELS:
            raise ValueError(f"unknown --model {model!r}; one of {sorted(mask_tool.MODELS)}")
        size = mask_tool.MODELS[model].size
        h = args.height if args.height is not None else size[0]
        w = args.width if args.width is not None else size[1]
        frames = args.frames if args.frames is not None else (size[2] if mask_tool.MODELS[model].temporal else 1)
        heads = args.heads if args.heads is not None else HEADS[model][0]
        head_dim = args.head_dim if args.head_dim is not None else HEADS[model][1]
        if heads < 1 or head_dim < 1:
            raise ValueError(f"--heads and --head-dim must be >= 1, got {heads} and {head_dim}")
        check_case(model, args.method, h, w, frames, options)
        cases.append((model, h, w, frames, heads, head_dim))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("this machine has no CUDA GPU; bench times GPU kernels (`--device cpu` only checks the tool; "
                         "`diffattn mask` gives the density without a GPU)")
    if not args.device.startswith(("cuda", "cpu")):
        raise ValueError(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device.startswith("cuda"):
        import triton

        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for model, h, w, frames, heads, head_dim in cases:
        rows += run_case(model, args.method, h, w, frames, options, heads=heads, head_dim=head_dim,
                         backward=args.backward, device=args.device)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump([asdict(r) for r in rows], fh, indent=1)
    print()
    print(format_table(rows), flush=True)
    return rows


__all__ = ["HEADS", "Row", "add_arguments", "check_case", "format_table", "method_runner", "run", "run_case", "time_call", "time_pair"]
