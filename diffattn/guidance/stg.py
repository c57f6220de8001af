"""Spatiotemporal Skip Guidance (STG, Hyung et al. CVPR 2025; research/guidance.md §4.2).

The weak model skips whole blocks: the chosen transformer blocks return their input unchanged
(``mode="block"``, STG-R, the only form the official code exposes), or their self-attention becomes
the identity (``mode="attention"``, STG-A: PAG on those layers). SD3's skip-layer guidance (SLG) is
the same idea on an image DiT.

Deviations: the official Wan script feeds the *negative* prompt to the skip pass and adds the term
to the already guided prediction; diffattn uses the conditional prompt and the standard formula
(as the diffusers community STG pipelines do). STG's optional std rescale needs the final guided
prediction, which only the pipeline computes; use the pipeline's ``guidance_rescale`` where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffattn.core.checks import check_choice

from .base import STG_LAYERS, GuidanceConfig, ModelInfo, Perturbation, scaled_default


@dataclass(frozen=True)
class StgConfig(GuidanceConfig):
    """STG: ``scale`` (1.0, the official scripts' value for Mochi, CogVideoX, HunyuanVideo and
    LTX; Wan's uses 2.0), ``layers`` = the skipped blocks (by the index of their attention layer;
    defaults from the official inference scripts, ``base.STG_LAYERS``), ``mode`` "block" or
    "attention"."""

    name = "stg"
    DEFAULT_SCALE: ClassVar[float] = 1.0

    scale: float = 1.0
    mode: str = "block"

    def __post_init__(self):
        super().__post_init__()
        check_choice("mode", self.mode, ("block", "attention"))

    def default_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return scaled_default(STG_LAYERS, info)

    def perturbation(self, layer: int, heads: int) -> Perturbation:
        return Perturbation("skip") if self.mode == "block" else Perturbation("blend", (1.0,) * heads)
