"""Tiny diffusers pipelines built in code: no downloads, seeded, CPU-fast.

They use the real diffusers classes (``WanPipeline``, ``WanTransformer3DModel``,
``AutoencoderKLWan``, ``HunyuanVideoTransformer3DModel``) at toy widths, in the style of
diffusers' own tests (research/ecosystem.md §5). Weights are random: outputs are noise-like, but
every attention path, token layout and step schedule is the real one.
"""

from __future__ import annotations

import torch

from .shapes import VOCABULARY

# The word-level tokenizer covers the caption vocabulary of the procedural data; unknown words map
# to <unk> (documented in word_tokenizer).
VOCAB_WORDS = VOCABULARY
SPECIAL = ("<pad>", "</s>", "<unk>")


def word_tokenizer(max_length: int = 32):
    """A ``PreTrainedTokenizerFast`` over ``VOCAB_WORDS`` (lower-cased, whitespace split, </s> appended).

    Words outside the vocabulary become ``<unk>``; ``diffattn_testbed.shapes.VOCABULARY`` lists it.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + VOCAB_WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def tiny_wan_transformer(seed: int = 0, *, layers: int = 2, heads: int = 2, head_dim: int = 16, in_channels: int = 16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=256, ffn_dim=64,
        num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()


def tiny_wan_pipeline(seed: int = 0, *, two_experts: bool = False, layers: int = 2):
    """A ``WanPipeline`` (two experts, like Wan2.2 A14B, with ``two_experts=True``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    transformer = tiny_wan_transformer(seed, layers=layers)
    transformer_2 = tiny_wan_transformer(seed + 1, layers=layers) if two_experts else None
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer,
        transformer_2=transformer_2, boundary_ratio=0.5 if two_experts else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuan_transformer(seed: int = 0, *, double_layers: int = 1, single_layers: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=double_layers, num_single_layers=single_layers, num_refiner_layers=1,
        patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def tiny_hunyuan_pipeline(seed: int = 0):
    """A ``HunyuanVideoPipeline`` at toy width (Llama + CLIP text encoders over the word tokenizer,
    8x spatial / 4x temporal VAE, 4 latent channels)."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, tokenizer_2 = word_tokenizer(256), word_tokenizer(77)
    torch.manual_seed(seed)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )).eval()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=1, projection_dim=8,
    )).eval()
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        mid_block_add_attention=False,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=tiny_hunyuan_transformer(seed, double_layers=2, single_layers=1),
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_transformer(seed: int = 0, *, double_layers: int = 1, single_layers: int = 1):
    """A ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE over (0, y, x) ids)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=double_layers, num_single_layers=single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_inputs(batch: int = 2, rows: int = 8, cols: int = 8, text: int = 6, timestep: float = 0.9, seed: int = 1):
    """Keyword inputs of one FLUX transformer forward (what FluxPipeline passes), seeded."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return dict(
        hidden_states=torch.randn(batch, rows * cols, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), timestep),
        img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3),
    )


def tiny_sd3_transformer(seed: int = 0, *, layers: int = 2, dual_attention_layers: tuple[int, ...] = (0,)):
    """An ``SD3Transformer2DModel`` (SD3.5-style: the first block has the dual image attention)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=32, dual_attention_layers=dual_attention_layers, qk_norm="rms_norm",
    ).eval()


def sd3_inputs(batch: int = 2, size: int = 16, text: int = 7, timestep: float = 900.0, seed: int = 1):
    """Keyword inputs of one SD3 transformer forward (latents [B, 4, size, size]), seeded."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), timestep),
    )


def tiny_flux2_transformer(seed: int = 0, *, double_layers: int = 1, single_layers: int = 1):
    """A ``Flux2Transformer2DModel`` (double blocks and fused parallel single blocks, 4-axis RoPE)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=double_layers, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    ).eval()


def flux2_inputs(batch: int = 2, rows: int = 8, cols: int = 8, text: int = 6, timestep: float = 0.9, seed: int = 1):
    """Keyword inputs of one FLUX.2 transformer forward ((t, h, w, l) ids as Flux2Pipeline builds them)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(rows, cols, 4)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    txt_ids = torch.zeros(text, 4)
    txt_ids[:, 3] = torch.arange(text)
    return dict(
        hidden_states=torch.randn(batch, rows * cols, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.full((batch,), timestep),
        guidance=torch.full((batch,), 3.5), img_ids=img_ids.reshape(-1, 4), txt_ids=txt_ids,
    )


def tiny_cogvideox_transformer(seed: int = 0, *, layers: int = 2, patch_size_t: int | None = None):
    """A ``CogVideoXTransformer3DModel`` with RoPE (the 5B / 1.5 style); ``patch_size_t=2`` is 1.5's."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=32,
        num_layers=layers, sample_width=16, sample_height=16, sample_frames=9, patch_size=2, patch_size_t=patch_size_t,
        max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()


