"""FlashAttention-4 backend: block-level descriptions on FA4's block-sparse CuTe-DSL kernels.

Optional: it runs only where the user has ``flash-attn-4`` (``flash_attn.cute``) installed; nothing
in diffattn imports it otherwise. FA4's Hopper kernels have what Triton 3.6 cannot express there:
warp specialization (a TMA producer warp, two consumer warpgroups in ping-pong) in the forward, and
bulk dQ reductions in a one-pass backward. They take the same block lists as FlexAttention's
``BlockMask`` (FA4's ``BlockSparseTensorsTorch``): per query block the full and the "mask" key
blocks, and per key block the query blocks for the backward.

What runs here, and why not more (each limit is a ``can_run`` reason, so ``backend="auto"`` falls
through to the Triton kernel):
- block-level patterns only (radial, any ``rule=None`` description). Partial blocks of a block-level
  pattern only mask the sequence tail; they go to FA4's mask list with no ``mask_mod``, where FA4
  masks keys past the sequence end itself. Element rules (neighborhood windows, CLEAR's circle)
  would need a CuTe ``mask_mod`` per rule, which diffattn does not have;
- 128 x 128 blocks: FA4's Hopper backward tiles keys by 128 and needs the sparse key block to equal
  its tile (query blocks of 128 split into two 64-row tiles); radial uses 128 on Wan2.1 and
  HunyuanVideo;
- Hopper (compute capability 9.x), head dim <= 128 (a multiple of 8), bf16 / fp16: the only GPU and
  tiles measured here (benchmarks/RESULTS.md). Blackwell has its own FA4 kernels with other tile
  rules; they are not enabled because they were not run;
- per-batch key lengths (padded text keys, ``kv_len``) in inference only: they run through FA4's
  varlen forward (``seqused_k``) with each batch's lists cut at its length; FA4's varlen backward
  ignores block-sparse tensors (it would return dense gradients), so with gradients on, padded
  calls are refused;
- inputs' precision only (the 8-bit forward is the Triton kernel's).
FA4's block-sparse backward on Hopper adds dQ atomically: not bit-deterministic run to run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Callable, Hashable

import torch

from diffattn.patterns.blocks import BlockSparsity

BLOCK = 128  # the sparse block both ways (FA4's Hopper backward key tile)
MAX_HEAD_DIM = 128
DTYPES = (torch.bfloat16, torch.float16)
INSTALL = "pip install flash-attn-4 (it brings nvidia-cutlass-dsl; CUDA 12.9+ driver)"


def _present() -> bool:
    # whether flash_attn/cute exists on the path, without importing anything (flash-attn 2's
    # flash_attn has no cute/; importing flash_attn.cute pulls in cutlass, about a second)
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        return False
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(os.path.isfile(os.path.join(p, "cute", "interface.py")) for p in places)


PRESENT = _present()  # read once at import, like block_sparse.HAS_TRITON: choose() runs per call


def installed() -> tuple[bool, str]:
    """(True, "") when FA4's CuTe interface imports, else (False, why)."""
    if not PRESENT:
        return False, f"flash-attn-4 is not installed; {INSTALL}"
    return _imports()


@functools.cache  # the import is tried once per process: a broken install must not be retried per call
def _imports() -> tuple[bool, str]:
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken cutlass / CUDA install raising at import
        return False, f"flash-attn-4 does not import ({type(exc).__name__}: {str(exc)[:160]}); {INSTALL}"
    return True, ""


def can_run(q: torch.Tensor, sparsity: BlockSparsity, forced: bool = False, precision: str | None = None,
            padded: bool = False) -> tuple[bool, str]:
    """Whether FA4 can run ``q`` with ``sparsity``, and why not: the description and input checks
    first (they need no GPU), then the device, then the import."""
    if precision is not None:
        return False, f"fa4 runs at the inputs' precision; precision={precision!r} runs on the triton backend"
    if sparsity.rule is not None:
        return False, (f"fa4 runs block-level patterns only; this description's partial blocks need the "
                       f"{sparsity.rule.kind!r} element rule (the triton and flex backends run it)")
    if (sparsity.block_m, sparsity.block_n) != (BLOCK, BLOCK):
        return False, (f"fa4 needs {BLOCK} x {BLOCK} blocks (its Hopper backward's key tile), got "
                       f"{sparsity.block_m} x {sparsity.block_n}: block_size=128, or backend='triton'")
    if padded and torch.is_grad_enabled() and q.requires_grad:
        return False, ("fa4 runs per-batch key lengths (padded text keys) forward only: FA4's varlen backward has "
                       "no block sparsity; the triton backend trains them")
    if q.dtype not in DTYPES:
        return False, f"fa4 needs bf16 or fp16 inputs, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] % 8:
        return False, f"fa4 here needs head_dim <= {MAX_HEAD_DIM} and a multiple of 8, got {q.shape[-1]}"
    if not q.is_cuda:
        return False, "fa4 runs on CUDA only"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return False, (f"fa4 is enabled on Hopper (compute capability 9.x) only, the GPU it was measured on; "
                       f"{torch.cuda.get_device_name(q.device)} is {major}.{minor}: use backend='triton'")
    return installed()


