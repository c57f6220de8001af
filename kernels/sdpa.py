"""Masked-SDPA backend: expand the block description to a token mask and call torch SDPA.

Runs anywhere (the CPU path of every method). Memory is O(S^2) for the mask, so it is meant for
small sizes and for machines without a GPU kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffattn.patterns.blocks import BlockSparsity, expand_block_mask


def can_run(q: torch.Tensor, sparsity: BlockSparsity, forced: bool = False) -> tuple[bool, str]:
    return True, ""


def rule_mask(rule, q_len: int, kv_len: int, device) -> torch.Tensor:
    """[Sq, Sk] bool: the element rule of a description's partial blocks (its torch twin), or all
    True for block-level patterns."""
    if rule is None:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return rule.mask(q_idx, kv_idx)


def token_mask(sparsity: BlockSparsity, device) -> torch.Tensor:
    """[Hm, Sq, Sk] bool token mask of a description: listed blocks, and the element rule."""
    listed = expand_block_mask(sparsity.mask.to(device), sparsity.q_len, sparsity.kv_len, sparsity.block_m, sparsity.block_n)
    return listed & rule_mask(sparsity.rule, sparsity.q_len, sparsity.kv_len, device)


def sdpa_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sparsity: BlockSparsity,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v: [B, H, S, D]. kv_len: [B] valid-key prefix lengths or None. Returns [B, H, S, D]."""
    mask = token_mask(sparsity, q.device)[None]  # [1, Hm, Sq, Sk]
    if kv_len is not None:
        keys = torch.arange(k.shape[-2], device=q.device)
        mask = mask & (keys[None, :] < kv_len[:, None])[:, None, None, :]  # [B, Hm, Sq, Sk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
