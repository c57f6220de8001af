"""What the U-Net methods share (msw-msa, rau-net, tome, agent and their combinations).

They run on the self-attention of a U-Net's transformer blocks, one 2-D token grid per call (a U-Net
attends at several resolutions per forward: the adapter derives each call's grid from the forward's
latent and the call's token count, ``ctx.layout``), and decide per call from:
- the shared schedule (``dense_steps``, ``last_dense_steps``, ``dense_layers``);
- a step window ``start <= step / num_steps < end`` (fractions; needs the pipeline's step count);
- the resolution guard ``min_scale``: the method runs only when the latent is at least
  ``min_scale`` times the size the U-Net was trained at (``unet.config.sample_size``) on its
  shorter side; below it the stock attention runs, and the report says why;
- the call's resolution: ``ctx.level`` (0 = the highest-resolution level with attention) or the
  downsampling ``s`` of the call (ToMe's ``max_downsample``).

Random choices (window shifts, ToMe's destination tokens) come from a generator seeded by
``(seed, step, layer)``: the same seed gives the same image, calls never touch torch's global RNG,
and a layer sees the same choice in the conditional and unconditional passes of one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from diffattn.core.checks import check_int, check_number
from diffattn.core.context import AttnContext
from diffattn.core.options import resolve
from diffattn.core.schedule import ScheduleOptions

UNET_FAMILIES = ("sd1.5", "sd2.1", "sdxl", "sdxl-turbo")


@dataclass(frozen=True)
class StepWindow:
    """Mixin: the step window and resolution guard of a U-Net method (fields with defaults)."""

    start: float = field(default=0.0, metadata={"help": "first fraction of the denoising steps that runs the method"})
    end: float = field(default=1.0, metadata={"help": "the method runs while step / num_steps < end"})
    min_scale: float = field(default=0.0, metadata={"help": "run only when the latent is >= min_scale x the trained size (shorter side)"})
    seed: int = field(default=0, metadata={"help": "seed of the method's random choices (same seed, same image)"})

    def check_window(self, name: str) -> None:
        for key in ("start", "end"):
            value = check_number(f"{name} {key}", getattr(self, key), positive=False)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {key} must be a fraction in [0, 1], got {key}={value!r}")
        if self.start >= self.end:
            raise ValueError(f"{name}: start={self.start} must be below end={self.end} (fractions of the steps)")
        check_number(f"{name} min_scale", self.min_scale, positive=False)
        if self.min_scale < 0:
            raise ValueError(f"{name} min_scale must be >= 0, got min_scale={self.min_scale!r}")
        check_int(f"{name} seed", self.seed)

    @property
    def gated(self) -> bool:
        return self.start > 0.0 or self.end < 1.0


def in_window(start: float, end: float, step: int, num_steps: int | None, name: str) -> bool:
    if start <= 0.0 and end >= 1.0:
        return True
    if num_steps is None:
        raise ValueError(
            f"{name}: start/end fractions need the number of denoising steps; apply diffattn to the pipeline "
            "(not the bare model), or leave start=0, end=1"
        )
    low = math.floor(start * num_steps)
    return step >= low and (end >= 1.0 or step < math.floor(end * num_steps))


def scale_of(ctx: AttnContext) -> float | None:
    """Shorter-side ratio of the forward's latent to the trained latent (None when unknown)."""
    if ctx.latent is None or ctx.native is None:
        return None
    return min(ctx.latent[0] / ctx.native[0], ctx.latent[1] / ctx.native[1])


