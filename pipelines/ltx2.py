"""LTX-2 adapter (``LTX2VideoTransformer3DModel``: LTX-2 / LTX-2.3 audio-video T2V and I2V).

An LTX-2 block runs six attentions: video self-attention ``attn1``, audio self-attention
``audio_attn1``, text cross-attention for each stream (``attn2``, ``audio_attn2``) and the two
cross-modal ones, audio-to-video (queries video, keys audio) and video-to-audio. Methods replace the
video self-attention ``transformer_blocks.{i}.attn1`` only (layer ``i``): it is the one square
attention over the 3-D latent grid, where radial's space-time decay and a neighborhood window mean
what they mean on Wan; it is also where the cost is (video tokens x video tokens). The others keep
their stock processors, for these reasons: the audio self-attention runs over a 1-D sequence of
about 25 tokens per second (no grid, and a few hundred to a thousand tokens: nothing to gain); the
cross-attentions are rectangular (video x text, video x audio, audio x video), with keys that have
no position in the video grid, so no block pattern of these methods applies to them.

The transformer receives packed tokens ``[B, S, C]``, frame-major over the latent grid, and the
grid as ``num_frames``, ``height``, ``width`` (latent units, before patchifying), as LTX-Video. A
forward whose tokens are not that grid (keyframe or reference tokens appended by
``LTX2ConditionPipeline`` or the IC-LoRA pipeline) or that passes a ``video_self_attention_mask``
runs the stock attention, with a note in the report.

At LTX-2's default 512 x 768, 121 frames, the VAE (8 x 32 x 32) gives 16 x 24 = 384 tokens per frame
over 16 latent frames (6,144 tokens): under three 128-token blocks per frame, so the sparsity pays
only from about 1080p or long clips on (benchmarks/RESULTS.md).

``Processor`` mirrors ``LTX2AudioVideoAttnProcessor`` and ``LTX2PerturbedAttnProcessor`` of
diffusers 0.42.1 for self-attention: RMS norms across heads, interleaved or split RoPE, the per-head
output gates (``to_gate_logits``, LTX-2.3) and, for the perturbed processor, the STG lerp towards V
per sample (``perturbation_mask``) and the all-perturbed shortcut (no attention at all).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

from diffattn.core.layout import TokenLayout

from . import ltx
from .base import DiffattnProcessor
from .ltx import patch_size, targets  # the same block list and patchify as LTX-Video

__all__ = ["FAMILIES", "MODEL_CLASSES", "NO_GUIDANCE", "Processor", "family", "grid", "patch_size", "targets"]

MODEL_CLASSES = ("LTX2VideoTransformer3DModel",)
FAMILIES = ("ltx2",)
STOCK = ("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor")
# diffattn's guidance hooks do not cover LTX-2's audio-video forward; the pipeline's own STG runs through
# the mirrored perturbed processor
NO_GUIDANCE = ("diffattn guidance: LTX-2 pipelines run their own STG and modality guidance (stg_scale=, "
               "spatio_temporal_guidance_blocks=, e.g. [29] on LTX-2.0), which diffattn's processors keep working; "
               "diffattn's guidance hooks do not cover LTX-2's audio-video forward: use the pipeline's")


def family(model, pipe=None) -> str:
    return "ltx2"


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout | str:
    if (inputs or {}).get("video_self_attention_mask") is not None:
        return "diffattn ltx2: a video_self_attention_mask was passed (IC-LoRA reference tokens); running dense"
    return ltx.grid(model, hidden_states, inputs, name="ltx2", extra="keyframe or reference tokens?")


def _rope(attn, x: torch.Tensor, freqs) -> torch.Tensor:
    if attn.rope_type == "interleaved":
        return apply_interleaved_rotary_emb(x, freqs)
    if attn.rope_type == "split":
        return apply_split_rotary_emb(x, freqs)
    return x  # the stock processors apply no RoPE for other rope_type values either


class Processor(DiffattnProcessor):
    NO_CP = None  # context parallelism: pipelines.parallel

    def __init__(self, handle, layer: int, stock=None, site: str = ""):
        if stock is not None and type(stock).__name__ not in STOCK:
            raise NotImplementedError(
                f"diffattn ltx2: {site} has processor {type(stock).__name__}; diffattn mirrors {' and '.join(STOCK)} "
                "of diffusers 0.42.1 only (reset it before diffattn.apply)"
            )
        super().__init__(handle, layer, stock, site)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, query_rotary_emb=None, key_rotary_emb=None,
                 perturbation_mask: torch.Tensor | None = None, all_perturbed: bool | None = None):
        if encoder_hidden_states is not None:
            raise ValueError("diffattn's LTX-2 processor serves the video self-attention (attn1) only; the cross-attentions "
                             "keep the stock processor")
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None  # [B, S, heads]
        value = attn.to_v(hidden_states)  # [B, S, heads * D]
        if all_perturbed is None:
            all_perturbed = bool(torch.all(perturbation_mask == 0)) if perturbation_mask is not None else False
        if all_perturbed:  # STG on every sample: the attention output is V itself (the perturbed processor's shortcut)
            self.handle.record(self.site, mode="dense", layout=None, note="ltx2: all samples perturbed (STG): V, no attention")
            out = value
        else:
            query = attn.norm_q(attn.to_q(hidden_states))
            key = attn.norm_k(attn.to_k(hidden_states))
            if query_rotary_emb is not None:
                query = _rope(attn, query, query_rotary_emb)
                key = _rope(attn, key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
            query = query.unflatten(2, (attn.heads, -1))  # [B, S, heads, D]
            key = key.unflatten(2, (attn.heads, -1))
            heads_value = value.unflatten(2, (attn.heads, -1))
            layout, note = self.handle.state.layout, self.handle.state.no_layout
            if layout is None and note is None:
                layout = self.video_layout()  # raises: the layout hook did not run
            if attention_mask is not None:
                note = "diffattn ltx2: an explicit attention_mask was passed; running dense"
            out = self.attend(query, key, heads_value, layout if layout is not None else TokenLayout(1, 1, sequence_length * self.cp_world()),
                              attention_mask=attention_mask, method_ok=note is None, dense_note=note)
            out = out.flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:  # STG per sample: 0 -> V, 1 -> attention
                out = torch.lerp(value, out, perturbation_mask)
        if gate_logits is not None:
            out = out.unflatten(2, (attn.heads, -1)) * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)  # [B, S, heads, D]
            out = out.flatten(2, 3)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
