"""Attention kernels, one run, same inputs: cuDNN SDPA, FlashAttention-2 SDPA, FlexAttention (dense
and with each sparse pattern) and diffattn's Triton block-sparse kernel, for radial and
neighborhood patterns.

    python benchmarks/attention.py                       # every shape below, forward and fwd+bwd
    python benchmarks/attention.py --shapes wan14b hunyuan129 --no-backward
    python benchmarks/attention.py --shapes wan14b --patterns radial nb-time nb-3d
    python benchmarks/attention.py --json out.json       # also write the rows

Patterns (``--patterns``): ``radial`` (the shape's radial mask, block 128), and on the video shapes
neighborhood windows at a density comparable to radial's: ``nb-time`` (a temporal window, kernel
(5, Y, X)), ``nb-3d`` (kernel (9, 23, 40) on Wan 720p, scaled by grid), ``nb-preset`` (the family
preset rescaled to the grid) and ``nb-gna`` (stride = tile, windows on tile edges). Each runs in
model (row-major) order with 128 x 64 blocks (the method's default is now 128 x 128: ``--block-n 128``); ``nb-...-tiles`` runs it in
tile order (one block per 128-token tile), timed with the gather of q, k, v and the scatter of the
output. ``--block-n 128`` describes the row-major windows with 128 x 128 blocks instead.

``--precision int8 fp8 int8-qk`` adds the 8-bit forward of our kernel (forward only: it is an inference
mode) and prints every kernel's relative error against an fp32 reference on 512 query rows of 4
heads (block-level patterns). ``--compare-backward`` adds our kernel with the split deterministic
backward next to the default fused one.

Element rules run from per-block bits (the kernel's default; built once per description, their
build time and memory printed); ``--compare-rule`` also times the in-kernel per-score predicate, and
``--compare-bound`` both partial-block variants (with and without the key bound; the default keeps it);
``--compare-lazy`` our kernel with FlashAttention-4's lazy rescale of full blocks (an experiment).
Where ``flash-attn-4`` is installed (Hopper), FA4 dense joins the dense baselines and the fa4
backend (FA4's block-sparse kernels, ``diffattn.kernels.fa4``) runs each pattern with 128 x 128
blocks (windows: ``--block-n 128``), element rules through its bits ``mask_mod`` (forced: ``auto``
leaves them to Triton).

Prints ms, TFLOP/s on computed blocks, and efficiency = density x t(best dense) / t(ours):
1.0 means our kernel is as fast per computed block as the best dense kernel over all blocks.
Needs a CUDA GPU (bf16). Results go to benchmarks/RESULTS.md by hand, with the command, GPU,
versions and date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffattn.app.bench import time_pair
from diffattn.core.layout import TokenLayout
from diffattn.kernels import PRECISIONS, fa4
from diffattn.kernels.block_sparse import block_sparse_attention, element_bits
from diffattn.kernels.flex import FlexBackend
from diffattn.methods.neighborhood import PRESETS, rescale
from diffattn.patterns import neighborhood, radial
from diffattn.patterns.blocks import dense as dense_blocks
from diffattn.patterns.blocks import from_block_mask


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    frames: int
    tokens_per_frame: int
    text: int
    rows: int  # Y: tokens_per_frame = rows * cols
    cols: int
    decay: float
    sink: bool
    backward: bool = True
    dense_only: bool = False
    head_dim: int = 128

    @property
    def seq(self) -> int:
        return self.frames * self.tokens_per_frame + self.text


SHAPES = {
    "wan13b": Shape("Wan2.1-1.3B 480x832x81", 12, 21, 1560, 0, 30, 52, 0.2, True),
    "wan14b": Shape("Wan2.1-14B 720x1280x81", 40, 21, 3600, 0, 45, 80, 0.2, True),
    "hunyuan129": Shape("HunyuanVideo 720x1280x129 +256 text", 24, 33, 3600, 256, 45, 80, 0.95, False),
    "hunyuan509": Shape("HunyuanVideo 720x1280x509 +256 text", 24, 128, 3600, 256, 45, 80, 1.0, False, backward=False),
    "flux4k": Shape("FLUX 4096x4096 +512 text (dense)", 24, 1, 65536, 512, 256, 256, 1.0, False, dense_only=True),
}


@dataclass
class Row:
    shape: str
    kernel: str
    density: float
    fwd_ms: float
    fwd_tflops: float
    fwd_eff: float | None
    bwd_ms: float | None = None
    bwd_tflops: float | None = None
    bwd_eff: float | None = None


def _switched(flag: str, fn, *args, **kwargs):
    """``fn`` with one of the kernel's experiment flags (``_LAZY_RESCALE``) switched on for this call."""
    from diffattn.kernels import block_sparse as bs

    before = getattr(bs, flag)
    setattr(bs, flag, True)
    try:
        return fn(*args, **kwargs)
    finally:
        setattr(bs, flag, before)


