"""RAU-Net: the resolution-aware U-Net of HiDiffusion (arXiv 2311.17528; research/hidiffusion_agent.md §2).

Above the training resolution the deep blocks see larger maps than in training and duplicate
objects. During the early (structure) steps RAU-Net shrinks the map before them and restores it on
the way up; late steps run the plain U-Net. Two mechanisms, each on for a fraction of the steps:
- **RAD**: the downsampler after the top attention level runs its 3 x 3 conv with stride 4, padding
  2, dilation 2 (same weights; 4x smaller output). Equal to the stock stride-2 conv on every other
  row and column of its input, which is how it runs here (a forward pre-hook);
- **pool**: 2 x 2 average pooling (ceil mode) after the first (ResNet, Transformer) pair of a down
  block, and a bicubic restore to the remembered size in the mirrored up block before the pair
  whose skip is full size.
Every upsampler is handed the exact size of the skip it meets (x4 after RAD), as HiDiffusion forces.

Where, per family (the U-Net's own block layout decides; ``levels`` in the adapter):
- SD 1.5 / 2.1 (and U-Nets with that layout, e.g. the testbed's): RAD after the top attention level
  (``down_blocks.0``) is the main mechanism, T1; pool in the next level (``down_blocks.1``) is T2;
- SDXL: pool in the top attention level (``down_blocks.1``) is T1, RAD after it is T2;
- SDXL-Turbo: pool only, T1.

Presets (``t1``/``t2`` None; step i runs a mechanism while i < floor(T n)), by the latent's shorter
side against the trained size (``sample_size``): below 4x, SD (0.4, 0), SDXL (0.4, 0) with the
aggressive schedule (RAD for the first 8/50 of the steps, then pool until 0.4: upstream's default
below 4096 px; ``aggressive=False`` for inpainting models, as upstream), SDXL-Turbo 0.5; at 4x or
more, SD and SDXL (0.7, 0.3).

Guard upstream lacks: ``min_scale`` (default 1.5): at or near the trained size RAU-Net only harms
(the deep blocks already see their training size), so the plain U-Net runs there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diffattn.core.checks import check_bool, check_number
from diffattn.core.context import AttnContext
from diffattn.core.schedule import ScheduleOptions
from diffattn.methods.unet_base import UNET_FAMILIES, GridMethod, StepWindow, scale_of

# family -> (layout, T1/T2 below 4x, T1/T2 at >= 4x); layout: which mechanism T1 drives
PRESETS = {
    "sd1.5": ("sd", (0.4, 0.0), (0.7, 0.3)),
    "sd2.1": ("sd", (0.4, 0.0), (0.7, 0.3)),
    "sdxl": ("sdxl", (0.4, 0.0), (0.7, 0.3)),
    "sdxl-turbo": ("turbo", (0.5, 0.0), (0.5, 0.0)),
}
AGGRESSIVE_STEPS = 8 / 50  # upstream's aggressive_step = 8 of 50


@dataclass(frozen=True)
class RauNetConfig(ScheduleOptions, StepWindow):
    """What RAU-Net changes (plus the schedule, step window and resolution guard).

    t1, t2:     step fractions of the main and the extra mechanism (None: the preset for the family
                and resolution). A higher t1 fights duplication harder at some cost in detail.
    aggressive: SDXL below 4x: RAD first, then pool (None: on, upstream's default).
    """

    t1: float | None = field(default=None, metadata={"help": "step fraction of the main mechanism (None: preset)"})
    t2: float | None = field(default=None, metadata={"help": "step fraction of the extra mechanism (None: preset)"})
    aggressive: bool | None = field(default=None, metadata={"help": "SDXL below 4x: RAD for 8/50 of the steps, then pool"})
    min_scale: float = field(default=1.5, metadata={"help": "run only when the latent is >= min_scale x the trained size"})

    def __post_init__(self):
        ScheduleOptions.__post_init__(self)
        self.check_window("rau-net")
        for name in ("t1", "t2"):
            value = getattr(self, name)
            if value is not None and not (check_number(f"rau-net {name}", value, positive=False) >= 0 and value <= 1):
                raise ValueError(f"rau-net {name} must be a fraction in [0, 1] or None (the preset), got {name}={value!r}")
        if self.aggressive is not None:
            check_bool("rau-net aggressive", self.aggressive)


@dataclass(frozen=True)
class RauPlan:
    """What one forward runs: RAD at the top level's downsampler, pooling in ``pool_level``."""

    rad: bool = False
    pool: bool = False

    @property
    def any(self) -> bool:
        return self.rad or self.pool


class RauNet(GridMethod):
    """Structure stage: no attention change; ``plan(ctx)`` says what the adapter's hooks do."""

    name = "rau-net"
    Config = RauNetConfig
    stage = "structure"
    FAMILIES = UNET_FAMILIES

    @property
    def layout(self) -> str:
        return PRESETS[self.family][0]

    def fractions(self, scale: float) -> tuple[float, float]:
        _, low, high = PRESETS[self.family]
        t1, t2 = high if scale >= 4 else low
        c = self.config
        return (t1 if c.t1 is None else c.t1), (t2 if c.t2 is None else c.t2)

    def plan(self, ctx: AttnContext) -> RauPlan:
        """The mechanisms on in the forward ``ctx`` describes (step, step count, latent)."""
        if not self.forward_active(ctx.step, ctx.num_steps, ctx):
            return RauPlan()
        scale = scale_of(ctx)
        if scale is None:
            raise ValueError("rau-net: needs the U-Net's trained size; apply it to a UNet2DConditionModel")
        n = ctx.num_steps
        if n is None:
            raise ValueError("rau-net: needs the number of denoising steps; apply diffattn to the pipeline (not the bare U-Net)")
        t1, t2 = self.fractions(scale)
        step = ctx.step
        main = step < math.floor(t1 * n)
        extra = step < math.floor(t2 * n)
        layout = self.layout
        if layout == "sd":
            return RauPlan(rad=main, pool=extra)
        if layout == "turbo":
            return RauPlan(pool=main)
        aggressive = self.config.aggressive if self.config.aggressive is not None else True
        if scale < 4 and aggressive and self.config.t2 is None:
            cut = math.floor(AGGRESSIVE_STEPS * n)
            return RauPlan(rad=step < cut, pool=cut <= step < math.floor(t1 * n))
        return RauPlan(rad=extra, pool=main)
