"""CLEAR's local circular window (research/clear.md §1.2-1.3) on the (F, Y, X) grid.

An image token attends to the image tokens of its own frame with (y_q - y_k)^2 + (x_q - x_k)^2
< r^2 (strict, Euclidean, on the token grid; clipped at the borders, no wrap-around). Text tokens are
global: text queries see everything and every query sees all text keys. FLUX puts its text before
the image, SD3 after; the layout says which (never a hard-coded 512).

Optional down-sampled global branch (``down_factor = d > 1``, §1.3): the image keys and values
(after norms and RoPE) are averaged over d x d cells of each frame (CLEAR's ``spatial_weight`` at its
initialisation, 1/d^2; cells cut by the border average their valid tokens) and appended after the
sequence. Every image query sees every pooled token; text queries see none.

Two kernel orders, the same attention:
- row-major (the model's order): blocks are runs of rows; ``block_sparsity`` classifies tiles
  exactly from row segments (the squared distance over a pair of column ranges is smallest and
  largest at known ends);
- tile order (``tiling``): 2-D tiles of the grid (e.g. 8 x 16 tokens), one block per tile, so a
  disc covers whole boxes and many more listed blocks are full (§2.2). The method permutes q/k/v
  into this order and undoes it on the output.
The kernel evaluates the circle per element inside partial blocks.

Run ``python -m diffattn.patterns.clear --rows 64 --cols 64 --text 512 --radius 16`` to print the
densities in both orders.
"""

from __future__ import annotations

import argparse
import math

import torch

from diffattn.core.layout import TokenLayout
from diffattn.patterns.blocks import BlockSparsity, from_block_mask
from diffattn.patterns.segments import segments, tile_classes
from diffattn.patterns.tiles import PLANE_CANDIDATES, Tiling, choose_tiling, tile_order  # noqa: F401 (tile_order re-exported)
from diffattn.rules.circle import CircleRule, TiledCircleRule


def check_radius(radius) -> int:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"clear: radius must be an int >= 1 (tokens; 8, 16, 32 released), got radius={radius!r}")
    return radius


def full_radius(layout: TokenLayout) -> int:
    """The smallest radius whose disc covers every pair of a frame (the pattern is then dense)."""
    far = (layout.rows - 1) ** 2 + (layout.cols - 1) ** 2
    return math.isqrt(far) + 1


