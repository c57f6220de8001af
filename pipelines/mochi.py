"""Mochi adapter (``MochiTransformer3DModel``: Mochi 1 preview).

Methods replace the asymmetric joint attention ``transformer_blocks.{i}.attn1`` (layer ``i``):
video and text have their own projections, and the text stream of the last block is projected
only partly (``to_add_out`` may be absent); the joint sequence is [video; text]. The stock processor
drops each sample's padded text tokens (the T5 mask, a prefix) before attention and returns zeros
for them; here the padded text keys are masked through per-sample valid-key counts and the padded
text rows are zeroed, which is the same computation. The grid comes from the latent shape
``[B, C, F, H, W]`` and the spatial patch (Mochi has no temporal patch).

Calls the schedule keeps dense (and teacher passes) run the stock processor object itself, so a
dense configuration is the stock model bit for bit. A text mask that is not a prefix runs dense too,
with a note.

``Processor`` mirrors ``MochiAttnProcessor2_0`` of diffusers 0.42.1.
"""

from __future__ import annotations

import torch

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor, prefix_counts, zero_padded_text

MODEL_CLASSES = ("MochiTransformer3DModel",)
FAMILIES = ("mochi",)


def family(model, pipe=None) -> str:
    return "mochi"


def targets(model) -> dict[str, int]:
    return {f"transformer_blocks.{i}.attn1.processor": i for i in range(len(model.transformer_blocks))}


def patch_size(model) -> tuple[int, int, int]:
    return (1, model.config.patch_size, model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout:
    _, _, frames, height, width = hidden_states.shape  # [B, C, F, H, W] latents
    p = model.config.patch_size
    return TokenLayout(frames, height // p, width // p)


def _rope(x, freqs_cos, freqs_sin):
    # MochiAttnProcessor2_0's interleaved rotation, in fp32
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class Processor(DiffattnProcessor):
    NO_CP = (
        "diffattn mochi: Mochi's attention keeps only each sample's valid text tokens (a per-sample loop), so"
        " after a sequence split the ranks' sequence lengths differ and no all-to-all fits; diffusers 0.42 "
        "has no Mochi plan and diffattn provides none: run Mochi on one GPU per process"
    )

    def __init__(self, handle, layer: int, stock=None, site: str = ""):
        if stock is None or type(stock).__name__ != "MochiAttnProcessor2_0":
            raise NotImplementedError(
                f"diffattn mochi: {site} has processor {type(stock).__name__}; diffattn mirrors MochiAttnProcessor2_0 "
                "of diffusers 0.42.1 only (reset it before diffattn.apply)"
            )
        super().__init__(handle, layer, stock, site)
        self.stock = stock

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb=None):
        video = self.video_layout()
        text = encoder_hidden_states.shape[1]
        layout = TokenLayout(video.frames, video.rows, video.cols, text, "after")
        note = counts = None
        if layout.video_tokens != hidden_states.shape[1]:
            note = f"diffattn mochi: {hidden_states.shape[1]} video tokens but the forward's grid is {video!r}; running dense"
        elif (counts := prefix_counts(attention_mask, text)) is None:
            note = "diffattn mochi: the text mask is not a prefix; running dense"
        if not self.runs_method(layout, note):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))  # [B, S, heads, D]
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        if image_rotary_emb is not None:
            query = _rope(query, *image_rotary_emb)
            key = _rope(key, *image_rotary_emb)
        query = torch.cat([query, eq], dim=1)  # [video; text]
        key = torch.cat([key, ek], dim=1)
        value = torch.cat([value, ev], dim=1)

        n = layout.video_tokens
        out = self.attend(query, key, value, layout, kv_len=lambda: (n + counts).to(torch.int32))
        out = zero_padded_text(out, n, counts)  # as the stock processor, which drops those rows
        out = out.flatten(2, 3)
        hidden_states, encoder_hidden_states = out.split_with_sizes((n, text), dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
