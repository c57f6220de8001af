"""CLEAR's local circular window (research/clear.md §1.2) on the (F, Y, X) grid.

An image token attends to the image tokens of its own frame with (y_q - y_k)^2 + (x_q - x_k)^2
< r^2 (strict, Euclidean, on the token grid; clipped at the borders, no wrap-around). Text tokens are
global: text queries see everything and every query sees all text keys. CLEAR's FLUX layout puts
512 text tokens before the image (``TokenLayout(..., text_position="before")``).

``block_sparsity`` classifies tiles exactly from row segments (the squared distance over a pair of
column ranges is smallest and largest at known ends), and the kernel evaluates the circle per
element inside partial blocks.
"""

from __future__ import annotations

import torch

from diffattn.core.layout import TokenLayout
from diffattn.patterns.blocks import BlockSparsity, from_block_mask
from diffattn.rules.circle import CircleRule
from diffattn.patterns.segments import segments, tile_classes


def _check(radius) -> int:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"clear: radius must be an int >= 1 (tokens; 8, 16, 32 released), got radius={radius!r}")
    return radius


def token_mask(layout: TokenLayout, radius: int) -> torch.Tensor:
    """Reference ``[S, S]`` bool (small sizes only)."""
    idx = torch.arange(layout.seq_len)
    return _rule(layout, _check(radius) ** 2).mask(idx[:, None], idx[None, :])


def _rule(layout: TokenLayout, r2: int) -> CircleRule:
    return CircleRule(layout.video_start, layout.video_tokens, layout.frames, layout.rows, layout.cols, radius_sq=r2)


def block_sparsity(layout: TokenLayout, radius: int, *, block_m: int = 128, block_n: int = 64, device=None) -> BlockSparsity:
    r2 = _check(radius) ** 2
    q = segments(layout, block_m, device)
    k = segments(layout, block_n, device)
    dy2 = (q.row[:, None] - k.row[None, :]) ** 2
    a, b = q.x0[:, None], q.x1[:, None]
    c, e = k.x0[None, :], k.x1[None, :]
    gap = torch.clamp(torch.maximum(c - b, a - e), min=0)  # closest columns
    span = torch.maximum((a - e).abs(), (b - c).abs())     # farthest columns
    same = q.frame[:, None] == k.frame[None, :]
    text = q.is_text[:, None] | k.is_text[None, :]
    any_pass = (same & (dy2 + gap * gap < r2)) | text
    all_pass = (same & (dy2 + span * span < r2)) | text
    listed, full = tile_classes(q, k, any_pass, all_pass)
    return from_block_mask(
        listed, layout.seq_len, block_m=block_m, block_n=block_n, partial=listed & ~full, rule=_rule(layout, r2),
    )
