"""Radial attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay
for Long Video Generation", arXiv 2506.19852; reference code mit-han-lab/radial-attention).

The mask is ``diffattn.patterns.radial.block_mask`` (bit-identical to the reference where the
reference builds one). The schedule: dense attention for the first ``dense_steps`` denoising steps,
the last ``last_dense_steps`` steps and the first ``dense_layers`` layers; radial otherwise. Dense
steps run the model's stock attention path unchanged.

Deviations from the reference, all additions:
- any resolution and frame count (tails padded and masked, never rejected);
- the mask is re-derived whenever the layout changes (the reference caches one per process);
- ``last_dense_steps`` (the community finding of research/radial.md §2.1, off by default);
- padded text keys are masked in every part (also with the Triton and Flex backends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from diffattn.core.context import AttnContext
from diffattn.methods.base import check_backend, check_int, run_block_sparse
from diffattn.patterns import radial as radial_pattern
from diffattn.patterns.blocks import BlockSparsity, from_block_mask

# research/radial.md §2.1: the reference scripts' settings per family.
FAMILY_DEFAULTS = {
    "wan2.1": dict(dense_steps=12, dense_layers=1, decay=0.2, block_size=128, sink=True),
    "wan2.2": dict(dense_steps=11, dense_layers=1, decay=0.8, block_size=64, sink=True),
    "hunyuan_video": dict(dense_steps=12, dense_layers=0, decay=0.95, block_size=128, sink=False),
}


@dataclass(frozen=True)
class RadialConfig:
    """What radial computes.

    dense_steps:      first denoising steps run dense. More keeps the layout of the video closer to
                      dense (the paper: 12 of 50 on Wan, PSNR 23.6 vs 12.8 with 0); fewer is faster.
    last_dense_steps: last denoising steps run dense; 1 helps few-step LoRAs (off by default).
    dense_layers:     first transformer layers run dense (1 on Wan, 0 on HunyuanVideo).
    decay:            scales the spatial window beyond distance 1: larger is denser and closer to
                      dense output (0.2 Wan2.1, 0.8 Wan2.2, 0.95 HunyuanVideo).
    block_size:       block edge in tokens (128; 64 for Wan2.2). Smaller blocks follow the pattern
                      more tightly but run the kernel at lower efficiency.
    sink:             every frame sees all of frame 0 (Wan: yes, HunyuanVideo: no).
    """

    dense_steps: int = 12
    dense_layers: int = 1
    last_dense_steps: int = 0
    decay: float = 0.2
    block_size: int = 128
    sink: bool = True

    def __post_init__(self):
        check_int("radial dense_steps", self.dense_steps)
        check_int("radial dense_layers", self.dense_layers)
        check_int("radial last_dense_steps", self.last_dense_steps)
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not (
            math.isfinite(self.decay) and self.decay > 0
        ):
            raise ValueError(f"radial decay must be a finite number > 0 (0.2 to 1.0 typical), got decay={self.decay!r}")
        if self.block_size not in (16, 32, 64, 128):
            raise ValueError(f"radial block_size must be one of 16, 32, 64, 128 (64 or 128 recommended), got block_size={self.block_size!r}")
        if not isinstance(self.sink, bool):
            raise ValueError(f"radial sink must be True or False, got sink={self.sink!r}")


class Radial:
    """``method(q, k, v, ctx) -> out`` with q, k, v ``[B, H, S, D]``."""

    name = "radial"

    def __init__(self, config: RadialConfig, *, backend: str = "auto"):
        self.config = config
        self.backend = check_backend(backend)

    @classmethod
    def from_options(cls, family: str, backend: str = "auto", **options) -> "Radial":
        """Family defaults (research/radial.md §2.1), overridden by the user's options."""
        known = {f.name for f in fields(RadialConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"radial: unknown option(s) {unknown}; valid options are {sorted(known)} and backend")
        defaults = FAMILY_DEFAULTS.get(family, {})
        return cls(replace(RadialConfig(), **{**defaults, **options}), backend=backend)

    def active(self, ctx: AttnContext) -> bool:
        """False when this call runs the stock dense path (warm-up step, dense layer, last steps)."""
        c = self.config
        if ctx.layer < c.dense_layers or ctx.step < c.dense_steps:
            return False
        if c.last_dense_steps:
            if ctx.num_steps is None:
                raise ValueError(
                    "radial last_dense_steps needs the number of denoising steps: apply diffattn to the "
                    "pipeline (not the bare model), or set last_dense_steps=0"
                )
            if ctx.step >= ctx.num_steps - c.last_dense_steps:
                return False
        return True

    def sparsity(self, ctx: AttnContext, device) -> BlockSparsity:
        layout, c = ctx.layout, self.config
        if layout.text_position == "before":
            raise NotImplementedError(
                "radial: text tokens before the video are not supported (HunyuanVideo-style [video; text] "
                f"or video-only layouts are); got {layout!r}"
            )
        key = ("radial", layout, c.block_size, c.decay, c.sink, str(device))

        def build():
            mask = radial_pattern.block_mask(
                layout.frames, layout.tokens_per_frame, block_size=c.block_size, decay=c.decay,
                sink=c.sink, text_tokens=layout.text_tokens, device=device,
            )
            return from_block_mask(mask, layout.seq_len, block_m=c.block_size)

        return ctx.cache(key, build)

    def density(self, layout) -> float:
        """Fraction of the score matrix computed on sparse steps for ``layout`` (text included)."""
        c = self.config
        mask = radial_pattern.block_mask(
            layout.frames, layout.tokens_per_frame, block_size=c.block_size, decay=c.decay, sink=c.sink,
            text_tokens=layout.text_tokens,
        )
        return from_block_mask(mask, layout.seq_len, block_m=c.block_size).density

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        layout = ctx.layout
        if q.shape[-2] != layout.seq_len or k.shape[-2] != layout.seq_len:
            raise ValueError(
                f"radial: attention over {q.shape[-2]} queries / {k.shape[-2]} keys but the layout "
                f"{layout!r} has {layout.seq_len} tokens (is the sequence split across GPUs without "
                "Ulysses? radial needs the full sequence per head)"
            )
        sparsity = self.sparsity(ctx, q.device)
        text_start = layout.video_tokens if layout.text_tokens else None
        key = ("radial", layout, self.config.block_size, self.config.decay, self.config.sink)
        return run_block_sparse(q, k, v, sparsity, ctx, self.backend, key, text_key_start=text_start)

    def __repr__(self) -> str:
        return f"Radial({self.config}, backend={self.backend!r})"
