"""The tiny model families the shared testers run on (built in code, seeded, CPU-fast)."""

from __future__ import annotations

import torch

from diffattn_testbed.tiny import (
    cogvideox_inputs, flux2_inputs, flux_inputs, ltx2_inputs, ltx_inputs, tiny_cogvideox_transformer, tiny_ltx2_transformer, tiny_ltx_transformer,
    hunyuan_video15_inputs, mochi_inputs, tiny_hunyuan_video15_transformer, tiny_mochi_transformer, tiny_skyreels_v2_transformer, sd3_inputs, tiny_flux2_transformer, tiny_flux_transformer, tiny_hunyuan_transformer, tiny_sd3_transformer, tiny_wan_pipeline,
)
from testers import Family


def _wan_call(pipe, frames=25, size=128, steps=2, guidance=5.0):
    return pipe(
        prompt="a red circle moving right", negative_prompt="blue square", height=size, width=size,
        num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


WAN = Family(
    name="wan", build=tiny_wan_pipeline, call=_wan_call, models=lambda pipe: [pipe.transformer],
    shape=dict(frames=25, size=128), other_shape=dict(frames=17, size=96), small=dict(steps=1, guidance=1.0),
    ours=lambda key: ".attn1." in key,
)


def hunyuan_inputs(frames=4, size=16, text=12, pad=5, timestep=900.0):
    """Two samples, the second with ``pad`` padded text tokens (the model's bool key mask)."""
    g = torch.Generator().manual_seed(1)
    b = 2
    mask = torch.ones(b, text, dtype=torch.bool)
    mask[1, text - pad:] = False
    return dict(
        hidden_states=torch.randn(b, 4, frames, size, size, generator=g),
        timestep=torch.full((b,), timestep), encoder_hidden_states=torch.randn(b, text, 16, generator=g),
        encoder_attention_mask=mask, pooled_projections=torch.randn(b, 8, generator=g),
        guidance=torch.full((b,), 6000.0),
    )


HUNYUAN = Family(
    name="hunyuan_video", build=lambda: tiny_hunyuan_transformer(double_layers=2, single_layers=2),
    call=lambda model, **kw: model(**hunyuan_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(frames=4, size=16), other_shape=dict(frames=3, size=12), small=dict(frames=5, size=8),
    ours=lambda key: not key.startswith("context_embedder"),
)


FLUX = Family(
    name="flux", build=lambda: tiny_flux_transformer(double_layers=1, single_layers=2),
    call=lambda model, **kw: model(**flux_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(rows=8, cols=8), other_shape=dict(rows=6, cols=9, text=4), small=dict(rows=5, cols=6, text=3),
)

SD3 = Family(
    name="sd3", build=tiny_sd3_transformer,
    call=lambda model, **kw: model(**sd3_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(size=16), other_shape=dict(size=12, text=5), small=dict(size=10, text=3),
)

FLUX2 = Family(
    name="flux2", build=lambda: tiny_flux2_transformer(double_layers=1, single_layers=2),
    call=lambda model, **kw: model(**flux2_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(rows=8, cols=8), other_shape=dict(rows=6, cols=9, text=4), small=dict(rows=5, cols=6, text=3),
)

COGVIDEOX = Family(
    name="cogvideox", build=tiny_cogvideox_transformer,
    call=lambda model, **kw: model(**cogvideox_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(frames=4, size=16), other_shape=dict(frames=3, size=12, text=4), small=dict(frames=3, size=10, text=3),
)

LTX = Family(
    name="ltx", build=tiny_ltx_transformer,
    call=lambda model, **kw: model(**ltx_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(frames=4, size=8), other_shape=dict(frames=3, size=6, text=4), small=dict(frames=3, size=5, text=3),
    ours=lambda key: ".attn1." in key,
)


def ltx2_call(model, **kw):
    """Both streams' outputs, video and audio, as one [B, N] tensor (the audio must come out unchanged too)."""
    video, audio = model(**ltx2_inputs(**kw))
    return torch.cat([video.flatten(1), audio.flatten(1)], 1)


LTX2 = Family(
    name="ltx2", build=tiny_ltx2_transformer, call=ltx2_call, models=lambda model: [model],
    shape=dict(frames=4, size=8), other_shape=dict(frames=3, size=6, text=4), small=dict(frames=3, size=5, text=3),
    ours=lambda key: key.endswith(".attn1.processor"),
)


def skyreels_inputs(frames=4, size=16, timestep=900.0):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 16, frames, size, size, generator=g), timestep=torch.full((2,), timestep),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g))


SKYREELS_V2 = Family(
    name="skyreels_v2", build=tiny_skyreels_v2_transformer,
    call=lambda model, **kw: model(**skyreels_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(frames=4, size=16), other_shape=dict(frames=3, size=12), small=dict(frames=3, size=10),
    ours=lambda key: ".attn1." in key,
)

MOCHI = Family(
    name="mochi", build=tiny_mochi_transformer,
    call=lambda model, **kw: model(**mochi_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(frames=4, size=16), other_shape=dict(frames=3, size=12, text=5), small=dict(frames=3, size=10, text=4),
)

HUNYUAN15 = Family(
    name="hunyuan_video15", build=tiny_hunyuan_video15_transformer,
    call=lambda model, **kw: model(**hunyuan_video15_inputs(**kw)).sample, models=lambda model: [model],
    shape=dict(frames=4, size=8), other_shape=dict(frames=3, size=6, text=5), small=dict(frames=3, size=5, text=4),
    ours=lambda key: key.startswith("transformer_blocks."),
)


def _sd_call(pipe, size=64, steps=3, guidance=4.0):
    return pipe(
        prompt="a red circle", negative_prompt="a blue square", height=size, width=size, num_inference_steps=steps,
        guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).images


def _sd_pipeline():
    from diffattn_testbed.pipelines import load_pipeline

    return load_pipeline("image-unet")  # the trained testbed U-Net (SD 1.5 block layout, trained at 128 px = latent 32)


# sizes 2x and 1.5x the trained size: RAU-Net's guard (min_scale 1.5) lets both run
SD_UNET = Family(
    name="sd_unet", build=_sd_pipeline, call=_sd_call, models=lambda pipe: [pipe.unet],
    shape=dict(size=256), other_shape=dict(size=192), small=dict(size=192),
    ours=lambda key: ".attn1." in key,
)


def _sdxl_pipeline():
    from diffattn_testbed.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_UNET = Family(
    name="sdxl_unet", build=_sdxl_pipeline, call=lambda pipe, **kw: _sd_call(pipe, **{"steps": 5, "guidance": 5.0, **kw}), models=lambda pipe: [pipe.unet],
    shape=dict(size=128), other_shape=dict(size=96), small=dict(size=96),
    ours=lambda key: ".attn1." in key,
)
