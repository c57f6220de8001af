"""8-bit operands of the block-sparse forward (SageAttention-style), one Triton pass per tensor.

``precision="int8"``: Q and K in int8 with one scale per sparse block of rows (query blocks of
``block_m``, key blocks of ``block_n`` rows, per batch and head), K smoothed first: the mean key
``c`` over the sequence is subtracted, which shifts every score of a query row by the same
``q . c`` and so leaves the softmax unchanged while the int8 range is spent on what differs between
keys (SageAttention, Zhang et al. 2024, section 3.2). V in FP8 (e4m3) with one scale per channel;
P is scaled by 448 into e4m3's range in the kernel and P.V accumulates in fp32.
``precision="fp8"``: the same, with Q and K in e4m3 instead of int8.
``precision="int8-qk"``: Q and K in int8 as for ``"int8"``, V and P.V in V's own dtype
(SageAttention 1's split): the 8-bit Q.K^T only, for a few times less error than the fp8 P.V.

Layout: every 8-bit tensor is ``[B, H, S, Dp]`` contiguous with ``Dp`` the kernel's padded head
dim (>= 32, padded columns 0), so the kernel reads it through TMA at any head dim. Scales are fp32:
``q_scale`` ``[B, H, ceil(S / block_m)]``, ``k_scale`` ``[B, H, ceil(S_k / block_n)]``,
``v_scale`` ``[B, H, Dp]``; V itself is stored transposed, ``[B, H, Dp, Sk']`` (see
``quantize``). ``shift`` ``[B, H, S]`` = ``q . c`` (fp32) is added back to the log-sum-exp (times
the softmax scale) so that partial results still merge exactly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from diffattn.kernels import PRECISIONS

INT8_MAX = 127.0  # symmetric int8 range
FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def to_fp8(x, PREROUND: tl.constexpr):
    """fp32 -> float8 e4m3, rounding to nearest even. PREROUND (set under TRITON_INTERPRET=1) first
    rounds to 3 mantissa bits in fp32, so the cast is exact: the interpreter's own cast (triton 3.9)
    drops the carry into the exponent (31.998 -> 16). Normal range only (>= 2^-6): smaller values
    are e4m3 subnormals, which the cast rounds again."""
    if PREROUND:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # keep 3 of fp32's 23 mantissa bits
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_kernel(X, Xq, Scale, Center, Shift, ChanScale, Lens,
                  stride_b, stride_h, stride_s, stride_d, num_heads, seq, head_dim, n_blocks, qmax, seq_t,
                  BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, OUT_INT8: tl.constexpr, CENTER: tl.constexpr,
                  SHIFT: tl.constexpr, CHANNEL: tl.constexpr, TRANSPOSE: tl.constexpr, PREROUND: tl.constexpr,
                  HAS_LENS: tl.constexpr):
    """One [BLOCK, HEAD_DIM] block of rows of one (batch, head): (optionally centred) quantized rows,
    their scale (per block, or given per channel with CHANNEL), and with SHIFT the rows' dot with
    ``Center`` (which is then not subtracted). TRANSPOSE writes ``[Dp, seq_t]`` per (batch, head)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    valid = seq
    if HAS_LENS:  # keys past kv_len[b] (padded text) quantize to 0 and spend no block's range
        valid = tl.minimum(tl.load(Lens + b), seq)
    inside = (rows[:, None] < valid) & (cols[None, :] < head_dim)
    x = tl.load(X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + rows[:, None] * stride_s + cols[None, :] * stride_d,
                mask=inside, other=0.0).to(tl.float32)  # [BLOCK, HEAD_DIM]
    if CENTER | SHIFT:
        c = tl.load(Center + bh.to(tl.int64) * HEAD_DIM + cols)  # [HEAD_DIM] fp32, padded columns 0
        if SHIFT:
            tl.store(Shift + bh.to(tl.int64) * seq + rows, tl.sum(x * c[None, :], 1), mask=rows < seq)
        else:
            x = tl.where(inside, x - c[None, :], 0.0)  # rows past the end stay 0
    if CHANNEL:  # scale per column, given (the max over the whole sequence)
        scale = tl.load(ChanScale + bh.to(tl.int64) * HEAD_DIM + cols)  # [HEAD_DIM]
        y = x / tl.where(scale > 0.0, scale, 1.0)[None, :]
    else:  # one scale for the block
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        scale = tl.where(amax > 0.0, amax / qmax, 1.0)  # an all-zero block: any scale (not 0: 0 x -inf is NaN)
        y = x / scale
        tl.store(Scale + bh.to(tl.int64) * n_blocks + blk, scale)
    if TRANSPOSE:
        out = Xq + bh.to(tl.int64) * HEAD_DIM * seq_t + cols[None, :] * seq_t + rows[:, None]
    else:
        out = Xq + bh.to(tl.int64) * seq * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :]
    if OUT_INT8:  # round half away from zero (the cast truncates)
        tl.store(out, tl.where(y >= 0.0, y + 0.5, y - 0.5).to(tl.int8), mask=rows[:, None] < seq)
    else:
        tl.store(out, to_fp8(y, PREROUND), mask=rows[:, None] < seq)


