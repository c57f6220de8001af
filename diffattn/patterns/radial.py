"""Radial attention mask (Radial Attention, arXiv 2506.19852; mit-han-lab/radial-attention).

A static O(n log n) block-sparse mask over video tokens laid out frame-major (see
``diffattn.core.layout``). For a query frame i and a key frame j at distance d = |i - j|:

- frame 0 is a sink when ``sink=True`` (Wan): every query frame sees all of frame 0;
- d <= 1 is dense;
- d >= 2 keeps a diagonal band |c - r| <= w(d) over the flattened in-frame index, with
  w(d) = max(P * decay / 2**bitlen(d), block_size) and P = 2**bitlen(T) (T tokens per frame);
- once P / 2**bitlen(d) < 128 only distances that are multiples of 128 // (P / 2**bitlen(d)) stay
  (the reference's literal 128, whatever the block size);
- text tokens (after the video) are dense both ways.

Each frame pair's token mask is placed on a block-aligned canvas and shrunk to tiles by the
reference's column-density vote (a tile is on when more than 60 % of its non-empty columns are
more than 1/3 full), then OR-ed into the block mask. This reproduces the reference block mask
(HEAD 72788d4, research/radial.md §1.2) bit for bit wherever the reference builds one.

Deviations, all where the reference fails (research/radial.md §1.5):
- frame pairs whose tiles overhang the mask edge are clipped instead of raising;
- the mask is ``ceil(S / B)`` blocks per side (the reference floors), the tail block dense;
- every token keeps the blocks of its own frame and, with ``sink``, of frame 0, also when frame
  boundaries fall inside a block.

The tile vote is evaluated in closed form (the band's per-column row count is a trapezoid in the
column index, so "count >= k" holds on an interval), so no token-level mask is ever built:
``block_mask`` costs O(classes * n^2 + (S/B)^2) with n = ceil(T / B).

Run ``python -m diffattn.patterns.radial --frames 21 --tokens 1560`` to print the density and
save a picture of the mask.
"""

from __future__ import annotations

import argparse
import math

import torch

GATE_THRESHOLD = 128  # the reference's hard-coded "diagonal split" threshold, independent of B


def _bitlen(x: int) -> int:
    return int(x).bit_length()


def _check(frames: int, tokens_per_frame: int, block_size: int, decay: float, text_tokens: int):
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"radial: frames must be an int >= 1, got frames={frames!r}")
    if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"radial: tokens_per_frame must be an int >= 1, got {tokens_per_frame!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"radial: block_size must be a power of two >= 16 (64 or 128 recommended), got {block_size!r}"
        )
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay > 0):
        raise ValueError(f"radial: decay must be a finite number > 0 (0.2 to 1.0 typical), got {decay!r}")
    if not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"radial: text_tokens must be an int >= 0, got {text_tokens!r}")


def window_width(distance: int, tokens_per_frame: int, block_size: int, decay: float) -> float:
    """Half-width w(d) of the in-frame band between frames ``distance`` apart (real-valued)."""
    if distance <= 1:
        return float(tokens_per_frame)
    p = 2 ** _bitlen(tokens_per_frame)
    return max(p / 2 ** _bitlen(distance) * decay, float(block_size))


def keeps_distance(distance: int, tokens_per_frame: int) -> bool:
    """The frequency gate: whether frame pairs at this distance are kept at all."""
    unscaled = 2 ** _bitlen(tokens_per_frame) / 2 ** _bitlen(distance)
    if unscaled >= GATE_THRESHOLD:
        return True
    return distance % int(GATE_THRESHOLD / unscaled) == 0


def token_mask(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay: float = 1.0,
    sink: bool = True,
    text_tokens: int = 0,
) -> torch.Tensor:
    """Token-level radial pattern before the block vote: ``[S, S]`` bool, S = F*T + text.

    For small sizes only (it is S x S). ``block_mask`` is what kernels consume.
    """
    _check(frames, tokens_per_frame, block_size, decay, text_tokens)
    t = tokens_per_frame
    n_video = frames * t
    s = n_video + text_tokens
    out = torch.zeros(s, s, dtype=torch.bool)
    pos = torch.arange(t)
    offset = (pos[None, :] - pos[:, None]).abs()  # [T, T]: |c - r|
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if sink and j == 0:
                local = torch.ones(t, t, dtype=torch.bool)
            elif keeps_distance(d, t):
                local = offset <= window_width(d, t, block_size, decay)
            else:
                continue
            out[i * t:(i + 1) * t, j * t:(j + 1) * t] = local
    out[n_video:, :] = True
    out[:, n_video:] = True
    return out


