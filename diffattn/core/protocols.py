"""The four written protocols every layer meets. They are structural (``typing.Protocol``): a
method, adapter, backend or element rule fits by having these members, not by inheriting.

Shapes: q, k, v are ``[B, H, S, D]`` (H = heads); the latent grid is ``(F, Y, X)``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from .context import AttnContext
from .layout import TokenLayout


@runtime_checkable
class Method(Protocol):
    """``method(q, k, v, ctx) -> out``; knows nothing about diffusers.

    name:            the string users pass to ``diffattn.apply`` (one enum with the docs).
    Config:          frozen dataclass of what the method computes (inherits ``ScheduleOptions``).
    FAMILIES:        model families it fits; applying it elsewhere raises naming these.
    FAMILY_DEFAULTS: ``{family: {option: value}}``, the reference settings per family.
    KNOBS:           keyword-only performance options (``backend``, block sizes), never semantics.
    """

    name: ClassVar[str]
    FAMILIES: ClassVar[tuple[str, ...]]
    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]]
    KNOBS: ClassVar[tuple[str, ...]]
    config: Any

    def active(self, ctx: AttnContext) -> bool:
        """False when this call runs the model's stock dense attention (schedule, dense layers)."""

    def check_layout(self, layout: TokenLayout) -> None:
        """Raise ValueError when the method cannot run on ``layout`` (before any attention runs)."""

    def describe(self, layout: TokenLayout, device) -> Any:
        """Block-sparse methods: the kernel description (``BlockSparsity``) for ``layout``."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """q, k, v ``[B, H, S, D]`` -> out ``[B, H, S, D]``."""


@runtime_checkable
class Adapter(Protocol):
    """One module per diffusers model family (``pipelines/<family>.py``).

    MODEL_CLASSES:   diffusers class names it handles.
    FAMILIES:        family names it can report (method defaults are keyed by these).
    family(model, pipe): the family of this model (e.g. "wan2.1" or "wan2.2").
    targets(model):  ``{processor key: layer index}`` of the attention modules methods replace.
    grid(model, hidden_states, inputs): the ``TokenLayout`` of the tokens of one forward (U-Nets: of
                     the input resolution; their processors derive each level's layout per call);
                     ``inputs`` are the forward's named arguments. A string instead says why the
                     forward has no layout a method can use (its attention then runs dense).
    patch_size(model): ``(t, y, x)`` latent cells per token, for callers that size inputs.
    Processor:       the diffusers processor reproducing the stock one with the core attention
                     handed to the method.
    """

    MODEL_CLASSES: tuple[str, ...]
    FAMILIES: tuple[str, ...]

    def family(self, model, pipe=None) -> str: ...

    def targets(self, model) -> dict[str, int]: ...

    def grid(self, model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout | str: ...

    def patch_size(self, model) -> tuple[int, int, int]: ...


@runtime_checkable
class Backend(Protocol):
    """Runs a block description. Choosing is kept apart from running (NATTEN's chooser).

    can_run(q, sparsity, forced, precision, padded, grad) -> (ok, reason): reason says why not, and
    what to use instead. ``precision``: the 8-bit forward asked for; ``padded``: per-batch key
    lengths; ``grad``: the call needs gradients.
    """

    name: ClassVar[str]

    def can_run(self, q: torch.Tensor, sparsity: Any, forced: bool = False, precision: str | None = None,
                padded: bool = False, grad: bool | None = None) -> tuple[bool, str]: ...

    def run(self, q, k, v, sparsity, *, kv_len=None, cache=None) -> torch.Tensor: ...


@runtime_checkable
class ElementRule(Protocol):
    """The per-element rule of a description's partial blocks (``diffattn.rules``).

    kind:       the rule's name; kernel_id: its id in the Triton rule switch (kernels/triton/rules.py).
    pack():     the named parameters as ints, in the order the Triton rule reads them.
    mask(q_idx, kv_idx): the torch twin (broadcasting int tensors -> bool), used by the SDPA backend
                and, as a FlexAttention ``mask_mod``, by the Flex backend.
    """

    kind: ClassVar[str]
    kernel_id: ClassVar[int]

    def pack(self) -> tuple[int, ...]: ...

    def mask(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor: ...
