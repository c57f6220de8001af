"""Row segments: the exact building block for classifying tiles of grid patterns.

A tile of contiguous tokens covers parts of one or more (frame, row) runs of the frame-major grid.
Each maximal piece of a tile inside one (frame, row) is a *segment*: a single frame f, a single row
y and a contiguous column range [x0, x1]. Window patterns (neighborhood, circle) can say exactly,
per pair of segments, whether *some* pair of tokens passes and whether *every* pair passes; a tile
pair is then listed when any of its segment pairs passes and full when all of them do.

Text tokens (before or after the video) form their own segments with ``is_text=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffattn.core.layout import TokenLayout


@dataclass
class Segments:
    tile: torch.Tensor     # [G] tile index of each segment
    frame: torch.Tensor    # [G] f (0 for text)
    row: torch.Tensor      # [G] y
    x0: torch.Tensor       # [G] first column
    x1: torch.Tensor       # [G] last column (inclusive)
    is_text: torch.Tensor  # [G] bool
    num_tiles: int


def segments(layout: TokenLayout, block: int, device=None) -> Segments:
    """Segments of the tiles of ``block`` tokens over the whole sequence of ``layout``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    s, x_len = layout.seq_len, layout.cols
    v0, n = layout.video_start, layout.video_tokens
    # break points: tile starts, row starts inside the video, and the video/text borders
    cuts = [torch.arange(0, s, block, device=dev), torch.arange(v0, v0 + n, x_len, device=dev)]
    cuts.append(torch.tensor([v0, v0 + n], device=dev))
    starts = torch.unique(torch.cat(cuts))
    starts = starts[starts < s]
    ends = torch.cat([starts[1:], torch.tensor([s], device=dev)]) - 1  # inclusive
    is_text = (starts < v0) | (starts >= v0 + n)
    rel = (starts - v0).clamp(min=0, max=max(n - 1, 0))
    rel_end = (ends - v0).clamp(min=0, max=max(n - 1, 0))
    per_frame = layout.rows * x_len
    frame = torch.where(is_text, torch.zeros_like(rel), rel // per_frame)
    row = torch.where(is_text, torch.zeros_like(rel), (rel % per_frame) // x_len)
    x0 = torch.where(is_text, torch.zeros_like(rel), rel % x_len)
    x1 = torch.where(is_text, torch.zeros_like(rel), rel_end % x_len)
    return Segments(starts // block, frame, row, x0, x1, is_text, -(-s // block))


def tile_classes(q: Segments, k: Segments, any_pass: torch.Tensor, all_pass: torch.Tensor):
    """Reduce segment-pair verdicts ``[Gq, Gk]`` to tile masks: (listed [nq, nk], full [nq, nk])."""
    nq, nk = q.num_tiles, k.num_tiles
    pair_tile = q.tile[:, None] * nk + k.tile[None, :]  # [Gq, Gk] flat tile-pair id
    listed = torch.zeros(nq * nk, dtype=torch.int32, device=any_pass.device)
    listed.index_add_(0, pair_tile.flatten(), any_pass.flatten().to(torch.int32))
    failing = torch.zeros(nq * nk, dtype=torch.int32, device=any_pass.device)
    failing.index_add_(0, pair_tile.flatten(), (~all_pass).flatten().to(torch.int32))
    listed = listed.reshape(nq, nk) > 0
    return listed, listed & (failing.reshape(nq, nk) == 0)
