"""Train the testbed judge (colour / shape / motion reader) on the generator's own labels.

    python -m diffattn_testbed.train_judge --kind video --out testbed/weights/judge-video.safetensors
    python -m diffattn_testbed.train_judge --kind image --out testbed/weights/judge-image.safetensors

Seeded; about a minute on one H100 (rendering the scenes takes most of it). Prints the judge's own
accuracy on held-out rendered scenes (seeds from ``training.EVAL_SEED``), the ceiling of what it can
report for a generated sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .judge import COLOR_NAMES, SIZE, Judge, JudgeConfig, color_rgb, prepare, save_judge, score
from .shapes import MOTIONS, SHAPES, labels, sample
from .training import EVAL_SEED, Clock, config_from_argv, optimizer_step, print_config, render_stream


@dataclass(frozen=True)
class JudgeTrainConfig:
    kind: str = "video"
    out: str = "testbed/weights/judge-video.safetensors"
    scenes: int = 40000
    frames: int = 29         # rendered clip length (the video pipeline's default)
    max_objects: int = 2
    steps: int = 3000
    batch: int = 256
    lr: float = 1e-3
    seed: int = 0
    workers: int = 4
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    max_minutes: float | None = None
    eval_scenes: int = 1000


def _dataset(cfg: JudgeTrainConfig, seeds, n_frames: int, clock: Clock):
    image = cfg.kind == "image"
    xs, labs = [], []
    for pixels, _ in render_stream(seeds, image=image, max_objects=cfg.max_objects, frames=1 if image else cfg.frames,
                                   size=SIZE, workers=cfg.workers, chunk=1024):
        xs.append((prepare(torch.from_numpy(pixels).float() / 255.0, n_frames) * 255).round().to(torch.uint8))
    for s in seeds:
        labs.append(labels(sample(int(s), image=image, max_objects=cfg.max_objects)))
    clock.log(f"rendered {len(seeds)} scenes")
    return torch.cat(xs), labs


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # x [B, C, 64, 64] in [0, 1]: colour jitter, blur (as a VAE decode would), noise
    b, dev = x.shape[0], x.device
    gain = 1 + 0.08 * (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1).to(dev)
    x = x * gain + 0.04 * (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1).to(dev)
    blur = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).to(dev)
    x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
    x = x + torch.randn(x.shape, generator=g).to(dev) * (0.05 * torch.rand(b, 1, 1, 1, generator=g)).to(dev)
    return x.clamp(0, 1)


def train(cfg: JudgeTrainConfig) -> dict:
    clock = Clock(cfg.max_minutes)
    print_config(cfg)
    if cfg.kind not in ("video", "image"):
        raise SystemExit(f"train_judge: --kind must be video or image, got {cfg.kind!r}")
    torch.manual_seed(cfg.seed)
    n_frames = 8 if cfg.kind == "video" else 1
    judge = Judge(JudgeConfig(kind=cfg.kind, frames=n_frames)).to(cfg.device)
    x_all, labs = _dataset(cfg, np.arange(cfg.scenes), n_frames, clock)
    x_all = x_all.to(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = max(1, cfg.steps // 20)  # linear warm-up, then cosine to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, i / cfg.steps)))
    )
    step = 0
    for step in range(cfg.steps):
        idx = rng.integers(0, len(labs), cfg.batch)
        queries, present, shape_t, motion_t = [], [], [], []
        for i in idx:
            objs = labs[i]
            if rng.random() < 0.75:
                o = objs[rng.integers(len(objs))]
                queries.append(o["color"]); present.append(1.0)
                shape_t.append(SHAPES.index(o["shape"])); motion_t.append(MOTIONS.index(o["motion"]))
            else:
                absent = [c for c in COLOR_NAMES if c not in {o["color"] for o in objs}]
                queries.append(absent[rng.integers(len(absent))]); present.append(0.0)
                shape_t.append(-100); motion_t.append(-100)
        x = _augment(x_all[torch.from_numpy(idx).to(cfg.device)].float() / 255.0, g)
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16):
            p, s, m = judge(x, color_rgb(queries).to(cfg.device))
        present_t = torch.tensor(present, device=cfg.device)
        loss = F.binary_cross_entropy_with_logits(p.float(), present_t)
        loss = loss + F.cross_entropy(s.float(), torch.tensor(shape_t, device=cfg.device), ignore_index=-100)
        if cfg.kind == "video":
            loss = loss + F.cross_entropy(m.float(), torch.tensor(motion_t, device=cfg.device), ignore_index=-100)
        optimizer_step(opt, loss, judge.parameters(), clip=None)
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            clock.log(f"step {step} loss {loss.item():.4f}")
        if clock.left() < 30:
            clock.log(f"deadline: stopping after step {step}")
            break
    judge.eval()
    eval_seeds = np.arange(EVAL_SEED, EVAL_SEED + cfg.eval_scenes)
    x_eval, _ = _dataset(cfg, eval_seeds, n_frames, clock)
    prompts = [sample(int(s), image=cfg.kind == "image", max_objects=cfg.max_objects).caption for s in eval_seeds]
    frames = x_eval.float().div(255).reshape(len(eval_seeds), n_frames, 3, SIZE, SIZE).permute(0, 1, 3, 4, 2)
    result = score(judge, frames, prompts)["accuracy"]
    clock.log(f"held-out accuracy on {cfg.eval_scenes} rendered scenes: {result}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_judge(judge.cpu(), out)
    clock.log(f"saved {out} after {step + 1} steps")
    return {"steps": step + 1, "held_out_accuracy": result, "seconds": clock.elapsed()}


def main(argv=None) -> None:
    cfg = config_from_argv(JudgeTrainConfig, argv, __doc__)
    if cfg.kind == "image" and cfg.out == JudgeTrainConfig().out:
        cfg = replace(cfg, out="testbed/weights/judge-image.safetensors")
    train(cfg)


if __name__ == "__main__":
    main()
