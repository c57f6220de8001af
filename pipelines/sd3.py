"""SD3 / SD3.5 adapter (``SD3Transformer2DModel``).

Methods replace the joint attention ``transformer_blocks.{i}.attn`` (token order [image; text])
and, in SD3.5's dual-attention blocks, the image-only self-attention ``transformer_blocks.{i}.attn2``
(no text); both count as layer ``i``. The grid comes from the latent shape ``[B, C, H, W]`` and the
patch size, the text length from ``encoder_hidden_states`` (CLIP 77 + T5 ``max_sequence_length``).
CFG runs one batched forward (cond and uncond share the layout). IP-adapter processors
(``SD3IPAdapterJointAttnProcessor2_0``) are not replaced: ``apply`` raises and says to unload the
IP adapter first.

``Processor`` mirrors ``JointAttnProcessor2_0`` of diffusers 0.42.1 and hands the core attention
to the method.
"""

from __future__ import annotations

import torch

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor

MODEL_CLASSES = ("SD3Transformer2DModel",)
FAMILIES = ("sd3",)
BLOCK_RETURNS = ("encoder_hidden_states", "hidden_states")  # the order its blocks return (guidance block skips)


def family(model, pipe=None) -> str:
    return "sd3"


def targets(model) -> dict[str, int]:
    out = {}
    for i, block in enumerate(model.transformer_blocks):
        out[f"transformer_blocks.{i}.attn.processor"] = i
        if getattr(block, "attn2", None) is not None:
            out[f"transformer_blocks.{i}.attn2.processor"] = i
    return out


def patch_size(model) -> tuple[int, int, int]:
    return (1, model.config.patch_size, model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout:
    _, _, height, width = hidden_states.shape  # [B, C, H, W] latents
    p = model.config.patch_size
    text = (inputs or {}).get("encoder_hidden_states")
    tokens = 0 if text is None else text.shape[1]
    return TokenLayout(1, height // p, width // p, tokens, "after" if tokens else "none")


class Processor(DiffattnProcessor):
    NO_CP = (
        "diffattn sd3: diffusers 0.42 has no SD3 plan and diffattn provides none (image models reach 4K on "
        "one GPU with CLEAR); run SD3 on one GPU per process"
    )

    def __init__(self, handle, layer: int, stock=None, site: str = ""):
        if stock is not None and type(stock).__name__ != "JointAttnProcessor2_0":
            raise NotImplementedError(
                f"diffattn sd3: {site} has processor {type(stock).__name__}; diffattn replaces JointAttnProcessor2_0 "
                "only (unload the IP adapter, or reset processors with transformer.set_attn_processor("
                "JointAttnProcessor2_0()), before diffattn.apply)"
            )
        super().__init__(handle, layer, stock, site)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        image_tokens = hidden_states.shape[1]
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, S, heads, D]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        text = 0
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)  # [image; text]
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)

        grid_layout = self.video_layout()
        layout = TokenLayout(1, grid_layout.rows, grid_layout.cols, text, "after" if text else "none")
        note = None
        if layout.video_tokens != image_tokens:
            note = f"diffattn sd3: {image_tokens} image tokens but the forward's grid is {grid_layout!r}; running dense"
        # JointAttnProcessor2_0 ignores attention_mask; so does this processor
        hidden_states = self.attend(query, key, value, layout, method_ok=note is None, dense_note=note)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