def _launch(x, out, block, head, *, int8, scale=None, center=None, shift=None, chan=None, qmax=FP8_MAX, transpose=False,
            lens=None):
    b, h, s, d = x.shape
    n_blocks = -(-s // block)
    dummy = out  # pointers the constexprs never read
    _quant_kernel[(n_blocks, b * h)](
        x, out, scale if scale is not None else dummy, center if center is not None else dummy,
        shift if shift is not None else dummy, chan if chan is not None else dummy, lens if lens is not None else dummy,
        *x.stride(), h, s, d, n_blocks, qmax, out.shape[-1] if transpose else 0,
        BLOCK=block, HEAD_DIM=head, OUT_INT8=int8, CENTER=center is not None and shift is None,
        SHIFT=shift is not None, CHANNEL=chan is not None, TRANSPOSE=transpose, PREROUND=interpreting(), HAS_LENS=lens is not None,
    )


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: str, block_m: int, block_n: int, head: int,
             kv_len: torch.Tensor | None = None):
    """8-bit q, k, v for the block-sparse forward: (q8, k8, v8, q_scale, k_scale, v_scale, shift).

    q ``[B, H, Sq, D]``, k, v ``[B, H, Sk, D]``; ``head``: the padded head dim Dp (>= 32). The key
    mean, K's block scales and V's channel maxima are over the valid keys (``kv_len[b]``; padded
    keys quantize to 0), so padded text cannot spend the range. With ``"int8-qk"`` v8 and v_scale
    are None (V stays as it is)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got precision={precision!r}")
    b, h, sq, d = q.shape
    sk = k.shape[2]
    int8 = precision in ("int8", "int8-qk")
    pv8 = precision != "int8-qk"
    dev = q.device
    fp8 = torch.float8_e4m3fn
    if kv_len is None:
        center = k.mean(dim=2, dtype=torch.float32)  # [B, H, D]
        vmax = v.abs().amax(dim=2).float() if pv8 else None  # [B, H, D]
    else:
        valid = (torch.arange(sk, device=dev)[None, :] < kv_len.to(dev)[:, None])[:, None, :, None]  # [B, 1, Sk, 1]
        count = kv_len.to(dev, torch.float32).clamp(min=1)[:, None, None]
        center = torch.where(valid, k.float(), 0.0).sum(dim=2) / count
        vmax = torch.where(valid, v.abs(), 0).amax(dim=2).float() if pv8 else None
    pad = lambda t: torch.nn.functional.pad(t, (0, head - d)).contiguous()  # noqa: E731  [B, H, Dp]
    center = pad(center)
    vscale = pad(vmax / FP8_MAX) if pv8 else None
    qmax = INT8_MAX if int8 else FP8_MAX
    q8 = torch.empty(b, h, sq, head, device=dev, dtype=torch.int8 if int8 else fp8)
    k8 = torch.empty(b, h, sk, head, device=dev, dtype=torch.int8 if int8 else fp8)
    # V transposed, [B, H, Dp, Sk'] (Sk' = Sk rounded up to 16 for TMA's 16-byte rows): the 8-bit
    # MMA takes its second operand K-major, i.e. contiguous along the keys it sums over
    v8 = torch.zeros(b, h, head, -(-sk // 16) * 16, device=dev, dtype=fp8) if pv8 else None
    q_scale = torch.empty(b, h, -(-sq // block_m), device=dev, dtype=torch.float32)
    k_scale = torch.empty(b, h, -(-sk // block_n), device=dev, dtype=torch.float32)
    shift = torch.empty(b, h, sq, device=dev, dtype=torch.float32)
    lens = None if kv_len is None else kv_len.to(dev, torch.int32).contiguous()
    _launch(k, k8, block_n, head, int8=int8, scale=k_scale, center=center, qmax=qmax, lens=lens)
    _launch(q, q8, block_m, head, int8=int8, scale=q_scale, center=center, shift=shift, qmax=qmax)  # and shift = q . c
    if not pv8:
        return q8, k8, None, q_scale, k_scale, None, shift
    _launch(v, v8, 64, head, int8=False, chan=vscale, transpose=True, lens=lens)
    return q8, k8, v8, q_scale, k_scale, vscale, shift
