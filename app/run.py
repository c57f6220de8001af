"""Running a pipeline the same way for ``diffattn generate`` and the demo: what kind it is (video,
image DiT, U-Net), its default size and steps, the size multiple it needs, one timed call, the file
written, and the testbed's metrics and judge."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import diffattn

VIDEO_PIPELINES = ("WanPipeline", "HunyuanVideoPipeline", "SkyReelsV2Pipeline", "MochiPipeline", "CogVideoXPipeline",
                   "LTXPipeline", "LTX2Pipeline", "HunyuanVideo15Pipeline")
IMAGE_DIT_PIPELINES = ("FluxPipeline", "Flux2Pipeline", "StableDiffusion3Pipeline")
UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
KINDS = ("video", "image-dit", "image-unet")  # the testbed pipelines (diffattn_testbed.load_pipeline)

# (height, width, frames, steps, CFG scale) when the user leaves them out: the model cards' defaults
MODEL_DEFAULTS = {
    "video": (480, 832, 81, 50, 5.0),  # Wan2.1 T2V (also WanPipeline's own defaults)
    "HunyuanVideoPipeline": (720, 1280, 129, 50, 6.0), "SkyReelsV2Pipeline": (544, 960, 97, 50, 6.0),
    "MochiPipeline": (480, 848, 163, 64, 4.5), "CogVideoXPipeline": (480, 720, 49, 50, 6.0),
    "LTXPipeline": (512, 704, 161, 50, 3.0), "LTX2Pipeline": (512, 768, 121, 30, 3.0),
    "HunyuanVideo15Pipeline": (480, 848, 121, 50, 6.0),
    "FluxPipeline": (1024, 1024, 1, 28, 3.5), "Flux2Pipeline": (1024, 1024, 1, 28, 4.0),
    "StableDiffusion3Pipeline": (1024, 1024, 1, 28, 7.0),
    "StableDiffusionXLPipeline": (1024, 1024, 1, 50, 5.0), "StableDiffusionPipeline": (512, 512, 1, 50, 7.5),
}
DEFAULT_METHOD = {"video": "radial", "image-dit": "clear", "image-unet": "hidiffusion"}


def kind_of_class(name: str | None) -> str | None:
    """"video", "image-dit", "image-unet" for a diffusers pipeline class name, or None."""
    if name in VIDEO_PIPELINES:
        return "video"
    if name in IMAGE_DIT_PIPELINES:
        return "image-dit"
    if name in UNET_PIPELINES:
        return "image-unet"
    return None


def pipeline_class(folder: str | Path) -> str | None:
    """The ``_class_name`` of a local diffusers pipeline folder (None without ``model_index.json``);
    raises ValueError for an index that is not a JSON object."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{index} is not valid JSON ({exc}); fix or replace the pipeline folder") from None
    if not isinstance(data, dict):
        raise ValueError(f"{index} is not a JSON object; fix or replace the pipeline folder")
    return data.get("_class_name")


def testbed(module: str, who: str = "diffattn"):
    """A module of the testbed distribution (the default pipelines, judge and metrics)."""
    import importlib

    try:
        return importlib.import_module(f"diffattn_testbed.{module}")
    except ImportError as exc:
        raise SystemExit(f"{who}: the default models need the testbed ({exc}); install it beside diffattn with "
                         "`pip install -e ./testbed` from a checkout, or pass --model PATH") from None


def testbed_defaults(kind: str) -> tuple[int, int, int, int, float]:
    d = testbed("pipelines").DEFAULTS[kind]
    return (d["height"], d["width"], d.get("num_frames", 1), d["num_inference_steps"],
            d.get("guidance_scale", d.get("true_cfg_scale")))


def load(model: str | None, kind: str, device: str):
    """The testbed pipeline of ``kind`` (``model`` None) or a diffusers pipeline from a folder or hub id."""
    if model is None:
        pipe = testbed("pipelines").load_pipeline(kind, device=device)
    else:
        import diffusers
        from diffusers import DiffusionPipeline
        from packaging.version import Version

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        # diffusers 0.42 renamed from_pretrained's torch_dtype to dtype (the old name warns)
        key = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
        pipe = DiffusionPipeline.from_pretrained(model, **{key: dtype}).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply(pipe, method: str, options: dict, guide: str | None = None, guide_options: dict | None = None):
    """``method`` with ``options`` and, when given, the ``guide`` guidance on ``pipe`` (the handle);
    method "none" applies the guidance alone."""
    guide_options = guide_options or {}
    if method == "none":
        return diffattn.apply(pipe, guide, **guide_options)
    if guide is not None:
        options = {**options, "guidance": diffattn.guide(guide, **guide_options)}
    return diffattn.apply(pipe, method, **options)


def is_testbed(pipe) -> bool:
    return getattr(pipe, "testbed_kind", "") != ""


