"""MSW-MSA windows (HiDiffusion, research/hidiffusion_agent.md §1.3-1.4) on one (Y, X) token grid.

Every call splits the grid into exactly 2 x 2 windows of ``(ceil(Y/2), ceil(X/2))`` tokens (a
quarter of the map each, much larger than Swin's), after a cyclic roll by ``shift(k)`` =
``k * (wh // 4, ww // 4)`` with k in {0, 1, 2, 3}; tokens that wrap around attend with the opposite
border (no Swin mask: the "modification"). Window order in the batch is sample-major, then window
row, then window column (index ``4 b + 2 row + col``), so CFG halves stay contiguous.

Odd grids: upstream resizes the map bicubically to an even size (and warns that quality drops);
here the map is padded to ``(2 wh, 2 ww)`` and the padded keys are masked, so the windows are exact
at any size (``partition`` returns the key mask).

Run ``python -m diffattn.patterns.windows --rows 64 --cols 48 --k 1`` to print a window map.
"""

from __future__ import annotations

import argparse

import torch


def window_size(rows: int, cols: int) -> tuple[int, int]:
    """(wh, ww): half the map, rounded up."""
    return (rows + 1) // 2, (cols + 1) // 2


def shift(k: int, rows: int, cols: int) -> tuple[int, int]:
    """The roll (sy, sx) of shift index k in {0, 1, 2, 3}: k quarters of a window on both axes."""
    wh, ww = window_size(rows, cols)
    return k * (wh // 4), k * (ww // 4)


def partition(x: torch.Tensor, rows: int, cols: int, k: int):
    """x ``[B, H, S, D]`` (S = rows * cols, row-major) -> (windows ``[4B, H, n, D]``, key mask or None).

    The key mask is ``[4B, 1, 1, n]`` bool (True = a real token) when the grid is odd, else None.
    """
    b, h, s, d = x.shape
    if s != rows * cols:
        raise ValueError(f"msw-msa: {s} tokens do not form the {rows} x {cols} grid")
    wh, ww = window_size(rows, cols)
    sy, sx = shift(k, rows, cols)
    grid = x.reshape(b, h, rows, cols, d)  # [B, H, Y, X, D]
    valid = None
    if (2 * wh, 2 * ww) != (rows, cols):
        grid = torch.nn.functional.pad(grid, (0, 0, 0, 2 * ww - cols, 0, 2 * wh - rows))  # [B, H, 2wh, 2ww, D]
        valid = torch.zeros(2 * wh, 2 * ww, dtype=torch.bool, device=x.device)
        valid[:rows, :cols] = True
        valid = valid.roll((-sy, -sx), dims=(0, 1)).reshape(2, wh, 2, ww).permute(0, 2, 1, 3).reshape(4, 1, 1, wh * ww)
        valid = valid.repeat(b, 1, 1, 1)  # [4B, 1, 1, n]
    grid = grid.roll((-sy, -sx), dims=(2, 3))
    windows = grid.reshape(b, h, 2, wh, 2, ww, d).permute(0, 2, 4, 1, 3, 5, 6)  # [B, 2, 2, H, wh, ww, D]
    return windows.reshape(4 * b, h, wh * ww, d), valid


def unpartition(windows: torch.Tensor, rows: int, cols: int, k: int) -> torch.Tensor:
    """Inverse of ``partition``: ``[4B, H, n, D]`` -> ``[B, H, rows * cols, D]`` (padding dropped)."""
    b4, h, n, d = windows.shape
    wh, ww = window_size(rows, cols)
    sy, sx = shift(k, rows, cols)
    b = b4 // 4
    grid = windows.reshape(b, 2, 2, h, wh, ww, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, h, 2 * wh, 2 * ww, d)
    grid = grid.roll((sy, sx), dims=(2, 3))[:, :, :rows, :cols]  # [B, H, Y, X, D]
    return grid.reshape(b, h, rows * cols, d)


def window_ids(rows: int, cols: int, k: int) -> torch.Tensor:
    """``[rows * cols]`` window index (2 row + col) of every token: the token-level reference."""
    wh, ww = window_size(rows, cols)
    sy, sx = shift(k, rows, cols)
    y = (torch.arange(rows) - sy) % (2 * wh)  # position after the roll by -sy
    x = (torch.arange(cols) - sx) % (2 * ww)
    return ((y // wh)[:, None] * 2 + (x // ww)[None, :]).reshape(-1)


def token_mask(rows: int, cols: int, k: int) -> torch.Tensor:
    """``[S, S]`` bool: query and key in the same window (the reference twin of ``partition``)."""
    ids = window_ids(rows, cols, k)
    return ids[:, None] == ids[None, :]


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--cols", type=int, default=16)
    parser.add_argument("--k", type=int, default=1, choices=range(4))
    a = parser.parse_args()
    ids = window_ids(a.rows, a.cols, a.k).reshape(a.rows, a.cols)
    print(f"windows {window_size(a.rows, a.cols)}, shift {shift(a.k, a.rows, a.cols)}, density 0.25 of the score matrix")
    for row in ids.tolist():
        print("".join("ABCD"[v] for v in row))


if __name__ == "__main__":
    _main()
