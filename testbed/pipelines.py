"""The testbed pipelines: small diffusers pipelines trained on the procedural shapes data.

    from diffattn_testbed import load_pipeline
    pipe = load_pipeline("video")                        # WanPipeline, 128x128, 29 frames, CPU
    clip = pipe(prompt="a red circle moving right on a dark blue background").frames[0]
    pipe = load_pipeline("image-dit", device="cuda")     # FluxPipeline, 128x128
    pipe = load_pipeline("image-unet")                   # StableDiffusionPipeline, 128x128

Each kind is a real diffusers pipeline class with every component at toy width:

| kind | pipeline | denoiser | text encoders | VAE |
|---|---|---|---|---|
| ``video`` | ``WanPipeline`` | ``WanTransformer3DModel`` (6 layers, 4x32 heads) | UMT5 | ``AutoencoderKLWan`` (4x space, 4x time) |
| ``image-dit`` | ``FluxPipeline`` | ``FluxTransformer2DModel`` (2 double + 2 single blocks) | CLIP + T5 | ``AutoencoderKL`` (4x) |
| ``image-unet`` | ``StableDiffusionPipeline`` | ``UNet2DConditionModel`` (SD1.5 block layout) | CLIP | ``AutoencoderKL`` (4x) |

Tokenizers are word-level over the caption vocabulary (``word_tokenizer``; unknown words map to
``<unk>``). The folders load with the standard ``<Pipeline>.from_pretrained(path)``; this module's
``load_pipeline`` returns the same pipeline as a thin subclass whose ``__call__`` defaults (size,
frames, steps, guidance) are the ones the model was trained for, so ``pipe(prompt=...)`` alone gives
a good sample. Explicit arguments always win. The training scripts
(``testbed/train_*.py``) build the untrained pipelines with ``build_pipeline(kind)``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, WanPipeline

from .tiny import word_tokenizer

KINDS = ("video", "image-dit", "image-unet")
WEIGHTS = Path(__file__).parent / "weights"
META = "testbed.json"  # training record written beside model_index.json

# Text tokens the T5-style encoders of the DiT pipelines pad to, in training and at inference. The
# captions have at most 24 tokens; padding to the stock 512 would leave the real tokens a small share
# of every attention row (measured on the video DiT: 5-26 % of the cross-attention mass), which a
# toy-width model cannot overcome. Longer prompts are refused, not truncated (TestbedPipeline checks).
TEXT_TOKENS = 32

# What a plain pipe(prompt=...) call uses for each kind (the trained size and a good schedule).
DEFAULTS = {
    "video": dict(height=128, width=128, num_frames=29, num_inference_steps=25, guidance_scale=3.0,
                  max_sequence_length=TEXT_TOKENS),
    "image-dit": dict(height=128, width=128, num_inference_steps=25, true_cfg_scale=4.0, negative_prompt="",
                      max_sequence_length=TEXT_TOKENS),
    "image-unet": dict(height=128, width=128, num_inference_steps=25, guidance_scale=4.0),
}
# Options diffattn methods use on the testbed, declared to diffattn through the pipeline's
# ``diffattn_defaults`` (its frames are 16 x 16 tokens: 128-token blocks would make radial near dense;
# a quarter of the 25 steps run dense, as 12 of 50 in the papers). Neighborhood keeps the Wan preset
# rescaled to the 8 x 16 x 16 grid: window (5, 8, 5), stride (4, 3, 2).
METHOD_OPTIONS = {
    "video": {"radial": dict(block_size=64, dense_steps=6), "neighborhood": dict(dense_steps=6)},
    # 16 x 16 image tokens at 128^2: CLEAR's r = 16 on FLUX-dev's 64 x 64 grid is a quarter of the
    # grid; r = 4 is the same share here (and stays 4 tokens at 2x and 4x the size, as CLEAR does)
    "image-dit": {"clear": dict(radius=4)},
}
TRAIN_COMMAND = {
    "video": "python -m diffattn_testbed.train_video --out testbed/weights/video",
    "image-dit": "python -m diffattn_testbed.train_image --kind image-dit --vae IMAGE_VAE --out testbed/weights/image-dit",
    "image-unet": "python -m diffattn_testbed.train_image --kind image-unet --vae IMAGE_VAE --out testbed/weights/image-unet",
}
# Sizes the testbed models were trained at (other multiples of the latent grid run, off-distribution).
TRAINED_SIZE = {"video": (128, 128, 29), "image-dit": (128, 128, 1), "image-unet": (128, 128, 1)}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"diffattn_testbed: unknown pipeline kind {kind!r}; choose one of {KINDS}")


# ----------------------------------------------------------------------------------- build


def _umt5(vocab: int, d_model: int = 64, layers: int = 2):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, feed_forward_proj="gated-gelu",
    ))


def _t5(vocab: int, d_model: int = 64, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, feed_forward_proj="gated-gelu",
    ))


def _clip(vocab: int, hidden: int = 64, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    # eos_token_id = our "</s>": the pooled output is taken at the first </s> (the non-legacy rule)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        projection_dim=hidden,
    ))


def _image_vae():
    from diffusers import AutoencoderKL

    # 3 levels -> 4x spatial compression (pipelines read it from len(block_out_channels))
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 48, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=128, scaling_factor=1.0, shift_factor=0.0,
    )


def _video_vae():
    from diffusers import AutoencoderKLWan

    # dim_mult of 3 levels with both downsamplings temporal -> 4x space, 4x time (as the real Wan VAE in
    # time; the pipeline reads scale_factor_temporal/spatial from the config)
    z = 8
    return AutoencoderKLWan(
        base_dim=16, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=[0.0] * z, latents_std=[1.0] * z, scale_factor_temporal=4, scale_factor_spatial=4,
    )


def build_pipeline(kind: str, seed: int = 0):
    """The untrained pipeline of ``kind`` (fp32, CPU), deterministic by ``seed``."""
    _check_kind(kind)
    torch.manual_seed(seed)
    if kind == "video":
        from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

        tokenizer = word_tokenizer(max_length=512)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8,
            text_dim=64, freq_dim=256, ffn_dim=512, num_layers=6, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
        )
        return WanPipeline(
            tokenizer=tokenizer, text_encoder=_umt5(len(tokenizer)), vae=_video_vae(), scheduler=scheduler,
            transformer=transformer,
        )
    if kind == "image-dit":
        import math

        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        tokenizer, tokenizer_2 = word_tokenizer(max_length=77), word_tokenizer(max_length=512)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
            axes_dims_rope=(8, 12, 12),
        )
        # dynamic shifting as in FLUX.1-dev, anchored so that the trained 256-token grid uses shift 2
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
            base_shift=math.log(2.0), max_shift=1.15, shift=1.0,
        )
        return FluxPipeline(
            scheduler=scheduler, vae=_image_vae(), text_encoder=_clip(len(tokenizer)), tokenizer=tokenizer,
            text_encoder_2=_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2, transformer=transformer,
        )
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = word_tokenizer(max_length=77)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=16,  # attention_head_dim = heads (SD naming)
    )
    # v-prediction with a zero-terminal-SNR schedule: dark, flat backgrounds come out right
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=_image_vae(), text_encoder=_clip(len(tokenizer)), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def denoiser(pipe):
    """The trained network of a testbed pipeline (``transformer`` or ``unet``)."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


