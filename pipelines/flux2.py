"""FLUX.2 adapter (``Flux2Transformer2DModel``: FLUX.2 dev and klein).

Methods replace the joint attention of the double-stream blocks (layers 0..N-1, ``Flux2Attention``)
and of the single-stream blocks (layers N.., ``Flux2ParallelSelfAttention``, whose fused
QKV + MLP projection and parallel output projection are reproduced as they are); the token order is
[text; image] in both. The grid is read from ``img_ids`` ((t, h, w, l) position ids, one host read
per forward), the text length from ``encoder_hidden_states``.

- Reference images (FLUX.2 editing: their tokens are appended with other t ids) and the KV-cache
  modes (``kv_cache_mode``) have no single image grid: such forwards run the stock attention, with a
  note in the report. The KV-cache processors (``Flux2KVAttnProcessor``,
  ``Flux2KVParallelSelfAttnProcessor``) are not replaced: ``apply`` raises and says to reset them.
- CFG runs as separate forwards (each records its layout).
- An explicit ``attention_mask`` runs the stock attention (note in the report).

``Processor`` mirrors ``Flux2AttnProcessor`` and ``Flux2ParallelSelfAttnProcessor`` of diffusers
0.42.1 and hands the core attention to the method.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor, double_single_targets, grid_from_ids

MODEL_CLASSES = ("Flux2Transformer2DModel",)
FAMILIES = ("flux2",)
BLOCK_RETURNS = ("encoder_hidden_states", "hidden_states")  # the order its blocks return (guidance block skips)
STOCK = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")


def family(model, pipe=None) -> str:
    return "flux2"


def targets(model) -> dict[str, int]:
    return double_single_targets(model)


def patch_size(model) -> tuple[int, int, int]:
    """VAE latent cells per token: the pipeline packs 2 x 2 latent cells into one token."""
    return (1, 2 * model.config.patch_size, 2 * model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout | str:
    inputs = inputs or {}
    img_ids, text = inputs.get("img_ids"), inputs.get("encoder_hidden_states")
    if img_ids is None or text is None:
        raise ValueError("diffattn flux2: the transformer must be called with img_ids and encoder_hidden_states (as Flux2Pipeline does)")
    if inputs.get("kv_cache_mode") is not None:
        return "diffattn flux2: KV-cache mode (reference tokens); running dense"
    found = grid_from_ids(img_ids, hidden_states.shape[1])  # ids (t, h, w, l); tokens [B, S, C]
    if found is None:
        return "diffattn flux2: img_ids do not form one image grid (reference images or custom ids); running dense"
    rows, cols = found
    return TokenLayout(1, rows, cols, text.shape[1], "before" if text.shape[1] else "none")


def Processor(handle, layer: int, stock=None, site: str = ""):  # noqa: N802 - the adapter protocol's name
    """The processor for one site: the two FLUX.2 attention modules call their processors with
    different positional arguments, so single-stream sites get ``SingleProcessor``."""
    if stock is not None and type(stock).__name__ not in STOCK:
        raise NotImplementedError(
            f"diffattn flux2: {site} has processor {type(stock).__name__}; diffattn replaces {STOCK} only "
            "(reset the KV-cache processors with transformer.set_attn_processor(...) to the stock ones first)"
        )
    single = type(stock).__name__ == STOCK[1] if stock is not None else "single_transformer_blocks" in site
    return (SingleProcessor if single else DoubleProcessor)(handle, layer, stock, site)


class DoubleProcessor(DiffattnProcessor):
    """``Flux2Attention`` (double-stream blocks): called as (attn, hidden, encoder, mask, rope)."""

    NO_CP = None  # context parallelism: pipelines.parallel

    def _layout(self, seq: int, note: str | None):
        layout, why = self.handle.state.layout, self.handle.state.no_layout
        if layout is None and why is None:
            layout = self.video_layout()  # raises: the layout hook did not run
        note = note or why
        if layout is not None and layout.seq_len != seq and note is None:
            note = f"diffattn flux2: this attention has {seq} tokens but the forward's layout {layout!r} has {layout.seq_len}; running dense"
        return (layout if layout is not None else TokenLayout(1, 1, seq)), note

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        return self.run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def run(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        parallel = hasattr(attn, "to_qkv_mlp_proj")  # single-stream block
        if parallel:
            hidden_states = attn.to_qkv_mlp_proj(hidden_states)
            qkv_dim = 3 * attn.inner_dim
            mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
            local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
            qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
            query, key, value = qkv.chunk(3, dim=-1)
        elif attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, S, heads, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        joint = not parallel and encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if attn.fused_projections and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)  # [text; image]
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        mask_note = "diffattn flux2: an explicit attention_mask was passed; running dense" if attention_mask is not None else None
        layout, note = self._layout(query.shape[1] * self.cp_world(), mask_note)
        hidden_states = self.attend(query, key, value, layout, attention_mask=attention_mask,
                                    method_ok=note is None, dense_note=note)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if parallel:
            mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
            return attn.to_out(torch.cat([hidden_states, mlp_hidden_states], dim=-1))
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class SingleProcessor(DoubleProcessor):
    """``Flux2ParallelSelfAttention`` (single-stream blocks): called as (attn, hidden, mask, rope)."""

    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None):
        return self.run(attn, hidden_states, None, attention_mask, image_rotary_emb)
