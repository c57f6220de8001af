"""Radial attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay
for Long Video Generation", arXiv 2506.19852; reference code mit-han-lab/radial-attention).

The mask is ``diffattn.patterns.radial.block_mask`` (bit-identical to the reference where the
reference builds one). The schedule (shared by every method, ``core.schedule``): dense attention
for the first ``dense_steps`` denoising steps, the last ``last_dense_steps`` steps and the first
``dense_layers`` layers; radial otherwise. Dense calls run the model's stock attention unchanged.

Deviations from the reference, all additions:
- any resolution and frame count (tails padded and masked, never rejected);
- the mask is re-derived whenever the layout changes (the reference caches one per process);
- ``last_dense_steps`` (the community finding of research/radial.md §2.1, off by default);
- padded text keys are masked in every part (also with the Triton and Flex backends).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffattn.core.checks import check_bool, check_number
from diffattn.core.layout import TokenLayout
from diffattn.core.schedule import ScheduleOptions
from diffattn.methods.base import BlockSparseMethod
from diffattn.patterns import radial as radial_pattern
from diffattn.patterns.blocks import BlockSparsity, from_block_mask

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class RadialConfig(ScheduleOptions):
    """What radial computes (plus the shared schedule: dense_steps, last_dense_steps, dense_layers).

    decay:       scales the spatial window beyond distance 1: larger is denser and closer to dense
                 output (0.2 Wan2.1, 0.8 Wan2.2, 0.95 HunyuanVideo).
    block_size:  block edge in tokens (128; 64 for Wan2.2). It shapes the mask (the reference's tile
                 vote), so it is semantic here. Smaller blocks follow the pattern more tightly but run
                 the kernel at lower efficiency.
    sink:        every frame sees all of frame 0 (Wan: yes, HunyuanVideo: no).
    """

    decay: float = field(default=0.2, metadata={"help": "window decay beyond distance 1: larger is denser (0.2 to 1.0)"})
    block_size: int = field(default=128, metadata={"help": "block edge in tokens, one of 16, 32, 64, 128"})
    sink: bool = field(default=True, metadata={"help": "every frame sees all of frame 0 (Wan yes, HunyuanVideo no)"})

    def __post_init__(self):
        super().__post_init__()
        check_number("radial decay", self.decay, hint=" (0.2 to 1.0 typical)")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"radial block_size must be one of 16, 32, 64, 128 (64 or 128 recommended), got block_size={self.block_size!r}")
        check_bool("radial sink", self.sink)


class Radial(BlockSparseMethod):
    """``method(q, k, v, ctx) -> out`` with q, k, v ``[B, H, S, D]``."""

    name = "radial"
    Config = RadialConfig
    FAMILIES = ("wan2.1", "wan2.2", "skyreels_v2", "hunyuan_video", "hunyuan_video15", "mochi", "cogvideox", "ltx", "ltx2")  # video DiTs with frame-major tokens
    # research/radial.md §2.1: the reference scripts' settings per family
    FAMILY_DEFAULTS = {
        "wan2.1": dict(dense_steps=12, dense_layers=1, decay=0.2, block_size=128, sink=True),
        "wan2.2": dict(dense_steps=11, dense_layers=1, decay=0.8, block_size=64, sink=True),
        "hunyuan_video": dict(dense_steps=12, dense_layers=0, decay=0.95, block_size=128, sink=False),
        # HunyuanVideo-1.5 keeps HunyuanVideo's joint [video; text] design: its setting
        "hunyuan_video15": dict(dense_steps=12, dense_layers=0, decay=0.95, block_size=128, sink=False),
        # the reference's Mochi stub: "warmup 12, layers 0"; Mochi is a joint MM-DiT like HunyuanVideo
        # (no frame-0 conditioning), so decay, block and sink are HunyuanVideo's
        "mochi": dict(dense_steps=12, dense_layers=0, decay=0.95, block_size=128, sink=False),
        # no reference setting: CogVideoX is, like HunyuanVideo, a joint MM-DiT with full 3-D attention
        # and no frame-0 conditioning (T2V), so it takes HunyuanVideo's (12 of 50 steps dense)
        "cogvideox": dict(dense_steps=12, dense_layers=0, decay=0.95, block_size=128, sink=False),
        # SkyReels-V2 is a Wan2.1 fine-tune: Wan2.1's setting
        "skyreels_v2": dict(dense_steps=12, dense_layers=1, decay=0.2, block_size=128, sink=True),
        # no reference setting: LTX is Wan-like (self-attention + text cross-attention) with small frames
        # (352 tokens at 512 x 704), so it takes Wan2.2's small-frame setting (block 64, decay 0.8)
        "ltx": dict(dense_steps=12, dense_layers=1, decay=0.8, block_size=64, sink=True),
        # LTX-2's video stream is LTX's layout (384 tokens per frame at 512 x 768): LTX's setting, with
        # the warm-up scaled to LTX2Pipeline's 30-step default (7 of 30: the reference's 12 of 50)
        "ltx2": dict(dense_steps=7, dense_layers=1, decay=0.8, block_size=64, sink=True),
    }

    @staticmethod
    def _text_after(layout: TokenLayout) -> TokenLayout:
        """The layout the mask is built on: radial's text rows and columns follow the video."""
        if layout.text_position != "before":
            return layout
        return TokenLayout(layout.frames, layout.rows, layout.cols, layout.text_tokens, "after")

    def token_order(self, layout: TokenLayout, device):
        """Text before the video (CogVideoX) runs as [video; text]: the mask's order."""
        if layout.text_position != "before":
            return None
        t, s = layout.text_tokens, layout.seq_len
        gather = torch.cat([torch.arange(t, s, device=device), torch.arange(t, device=device)])
        scatter = torch.cat([torch.arange(s - t, s, device=device), torch.arange(s - t, device=device)])
        return gather, scatter, 0

    def describe(self, layout: TokenLayout, device) -> BlockSparsity:
        layout = self._text_after(layout)
        c = self.config
        mask = radial_pattern.block_mask(
            layout.frames, layout.tokens_per_frame, block_size=c.block_size, decay=c.decay,
            sink=c.sink, text_tokens=layout.text_tokens, device=device,
        )
        return from_block_mask(mask, layout.seq_len, block_m=c.block_size)

    def reference_mask(self, layout: TokenLayout):
        """Token-level ``[S, S]`` twin for tests: the block mask expanded to tokens."""
        from diffattn.patterns.blocks import expand_block_mask

        c = self.config
        mask = radial_pattern.block_mask(layout.frames, layout.tokens_per_frame, block_size=c.block_size,
                                         decay=c.decay, sink=c.sink, text_tokens=layout.text_tokens)
        tok = expand_block_mask(mask, layout.seq_len, layout.seq_len, c.block_size, c.block_size)
        order = self.token_order(layout, "cpu")
        if order is None:
            return tok
        pos = order[1]  # model token -> its position in the mask's order
        return tok[pos][:, pos]
