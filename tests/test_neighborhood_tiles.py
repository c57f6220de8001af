"""Tile reordering for neighborhood attention: exact descriptions, a lossless order, padding."""

import pytest
import torch

from diffattn.core.layout import TokenLayout
from diffattn.kernels import sdpa
from diffattn.patterns import neighborhood as nbm
from diffattn.patterns.blocks import expand_block_mask

pytestmark = pytest.mark.cpu

CASES = [
    (TokenLayout(5, 9, 11, 6, "after"), (3, 5, 5), (1, 2, 1), 1, False, 64),
    (TokenLayout(3, 8, 8), (2, 3, 4), 1, (1, 2, 1), (True, False, False), 128),
    (TokenLayout(1, 13, 17), (1, 5, 7), (1, 2, 3), 1, False, 128),
    (TokenLayout(6, 16, 16), (3, 8, 8), (1, 8, 8), 1, False, 128),  # GNA: stride = tile, mostly full blocks
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tiled_description_is_exact_and_the_order_is_lossless(case):
    layout, k, s, d, c, volume = CASES[case]
    nb = nbm.spec(layout, k, s, d, c)
    tiling = nbm.choose_tiling(layout, volume)
    desc = nbm.tiled_block_sparsity(layout, nb, tiling)
    ref = nbm.tiled_token_mask(layout, nb, tiling)
    assert torch.equal(sdpa.token_mask(desc, "cpu")[0], ref)  # description + rule == the pattern
    listed = expand_block_mask(desc.mask, desc.q_len, desc.kv_len, desc.block_m, desc.block_n)[0]
    full = expand_block_mask(desc.mask & ~desc.partial, desc.q_len, desc.kv_len, desc.block_m, desc.block_n)[0]
    assert not (ref & ~listed).any() and not (full & ~ref).any()  # listed covers it, full blocks are inside it
    gather, valid, scatter = nbm.tile_order(layout, tiling)
    assert torch.equal(ref[scatter][:, scatter], nbm.token_mask(layout, nb))  # undoing the order gives NATTEN's mask
    assert torch.equal(gather[scatter], torch.arange(layout.seq_len)) and int(valid.sum()) == layout.seq_len
    assert not ref[:, ~valid].any() or layout.text_tokens == 0 and not ref[:, ~valid].any()  # padding keys never seen


def test_tiling_picks_the_least_padding():
    assert nbm.choose_tiling(TokenLayout(21, 45, 80)).tile == (1, 8, 16)  # 6.7 % padding
    assert nbm.choose_tiling(TokenLayout(8, 16, 16)).tile == (2, 8, 8)    # none
    assert nbm.choose_tiling(TokenLayout(1, 64, 64)).tile == (1, 8, 16)


def test_gna_stride_equal_to_the_tile_makes_blocks_full():
    # stride = tile and window starts on tile edges ((k - s) / 2 a multiple of the tile): only the
    # border tiles (clamped windows) stay partial
    layout = TokenLayout(6, 32, 32)
    nb = nbm.spec(layout, (2, 24, 24), (2, 8, 8))
    desc = nbm.tiled_block_sparsity(layout, nb, nbm.choose_tiling(layout, 128, (2, 8, 8)))
    full_share = float((desc.mask & ~desc.partial).sum() / desc.mask.sum())
    rowmajor = nbm.block_sparsity(layout, nb, block_m=128, block_n=128)
    assert full_share > 0.6 and float((rowmajor.mask & ~rowmajor.partial).sum()) == 0
