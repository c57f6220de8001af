"""One rank of the context-parallel tests (``tests/test_parallel.py`` starts ``world`` of these).

    python tests/cp_worker.py --rank R --world N --init FILE --out DIR CASE [CASE ...]

Every case builds a tiny model (seeded, fp32, CPU), runs it on this process alone with diffattn
applied (the reference: output, and gradients of the input and of every parameter), then under
diffusers' context parallelism over the gloo group with the same method, and writes
``DIR/CASE.rank{R}.json`` with the largest differences and the handle's parallel report. Case
names: ``family-method-mode`` with mode ``u{U}r{R}`` (Ulysses and ring degrees), or ``fail``: rank 1
raises in its second attention call and every rank must end with an error, not hang.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import diffattn

TIMEOUT_S = 60  # the gloo group's timeout: a dead peer ends every collective within it


def _cpu_mesh_shim() -> None:
    # diffusers 0.42's ModelMixin._resolve_parallel_config computes ``rank % torch.accelerator.device_count()``,
    # which is a division by zero on a machine without an accelerator; on the CPU test machine the
    # count is taken as 1 so that the real enable_parallelism runs over the gloo group (test-only).
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def _wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=8, out_channels=8,
        text_dim=32, freq_dim=64, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 8, 8, 16, 16, generator=g),  # 8 frames x 8 x 8 tokens = 512
        timestep=torch.tensor([700.0, 300.0]), encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
    )
    return model, inputs


def _hunyuan(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    )
    g = torch.Generator().manual_seed(1)
    text = 8
    mask = torch.ones(2, text, dtype=torch.bool)
    mask[1, 5:] = False  # the second sample's last 3 text tokens are padding
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, 8, generator=g),  # 8 frames x 8 x 8 = 512 video tokens
        timestep=torch.tensor([700.0, 300.0]), encoder_hidden_states=torch.randn(2, text, 16, generator=g),
        encoder_attention_mask=mask, pooled_projections=torch.randn(2, 8, generator=g),
        guidance=torch.full((2,), 6000.0),
    )
    return model, inputs


def _flux_model(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )
    g = torch.Generator().manual_seed(1)
    rows = cols = 16
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    inputs = dict(
        hidden_states=torch.randn(2, rows * cols, 8, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
        pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([0.7, 0.3]),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3),
    )
    return model, inputs


def _ltx(seed: int = 0):
    from diffattn_testbed.tiny import ltx_inputs, tiny_ltx_transformer

    inputs = ltx_inputs(frames=8, size=8, text=8)  # 512 packed tokens
    # no prompt mask: diffusers 0.42's own cross-attention under Ulysses fails on it (its [B, heads, 1, T]
    # mask meets heads / U local heads), which diffattn (self-attention only) does not touch
    inputs["encoder_attention_mask"] = None
    return tiny_ltx_transformer(seed), inputs


_FAMILIES = {"wan": _wan, "hunyuan": _hunyuan, "flux": _flux_model, "ltx": _ltx}
_METHODS = {
    # layer 0 dense (the stock / dense context-parallel path), layer 1 sparse
    "radial": dict(dense_steps=0, dense_layers=1, block_size=16, decay=0.5),
    "neighborhood": dict(dense_steps=0, dense_layers=1, kernel_size=(3, 3, 3), backend="sdpa"),
    "clear": dict(dense_steps=0, dense_layers=1, radius=4, backend="sdpa"),
    "neighborhood2d": dict(dense_steps=0, dense_layers=1, kernel_size=(1, 5, 5), backend="sdpa"),
}


FORWARD_ONLY = ("ltx",)  # diffusers 0.42's Ulysses backward of LTX's stock cross-attention (q and k of
# different lengths) raises in its reshape; diffattn's self-attention is not involved


def _run(model, inputs, grads: bool = True):
    """Output and gradients (input, parameters) of one forward, loss = <output, fixed weights>."""
    if not grads:
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0], torch.zeros(1), {}
    model.zero_grad(set_to_none=True)
    x = inputs["hidden_states"].clone().requires_grad_()
    out = model(**{**inputs, "hidden_states": x}, return_dict=False)[0]  # as pipelines call it (CP hooks need a tuple)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach().clone(), grads


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_case(name: str, rank: int, world: int, out_dir: Path) -> None:
    from diffusers import ContextParallelConfig

    family, method, mode = name.split("-")
    u, r = (int(x) for x in mode[1:].split("r"))
    model, inputs = _FAMILIES[family]()
    options = _METHODS[method]
    method = method.removesuffix("2d")  # neighborhood2d: neighborhood with a one-frame window (images)
    with diffattn.apply(model, method, **options) as ref:
        sites = [row["site"] for row in ref.report()]
        with ref.capture(sites) as ref_attn:  # every call's core attention output [B, S, heads, D]
            ref_out, ref_x, ref_params = _run(model, inputs, family not in FORWARD_ONLY)
        layouts = {row["site"]: row["layout"] for row in ref.report()}
    config = ContextParallelConfig(ulysses_degree=u, ring_degree=r)
    if family in ("wan", "ltx"):  # diffusers' plan: enable_parallelism first, then diffattn (the documented order)
        model.enable_parallelism(config=config)
        handle = diffattn.apply(model, method, **options)
    else:  # diffattn's plan (HunyuanVideo) or either order (FLUX): diffattn first
        handle = diffattn.apply(model, method, **options)
        diffattn.enable_parallelism(model, config)
    with handle.capture(sites) as attn:  # this rank's slice of each
        out, gx, params = _run(model, inputs, family not in FORWARD_ONLY)
    from diffattn.pipelines import parallel

    attn_diff = max(
        _diff(attn[site].detach(), ref_attn[site].detach().index_select(1, parallel.positions(layouts[site], u * r, rank, "cpu")))
        for site in sites
    )
    for grad in [gx, *params.values()]:
        dist.all_reduce(grad)  # each rank holds the gradient of its part of the sequence
    report = [row for row in handle.report() if row["calls"]]
    after_remove = 0.0
    if family == "hunyuan":  # diffattn's plan goes with the handle: every rank runs the whole model again
        handle.remove()
        assert model._parallel_config is None
        with diffattn.apply(model, method, **options):
            again, _, _ = _run(model, inputs)
        after_remove = _diff(again, ref_out)
    scale = max([float(g.abs().max()) for g in ref_params.values()] or [1.0])
    result = {
        "case": name, "rank": rank, "world": world,
        "out": _diff(out, ref_out), "attention": attn_diff, "after_remove": after_remove, "grad_input": _diff(gx, ref_x),
        # against the largest parameter gradient: a key bias's true gradient is 0 (softmax is shift-invariant)
        "grad_params": max([float((params[k] - ref_params[k]).abs().max()) for k in ref_params] or [0.0]) / scale,
        "missing_grads": sorted(set(ref_params) - set(params)),
        "method_calls": sum(row["method_calls"] for row in report),
        "dense_calls": sum(row["dense_calls"] for row in report),
        "parallel": [row["parallel"] for row in report],
    }
    (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(result))


def run_fail(rank: int, world: int) -> None:
    from diffusers import ContextParallelConfig

    model, inputs = _wan()
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    handle = diffattn.apply(model, "radial", **_METHODS["radial"])
    calls = {"n": 0}

    def boom(module, args, kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            raise RuntimeError("injected failure on rank 1")

    for block in model.blocks:
        block.attn1.register_forward_pre_hook(boom, with_kwargs=True)
    with torch.no_grad():
        model(**inputs, return_dict=False)
    handle.remove()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args(argv)
    _cpu_mesh_shim()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        for case in args.cases:
            if case == "fail":
                run_fail(args.rank, args.world)
            else:
                run_case(case, args.rank, args.world, args.out)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
