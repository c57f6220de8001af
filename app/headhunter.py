"""``diffattn headhunter``: the greedy head search of HeadHunter (Algorithm 1; research/guidance.md §2.2).

    diffattn headhunter --out heads.json                                  # testbed video, judge objective
    diffattn headhunter --kind image-dit --rounds 3 --top-k 2 --prompts 8 --out flux_heads.json
    diffattn headhunter --objective mypkg.scores:pickscore --model /path/to/pipeline --out heads.json
    diffattn generate ...  /  diffattn.apply(pipe, "headhunter", heads="heads.json", u=0.5)

Each round scores every remaining head h: the pipeline generates one sample per (prompt, seed) pair
with HeadHunter guidance on the heads chosen so far plus h (``u`` 1.0 during the search, the paper's
advice: each head's effect is then visible; lower u to about 0.5 when using the list), the objective
scores them, and the ``top_k`` best heads join the list. No beam, no re-evaluation of chosen heads:
heads that only help in combination are found by later rounds (§2.2).

The objective is a callable ``objective(samples, prompts) -> float`` (higher is better), named as
``module:function``; the default ``testbed`` is the testbed judge's prompt adherence (the mean of
its colour, shape and motion / count accuracies). The search prompts are a split of their own
(seeds ``SEARCH_SEED + i``), apart from the 64 held-out prompts the quality benchmark evaluates on.

Resumable: the JSON file is rewritten after every scored head (atomically); rerunning the same
command continues where it stopped (a changed configuration is refused, with the differences).
While it runs the file's ``heads`` are the heads chosen so far and ``complete`` is false; the file
loads as it is with ``heads="heads.json"``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import diffattn

SEARCH_SEED = 500_000  # the search split's first seed (the held-out evaluation uses EVAL_SEED + i)


@dataclass(frozen=True)
class SearchConfig:
    kind: str = "video"          # testbed pipeline kind (video, image-dit, image-unet), unless --model
    model: str = ""              # a local diffusers pipeline folder instead of the testbed
    objective: str = "testbed"   # "testbed" (the judge) or module:function
    prompts: int = 8             # M prompt-seed pairs per candidate
    rounds: int = 2              # R
    top_k: int = 2               # k heads added per round
    u: float = 1.0               # SoftPAG weight during the search
    scale: float = 3.0           # guidance scale during the search
    layers: str = ""             # candidate layers, e.g. "0,1,2" (default: every layer)
    steps: int = 0               # denoising steps (0: the pipeline's default)
    batch: int = 8               # samples per pipeline call
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = "heads.json"


def load_objective(spec: str) -> Callable:
    """``module:function`` -> the callable (``objective(samples, prompts) -> float``)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise SystemExit(f"diffattn headhunter: --objective takes 'testbed' or module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"diffattn headhunter: cannot load the objective {spec!r} ({exc})") from None


def testbed_objective(kind: str, device: str) -> Callable:
    """The testbed judge's prompt adherence: the mean of its per-attribute accuracies."""
    from diffattn_testbed.judge import load_judge, score

    judge = load_judge("video" if kind == "video" else "image", device=device)

    def objective(samples, prompts) -> float:
        acc = score(judge, samples, prompts)["accuracy"]
        values = [v for v in acc.values() if v == v]  # drop NaN (no motion asked)
        return float(np.mean(values))

    return objective


def generator(kind: str, batch: int, **call) -> Callable:
    """``generate(pipe, prompts, seeds) -> samples`` (numpy frames or images), ``batch`` per call."""

    def generate(pipe, prompts, seeds):
        out = []
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
            result = pipe(prompt=prompts[i:i + batch], generator=gens, output_type="np", **call)
            out.append(np.asarray(result.frames if kind == "video" else result.images))
        return np.concatenate(out)

    return generate


def _write(path: Path, state: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def search(pipe, generate: Callable, objective: Callable, prompts: list[str], seeds: list[int], *,
           pool: list[tuple[int, int]], rounds: int, top_k: int, u: float = 1.0, scale: float = 3.0,
           state_path: str | Path | None = None, settings: dict | None = None, progress: bool = True) -> list[tuple[int, int]]:
    """HeadHunter's greedy search (Algorithm 1). ``pool``: candidate ``(layer, head)`` pairs; returns
    the chosen heads in order (round 1's first). With ``state_path`` the search is resumable (see the
    module docstring); ``settings`` are stored with it and must match on resume."""
    if rounds < 1 or top_k < 1 or rounds * top_k > len(pool):
        raise ValueError(f"headhunter search: rounds={rounds} x top_k={top_k} heads from a pool of {len(pool)}; "
                         "need rounds >= 1, top_k >= 1 and rounds * top_k <= the pool")
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("headhunter search: one seed per prompt, at least one prompt")
    path = Path(state_path) if state_path else None
    record = {"settings": settings or {}, "pool": [list(p) for p in pool], "prompts": prompts, "seeds": seeds,
              "rounds": rounds, "top_k": top_k, "u": u, "scale": scale}
    state = {**record, "heads": [], "scores": [], "complete": False}
    if path is not None and path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in record if old.get(k) != record[k])
        if changed:
            raise SystemExit(f"diffattn headhunter: {path} holds a search with other settings ({changed}); "
                             "pass another --out, or delete it to start over")
        state = old
    if state["complete"]:
        return [tuple(h) for h in state["heads"]]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with diffusers; progress is optional
        tqdm = None
    for r in range(rounds):
        if len(state["heads"]) >= (r + 1) * top_k:
            continue  # round r was finished before a restart
        if r == len(state["scores"]):
            state["scores"].append({})
        scores = state["scores"][r]
        chosen = [tuple(h) for h in state["heads"][: r * top_k]]
        remaining = [h for h in pool if h not in chosen]
        todo = [h for h in remaining if f"{h[0]},{h[1]}" not in scores]
        bar = tqdm(total=len(remaining), initial=len(remaining) - len(todo), desc=f"round {r + 1}/{rounds}",
                   disable=not progress) if tqdm else None
        for head in todo:
            with diffattn.apply(pipe, "headhunter", heads=[*chosen, head], u=u, scale=scale):
                samples = generate(pipe, prompts, seeds)
            scores[f"{head[0]},{head[1]}"] = float(objective(samples, prompts))
            if path is not None:
                _write(path, state)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        ranked = sorted(remaining, key=lambda h: (-scores[f"{h[0]},{h[1]}"], h))  # ties: the lower index
        state["heads"] = [list(h) for h in chosen + ranked[:top_k]]
        if path is not None:
            _write(path, state)
    state["complete"] = True
    if path is not None:
        _write(path, state)
    return [tuple(h) for h in state["heads"]]


def candidate_pool(pipe, layers: str) -> list[tuple[int, int]]:
    """Every (layer, head) of the pipeline's first supported model, or of the chosen layers."""
    model = next(m for m in (getattr(pipe, n, None) for n in ("transformer", "unet")) if m is not None)
    modules = diffattn.attention_modules(model)
    heads = {}
    for name, layer in modules.items():
        heads.setdefault(layer, model.get_submodule(name).heads)
    wanted = sorted(heads) if not layers else [int(v) for v in layers.split(",") if v.strip()]
    bad = [l for l in wanted if l not in heads]
    if bad:
        raise SystemExit(f"diffattn headhunter: --layers {bad} out of range; the model has layers 0..{max(heads)}")
    return [(l, h) for l in wanted for h in range(heads[l])]


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog="diffattn headhunter", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(SearchConfig()).items():
        out.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    return out


def main(argv=None) -> list[tuple[int, int]]:
    cfg = SearchConfig(**vars(parser().parse_args(argv)))
    print(json.dumps(asdict(cfg)), flush=True)
    from diffattn_testbed.shapes import sample

    if cfg.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(cfg.model).to(cfg.device)
        kind = "video" if hasattr(pipe, "transformer") and "Wan" in type(pipe).__name__ else cfg.kind
    else:
        from diffattn_testbed.pipelines import load_pipeline

        pipe, kind = load_pipeline(cfg.kind, device=cfg.device), cfg.kind
    pipe.set_progress_bar_config(disable=True)
    objective = testbed_objective(kind, cfg.device) if cfg.objective == "testbed" else load_objective(cfg.objective)
    prompts = [sample(SEARCH_SEED + i, image=kind != "video", max_objects=2).caption for i in range(cfg.prompts)]
    seeds = [SEARCH_SEED + i for i in range(cfg.prompts)]
    call = dict(num_inference_steps=cfg.steps) if cfg.steps else {}
    start = time.perf_counter()
    heads = search(pipe, generator(kind, cfg.batch, **call), objective, prompts, seeds,
                   pool=candidate_pool(pipe, cfg.layers), rounds=cfg.rounds, top_k=cfg.top_k, u=cfg.u, scale=cfg.scale,
                   state_path=cfg.out, settings={k: v for k, v in asdict(cfg).items() if k not in ("device", "out", "batch")})
    print(json.dumps({"heads": heads, "seconds": round(time.perf_counter() - start, 1), "out": cfg.out}), flush=True)
    return heads


if __name__ == "__main__":
    main()
