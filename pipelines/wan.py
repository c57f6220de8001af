"""Wan2.1 / Wan2.2 adapter (``WanTransformer3DModel``; T2V, I2V, both Wan2.2 experts).

Methods replace the self-attention ``blocks.{i}.attn1`` only: Wan's text and I2V image tokens go
through the cross-attention ``attn2``, which keeps its stock processor. Tokens are frame-major over
the patchified grid (research/ecosystem.md §2.1).

``Processor`` mirrors ``diffusers.models.transformers.transformer_wan.WanAttnProcessor`` of
diffusers 0.42.1 for self-attention (fused or separate projections, RMS norms across heads,
interleaved RoPE) and hands the core attention to the method.
"""

from __future__ import annotations

import torch

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor

MODEL_CLASSES = ("WanTransformer3DModel",)
FAMILIES = ("wan2.1", "wan2.2")


def family(model, pipe=None) -> str:
    """"wan2.2" for the two-expert A14B pipelines and the TI2V-5B (48 channels), else "wan2.1"."""
    if pipe is not None and (
        getattr(pipe, "transformer_2", None) is not None or getattr(pipe.config, "expand_timesteps", False)
    ):
        return "wan2.2"
    if model.config.in_channels == 48:
        return "wan2.2"
    return "wan2.1"


def targets(model) -> dict[str, int]:
    return {f"blocks.{i}.attn1.processor": i for i in range(len(model.blocks))}


def patch_size(model) -> tuple[int, int, int]:
    return tuple(model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout:
    _, _, frames, height, width = hidden_states.shape  # [B, C, F, H, W] latents
    p_t, p_h, p_w = model.config.patch_size
    return TokenLayout(frames // p_t, height // p_h, width // p_w)


def _apply_rotary(hidden_states, freqs_cos, freqs_sin):
    # interleaved pairs, as in WanAttnProcessor (diffusers 0.42.1)
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class Processor(DiffattnProcessor):
    NO_CP = None  # context parallelism: pipelines.parallel

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError(
                "diffattn's Wan processor serves self-attention (attn1) only; cross-attention must keep "
                "the stock WanAttnProcessor (use diffattn.processors(model, ...) to build the dict)"
            )
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, heads, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)

        hidden_states = self.attend(
            query, key, value, self.video_layout(), attention_mask=attention_mask,
            method_ok=attention_mask is None,
            dense_note="diffattn wan: an explicit attention_mask was passed; running dense" if attention_mask is not None else None,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
