"""Quality of every diffattn method on the testbed pipelines, against dense, with the judge.

    python benchmarks/quality.py                                  # all kinds, 64 prompts, CUDA if present
    python benchmarks/quality.py --kinds video --prompts 8 --device cpu
    python benchmarks/quality.py --weights /path/to/retrained     # folders video/, image-dit/, image-unet/
    python benchmarks/quality.py --methods dense --prompts 128    # dense only (a second set of prompts)
    python benchmarks/quality.py --kinds video --methods "radial,neighborhood,neighborhood:kernel_size=(3,7,7)"
    python benchmarks/quality.py --kinds image-dit --sizes 128,256,512 --methods "clear,clear:lora='runs/clear'"
    python benchmarks/quality.py --kinds image-unet --sizes 128,256,512 --methods "hidiffusion,msw-msa,rau-net,tome,agent+tome"
    python benchmarks/quality.py --kinds video --methods "pag,soft-pag:u=0.5,stg,seg,radial:guidance='soft-pag'"
    python benchmarks/quality.py --kinds video --methods "radial,radial:precision='int8'" --versus radial

For each testbed pipeline (``diffattn_testbed.load_pipeline``) and each method (dense first, then
every method in ``diffattn.methods()``, or the comma-separated ``--methods`` (guidance names too:
``soft-pag:u=0.5``, ``radial:guidance='soft-pag'``), where an entry may
carry options as ``name:option=value;option=value`` with Python literals; a method the pipeline's
model does not support is listed as n/a with the reason; options come from the model family and the
pipeline's declared defaults, as with ``diffattn.apply``), the same held-out prompts (seeds from ``training.EVAL_SEED``, never
trained on) and the same generator seeds are run with the pipeline's defaults. Columns: judge
accuracy per attribute (``diffattn_testbed.judge``), PSNR and SSIM of the method's samples against
the dense samples (at the same size), ``judge_count`` for images (the share of asked objects drawn
exactly once: plain sampling above the trained size duplicates them), and seconds per sample (batched, after a warm-up batch). Prints a Markdown table
and, with ``--json``, writes the rows. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import diffattn
from diffattn_testbed.judge import load_judge, score
from diffattn_testbed.metrics import psnr, ssim
from diffattn_testbed.pipelines import KINDS, load_pipeline
from diffattn_testbed.shapes import sample
from diffattn_testbed.training import EVAL_SEED


@dataclass(frozen=True)
class QualityConfig:
    kinds: str = ",".join(KINDS)
    prompts: int = 64
    batch: int = 16
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    weights: str = ""       # folder with retrained video/, image-dit/, image-unet/ (default: committed ones)
    max_objects: int = 2
    json: str = ""
    methods: str = ""       # comma-separated methods after dense (default: every method in diffattn.methods())
    sizes: str = ""         # image kinds: comma-separated square sizes (default: the trained size); dense runs at each
    cfg: float = 0.0        # CFG scale of every run (guidance_scale; FLUX: true_cfg_scale); 0: the pipeline's default, 1: CFG off
    versus: str = ""        # one of --methods: every other method's PSNR / SSIM against its samples too (psnr_vs_db)


def _generate(pipe, kind: str, prompts: list[str], seeds: list[int], batch: int, device: str, **call):
    out, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = pipe(prompt=prompts[i : i + batch], generator=gens, output_type="np", **call)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        out.append(np.asarray(result.frames if kind == "video" else result.images))
    return np.concatenate(out), seconds / len(prompts)


def parse_method(text: str) -> tuple[str, dict]:
    """``name`` or ``name:option=value;option=value`` (values are Python literals)."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"quality: method options are option=value, got {item!r} in {text!r}")
        options[key.strip()] = ast.literal_eval(value.strip())
    return name, options


def _methods(cfg: QualityConfig) -> list[str]:
    """The methods to compare with dense: ``--methods a,b:k=v``, ``--methods dense`` (none), or all."""
    if not cfg.methods:
        return list(diffattn.methods())
    asked = [m.strip() for m in re.split(r",(?![^()]*\))", cfg.methods) if m.strip() and m.strip() != "dense"]
    def known(name):
        try:
            diffattn.config_class(name)  # a method or a '+' combination of U-Net methods
            return True
        except ValueError:
            return False

    unknown = [m for m in asked if not known(parse_method(m)[0])]
    if unknown:
        raise SystemExit(f"quality: unknown method(s) {unknown}; choose from {list(diffattn.methods())} (or 'dense' alone)")
    return asked