def cogvideox_inputs(batch: int = 2, frames: int = 3, size: int = 16, text: int = 6, timestep: int = 900, seed: int = 1,
                     patch_size_t: int | None = None):
    """Keyword inputs of one CogVideoX transformer forward ([B, F, C, H, W] latents, 3-D RoPE as the pipeline builds it)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(seed)
    p_t = patch_size_t or 1
    rope = get_3d_rotary_pos_embed(
        embed_dim=16, crops_coords=((0, 0), (size // 2, size // 2)), grid_size=(size // 2, size // 2),
        temporal_size=-(-frames // p_t), device="cpu",
    )
    return dict(
        hidden_states=torch.randn(batch, frames, 4, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.full((batch,), timestep),
        image_rotary_emb=rope,
    )


def tiny_ltx_transformer(seed: int = 0, *, layers: int = 2):
    """An ``LTXVideoTransformer3DModel`` (packed tokens, grid passed as num_frames / height / width)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=layers, caption_channels=32,
    ).eval()


def ltx_inputs(batch: int = 2, frames: int = 4, size: int = 8, text: int = 6, timestep: int = 900, seed: int = 1):
    """Keyword inputs of one LTX transformer forward (packed [B, F*H*W, C] latents, padded text masked)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[-1, text - 2:] = 0
    return dict(
        hidden_states=torch.randn(batch, frames * size * size, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.full((batch,), timestep),
        encoder_attention_mask=mask, num_frames=frames, height=size, width=size,
    )


def tiny_ltx2_transformer(seed: int = 0, *, layers: int = 2, gated: bool = True, perturbed: bool = False):
    """An ``LTX2VideoTransformer3DModel`` (audio-video: six attentions per block; ``gated``: LTX-2.3's
    per-head output gates; ``perturbed``: its STG-capable processor)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=layers, caption_channels=32,
        base_height=256, base_width=256, gated_attn=gated, audio_gated_attn=gated, perturbed_attn=perturbed,
    ).eval()


def ltx2_inputs(batch: int = 2, frames: int = 4, size: int = 8, text: int = 6, audio: int = 5, timestep: int = 900,
                seed: int = 1, **extra):
    """Keyword inputs of one LTX-2 transformer forward (packed video [B, F*H*W, C] and audio [B, A, C]
    latents, padded text masked in the last sample); ``extra`` passes on (STG's arguments)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[-1, text - 2:] = 0
    return dict(
        hidden_states=torch.randn(batch, frames * size * size, 8, generator=g),
        audio_hidden_states=torch.randn(batch, audio, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        audio_encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.full((batch,), float(timestep)),
        encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=frames, height=size, width=size,
        audio_num_frames=audio, return_dict=False, **extra,
    )


def tiny_skyreels_v2_transformer(seed: int = 0, *, layers: int = 2):
    """A ``SkyReelsV2Transformer3DModel`` (Wan2.1-based)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=64, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()


def tiny_mochi_transformer(seed: int = 0, *, layers: int = 2):
    """A ``MochiTransformer3DModel`` (asymmetric joint attention; the last block's text stream is pre-only)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=layers, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=32, time_embed_dim=4, max_sequence_length=16,
    ).eval()


def mochi_inputs(batch: int = 2, frames: int = 3, size: int = 16, text: int = 6, pad: int = 2, timestep: int = 900, seed: int = 1):
    """Keyword inputs of one Mochi transformer forward; the second sample's last ``pad`` text tokens are padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[-1, text - pad:] = False
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.full((batch,), timestep),
        encoder_attention_mask=mask,
    )


def tiny_hunyuan_video15_transformer(seed: int = 0, *, layers: int = 2):
    """A ``HunyuanVideo15Transformer3DModel`` (T2V; Qwen, ByT5 and image text streams merged valid-first)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
        rope_axes_dim=(4, 6, 6), task_type="t2v",
    ).eval()


def hunyuan_video15_inputs(batch: int = 2, frames: int = 3, size: int = 8, text: int = 6, pad: int = 2,
                           timestep: float = 900.0, seed: int = 1):
    """Keyword inputs of one HunyuanVideo-1.5 forward (T2V: zero image embeds); the second sample pads text."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[-1, text - pad:] = 0
    mask_2 = torch.ones(batch, 3)
    mask_2[-1, 2:] = 0
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g), timestep=torch.full((batch,), timestep),
        encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.randn(batch, 3, 8, generator=g), encoder_attention_mask_2=mask_2,
        image_embeds=torch.zeros(batch, 2, 8),
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` with the SDXL U-Net layout (no attention in the first level, two
    transformer layers in the next, ``text_time`` added conditioning) at toy width; the VAE is 4x,
    the U-Net's ``sample_size`` 16 (trained size 64 px)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = word_tokenizer(max_length=77), word_tokenizer(max_length=77)

    def clip_config(hidden):
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=1,
            projection_dim=16,
        )

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=48,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        norm_num_groups=8, use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=64,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(clip_config(16)), text_encoder_2=CLIPTextModelWithProjection(clip_config(32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True,
    )
