"""Training utilities shared by the ``diffattn.lora`` trainers and the testbed's training scripts:
wall clock and deadline, config parsing from flags, EMA, the loss log, learning-rate schedules,
flow-matching noise levels and the optimizer step. Nothing here knows about a model family."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import torch


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


def print_config(cfg) -> None:
    print(json.dumps(asdict(cfg), indent=1), flush=True)


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

