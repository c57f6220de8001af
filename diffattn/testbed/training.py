"""Shared pieces of the testbed training scripts: data rendering, EMA, schedules, logging, saving.

Seeds: training scenes use seeds ``0 .. N-1`` of ``shapes.sample``; held-out evaluation prompts use
seeds from ``EVAL_SEED`` up, so they never appear in training.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .shapes import render, sample

EVAL_SEED = 10_000_000


class Clock:
    """Elapsed time, a wall-clock deadline and flushed log lines."""

    def __init__(self, max_minutes: float | None):
        self.start = time.perf_counter()
        self.deadline = None if max_minutes is None else self.start + 60 * max_minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def log(self, *parts) -> None:
        print(f"[{self.elapsed():7.1f}s]", *parts, flush=True)


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def config_from_argv(cls, argv, doc: str):
    """A frozen config dataclass from ``--field-name value`` flags (defaults: the dataclass's)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(cls()).items():
        kind = _flag if isinstance(value, bool) else type(value) if value is not None else float
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    return cls(**vars(parser.parse_args(argv)))


def optimizer_step(opt, loss: torch.Tensor, params, clip: float | None = 1.0) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def vae_loss(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE + 0.5 L1 + 1e-4 KL per element, reconstruction) of a sampled VAE round trip, bf16 autocast."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
    recon = recon.float()
    kl = posterior.kl().mean() / float(np.prod(x.shape[1:]))
    return torch.nn.functional.mse_loss(recon, x) + 0.5 * torch.nn.functional.l1_loss(recon, x) + 1e-4 * kl, recon


def print_config(cfg) -> None:
    print(json.dumps(asdict(cfg), indent=1), flush=True)


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


class EMA:
    """Exponential moving average of a module's parameters (fp32 copies)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages are short
        names = list(self.shadow)
        params = dict(module.named_parameters())
        torch._foreach_lerp_([self.shadow[k] for k in names], [params[k].detach().float() for k in names], 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))


class LossLog:
    """Training losses summed on the device (no host sync per step), logged as window means with steps/s.

    No per-step loss tensor is kept: ``F.mse_loss(..., reduction="mean")`` returns a 0-dim view of its
    whole elementwise buffer (a latent-batch-sized allocation), so holding the losses held those
    buffers too (measured on the H100: +24 MiB per video step at batch 96).
    """

    def __init__(self, clock: Clock, every: int = 250):
        self.clock, self.every = clock, every
        self.total, self.count, self.last = None, 0, float("nan")
        self.mark = (0, clock.elapsed())

    def add(self, step: int, loss: torch.Tensor, last: bool = False) -> None:
        value = loss.detach().float()  # [] a view of loss's buffer: only copied or added in place, never kept
        self.total = value.clone() if self.total is None else self.total.add_(value)
        self.count += 1
        if step % self.every == 0 or last:
            steps, then = step + 1 - self.mark[0], self.clock.elapsed() - self.mark[1]
            self.mark = (step + 1, self.clock.elapsed())
            self.last, self.total, self.count = float(self.total) / self.count, None, 0
            memory = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
            self.clock.log(f"step {step} loss {self.last:.4f} ({steps / max(then, 1e-9):.2f} steps/s{memory})")

    def mean(self) -> float:
        """Mean loss of the steps since the last log line (of the last logged window if none since)."""
        return float(self.total) / self.count if self.count else self.last


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional ``torch.compile`` of the model's repeated transformer blocks (diffusers' own API)."""
    model.compile_repeated_blocks()


def shifted_sigmas(n: int, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """Flow-matching noise levels: logit-normal u, then the scheduler's shift s*u / (1 + (s - 1) u)."""
    u = torch.sigmoid(torch.randn(n, generator=generator)).to(device)
    return shift * u / (1 + (shift - 1) * u)


def warmup_lr(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant: stopping at any step equals a run with ``--steps`` set to it."""
    return base * min(1.0, (step + 1) / warmup)


def scheduled_lr(step: int, base: float, warmup: int, *, decay: float, progress: float) -> float:
    """``warmup_lr``, then over the last ``decay`` fraction of the run a linear ramp down to 0.

    ``progress`` in [0, 1] is how far the run is: ``max(step / steps, elapsed / max_minutes)``, so a run
    under a ``--max-minutes`` deadline anneals by the clock and ends at a learning rate near 0.
    """
    lr = warmup_lr(step, base, warmup)
    if decay > 0:
        lr *= min(1.0, max(0.0, (1.0 - progress) / decay))
    return lr


def run_progress(step: int, steps: int, clock: "Clock", max_minutes: float | None, reserve_s: float = 45.0) -> float:
    """Fraction of the run done: by steps, or by the clock where a deadline (less ``reserve_s`` for saving) comes first."""
    by_steps = (step + 1) / steps
    if max_minutes is None:
        return by_steps
    return max(by_steps, clock.elapsed() / max(1.0, 60 * max_minutes - reserve_s))


def adamw(params, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters: these models are launch-bound)."""
    params = list(params)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, fused=fused, **kwargs)


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
