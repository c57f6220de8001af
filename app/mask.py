"""``diffattn mask``: a method's block map and density at a model's real size, without weights.

    diffattn mask --model wan --height 720 --width 1280 --frames 81 --method radial --out mask.png
    diffattn mask --model flux --height 1024 --width 1024 --method clear --radius 16
    diffattn mask --model testbed --method neighborhood --kernel-size 3 5 5

The token grid follows from the model family's VAE compression and patch size (``MODELS``: the
diffusers defaults of each family), plus its text tokens where they share the attention (FLUX,
SD3, HunyuanVideo, Mochi, CogVideoX). The picture has one pixel per (query block, key block) of the
first head group: white = full block, grey = partial (the element rule decides per token), black =
skipped; maps wider than ``--max-pixels`` are max-pooled (a pixel is lit if any block under it is).
Blocks are in the kernel's token order (CLEAR's tile order when it reorders tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffattn.core.layout import TokenLayout
from diffattn.methods import METHODS


@dataclass(frozen=True)
class ModelGrid:
    family: str          # the diffattn family whose defaults apply
    spatial: int         # VAE x patch: pixels per token side
    temporal: int        # VAE time compression (frames = temporal * k + 1); 0 for image models
    patch_t: int = 1
    text: int = 0        # text tokens in the same attention
    text_position: str = "none"
    size: tuple[int, int, int] = (480, 832, 81)  # default height, width, frames


MODELS = {
    "wan": ModelGrid("wan2.1", 16, 4, size=(720, 1280, 81)),
    "wan2.2": ModelGrid("wan2.2", 16, 4, size=(720, 1280, 81)),
    "hunyuan": ModelGrid("hunyuan_video", 16, 4, text=256, text_position="after", size=(720, 1280, 129)),
    "mochi": ModelGrid("mochi", 16, 6, text=256, text_position="after", size=(480, 848, 163)),
    "cogvideox": ModelGrid("cogvideox", 16, 4, text=226, text_position="before", size=(480, 720, 49)),
    "ltx": ModelGrid("ltx", 32, 8, size=(512, 704, 121)),
    "ltx2": ModelGrid("ltx2", 32, 8, size=(512, 768, 121)),  # the video stream (audio attention stays stock)
    "flux": ModelGrid("flux", 16, 0, text=512, text_position="before", size=(1024, 1024, 1)),
    "sd3": ModelGrid("sd3", 16, 0, text=333, text_position="after", size=(1024, 1024, 1)),
    "testbed": ModelGrid("wan2.1", 8, 4, size=(128, 128, 29)),  # the testbed video pipeline (4x VAE, patch 2)
    "testbed-flux": ModelGrid("flux", 8, 0, text=32, text_position="before", size=(128, 128, 1)),  # testbed FLUX, 32 text tokens
}


def layout_of(model: str, height: int, width: int, frames: int) -> tuple[ModelGrid, TokenLayout]:
    """The token layout of ``model`` at a pixel size; raises naming the valid sizes."""
    if model not in MODELS:
        raise ValueError(f"unknown --model {model!r}; one of {sorted(MODELS)}")
    grid = MODELS[model]
    if height <= 0 or width <= 0 or height % grid.spatial or width % grid.spatial:
        raise ValueError(f"--height/--width must be positive multiples of {grid.spatial} for {model}, got {height}x{width}")
    if grid.temporal:
        if frames < 1 or (frames - 1) % grid.temporal:
            low = max(1, (frames - 1) // grid.temporal * grid.temporal + 1)
            raise ValueError(f"--frames must be {grid.temporal}k+1 for {model}, got {frames}; nearest: {low} or {low + grid.temporal}")
        latent = (frames - 1) // grid.temporal + 1
    elif frames != 1:
        raise ValueError(f"{model} is an image model: --frames must be 1, got {frames}")
    else:
        latent = 1
    return grid, TokenLayout(-(-latent // grid.patch_t), height // grid.spatial, width // grid.spatial, grid.text, grid.text_position)


def build_method(name: str, family: str, options: dict):
    if name not in METHODS:
        raise ValueError(f"unknown --method {name!r}; one of {sorted(METHODS)}")
    cls = METHODS[name]
    if family not in cls.FAMILIES:
        fitting = sorted(m for m, c in METHODS.items() if family in c.FAMILIES)
        raise ValueError(f"{name} does not fit the {family} family; methods for it: {fitting}")
    return cls.from_options(family, **options)


def picture(mask: torch.Tensor, partial: torch.Tensor, max_pixels: int = 2048) -> np.ndarray:
    """uint8 [nq', nk', 3]: white full, grey partial, black skipped blocks (max-pooled to ``max_pixels``)."""
    value = mask[0].float() * 0.55 + (mask[0] & ~partial[0]).float() * 0.45  # [nq, nk]: 0, 0.55 or 1
    nq, nk = value.shape
    factor = max(1, -(-max(nq, nk) // max_pixels))
    if factor > 1:
        value = torch.nn.functional.max_pool2d(value[None, None], factor, ceil_mode=True)[0, 0]
    return (value * 255).round().to(torch.uint8)[..., None].expand(-1, -1, 3).contiguous().numpy()


def describe(model: str, method: str, height: int, width: int, frames: int, options: dict) -> dict:
    """Layout, density and block map of ``method`` on ``model`` at this size (CPU, no weights)."""
    grid, layout = layout_of(model, height, width, frames)
    m = build_method(method, grid.family, options)
    m.check_layout(layout)
    sparsity = m.describe(layout, "cpu")
    return {"model": model, "family": grid.family, "method": method, "config": m.config, "layout": layout,
            "tokens": sparsity.q_len, "blocks": (sparsity.num_q_blocks, sparsity.num_kv_blocks),
            "block_size": (sparsity.block_m, sparsity.block_n), "density": sparsity.density,
            "full_share": sparsity.full_share, "mask": sparsity.mask, "partial": sparsity.partial}


def add_arguments(parser, method: str) -> list[str]:
    parser.add_argument("--model", default="wan", help=f"model family preset, one of {sorted(MODELS)} (default wan)")
    parser.add_argument("--method", default=method, help=f"one of {sorted(METHODS)}")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the preset's, e.g. 720 for wan)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the preset's, e.g. 1280 for wan)")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames (default: the preset's; 1 for image models)")
    parser.add_argument("--out", default="mask.png", help="the block-map picture (PNG)")
    parser.add_argument("--max-pixels", type=int, default=2048, help="larger maps are max-pooled to this many pixels a side")
    return []


def run(args, options: dict) -> dict:
    import imageio.v3 as iio

    grid = MODELS.get(args.model)
    if grid is None:
        raise ValueError(f"unknown --model {args.model!r}; one of {sorted(MODELS)}")
    height, width, frames = args.height or grid.size[0], args.width or grid.size[1], args.frames or grid.size[2]
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out must be a .png file, got {args.out!r}")
    info = describe(args.model, args.method, height, width, frames, options)
    iio.imwrite(args.out, picture(info["mask"], info["partial"], args.max_pixels))
    print(f"{args.method} on {args.model} ({info['family']}) at {height}x{width}x{frames}: {info['layout']}, "
          f"{info['tokens']} tokens, {info['blocks'][0]} x {info['blocks'][1]} blocks of {info['block_size'][0]} x {info['block_size'][1]}\n"
          f"density {info['density']:.4f} (full blocks {info['full_share']:.0%} of those kept), config {info['config']}\n"
          f"block map -> {args.out}", flush=True)
    return info


__all__ = ["MODELS", "ModelGrid", "add_arguments", "build_method", "describe", "layout_of", "picture", "run"]