def _tile_votes(half_widths, r_rows, r_cols, t: int, b: int, n: int) -> torch.Tensor:
    """Closed-form tile vote for K frame-pair classes: ``[K, n, n]`` bool.

    Class k has band half-width floor ``half_widths[k]`` (>= T means dense) and canvas offsets
    ``r_rows[k]``, ``r_cols[k]`` (where the frames start inside their first block).
    """
    fw = half_widths[:, None, None]  # [K, 1, 1]
    ri = r_rows[:, None, None]
    rj = r_cols[:, None, None]
    tiles = torch.arange(n, dtype=torch.int64, device=half_widths.device)
    a = tiles[None, :, None]  # tile row
    c = tiles[None, None, :]  # tile column
    # Rows of the frame (local index r) inside tile row a, and columns (local c) inside tile col.
    row_lo = torch.clamp(a * b - ri, min=0)
    row_hi = torch.clamp(a * b + b - 1 - ri, max=t - 1)
    col_lo = torch.clamp(c * b - rj, min=0)
    col_hi = torch.clamp(c * b + b - 1 - rj, max=t - 1)

    def columns_with_at_least(k: int) -> torch.Tensor:
        # count(c) = min(c + fw, row_hi) - max(c - fw, row_lo) + 1 >= k holds on the interval
        # row_lo + k - 1 - fw <= c <= row_hi + fw + 1 - k (when 2 fw + 1 >= k, rows >= k).
        lo = torch.maximum(col_lo, row_lo + k - 1 - fw)
        hi = torch.minimum(col_hi, row_hi + fw + 1 - k)
        z = torch.clamp(hi - lo + 1, min=0)
        ok = (2 * fw + 1 >= k) & (row_hi - row_lo + 1 >= k)
        return torch.where(ok, z, torch.zeros_like(z))

    nonzero = columns_with_at_least(1)
    # column density count / B > 1/3  <=>  count >= floor(B / 3) + 1 (B is a power of two)
    high = columns_with_at_least(b // 3 + 1)
    # frac_high > 0.6 with frac = high / nonzero, in exact integer arithmetic
    return (nonzero > 0) & (10 * high > 6 * nonzero)


def block_mask(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay: float = 1.0,
    sink: bool = True,
    text_tokens: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Radial block mask ``[ceil(S/B), ceil(S/B)]`` bool, S = frames * tokens_per_frame + text.

    Rows are query blocks, columns key blocks. ``sink=True`` is Wan's frame-0 sink (HunyuanVideo
    runs without). Text tokens follow the video and are dense both ways. ``device``: where the mask
    is built and returned (CUDA builds the largest masks in milliseconds).
    """
    _check(frames, tokens_per_frame, block_size, decay, text_tokens)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    t, b = tokens_per_frame, block_size
    n_video = frames * t
    s = n_video + text_tokens
    nb = -(-s // b)
    n = -(-t // b)  # tiles per frame side
    dense_width = t  # any half-width >= T - 1 covers the whole frame pair

    # 1. Frame-pair classes: (band half-width, row offset, column offset). Gated pairs: class -1.
    dist = torch.arange(frames)
    widths = []
    for d in range(frames):
        if not keeps_distance(d, t):
            widths.append(-1)
        else:
            widths.append(min(int(math.floor(window_width(d, t, b, decay))), dense_width))
    width_of_dist = torch.tensor(widths, dtype=torch.int64)  # [F]
    pair_width = width_of_dist[(dist[:, None] - dist[None, :]).abs()]  # [F, F]
    if sink:
        pair_width[:, 0] = dense_width
    offsets = (dist * t) % b  # [F]
    # one int64 key per frame pair: (width + 1, row offset, column offset), unique in one pass
    code = ((pair_width + 1) * b + offsets[:, None]) * b + offsets[None, :]
    unique_codes, pair_class = torch.unique(code.reshape(-1), return_inverse=True)
    pair_class = pair_class.reshape(frames, frames)
    classes = torch.stack([unique_codes // (b * b) - 1, (unique_codes // b) % b, unique_codes % b], -1)
    classes = classes.to(dev)
    tiles = _tile_votes(classes[:, 0], classes[:, 1], classes[:, 2], t, b, n)  # [K, n, n]
    tiles &= (classes[:, 0] >= 0)[:, None, None]
    pair_class = pair_class.to(dev)

    # 2. Place each pair's n x n tiles at block (iT // B, jT // B), OR-ed. Frames g apart never
    #    overlap, so each of the g*g residue groups is one disjoint scatter.
    start_list = [(i * t) // b for i in range(frames)]
    g = 1
    while g < frames and any(start_list[i + g] - start_list[i] < n for i in range(frames - g)):
        g += 1
    starts = torch.tensor(start_list, dtype=torch.int64, device=dev)  # [F]
    dist = dist.to(dev)
    pad = nb + n  # room for overhanging tiles, clipped below
    canvas = torch.zeros(pad, pad, dtype=torch.bool, device=dev)
    span = torch.arange(n, device=dev)
    for gi in range(g):
        rows_f = dist[gi::g]
        row_idx = (starts[rows_f][:, None] + span)[:, :, None, None]  # [Fi, n, 1, 1]
        for gj in range(g):
            cols_f = dist[gj::g]
            col_idx = (starts[cols_f][:, None] + span)[None, None, :, :]  # [1, 1, Fj, n]
            vals = tiles[pair_class[rows_f][:, cols_f]]  # [Fi, Fj, n, n]
            vals = vals.permute(0, 2, 1, 3)  # [Fi, n, Fj, n]
            canvas[row_idx, col_idx] |= vals
    out = canvas[:nb, :nb].clone()

    # 3. Every token keeps its own frame and the sink, also across unaligned frame boundaries.
    video_blocks = -(-n_video // b)
    block_start = torch.arange(video_blocks, device=dev) * b
    first_frame = block_start // t
    last_frame = torch.clamp((block_start + b - 1) // t, max=frames - 1)
    same = (first_frame[:, None] <= last_frame[None, :]) & (first_frame[None, :] <= last_frame[:, None])
    out[:video_blocks, :video_blocks] |= same
    if sink:
        out[:video_blocks, : (t - 1) // b + 1] = True

    # 4. Text and the trailing partial block are dense both ways (reference: rows/cols >= N // B).
    border = n_video // b
    out[border:, :] = True
    out[:, border:] = True
    return out


def density(mask: torch.Tensor, video_tokens: int | None = None, block_size: int | None = None) -> float:
    """Fraction of computed blocks; over the video x video corner when ``video_tokens`` is given."""
    if video_tokens is not None:
        if block_size is None:
            raise ValueError("density: pass block_size together with video_tokens")
        nv = video_tokens // block_size
        mask = mask[:nv, :nv]
    return float(mask.float().mean())


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the density of a radial mask and save a picture.")
    parser.add_argument("--frames", type=int, required=True, help="latent frames F")
    parser.add_argument("--tokens", type=int, required=True, help="tokens per frame T (Y * X)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--no-sink", action="store_true", help="HunyuanVideo: no frame-0 sink")
    parser.add_argument("--text-tokens", type=int, default=0)
    parser.add_argument("--out", default="radial_mask.png")
    args = parser.parse_args(argv)
    import time

    from PIL import Image

    t0 = time.perf_counter()
    mask = block_mask(
        args.frames, args.tokens, block_size=args.block_size, decay=args.decay,
        sink=not args.no_sink, text_tokens=args.text_tokens,
    )
    ms = (time.perf_counter() - t0) * 1e3
    s = args.frames * args.tokens + args.text_tokens
    print(
        f"radial F={args.frames} T={args.tokens} B={args.block_size} decay={args.decay} "
        f"sink={not args.no_sink} text={args.text_tokens}: S={s}, {mask.shape[0]}x{mask.shape[1]} blocks, "
        f"density {density(mask):.4f} (video x video {density(mask, args.frames * args.tokens, args.block_size):.4f}), "
        f"built in {ms:.1f} ms"
    )
    image = Image.fromarray((~mask).to(torch.uint8).mul(255).numpy())
    if max(image.size) < 512:
        scale = 512 // max(image.size)
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    image.save(args.out)
    print(f"saved {args.out} (black = computed block)")


if __name__ == "__main__":
    _main()
