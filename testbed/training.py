"""Testbed-only pieces of the training scripts: data rendering, VAE loss, saving and previews.

The generic utilities (clock, flags, EMA, loss log, schedules, optimizer step) live in
``diffattn.lora.common`` so the LoRA trainers share them without importing the testbed; they are
re-exported here for the training scripts.

Seeds: training scenes use seeds ``0 .. N-1`` of ``shapes.sample``; held-out evaluation prompts use
seeds from ``EVAL_SEED`` up, so they never appear in training.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import torch

from diffattn.lora.common import (  # noqa: F401  re-exported for the training scripts
    EMA, Clock, LossLog, adamw, config_from_argv, optimizer_step, print_config, run_progress, scheduled_lr,
    shifted_sigmas, warmup_lr,
)

from .shapes import render, sample

EVAL_SEED = 10_000_000


def vae_loss(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE + 0.5 L1 + 1e-4 KL per element, reconstruction) of a sampled VAE round trip, bf16 autocast."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
    recon = recon.float()
    kl = posterior.kl().mean() / float(np.prod(x.shape[1:]))
    return torch.nn.functional.mse_loss(recon, x) + 0.5 * torch.nn.functional.l1_loss(recon, x) + 1e-4 * kl, recon


def _render_one(job):
    seed, image, max_objects, frames, size = job
    clip = sample(seed, image=image, max_objects=max_objects)
    return render(clip, frames=frames, height=size, width=size), clip.caption


def render_stream(seeds, *, image: bool, max_objects: int, frames: int, size: int, workers: int, chunk: int):
    """Yields ``(pixels uint8 [n, frames, size, size, 3], captions)`` chunks of ``seeds``, rendered in a pool."""
    jobs = [(int(s), image, max_objects, frames, size) for s in seeds]
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(max(1, workers)) as pool:
        pixels, captions = [], []
        for px, cap in pool.imap(_render_one, jobs, chunksize=16):
            pixels.append(px)
            captions.append(cap)
            if len(pixels) == chunk:
                yield np.stack(pixels), captions
                pixels, captions = [], []
        if pixels:
            yield np.stack(pixels), captions


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float in [-1, 1] ``[..., 3, H, W]`` order is left to the caller."""
    return pixels.float().div(127.5).sub(1.0)


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional ``torch.compile`` of the model's repeated transformer blocks (diffusers' own API)."""
    model.compile_repeated_blocks()


def drop_captions(captions: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Empty captions (the pipelines' default negative prompt) at ``rate``: classifier-free guidance."""
    return ["" if rng.random() < rate else c for c in captions]


def training_attention():
    """SDPA backends for training: flash, memory-efficient, math; not cuDNN, whose backward crashed
    (illegal memory access) on the FLUX testbed shapes with torch 2.11 on an H100."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def history(init: str) -> list:
    """The training record of the pipeline a run continues from (its testbed.json), as a list."""
    if not init:
        return []
    meta = Path(init) / "testbed.json"
    if not meta.exists():
        return [{"init": init}]
    record = json.loads(meta.read_text())
    return [*record.pop("history", []), record]


def save_pipeline(pipe, out: Path, record: dict) -> None:
    """fp16 safetensors via ``save_pretrained`` plus ``testbed.json`` (the training record)."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu", torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "testbed.json").write_text(json.dumps(record, indent=1) + "\n")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def write_preview(kind: str, folder: Path, png: Path, device, prompts: int = 4) -> list[str]:
    """Samples of held-out prompts from the saved pipeline (its defaults) as one PNG grid."""
    from PIL import Image

    from .pipelines import load_pipeline

    pipe = load_pipeline(kind, path=folder, device=device)
    captions = [sample(EVAL_SEED + i, image=kind != "video", max_objects=2).caption for i in range(prompts)]
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(prompts)]
    if kind == "video":
        frames = pipe(prompt=captions, generator=gens, output_type="np").frames  # [N, F, H, W, 3]
        pick = np.linspace(0, frames.shape[1] - 1, 8).round().astype(int)
        rows = [np.concatenate(list(clip[pick]), axis=1) for clip in frames]
    else:
        rows = [img for img in pipe(prompt=captions, generator=gens, output_type="np").images]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(png)
    (png.with_suffix(".txt")).write_text("\n".join(captions) + "\n")
    return captions
