"""Dense attention over one part of the keys, with its log-sum-exp, differentiable in both.

Partial results over disjoint key sets merge exactly by their log-sum-exp (``kernels.merge``); when
the merged result is trained through, the merge weights carry gradient into each part's lse. This
is the plain-torch path for rows that attend every key and are computed by parts on several ranks
(a context-parallel ring's text rows, ``pipelines.parallel``; on CUDA the block-sparse kernel,
whose backward also takes the lse gradient, runs them). Plain torch, chunked over keys (memory O(rows x chunk)), with a
FlashAttention-style backward that recomputes each chunk: with dO and dlse,
``dS = P * (dO V^T - rowsum(dO * O) + dlse)``.
"""

from __future__ import annotations

import math

import torch

CHUNK = 4096  # keys per step


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32  # fp32 accumulation (fp64 stays fp64)


def _scores(q, k, valid, scale):
    s = torch.matmul(q.to(_acc(q)), k.to(_acc(q)).transpose(-1, -2)) * scale  # [B, H, G, c]
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return s


class _Partial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid, scale):
        b, h, g, d = q.shape
        dt = _acc(q)
        m = torch.full((b, h, g), float("-inf"), device=q.device, dtype=dt)
        l = torch.zeros((b, h, g), device=q.device, dtype=dt)
        acc = torch.zeros((b, h, g, v.shape[-1]), device=q.device, dtype=dt)
        for start in range(0, k.shape[2], CHUNK):
            stop = min(start + CHUNK, k.shape[2])
            s = _scores(q, k[:, :, start:stop], None if valid is None else valid[:, start:stop], scale)
            m_new = torch.maximum(m, s.amax(-1))
            safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe[..., None])
            alpha = torch.exp(m - safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.matmul(p, v[:, :, start:stop].to(dt))
            m = m_new
        empty = l == 0
        out = torch.where(empty[..., None], torch.zeros_like(acc), acc / l.clamp_min(1e-30)[..., None])
        lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(l.clamp_min(1e-30)))
        ctx.save_for_backward(q, k, v, out, lse, *(() if valid is None else (valid,)))
        ctx.scale, ctx.has_valid = scale, valid is not None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        valid = rest[0] if ctx.has_valid else None
        dt = out.dtype
        dout = torch.zeros_like(out) if dout is None else dout.to(dt)
        dlse = torch.zeros_like(lse) if dlse is None else torch.where(torch.isneginf(lse), 0.0, dlse.to(dt))
        delta = (dout * out).sum(-1)  # [B, H, G]
        safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        dq = torch.zeros(q.shape, device=q.device, dtype=dt)
        dk, dv = torch.zeros(k.shape, device=k.device, dtype=dt), torch.zeros(v.shape, device=v.device, dtype=dt)
        for start in range(0, k.shape[2], CHUNK):
            stop = min(start + CHUNK, k.shape[2])
            kc, vc = k[:, :, start:stop].to(dt), v[:, :, start:stop].to(dt)
            s = _scores(q, k[:, :, start:stop], None if valid is None else valid[:, start:stop], ctx.scale)
            p = torch.exp(s - safe[..., None]).masked_fill(torch.isneginf(lse)[..., None], 0.0)  # [B, H, G, c]
            ds = p * (torch.matmul(dout, vc.transpose(-1, -2)) - delta[..., None] + dlse[..., None])
            dq += torch.matmul(ds, kc) * ctx.scale
            dk[:, :, start:stop] = torch.matmul(ds.transpose(-1, -2), q.to(dt)) * ctx.scale
            dv[:, :, start:stop] = torch.matmul(p.transpose(-1, -2), dout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, G, D] over k, v [B, H, N, D]; ``valid`` [B, N] bool (None: every key). Returns
    out [B, H, G, D] fp32 and lse [B, H, G] fp32 (natural log; -inf and 0 for rows with no valid
    key; fp64 for fp64 inputs), both differentiable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _Partial.apply(q, k, v, valid, scale)


def merge_parts(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """outs [P, B, H, G, D], lses [P, B, H, G] of P disjoint key parts -> out [B, H, G, D] fp32
    (differentiable; a row no part saw is 0)."""
    empty = torch.isneginf(lses).all(0)  # rows no part saw: keep their gradient finite (0)
    safe = torch.logsumexp(torch.where(empty[None], torch.zeros_like(lses), lses), dim=0)  # [B, H, G]
    weights = torch.exp(lses - safe[None]).masked_fill(torch.isneginf(lses), 0.0)  # [P, B, H, G]
    return (weights[..., None] * outs).sum(0)
