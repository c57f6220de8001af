"""Radial block mask: bit parity with the reference construction, published sparsities,
correct masks where the reference fails, and the token-level reference."""

import pytest
import torch
from radial_twin import reference_block_mask

from diffattn.patterns import radial

pytestmark = pytest.mark.cpu


# research/radial.md §1.6: video x video block sparsity of the reference
@pytest.mark.parametrize(
    "frames,tokens,block,decay,sink,text,sparsity",
    [
        (18, 3840, 128, 0.2, True, 0, 0.713),   # Wan2.1 768x1280x69
        (18, 3840, 128, 1.0, True, 0, 0.569),
        (20, 3840, 64, 0.8, True, 0, 0.651),    # Wan2.2 768x1280x77
        (30, 3840, 128, 0.95, False, 256, 0.725),  # Hunyuan 768x1280x117 + text
        (64, 3600, 128, 1.0, False, 0, 0.822),  # Hunyuan 720x1280x253
        (128, 3600, 128, 1.0, False, 0, 0.891),  # Hunyuan 720x1280x509
        (16, 3600, 128, 0.2, True, 0, 0.687),   # Wan 720x1280x61
        (16, 2304, 128, 0.2, True, 0, 0.643),   # Wan 576x1024x61
        (21, 1024, 128, 0.2, True, 0, 0.545),   # Wan 512x512x81
    ],
)
def test_published_sparsity(frames, tokens, block, decay, sink, text, sparsity):
    mask = radial.block_mask(frames, tokens, block_size=block, decay=decay, sink=sink, text_tokens=text)
    assert 1 - radial.density(mask, frames * tokens, block) == pytest.approx(sparsity, abs=6e-4)


@pytest.mark.parametrize(
    "frames,tokens,block,decay,sink,text",
    [
        (18, 3840, 128, 0.2, True, 0),
        (20, 3840, 64, 0.8, True, 0),
        (30, 3840, 128, 0.95, False, 256),
        (16, 1296, 128, 0.2, True, 0),   # T % B != 0 but N % B == 0: the reference builds it
        (21, 1024, 128, 1.0, False, 100),
        (12, 96, 64, 1.0, True, 0),
        (5, 200, 64, 0.5, False, 70),
        (40, 512, 128, 0.3, True, 0),    # frame distances reach the frequency gate
        (9, 48, 16, 3.0, True, 16),
    ],
)
def test_bit_parity_with_reference(frames, tokens, block, decay, sink, text):
    ref = reference_block_mask(frames, tokens, block_size=block, decay=decay, sink=sink, text_tokens=text)
    ours = radial.block_mask(frames, tokens, block_size=block, decay=decay, sink=sink, text_tokens=text)
    n = (frames * tokens + text + block - 1) // block
    assert ours.shape == (n, n)
    r = ref.shape[0]
    assert torch.equal(ours[:r, :r], ref)


@pytest.mark.parametrize("frames,tokens,block", [(9, 40, 16), (7, 100, 64), (21, 1560, 128)])
def test_the_reference_fails_on_unaligned_shapes(frames, tokens, block):
    with pytest.raises(RuntimeError, match="overhang"):
        reference_block_mask(frames, tokens, block_size=block, decay=0.2)


# Wan's native 720x1280x81 and 480x832x81 (research/radial.md §1.5) and small unaligned shapes
@pytest.mark.parametrize("frames,tokens,block", [(21, 3600, 128), (21, 1560, 128), (9, 40, 16), (7, 100, 64), (11, 200, 128)])
def test_unaligned_shapes_get_a_correct_mask(frames, tokens, block):
    mask = radial.block_mask(frames, tokens, block_size=block, decay=0.2, sink=True)
    sink_end = (tokens - 1) // block
    for i in range(frames):  # the blocks holding frame i's tokens, rows x columns
        lo, hi = (i * tokens) // block, ((i + 1) * tokens - 1) // block
        assert mask[lo:hi + 1, lo:hi + 1].all(), f"frame {i} lost part of its own frame"
        assert mask[lo:hi + 1, :sink_end + 1].all(), f"frame {i} lost part of the frame-0 sink"
    assert radial.density(mask) < 1.0


def test_token_mask_matches_the_description():
    f, t = 6, 256
    tok = radial.token_mask(f, t, block_size=64, decay=0.5, sink=True, text_tokens=8)
    s = f * t
    assert tok.shape == (s + 8, s + 8)
    assert tok[:, s:].all() and tok[s:, :].all()
    assert tok[:s, :t].all()  # sink
    for i, j in [(3, 3), (4, 3), (2, 3)]:  # d <= 1 dense
        assert tok[i * t:(i + 1) * t, j * t:(j + 1) * t].all()
    # d = 2: band of half-width max(512 * 0.5 / 4, 64) = 64 tokens
    block = tok[4 * t:5 * t, 2 * t:3 * t]
    r, c = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    assert torch.equal(block, (c - r).abs() <= 64)


def test_full_density_when_window_covers_everything():
    mask = radial.block_mask(4, 256, block_size=64, decay=100.0, sink=False, text_tokens=10)
    assert mask.all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=100), "block_size"),
        (dict(decay=0.0), "decay"),
        (dict(decay=float("nan")), "decay"),
        (dict(text_tokens=-1), "text_tokens"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        radial.block_mask(4, 64, **kwargs)


def test_visualiser(tmp_path, capsys):
    out = tmp_path / "mask.png"
    radial._main(["--frames", "6", "--tokens", "256", "--out", str(out)])
    assert out.exists() and "density" in capsys.readouterr().out