def _time_pair(attn, q, k, v, backward: bool):
    return time_pair(attn, q, k, v, backward, "cuda")  # (fwd ms, bwd ms or None), as diffattn bench times them


WINDOWS = ("nb-time", "nb-3d", "nb-preset", "nb-gna")
PATTERNS = ("radial",) + WINDOWS + tuple(f"{w}-tiles" for w in WINDOWS)


def sparse_patterns(shape: Shape, names, block_n: int = 64) -> dict:
    """{label: (BlockSparsity, tile order or None)} of the requested patterns on ``shape`` (GPU)."""
    layout = TokenLayout(shape.frames, shape.rows, shape.cols, shape.text, "after" if shape.text else "none")
    out = {}
    for name in names:
        if name == "radial":
            mask = radial.block_mask(
                shape.frames, shape.tokens_per_frame, block_size=128, decay=shape.decay, sink=shape.sink,
                text_tokens=shape.text, device="cuda",
            )
            out["radial"] = (from_block_mask(mask, shape.seq, block_m=128), None)
            continue
        tiling = neighborhood.choose_tiling(layout, 128)
        window = name.removesuffix("-tiles")
        if window == "nb-time":
            kernel, stride = (5, shape.rows, shape.cols), (1, 1, 1)
        elif window == "nb-3d":  # (9, 23, 40) on Wan 720p's (21, 45, 80), by grid fraction elsewhere
            kernel, stride = rescale(((21, 45, 80), (9, 23, 40), (1, 1, 1)), layout)
        elif window == "nb-gna":  # stride = tile, window starts on tile edges: GNA's "fully block-sparse" case
            t = tiling.tile
            kernel = (min(9, shape.frames), 3 * t[1], 3 * t[2]) if t[0] == 1 else (2 * t[0], 3 * t[1], 3 * t[2])
            stride = t
        else:
            kernel, stride = rescale(PRESETS["hunyuan_video" if shape.text else "wan2.1"], layout)
        spec = neighborhood.spec(layout, kernel, stride)
        if name.endswith("-tiles"):  # tile order, one block per tile; timed with the reorder
            gather, _, scatter = neighborhood.tile_order(layout, tiling, "cuda")
            out[f"nb k={kernel} s={stride} tiles {tiling.tile}"] = (
                neighborhood.tiled_block_sparsity(layout, spec, tiling, device="cuda"), (gather, scatter))
        else:  # model order (the method's default)
            out[f"nb k={kernel} s={stride} row-major 128x{block_n}"] = (
                neighborhood.block_sparsity(layout, spec, block_m=128, block_n=block_n, device="cuda"), None)
    return out


