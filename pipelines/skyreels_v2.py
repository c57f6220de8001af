"""SkyReels-V2 adapter (``SkyReelsV2Transformer3DModel``: T2V, I2V and diffusion forcing).

SkyReels-V2 is built on Wan2.1 (the same patchify, RMS norms across heads and interleaved RoPE);
its ``SkyReelsV2AttnProcessor`` computes self-attention exactly as ``WanAttnProcessor`` does, so the
Wan processor serves it (``pipelines.wan.Processor``). Methods replace ``blocks.{i}.attn1``; the
cross-attention keeps its stock processor. Diffusion-forcing runs that pass a causal block mask to
the self-attention run it dense, with a note in the report (the mask is not a method pattern).
"""

from __future__ import annotations

from .wan import Processor, grid, patch_size, targets  # noqa: F401 (the adapter protocol's members)

MODEL_CLASSES = ("SkyReelsV2Transformer3DModel",)
FAMILIES = ("skyreels_v2",)


def family(model, pipe=None) -> str:
    return "skyreels_v2"
