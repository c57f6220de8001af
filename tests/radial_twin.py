"""Literal twin of the reference radial block-mask construction (research/radial.md §1.2).

Written from the step-by-step description, frame pair by frame pair, with a token-level local
mask, a block-aligned canvas and the column-density vote, as the reference builds it. Local masks
are memoised per (width, gate, offsets) so the real shapes of §1.6 stay affordable. It raises
where the reference raises (tiles overhanging the mask edge).
"""

import torch


def _bitlen(x):
    return int(x).bit_length()


def _width(d, t, b, decay):
    if d <= 1:
        return t
    length = 2 ** _bitlen(t) / 2 ** _bitlen(d) * decay
    return length if length >= b else b


def _gate(d, t):
    length = 2 ** _bitlen(t) / 2 ** _bitlen(d)
    if length >= 128:
        return True
    return d % int(128 / length) == 0


def _shrink(canvas, b):
    n = canvas.shape[0] // b
    tiles = canvas[: n * b, : n * b].view(n, b, n, b)
    col_density = tiles.sum(dim=1) / b  # [n, n, b]
    nonzero = col_density > 0
    high = col_density > 1 / 3
    frac = high.sum(dim=-1) / (nonzero.sum(dim=-1) + 1e-9)
    return frac > 0.6


def reference_block_mask(frames, t, *, block_size=128, decay=1.0, sink=True, text_tokens=0):
    b = block_size
    n_video = frames * t
    s = n_video + text_tokens
    out = torch.zeros(s // b, s // b, dtype=torch.bool)
    border = n_video // b
    out[border:] = True
    out[:, border:] = True
    idx = torch.arange(t)
    offset = (idx[None, :] - idx[:, None]).abs()
    memo = {}
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            ri, rj = (i * t) % b, (j * t) % b
            if sink and j == 0:
                key = ("dense", ri, rj)
            else:
                key = (_width(d, t, b, decay), _gate(d, t), ri, rj)
            if key not in memo:
                if key[0] == "dense":
                    local = torch.ones(t, t, dtype=torch.bool)
                else:
                    local = (offset <= key[0]) & key[1]
                nt = (t - 1) // b + 1
                canvas = torch.zeros(ri + nt * b, rj + nt * b, dtype=torch.bool)
                canvas[ri:ri + t, rj:rj + t] = local
                memo[key] = _shrink(canvas, b)
            tiles = memo[key]
            r0, c0 = (i * t) // b, (j * t) // b
            target = out[r0:r0 + tiles.shape[0], c0:c0 + tiles.shape[1]]
            if target.shape != tiles.shape:
                raise RuntimeError(f"reference overhang at frame pair ({i}, {j})")
            out[r0:r0 + tiles.shape[0], c0:c0 + tiles.shape[1]] = target | tiles
    return out