def vae_factors(pipe) -> tuple[int, int]:
    """(spatial, temporal) VAE compression of a video pipeline (each family names them its own way)."""
    for spatial, temporal in (("vae_scale_factor_spatial", "vae_scale_factor_temporal"),  # Wan, HunyuanVideo, CogVideoX
                              ("vae_spatial_compression_ratio", "vae_temporal_compression_ratio"),  # LTX, LTX-2
                              ("vae_spatial_scale_factor", "vae_temporal_scale_factor")):  # Mochi
        if hasattr(pipe, spatial) and hasattr(pipe, temporal):
            return int(getattr(pipe, spatial)), int(getattr(pipe, temporal))
    raise NotImplementedError(f"diffattn: {type(pipe).__name__} names no VAE compression diffattn knows; use diffattn.apply "
                              "from Python with your own sizes")


def size_multiple(pipe, kind: str) -> int:
    """Height and width must be multiples of this (the pipeline's own check, or its silent resize)."""
    if kind == "video":
        multiple = vae_factors(pipe)[0] * diffattn.patch_size(pipe)[1]  # VAE x patchify
        return max(multiple, 16) if any(c.__name__ in ("WanPipeline", "SkyReelsV2Pipeline") for c in type(pipe).__mro__) else multiple
    if kind == "image-unet":
        return 8  # StableDiffusion(XL)Pipeline.check_inputs
    return pipe.vae_scale_factor * 2  # FLUX packs 2 x 2 latents (it resizes other sizes silently); SD3 patch 2


def call(pipe, kind: str, *, prompt: str, seed: int, steps: int, height: int, width: int, frames: int, cfg: float,
         device: str, on_step=None) -> tuple[np.ndarray, float]:
    """One timed pipeline call: (frames [F, H, W, 3] or an image [H, W, 3] in [0, 1], seconds)."""
    args = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps, output_type="np",
                generator=torch.Generator("cpu").manual_seed(int(seed)))
    if on_step is not None:
        args["callback_on_step_end"] = on_step
    if kind == "video":
        args.update(num_frames=frames, guidance_scale=cfg)
    elif is_testbed(pipe) and kind == "image-dit":  # the testbed FLUX was trained for true CFG
        args.update(true_cfg_scale=cfg, negative_prompt="")
    else:  # FLUX.1-dev: its distilled guidance; SD3, SD, SDXL: CFG
        args.update(guidance_scale=cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = pipe(**args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return np.asarray(out.frames[0] if kind == "video" else out.images[0]), time.perf_counter() - start


SCHEDULE_OFF = dict(dense_steps=0, last_dense_steps=0, dense_layers=0)  # the warm-up's: the method on every call


def warm_up(pipe, kind: str, apply, call_args: dict, overrides: dict) -> None:
    """One untimed 1-step call dense and one with the method, so that neither timed run pays CUDA's,
    cuDNN's and Triton's first-call costs (kernel compilation and autotuning: seconds, which at the
    testbed's sizes would be most of the method's time). ``overrides`` (usually ``SCHEDULE_OFF``) make
    the method run on that one step, which the timed run's schedule would leave dense;
    ``apply(**overrides)`` installs it and returns the handle (removed again, also on errors)."""
    quick = {**call_args, "steps": 1}
    call(pipe, kind, **quick)
    with apply(**overrides):
        call(pipe, kind, **quick)


def save(media: np.ndarray, kind: str, path: str | Path, fps: int = 16) -> str:
    """Write a clip (mp4, diffusers' ``export_to_video``) or an image (png); returns the path."""
    if kind == "video":
        from diffusers.utils import export_to_video

        return export_to_video(list(media), str(path), fps=fps)
    import imageio.v3 as iio

    iio.imwrite(path, (np.clip(media, 0, 1) * 255).round().astype(np.uint8))
    return str(path)


def compare(kind: str, prompt: str, dense: np.ndarray, other: np.ndarray, judged: bool) -> dict:
    """PSNR / SSIM of ``other`` against ``dense`` and, on the testbed, the judge's reading of both."""
    metrics = testbed("metrics")
    out = {"psnr": metrics.psnr(other, dense), "ssim": metrics.ssim(other, dense)}
    if judged:
        judge = testbed("judge")
        model = judge.load_judge("video" if kind == "video" else "image")
        out["judge"] = [judge.score(model, x[None], [prompt])["accuracy"] for x in (dense, other)]
    return out


__all__ = ["DEFAULT_METHOD", "apply", "IMAGE_DIT_PIPELINES", "KINDS", "MODEL_DEFAULTS", "UNET_PIPELINES", "VIDEO_PIPELINES", "call",
           "compare", "is_testbed", "kind_of_class", "load", "pipeline_class", "save", "size_multiple", "testbed", "warm_up", "SCHEDULE_OFF",
           "testbed_defaults", "vae_factors"]
