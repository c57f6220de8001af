"""Training clips for the video trainers: a folder of videos with captions, read with imageio,
resized and centre-cropped to the target size, resampled in time to the model's frame rate and cut to
the target length (from the start); every clip that cannot
be used is reported (count and first examples per reason) and skipped, or refused with
``on_bad="refuse"``; nothing is silently used or truncated.

    folder/clip_0001.mp4 + folder/clip_0001.txt          # the caption, or
    folder/clip_0002.mp4 + folder/clip_0002.json         # {"caption": ...} (or "text" / "prompt")

Reasons a clip is not used: ``unreadable`` (imageio cannot decode it), ``too short`` (fewer frames
than the target needs at the model's frame rate), ``no frame rate`` (the file states none), ``no caption``, ``unknown words`` (the tokenizer maps a word to its unknown
token), ``caption too long`` (more tokens than the text encoder reads: the pipeline would cut it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
CAPTION_KEYS = ("caption", "text", "prompt")
EXAMPLES = 3  # examples per reason in the report


class BadClip(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class DataReport:
    """Clips used and clips left out, per reason (with the first examples)."""

    used: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, bad: BadClip) -> None:
        self.problems.setdefault(bad.reason, []).append(f"{name} ({bad.detail})")

    @property
    def skipped(self) -> int:
        return sum(len(v) for v in self.problems.values())

    def text(self) -> str:
        parts = [f"{self.used} clips used"]
        for reason, items in sorted(self.problems.items()):
            shown = "; ".join(items[:EXAMPLES]) + ("; ..." if len(items) > EXAMPLES else "")
            parts.append(f"{len(items)} {reason}: {shown}")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {"used": self.used, "skipped": {k: len(v) for k, v in self.problems.items()},
                "examples": {k: v[:EXAMPLES] for k, v in self.problems.items()}}


def read_caption(video: Path) -> str:
    txt, js = video.with_suffix(".txt"), video.with_suffix(".json")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8").strip()
    elif js.is_file():
        data = json.loads(js.read_text(encoding="utf-8"))
        text = next((str(data[k]).strip() for k in CAPTION_KEYS if isinstance(data, dict) and k in data), "")
    else:
        raise BadClip("no caption", f"no {txt.name} or {js.name} beside it")
    if not text:
        raise BadClip("no caption", "the caption file is empty")
    return text


def fit(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 ``[F, h, w, 3]`` -> uint8 ``[F, height, width, 3]``: scaled so it covers the target
    (aspect kept, antialiased bilinear), then centre-cropped."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[..., top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def frame_indices(frames: int, source_fps: float | None, fps: float | None) -> list[int]:
    """Source frame of each of ``frames`` target frames at ``fps``: the one on screen at that time
    (None: every frame as decoded)."""
    if fps is None:
        return list(range(frames))
    if not source_fps or source_fps <= 0:
        raise BadClip("no frame rate", "the file states none; pass --fps -1 to take the frames as decoded")
    return [int(i * source_fps / fps + 1e-9) for i in range(frames)]


def read_video(path: Path, frames: int, height: int, width: int, fps: float | None = None) -> torch.Tensor:
    """``frames`` frames of ``path`` from its start at ``fps`` (at each time the source frame on screen;
    None: as decoded), fitted to ``height`` x ``width``: uint8 [F, H, W, 3]."""
    import imageio.v3 as iio

    try:
        source_fps = iio.immeta(path).get("fps") if fps is not None else None
    except Exception as exc:  # imageio raises many kinds (OSError, ValueError, plugin errors)
        raise BadClip("unreadable", f"{type(exc).__name__}: {str(exc)[:80]}") from None
    wanted = frame_indices(frames, source_fps, fps)
    need = wanted[-1] + 1
    out = []
    try:
        for frame in iio.imiter(path):
            frame = np.asarray(frame)
            if frame.ndim == 2:
                frame = np.repeat(frame[..., None], 3, axis=-1)
            out.append(frame[..., :3])
            if len(out) == need:
                break
    except Exception as exc:
        raise BadClip("unreadable", f"{type(exc).__name__}: {str(exc)[:80]}") from None
    if not out:
        raise BadClip("unreadable", "no frames decoded")
    if len(out) < need:
        at = f" at {fps:g} fps (the file has {source_fps:g})" if fps is not None else ""
        raise BadClip("too short", f"{len(out)} frames, {need} needed for {frames}{at}")
    return fit(np.stack([out[i] for i in wanted]), height, width)


def folder_clips(folder: str | Path, frames: int, height: int, width: int, report: DataReport,
                 fps: float | None = None) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(name, uint8 [F, H, W, 3], caption)`` of every usable video in ``folder`` (sorted by name),
    resampled to ``fps``; the others go to ``report``."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"video data: {folder} is not a folder; pass a folder of videos (mp4, ...) with captions (.txt/.json)")
    videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(f"video data: no videos ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    for path in videos:
        name = str(path.relative_to(root))
        try:
            caption = read_caption(path)
            pixels = read_video(path, frames, height, width, fps)
        except BadClip as bad:
            report.add(name, bad)
            continue
        yield name, pixels, caption


def check_caption(caption: str, tokenizers: Iterable, limit: int) -> None:
    """Raise ``BadClip`` for words a tokenizer maps to its unknown token or a caption longer than
    ``limit`` tokens (the first tokenizer's count: the text encoder the pipeline pads to)."""
    for i, tok in enumerate(tokenizers):
        # without special tokens: CLIP's unknown token is also its end token
        ids = tok(caption, add_special_tokens=False).input_ids
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None and unk in ids:
            words = [w for w in caption.split() if unk in tok(w, add_special_tokens=False).input_ids]
            raise BadClip("unknown words", f"{words[:5] or caption[:40]!r} map to {tok.unk_token!r}")
        count = len(tok(caption).input_ids)
        if i == 0 and count > limit:  # the text encoder the model attends to (CLIP's pooled 77 tokens are cut by design)
            raise BadClip("caption too long", f"{count} tokens, the text encoder reads {limit}")


__all__ = ["BadClip", "DataReport", "check_caption", "fit", "folder_clips", "frame_indices", "read_caption", "read_video"]
