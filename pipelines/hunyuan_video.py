"""HunyuanVideo adapter (``HunyuanVideoTransformer3DModel``).

Methods replace the joint attention of the 20 double-stream blocks (layers 0-19) and the 40
single-stream blocks (layers 20-59), the numbering of the radial reference. The token order is
[video; text]; padded text keys are masked through the model's ``attention_mask`` (a [B, 1, 1, S]
bool prefix mask built in the transformer's forward), passed to methods as per-sample valid-key
counts. The text refiner (``context_embedder``) keeps its stock processors.

``Processor`` mirrors ``HunyuanVideoAttnProcessor2_0`` of diffusers 0.42.1 and hands the core
attention to the method.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffattn.core.layout import TokenLayout

from .base import DiffattnProcessor, double_single_targets

MODEL_CLASSES = ("HunyuanVideoTransformer3DModel",)
FAMILIES = ("hunyuan_video",)


def family(model, pipe=None) -> str:
    return "hunyuan_video"


def targets(model) -> dict[str, int]:
    return double_single_targets(model)


def patch_size(model) -> tuple[int, int, int]:
    return (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)


def grid(model, hidden_states: torch.Tensor, inputs=None) -> TokenLayout:
    _, _, frames, height, width = hidden_states.shape  # [B, C, F, H, W] latents
    p, p_t = model.config.patch_size, model.config.patch_size_t
    return TokenLayout(frames // p_t, height // p, width // p)


# Attention that stays on every rank's full input under context parallelism: the text refiner runs
# before the plan splits the text.
CP_LOCAL = ("context_embedder",)


def cp_plan(model) -> dict:
    """diffattn's context-parallel plan (diffusers 0.42 has none for HunyuanVideo): the patch
    embedding's video tokens, the refined text and the RoPE tables split over the sequence, the
    output gathered. Only for diffattn's processors: the forward builds its padded-text mask from
    the split lengths, which they rebuild from the full mask (``forward_facts``)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    if getattr(model.config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError(
            "diffattn hunyuan_video: the I2V token-replace model modulates the first frame's tokens by position in "
            "every block, which a sequence split moves to rank 0 only; run it without context parallelism"
        )
    split_out = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)
    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        "x_embedder": {0: split_out},
        "context_embedder": {0: split_out},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def forward_facts(model, inputs) -> dict:
    """The valid text tokens per sample, from the forward's full ``encoder_attention_mask`` [B, T]
    (under context parallelism the mask the forward builds covers the rank's slice only)."""
    mask = inputs.get("encoder_attention_mask")
    return {} if mask is None else {"text_valid": mask.sum(1, dtype=torch.int32)}


def _valid_keys(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """[B, 1, 1, S] bool prefix mask -> [B] int32 valid-key counts (None: no mask)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.numel() != batch * seq:
        raise NotImplementedError(
            "diffattn hunyuan_video: expected the transformer's [B, 1, 1, S] bool key mask, got "
            f"dtype={attention_mask.dtype}, shape={tuple(attention_mask.shape)}"
        )
    return attention_mask.reshape(batch, seq).sum(-1, dtype=torch.int32)


class Processor(DiffattnProcessor):
    NO_CP = None  # context parallelism: pipelines.parallel

    masks_text = True

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))  # [B, S, heads, D]
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-text_tokens], image_rotary_emb, sequence_dim=1), query[:, -text_tokens:]],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-text_tokens], image_rotary_emb, sequence_dim=1), key[:, -text_tokens:]],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        video = self.video_layout()
        world = self.cp_world()  # context parallelism: this rank holds 1/world of the video and of the text
        layout = TokenLayout(video.frames, video.rows, video.cols, text_tokens * world, "after" if text_tokens else "none")
        if world == 1:
            kv_len = lambda: _valid_keys(attention_mask, query.shape[0], query.shape[1])  # noqa: E731
        else:
            kv_len = lambda: self._split_valid_keys(layout)  # noqa: E731
        hidden_states = self.attend(query, key, value, layout, attention_mask=attention_mask, kv_len=kv_len)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, :-text_tokens],
                hidden_states[:, -text_tokens:],
            )
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def _split_valid_keys(self, layout: TokenLayout) -> torch.Tensor | None:
        counts = self.handle.state.forward.get("text_valid")
        if counts is None:
            return None
        return (layout.video_tokens + counts).to(torch.int32)
