"""Sampling-setting sweep on one testbed pipeline: judge accuracy per setting, same prompts and seeds.

    python benchmarks/sweep.py --kind video --prompts 256 default guidance_scale=3.0 guidance_scale=2.5
    python benchmarks/sweep.py --kind video "guidance_scale=3.0,flow_shift=4.0" scheduler=euler,num_inference_steps=50
    python benchmarks/sweep.py --kind image-dit --prompts 256 true_cfg_scale=3.0 true_cfg_scale=5.0
    python benchmarks/sweep.py --kind video dtype=float32 --weights OUT/video   # a retrained folder

Each setting is ``key=value[,key=value...]`` applied on top of the pipeline's defaults (``default``
alone changes nothing). A key is one of
- an argument of the pipeline's ``__call__`` (``guidance_scale``, ``true_cfg_scale``, ``num_inference_steps``);
- a key of the scheduler's config (``flow_shift``, ``solver_order``, ``shift``): the scheduler is
  rebuilt with it for that setting;
- ``scheduler=euler|unipc``: sample with ``FlowMatchEulerDiscreteScheduler`` or
  ``UniPCMultistepScheduler`` built from the pipeline's scheduler config;
- ``dtype=float32|bfloat16|float16``: reload the pipeline in that dtype.

Rows print as JSON (and go to ``--json``): judge accuracy on all prompts and, when there are more
than 64, on the first 64 (the held-out set ``quality.py`` uses by default). The settings of the
2026-11-22 guidance sweep are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _generate  # noqa: E402  (the same batching and seeding as the quality benchmark)

from diffattn_testbed.judge import load_judge, score  # noqa: E402
from diffattn_testbed.pipelines import KINDS, load_pipeline  # noqa: E402
from diffattn_testbed.shapes import sample  # noqa: E402
from diffattn_testbed.training import EVAL_SEED  # noqa: E402

SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "unipc": UniPCMultistepScheduler}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SweepConfig:
    kind: str = "video"
    prompts: int = 64
    batch: int = 16
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    weights: str = ""       # a pipeline folder (default: the committed testbed pipeline of --kind)
    max_objects: int = 2
    json: str = ""


def parse_setting(text: str) -> dict:
    """``"guidance_scale=3.0,flow_shift=4"`` -> ``{"guidance_scale": 3.0, "flow_shift": 4}``; ``"default"`` -> {}."""
    if text in ("", "default"):
        return {}
    out = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise SystemExit(f"sweep: setting {part!r} is not key=value; write e.g. guidance_scale=3.0 (or 'default')")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _diffusers_class(pipe) -> type:
    return next(c for c in type(pipe).__mro__ if c.__module__.startswith("diffusers"))


def _call_arguments(pipe) -> set[str]:
    names = set()
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is not None:
            names |= {p.name for p in inspect.signature(call).parameters.values() if p.kind is p.KEYWORD_ONLY
                      or p.kind is p.POSITIONAL_OR_KEYWORD}
    return names - {"self", "prompt", "generator", "output_type"}


def split_setting(pipe, setting: dict) -> tuple[dict, dict, str | None]:
    """(call kwargs, scheduler overrides, scheduler name) for ``setting``; ``dtype`` is handled by the caller."""
    call, sched, name = {}, {}, None
    allowed = _call_arguments(pipe)
    for key, value in setting.items():
        if key == "dtype":
            continue
        if key == "scheduler":
            if value not in SCHEDULERS:
                raise SystemExit(f"sweep: scheduler={value!r}; choose from {sorted(SCHEDULERS)}")
            name = value
        elif key in pipe.scheduler.config:
            sched[key] = value
        elif key in allowed:
            call[key] = value
        else:
            raise SystemExit(
                f"sweep: unknown setting {key!r}; use an argument of {_diffusers_class(pipe).__name__}.__call__ "
                f"(e.g. {sorted(allowed & {'guidance_scale', 'true_cfg_scale', 'num_inference_steps'})}), a key of "
                f"the scheduler config ({sorted(k for k in pipe.scheduler.config if not k.startswith('_'))}), "
                f"scheduler=euler|unipc or dtype=float32|bfloat16|float16"
            )
    return call, sched, name


def run_setting(pipe, kind: str, setting: dict, prompts: list[str], seeds: list[int], batch: int, device: str):
    """Samples of ``prompts`` under ``setting`` (pipeline defaults otherwise); the pipeline is left as it was."""
    call, sched, name = split_setting(pipe, setting)
    base = pipe.scheduler
    if sched or name:
        config = dict(base.config)
        cls = SCHEDULERS[name] if name else type(base)
        if cls is FlowMatchEulerDiscreteScheduler and "flow_shift" in config:
            config["shift"] = sched.pop("flow_shift", config["flow_shift"])  # UniPC's flow_shift is Euler's shift
        pipe.scheduler = cls.from_config(config, **sched)
    try:
        return _generate(_Bound(pipe, call) if call else pipe, kind, prompts, seeds, batch, device)[0]
    finally:
        pipe.scheduler = base


class _Bound:
    """``pipe`` called with extra keyword arguments (instance-level, nothing is patched on the class)."""

    def __init__(self, pipe, kwargs: dict):
        self.pipe, self.kwargs = pipe, kwargs

    def __call__(self, **kw):
        return self.pipe(**{**self.kwargs, **kw})


def main(argv=None) -> list[dict]:
    defaults = SweepConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("settings", nargs="*", default=["default"], help="key=value[,key=value] (see above)")
    args = vars(parser.parse_args(argv))
    settings = args.pop("settings") or ["default"]
    cfg = SweepConfig(**args)
    if cfg.kind not in KINDS:
        raise SystemExit(f"sweep: unknown kind {cfg.kind!r}; choose from {KINDS}")
    parsed = [parse_setting(s) for s in settings]
    for s in parsed:
        if "dtype" in s and s["dtype"] not in DTYPES:
            raise SystemExit(f"sweep: dtype={s['dtype']!r}; choose from {sorted(DTYPES)}")
    print(json.dumps({**asdict(cfg), "settings": settings}), flush=True)
    judge = load_judge("video" if cfg.kind == "video" else "image", device=cfg.device)
    prompts = [sample(EVAL_SEED + i, image=cfg.kind != "video", max_objects=cfg.max_objects).caption
               for i in range(cfg.prompts)]
    seeds = list(range(cfg.prompts))
    path = cfg.weights or None
    pipes = {None: load_pipeline(cfg.kind, device=cfg.device, path=path)}
    for setting in parsed:  # refuse a bad key before any sampling
        split_setting(pipes[None], setting)
    rows = []
    for text, setting in zip(settings, parsed):
        dtype = DTYPES[setting["dtype"]] if "dtype" in setting else None
        if dtype not in pipes:
            pipes[dtype] = load_pipeline(cfg.kind, device=cfg.device, dtype=dtype, path=path)
        pipe = pipes[dtype]
        samples = run_setting(pipe, cfg.kind, setting, prompts, seeds, cfg.batch, cfg.device)
        row = {"kind": cfg.kind, "setting": text, "prompts": cfg.prompts}
        row.update({f"judge_{k}": round(v, 3) for k, v in score(judge, samples, prompts)["accuracy"].items()})
        if cfg.prompts > 64:
            row.update({f"judge64_{k}": round(v, 3) for k, v in score(judge, samples[:64], prompts[:64])["accuracy"].items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
