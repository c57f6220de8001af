"""MSW-MSA: modified shifted-window self-attention (HiDiffusion; Zhang et al., "HiDiffusion: Unlocking
Higher-Resolution Creativity and Efficiency in Pretrained Diffusion Models", arXiv 2311.17528;
megvii-research/HiDiffusion). research/hidiffusion_agent.md §1.

The self-attention of the transformer blocks at the U-Net's highest-resolution attention level
(SD1.5/2.1: ``down_blocks.0`` and ``up_blocks.3``; SDXL: ``down_blocks.1`` and ``up_blocks.1``; the
testbed U-Net: ``down_blocks.0`` and ``up_blocks.2``) runs inside 2 x 2 windows of half the map each,
rolled by a shift of 0, 1/4, 1/2 or 3/4 of a window per call (``diffattn.patterns.windows``). The
score work at that level drops to a quarter; cross-attention and feed-forward are unchanged.

Shift schedules (``shifts``):
- "random" (upstream): k uniform in {0, 1, 2, 3} per (step, layer), from a generator seeded by
  ``seed`` (upstream draws from torch's global RNG per block call; here the same seed gives the same
  image, and cond/uncond passes of a step share the shift as the batched CFG pass does upstream);
- "cyclic": k = (step + layer) mod 4, deterministic; consecutive steps never repeat a shift.

Gates upstream lacks: ``start``/``end`` (fractions of the steps; the ComfyUI port suggests starting
at 0.2 above 2048 px) and ``min_scale`` (run only above that multiple of the trained size; default 0,
upstream's always-on). ``levels`` widens windowing to more levels (upstream: 1).

Deviation: odd maps are padded and the padded keys masked (exact windows) where upstream resizes the
map bicubically and warns that quality drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffattn.core.checks import check_choice, check_int
from diffattn.core.context import AttnContext
from diffattn.core.schedule import ScheduleOptions
from diffattn.methods.unet_base import GridMethod, StepWindow, call_generator
from diffattn.patterns import windows

SHIFTS = ("random", "cyclic")


@dataclass(frozen=True)
class MswMsaConfig(ScheduleOptions, StepWindow):
    """What MSW-MSA computes (plus the schedule, step window and resolution guard).

    shifts: "random" (upstream) or "cyclic" (deterministic, never the same shift twice in a row).
    levels: how many resolution levels from the top get windows; 1 is upstream's (the top level,
            where the sequence is longest); more saves more but windows coarse features too.
    """

    shifts: str = field(default="random", metadata={"help": "window shift schedule: random (upstream) or cyclic"})
    levels: int = field(default=1, metadata={"help": "resolution levels from the top that get windows (upstream 1)"})

    def __post_init__(self):
        ScheduleOptions.__post_init__(self)
        self.check_window("msw-msa")
        check_choice("msw-msa shifts", self.shifts, SHIFTS)
        check_int("msw-msa levels", self.levels, 1)


class MswMsa(GridMethod):
    """Window stage: ``split`` q/k/v into the shifted 2 x 2 windows, ``join`` the output back."""

    name = "msw-msa"
    Config = MswMsaConfig
    stage = "window"

    @property
    def steps_random(self) -> bool:
        return True  # the shift depends on the step

    def call_active(self, ctx: AttnContext) -> bool:
        if ctx.level is None or ctx.level >= self.config.levels:
            return False
        if ctx.layout.rows < 2 or ctx.layout.cols < 2:
            return False  # a 1-token-wide map has no 2 x 2 windows
        return super().call_active(ctx)

    def shift_index(self, ctx: AttnContext) -> int:
        if self.config.shifts == "cyclic":
            return (ctx.step + ctx.layer) % 4
        return int(torch.randint(4, (1,), generator=call_generator(self.config.seed, ctx, 1, "cpu")))

    def split(self, tensors, rows: int, cols: int, k: int):
        """``[B, H, S, D]`` tensors -> (``[4B, H, n, D]`` windows, key mask ``[4B, 1, 1, n]`` or None, (wh, ww))."""
        out, mask = [], None
        for t in tensors:
            w, mask = windows.partition(t, rows, cols, k)
            out.append(w)
        return out, mask, windows.window_size(rows, cols)

    def join(self, out: torch.Tensor, rows: int, cols: int, k: int) -> torch.Tensor:
        return windows.unpartition(out, rows, cols, k)

    def reference_mask(self, rows: int, cols: int, k: int) -> torch.Tensor:
        """``[S, S]`` token-level twin (same window after the roll)."""
        return windows.token_mask(rows, cols, k)
