"""CLEAR's circle rule (research/clear.md §1.2): an image token sees the image tokens of its own
frame with (y_q - y_k)^2 + (x_q - x_k)^2 < r^2 (strict, Euclidean, clipped, no wrap). Text tokens
are global both ways.

With CLEAR's down-sampled global branch (§1.3) the kernel sequence ends with ``pooled`` tokens at
``[pool_start, pool_start + pooled)``: pooled keys are seen by every image query and by no text
query; pooled query rows are placeholders (they see only the pooled keys and are dropped by the
caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import GridRule, TiledCoords


@dataclass(frozen=True)
class CircleRule(GridRule):
    radius_sq: int = 1   # r^2 in tokens
    pool_start: int = -1  # first pooled token, -1: no pooled tokens

    kind = "circle"
    kernel_id = 2

    def pack(self) -> tuple[int, ...]:
        # order read by kernels/triton/rules.py `_circle` and `_pooled`: grid, then r^2, pool start
        return (*self.pack_grid(), self.radius_sq, self.pool_start)

    def _local(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        def video(cq, ck):
            dy, dx = cq[1] - ck[1], cq[2] - ck[2]
            return (cq[0] == ck[0]) & (dy * dy + dx * dx < self.radius_sq)

        return self.with_text(q_idx, kv_idx, video)

    def mask(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        ok = self._local(q_idx, kv_idx)
        if self.pool_start < 0:
            return ok
        pooled_q, pooled_k = q_idx >= self.pool_start, kv_idx >= self.pool_start
        video_q = (q_idx >= self.video_start) & (q_idx < self.video_start + self.video_tokens)
        return torch.where(pooled_k, video_q | pooled_q, ok & ~pooled_q)


@dataclass(frozen=True)
class TiledCircleRule(TiledCoords, CircleRule):
    """The circle rule on tokens reordered into 2-D tiles (``patterns.tiles.Tiling``, tf = 1).

    The video region holds the grid padded up to whole tiles, tile after tile; ``video_tokens`` is
    the padded count. Padding keys are never attended (padding queries are dropped by the caller).
    """

    tile: tuple[int, int, int] = (1, 1, 1)
    tiles: tuple[int, int, int] = (1, 1, 1)  # tiles per dimension (F, Y, X)

    kind = "circle_tiled"
    kernel_id = 4

    def pack(self) -> tuple[int, ...]:
        # order read by kernels/triton/rules.py `_tiled_coords`: the circle rule's 7 values, then
        # [7:10] the tile (tf, ty, tx) and [10:12] tiles along Y and X
        return (*super().pack(), *self.tile, self.tiles[1], self.tiles[2])

    def _local(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return super()._local(q_idx, kv_idx) & ~self.key_padding(kv_idx)
