"""One FluxTransformer2DModel forward at the FLUX.1-dev config (random bf16 weights, 512 text
tokens): dense cuDNN SDPA vs diffattn methods on the Triton and Flex backends, in one run.

    python benchmarks/flux_e2e.py                                  # 1024^2, 2048^2, 4096^2
    python benchmarks/flux_e2e.py --sizes 4096 --methods "clear:radius=8" "neighborhood:reorder=True"

A method is ``name`` or ``name:option=value;option=value`` (Python literals); every method call is
sparse (dense_steps=0). A backend that cannot run a method (Flex's compiler on some rules) is
reported with its error, not hidden. Prints ms per forward, the speed-up over dense and the density
of the method calls. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

import diffattn
from e2e import parse_method, time_forward

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def build():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = FluxTransformer2DModel(**FLUX_DEV)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def inputs(size: int, text: int = 512):
    side = size // 16  # 8x VAE, 2x2 packing
    g = torch.Generator("cuda").manual_seed(0)
    ids = torch.zeros(side, side, 3, device="cuda")
    ids[..., 1] = torch.arange(side, device="cuda")[:, None]
    ids[..., 2] = torch.arange(side, device="cuda")[None, :]
    return dict(
        hidden_states=torch.randn(1, side * side, 64, device="cuda", dtype=torch.bfloat16, generator=g),
        encoder_hidden_states=torch.randn(1, text, 4096, device="cuda", dtype=torch.bfloat16, generator=g),
        pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=g),
        timestep=torch.tensor([0.5], device="cuda"), guidance=torch.tensor([3.5], device="cuda"),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3, device="cuda"), return_dict=False,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="*", default=["triton", "flex"])
    parser.add_argument("--methods", nargs="*", default=["clear", "clear:reorder=False", "neighborhood:reorder=True"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/flux_e2e.py needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    model = build()
    rows = []
    for size in args.sizes:
        x = inputs(size)
        dense_ms = time_forward(model, x, args.repeats)
        print(f"FLUX.1-dev {size}^2: dense SDPA {dense_ms:.0f} ms", flush=True)
        rows.append((size, "dense SDPA", dense_ms, 1.0, 1.0))
        for text in args.methods:
            method, options = parse_method(text)
            for backend in args.backends:
                label = f"{text} ({backend})"
                try:
                    with diffattn.apply(model, method, dense_steps=0, backend=backend, **options) as handle:
                        ms = time_forward(model, x, args.repeats)
                        summary = handle.summary()
                except Exception as exc:  # noqa: BLE001 - a backend failure is a result to report
                    print(f"FLUX.1-dev {size}^2: {label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                    rows.append((size, label + " FAILED", float("nan"), float("nan"), float("nan")))
                    torch.cuda.empty_cache()
                    continue
                assert set(summary["backends"]) == {backend}, summary
                print(f"FLUX.1-dev {size}^2: {label} {ms:.0f} ms, x{dense_ms / ms:.2f}, density {summary['density']:.3f}", flush=True)
                rows.append((size, label, ms, dense_ms / ms, summary["density"]))
        torch.cuda.empty_cache()
    print(f"\n{'size':6s} {'attention':44s} {'ms/forward':>11s} {'speed-up':>9s} {'density':>8s}")
    for size, what, ms, speed, dens in rows:
        print(f"{size:<6d} {what:44s} {ms:11.0f} {speed:9.2f} {dens:8.3f}")


if __name__ == "__main__":
    main()
