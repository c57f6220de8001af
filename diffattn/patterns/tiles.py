"""Tile order (NATTEN / GNA "token permutation"), shared by the window patterns.

Row-major tokens put a window's keys into many short runs, so almost every listed block is
partial and pays the element rule. Reordered into tiles whose volume is the block size, a block
*is* a box of the grid: windows then cover whole boxes and most listed blocks are full. The grid
is padded up to whole tiles; padding keys are masked by the rule, padding queries are dropped when
the order is undone. Text tokens go after the tiles (whether the model puts them before or after
the video).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffattn.core.layout import TokenLayout
from diffattn.rules.grid import tiled_coords

TILE_CANDIDATES = {  # tile volume -> shapes (tf, ty, tx) tried, the first wins ties
    128: ((2, 8, 8), (1, 8, 16), (4, 4, 8), (1, 16, 8), (2, 4, 16), (4, 8, 4), (8, 4, 4), (1, 4, 32), (2, 16, 4)),
    64: ((1, 8, 8), (2, 4, 8), (4, 4, 4), (1, 4, 16), (2, 8, 4)),
    32: ((1, 4, 8), (2, 4, 4), (1, 8, 4), (2, 2, 8)),  # small grids and tests
}
# 2-D tiles (one frame each) for rules that never cross frames (CLEAR's circle)
PLANE_CANDIDATES = {
    128: ((1, 8, 16), (1, 16, 8), (1, 4, 32), (1, 32, 4)),
    64: ((1, 8, 8), (1, 4, 16), (1, 16, 4)),
    32: ((1, 4, 8), (1, 8, 4)),
}


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``tile = (tf, ty, tx)`` tokens over a grid ``(F, Y, X)``."""

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]

    @property
    def tiles(self) -> tuple[int, int, int]:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

    @property
    def volume(self) -> int:
        return math.prod(self.tile)

    @property
    def padded_tokens(self) -> int:
        return math.prod(self.tiles) * self.volume

    def boxes(self, device=None):
        """Per tile: (lo, hi) coordinates per dimension (hi inclusive, clipped to the grid) and
        whether the tile holds padding. Tensors of [n_tiles]."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        n_tiles = math.prod(self.tiles)
        t = torch.arange(n_tiles, device=dev)
        idx = (t // (self.tiles[1] * self.tiles[2]), (t // self.tiles[2]) % self.tiles[1], t % self.tiles[2])
        lo = [i * s for i, s in zip(idx, self.tile)]
        hi = [torch.clamp(l + s - 1, max=g - 1) for l, s, g in zip(lo, self.tile, self.grid)]
        clipped = torch.zeros(n_tiles, dtype=torch.bool, device=dev)
        for l, s, g in zip(lo, self.tile, self.grid):
            clipped |= l + s > g
        return lo, hi, clipped

    def __repr__(self) -> str:
        return f"Tiling(grid={self.grid}, tile={self.tile}, padding={self.padded_tokens / math.prod(self.grid) - 1:.1%})"


def choose_tiling(layout: TokenLayout, volume: int = 128, tile=None, candidates=None) -> Tiling:
    """The tiling of ``layout``'s grid with the least padding (``tile`` forces one shape).

    ``candidates``: the table of shapes per volume (default ``TILE_CANDIDATES``)."""
    grid = (layout.frames, layout.rows, layout.cols)
    if tile is not None:
        return Tiling(grid, tuple(tile))
    table = TILE_CANDIDATES if candidates is None else candidates
    if volume not in table:
        raise ValueError(f"tile volume must be one of {sorted(table)}, got {volume}")
    options = [Tiling(grid, t) for t in table[volume]]
    return min(options, key=lambda o: o.padded_tokens)  # min keeps the first of equal ones


def tiled_layout(layout: TokenLayout, tiling: Tiling) -> TokenLayout:
    """The layout the kernels see: the padded tiled video first, then the text."""
    return TokenLayout(1, 1, tiling.padded_tokens, layout.text_tokens, "after" if layout.text_tokens else "none")


def tile_order(layout: TokenLayout, tiling: Tiling, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gather [S'], valid [S'], scatter [S]) as int64 / bool on ``device``.

    ``x_tiled = x.index_select(-2, gather)`` puts a sequence into tile order (padding positions
    read token 0, masked as keys, dropped as queries); ``x = x_tiled.index_select(-2, scatter)``
    undoes it. ``valid`` marks the positions that hold a real token.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    f, y, x = tiled_coords(torch.arange(tiling.padded_tokens, device=dev), tiling.tile, tiling.tiles)
    valid = (f < layout.frames) & (y < layout.rows) & (x < layout.cols)
    original = layout.video_start + (f * layout.rows + y) * layout.cols + x
    text = torch.arange(layout.text_tokens, device=dev)
    text_start = layout.video_tokens if layout.text_position == "after" else 0
    gather = torch.cat([torch.where(valid, original, torch.zeros_like(original)), text + text_start])
    valid = torch.cat([valid, torch.ones(layout.text_tokens, dtype=torch.bool, device=dev)])
    scatter = torch.empty(layout.seq_len, dtype=torch.int64, device=dev)
    scatter[gather[valid]] = torch.arange(gather.numel(), device=dev)[valid]
    return gather, valid, scatter
