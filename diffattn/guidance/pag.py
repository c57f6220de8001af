"""Perturbed-Attention Guidance (PAG, Ahn et al. 2024; research/guidance.md §1).

The weak model replaces the self-attention map of the chosen layers by the identity: every token's
attention output is its own value, ``O = V``, for every head (the output projection follows as
usual). diffattn computes it without any attention map; with the whole weak batch perturbed at a
layer, the attention there does not run at all.

Deviations from the references: on joint text-image/video attention (FLUX, SD3, HunyuanVideo,
CogVideoX, Mochi) the identity covers the whole joint sequence, text rows included (diffusers'
guider and HeadHunter do this; diffusers' legacy SD3 PAG processor keeps image-to-text attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import GuidanceConfig, Perturbation


@dataclass(frozen=True)
class PagConfig(GuidanceConfig):
    """PAG: ``scale`` (3.0, the diffusers PAG pipelines' default; the original release used 3.0
    with CFG 4.0, 5.0 without CFG) on ``layers`` (U-Nets: "mid"; see ``base.PAG_LAYERS``)."""

    name = "pag"

    def perturbation(self, layer: int, heads: int) -> Perturbation:
        return Perturbation("blend", (1.0,) * heads)
