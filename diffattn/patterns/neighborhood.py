"""Neighborhood attention on the (F, Y, X) token grid: NATTEN semantics with stride (GNA),
dilation and causal dimensions (research/neighborhood.md §2; the per-element rule and its formulas
are ``diffattn.rules.neighborhood``). Text tokens (before or after the video) are global:
text queries see every key and every query sees the text keys.

``block_sparsity`` describes the pattern for the kernels without building a token mask: tiles are
split into row segments (``patterns.segments``), each pair of segments is tested exactly per
dimension (windows are monotone in the query coordinate), and the kernel evaluates the same rule
per element inside partial blocks. A dilated X dimension is tested conservatively (such tiles are
listed as partial, never full).

Run ``python -m diffattn.patterns.neighborhood --frames 8 --rows 16 --cols 16 --kernel 3 7 7``
to print the density.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from diffattn.core.layout import TokenLayout
from diffattn.patterns.blocks import BlockSparsity, from_block_mask
from diffattn.rules.neighborhood import NeighborhoodRule, TiledNeighborhoodRule, allowed as _allowed, window
from diffattn.patterns.segments import segments, tile_classes
from diffattn.patterns.tiles import Tiling, choose_tiling, tile_order, tiled_layout  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Neighborhood:
    """Per-dimension parameters over (F, Y, X)."""

    kernel: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    dilation: tuple[int, int, int] = (1, 1, 1)
    causal: tuple[bool, bool, bool] = (False, False, False)

    def __repr__(self) -> str:
        return f"Neighborhood(k={self.kernel}, s={self.stride}, d={self.dilation}, causal={self.causal})"


def _triple(name, value, fill_for_unit, lengths):
    values = (value,) * 3 if isinstance(value, (int, bool)) else tuple(value)
    if len(values) != 3:
        raise ValueError(f"neighborhood: {name} must be one value or three (F, Y, X), got {value!r}")
    # a dimension of length 1 has nothing to window: broadcast values do not apply to it
    if isinstance(value, (int, bool)):
        values = tuple(fill_for_unit if length == 1 else v for v, length in zip(values, lengths))
    return values


def spec(layout: TokenLayout, kernel_size, stride=1, dilation=1, causal=False) -> Neighborhood:
    """Validated parameters; ints broadcast to every dimension longer than 1."""
    lengths = (layout.frames, layout.rows, layout.cols)
    k = _triple("kernel_size", kernel_size, 1, lengths)
    s = _triple("stride", stride, 1, lengths)
    d = _triple("dilation", dilation, 1, lengths)
    c = _triple("causal", causal, False, lengths)
    for dim, length, kk, ss, dd in zip("FYX", lengths, k, s, d):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (kk, ss, dd)):
            raise ValueError(f"neighborhood: kernel, stride and dilation must be ints >= 1, got {dim}: k={kk}, s={ss}, d={dd}")
        if kk * dd > length:
            raise ValueError(f"neighborhood: kernel * dilation must be <= the grid length, got {dim}: {kk} * {dd} > {length}")
        if ss > kk:
            raise ValueError(f"neighborhood: stride must be <= kernel, got {dim}: stride {ss} > kernel {kk}")
    return Neighborhood(k, s, d, tuple(bool(v) for v in c))


def _rule(layout: TokenLayout, nb: Neighborhood) -> NeighborhoodRule:
    return NeighborhoodRule(
        layout.video_start, layout.video_tokens, layout.frames, layout.rows, layout.cols,
        kernel=nb.kernel, stride=nb.stride, dilation=nb.dilation, causal=nb.causal,
    )


def token_mask(layout: TokenLayout, nb: Neighborhood) -> torch.Tensor:
    """Reference ``[S, S]`` bool (small sizes only): the rule's torch twin on every pair."""
    idx = torch.arange(layout.seq_len)
    return _rule(layout, nb).mask(idx[:, None], idx[None, :])


def _range_window(a, b, length, k, s, d, causal):
    """Union and intersection, in coordinates, of the windows of queries a..b (inclusive)."""
    if d == 1:
        _, lo_a, hi_a = window(a, length, k, s, 1, causal)
        _, lo_b, hi_b = window(b, length, k, s, 1, causal)
        return lo_a, hi_b, lo_b, hi_a
    # dilated: the extreme windows lie within the first / last d queries of the range
    union_lo = torch.full_like(a, length)
    union_hi = torch.full_like(a, -1)
    for j in range(d):
        first = torch.minimum(a + j, b)
        g, lo, _ = window(first, length, k, s, d, causal)
        union_lo = torch.minimum(union_lo, lo * d + g)
        last = torch.maximum(b - j, a)
        g, _, hi = window(last, length, k, s, d, causal)
        union_hi = torch.maximum(union_hi, hi * d + g)
    return union_lo, union_hi, union_hi + 1, union_lo - 1  # empty intersection: never "all"


