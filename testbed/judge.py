"""The quality yardstick: a small classifier that reads testbed samples back into attributes.

    from diffattn_testbed.judge import load_judge, score
    judge = load_judge("video")                          # or "image"
    result = score(judge, frames, prompts)               # frames [N, F, H, W, 3] in [0, 1]
    result["accuracy"]                                   # {"color": .., "shape": .., "motion": ..}

The judge is asked about one object at a time, by colour (testbed scenes give every object its own
colour): the query colour enters as three extra input channels, and the judge answers whether an
object of that colour is present, its shape and (video) its motion. Prompt adherence per attribute is
then: colour = the asked colour is found, shape / motion = the judge's shape / motion for that colour
is the prompted one (an object that is not found counts as wrong for every attribute).

Input: 8 frames spread evenly over the clip (1 for images), resized to 64x64, stacked on channels.
It is trained on the generator's own labels with blur / noise / colour jitter so that it reads
decoded samples too (``python -m diffattn_testbed.train_judge``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .shapes import COLORS, MOTIONS, SHAPES, parse_caption

WEIGHTS = Path(__file__).parent / "weights"
COLOR_NAMES = tuple(sorted(COLORS))
SIZE = 64


@dataclass(frozen=True)
class JudgeConfig:
    kind: str            # "video" or "image"
    frames: int          # frames read per sample (8 video, 1 image)
    width: int = 48      # channels of the first stage


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        w = config.width
        chans = [3 * config.frames + 3, w, int(1.5 * w), 2 * w, 3 * w, 4 * w]
        layers = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            stride = 1 if i == 0 else 2  # 64 -> 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * chans[-1], 256), nn.SiLU(), nn.Linear(256, 1 + len(SHAPES) + len(MOTIONS)))

    def forward(self, x: torch.Tensor, query: torch.Tensor):
        # x [N, 3 * frames, 64, 64] in [0, 1]; query [N, 3] RGB in [0, 1]
        q = query[:, :, None, None].expand(-1, -1, x.shape[-2], x.shape[-1])
        h = self.trunk(torch.cat([x * 2 - 1, q * 2 - 1], dim=1))
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        out = self.head(h)
        return out[:, 0], out[:, 1 : 1 + len(SHAPES)], out[:, 1 + len(SHAPES) :]  # present, shape, motion logits


def prepare(frames, n_frames: int) -> torch.Tensor:
    """``[N, F, H, W, 3]`` (or ``[N, H, W, 3]``) in [0, 1] -> ``[N, 3 * n_frames, 64, 64]``."""
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames).float()
    if x.dim() == 4:
        x = x[:, None]
    if x.dim() != 5 or x.shape[-1] != 3:
        raise ValueError(f"judge: frames must be [N, F, H, W, 3] or [N, H, W, 3], got {tuple(x.shape)}")
    idx = torch.linspace(0, x.shape[1] - 1, n_frames).round().long()
    x = x[:, idx]  # [N, T, H, W, 3]
    n, t, h, w, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(n, t * 3, h, w)
    if (h, w) != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area" if h >= SIZE and w >= SIZE else "bilinear")
    return x


def color_rgb(names) -> torch.Tensor:
    return torch.tensor([COLORS[c] for c in names], dtype=torch.float32) / 255.0


@torch.no_grad()
def score(judge: Judge, frames, prompts: list[str]) -> dict:
    """Prompt adherence of ``frames`` (one sample per prompt) per attribute, by the judge."""
    if len(frames) != len(prompts):
        raise ValueError(f"judge: {len(frames)} samples for {len(prompts)} prompts; pass one sample per prompt")
    device = next(judge.parameters()).device
    x = prepare(frames, judge.config.frames).to(device)
    rows, queries = [], []
    for i, prompt in enumerate(prompts):
        for obj in parse_caption(prompt):
            rows.append((i, obj))
            queries.append(obj["color"])
    present, shape, motion = judge(x[[i for i, _ in rows]], color_rgb(queries).to(device))
    found = (present > 0).cpu()
    shape_ok = found & (shape.argmax(-1).cpu() == torch.tensor([SHAPES.index(o["shape"]) for _, o in rows]))
    per_object = []
    correct = {"color": found.float(), "shape": shape_ok.float()}
    if judge.config.kind == "video":
        want = torch.tensor([MOTIONS.index(o["motion"]) if o["motion"] else -1 for _, o in rows])
        has = want >= 0
        motion_ok = found & (motion.argmax(-1).cpu() == want)
        correct["motion"] = motion_ok.float()[has] if has.any() else torch.empty(0)
    for j, (i, obj) in enumerate(rows):
        guess = {"sample": i, **obj, "found": bool(found[j]), "shape_guess": SHAPES[int(shape[j].argmax())]}
        if judge.config.kind == "video":
            guess["motion_guess"] = MOTIONS[int(motion[j].argmax())]
        per_object.append(guess)
    accuracy = {k: (float(v.mean()) if v.numel() else float("nan")) for k, v in correct.items()}
    return {"accuracy": accuracy, "objects": per_object}


def judge_path(kind: str) -> Path:
    if kind not in ("video", "image"):
        raise ValueError(f"judge: kind must be 'video' or 'image', got {kind!r}")
    return WEIGHTS / f"judge-{kind}.safetensors"


def save_judge(judge: Judge, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in judge.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(judge.config))})


def load_judge(kind: str, *, device: str | torch.device = "cpu", path=None) -> Judge:
    """The trained judge for ``"video"`` or ``"image"`` samples (float32, eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else judge_path(kind)
    if not path.exists():
        raise FileNotFoundError(
            f"judge: no trained {kind} judge at {path}; train it with "
            f"`python -m diffattn_testbed.train_judge --kind {kind} --out {path}`"
        )
    with safe_open(str(path), "pt") as f:
        config = JudgeConfig(**json.loads(f.metadata()["config"]))
    judge = Judge(config)
    judge.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return judge.eval().to(device)