def downsample_of(ctx: AttnContext) -> int:
    """ToMe's downsampling of this call: ceil(sqrt(H0 W0 // N)) (1 at the latent's resolution)."""
    if ctx.latent is None:
        return 1
    n = ctx.layout.rows * ctx.layout.cols
    return math.ceil(math.sqrt((ctx.latent[0] * ctx.latent[1]) // n))


def call_generator(seed: int, ctx: AttnContext, salt: int, device) -> torch.Generator:
    """A generator for one call's random choices, from (seed, step, layer, salt)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + ctx.step * 10_007 + ctx.layer * 101 + salt) % (2**63 - 1))
    return g


class GridMethod:
    """Base of the U-Net methods: options from family defaults, the shared gating, ``active``.

    Subclasses set ``name``, ``Config`` (inheriting ``ScheduleOptions`` and ``StepWindow``),
    ``FAMILIES``, ``FAMILY_DEFAULTS`` and ``stage``: "window" (splits the grid), "merge" (merges
    tokens), "core" (replaces the softmax attention) or "structure" (changes the U-Net, no attention).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    FAMILIES: ClassVar[tuple[str, ...]] = UNET_FAMILIES
    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    KNOBS: ClassVar[tuple[str, ...]] = ()
    stage: ClassVar[str]
    needs_block_input: ClassVar[bool] = False

    def __init__(self, config, family: str = ""):
        self.config = config
        self.family = family

    @classmethod
    def from_options(cls, family: str, *, declared: dict | None = None, owners: dict | None = None, **options):
        config, _ = resolve(cls.name, cls.Config, family, cls.FAMILY_DEFAULTS, options, declared=declared,
                            knobs=cls.KNOBS, owners=owners)
        return cls(config, family)

    @property
    def needs_step(self) -> bool:
        return self.config.schedule.needs_step or self.config.gated or self.stage == "structure" or self.steps_random

    @property
    def steps_random(self) -> bool:
        """Whether random choices are drawn per step (then the step index is needed)."""
        return False

    def guard(self, ctx: AttnContext) -> str | None:
        """Why this forward runs stock (below the resolution guard), or None."""
        c = self.config
        if c.min_scale > 0:
            scale = scale_of(ctx)
            if scale is None:
                raise ValueError(f"{self.name}: min_scale needs the trained size; apply to a U-Net (or pass min_scale=0)")
            if scale < c.min_scale:
                return (f"diffattn {self.name}: the latent {ctx.latent} is {scale:.2f}x the trained size {ctx.native}, below "
                        f"min_scale={c.min_scale}; running the stock U-Net (pass min_scale=0 to run anyway)")
        return None

    def forward_active(self, step: int, num_steps: int | None, ctx: AttnContext) -> bool:
        """The per-forward gates: schedule steps, step window, resolution guard."""
        c = self.config
        if not c.schedule.step_active(step, num_steps):
            return False
        if not in_window(c.start, c.end, step, num_steps, self.name):
            return False
        return self.guard(ctx) is None

    def call_active(self, ctx: AttnContext) -> bool:
        """Whether this attention call runs the method's stage (subclasses add their own gates)."""
        return self.config.schedule.layer_active(ctx.layer) and self.forward_active(ctx.step, ctx.num_steps, ctx)

    def active(self, ctx: AttnContext) -> bool:
        return self.stage != "structure" and self.call_active(ctx)

    def check_layout(self, layout) -> None:
        """Any latent size works (odd sizes are padded or ceil-divided, never rejected)."""

    def describe(self, layout, device):
        """U-Net methods have no block description: they run SDPA on windows or merged tokens."""
        raise NotImplementedError(f"{self.name} is not block-sparse: it has no block description (no mask to draw)")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """q, k, v ``[B, H, N, D]`` -> ``[B, H, N, D]`` (the reference twin of ``run_tokens``)."""
        from diffattn.methods.compose import run_grid_methods

        return run_grid_methods([self], q, k, v, ctx)

    def run_tokens(self, x: torch.Tensor, ctx: AttnContext, project, finish) -> torch.Tensor:
        """The fast path on the block's normalised tokens ``x [B, N, C]`` (``compose.run_grid_tokens``)."""
        from diffattn.methods.compose import run_grid_tokens

        return run_grid_tokens([self], x, ctx, project, finish)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def config_names(cls) -> set[str]:
    return {f.name for f in fields(cls.Config)}


def check_cell(name: str, value) -> int:
    check_int(name, value, 1)
    return value


__all__ = ["GridMethod", "ScheduleOptions", "StepWindow", "UNET_FAMILIES", "call_generator", "downsample_of", "in_window", "scale_of"]
