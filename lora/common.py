"""Training utilities shared by the ``diffattn.lora`` trainers and the testbed's training scripts:
wall clock and deadline, config parsing from flags, EMA, the loss log, learning-rate schedules,
flow-matching noise levels and the optimizer step; for the resumable trainers: checkpoints
(trainable tensors, optimizer and scheduler state, step) written atomically, the resume check, the
seeded batch position, the run log (tqdm, TensorBoard, ``log.jsonl``) and the shared deadline stop.
Nothing here knows about a model family."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from typing import ClassVar
from pathlib import Path

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
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
    return base * min(1.0, (step + 1) / max(warmup, 1))


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



# --------------------------------------------------------------------- resumable trainer runs


@dataclass(frozen=True)
class RunOptions:
    """The options every resumable trainer run has (the base of the trainers' frozen configs)."""

    NAME: ClassVar[str] = "trainer"  # the prefix of the config's error messages
    checkpoint_every: int = 100
    seed: int = 0
    mixed_precision: str = "bf16"  # "bf16", "fp16" or "no" (CPU runs use "no")
    gradient_checkpointing: bool = True
    max_minutes: float = 0.0       # 0: no deadline; else stop (and save) after this long
    backend: str = "auto"
    fsdp: bool = False             # shard the model (frozen base and trainable tensors) over the processes: FSDP2, by block

    def __post_init__(self):
        if self.checkpoint_every < 1:
            raise ValueError(f"{self.NAME}: checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.mixed_precision not in ("bf16", "fp16", "no"):
            raise ValueError(f"{self.NAME}: mixed_precision must be bf16, fp16 or no, got {self.mixed_precision!r}")
        if self.fsdp and self.mixed_precision == "fp16":  # accelerate's GradScaler would look for infs in its own shard only
            raise ValueError(f"{self.NAME}: fsdp trains with --mixed-precision bf16 or no, not fp16 (its loss scaler does not "
                             "see the other processes' gradient shards)")


class Killed(RuntimeError):
    """Raised by a trainer's ``train(..., _stop_after=N)``: the tests' stand-in for killing the process."""


def now() -> float:
    return time.monotonic()


def has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _is_sharded(t) -> bool:
    if not torch.distributed.is_available():  # a torch without distributed has no sharded tensors
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor as one CPU tensor; a sharded one (FSDP's DTensor) is gathered, a collective that
    every process must join in the same order."""
    t = t.detach()
    return (t.full_tensor() if _is_sharded(t) else t).contiguous().cpu()


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from a checkpoint, sharded as ``param`` is (a collective for DTensors)."""
    if not _is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole, on the CPU (a collective under FSDP)."""
    return {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}


def shard_model(model, accelerator, mixed_precision: str, name: str):
    """FSDP (torch's ``fully_shard``, FSDP2) over every process: each block of the model's block
    lists, then the model, so that a process holds 1/N of the frozen base and of the trainable
    tensors and gathers one block at a time. Parameters are replaced by sharded ones: build the
    optimizer after this. accelerate still runs the processes, autocast and the optimizer; it does
    not wrap the model (its own FSDP plugin refuses CPU process groups, where the tests run)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision == "fp16":  # accelerate's GradScaler would look for infs in its own shard only
        raise ValueError(f"{name}: fsdp trains with --mixed-precision bf16 or no, not fp16 (its loss scaler does not "
                         "see the other processes' gradient shards)")
    dtypes = {p.dtype for p in model.parameters()}
    if mixed_precision == "no" and len(dtypes) > 1:
        raise ValueError(f"{name}: fsdp with mixed_precision 'no' needs every parameter in one dtype, the model has "
                         f"{sorted(map(str, dtypes))}: load the pipeline in fp32, or train with --mixed-precision bf16")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    # inputs keep their dtypes (fp32 RoPE tables, timestep embeddings): autocast picks the compute dtype, as without FSDP
    policy = (MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False) if compute
              else MixedPrecisionPolicy(cast_forward_inputs=False))
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    blocks = [m for lst in model.children() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    if not blocks:
        raise ValueError(f"{name}: fsdp shards the model's block lists, and {type(model).__name__} has none")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def check_fsdp(cfg, accelerator, passed: bool, consume: bool) -> None:
    """The run can shard: more than one process, and a pipeline that is the trainer's to shard."""
    if not cfg.fsdp:
        return
    if passed and not consume:
        raise ValueError(f"{cfg.NAME}: fsdp shards the transformer in place and cannot hand a passed pipeline back as it was: "
                         "pass the pipeline's path (cfg.pipeline) and no pipe=, or train(..., consume=True) to give it to the trainer")
    if accelerator.num_processes < 2:
        raise ValueError(f"{cfg.NAME}: --fsdp shards the model over processes and this run has one: launch it with "
                         "accelerate launch --num_processes N (N >= 2), or drop --fsdp")


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, keep: int = 2, world: int = 1,
                    write: bool = True) -> None:
    """Trainable tensors, optimizer state, scheduler state and step, written to a temporary folder
    and renamed (a kill while writing leaves the previous checkpoint intact). Under FSDP every
    process calls it (the tensors are gathered whole) and one writes (``write``)."""
    from safetensors.torch import save_file

    if not write and not any(_is_sharded(p) for p in model.parameters()):
        return  # nothing to gather: only the writer copies the tensors
    trainable = trainable_state(model)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = _whole(value)
            else:
                scalars[f"{idx}.{name}"] = value
    if not write:
        return
    root = Path(folder) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".step_{step:07d}", root / f"step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable, str(tmp / "trainable.safetensors"))
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": state["param_groups"], "scalars": scalars, "scheduler": scheduler.state_dict(),
            "processes": world}
    (tmp / "state.json").write_text(json.dumps(meta, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler, world: int = 1) -> int:
    """Restore the newest checkpoint; returns the step to continue from (0 without one). Refuses a
    checkpoint written by another number of processes (the batches follow from step and process)."""
    from safetensors.torch import load_file

    root = Path(folder) / "checkpoints"
    found = sorted(root.glob("step_*")) if root.is_dir() else []
    if not found:
        return 0
    last = found[-1]
    saved_world = json.loads((last / "state.json").read_text()).get("processes", 1)
    if saved_world != world:
        raise ValueError(f"{folder}: the checkpoint was written by a run of {saved_world} processes, this one has {world}; "
                         f"resume with {saved_world} processes (the data order and batch follow from them), or pass a new --out")
    trainable = load_file(str(last / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in sorted(trainable.items()):  # sorted: sharding is a collective, same order everywhere
            params[name].copy_(_like(value, params[name]))
    meta = json.loads((last / "state.json").read_text())
    tensors = load_file(str(last / "optimizer.safetensors"))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    sharded = any(_is_sharded(p) for p in ordered)
    state: dict = {}
    for key, value in sorted(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        if torch.is_tensor(value) and value.dim() > 0 and sharded:  # moments, sharded as their parameter ("step" is a scalar)
            value = _like(value, ordered[int(idx)])
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["step"])


def check_resume(folder: Path, cfg, resumable: tuple[str, ...], name: str, write: bool = True) -> None:
    """Refuse to continue a run in ``folder`` whose saved config differs from ``cfg`` (other than in
    the ``resumable`` fields), naming each difference; record ``cfg`` there."""
    path = Path(folder) / "config.json"
    current = asdict(cfg)
    if path.is_file():
        saved = json.loads(path.read_text())
        # an option added since the run was started was at its default there
        defaults = {f.name: f.default for f in fields(cfg)}
        changed = sorted(k for k in current if k not in resumable and saved.get(k, defaults.get(k)) != current[k])
        if changed:
            raise ValueError(
                f"{name}: {folder} holds a run with other options ({', '.join(f'{k}: {saved.get(k, defaults.get(k))!r} -> {current[k]!r}' for k in changed)}); "
                "rerun with the same options to resume, or pass a new --out"
            )
    if write:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=1))
        os.replace(tmp, path)  # other processes never read a half-written file


def batch_indices(n: int, batch: int, step: int, rank: int, world: int, seed: int) -> list[int]:
    """The samples of (step, process): a seeded permutation of ``n`` per epoch, so the data
    position follows from the step alone (a resumed run reads what the uninterrupted one would)."""
    per_step = batch * world
    start = step * per_step
    idx = []
    for j in range(start + rank * batch, start + (rank + 1) * batch):
        epoch, pos = divmod(j, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        idx.append(int(order[pos]))
    return idx


class RunLog:
    """What a resumable run shows and keeps: a tqdm bar (loss, step time, ETA), ``log.jsonl``
    (appended: a resumed run continues it) and TensorBoard through accelerate's trackers (when
    ``tensorboard`` is installed), on the main process only."""

    def __init__(self, accelerator, out: Path, name: str, cfg, total: int, initial: int):
        from tqdm.auto import tqdm

        self.accelerator, self.name = accelerator, name
        self.tensorboard = has_tensorboard()  # make_accelerator logs with it then
        main = accelerator.is_main_process
        if self.tensorboard:
            accelerator.init_trackers(name, config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
        self.bar = tqdm(total=total, initial=initial, disable=not main, desc=name.replace("_", " "))
        self.journal = open(Path(out) / "log.jsonl", "a") if main else None
        self.mark = now()

    def step(self, step: int, values: dict) -> None:
        t = now()
        values = {**values, "step_seconds": t - self.mark}
        self.mark = t
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", s_per_step=f"{values['step_seconds']:.2f}")
        if self.journal is not None:
            self.journal.write(json.dumps({"step": step, **values}) + "\n")
            self.journal.flush()
        if self.tensorboard:
            self.accelerator.log(values, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.journal is not None:
            self.journal.close()


def make_accelerator(mixed_precision: str, out: Path, log):
    """An ``Accelerator`` logging to TensorBoard under ``out/logs`` when tensorboard is installed."""
    from accelerate import Accelerator

    tensorboard = has_tensorboard()
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    # the main process encodes the data and renders validation samples while the others wait at a
    # barrier: NCCL's default 10-minute watchdog would kill them first
    # cpu=True where there is no accelerator: accelerate then runs torchrun's processes as one gloo
    # group (MULTI_CPU); without it each CPU process trains alone
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with="tensorboard" if tensorboard else None,
                              cpu=not torch.accelerator.is_available(),
                              project_dir=str(Path(out) / "logs"), kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=8))])
    if not tensorboard and accelerator.is_main_process:
        log("tensorboard is not installed (pip install diffattn[train]); logging to log.jsonl only")
    return accelerator


def parse_context_parallel(text: str, name: str) -> tuple[int, int]:
    """``"ulysses=2"``, ``"ring=2"``, ``"ulysses=2,ring=2"`` -> (ulysses, ring); ``""`` -> (1, 1)."""
    degrees = {"ulysses": 1, "ring": 1}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in degrees or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{name}: context_parallel is 'ulysses=N', 'ring=N' or 'ulysses=N,ring=M' (N, M >= 1), got {text!r}")
        degrees[key.strip()] = int(value)
    return degrees["ulysses"], degrees["ring"]


def enable_sequence_parallel(model, accelerator, ulysses: int, ring: int, name: str) -> tuple[int, int]:
    """diffusers' context parallelism (``diffattn.enable_parallelism``) over groups of
    ``ulysses * ring`` consecutive processes; the groups are data-parallel to each other. Returns
    (data-parallel rank, data-parallel world): every process of a group trains on the same batch
    and holds its part of the sequence."""
    import diffattn
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    degree, world = ulysses * ring, accelerator.num_processes
    if world % degree:
        raise ValueError(f"{name}: context_parallel degree {degree} (ulysses={ulysses}, ring={ring}) must divide the "
                         f"{world} processes (accelerate launch --num_processes)")
    mesh = init_device_mesh(accelerator.device.type, (world // degree, ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses"))
    diffattn.enable_parallelism(model, ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh))
    return accelerator.process_index // degree, world // degree


def deadline_reached(accelerator, deadline: float | None) -> bool:
    """Whether any process is past ``deadline``: every process stops at the same step."""
    if deadline is None:
        return False
    flag = torch.tensor([float(now() > deadline)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
