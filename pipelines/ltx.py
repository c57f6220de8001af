"""LTX-Video adapter (``LTXVideoTransformer3DModel``: LTX-Video 0.9.x T2V and I2V).

Methods replace the self-attention ``transformer_blocks.{i}.attn1`` (layer ``i``); the
cross-attention to the T5 tokens (``attn2``) keeps its stock processor. The transformer receives
packed tokens ``[B, S, C]``, frame-major over the latent grid, and the grid itself as the
``num_frames``, ``height``, ``width`` keyword arguments (latent units, research/ecosystem.md §2.5).
A forward whose tokens are not that grid (conditioning tokens appended by ``LTXConditionPipeline``)
runs the stock attention, with a note in the report.

At LTX's native 512 x 704 a frame is 16 x 22 = 352 tokens, under three 128-token blocks: radial
and neighborhood run and are exact, but the share of computed blocks stays high at that size; the
sparsity pays from about 720p or long clips on (benchmarks/RESULTS.md).

``Processor`` mirrors ``LTXVideoAttnProcessor`` of diffusers 0.42.1 for self-attention (RMS norms
across heads, LTX's interleaved RoPE, the prepared mask when one is passed).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor

MODEL_CLASSES = ("LTXVideoTransformer3DModel",)
FAMILIES = ("ltx",)


def family(model, pipe=None) -> str:
    return "ltx"


def targets(model) -> dict[str, int]:
    return {f"transformer_blocks.{i}.attn1.processor": i for i in range(len(model.transformer_blocks))}


def patch_size(model) -> tuple[int, int, int]:
    return (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None, name: str = "ltx", extra: str = "conditioning tokens?") -> TokenLayout | str:
    """The packed tokens' grid from ``num_frames`` / ``height`` / ``width`` (latent units), or why not
    (LTX-2's adapter shares it: ``name`` and ``extra`` word its notes)."""
    inputs = inputs or {}
    frames, height, width = (inputs.get(k) for k in ("num_frames", "height", "width"))
    if frames is None or height is None or width is None:
        return f"diffattn {name}: the transformer was called without num_frames / height / width; running dense"
    p_t, p, _ = patch_size(model)
    layout = TokenLayout(int(frames) // p_t, int(height) // p, int(width) // p)
    if layout.video_tokens != hidden_states.shape[1]:
        return (f"diffattn {name}: {hidden_states.shape[1]} tokens but num_frames x height x width gives "
                f"{layout.video_tokens} ({extra}); running dense")
    return layout


class Processor(DiffattnProcessor):
    NO_CP = None  # context parallelism: pipelines.parallel

    def __init__(self, handle, layer: int, stock=None, site: str = ""):
        if stock is not None and type(stock).__name__ != "LTXVideoAttnProcessor":
            raise NotImplementedError(
                f"diffattn ltx: {site} has processor {type(stock).__name__}; diffattn mirrors LTXVideoAttnProcessor "
                "of diffusers 0.42.1 only (reset it before diffattn.apply)"
            )
        super().__init__(handle, layer, stock, site)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError("diffattn's LTX processor serves self-attention (attn1) only; attn2 keeps the stock processor")
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, heads, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        layout, note = self.handle.state.layout, self.handle.state.no_layout
        if layout is None and note is None:
            layout = self.video_layout()  # raises: the layout hook did not run
        if attention_mask is not None:
            note = "diffattn ltx: an explicit attention_mask was passed; running dense"
        hidden_states = self.attend(query, key, value, layout if layout is not None else TokenLayout(1, 1, sequence_length * self.cp_world()),
                                    attention_mask=attention_mask, method_ok=note is None, dense_note=note)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
