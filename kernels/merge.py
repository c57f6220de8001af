"""Exact merge of two partial attention results over disjoint key sets, by their log-sum-exp.

If o_a = softmax(s_a) v_a over keys A and o_b over keys B (A and B disjoint), then attention over
A u B is  o = w_a o_a + w_b o_b  with  w_x = exp(lse_x - lse),  lse = logaddexp(lse_a, lse_b).
Rows that saw no key in one part carry lse = -inf there and get weight 0.
"""

from __future__ import annotations

import torch


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """out_*: [B, H, S, D]; lse_*: [B, H, S] (natural log). Returns (out in out_a's dtype, lse fp32)."""
    lse_a32, lse_b32 = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a32, lse_b32)  # [B, H, S]
    # -inf - -inf is nan: a row empty in both parts has no defined output; keep it 0.
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a32 - safe)[..., None]
    w_b = torch.exp(lse_b32 - safe)[..., None]
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse
