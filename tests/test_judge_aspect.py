"""The judge's aspect check: a stretched shape reads shape-wrong, rendered scenes still read right (CPU)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffattn_testbed import judge as judge_mod
from diffattn_testbed.judge import load_judge
from diffattn_testbed.shapes import Clip, Obj, render, sample

pytestmark = pytest.mark.cpu


def _stretch(frames: np.ndarray, factor: float) -> np.ndarray:
    """``[N, F, H, W, 3]`` frames stretched ``factor`` times vertically, centre-cropped back to H x W."""
    n, f, h, w, _ = frames.shape
    x = torch.as_tensor(frames, dtype=torch.float32).reshape(n * f, h, w, 3).permute(0, 3, 1, 2)
    tall = round(h * factor)
    x = F.interpolate(x, size=(tall, w), mode="bilinear", align_corners=False)
    top = (tall - h) // 2
    return x[:, :, top : top + h].permute(0, 2, 3, 1).reshape(n, f, h, w, 3).numpy()


def test_axis_ratio_of_disc_and_ellipse():
    yy, xx = np.mgrid[0:128, 0:128]
    disc = (yy - 64) ** 2 + (xx - 50) ** 2 < 15**2
    ellipse = ((yy - 64) / 1.3) ** 2 + (xx - 50) ** 2 < 15**2
    wide = (yy - 64) ** 2 + ((xx - 50) / 1.5) ** 2 < 12**2
    assert judge_mod.axis_ratio(disc) < 1.02
    assert 1.25 < judge_mod.axis_ratio(ellipse) < 1.35
    assert 1.42 < judge_mod.axis_ratio(wide) < 1.58
    # a disc that wraps around the corner (as moving objects do) is still a disc
    assert judge_mod.axis_ratio(np.roll(disc, (64, 78), (0, 1))) < 1.02
    assert np.isnan(judge_mod.axis_ratio(np.zeros((32, 32), bool)))


@pytest.mark.parametrize("kind", ["video", "image"])
def test_rendered_scenes_pass_the_aspect_check(kind):
    judge = load_judge(kind)
    clips = [sample(4_000 + i, image=kind == "image", max_objects=2) for i in range(12)]
    frames = np.stack([render(c, frames=29 if kind == "video" else 1, height=128, width=128) for c in clips]) / 255.0
    prompts = [c.caption for c in clips]
    on = judge_mod.score(judge, frames, prompts)
    off = judge_mod.score(judge, frames, prompts, aspect=False)
    assert on["accuracy"]["shape"] >= 0.85 and abs(on["accuracy"]["shape"] - off["accuracy"]["shape"]) <= 0.02, (on, off)
    ratios = [o["aspect"] for o in on["objects"] if o["aspect"] is not None]
    assert len(ratios) >= len(on["objects"]) // 2 and max(ratios) <= judge_mod.ASPECT_MAX, on["objects"]
    assert all(o["aspect"] is None for o in off["objects"])
    assert {k: v for k, v in on["accuracy"].items() if k != "shape"} == off["accuracy"]


@pytest.mark.parametrize("kind", ["video", "image"])
def test_stretched_circle_reads_shape_wrong(kind):
    # a red circle (moving right: it wraps around the side edges) beside a still blue square
    clip = Clip((Obj("circle", "red", "right", x=0.3, y=0.45, size=0.13, phase=0.0),
                 Obj("square", "blue", "still", x=0.75, y=0.6, size=0.1, phase=0.0)),
                background="dark gray", texture="striped", seed=0, still_image=kind == "image")
    frames = _stretch(render(clip, frames=29 if kind == "video" else 1, height=128, width=128)[None] / 255.0, 1.35)
    if kind == "image":
        frames = frames[:, 0]
    judge = load_judge(kind)
    on = judge_mod.score(judge, frames, [clip.caption])["objects"]
    off = judge_mod.score(judge, frames, [clip.caption], aspect=False)["objects"]
    circle_on, circle_off = on[0], off[0]
    assert circle_off["found"] and circle_off["shape_guess"] == "circle", off  # the CNN alone reads it right
    assert 1.25 < circle_on["aspect"] < 1.45, on
    accuracy_on = judge_mod.score(judge, frames, [clip.caption])["accuracy"]["shape"]
    accuracy_off = judge_mod.score(judge, frames, [clip.caption], aspect=False)["accuracy"]["shape"]
    assert accuracy_off > accuracy_on, (accuracy_on, accuracy_off)  # the stretched circle (and square) now fail
