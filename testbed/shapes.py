"""Procedural captioned videos and images: the project's own training and evaluation data.

    from diffattn_testbed.shapes import sample, render
    clip = sample(seed=3)                        # a Clip: objects, background, caption
    frames = render(clip, frames=33, height=256, width=256)   # [F, H, W, 3] uint8

A scene has 1 to 3 objects (shape, colour, motion) on a plain or textured background. Captions are
generated from the parameters ("a red circle moving right and a blue star orbiting on a dark gray
striped background") with words from ``VOCABULARY``, the tokenizer's vocabulary. Everything is
deterministic by seed and independent of resolution and length: positions and sizes are in
fractions of the frame, and motions are periodic (linear motions wrap around the edges, bounce
and orbit repeat), so clips of any length continue naturally, which length extension needs.

Rendering draws each frame with Pillow at 2x supersampling (anti-aliased edges).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "purple": (150, 60, 210), "orange": (250, 140, 30), "white": (245, 245, 245), "cyan": (40, 220, 230),
}
MOTIONS = ("left", "right", "up", "down", "still", "bouncing", "orbiting")
MOTION_PHRASE = {
    "left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
    "still": "standing still", "bouncing": "bouncing", "orbiting": "orbiting",
}
BACKGROUNDS = {"dark gray": (40, 40, 45), "dark blue": (20, 30, 70), "black": (8, 8, 10), "dark green": (20, 55, 30)}
TEXTURES = ("plain", "striped", "checkered")
VOCABULARY = tuple(sorted(
    {"a", "and", "on", "background", *SHAPES, *COLORS, *TEXTURES}
    | {w for phrase in MOTION_PHRASE.values() for w in phrase.split()}
    | {w for name in BACKGROUNDS for w in name.split()}
))

PERIOD = 48  # frames per cycle of every motion: linear motions cross the frame once per period


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    motion: str
    x: float      # start centre, fraction of the width
    y: float      # start centre, fraction of the height
    size: float   # radius, fraction of min(height, width)
    phase: float  # motion phase in [0, 1)


@dataclass(frozen=True)
class Clip:
    objects: tuple[Obj, ...]
    background: str
    texture: str
    seed: int
    still_image: bool = False

    @property
    def caption(self) -> str:
        parts = []
        for o in self.objects:
            words = f"a {o.color} {o.shape}"
            if not self.still_image:
                words += f" {MOTION_PHRASE[o.motion]}"
            parts.append(words)
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return f"{' and '.join(parts)} on a {self.background}{texture} background"


def sample(seed: int, *, image: bool = False, max_objects: int = 3) -> Clip:
    """A random scene (deterministic by ``seed``). ``image=True``: no motion in the caption."""
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects!r}")
    rng = random.Random(seed)
    count = rng.randint(1, max_objects)
    colors = rng.sample(sorted(COLORS), count)  # distinct colours keep captions unambiguous
    objects = tuple(
        Obj(
            shape=rng.choice(SHAPES), color=colors[i], motion="still" if image else rng.choice(MOTIONS),
            x=rng.uniform(0.2, 0.8), y=rng.uniform(0.2, 0.8), size=rng.uniform(0.09, 0.16),
            phase=rng.random(),
        )
        for i in range(count)
    )
    return Clip(objects, rng.choice(sorted(BACKGROUNDS)), rng.choice(TEXTURES), seed, still_image=image)


def position(obj: Obj, t: int) -> tuple[float, float]:
    """Centre of ``obj`` at frame ``t`` (fractions; periodic in t with period PERIOD)."""
    u = t / PERIOD
    if obj.motion in ("left", "right"):
        sign = 1 if obj.motion == "right" else -1
        return (obj.x + sign * u) % 1.0, obj.y
    if obj.motion in ("up", "down"):
        sign = 1 if obj.motion == "down" else -1
        return obj.x, (obj.y + sign * u) % 1.0
    if obj.motion == "bouncing":
        height = abs(math.sin(math.pi * (u * 2 + obj.phase)))  # two bounces per period
        return obj.x, 0.8 - 0.55 * height
    if obj.motion == "orbiting":
        angle = 2 * math.pi * (u + obj.phase)
        return 0.5 + 0.28 * math.cos(angle), 0.5 + 0.28 * math.sin(angle)
    return obj.x, obj.y


def _polygon(shape: str, cx: float, cy: float, r: float):
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def _background(clip: Clip, height: int, width: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[clip.background], dtype=np.float32)
    img = np.broadcast_to(base, (height, width, 3)).copy()
    if clip.texture != "plain":
        yy, xx = np.mgrid[0:height, 0:width]
        cell = max(2, min(height, width) // 16)
        if clip.texture == "striped":
            on = ((xx + yy) // cell) % 2 == 0
        else:
            on = ((xx // cell) + (yy // cell)) % 2 == 0
        img[on] = np.clip(base * 1.8 + 12, 0, 255)
    return img


def render(clip: Clip, *, frames: int = 1, height: int = 256, width: int = 256, start: int = 0) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8 frames ``start .. start + frames - 1`` of ``clip``."""
    from PIL import Image, ImageDraw

    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"render: {name} must be an int >= 1, got {name}={value!r}")
    ss = 2  # supersampling factor for anti-aliased edges
    background = Image.fromarray(_background(clip, height * ss, width * ss).astype(np.uint8))
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        t = start + i
        img = background.copy()
        draw = ImageDraw.Draw(img)
        for obj in clip.objects:
            fx, fy = position(obj, t) if not clip.still_image else (obj.x, obj.y)
            r = obj.size * min(height, width) * ss
            color = COLORS[obj.color]
            # draw wrapped copies so objects crossing an edge re-enter on the other side
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    cx, cy = (fx + dx) * width * ss, (fy + dy) * height * ss
                    if cx < -r or cx > width * ss + r or cy < -r or cy > height * ss + r:
                        continue
                    box = [cx - r, cy - r, cx + r, cy + r]
                    if obj.shape == "circle":
                        draw.ellipse(box, fill=color)
                    elif obj.shape == "square":
                        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=color)
                    elif obj.shape == "ring":
                        draw.ellipse(box, outline=color, width=max(1, int(r * 0.35)))
                    else:
                        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=color)
        out[i] = np.asarray(img.resize((width, height), Image.BOX))
    return out


