"""CLEAR: convolution-like local attention for image DiTs (Liu et al., "CLEAR: Conv-Like
Linearization Revs Pre-Trained Diffusion Transformers Up", arXiv 2412.16112; Huage001/CLEAR).

Every image query attends to the image keys of a disc of ``radius`` tokens around it (strict
Euclidean distance on the token grid, clipped at the borders), text tokens are global both ways
(research/clear.md §1.2). ``down_factor = d > 1`` adds CLEAR's down-sampled global branch (§1.3):
the image keys / values averaged over d x d cells, seen by every image query. The pattern is exact
at the token level at any resolution and text length.

Zero-shot CLEAR loses quality (the paper distils its student); ``diffattn.lora.clear_distill``
trains the distilled student, and ``apply(pipe, "clear", lora=PATH)`` loads it.

Defaults: ``radius=16`` (the paper's middle setting, 256 px on FLUX), no pooled branch, every step
and layer sparse (the distilled students run CLEAR everywhere). Tile order (``reorder``, on by
default) groups tokens into 2-D tiles of 8 x 16 so a disc covers whole blocks: with r = 16 and 512
text tokens the computed share drops from 0.56 to 0.47 at 1024^2, 0.27 to 0.15 at 2048^2 and 0.10
to 0.04 at 4096^2 (``python -m diffattn.patterns.clear``; RESULTS.md has the timings).

Deviations from the reference: CLEAR's learnable ``spatial_weight`` of the pooled branch stays at
its initialisation (plain averaging over valid tokens); proportional attention and NTK RoPE (its
inference-only high-resolution aids, §1.4) are not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffattn.core.checks import check_int
from diffattn.core.layout import TokenLayout
from diffattn.core.schedule import ScheduleOptions
from diffattn.methods.base import BlockSparseMethod
from diffattn.patterns import clear as pattern
from diffattn.patterns.blocks import BlockSparsity

IMAGE_FAMILIES = ("flux", "flux2", "sd3")


@dataclass(frozen=True)
class ClearConfig(ScheduleOptions):
    """What CLEAR computes (plus the shared schedule).

    radius:      disc radius in tokens (one token is 16 x 16 px on FLUX and SD3); 8, 16, 32 are the
                 released settings. Larger is closer to dense.
    down_factor: 1 (pure local) or d > 1: also attend to the image keys averaged over d x d cells
                 (CLEAR's r=16/d=4 and r=8/d=4 checkpoints); quadratic with a 1/d^2 constant.
    """

    radius: int = field(default=16, metadata={"help": "disc radius in tokens (8, 16, 32 released)"})
    down_factor: int = field(default=1, metadata={"help": "1, or d > 1 for the pooled global branch over d x d cells"})

    def __post_init__(self):
        super().__post_init__()
        pattern.check_radius(self.radius)
        check_int("clear down_factor", self.down_factor, 1)


class Clear(BlockSparseMethod):
    """``method(q, k, v, ctx) -> out`` with q, k, v ``[B, H, S, D]``."""

    name = "clear"
    Config = ClearConfig
    FAMILIES = IMAGE_FAMILIES
    FAMILY_DEFAULTS = {family: dict(dense_steps=0, dense_layers=0) for family in IMAGE_FAMILIES}
    KNOBS = ("backend", "precision", "block_m", "block_n", "reorder", "tile")

    def __init__(self, config: ClearConfig, *, backend: str = "auto", precision: str | None = None, block_m: int = 128, block_n: int = 64,
                 reorder: bool = True, tile: tuple[int, int, int] | None = None):
        """Performance knobs (the pattern is exact with any of them):

        reorder: run the kernel in 2-D tile order (one block per tile of 128 tokens); the order is
                 undone on the output.
        tile:    the tile (1, ty, tx) with reorder (default: 8 x 16 or the shape with least padding).
        block_m / block_n: block edges without reorder.
        """
        super().__init__(config, backend=backend, precision=precision)
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if value not in (16, 32, 64, 128):
                raise ValueError(f"clear {name} must be one of 16, 32, 64, 128, got {name}={value!r}")
        if not isinstance(reorder, bool):
            raise ValueError(f"clear reorder must be True or False, got reorder={reorder!r}")
        if tile is not None:
            tile = tuple(tile)
            ok = len(tile) == 3 and all(isinstance(v, int) and v >= 1 for v in tile) and tile[0] * tile[1] * tile[2] in (16, 32, 64, 128)
            if not ok or tile[0] != 1:
                raise ValueError(f"clear tile must be (1, ty, tx) with ty * tx in 16, 32, 64, 128, got tile={tile!r}")
        self.block_m, self.block_n = block_m, block_n
        self.reorder, self.tile = reorder, tile

    def knob_key(self) -> tuple:
        return (self.block_m, self.block_n, self.reorder, self.tile)

    def tiling(self, layout: TokenLayout):
        return pattern.plane_tiling(layout, 128, self.tile) if self.reorder else None

    def check_layout(self, layout: TokenLayout) -> None:
        limit = pattern.full_radius(layout)
        if self.config.radius > limit:
            raise ValueError(
                f"clear: radius={self.config.radius} is larger than the grid (Y, X) = {(layout.rows, layout.cols)} "
                f"of this call (radius {limit} already covers every pair); pass a radius <= {limit}, or remove "
                "diffattn for dense attention"
            )
        d = self.config.down_factor
        if d > 1 and d > max(layout.rows, layout.cols):
            raise ValueError(f"clear: down_factor={d} is larger than the grid {(layout.rows, layout.cols)}; pass a smaller one")

    def describe(self, layout: TokenLayout, device) -> BlockSparsity:
        c = self.config
        return pattern.block_sparsity(layout, c.radius, c.down_factor, tiling=self.tiling(layout),
                                      block_m=self.block_m, block_n=self.block_n, device=device)

    def token_order(self, layout: TokenLayout, device):
        tiling = self.tiling(layout)
        if tiling is None:
            return None
        gather, _, scatter = pattern.tile_order(layout, tiling, device)
        return gather, scatter, tiling.padded_tokens - layout.video_tokens

    def text_key_start(self, layout: TokenLayout) -> int | None:
        tiling = self.tiling(layout)
        if tiling is None or not layout.text_tokens:
            return super().text_key_start(layout)
        return tiling.padded_tokens  # text follows the tiles

    def extra_tokens(self, q, k, v, layout: TokenLayout):
        d = self.config.down_factor
        if d == 1:
            return None
        pooled_k, pooled_v = pattern.pool(k, layout, d), pattern.pool(v, layout, d)  # [B, H, P, D]
        return pooled_k, pooled_k, pooled_v  # the pooled query rows are placeholders (dropped)

    def reference_keys(self, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout):
        d = self.config.down_factor
        if d == 1:
            return k, v
        return torch.cat([k, pattern.pool(k, layout, d)], dim=-2), torch.cat([v, pattern.pool(v, layout, d)], dim=-2)

    def reference_mask(self, layout: TokenLayout) -> torch.Tensor:
        """Token-level ``[S, S + P]`` twin for tests (model order, pooled keys last)."""
        return pattern.token_mask(layout, self.config.radius, self.config.down_factor)