def evaluate(kind: str, cfg: QualityConfig) -> list[dict]:
    path = f"{cfg.weights}/{kind}" if cfg.weights else None
    pipe = load_pipeline(kind, device=cfg.device, path=path)
    judge = load_judge("video" if kind == "video" else "image", device=cfg.device)
    prompts = [sample(EVAL_SEED + i, image=kind != "video", max_objects=cfg.max_objects).caption for i in range(cfg.prompts)]
    seeds = list(range(cfg.prompts))
    sizes = [int(v) for v in cfg.sizes.split(",") if v] if cfg.sizes and kind != "video" else [None]
    rows = []
    for size in sizes:
        call = {} if size is None else dict(height=size, width=size)
        if cfg.cfg:
            call["true_cfg_scale" if kind == "image-dit" else "guidance_scale"] = cfg.cfg
        rows += _evaluate_size(pipe, kind, judge, prompts, seeds, cfg, call, size)
    return rows


def _evaluate_size(pipe, kind, judge, prompts, seeds, cfg: QualityConfig, call: dict, size) -> list[dict]:
    _generate(pipe, kind, prompts[: min(2, len(prompts))], seeds[:2], cfg.batch, cfg.device, **call)  # warm-up
    rows, dense, kept = [], None, {}
    for method in ["dense", *_methods(cfg)]:
        row = {"kind": kind, "method": method, "pipeline": type(pipe).__mro__[2].__name__, "prompts": cfg.prompts}
        if cfg.cfg:
            row["cfg"] = cfg.cfg
        if size is not None:
            row["size"] = size
        handle = None
        if method != "dense":
            name, options = parse_method(method)
            try:
                handle = diffattn.apply(pipe, name, **options)
            except NotImplementedError as exc:
                rows.append({**row, "note": f"n/a: {exc}"})
                continue
            if cfg.device.startswith("cuda"):  # compile / autotune outside the timed run
                _generate(pipe, kind, prompts[:2], seeds[:2], cfg.batch, cfg.device, **call)
        try:
            samples, sec = _generate(pipe, kind, prompts, seeds, cfg.batch, cfg.device, **call)
            if handle is not None:
                summary = handle.summary()
                if summary["density"] is not None:
                    row["density"] = round(summary["density"], 4)  # mean over the sparse calls
                row["sparse_calls"] = summary["method_calls"]
                row["config"] = repr(handle.method.config)
                if handle.guide is not None:  # guidance rows: the weak branch's config and what ran
                    row["guidance"] = "; ".join(repr(c) for c in handle.guide.configs)
                    row["weak_forwards"] = summary["guidance"]["weak_forwards"]
        finally:
            if handle is not None:
                handle.remove()
        acc = score(judge, samples, prompts)["accuracy"]
        row.update({f"judge_{k}": round(v, 3) for k, v in acc.items()})
        row["s_per_sample"] = round(sec, 4)
        if dense is None:
            dense = samples
        else:
            row["psnr_db"] = round(psnr(samples, dense), 2)
            row["ssim"] = round(ssim(samples, dense), 4)
        if cfg.versus:
            kept[method] = samples
        rows.append(row)
        print(json.dumps(row), flush=True)
    if cfg.versus:  # e.g. the 8-bit forward against the same method in bf16
        if cfg.versus not in kept:
            raise SystemExit(f"quality: --versus {cfg.versus!r} is not one of the methods run ({list(kept)})")
        for row in rows:
            if row["method"] in kept and row["method"] not in (cfg.versus, "dense"):
                row["psnr_vs_db"] = round(psnr(kept[row["method"]], kept[cfg.versus]), 2)
                row["ssim_vs"] = round(ssim(kept[row["method"]], kept[cfg.versus]), 4)
                print(json.dumps({"method": row["method"], "versus": cfg.versus, "psnr_vs_db": row["psnr_vs_db"], "ssim_vs": row["ssim_vs"]}), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["kind", "size", "cfg", "method", "judge_color", "judge_shape", "judge_motion", "judge_count", "psnr_db", "ssim", "density", "s_per_sample", "note"]
    if any("psnr_vs_db" in r for r in rows):
        cols[cols.index("ssim") + 1:cols.index("ssim") + 1] = ["psnr_vs_db", "ssim_vs"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    defaults = QualityConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    cfg = QualityConfig(**vars(parser.parse_args(argv)))
    print(json.dumps(asdict(cfg)), flush=True)
    if cfg.device.startswith("cuda"):
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for kind in cfg.kinds.split(","):
        if kind not in KINDS:
            raise SystemExit(f"quality: unknown kind {kind!r}; choose from {KINDS}")
        rows += evaluate(kind, cfg)
    print(table(rows), flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
