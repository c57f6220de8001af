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
    assert np.isnan(judge_mod.axis_ratio(np.zeros((32, 32), bool)))
    # object_aspect on a drawn frame: the red ellipse is measured; cut by the border (a moving object
    # wrapping around the edges) or touching another asked object, the frame gives no ratio
    red, blue = np.array([230, 40, 40]) / 255, np.array([50, 90, 240]) / 255
    frame = np.full((128, 128, 3), 8 / 255)
    frame[ellipse] = red
    assert abs(judge_mod.object_aspect(frame, "red") - judge_mod.axis_ratio(ellipse)) < 1e-9
    assert judge_mod.object_aspect(np.roll(frame, 70, 1), "red") is None
    frame[(yy - 64) ** 2 + (xx - 72) ** 2 < 8**2] = blue
    assert judge_mod.object_aspect(frame, "red", ["blue"]) is None
    assert judge_mod.object_aspect(np.full((64, 64, 3), 8 / 255), "red") is None


@pytest.mark.parametrize("kind", ["video", "image"])
def test_rendered_scenes_pass_the_aspect_check(kind):
    judge = load_judge(kind)
    clips = [sample(4_000 + i, image=kind == "image", max_objects=2) for i in range(12)]
    frames = np.stack([render(c, frames=29 if kind == "video" else 1, height=128, width=128) for c in clips]) / 255.0
    prompts = [c.caption for c in clips]
    on = judge_mod.score(judge, frames, prompts)
    off = judge_mod.score(judge, frames, prompts, aspect=False)
    shape_on, shape_off = on["accuracy"]["shape"], off["accuracy"]["shape"]
    assert shape_on >= 0.85 and abs(shape_on - shape_off) <= 0.02, (on, off)
    ratios = [o["aspect"] for o in on["objects"] if o["aspect"] is not None]
    assert len(ratios) >= len(on["objects"]) // 2 and max(ratios) <= judge_mod.ASPECT_MAX, on["objects"]
    assert all(o["aspect"] is None for o in off["objects"])
    assert all(on["accuracy"][k] == off["accuracy"][k] for k in on["accuracy"] if k != "shape")


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
    on = judge_mod.score(judge, frames, [clip.caption])
    off = judge_mod.score(judge, frames, [clip.caption], aspect=False)
    circle_on, circle_off = on["objects"][0], off["objects"][0]
    assert circle_off["found"] and circle_off["shape_guess"] == "circle", off  # the CNN alone reads it right
    assert off["accuracy"]["shape"] == 1.0, off
    assert circle_on["shape_guess"] == "circle" and 1.25 < circle_on["aspect"] < 1.45, on
    assert on["accuracy"]["shape"] == 0.0, on  # the stretched circle (and the stretched square) read wrong
