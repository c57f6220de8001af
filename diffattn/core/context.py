"""The per-call context a method receives next to q, k, v."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from .layout import TokenLayout


@dataclass(frozen=True)
class AttnContext:
    """What one attention call knows beyond its tensors (frozen: built once per call).

    layout:     the token layout of this call (grid and text tokens).
    step:       denoising step index of the current pipeline call (0-based loop counter).
    num_steps:  total denoising steps of the current call, or None when unknown (model-only use).
    layer:      index of this attention layer in the adapter's numbering.
    site:       the processor key of this call site (``blocks.3.attn1.processor``), for the report.
    kv_len:     [B] int32 count of valid keys per sample (keys are valid as a prefix: padded text at
                the end), or None when every key is valid.
    cache:      the handle's cache lookup, ``cache(key, build)``; keys carry every input they
                depend on.
    note:       log a declared fallback once per handle.
    record:     ``record(site, **facts)``: what ran (backend, density), for ``handle.report()``.
    level:      U-Nets: the resolution level of this call site (0 = the highest-resolution level
                that has attention), else None.
    latent:     U-Nets: the (rows, cols) of the forward's input latent, else None.
    native:     U-Nets: the (rows, cols) latent the model was trained at (``sample_size``), else None.
    block_input: U-Nets, when the method asked for it: the transformer block's input ``[B, S, C]``
                (token merging's similarity metric), else None.
    heads:      under Ulysses context parallelism, the (start, stop) heads of the full attention that
                this call's q/k/v heads are (per-head descriptions follow their heads), else None.
    """

    layout: TokenLayout
    step: int
    num_steps: int | None
    layer: int
    site: str = ""
    kv_len: torch.Tensor | None = None
    cache: Callable[[Hashable, Callable[[], Any]], Any] = lambda key, build: build()
    note: Callable[[str], None] = lambda message: None
    record: Callable[..., None] = lambda site, **facts: None
    level: int | None = None
    latent: tuple[int, int] | None = None
    native: tuple[int, int] | None = None
    block_input: torch.Tensor | None = None
    heads: tuple[int, int] | None = None
