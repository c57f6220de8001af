"""Masked-SDPA backend: expand the block description to a token mask and call torch SDPA.

Runs anywhere (the CPU path of every method). Memory is O(S^2) for the mask, so it is meant for
small sizes and for machines without a GPU kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffattn.patterns.blocks import BlockSparsity, Predicate, expand_block_mask
from diffattn.patterns.neighborhood import window


def can_run(q: torch.Tensor, sparsity: BlockSparsity) -> tuple[bool, str]:
    return True, ""


def predicate_mask(predicate: Predicate, q_len: int, kv_len: int, device) -> torch.Tensor:
    """[Sq, Sk] bool: the element rule of a description's partial blocks (torch twin of the
    kernel's ``_predicate``, from the same parameters)."""
    if predicate.kind == "none":
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    v0, n, nf, ny, nx = predicate.params[:5]

    def coords(length):
        rel = torch.arange(length, device=device) - v0
        video = (rel >= 0) & (rel < n)
        rel = rel.clamp(0, n - 1)
        return video, rel // (ny * nx), (rel % (ny * nx)) // nx, rel % nx

    vq, fq, yq, xq = coords(q_len)
    vk, fk, yk, xk = coords(kv_len)
    if predicate.kind == "neighborhood":
        k, st, d, c = (predicate.params[5 + 3 * i: 8 + 3 * i] for i in range(4))
        ok = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        for dim, (cq, ck, length) in enumerate(((fq, fk, nf), (yq, yk, ny), (xq, xk, nx))):
            group, lo, hi = window(cq, length, k[dim], st[dim], d[dim], bool(c[dim]))
            wk = ck // d[dim]
            ok &= (ck[None, :] % d[dim] == group[:, None]) & (wk[None, :] >= lo[:, None]) & (wk[None, :] <= hi[:, None])
    else:  # circle
        r2 = predicate.params[5]
        ok = (fq[:, None] == fk[None, :]) & ((yq[:, None] - yk[None, :]) ** 2 + (xq[:, None] - xk[None, :]) ** 2 < r2)
    return ok | ~vq[:, None] | ~vk[None, :]


def token_mask(sparsity: BlockSparsity, device) -> torch.Tensor:
    """[Hm, Sq, Sk] bool token mask of a description: listed blocks, and the element rule."""
    listed = expand_block_mask(sparsity.mask.to(device), sparsity.q_len, sparsity.kv_len, sparsity.block_m, sparsity.block_n)
    return listed & predicate_mask(sparsity.predicate, sparsity.q_len, sparsity.kv_len, device)


def sdpa_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sparsity: BlockSparsity,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v: [B, H, S, D]. kv_len: [B] valid-key prefix lengths or None. Returns [B, H, S, D]."""
    ok, reason = can_run(q, sparsity)
    if not ok:
        raise NotImplementedError(reason)
    mask = token_mask(sparsity, q.device)[None]  # [1, Hm, Sq, Sk]
    if kv_len is not None:
        keys = torch.arange(k.shape[-2], device=q.device)
        mask = mask & (keys[None, :] < kv_len[:, None])[:, None, None, :]  # [B, Hm, Sq, Sk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
