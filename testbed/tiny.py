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