def errors_vs_fp32(q, k, v, sp, outs: dict, rows: int = 512, heads: int = 4) -> dict:
    """{name: ||out - ref|| / ||ref||} on ``rows`` random query rows of the first ``heads`` heads,
    ref in fp32 with the description's block mask (block-level descriptions only)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    idx = torch.randperm(q.shape[2], device="cuda", generator=g)[:rows]
    hs = slice(0, heads)
    qf, kf, vf = q[0, hs, idx].float(), k[0, hs].float(), v[0, hs].float()  # [h, r, D], [h, S, D]
    blocks = sp.mask.to("cuda")  # [Hm, nq, nk]
    allowed = blocks[:, idx // sp.block_m].repeat_interleave(sp.block_n, dim=-1)[..., : k.shape[2]]  # [Hm, r, S]
    scores = (qf @ kf.transpose(-1, -2)) / q.shape[-1] ** 0.5
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vf  # [h, r, D]
    return {name: ((out[0, hs, idx].float() - ref).norm() / ref.norm()).item() for name, out in outs.items()}


def run_shape(key: str, backward: bool, flex_sparse: bool = True, compare_tma: bool = False, patterns=("radial",),
              compare_rule: bool = False, block_n: int = 64, precisions=(), compare_backward: bool = False,
              compare_bound: bool = False, compare_lazy: bool = False) -> list[Row]:
    shape = SHAPES[key]
    backward = backward and shape.backward
    s, h, d = shape.seq, shape.heads, shape.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops_dense = 4.0 * h * s * s * d  # two matmuls of 2*S*S*D each, per head

    sparse = {} if shape.dense_only else sparse_patterns(shape, patterns, block_n)
    if shape.dense_only:
        sparse = {"dense": (dense_blocks(s, block_m=128).to("cuda"), None)}

    kernels = {}
    fwd_only = set()

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def fa2(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    from torch.nn.attention.flex_attention import flex_attention

    flex_fn = torch.compile(flex_attention, dynamic=False)  # one compiled function for both flex rows
    kernels["cuDNN SDPA (dense)"] = (cudnn, 1.0)
    if key != "hunyuan509":
        kernels["FA2 SDPA (dense)"] = (fa2, 1.0)
    if shape.dense_only or key != "hunyuan509":
        flex_dense = FlexBackend(dense_blocks(s, block_m=128), "cuda", compiled=flex_fn)
        kernels["Flex (dense)"] = (lambda q, k, v: flex_dense(q, k, v), 1.0)
    has_fa4, why_not = fa4.installed()
    if has_fa4:  # FlashAttention-4 where installed: a dense baseline too, so "best dense" includes it
        from flash_attn.cute import flash_attn_func

        kernels["FA4 (dense)"] = (lambda q, k, v: flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)))[0].transpose(1, 2), 1.0)
    else:
        print(f"  no FA4 rows: {why_not}", flush=True)
    def ordered(fn, order):
        """``fn`` on tokens in tile order: gather q, k, v, run, scatter the output back (timed)."""
        if order is None:
            return fn
        gather, scatter = order
        return lambda q, k, v: fn(*(x.index_select(-2, gather) for x in (q, k, v))).index_select(-2, scatter)

    for label, (sp, order) in sparse.items():
        # computed area over the model's S x S (tile order pads the grid, so its S' > S)
        dens = sp.density * (sp.q_len / s) ** 2
        if not shape.dense_only and flex_sparse:
            runner = FlexBackend(sp, "cuda", compiled=flex_fn)
            kernels[f"Flex ({label})"] = (ordered((lambda r: lambda q, k, v: r(q, k, v))(runner), order), dens)
        bits = None
        if sp.rule is not None:  # built once per description, as the Triton backend does on the handle
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            bits = element_bits(sp)
            torch.cuda.synchronize()
            print(f"  {label}: element bits built in {1e3 * (time.perf_counter() - t0):.1f} ms, {bits.nbytes / 2**20:.1f} MiB", flush=True)
        if has_fa4 and fa4.can_run(q, sp, forced=True)[0]:  # 128 x 128 blocks; element rules from the same bits
            kernels[f"diffattn FA4 ({label})"] = (ordered((lambda lists: lambda q, k, v: fa4.attention(q, k, v, lists))(fa4.prepare(sp, bits)), order), dens)
        kernels[f"diffattn Triton ({label})"] = (ordered((lambda d, b: lambda q, k, v: block_sparse_attention(q, k, v, d, bits=b))(sp, bits), order), dens)
        if compare_backward:
            kernels[f"diffattn Triton split bwd ({label})"] = (ordered((lambda d, b: lambda q, k, v: block_sparse_attention(q, k, v, d, bits=b, backward="split"))(sp, bits), order), dens)
        for prec in precisions:  # forward only (an inference mode)
            kernels[f"diffattn Triton {prec} ({label})"] = (ordered((lambda d, b, p: lambda q, k, v: block_sparse_attention(q, k, v, d, bits=b, precision=p))(sp, bits, prec), order), dens)
            fwd_only.add(f"diffattn Triton {prec} ({label})")
        if compare_lazy:
            kernels[f"diffattn Triton lazy rescale ({label})"] = (ordered((lambda d, b: lambda q, k, v: _switched("_LAZY_RESCALE", block_sparse_attention, q, k, v, d, bits=b))(sp, bits), order), dens)
        if compare_bound and sp.rule is not None:
            for bound in (False, True):
                kernels[f"diffattn Triton bound={bound} ({label})"] = (ordered((lambda d, b, x: lambda q, k, v: block_sparse_attention(q, k, v, d, bits=b, bound_partial=x))(sp, bits, bound), order), dens)
        if compare_rule and sp.rule is not None:
            kernels[f"diffattn Triton per-score rule ({label})"] = (ordered((lambda d: lambda q, k, v: block_sparse_attention(q, k, v, d, element_mask="rule"))(sp), order), dens)
        if compare_tma:
            kernels[f"diffattn no-TMA ({label})"] = (ordered((lambda d, b: lambda q, k, v: block_sparse_attention(q, k, v, d, tma=False, bits=b))(sp, bits), order), dens)
        if label != "dense":
            full = float((sp.mask & ~sp.partial).sum() / sp.mask.sum())
            print(f"  {label}: density {dens:.3f} of S^2, full blocks {full:.2f} of listed, rule {sp.rule_kind}", flush=True)

    # correctness of ours vs cuDNN at this size, on a slice of heads (dense comparison only)
    if shape.dense_only:
        sp = sparse["dense"][0]
        ref = cudnn(q[:, :2], k[:, :2], v[:, :2]).float()
        got = block_sparse_attention(q[:, :2].contiguous(), k[:, :2].contiguous(), v[:, :2].contiguous(), sp).float()
        print(f"  dense check vs cuDNN: max abs err {(got - ref).abs().max().item():.3e}", flush=True)

    times = {}
    for name, (fn, dens) in kernels.items():
        try:
            times[name] = (_time_pair(fn, q, k, v, backward and name not in fwd_only), dens)
        except Exception as exc:  # report and go on: one failing baseline must not hide the rest
            print(f"  {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        (f, b), _ = times[name]
        print(f"  {name}: fwd {f:.2f} ms" + (f", bwd {b:.2f} ms" if b is not None else ""), flush=True)

    if precisions:  # accuracy of our kernel at each precision, same inputs
        for label, (sp, order) in sparse.items():
            if sp.rule is not None or order is not None or label == "dense":
                continue
            with torch.no_grad():
                outs = {name: kernels[name][0](q, k, v) for name in kernels if name.startswith("diffattn Triton") and f"({label})" in name
                        and "split" not in name and "rule" not in name}
            errs = errors_vs_fp32(q, k, v, sp, outs)
            base = errs.get(f"diffattn Triton ({label})")
            for name, err in errs.items():
                ratio = f" ({err / base:.2f}x bf16's)" if base else ""
                print(f"  error vs fp32, {name}: {err:.3e}{ratio}", flush=True)
            del outs

    dense_names = [n for n, (_, dn) in kernels.items() if dn == 1.0 and "diffattn" not in n and n in times]
    best_fwd = min(times[n][0][0] for n in dense_names)
    best_bwd = min((times[n][0][1] for n in dense_names if times[n][0][1] is not None), default=None)
    rows = []
    for name, ((f, b), dens) in times.items():
        computed = flops_dense * dens
        row = Row(
            SHAPES[key].name, name, round(dens, 4), round(f, 3), round(computed / f / 1e9, 1),
            round(dens * best_fwd / f, 3) if dens < 1.0 or "diffattn" in name else None,
        )
        if b is not None:
            row.bwd_ms = round(b, 3)
            row.bwd_tflops = round(2.5 * computed / b / 1e9, 1)  # backward is 2.5x the forward's matmuls
            if best_bwd is not None and (dens < 1.0 or "diffattn" in name):
                row.bwd_eff = round(dens * best_bwd / b, 3)
        rows.append(row)
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'shape':38s} {'kernel':50s} {'dens':>6s} {'fwd ms':>9s} {'TF/s':>6s} {'eff':>6s} {'bwd ms':>9s} {'TF/s':>6s} {'eff':>6s}"
    print(head)
    print("-" * len(head))
    fmt = lambda x, spec: format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]) if "." in spec else 6)
    for r in rows:
        print(
            f"{r.shape:38s} {r.kernel:50s} {r.density:6.3f} {r.fwd_ms:9.2f} {r.fwd_tflops:6.0f} "
            f"{fmt(r.fwd_eff, '6.2f')} {fmt(r.bwd_ms, '9.2f')} {fmt(r.bwd_tflops, '6.0f')} {fmt(r.bwd_eff, '6.2f')}"
        )


def case_arguments(parser: argparse.ArgumentParser, shapes=None) -> None:
    """The shape, pattern, key-block and precision options (this benchmark's and kernel_configs.py's)."""
    parser.add_argument("--shapes", nargs="*", default=list(shapes or SHAPES), choices=list(SHAPES))
    parser.add_argument("--patterns", nargs="*", default=["radial"], choices=PATTERNS)
    parser.add_argument("--block-n", type=int, default=64, choices=(64, 128), help="key block of the row-major windows")
    parser.add_argument("--precision", nargs="*", default=[], choices=PRECISIONS, help="also the 8-bit forward")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--no-flex-sparse", action="store_true", help="skip Flex with the block mask (slow to compile)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--compare-tma", action="store_true", help="also time our kernel with pointer loads")
    case_arguments(parser)
    parser.add_argument("--compare-rule", action="store_true", help="also time element rules evaluated per score in the kernel")
    parser.add_argument("--compare-bound", action="store_true", help="also time partial blocks with and without the key bound")
    parser.add_argument("--compare-lazy", action="store_true", help="also time the lazy rescale of full blocks (experiment)")
    parser.add_argument("--compare-backward", action="store_true", help="also time the split deterministic backward")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for key in args.shapes:
        print(f"{SHAPES[key].name}: S={SHAPES[key].seq}", flush=True)
        rows += run_shape(key, not args.no_backward, flex_sparse=not args.no_flex_sparse, compare_tma=args.compare_tma,
                          patterns=args.patterns, compare_rule=args.compare_rule, compare_bound=args.compare_bound, compare_lazy=args.compare_lazy, block_n=args.block_n,
                          precisions=args.precision, compare_backward=args.compare_backward)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump([asdict(r) for r in rows], fh, indent=1)
    from diffattn.kernels import block_sparse

    print("\nautotuned configs (key -> config):")
    for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
        for key, config in getattr(block_sparse, name).cache.items():
            print(f"  {name} {key[:14]} -> {config}")
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
