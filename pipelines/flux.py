"""FLUX.1 adapter (``FluxTransformer2DModel``: dev, schnell, Fill, Canny/Depth, Kontext).

Methods replace the joint attention of the double-stream blocks (layers 0..N-1) and of the
single-stream blocks (layers N..); the token order is [text; image] in both. The image grid is
read from ``img_ids`` (the pipeline's (0, y, x) position ids: one host read per forward) and the
text length from ``encoder_hidden_states`` (whatever ``max_sequence_length`` the pipeline used).

- ``true_cfg_scale`` > 1 (FluxPipeline's negative-prompt pass) is a second transformer forward;
  it records its own layout and runs the same method.
- IP-adapter: when the stock processor is diffusers' ``FluxIPAdapterAttnProcessor``, the IP branch
  (image queries against the IP tokens) runs exactly as in the stock processor, on its weights; the
  method replaces the main attention only.
- Kontext's reference-image tokens (``img_ids`` that do not form one grid) have no layout a method
  can use: such forwards run the stock attention, with a note in the report.
- An explicit ``attention_mask`` runs the stock attention (note in the report).

``Processor`` mirrors ``FluxAttnProcessor`` / ``FluxIPAdapterAttnProcessor`` of diffusers 0.42.1.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor, double_single_targets, grid_from_ids

MODEL_CLASSES = ("FluxTransformer2DModel",)
FAMILIES = ("flux",)
BLOCK_RETURNS = ("encoder_hidden_states", "hidden_states")  # the order its blocks return (guidance block skips)


def family(model, pipe=None) -> str:
    return "flux"


def targets(model) -> dict[str, int]:
    return double_single_targets(model)


def patch_size(model) -> tuple[int, int, int]:
    """VAE latent cells per token: the pipeline packs 2 x 2 latent cells into one token."""
    return (1, 2 * model.config.patch_size, 2 * model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout | str:
    inputs = inputs or {}
    img_ids, text = inputs.get("img_ids"), inputs.get("encoder_hidden_states")
    if img_ids is None or text is None:
        raise ValueError("diffattn flux: the transformer must be called with img_ids and encoder_hidden_states (as FluxPipeline does)")
    found = grid_from_ids(img_ids, hidden_states.shape[1])  # ids (0, y, x); tokens [B, S, C]
    if found is None:
        return ("diffattn flux: img_ids do not form one image grid (Kontext reference tokens or custom ids); "
                "running dense")
    rows, cols = found
    return TokenLayout(1, rows, cols, text.shape[1], "before" if text.shape[1] else "none")


def Processor(handle, layer: int, stock=None, site: str = ""):  # noqa: N802 - the adapter protocol's name
    """The processor for one site; ``IPProcessor`` where the stock one carries IP-adapter weights."""
    if stock is not None and hasattr(stock, "to_k_ip"):
        return IPProcessor(handle, layer, stock, site)
    return JointProcessor(handle, layer, stock, site)


class JointProcessor(DiffattnProcessor):
    NO_CP = None  # context parallelism: pipelines.parallel

    ip = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ):
        batch_size = hidden_states.shape[0]
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))  # [B, S, heads, D]
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        ip_query = query

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if attn.fused_projections:
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

        layout, note = self.handle.state.layout, self.handle.state.no_layout
        if layout is None and note is None:
            layout = self.video_layout()  # raises: the layout hook did not run
        if layout is not None and layout.seq_len != query.shape[1] * self.cp_world():
            note = (f"diffattn flux: this attention has {query.shape[1] * self.cp_world()} tokens but the forward's layout {layout!r} "
                    f"has {layout.seq_len}; running dense")
        if attention_mask is not None:
            note = "diffattn flux: an explicit attention_mask was passed; running dense"
        hidden_states = self.attend(
            query, key, value, layout if layout is not None else TokenLayout(1, 1, query.shape[1] * self.cp_world()),
            attention_mask=attention_mask, method_ok=note is None, dense_note=note,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        if self.ip is None:
            return hidden_states, encoder_hidden_states
        return hidden_states, encoder_hidden_states, self._ip_branch(attn, ip_query, ip_hidden_states, batch_size)

    def _ip_branch(self, attn, ip_query, ip_hidden_states, batch_size):
        """The IP-adapter term of ``FluxIPAdapterAttnProcessor`` (dense; image queries vs IP tokens)."""
        ip = self
        out = torch.zeros(batch_size, ip_query.shape[1], attn.heads * attn.head_dim, device=ip_query.device, dtype=ip_query.dtype)
        for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states or [], ip.scale, ip.to_k_ip, ip.to_v_ip):
            ip_key = to_k_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            term = dispatch_attention_fn(
                ip_query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
            out += scale * term.reshape(batch_size, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
        return out


class IPProcessor(JointProcessor, torch.nn.Module):
    """Where diffusers' ``FluxIPAdapterAttnProcessor`` was: its IP weights (``to_k_ip``, ``to_v_ip``,
    ``scale``) stay in the module tree under the same names, so ``.to()``, offloading and
    ``state_dict`` see them as before."""

    NO_CP = ("diffattn flux: FLUX's context-parallel plan does not split IP-adapter image tokens; unload the "
             "IP-adapter or run without context parallelism")

    def __init__(self, handle, layer: int, stock, site: str = ""):
        torch.nn.Module.__init__(self)
        JointProcessor.__init__(self, handle, layer, stock, site)
        self.to_k_ip, self.to_v_ip, self.scale = stock.to_k_ip, stock.to_v_ip, stock.scale
        self.ip = True

    def __repr__(self) -> str:
        return JointProcessor.__repr__(self)
