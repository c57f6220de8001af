"""Smoothed Energy Guidance (SEG, Hong 2024; research/guidance.md §4.1).

The weak model blurs the queries of the chosen self-attention layers with a Gaussian over the token
grid before attention; as the logits are linear in the queries, this blurs the attention logits
along the query axis, which is SEG's definition. ``sigma`` = inf (the reference default,
9,999,999) replaces every query by the grid's mean query. diffattn blurs the queries the kernel sees
(after QK-norm and RoPE, so the blur acts on the logits themselves), per frame over (rows, cols);
``frame_sigma`` > 0 also blurs across frames (a 3-D blur, for video: no reference implements one).
Text queries of joint attention are left as they are (diffusers' SEG hook blurs the image stream's
``to_q`` only).

The reference blurs with a kernel of about 6 sigma (odd, capped at the grid) and reflect padding;
diffattn uses the same kernel size and padding, per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffattn.core.checks import check_number

from .base import GuidanceConfig, Perturbation


@dataclass(frozen=True)
class SegConfig(GuidanceConfig):
    """SEG: ``sigma`` in tokens (inf, the reference default: the mean query; the README advises a
    sweep 1, 4, 16, ...), ``frame_sigma`` (0: per frame), ``scale`` (3.0, the authors' fixed value)
    and ``layers`` (U-Nets "mid", as the reference)."""

    name = "seg"

    sigma: float = math.inf
    frame_sigma: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.sigma, (int, float)) and not isinstance(self.sigma, bool) and self.sigma > 0):
            raise ValueError(f"seg: sigma must be > 0 tokens (inf = the mean query), got sigma={self.sigma!r}")
        if self.frame_sigma != math.inf:
            check_number("frame_sigma", self.frame_sigma, positive=False)
        if self.frame_sigma < 0:
            raise ValueError(f"seg: frame_sigma must be >= 0 (0 = per frame), got frame_sigma={self.frame_sigma!r}")
        object.__setattr__(self, "sigma", float(self.sigma))
        object.__setattr__(self, "frame_sigma", float(self.frame_sigma))

    def perturbation(self, layer: int, heads: int) -> Perturbation:
        return Perturbation("seg", (1.0,) * heads, sigma=self.sigma, frame_sigma=self.frame_sigma)