def block_lists(sparsity: BlockSparsity) -> dict[str, torch.Tensor]:
    """FA4's block-sparse tensors of a block-level description, batch axis of 1 (FA4 broadcasts it):
    forward ``mask_*`` = our partial blocks (the sequence tail only: FA4 masks it), ``full_*`` = our
    full blocks, [1, Hm, nq] counts and [1, Hm, nq, w] ascending indices; ``bwd_*`` the same per key
    block over query blocks. Plain tensors, so that this runs (and is tested) without FA4."""
    s = sparsity
    lists = {
        "mask_cnt": s.part_num, "mask_idx": s.part_idx, "full_cnt": s.full_num, "full_idx": s.full_idx,
        "bwd_mask_cnt": s.q_part_num, "bwd_mask_idx": s.q_part_idx, "bwd_full_cnt": s.q_full_num, "bwd_full_idx": s.q_full_idx,
    }
    return {name: t[None].to(torch.int32).contiguous() for name, t in lists.items()}


def padded_lists(lists: dict[str, torch.Tensor], kv_len: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward lists of each batch cut at its key length ``kv_len`` [B]: a key block starting at
    or past ``kv_len[b]`` leaves both lists. Lists are ascending, so the kept entries are a prefix
    and only the counts change ([B, Hm, nq]; indices expanded to [B, Hm, nq, w]). The block holding
    ``kv_len[b]`` is then the highest of its list, the one FA4 masks at the sequence end
    (``seqused_k``). No host sync: this runs per call."""
    kv = kv_len.to(torch.int64).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    out = {}
    for kind in ("mask", "full"):
        idx, cnt = lists[f"{kind}_idx"], lists[f"{kind}_cnt"]  # [1, Hm, nq, w], [1, Hm, nq]
        slot = torch.arange(idx.shape[-1], device=idx.device)
        keep = (slot < cnt[..., None]) & (idx.to(torch.int64) * BLOCK < kv)  # [B, Hm, nq, w]
        out[f"{kind}_cnt"] = keep.sum(-1, dtype=torch.int32).contiguous()
        out[f"{kind}_idx"] = idx.expand(kv.shape[0], -1, -1, -1).contiguous()
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: dict[str, torch.Tensor],
              scale: float | None = None, kv_len: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [B, H, S, D] (any strides with a contiguous last axis); ``lists`` from
    ``block_lists`` on q's device; ``kv_len`` [B]: keys at or past it are ignored (inference only).
    Returns [B, H, S, D]; differentiable through FA4's backward when ``kv_len`` is None."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # FA4 takes [B, S, H, D]: views, no copy
    if kv_len is not None:
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise NotImplementedError("fa4: per-batch key lengths run forward only (FA4's varlen backward has no "
                                      "block sparsity); use backend='triton' to train them")
        cut = padded_lists(lists, kv_len)
        fwd = BlockSparseTensorsTorch(cut["mask_cnt"], cut["mask_idx"], cut["full_cnt"], cut["full_idx"],
                                      block_size=(BLOCK, BLOCK))
        out, _ = flash_attn_varlen_func(qt, kt, vt, seqused_k=kv_len.to(torch.int32).contiguous(),
                                        softmax_scale=scale, block_sparse_tensors=fwd)
        return out.transpose(1, 2)  # [B, H, S, D]
    fwd = BlockSparseTensorsTorch(lists["mask_cnt"], lists["mask_idx"], lists["full_cnt"], lists["full_idx"],
                                  block_size=(BLOCK, BLOCK))
    bwd = BlockSparseTensorsTorch(lists["bwd_mask_cnt"], lists["bwd_mask_idx"], lists["bwd_full_cnt"],
                                  lists["bwd_full_idx"], block_size=(BLOCK, BLOCK))
    out, _ = flash_attn_func(qt, kt, vt, softmax_scale=scale, block_sparse_tensors=fwd, block_sparse_tensors_bwd=bwd)
    return out.transpose(1, 2)  # [B, H, S, D]


def run(q, k, v, sparsity: BlockSparsity, *, cache: Callable[[Hashable, Callable[[], Any]], Any] | None = None,
        key: Hashable = None, scale: float | None = None, kv_len: torch.Tensor | None = None) -> torch.Tensor:
    """One call: the lists are built once per (description key, device) on the handle's cache (the
    per-batch cut of ``kv_len`` per call)."""
    build = lambda: block_lists(sparsity.to(q.device))  # noqa: E731
    lists = cache(("fa4", key, str(q.device)), build) if cache is not None and key is not None else build()
    return attention(q, k, v, lists, scale=scale, kv_len=kv_len)
