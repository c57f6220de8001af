"""What every block-sparse method shares: the schedule, the cached description, the backend.

A block-sparse method is a config (frozen dataclass inheriting ``ScheduleOptions``) plus one
function, ``describe(layout, device) -> BlockSparsity``. ``BlockSparseMethod`` supplies the rest of
the ``Method`` protocol: ``active`` from the shared schedule, the description cached on the handle
under a key naming every input (method, layout, config, block sizes, device), the backend chosen
by ``kernels.select`` (reasons logged once and recorded in the handle's report), and ``density``.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import Any, ClassVar, Hashable

import torch

from diffattn.core.context import AttnContext
from diffattn.core.layout import TokenLayout
from diffattn.core.options import resolve
from diffattn.kernels import PRECISIONS as KERNEL_PRECISIONS
from diffattn.kernels import select
from diffattn.patterns.blocks import BlockSparsity

PRECISIONS = (None, *KERNEL_PRECISIONS)  # the kernels' 8-bit forward modes; None = the model's dtype


class BlockSparseMethod:
    """Base of block-sparse methods: subclasses set the class attributes and ``describe``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    FAMILIES: ClassVar[tuple[str, ...]]
    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    KNOBS: ClassVar[tuple[str, ...]] = ("backend", "precision")

    def __init__(self, config, *, backend: str = "auto", precision: str | None = None):
        """backend: ``kernels.select``'s name. precision: None (the model's dtype), or ``"int8"`` /
        ``"fp8"``: the 8-bit forward on the triton backend (inference only; measured 1.39x our bf16
        forward at Wan2.1-14B 720p on an H200, with several times bf16's error, RESULTS.md; no other
        backend runs it); ``"int8-qk"``: only Q.K^T in int8, P.V at the model's dtype (less error,
        less speed)."""
        self.config = config
        self.backend = select.check_backend(backend)
        if precision not in PRECISIONS:
            raise ValueError(f"{self.name}: precision must be one of {PRECISIONS}, got precision={precision!r}")
        self.precision = precision

    @classmethod
    def from_options(cls, family: str, *, declared: dict | None = None, owners: dict | None = None, **options):
        """Family defaults, then the pipeline's declared defaults, then the user's options."""
        config, knobs = resolve(cls.name, cls.Config, family, cls.FAMILY_DEFAULTS, options,
                                declared=declared, knobs=cls.KNOBS, owners=owners)
        return cls(config, **cls.family_knobs(family), **knobs)

    @classmethod
    def family_knobs(cls, family: str) -> dict:
        """Constructor arguments a method takes from the family itself (e.g. a preset)."""
        return {}

    # -- Method protocol ------------------------------------------------------------------------
    def active(self, ctx: AttnContext) -> bool:
        return self.config.schedule.active(ctx.step, ctx.num_steps, ctx.layer)

    def check_layout(self, layout: TokenLayout) -> None:
        """Raise ValueError when the method cannot run on ``layout``; default: any layout."""

    def describe(self, layout: TokenLayout, device) -> BlockSparsity:
        raise NotImplementedError

    def describe_key(self, layout: TokenLayout) -> tuple:
        """Everything the description depends on besides the device."""
        return (self.name, astuple(layout), astuple(self.config), self.knob_key())

    def knob_key(self) -> tuple:
        """Performance knobs that change the description (block sizes)."""
        return ()

    def text_key_start(self, layout: TokenLayout) -> int | None:
        """First key that may be padded text (keys are valid as a prefix), or None."""
        if layout.text_tokens and layout.text_position == "after":
            return layout.video_tokens
        if layout.text_tokens and layout.text_position == "before":
            return 0
        return None

    def token_order(self, layout: TokenLayout, device):
        """None, or (gather [S'], scatter [S], extra) when the kernel runs on reordered tokens:
        ``x.index_select(-2, gather)`` reorders, ``y.index_select(-2, scatter)`` undoes it, and
        ``extra`` padding tokens sit before the text (valid-key counts shift by it)."""
        return None

    def extra_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout):
        """None, or (q_x, k_x, v_x) ``[B, H, P, D]`` computed from the model-order q/k/v and
        appended after the kernel sequence (CLEAR's pooled keys); their output rows are dropped."""
        return None

    def reference_keys(self, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout):
        """Keys and values the token-level reference attends to (``reference_mask``'s columns)."""
        return k, v

    def description(self, ctx: AttnContext, device) -> BlockSparsity:
        key = self.describe_key(ctx.layout) + (str(device),)
        return ctx.cache(key, lambda: self.describe(ctx.layout, device))

    def density(self, layout: TokenLayout) -> float:
        """Fraction of the score matrix computed on method calls for ``layout`` (text included)."""
        return self.describe(layout, "cpu").density

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext,
                 rows: tuple[Hashable, BlockSparsity] | None = None) -> torch.Tensor:
        """q, k, v [B, H, S, D] in the layout's order -> [B, H, S, D]. ``rows``: (cache key, the
        description to run instead): a context-parallel ring rank's query rows of ``description``, already
        of this call's heads."""
        layout = ctx.layout
        if q.shape[-2] != layout.seq_len or k.shape[-2] != layout.seq_len:  # [B, H, S, D]
            raise ValueError(
                f"{self.name}: attention over {q.shape[-2]} queries / {k.shape[-2]} keys but the layout "
                f"{layout!r} has {layout.seq_len} tokens (is the sequence split across GPUs outside "
                f"diffattn's processors? {self.name} needs the full sequence per head)"
            )
        sparsity = self.description(ctx, q.device)
        density = sparsity.density
        key = self.describe_key(layout) + (str(q.device),)
        order = ctx.cache(("order",) + key, lambda: self.token_order(layout, q.device))
        extra = self.extra_tokens(q, k, v, layout)
        if rows is not None:
            if order is not None or extra is not None:
                raise NotImplementedError(
                    f"{self.name}: ring context parallelism runs the rows of the layout's order; this config "
                    "reorders tokens or appends pooled keys (reorder / down_factor): use Ulysses "
                    "(ContextParallelConfig(ulysses_degree=N)), or reorder=False and down_factor=1"
                )
            key, sparsity = key + (rows[0],), rows[1]
        elif ctx.heads is not None and sparsity.heads > 1:  # Ulysses: this rank's heads of a per-head description
            key, sparsity = key + (("heads",) + tuple(ctx.heads)), sparsity.select_heads(*ctx.heads)
        kv_len = ctx.kv_len
        if extra is not None and kv_len is not None:
            raise NotImplementedError(
                f"{self.name}: padded text keys (an attention mask) with tokens appended after the text; "
                "run without the mask or without the appended tokens (down_factor=1)"
            )
        if order is not None:
            gather, scatter, extra_pad = order
            if kv_len is not None and layout.text_position == "before":
                raise NotImplementedError(
                    f"{self.name}: padded text keys before the video with a token permutation (text keys are valid "
                    "as a prefix only when the text follows the video); run without the text mask or with reorder=False"
                )
            q, k, v = (t.index_select(-2, gather) for t in (q, k, v))  # [B, H, S', D] in kernel order
            if kv_len is not None:
                kv_len = kv_len + extra_pad
        rows = q.shape[-2]
        if extra is not None:
            q, k, v = (torch.cat([t, x.to(t.dtype)], dim=-2) for t, x in zip((q, k, v), extra))  # [B, H, S' + P, D]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend, reasons = select.choose(self.backend, q, sparsity, self.precision, padded=kv_len is not None, grad=grad)
        note = None
        if reasons:
            note = f"diffattn {self.name}: using backend {backend.name!r} ({'; '.join(reasons)})"
            ctx.note(note)
        ran = backend.name if self.precision is None else f"{backend.name}:{self.precision}"  # the report names the 8-bit mode
        ctx.record(ctx.site, mode="method", layout=layout, backend=ran, density=density, note=note)
        out = backend.run(q, k, v, sparsity, kv_len=kv_len, cache=ctx.cache, key=key,
                          text_key_start=self.text_key_start(layout) if kv_len is not None else None,
                          precision=self.precision)
        if extra is not None:
            out = out[..., :rows, :]
        return out if order is None else out.index_select(-2, order[1])  # [B, H, S, D] in model order

    def __repr__(self) -> str:
        precision = f", precision={self.precision!r}" if self.precision is not None else ""
        return f"{type(self).__name__}({self.config}, backend={self.backend!r}{precision})"
