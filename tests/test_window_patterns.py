"""Neighborhood (NATTEN/GNA) and CLEAR circle patterns: token references, block descriptions that
are complete, sound and exact, and the SDPA backend's element rule."""

import pytest
import torch

from diffattn.core.layout import TokenLayout
from diffattn.kernels.sdpa import token_mask as described_mask
from diffattn.patterns import clear
from diffattn.patterns import neighborhood as nbm

pytestmark = pytest.mark.cpu

NEIGHBORHOODS = [
    (TokenLayout(3, 10, 13), dict(kernel_size=(3, 5, 7))),
    (TokenLayout(1, 20, 23, 7, "after"), dict(kernel_size=(1, 6, 8), stride=(1, 2, 3))),
    (TokenLayout(4, 9, 11), dict(kernel_size=(2, 3, 3), dilation=(1, 2, 3))),
    (TokenLayout(5, 6, 7, 5, "before"), dict(kernel_size=(3, 3, 4), stride=(2, 1, 2), causal=(True, False, False))),
    (TokenLayout(1, 1, 50), dict(kernel_size=7, stride=3)),  # 1-D
    (TokenLayout(1, 16, 16), dict(kernel_size=4, stride=4)),  # blocked (window) attention
]
CIRCLES = [(TokenLayout(1, 20, 23, 9, "before"), 5), (TokenLayout(2, 12, 17), 4), (TokenLayout(1, 16, 16, 3, "after"), 30)]


def _tiles(tok, bm, bn):
    s_q, s_k = tok.shape
    nq, nk = -(-s_q // bm), -(-s_k // bn)
    pad = torch.zeros(nq * bm, nk * bn, dtype=torch.bool)
    pad[:s_q, :s_k] = tok
    inside = torch.zeros_like(pad)
    inside[:s_q, :s_k] = True
    t, v = pad.view(nq, bm, nk, bn), inside.view(nq, bm, nk, bn)
    any_ = t.any(3).any(1)
    return any_, (t | ~v).all(3).all(1) & any_


def _check_description(tok, desc, exact_full: bool):
    any_, all_ = _tiles(tok, desc.block_m, desc.block_n)
    listed, full = desc.mask[0], (desc.mask & ~desc.partial)[0]
    assert torch.equal(listed, any_), "listed blocks must be exactly the tiles with an allowed pair"
    assert not (full & ~all_).any(), "a full block holds a forbidden pair"
    if exact_full:  # the sequence tail's key column is partial by design
        body = slice(0, full.shape[1] - (1 if tok.shape[1] % desc.block_n else 0))
        assert torch.equal(full[:, body], all_[:, body])
    assert torch.equal(described_mask(desc, "cpu")[0], tok), "the SDPA element rule must reproduce the pattern"


@pytest.mark.parametrize("layout,kwargs", NEIGHBORHOODS)
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (64, 32)])
def test_neighborhood_description(layout, kwargs, bm, bn):
    spec = nbm.spec(layout, **kwargs)
    tok = nbm.token_mask(layout, spec)
    desc = nbm.block_sparsity(layout, spec, block_m=bm, block_n=bn)
    _check_description(tok, desc, exact_full=all(d == 1 for d in spec.dilation))


@pytest.mark.parametrize("layout,radius", CIRCLES)
def test_circle_description(layout, radius):
    tok = clear.token_mask(layout, radius)
    _check_description(tok, clear.block_sparsity(layout, radius, block_m=32, block_n=16), exact_full=True)


@pytest.mark.parametrize("layout,radius", CIRCLES)
@pytest.mark.parametrize("down", [1, 3])
@pytest.mark.parametrize("tiled", [False, True])
def test_circle_description_in_both_orders_with_pooled_tokens(layout, radius, down, tiled):
    tiling = clear.plane_tiling(layout, 32) if tiled else None
    tok = clear.kernel_mask(layout, radius, down, tiling)
    desc = clear.block_sparsity(layout, radius, down, tiling=tiling, block_m=32, block_n=16)
    _check_description(tok, desc, exact_full=not tiled)  # tile order: padded query rows may block "full"
    if not tiled:  # model order: the kernel sequence is the reference's queries plus pooled rows
        assert torch.equal(tok[: layout.seq_len], clear.token_mask(layout, radius, down))


def test_pooled_tokens_average_cells_and_serve_image_queries_only():
    layout = TokenLayout(1, 5, 7, 3, "before")
    x = torch.randn(1, 1, layout.seq_len, 2)
    pooled = clear.pool(x, layout, 2)  # cells of 2 x 2, cut to 1 x 2, 2 x 1, 1 x 1 at the border
    img = x[0, 0, 3:].reshape(5, 7, 2)
    assert pooled.shape == (1, 1, 3 * 4, 2)
    torch.testing.assert_close(pooled[0, 0, 0], img[:2, :2].mean((0, 1)))
    torch.testing.assert_close(pooled[0, 0, 3], img[:2, 6:].mean((0, 1)))
    torch.testing.assert_close(pooled[0, 0, 11], img[4, 6])
    tok = clear.token_mask(layout, 2, 2)
    assert not tok[:3, layout.seq_len:].any() and tok[3:, layout.seq_len:].all()


def test_natten_window_rules():
    # research/neighborhood.md §2.2 worked example: L=10, k=s=4 -> 0-3 | 4-7 | 8-9 see 6-9
    layout = TokenLayout(1, 1, 10)
    tok = nbm.token_mask(layout, nbm.spec(layout, 4, 4))
    assert tok[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert tok[5].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert tok[9].nonzero().flatten().tolist() == [6, 7, 8, 9]
    # even kernel: r keys before the query, r - 1 after; every query sees exactly k keys
    tok = nbm.token_mask(layout, nbm.spec(layout, 4))
    assert tok[5].nonzero().flatten().tolist() == [3, 4, 5, 6] and bool((tok.sum(1) == 4).all())
    # dilation 2: same parity only
    tok = nbm.token_mask(layout, nbm.spec(layout, 3, 1, 2))
    assert tok[4].nonzero().flatten().tolist() == [2, 4, 6]
    # causal with stride 2: shared start per stride group, own end
    tok = nbm.token_mask(layout, nbm.spec(layout, 3, 2, 1, True))
    assert tok[4].nonzero().flatten().tolist() == [3, 4] and tok[5].nonzero().flatten().tolist() == [3, 4, 5]


def test_circle_is_strict_and_text_is_global():
    layout = TokenLayout(1, 9, 9, 2, "before")
    tok = clear.token_mask(layout, 2)
    center = 2 + 4 * 9 + 4
    image = tok[center, 2:].reshape(9, 9)
    assert image.sum() == 9  # lattice points with dy^2 + dx^2 < 4
    assert tok[:2].all() and tok[:, :2].all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=9), "kernel \\* dilation"),
        (dict(kernel_size=3, stride=4), "stride must be <= kernel"),
        (dict(kernel_size=(3, 3)), "one value or three"),
        (dict(kernel_size=3, dilation=0), "ints >= 1"),
    ],
)
def test_neighborhood_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nbm.spec(TokenLayout(1, 8, 8), **kwargs)


def test_circle_bad_radius_and_tile():
    with pytest.raises(ValueError, match="radius"):
        clear.block_sparsity(TokenLayout(1, 4, 4), 0)
    with pytest.raises(ValueError, match="one frame deep"):
        clear.plane_tiling(TokenLayout(2, 8, 8), 32, (2, 4, 4))


def test_visualiser(capsys):
    nbm._main(["--frames", "2", "--rows", "16", "--cols", "16", "--kernel", "1", "5", "5"])
    assert "density" in capsys.readouterr().out
