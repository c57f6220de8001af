"""Procedural captioned videos: deterministic, any size and length, captions in the vocabulary."""

import numpy as np
import pytest

from diffattn_testbed import shapes
from diffattn_testbed.tiny import word_tokenizer

pytestmark = pytest.mark.cpu


def test_deterministic_by_seed():
    a, b, c = shapes.sample(7), shapes.sample(7), shapes.sample(8)
    assert a == b and a != c
    assert np.array_equal(shapes.render(a, frames=3, height=40, width=56), shapes.render(b, frames=3, height=40, width=56))


def test_captions_use_the_tokenizer_vocabulary():
    tok = word_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for seed in range(200):
        for image in (False, True):
            clip = shapes.sample(seed, image=image)
            ids = tok(clip.caption)["input_ids"]
            assert unk not in ids, clip.caption
            assert len(clip.objects) in (1, 2, 3)
            motion_words = {"moving", "bouncing", "orbiting", "standing"}
            assert image == (not motion_words & set(clip.caption.split())), clip.caption


def test_caption_names_every_object():
    clip = shapes.sample(11)
    for obj in shapes.labels(clip):
        assert f"{obj['color']} {obj['shape']}" in clip.caption


@pytest.mark.parametrize("frames,height,width", [(1, 32, 32), (5, 48, 80), (97, 24, 40)])
def test_any_size_and_length(frames, height, width):
    out = shapes.render(shapes.sample(3), frames=frames, height=height, width=width)
    assert out.shape == (frames, height, width, 3) and out.dtype == np.uint8


def test_motion_is_periodic_and_smooth():
    # long clips continue naturally: frame t + PERIOD equals frame t, neighbours differ a little
    for seed in range(12):
        clip = shapes.sample(seed)
        video = shapes.render(clip, frames=shapes.PERIOD + 1, height=64, width=64).astype(np.int16)
        assert np.array_equal(video[0], video[shapes.PERIOD])
        step = np.abs(np.diff(video, axis=0)).mean()
        moving = any(o.motion != "still" for o in clip.objects)
        assert (step > 0) == moving and step < 20


def test_object_colour_is_drawn_at_its_centre():
    for seed in range(20):
        clip = shapes.sample(seed, image=True, max_objects=1)
        obj = clip.objects[0]
        if obj.shape in ("ring", "cross", "star"):  # the centre of a ring is background
            continue
        img = shapes.render(clip, height=128, width=128)[0]
        x, y = int(obj.x * 128), int(obj.y * 128)
        assert np.abs(img[y, x].astype(int) - shapes.COLORS[obj.color]).max() <= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="frames"):
        shapes.render(shapes.sample(0), frames=0)
    with pytest.raises(ValueError, match="max_objects"):
        shapes.sample(0, max_objects=4)
