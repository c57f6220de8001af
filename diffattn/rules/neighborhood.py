"""The neighborhood rule: NATTEN semantics per dimension of (F, Y, X), with stride (GNA), dilation
and causal dimensions (research/neighborhood.md §2).

Per dimension of length L, with kernel k, stride s, dilation d:
- query and key share the dilation group (coordinate mod d); NA runs on the within-group index
  w = coordinate // d over the group's length Lg = ceil((L - group) / d);
- non-causal: the stride group's leader is min((w // s) * s + s // 2, Lg - 1) and the window is
  [start, start + k) with start = clamp(leader - k // 2, 0, Lg - k): every query sees k keys;
- causal: leader = min((w // s) * s + s - 1, Lg - 1), keys in [max(leader - k + 1, 0), w].
A pair attends when every dimension allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import GridRule, TiledCoords


def window(coord: torch.Tensor, length: int, k: int, s: int, d: int, causal: bool):
    """(group, lo, hi) of the window of queries at ``coord``: keys of the same dilation group with
    within-group index in [lo, hi]. Tensor ops only (it also runs as a Flex mask_mod)."""
    group = coord % d
    w = coord // d
    group_len = (length - group + d - 1) // d
    if causal:
        leader = torch.minimum((w // s) * s + s - 1, group_len - 1)
        lo = (leader - k + 1).clamp(min=0)
        hi = w
    else:
        leader = torch.minimum((w // s) * s + s // 2, group_len - 1)
        lo = torch.minimum((leader - k // 2).clamp(min=0), group_len - k)
        hi = lo + k - 1
    return group, lo, hi


def allowed(cq, ck, length, k, s, d, causal) -> torch.Tensor:
    """One dimension's verdict for query coordinates ``cq`` and key coordinates ``ck``."""
    group, lo, hi = window(cq, length, k, s, d, causal)
    wk = ck // d
    return (ck % d == group) & (wk >= lo) & (wk <= hi)


@dataclass(frozen=True)
class NeighborhoodRule(GridRule):
    kernel: tuple[int, int, int] = (1, 1, 1)      # (kF, kY, kX)
    stride: tuple[int, int, int] = (1, 1, 1)
    dilation: tuple[int, int, int] = (1, 1, 1)
    causal: tuple[bool, bool, bool] = (False, False, False)

    kind = "neighborhood"
    kernel_id = 1

    def pack(self) -> tuple[int, ...]:
        # order read by kernels/triton/rules.py `_neighborhood`: grid, then kernel, stride,
        # dilation and causal, each as (F, Y, X)
        return (*self.pack_grid(), *self.kernel, *self.stride, *self.dilation, *(int(c) for c in self.causal))

    def mask(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        lengths = (self.frames, self.rows, self.cols)

        def video(cq, ck):
            ok = None
            for dim in range(3):
                one = allowed(cq[dim], ck[dim], lengths[dim], self.kernel[dim], self.stride[dim],
                              self.dilation[dim], self.causal[dim])
                ok = one if ok is None else ok & one
            return ok

        return self.with_text(q_idx, kv_idx, video)


@dataclass(frozen=True)
class TiledNeighborhoodRule(TiledCoords, NeighborhoodRule):
    """The neighborhood rule on tokens reordered into 3-D tiles (``patterns.neighborhood.Tiling``).

    The video region ``[video_start, video_start + video_tokens)`` holds the grid padded up to whole
    tiles of ``tile = (tf, ty, tx)`` tokens, tile after tile (tiles frame-major, then row, then
    column; tokens inside a tile likewise). ``video_tokens`` is the padded count. Padding tokens
    are never attended as keys (queries there are discarded by the caller).
    """

    tile: tuple[int, int, int] = (1, 1, 1)
    tiles: tuple[int, int, int] = (1, 1, 1)  # tiles per dimension (F, Y, X)

    kind = "neighborhood_tiled"
    kernel_id = 3

    def pack(self) -> tuple[int, ...]:
        # order read by kernels/triton/rules.py `_tiled_coords`: the neighborhood rule's 17 values,
        # then [17:20] the tile (tf, ty, tx) and [20:22] tiles along Y and X
        return (*super().pack(), *self.tile, self.tiles[1], self.tiles[2])

    def mask(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return super().mask(q_idx, kv_idx) & ~self.key_padding(kv_idx)
