"""CogVideoX adapter (``CogVideoXTransformer3DModel``: CogVideoX 1.0 2B / 5B and 1.5, T2V and I2V).

Methods replace the joint attention ``transformer_blocks.{i}.attn1`` (layer ``i``). The joint
sequence is [text; video] (226 T5 tokens, never masked by the pipeline), video tokens frame-major
over the patchified grid (research/ecosystem.md §2.4). The grid comes from the latent shape
``[B, F, C, H, W]`` (frames second) and the patch sizes; CogVideoX 1.5's temporal patch
``patch_size_t = 2`` halves the frames (the pipeline pads them to a multiple). I2V models
concatenate the image latent along channels, so their grid is the same.

Radial needs the text after the video: it runs in the order [video; text] (a token permutation
undone on the output); neighborhood and the rest take the text where it is.

``Processor`` mirrors ``CogVideoXAttnProcessor2_0`` of diffusers 0.42.1 (RoPE on the video part
only, the prepared attention mask when one is passed) and hands the core attention to the method.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor

MODEL_CLASSES = ("CogVideoXTransformer3DModel",)
FAMILIES = ("cogvideox",)


def family(model, pipe=None) -> str:
    return "cogvideox"


def targets(model) -> dict[str, int]:
    return {f"transformer_blocks.{i}.attn1.processor": i for i in range(len(model.transformer_blocks))}


def patch_size(model) -> tuple[int, int, int]:
    return (model.config.patch_size_t or 1, model.config.patch_size, model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout:
    _, frames, _, height, width = hidden_states.shape  # [B, F, C, H, W] latents
    p_t, p, _ = patch_size(model)
    return TokenLayout(-(-frames // p_t), height // p, width // p)


class Processor(DiffattnProcessor):
    NO_CP = (
        "diffattn cogvideox: diffusers 0.42 has no CogVideoX plan, and its forward cuts the text off the "
        "joint sequence by the full text length after the blocks, so a split needs a gather before "
        "norm_final; its 226 text tokens divide by 2 only. diffattn provides no plan: run CogVideoX on one "
        "GPU per process"
    )

    def __init__(self, handle, layer: int, stock=None, site: str = ""):
        if stock is not None and type(stock).__name__ != "CogVideoXAttnProcessor2_0":
            raise NotImplementedError(
                f"diffattn cogvideox: {site} has processor {type(stock).__name__}; diffattn mirrors "
                "CogVideoXAttnProcessor2_0 of diffusers 0.42.1 only (reset it before diffattn.apply)"
            )
        super().__init__(handle, layer, stock, site)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [text; video]
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, S, heads, D]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :text], apply_rotary_emb(query[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :text], apply_rotary_emb(key[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)

        video = self.video_layout()
        layout = TokenLayout(video.frames, video.rows, video.cols, text, "before" if text else "none")
        note = None
        if layout.seq_len != sequence_length:
            note = f"diffattn cogvideox: {sequence_length} tokens but the forward's layout {layout!r} has {layout.seq_len}; running dense"
        if attention_mask is not None:
            note = "diffattn cogvideox: an explicit attention_mask was passed; running dense"
        hidden_states = self.attend(query, key, value, layout, attention_mask=attention_mask,
                                    method_ok=note is None, dense_note=note)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split([text, hidden_states.size(1) - text], dim=1)
        return hidden_states, encoder_hidden_states
