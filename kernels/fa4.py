"""FlashAttention-4 backend: block descriptions on FA4's block-sparse CuTe-DSL kernels.

Optional: it runs only where the user has ``flash-attn-4`` (``flash_attn.cute``) installed; nothing
in diffattn imports it otherwise. FA4's Hopper kernels have what Triton 3.6 cannot express there:
warp specialization (a TMA producer warp, two consumer warpgroups in ping-pong) in the forward, and
bulk dQ reductions in a one-pass backward. They take the same block lists as FlexAttention's
``BlockMask`` (FA4's ``BlockSparseTensorsTorch``): per query block the full and the "mask" key
blocks, and per key block the query blocks for the backward.

What runs here, and why not more (each limit is a ``can_run`` reason, so ``backend="auto"`` falls
through to the Triton kernel):
- block-level patterns (radial, any ``rule=None`` description): their partial blocks only mask the
  sequence tail; they go to FA4's mask list with no ``mask_mod``, where FA4 masks keys past the
  sequence end itself;
- element rules (neighborhood windows, CLEAR's circle) when forced (``backend="fa4"``): one CuTe
  ``mask_mod`` for every rule, which reads the rule's per-block bits (``kernels.triton.bits``, the
  Triton kernel's, built once per description by the same predicate) through a (query block, key
  block) -> slot map; FA4 calls it on the partial ("mask") blocks only, forward and backward. Two
  global loads per score make those blocks slow (Wan2.1-14B 3-D window on an H100: 102.9 ms forward
  and 309.1 ms backward against the Triton kernel's 65.4 and 267.4), so ``auto`` leaves rules to
  the Triton kernel;
- 128 x 128 blocks: FA4's Hopper backward tiles keys by 128 and needs the sparse key block to equal
  its tile (query blocks of 128 split into two 64-row tiles); radial uses 128 on Wan2.1 and
  HunyuanVideo;
- Hopper (compute capability 9.x), head dim 64, 96 or 128, bf16 / fp16: the only GPU and tiles
  tested here (benchmarks/RESULTS.md). Blackwell has its own FA4 kernels with other tile
  rules; they are not enabled because they were not run;
- per-batch key lengths (padded text keys, ``kv_len``) in inference only: they run through FA4's
  varlen forward (``seqused_k``) with each batch's lists cut at its length; FA4's varlen backward
  ignores block-sparse tensors (it would return dense gradients), so with gradients on, padded
  calls are refused;
- inputs' precision only (the 8-bit forward is the Triton kernel's);
- eager only: FA4 is an ``autograd.Function``, not a ``torch.library`` custom op, so under
  ``torch.compile`` the Triton kernel (a custom op) runs instead;
- FA4's block-sparse backward on Hopper adds dQ atomically, not bit-deterministic run to run: with
  ``torch.use_deterministic_algorithms(True)`` training calls go to the Triton split backward.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Callable, Hashable

import torch

from diffattn.patterns.blocks import BlockSparsity

BLOCK = 128  # the sparse block both ways (FA4's Hopper backward key tile)
HEAD_DIMS = (64, 96, 128)  # FA4's sm90 tile classes for D <= 64, <= 96, <= 128: the ones tested on the GPU
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
            padded: bool = False, grad: bool | None = None) -> tuple[bool, str]:
    """Whether FA4 can run ``q`` with ``sparsity``, and why not: the description and input checks
    first (they need no GPU), then the device, then the import. ``grad``: whether the call needs
    gradients (of q, k or v; default: q's)."""
    grad = (torch.is_grad_enabled() and q.requires_grad) if grad is None else grad
    if precision is not None:
        return False, f"fa4 runs at the inputs' precision; precision={precision!r} runs on the triton backend"
    if sparsity.rule is not None and not forced:
        return False, ("fa4 runs element rules (bits read per score in its mask_mod) slower than the triton kernel "
                       "(Wan2.1-14B 3-D window: 102.9 against 65.4 ms forward, H100); backend='fa4' forces it")
    if (sparsity.block_m, sparsity.block_n) != (BLOCK, BLOCK):
        return False, (f"fa4 needs {BLOCK} x {BLOCK} blocks (its Hopper backward's key tile), got "
                       f"{sparsity.block_m} x {sparsity.block_n}: block_size=128, or backend='triton'")
    if padded and grad:
        return False, ("fa4 runs per-batch key lengths (padded text keys) forward only: FA4's varlen backward has "
                       "no block sparsity; the triton backend trains them")
    if grad and torch.are_deterministic_algorithms_enabled():
        return False, ("fa4's block-sparse backward adds dQ atomically (not deterministic) and deterministic "
                       "algorithms are on: the triton backend's split backward is deterministic")
    if torch.compiler.is_compiling():
        return False, "fa4 is not traced by torch.compile here (FA4 is no custom op): the triton backend is"
    if q.dtype not in DTYPES:
        return False, f"fa4 needs bf16 or fp16 inputs, got {q.dtype}: cast the model, or use backend='triton'"
    if q.shape[-1] not in HEAD_DIMS:
        return False, (f"fa4 is enabled for head_dim in {HEAD_DIMS} (the tiles its GPU tests ran), got "
                       f"{q.shape[-1]}: use backend='triton'")
    if not q.is_cuda:
        return False, "fa4 runs on CUDA only: on CPU use backend='sdpa' (or 'auto')"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return False, (f"fa4 is enabled on Hopper (compute capability 9.x) only, the GPU it was measured on; "
                       f"{torch.cuda.get_device_name(q.device)} is {major}.{minor}: use backend='triton'")
    return installed()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparsity: BlockSparsity) -> None:
    """The Triton kernel's input checks (FA4 would run a mismatch silently: GQA, another length)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fa4: expected q [B, H, Sq, D] and k, v [B, H, Sk, D], got q={tuple(q.shape)}, "
                         f"k={tuple(k.shape)}, v={tuple(v.shape)}")
    if sparsity.heads not in (1, q.shape[1]):
        raise ValueError(f"fa4: block lists have {sparsity.heads} heads, expected 1 or {q.shape[1]}")
    if (q.shape[2], k.shape[2]) != (sparsity.q_len, sparsity.kv_len):
        raise ValueError(f"fa4: q/k lengths {(q.shape[2], k.shape[2])} do not match the description's "
                         f"{(sparsity.q_len, sparsity.kv_len)}; rebuild it for this layout")


def block_lists(sparsity: BlockSparsity) -> dict[str, torch.Tensor]:
    """FA4's block-sparse tensors of a description, batch axis of 1 (FA4 broadcasts it): forward
    ``mask_*`` = our partial blocks (the element rule's, or the sequence tail), ``full_*`` = our full
    blocks, [1, Hm, nq] counts and [1, Hm, nq, w] ascending indices; ``bwd_*`` the same per key
    block over query blocks. Plain tensors, so that this runs (and is tested) without FA4."""
    s = sparsity
    lists = {
        "mask_cnt": s.part_num, "mask_idx": s.part_idx, "full_cnt": s.full_num, "full_idx": s.full_idx,
        "bwd_mask_cnt": s.q_part_num, "bwd_mask_idx": s.q_part_idx,
        "bwd_full_cnt": s.q_full_num, "bwd_full_idx": s.q_full_idx,
    }
    return {name: t[None].to(torch.int32).contiguous() for name, t in lists.items()}


def partial_slots(sparsity: BlockSparsity) -> torch.Tensor:
    """[Hm * nq * nk] int32: for each listed partial (query block, key block) pair its position in
    the query block's partial list, the index of its words in the element bits (0 elsewhere, never
    read: FA4 calls the mask only on listed partial blocks)."""
    s = sparsity
    hm, nq, width = s.part_idx.shape
    nk = s.q_part_num.shape[1]
    listed = torch.arange(width, device=s.part_idx.device) < s.part_num[..., None]  # [Hm, nq, P]
    head, qb, j = listed.nonzero(as_tuple=True)
    slots = torch.zeros(hm, nq, nk, dtype=torch.int32, device=s.part_idx.device)
    slots[head, qb, s.part_idx[head, qb, j].long()] = j.to(torch.int32)
    return slots.flatten()


def slot_index(row, kv, nk: int):
    """Where the slot of (query block row ``row`` = head * nq + q // 128, key ``kv``) is in the flat
    slots. Plain arithmetic: the mask_mod traces it on Int32, the CPU test runs it on tensors."""
    return row * nk + kv // BLOCK


def word_index(row, slot, q, kv, width: int, words: int):
    """Where the word holding score (q, kv) is in the flat bits ``[Hm, nq, P, 128, W]``."""
    return ((row * width + slot) * BLOCK + q % BLOCK) * words + (kv % BLOCK) // 32


def bits_mask_mod(heads: int, nq: int, nk: int, width: int, words: int):
    """The CuTe ``mask_mod`` of every element rule: score (q, kv) is kept when bit ``kv % 32`` of
    word ``(kv % 128) // 32`` of row ``q % 128`` of the pair's slot in the bits is set. Layout as
    ``kernels.triton.bits`` (``[Hm, nq, P, 128, W]``, flattened); ``heads`` = Hm (1: shared lists).
    The shape constants are captured: FA4 compiles one kernel per distinct set."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    per_head = heads > 1

    @cute.jit
    def rule_bits(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        slots, bits = aux_tensors[0], aux_tensors[1]  # [Hm * nq * nk], [Hm * nq * P * 128 * W] int32
        q = q_idx[0]
        kv = kv_idx[0]
        row = q // BLOCK
        if cutlass.const_expr(per_head):
            row = head[0] * nq + row
        slot = slots[slot_index(row, kv, nk)]
        bit = (bits[word_index(row, slot, q, kv, width, words)] >> (kv % 32)) & 1
        return utils.scalar_to_ssa(bit, cutlass.Int32) == utils.scalar_to_ssa(1, cutlass.Int32)

    return rule_bits


def rule_tensors(sparsity: BlockSparsity, bits=None) -> list[torch.Tensor]:
    """The mask_mod's aux tensors of an element-rule description: [flat slots, flat bits] (``bits``:
    the Triton backend's ``ElementBits`` to share, else built here)."""
    from .triton.bits import element_bits

    bits = element_bits(sparsity) if bits is None else bits
    return [partial_slots(sparsity), bits.bits.flatten()]


def mask_constants(sparsity: BlockSparsity) -> dict[str, int]:
    """The shape constants ``bits_mask_mod`` captures: heads = Hm of the lists (1: shared), nq, nk,
    width = P (the partial lists' width), words = W. Raises ValueError where the flat bits would
    outgrow the mask_mod's Int32 addressing."""
    hm, nq, width = sparsity.part_idx.shape
    words = -(-sparsity.block_n // 32)
    if hm * nq * width * BLOCK * words >= 2**31:
        raise ValueError(f"fa4: the element bits of this description ({hm * nq * width * BLOCK * words} words) exceed "
                         "the mask_mod's 32-bit addressing; use backend='triton'")
    return {"heads": hm, "nq": nq, "nk": sparsity.num_kv_blocks, "width": width, "words": words}


def prepare(sparsity: BlockSparsity, bits=None) -> dict[str, Any]:
    """Everything a call needs, built once per description on its device: the lists, and for an
    element rule the aux tensors (``rule_tensors``) and the ``mask_mod`` (needs FA4 installed)."""
    prepared: dict[str, Any] = dict(block_lists(sparsity))
    if sparsity.rule is not None:
        constants = mask_constants(sparsity)
        prepared["aux"] = rule_tensors(sparsity, bits)
        prepared["mask_mod"] = bits_mask_mod(**constants)
    return prepared


def padded_lists(lists: dict[str, torch.Tensor], kv_len: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward lists of each batch cut at its key length ``kv_len`` [B]: a key block starting at
    or past ``kv_len[b]`` leaves both lists. Lists are ascending, so the kept entries are a prefix
    and only the counts change ([B, Hm, nq]; the indices keep their batch axis of 1). The block
    holding ``kv_len[b]`` is then the highest of its list, the one FA4 masks at the sequence end
    (``seqused_k``). No host sync: this runs per call."""
    kv = kv_len.to(torch.int64).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    out = {}
    for kind in ("mask", "full"):
        idx, cnt = lists[f"{kind}_idx"], lists[f"{kind}_cnt"]  # [1, Hm, nq, w], [1, Hm, nq]
        slot = torch.arange(idx.shape[-1], device=idx.device)
        keep = (slot < cnt[..., None]) & (idx.to(torch.int64) * BLOCK < kv)  # [B, Hm, nq, w]
        out[f"{kind}_cnt"] = keep.sum(-1, dtype=torch.int32).contiguous()
        out[f"{kind}_idx"] = idx  # batch 1: FA4 broadcasts it against the [B, ...] counts
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: dict[str, Any],
              scale: float | None = None, kv_len: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [B, H, S, D] (any strides with a contiguous last axis); ``lists`` from ``prepare``
    (or ``block_lists`` for a block-level description) on q's device; ``kv_len`` [B]: keys at or
    past it are ignored (inference only). Returns [B, H, S, D]; differentiable through FA4's
    backward when ``kv_len`` is None."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # FA4 takes [B, S, H, D]: views, no copy
    rule = {"mask_mod": lists["mask_mod"], "aux_tensors": lists["aux"]} if "mask_mod" in lists else {}
    if kv_len is not None:
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise NotImplementedError("fa4: per-batch key lengths run forward only (FA4's varlen backward has no "
                                      "block sparsity); use backend='triton' to train them")
        kv_len = kv_len.to(q.device)
        cut = padded_lists(lists, kv_len)
        fwd = BlockSparseTensorsTorch(cut["mask_cnt"], cut["mask_idx"], cut["full_cnt"], cut["full_idx"],
                                      block_size=(BLOCK, BLOCK))
        out, _ = flash_attn_varlen_func(qt, kt, vt, seqused_k=kv_len.to(torch.int32).contiguous(),
                                        softmax_scale=scale, block_sparse_tensors=fwd, **rule)
        return out.transpose(1, 2)  # [B, H, S, D]
    fwd = BlockSparseTensorsTorch(lists["mask_cnt"], lists["mask_idx"], lists["full_cnt"], lists["full_idx"],
                                  block_size=(BLOCK, BLOCK))
    bwd = BlockSparseTensorsTorch(lists["bwd_mask_cnt"], lists["bwd_mask_idx"], lists["bwd_full_cnt"],
                                  lists["bwd_full_idx"], block_size=(BLOCK, BLOCK))
    out, _ = flash_attn_func(qt, kt, vt, softmax_scale=scale, block_sparse_tensors=fwd, block_sparse_tensors_bwd=bwd,
                             **rule)
    return out.transpose(1, 2)  # [B, H, S, D]


def run(q, k, v, sparsity: BlockSparsity, *, cache: Callable[[Hashable, Callable[[], Any]], Any] | None = None,
        key: Hashable = None, scale: float | None = None, kv_len: torch.Tensor | None = None) -> torch.Tensor:
    """One call: lists, slots and bits are built once per (description key, device) on the handle's
    cache, the bits shared with the Triton backend's entry (the per-batch cut of ``kv_len`` per call)."""
    check_inputs(q, k, v, sparsity)
    sparsity = sparsity.to(q.device)
    if cache is None or key is None:
        return attention(q, k, v, prepare(sparsity), scale=scale, kv_len=kv_len)
    bits = None
    if sparsity.rule is not None:
        from .triton.bits import element_bits

        bits = cache(("bits", key, str(q.device)), lambda: element_bits(sparsity))
    lists = cache(("fa4", key, str(q.device)), lambda: prepare(sparsity, bits))
    return attention(q, k, v, lists, scale=scale, kv_len=kv_len)
