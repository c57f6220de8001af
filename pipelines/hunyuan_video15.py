"""HunyuanVideo-1.5 adapter (``HunyuanVideo15Transformer3DModel``: T2V and I2V).

Methods replace the joint attention of the double-stream blocks ``transformer_blocks.{i}.attn``
(layer ``i``); the token refiners keep their stock processors. The joint sequence is
[video; text], where the model has already put each sample's valid text tokens (image, ByT5 and
Qwen streams) first and its padding last, so valid keys are a prefix: padded text keys are masked
through per-sample valid-key counts. The stock processor masks padded text rows entirely (their
output is undefined: SDPA on a fully masked row); here they are zeroed. Video and valid text
tokens get the same result either way. The grid comes from the latent shape ``[B, C, F, H, W]``
and the patch sizes.

Calls the schedule keeps dense (and teacher passes) run the stock processor object itself, so a
dense configuration is the stock model bit for bit.

``Processor`` mirrors ``HunyuanVideo15AttnProcessor2_0`` of diffusers 0.42.1.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor, prefix_counts, zero_padded_text

MODEL_CLASSES = ("HunyuanVideo15Transformer3DModel",)
FAMILIES = ("hunyuan_video15",)


def family(model, pipe=None) -> str:
    return "hunyuan_video15"


def targets(model) -> dict[str, int]:
    return {f"transformer_blocks.{i}.attn.processor": i for i in range(len(model.transformer_blocks))}


def patch_size(model) -> tuple[int, int, int]:
    return (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout:
    _, _, frames, height, width = hidden_states.shape  # [B, C, F, H, W] latents
    p_t, p, _ = patch_size(model)
    return TokenLayout(frames // p_t, height // p, width // p)


class Processor(DiffattnProcessor):
    NO_CP = (
        "diffattn hunyuan_video15: diffusers 0.42 has no HunyuanVideo-1.5 plan, and its attention reorders "
        "the valid text per sample inside the processor, which a sequence split would cut; run it on one GPU "
        "per process"
    )

    def __init__(self, handle, layer: int, stock=None, site: str = ""):
        if stock is None or type(stock).__name__ != "HunyuanVideo15AttnProcessor2_0":
            raise NotImplementedError(
                f"diffattn hunyuan_video15: {site} has processor {type(stock).__name__}; diffattn mirrors "
                "HunyuanVideo15AttnProcessor2_0 of diffusers 0.42.1 only (reset it before diffattn.apply)"
            )
        super().__init__(handle, layer, stock, site)
        self.stock = stock

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        video = self.video_layout()
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        layout = TokenLayout(video.frames, video.rows, video.cols, text, "after" if text else "none")
        note = counts = None
        if layout.video_tokens != hidden_states.shape[1]:
            note = f"diffattn hunyuan_video15: {hidden_states.shape[1]} video tokens but the forward's grid is {video!r}; running dense"
        elif text and (counts := prefix_counts(attention_mask, text)) is None:
            note = "diffattn hunyuan_video15: the text mask is not a prefix; running dense"
        if not self.runs_method(layout, note):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))  # [B, S, heads, D]
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if text:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)  # [video; text]
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)

        n = layout.video_tokens
        kv_len = (lambda: (n + counts).to(torch.int32)) if text else None
        out = self.attend(query, key, value, layout, kv_len=kv_len)
        if text:
            out = zero_padded_text(out, n, counts)  # padded text rows (undefined in the stock processor)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, encoder_hidden_states
        hidden_states, encoder_hidden_states = out[:, :n], out[:, n:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
