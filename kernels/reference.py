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
