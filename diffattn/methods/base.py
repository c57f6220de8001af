"""What every method shares: backend selection that explains itself, and config checks.

Backends, in the order ``backend="auto"`` tries them:
- ``triton``: diffattn's block-sparse flash attention (``diffattn.kernels.block_sparse``), CUDA
  (or any device under ``TRITON_INTERPRET=1`` when forced);
- ``flex``: compiled FlexAttention with a BlockMask (CUDA);
- ``sdpa``: torch SDPA with the token mask expanded from the blocks (anywhere; O(S^2) memory).
A backend that cannot run says why (``can_run``); a forced backend raises that reason, an automatic
choice logs the fallback once per handle.
"""

from __future__ import annotations

import torch

from diffattn.core.context import AttnContext
from diffattn.kernels import block_sparse, flex, sdpa
from diffattn.patterns.blocks import BlockSparsity

BACKENDS = ("auto", "triton", "flex", "sdpa")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    return backend


def check_int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
    return value


def run_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sparsity: BlockSparsity,
    ctx: AttnContext,
    backend: str,
    cache_key: tuple,
    text_key_start: int | None = None,
) -> torch.Tensor:
    """Attention of q, k, v ``[B, H, S, D]`` restricted to ``sparsity`` on the chosen backend."""
    candidates = ("triton", "flex", "sdpa") if backend == "auto" else (backend,)
    reasons = []
    for name in candidates:
        if name == "triton":
            ok, why = block_sparse.can_run(q, sparsity, forced=backend == "triton")
        elif name == "flex":
            ok, why = flex.can_run(q, sparsity)
        else:
            ok, why = sdpa.can_run(q, sparsity)
        if not ok:
            if backend != "auto":
                raise NotImplementedError(f"backend={backend!r} cannot run here: {why}")
            reasons.append(f"{name}: {why}")
            continue
        if reasons:
            ctx.note(f"diffattn: using backend {name!r} ({'; '.join(reasons)})")
        if name == "triton":
            return block_sparse.block_sparse_attention(q, k, v, sparsity.to(q.device), kv_len=ctx.kv_len)
        if name == "flex":
            runner = ctx.cache(
                cache_key + ("flex", q.device, text_key_start),
                lambda: flex.FlexBackend(sparsity, q.device, text_key_start=text_key_start),
            )
            return runner(q, k, v, kv_len=ctx.kv_len)
        return sdpa.sdpa_block_sparse(q, k, v, sparsity.to(q.device), kv_len=ctx.kv_len)
    raise NotImplementedError("no attention backend can run this call: " + "; ".join(reasons))
