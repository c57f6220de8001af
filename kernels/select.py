"""Backends for block descriptions, and the chooser. Choosing is kept apart from running.

Backends, in the order ``backend="auto"`` tries them:
- ``fa4``: FlashAttention-4's block-sparse CuTe-DSL kernels (``kernels.fa4``), only where the user
  has ``flash-attn-4`` installed, on Hopper, block-level patterns with 128 x 128 blocks (element
  rules run there only when forced: slower than triton). Its refusals under auto are not reasons
  (they describe the GPU, package or description, not a fallback);
- ``triton``: diffattn's block-sparse flash attention (``kernels.block_sparse``), CUDA (or any
  device under ``TRITON_INTERPRET=1`` when forced);
- ``flex``: compiled FlexAttention with a BlockMask, element rules as its ``mask_mod`` (CUDA);
- ``sdpa``: torch SDPA with the token mask expanded from the description (anywhere; O(S^2) memory).
Each backend's ``can_run`` returns (False, reason) when it cannot run a call; ``choose`` raises the
reason when the user forced that backend, and otherwise returns the first that can, with the
reasons the earlier ones gave (the caller logs them once and puts them in the handle's report).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

from diffattn.patterns.blocks import BlockSparsity

from . import block_sparse, fa4, flex, sdpa

BACKENDS = ("auto", "fa4", "triton", "flex", "sdpa")


def _full_precision_only(name: str, precision: str | None) -> tuple[bool, str]:
    if precision is None:
        return True, ""
    return False, f"{name} runs at the inputs' precision; precision={precision!r} runs on the triton backend (CUDA, compute capability >= 8.9)"


class Fa4Backend:
    name = "fa4"

    def can_run(self, q, sparsity, forced=False, precision=None, padded=False, grad=None):
        return fa4.can_run(q, sparsity, forced=forced, precision=precision, padded=padded, grad=grad)

    def run(self, q, k, v, sparsity, *, kv_len=None, cache=None, key=None, text_key_start=None, precision=None):
        return fa4.run(q, k, v, sparsity, cache=cache, key=key, kv_len=kv_len)


class TritonBackend:
    name = "triton"

    def can_run(self, q, sparsity, forced=False, precision=None, padded=False, grad=None):
        return block_sparse.can_run(q, sparsity, forced=forced, precision=precision)

    def run(self, q, k, v, sparsity, *, kv_len=None, cache=None, key=None, text_key_start=None, precision=None):
        sparsity = sparsity.to(q.device)
        bits = None  # without a cache key the kernel builds them for this call
        if sparsity.rule is not None and cache is not None and key is not None:
            # the element rule's per-block bits, built once per description on the handle's cache
            bits = cache(("bits", key, str(q.device)), lambda: block_sparse.element_bits(sparsity))
        return block_sparse.block_sparse_attention(q, k, v, sparsity, kv_len=kv_len, bits=bits, precision=precision)


class FlexAttentionBackend:
    name = "flex"

    def can_run(self, q, sparsity, forced=False, precision=None, padded=False, grad=None):
        ok, why = _full_precision_only(self.name, precision)
        return flex.can_run(q, sparsity, forced=forced) if ok else (ok, why)

    def run(self, q, k, v, sparsity, *, kv_len=None, cache: Callable[[Hashable, Callable[[], Any]], Any] | None = None,
            key: Hashable = None, text_key_start=None, precision=None):
        # one compiled runner per (description key, device, padding), on the handle's cache
        key = ("flex", key if key is not None else id(sparsity), str(q.device), text_key_start)
        build = lambda: flex.FlexBackend(sparsity, q.device, text_key_start=text_key_start)  # noqa: E731
        runner = cache(key, build) if cache is not None else build()
        return runner(q, k, v, kv_len=kv_len)


class SdpaBackend:
    name = "sdpa"

    def can_run(self, q, sparsity, forced=False, precision=None, padded=False, grad=None):
        ok, why = _full_precision_only(self.name, precision)
        return sdpa.can_run(q, sparsity, forced=forced) if ok else (ok, why)

    def run(self, q, k, v, sparsity, *, kv_len=None, cache=None, key=None, text_key_start=None, precision=None):
        return sdpa.sdpa_block_sparse(q, k, v, sparsity.to(q.device), kv_len=kv_len)


BACKEND_OBJECTS = {b.name: b for b in (Fa4Backend(), TritonBackend(), FlexAttentionBackend(), SdpaBackend())}  # stateless


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    return backend


def auto_order(on_cuda: bool) -> tuple[str, ...]:
    """The backends ``backend="auto"`` tries, in order: fa4 first on CUDA where it is installed."""
    return ("fa4", "triton", "flex", "sdpa") if on_cuda and fa4.PRESENT else ("triton", "flex", "sdpa")


def choose(backend: str, q: torch.Tensor, sparsity: BlockSparsity, precision: str | None = None,
           padded: bool = False, grad: bool | None = None) -> tuple[Any, list[str]]:
    """(the backend to run, reasons the ones tried before it gave). Raises NotImplementedError with
    the reason when ``backend`` is forced and cannot run, or when none can. ``precision``
    (``"int8"`` / ``"fp8"``, the 8-bit forward) only the triton backend runs: no silent fallback to
    full precision. ``padded``: the call has per-batch key lengths (``kv_len``); ``grad``: it needs
    gradients of q, k or v (default: q's). Under ``auto`` a refusal of the optional fa4 backend is
    not a fallback (it says what this GPU, package or description is, on every call): it is not
    among the reasons; ``backend="fa4"`` raises it."""
    names = auto_order(q.is_cuda) if backend == "auto" else (check_backend(backend),)
    reasons = []
    for name in names:
        chosen = BACKEND_OBJECTS[name]
        ok, why = chosen.can_run(q, sparsity, forced=backend == name, precision=precision, padded=padded, grad=grad)
        if ok:
            return chosen, reasons
        if backend != "auto":
            raise NotImplementedError(f"backend={backend!r} cannot run here: {why}")
        if name != "fa4":
            reasons.append(f"{name}: {why}")
    raise NotImplementedError(
        "no attention backend can run this call: " + "; ".join(reasons) + " (handle.report() lists them per call site)"
    )
