"""The per-call context a method receives next to q, k, v."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from .layout import TokenLayout


@dataclass
class AttnContext:
    """What one attention call knows beyond its tensors.

    layout:     the token layout of this call (grid and text tokens).
    step:       denoising step index of the current pipeline call (0-based loop counter).
    num_steps:  total denoising steps of the current call, or None when unknown (model-only use).
    layer:      index of this attention layer in the model's own numbering.
    kv_len:     [B] int32 count of valid keys per sample (keys are valid as a prefix: padded text at
                the end), or None when every key is valid.
    cache:      the handle's cache lookup, ``cache(key, build)``; keys carry every input they
                depend on.
    note:       log a declared fallback once per handle.
    """

    layout: TokenLayout
    step: int
    num_steps: int | None
    layer: int
    kv_len: torch.Tensor | None
    cache: Callable[[Hashable, Callable[[], Any]], Any]
    note: Callable[[str], None]
