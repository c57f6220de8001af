"""Reference twin of every attention kernel: dense masked softmax in fp32, plain torch.

Slow and O(S^2) in memory: for tests and small sizes only.
"""

from __future__ import annotations

import math

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention in ``compute_dtype``.

    q: [B, H, Sq, D]; k, v: [B, H, Sk, D]
    mask: bool, broadcastable to [B, H, Sq, Sk]; True = attend. None = dense.
    kv_len: [B] int, keys at positions >= kv_len[b] are ignored (padded text).
    Returns (out [B, H, Sq, D] in compute_dtype, lse [B, H, Sq] natural-log log-sum-exp).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale  # [B, H, Sq, Sk]
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask.to(scores.device)
    if kv_len is not None:
        keys = torch.arange(k.shape[-2], device=scores.device)
        allowed = allowed & (keys[None, :] < kv_len.to(scores.device)[:, None])[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    probs = torch.exp(scores - lse[..., None])
    return torch.einsum("bhqk,bhkd->bhqd", probs, vf), lse


def quantized_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: str,
    block_m: int,
    block_n: int,
    mask: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of the 8-bit forward (``kernels.triton.quant``): the same quantized Q, K (per block of
    ``block_m`` / ``block_n`` rows, K smoothed by its mean over the valid keys) and V (fp8 per
    channel), dequantized, scores and softmax in float64, P rounded to fp8 against its row's maximum
    (``"int8-qk"``: V as it is and P rounded to V's dtype).
    Differs from the kernel only in that the kernel rounds P against the running maximum of its
    online softmax. Returns (out [B, H, Sq, D] fp32, lse [B, H, Sq]).
    """
    int8 = precision in ("int8", "int8-qk")
    qmax = 127.0 if int8 else 448.0
    sk = k.shape[-2]
    if kv_len is None:
        valid = torch.ones(k.shape[0], 1, sk, 1, dtype=torch.bool, device=k.device)
    else:
        valid = (torch.arange(sk, device=k.device)[None, :] < kv_len.to(k.device)[:, None])[:, None, :, None]
    count = valid.sum(dim=2).clamp(min=1).double()  # [B, 1, 1]
    center = torch.where(valid, k.double(), 0.0).sum(dim=2, keepdim=True) / count[..., None]  # [B, H, 1, D]

    def blocks(x: torch.Tensor, block: int) -> torch.Tensor:  # per-block symmetric quantization, dequantized
        s = x.shape[-2]
        pad = -s % block
        xb = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).unflatten(-2, (-1, block))  # [B, H, n, block, D]
        sc = xb.abs().amax(dim=(-2, -1), keepdim=True) / qmax
        y = xb / torch.where(sc > 0, sc, 1.0)
        y = torch.sign(y) * torch.floor(y.abs() + 0.5) if int8 else y.to(torch.float8_e4m3fn).float()
        return (y.double() * sc.double()).flatten(-3, -2)[..., :s, :]

    qd = blocks(q, block_m)
    kd = blocks(torch.where(valid, k.double() - center, 0.0).float(), block_n)  # padded keys: 0, in no block's scale
    if precision == "int8-qk":  # v as it is
        vd = torch.where(valid, v.double(), 0.0)
    else:
        vs = torch.where(valid, v.abs().float(), 0.0).amax(dim=2, keepdim=True) / 448.0  # [B, H, 1, D]
        vd = (torch.where(valid, v.float(), 0.0) / torch.where(vs > 0, vs, 1.0)).to(torch.float8_e4m3fn).double() * vs.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (qd @ kd.transpose(-1, -2)) * scale  # [B, H, Sq, Sk] float64
    allowed = valid.transpose(-1, -2)  # [B, 1, 1, Sk]
    if mask is not None:
        allowed = allowed & mask.to(scores.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True).clamp(min=-1e300)  # rows with no key: p = 0
    p = torch.exp(scores - m)  # [B, H, Sq, Sk], row max 1
    lse = (m + torch.log(p.sum(-1, keepdim=True))).squeeze(-1)
    if precision == "int8-qk":  # the kernel's P in v's dtype
        pv = p.to(v.dtype).double()
    else:  # the kernel's fp8 P (against the row max)
        pv = (p * 448.0).float().to(torch.float8_e4m3fn).double() / 448.0
    out = (pv @ vd) / p.sum(-1, keepdim=True).clamp(min=1e-300)
    lse = lse + scale * (q.double() @ center.transpose(-1, -2)).squeeze(-1)  # the smoothing's shift, added back
    return out.float(), lse.float()