def pooled_tokens(layout: TokenLayout, down_factor: int) -> int:
    """Tokens of the down-sampled branch: ceil(Y/d) * ceil(X/d) per frame (0 for d = 1)."""
    if down_factor == 1:
        return 0
    return layout.frames * (-(-layout.rows // down_factor)) * (-(-layout.cols // down_factor))


def pool(x: torch.Tensor, layout: TokenLayout, down_factor: int) -> torch.Tensor:
    """Average of the image tokens of ``x`` [B, H, S, D] (model order) over d x d cells of each
    frame -> [B, H, P, D] (frame-major, then cell row, then cell column)."""
    d = down_factor
    b, h, _, dim = x.shape
    f, y, w = layout.frames, layout.rows, layout.cols
    v0 = layout.video_start
    img = x[:, :, v0:v0 + layout.video_tokens].reshape(b * h * f, y, w, dim)  # [BHF, Y, X, D]
    cy, cx = -(-y // d), -(-w // d)
    padded = img.new_zeros(b * h * f, cy * d, cx * d, dim)
    padded[:, :y, :w] = img
    sums = padded.reshape(b * h * f, cy, d, cx, d, dim).sum(dim=(2, 4))  # [BHF, cy, cx, D]
    ones = torch.zeros(cy * d, cx * d, device=x.device, dtype=x.dtype)
    ones[:y, :w] = 1
    counts = ones.reshape(cy, d, cx, d).sum(dim=(1, 3))  # [cy, cx] valid tokens per cell
    return (sums / counts[None, :, :, None]).reshape(b, h, f * cy * cx, dim)


def rule(layout: TokenLayout, radius: int, down_factor: int = 1, tiling: Tiling | None = None):
    """The element rule of the kernel sequence (model order or tile order, pooled tokens last)."""
    r2 = check_radius(radius) ** 2
    pooled = pooled_tokens(layout, down_factor)
    if tiling is None:
        main = layout.seq_len
        return CircleRule(layout.video_start, layout.video_tokens, layout.frames, layout.rows, layout.cols,
                          radius_sq=r2, pool_start=main if pooled else -1)
    main = tiling.padded_tokens + layout.text_tokens
    return TiledCircleRule(0, tiling.padded_tokens, layout.frames, layout.rows, layout.cols, radius_sq=r2,
                           pool_start=main if pooled else -1, tile=tiling.tile, tiles=tiling.tiles)


def token_mask(layout: TokenLayout, radius: int, down_factor: int = 1) -> torch.Tensor:
    """Reference ``[S, S + P]`` bool in model order, pooled keys last (small sizes only)."""
    q = torch.arange(layout.seq_len)
    k = torch.arange(layout.seq_len + pooled_tokens(layout, down_factor))
    return rule(layout, radius, down_factor).mask(q[:, None], k[None, :])


def kernel_mask(layout: TokenLayout, radius: int, down_factor: int = 1, tiling: Tiling | None = None) -> torch.Tensor:
    """Reference ``[S', S']`` bool of the kernel sequence (the description's order; small sizes)."""
    r = rule(layout, radius, down_factor, tiling)
    main = layout.seq_len if tiling is None else tiling.padded_tokens + layout.text_tokens
    idx = torch.arange(main + pooled_tokens(layout, down_factor))
    return r.mask(idx[:, None], idx[None, :])


def plane_tiling(layout: TokenLayout, volume: int = 128, tile=None) -> Tiling:
    """The 2-D tiling (one frame per tile) with the least padding, or ``tile`` (tf must be 1)."""
    if tile is not None and tuple(tile)[0] != 1:
        raise ValueError(f"clear: tiles must be one frame deep (the circle never crosses frames), got tile={tuple(tile)!r}")
    return choose_tiling(layout, volume, tile, PLANE_CANDIDATES)


def _row_major(layout: TokenLayout, r2: int, block_m: int, block_n: int, device):
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
    return tile_classes(q, k, any_pass, all_pass)


def _tiled(layout: TokenLayout, r2: int, tiling: Tiling, device):
    """Tile order: one block per 2-D box; closest / farthest distances from the box ends."""
    lo, hi, clipped = tiling.boxes(device)
    n_tiles = clipped.numel()

    def extremes(dim):
        gap = torch.clamp(torch.maximum(lo[dim][None, :] - hi[dim][:, None], lo[dim][:, None] - hi[dim][None, :]), min=0)
        span = torch.maximum((hi[dim][:, None] - lo[dim][None, :]).abs(), (hi[dim][None, :] - lo[dim][:, None]).abs())
        return gap, span

    gy, sy = extremes(1)
    gx, sx = extremes(2)
    same = lo[0][:, None] == lo[0][None, :]
    any_pass = same & (gy * gy + gx * gx < r2)
    all_pass = same & (sy * sy + sx * sx < r2) & ~clipped[None, :]  # padded key boxes need the rule
    block = tiling.volume
    nb = -(-(tiling.padded_tokens + layout.text_tokens) // block)
    listed = torch.ones(nb, nb, dtype=torch.bool, device=clipped.device)
    full = listed.clone()
    listed[:n_tiles, :n_tiles] = any_pass
    full[:n_tiles, :n_tiles] = all_pass & any_pass
    full[n_tiles:, :n_tiles] = ~clipped[None, :]  # text queries: padded key boxes need the rule
    return listed, full


def _classes(starts: torch.Tensor, ends: torch.Tensor, video: tuple[int, int], main: int):
    """Token counts per block [start, end): (video, text, pooled) for a kernel sequence whose video
    region is ``video`` = [v0, v1), text the rest of [0, main), pooled tokens from ``main`` on."""
    def overlap(a, b):
        return torch.clamp(torch.minimum(ends, torch.tensor(b)) - torch.maximum(starts, torch.tensor(a)), min=0)

    n_video = overlap(*video)
    n_main = overlap(0, main)
    return n_video, n_main - n_video, (ends - starts) - n_main


def _with_pooled(listed, full, seq: int, main: int, video: tuple[int, int], block_m: int, block_n: int):
    """Extend main-sequence tile masks by the pooled tokens [main, seq) (see ``CircleRule``)."""
    nq, nk = -(-seq // block_m), -(-seq // block_n)
    dev = listed.device
    q_start = torch.arange(nq) * block_m
    k_start = torch.arange(nk) * block_n
    vq, tq, pq = _classes(q_start, torch.clamp(q_start + block_m, max=seq), video, main)
    vk, tk, pk = _classes(k_start, torch.clamp(k_start + block_n, max=seq), video, main)
    main_q, main_k = (vq + tq > 0).to(dev), (vk + tk > 0).to(dev)
    vq, tq, pq, pk = (t.to(dev) > 0 for t in (vq, tq, pq, pk))
    mm_listed = torch.zeros(nq, nk, dtype=torch.bool, device=dev)
    mm_full = mm_listed.clone()
    mm_listed[: listed.shape[0], : listed.shape[1]] = listed
    mm_full[: full.shape[0], : full.shape[1]] = full
    pooled_pass = pk[None, :] & (vq | pq)[:, None]
    out_listed = mm_listed | pooled_pass
    both_main = main_q[:, None] & main_k[None, :]
    out_full = out_listed & (~both_main | mm_full) & ~(tq[:, None] & pk[None, :]) & ~(pq[:, None] & main_k[None, :])
    return out_listed, out_full


def block_sparsity(layout: TokenLayout, radius: int, down_factor: int = 1, *, tiling: Tiling | None = None,
                   block_m: int = 128, block_n: int = 64, device=None) -> BlockSparsity:
    """Kernel description: model order with ``block_m x block_n`` tiles, or tile order (one block
    per tile of ``tiling``); the pooled tokens of ``down_factor`` follow the sequence."""
    r2 = check_radius(radius) ** 2
    if tiling is None:
        listed, full = _row_major(layout, r2, block_m, block_n, device)
        main, video = layout.seq_len, (layout.video_start, layout.video_start + layout.video_tokens)
    else:
        block_m = block_n = tiling.volume
        listed, full = _tiled(layout, r2, tiling, device)
        main, video = tiling.padded_tokens + layout.text_tokens, (0, tiling.padded_tokens)
    seq = main + pooled_tokens(layout, down_factor)
    if seq > main:
        listed, full = _with_pooled(listed, full, seq, main, video, block_m, block_n)
    return from_block_mask(listed, seq, block_m=block_m, block_n=block_n, partial=listed & ~full,
                           rule=rule(layout, radius, down_factor, tiling))


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the block density of CLEAR's pattern in both orders.")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--cols", type=int, required=True)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--radius", type=int, default=16)
    parser.add_argument("--down-factor", type=int, default=1)
    args = parser.parse_args(argv)
    layout = TokenLayout(1, args.rows, args.cols, args.text, "before" if args.text else "none")
    row = block_sparsity(layout, args.radius, args.down_factor)
    tiled = block_sparsity(layout, args.radius, args.down_factor, tiling=plane_tiling(layout))
    print(f"CLEAR r={args.radius} d={args.down_factor} on {layout}: row-major 128x64 {row.density:.3f}, "
          f"tiles {plane_tiling(layout).tile} {tiled.density:.3f}")


if __name__ == "__main__":
    _main()