def block_sparsity(
    layout: TokenLayout, nb: Neighborhood, *, block_m: int = 128, block_n: int = 64, device=None
) -> BlockSparsity:
    """Kernel description of the pattern, with the element rule for partial blocks."""
    q = segments(layout, block_m, device)
    kk = segments(layout, block_n, device)
    any_pass = torch.ones(q.tile.numel(), kk.tile.numel(), dtype=torch.bool, device=q.tile.device)
    all_pass = any_pass.clone()
    lengths = (layout.frames, layout.rows, layout.cols)
    for dim, (k, s, d, c) in enumerate(zip(nb.kernel, nb.stride, nb.dilation, nb.causal)):
        length = lengths[dim]
        if dim < 2:  # F and Y: one coordinate per segment, exact
            cq = (q.frame, q.row)[dim][:, None]
            ck = (kk.frame, kk.row)[dim][None, :]
            ok = _allowed(cq, ck, length, k, s, d, c)
            any_pass &= ok
            all_pass &= ok
        else:  # X: column ranges
            u_lo, u_hi, i_lo, i_hi = _range_window(q.x0, q.x1, length, k, s, d, c)
            any_pass &= (u_lo[:, None] <= kk.x1[None, :]) & (kk.x0[None, :] <= u_hi[:, None])
            all_pass &= (i_lo[:, None] <= kk.x0[None, :]) & (kk.x1[None, :] <= i_hi[:, None])
    text = q.is_text[:, None] | kk.is_text[None, :]
    any_pass |= text
    all_pass |= text
    listed, full = tile_classes(q, kk, any_pass, all_pass)
    return from_block_mask(
        listed, layout.seq_len, block_m=block_m, block_n=block_n, partial=listed & ~full, rule=_rule(layout, nb),
    )


# -- tile order (patterns.tiles): blocks are boxes of the grid, so windows cover whole boxes and
# most listed blocks are full.

def _tiled_rule(layout: TokenLayout, nb: Neighborhood, tiling: Tiling) -> TiledNeighborhoodRule:
    return TiledNeighborhoodRule(
        0, tiling.padded_tokens, layout.frames, layout.rows, layout.cols,
        kernel=nb.kernel, stride=nb.stride, dilation=nb.dilation, causal=nb.causal,
        tile=tiling.tile, tiles=tiling.tiles,
    )


def tiled_token_mask(layout: TokenLayout, nb: Neighborhood, tiling: Tiling) -> torch.Tensor:
    """Reference ``[S', S']`` bool in tile order (small sizes only)."""
    idx = torch.arange(tiling.padded_tokens + layout.text_tokens)
    return _tiled_rule(layout, nb, tiling).mask(idx[:, None], idx[None, :])


def tiled_block_sparsity(layout: TokenLayout, nb: Neighborhood, tiling: Tiling, *, device=None) -> BlockSparsity:
    """Kernel description in tile order, one block per tile (block = tile volume).

    Each video block is a box; per dimension the windows of the box's queries are monotone, so
    whether some / every query of one box sees some / every key of another is exact from the box
    ends (``_range_window``). A key box that holds padding is never full.
    """
    block = tiling.volume
    lo, hi, clipped = tiling.boxes(device)
    n_tiles, dev = clipped.numel(), clipped.device
    any_pass = torch.ones(n_tiles, n_tiles, dtype=torch.bool, device=dev)
    all_pass = ~clipped[None, :].expand(n_tiles, n_tiles).clone()
    for dim in range(3):
        k, s, d, c = nb.kernel[dim], nb.stride[dim], nb.dilation[dim], nb.causal[dim]
        u_lo, u_hi, i_lo, i_hi = _range_window(lo[dim], hi[dim], tiling.grid[dim], k, s, d, c)
        any_pass &= (u_lo[:, None] <= hi[dim][None, :]) & (lo[dim][None, :] <= u_hi[:, None])
        all_pass &= (i_lo[:, None] <= lo[dim][None, :]) & (hi[dim][None, :] <= i_hi[:, None])
    seq = tiling.padded_tokens + layout.text_tokens
    nb_blocks = -(-seq // block)
    listed = torch.ones(nb_blocks, nb_blocks, dtype=torch.bool, device=dev)
    full = listed.clone()
    listed[:n_tiles, :n_tiles] = any_pass
    full[:n_tiles, :n_tiles] = all_pass & any_pass
    full[n_tiles:, :n_tiles] = ~clipped[None, :]  # text queries: padded key boxes need the rule
    return from_block_mask(
        listed, seq, block_m=block, block_n=block, partial=listed & ~full, rule=_tiled_rule(layout, nb, tiling),
    )


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the density of a neighborhood pattern.")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--cols", type=int, required=True)
    parser.add_argument("--kernel", type=int, nargs=3, required=True, metavar=("KF", "KY", "KX"))
    parser.add_argument("--stride", type=int, nargs=3, default=(1, 1, 1))
    parser.add_argument("--dilation", type=int, nargs=3, default=(1, 1, 1))
    parser.add_argument("--text-tokens", type=int, default=0)
    args = parser.parse_args(argv)
    layout = TokenLayout(args.frames, args.rows, args.cols, args.text_tokens, "after" if args.text_tokens else "none")
    nb = spec(layout, tuple(args.kernel), tuple(args.stride), tuple(args.dilation))
    desc = block_sparsity(layout, nb)
    full = float((desc.mask & ~desc.partial).float().mean())
    print(f"{nb} on {layout}: {desc}, full blocks {full:.3f} of all")


if __name__ == "__main__":
    _main()