# ------------------------------------------------------------------------------------ load


class _TestbedDefaults:
    """Fills the testbed's ``DEFAULTS`` into ``__call__`` for arguments the caller left out, and refuses
    prompts longer than the text length (the stock pipelines would cut them silently)."""

    testbed_kind = ""

    @property
    def diffattn_defaults(self) -> dict:
        """Method options ``diffattn.apply`` (and so the CLI) reads for this pipeline, over the model
        family's: the testbed's frames are small (see ``METHOD_OPTIONS``)."""
        return METHOD_OPTIONS.get(self.testbed_kind, {})

    def __call__(self, *args, **kwargs):
        bound = inspect.signature(super().__call__).bind_partial(*args, **kwargs)
        for name, value in DEFAULTS[self.testbed_kind].items():
            bound.arguments.setdefault(name, value)
        self._check_prompt_length(bound.arguments)
        return super().__call__(*bound.args, **bound.kwargs)

    def _check_prompt_length(self, arguments: dict) -> None:
        limit = arguments.get("max_sequence_length") or self.tokenizer.model_max_length
        tokenizer = getattr(self, "tokenizer_2", None) or self.tokenizer
        for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
            texts = arguments.get(name)
            for text in [texts] if isinstance(texts, str) else (texts or []):
                count = len(tokenizer(text).input_ids)
                if count > limit:
                    raise ValueError(
                        f"diffattn_testbed: {name} has {count} tokens but this pipeline reads {limit} "
                        f"(max_sequence_length); shorten it or pass max_sequence_length={count} "
                        f"(the testbed models were trained at {TEXT_TOKENS})"
                    )


class TestbedWanPipeline(_TestbedDefaults, WanPipeline):
    testbed_kind = "video"


class TestbedFluxPipeline(_TestbedDefaults, FluxPipeline):
    testbed_kind = "image-dit"


class TestbedSDPipeline(_TestbedDefaults, StableDiffusionPipeline):
    testbed_kind = "image-unet"


TESTBED_CLASSES = {"video": TestbedWanPipeline, "image-dit": TestbedFluxPipeline, "image-unet": TestbedSDPipeline}


def _dtype_kwarg() -> str:
    import diffusers
    from packaging.version import Version

    # diffusers 0.42 renamed from_pretrained's torch_dtype to dtype (the old name warns)
    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


_DTYPE_KWARG = _dtype_kwarg()


def pipeline_path(kind: str) -> Path:
    _check_kind(kind)
    return WEIGHTS / kind


def metadata(kind: str, path: str | Path | None = None) -> dict:
    """The training record (``testbed.json``) of a trained pipeline folder."""
    folder = Path(path) if path is not None else pipeline_path(kind)
    meta = folder / META
    return json.loads(meta.read_text()) if meta.exists() else {}


def load_pipeline(kind: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, path=None):
    """The trained testbed pipeline of ``kind`` ("video", "image-dit", "image-unet"), ready to call.

    Weights are stored in fp16; they load as float32 on the CPU and bfloat16 on CUDA unless ``dtype``
    says otherwise. ``path`` loads a retrained folder instead of the committed one.
    """
    _check_kind(kind)
    folder = Path(path) if path is not None else pipeline_path(kind)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"diffattn_testbed: no trained {kind!r} pipeline at {folder}; train one with `{TRAIN_COMMAND[kind]}` "
            "(one H100, minutes) or pass path= to a folder that has one"
        )
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = TESTBED_CLASSES[kind].from_pretrained(str(folder), **{_DTYPE_KWARG: dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
