"""Shared checks: every method and adapter test calls these, so each inherits the checklist."""

from __future__ import annotations

import torch

import diffattn


def assert_error_ratio(fast, ref32, ref_lowp, what: str, factor: float = 2.0, floor: float = 1e-6):
    """The flash-attn rule: |fast - ref_fp32| <= factor * |ref_lowp - ref_fp32| (+ a floor)."""
    err = (fast.float() - ref32.float()).abs().max().item()
    base = (ref_lowp.float() - ref32.float()).abs().max().item()
    assert err <= factor * base + floor, f"{what}: error {err:.3e} > {factor} x reference error {base:.3e}"


def run_twice_with_remove(target, call, method: str, **options):
    """(stock, with method, after remove): remove() must restore the stock output bit for bit."""
    stock = call()
    handle = diffattn.apply(target, method, **options)
    try:
        applied = call()
    finally:
        handle.remove()
    restored = call()
    assert torch.equal(stock, restored), "remove() did not restore the stock output bit for bit"
    return stock, applied


def record_steps(handle, model):
    """Forward hook that records (step, num_steps) each time ``model`` runs."""
    seen = []
    hook = model.register_forward_hook(lambda *_: seen.append((handle.state.step, handle.state.num_steps)))
    return seen, hook
