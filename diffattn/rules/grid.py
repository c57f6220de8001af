"""What grid rules share: where the video tokens sit and their (frame, row, column) coordinates.

Tokens are frame-major over the ``(F, Y, X)`` grid: ``t = v0 + f * Y * X + y * X + x``. Tokens
outside ``[v0, v0 + n)`` are text and global: text queries see every key, every query sees text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GridRule:
    video_start: int   # v0: first video token (text before the video shifts it)
    video_tokens: int  # n = F * Y * X
    frames: int        # F
    rows: int          # Y
    cols: int          # X

    GRID_PARAMS = ("video_start", "video_tokens", "frames", "rows", "cols")

    def pack_grid(self) -> tuple[int, ...]:
        return (self.video_start, self.video_tokens, self.frames, self.rows, self.cols)

    def coords(self, idx: torch.Tensor):
        """(is_video, f, y, x) of token indices (any shape; text tokens get clamped coordinates)."""
        rel = idx - self.video_start
        video = (rel >= 0) & (rel < self.video_tokens)
        rel = rel.clamp(0, self.video_tokens - 1)
        per_frame = self.rows * self.cols
        return video, rel // per_frame, (rel % per_frame) // self.cols, rel % self.cols

    def with_text(self, q_idx: torch.Tensor, kv_idx: torch.Tensor, video_rule) -> torch.Tensor:
        """``video_rule(q coords, k coords)`` for video pairs, True whenever either side is text."""
        vq, fq, yq, xq = self.coords(q_idx)
        vk, fk, yk, xk = self.coords(kv_idx)
        return video_rule((fq, yq, xq), (fk, yk, xk)) | ~vq | ~vk


def tiled_coords(rel: torch.Tensor, tile: tuple[int, int, int], tiles: tuple[int, int, int]):
    """(f, y, x) of positions ``rel`` of a tiled video region: tiles of ``tile = (tf, ty, tx)``
    tokens, tile after tile (frame-major, then row, then column of tiles; tokens inside a tile
    likewise); ``tiles`` is the tile count per dimension. Coordinates past the grid are padding."""
    tf, ty, tx = tile
    volume = tf * ty * tx
    index, inner = rel // volume, rel % volume
    f = (index // (tiles[1] * tiles[2])) * tf + inner // (ty * tx)
    y = ((index // tiles[2]) % tiles[1]) * ty + (inner // tx) % ty
    x = (index % tiles[2]) * tx + inner % tx
    return f, y, x


class TiledCoords:
    """Mixin of the rules on tokens in tile order (``patterns.tiles``): the subclass declares the
    fields ``tile`` (tf, ty, tx) and ``tiles`` (tiles per dimension); the video region holds the
    grid padded to whole tiles (``video_tokens`` is the padded count)."""

    def coords(self, idx: torch.Tensor):
        rel = idx - self.video_start
        video = (rel >= 0) & (rel < self.video_tokens)
        return (video, *tiled_coords(rel.clamp(0, self.video_tokens - 1), self.tile, self.tiles))

    def key_padding(self, kv_idx: torch.Tensor) -> torch.Tensor:
        """True for keys that are tile padding (never attended)."""
        vk, fk, yk, xk = self.coords(kv_idx)
        return vk & ((fk >= self.frames) | (yk >= self.rows) | (xk >= self.cols))
