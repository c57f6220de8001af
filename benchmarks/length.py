"""Length extension on the testbed video pipeline: longer clips than it was trained for (29 frames),
untuned and with length-extension LoRAs (``diffattn train length``), judged window by window.

    python benchmarks/length.py --frames 113 --radial-lora runs/len4x-radial --dense-lora runs/len4x-dense
    python benchmarks/length.py --frames 57 --prompts 16 --device cpu        # untuned rows only

Rows (the same 64 held-out prompts and seeds): the rendered ground truth at ``frames`` (the
procedural generator continues every motion; the judge's ceiling), dense at the default length (29
frames, the reference), and at ``frames``: dense untuned, radial untuned, dense + the dense-trained
LoRA, radial + the radial-trained LoRA (``diffattn.apply(pipe, "radial", lora=...)``: its dense
warm-up steps, block size and dense blocks as trained).

The judge reads 29-frame clips, so a long clip is scored in windows of 29 frames every 28 (113
frames: 4 windows, 57: 2): colour / shape / motion are the means over windows; ``motion_all`` is the
share of objects whose motion is read right in every window (temporal consistency: a clip that
drifts, freezes or changes motion part-way fails it). ``--train-logs`` folders' ``log.jsonl`` give
the training cost: median seconds per step and the total.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

import diffattn
from diffattn_testbed.judge import load_judge, score
from diffattn_testbed.pipelines import TRAINED_SIZE, load_pipeline
from diffattn_testbed.shapes import render, sample
from diffattn_testbed.training import EVAL_SEED

sys.path.insert(0, str(Path(__file__).parent))
from quality import _generate  # noqa: E402  (the timed, batched generation of quality.py)

WINDOW = TRAINED_SIZE["video"][2]  # 29 frames: the length the judge (and the model) know


def windows(frames: int) -> list[int]:
    """Start frames of the 29-frame windows, every 28 frames (the last frame of one is the first of the next)."""
    if frames < WINDOW:
        raise ValueError(f"length: clips must have at least {WINDOW} frames, got {frames}")
    return list(range(0, frames - WINDOW + 1, WINDOW - 1))


def judge_windows(judge, clips: np.ndarray, prompts: list[str]) -> dict:
    """Window-mean accuracy per attribute and ``motion_all`` (right in every window) of ``clips`` [N, F, H, W, 3]."""
    starts = windows(clips.shape[1])
    per_window = [score(judge, clips[:, s : s + WINDOW], prompts) for s in starts]
    out = {k: float(np.mean([w["accuracy"][k] for w in per_window])) for k in per_window[0]["accuracy"]}
    moving = [j for j, o in enumerate(per_window[0]["objects"]) if o["motion"]]
    right = [all(w["objects"][j]["found"] and w["objects"][j]["motion_guess"] == w["objects"][j]["motion"] for w in per_window)
             for j in moving]
    out["motion_all"] = float(np.mean(right)) if right else float("nan")
    out["windows"] = len(starts)
    return out


def train_cost(folder: str) -> dict:
    lines = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
    steps = [line["step_seconds"] for line in lines[1:]]  # the first step holds compilation / autotuning
    return {"steps": len(lines), "median_s_per_step": round(statistics.median(steps), 4),
            "total_s": round(sum(line["step_seconds"] for line in lines), 1), "final_loss": round(float(np.mean([l["loss"] for l in lines[-50:]])), 4)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=113)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--radial-lora", default="")
    parser.add_argument("--dense-lora", default="")
    parser.add_argument("--rows", default="truth,reference,dense,radial,dense-lora,radial-lora",
                        help="rows to run (reference: dense at 29 frames; the LoRA rows need their --*-lora)")
    parser.add_argument("--train-logs", nargs="*", default=[], help="trainer output folders whose cost to report")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    pipe = load_pipeline("video", device=args.device)
    judge = load_judge("video", device=args.device)
    scenes = [sample(EVAL_SEED + i, max_objects=2) for i in range(args.prompts)]
    prompts, seeds = [s.caption for s in scenes], list(range(args.prompts))
    size = TRAINED_SIZE["video"][0]

    rows = []

    def record(name: str, frames: int, clips: np.ndarray, sec: float | None, **extra):
        row = {"row": name, "frames": frames, **{k: round(v, 3) if isinstance(v, float) else v
                                                  for k, v in judge_windows(judge, clips, prompts).items()}, **extra}
        if sec is not None:
            row["s_per_clip"] = round(sec, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    wanted = set(args.rows.split(","))
    trained_at = lambda folder: json.loads((Path(folder) / "diffattn.json").read_text())["frames"]  # noqa: E731
    truth = np.stack([render(s, frames=args.frames, height=size, width=size) for s in scenes]).astype(np.float32) / 255
    if "truth" in wanted:
        record("rendered ground truth", args.frames, truth, None)
    run = lambda frames: _generate(pipe, "video", prompts, seeds, args.batch, args.device, num_frames=frames)  # noqa: E731
    _generate(pipe, "video", prompts[:2], seeds[:2], args.batch, args.device, num_frames=args.frames)  # warm-up
    if "reference" in wanted:
        record("dense, 29 frames (default length)", WINDOW, *run(WINDOW))
    if "dense" in wanted:
        record("dense, untuned", args.frames, *run(args.frames))
    if "radial" in wanted:
        with diffattn.apply(pipe, "radial") as handle:
            clips, sec = run(args.frames)
            record("radial, untuned", args.frames, clips, sec, density=round(handle.summary()["density"], 4))
    if args.dense_lora and "dense-lora" in wanted:
        pipe.load_lora_weights(args.dense_lora, adapter_name="length")
        try:
            record(f"dense + LoRA (trained dense at {trained_at(args.dense_lora)} frames)", args.frames, *run(args.frames))
        finally:
            pipe.unload_lora_weights()
    if args.radial_lora and "radial-lora" in wanted:
        with diffattn.apply(pipe, "radial", lora=args.radial_lora) as handle:
            clips, sec = run(args.frames)
            record(f"radial + LoRA (trained with radial at {trained_at(args.radial_lora)} frames)", args.frames, clips, sec,
                   density=round(handle.summary()["density"], 4), config=repr(handle.method.config))
    for folder in args.train_logs:
        cost = {"row": f"training cost: {folder}", **train_cost(folder)}
        rows.append(cost)
        print(json.dumps(cost), flush=True)
    cols = ["row", "frames", "color", "shape", "motion", "motion_all", "windows", "density", "s_per_clip"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        if "color" in r:
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