def labels(clip: Clip) -> list[dict]:
    """Per-object attributes for judges: shape, colour, motion (in caption order)."""
    return [{"shape": o.shape, "color": o.color, "motion": o.motion} for o in clip.objects]


def parse_caption(text: str) -> list[dict]:
    """The objects a caption (or a user prompt in the same words) asks for.

    Inverse of ``Clip.caption``: ``"a red circle moving right and a blue star on a black background"``
    gives ``[{"color": "red", "shape": "circle", "motion": "right"}, {"color": "blue", "shape":
    "star", "motion": None}]`` (``None``: the prompt names no motion). The background clause is
    optional. Raises ``ValueError`` naming the expected form when an object phrase or the background
    clause does not parse.
    """
    words = text.lower().replace(",", " ").split()
    if " on " in f" {' '.join(words)} ":  # the background clause: "... on a <background> [<texture>] background"
        cut = len(words) - 1 - words[::-1].index("on")
        _check_background(words[cut + 1:], text)
        words = words[:cut]
    phrases, current = [], []
    for w in words:
        if w == "and":
            phrases.append(current)
            current = []
        else:
            current.append(w)
    phrases.append(current)
    motions = {phrase: name for name, phrase in MOTION_PHRASE.items()}
    objects = []
    for phrase in phrases:
        if phrase[:1] == ["a"]:
            phrase = phrase[1:]
        if len(phrase) < 2 or phrase[0] not in COLORS or phrase[1] not in SHAPES:
            raise ValueError(
                f"cannot read an object from {' '.join(phrase)!r} in {text!r}: the testbed understands "
                f"'a <color> <shape> [<motion>]' joined by 'and', colors {sorted(COLORS)}, shapes {list(SHAPES)}, "
                f"motions {sorted(motions)}"
            )
        rest = " ".join(phrase[2:])
        if rest and rest not in motions:
            raise ValueError(f"unknown motion {rest!r} in {text!r}; the testbed's motions are {sorted(motions)}")
        objects.append({"color": phrase[0], "shape": phrase[1], "motion": motions.get(rest)})
    colors = [o["color"] for o in objects]
    if len(set(colors)) != len(colors):
        raise ValueError(f"{text!r} names a color twice; testbed scenes give every object its own color")
    return objects


def _check_background(clause: list[str], text: str) -> None:
    """``clause`` (the words after the last "on") must read ``a <background> [<texture>] background``."""
    body = clause[1:] if clause[:1] == ["a"] else clause
    if body[-1:] == ["background"]:
        body = body[:-1]
        if body and body[-1] in TEXTURES:
            body = body[:-1]
        if " ".join(body) in BACKGROUNDS:
            return
    raise ValueError(
        f"cannot read the background from {'on ' + ' '.join(clause)!r} in {text!r}: the testbed understands "
        f"'on a <background> [<texture>] background' at the end, backgrounds {sorted(BACKGROUNDS)}, textures {list(TEXTURES)}"
    )


def unknown_words(text: str) -> list[str]:
    """Words of ``text`` outside ``VOCABULARY`` (the testbed tokenizers map them to <unk>)."""
    return [w for w in text.lower().replace(",", " ").split() if w not in VOCABULARY]
