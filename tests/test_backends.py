"""Every backend vs the fp32 reference on descriptions with every element rule (BackendTester)."""

import pytest
import torch

from diffattn.core.layout import TokenLayout
from diffattn.patterns import clear
from diffattn.patterns import neighborhood as nbm
from diffattn.patterns.blocks import expand_block_mask, from_block_mask
from diffattn.rules import RULES
from testers import BackendTester

pytestmark = pytest.mark.cpu


def _random_blocks(seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 5, 5, generator=g) < 0.4
    mask[:, :, 0] = True
    desc = from_block_mask(mask, 70, block_m=16)
    return desc, expand_block_mask(mask, 70, 70, 16, 16)[None]


class TestBackends(BackendTester):
    def cases(self):
        a = TokenLayout(3, 6, 7, 5, "after")
        sa = nbm.spec(a, (3, 3, 5), (1, 2, 2), 1, (True, False, False))
        b = TokenLayout(2, 8, 9, 4, "after")
        sb = nbm.spec(b, (1, 3, 3), 1, (1, 2, 3))
        c = TokenLayout(1, 10, 11, 6, "after")
        ct = clear.plane_tiling(c, 32)
        blocks, blocks_tok = _random_blocks()
        d = TokenLayout(3, 5, 9, 5, "after")
        sd = nbm.spec(d, (3, 3, 5), (1, 2, 1))
        tiling = nbm.choose_tiling(d, 32)
        # per-head lists with a rule: head 1 drops some of head 0's blocks
        e = TokenLayout(2, 6, 9, 3, "after")
        se = nbm.spec(e, (1, 3, 5))
        base = nbm.block_sparsity(e, se, block_m=16, block_n=16)
        drop = torch.zeros_like(base.mask[0])
        drop[1::2, 2::3] = True
        drop[:, 0] = False
        mask = torch.stack([base.mask[0], base.mask[0] & ~drop])
        mask[1][~mask[1].any(-1), 0] = True
        per_head = from_block_mask(mask, e.seq_len, block_m=16, block_n=16, partial=base.partial.expand_as(mask) | ~base.mask[0], rule=base.rule)
        per_head_tok = nbm.token_mask(e, se)[None] & expand_block_mask(mask, e.seq_len, e.seq_len, 16, 16)
        # key blocks of 64 and 128: the kernels pick each score's bit from two / four words a row
        # (64 x 64: the dK/dV pass's transposed tiles are 64 keys wide too)
        f = TokenLayout(2, 6, 12, 5, "after")
        sf = nbm.spec(f, (1, 3, 5), (1, 1, 2))
        return [
            ("neighborhood, 64-key blocks", nbm.block_sparsity(f, sf, block_m=64, block_n=64), nbm.token_mask(f, sf)),
            ("neighborhood, 128-key blocks", nbm.block_sparsity(f, sf, block_m=16, block_n=128), nbm.token_mask(f, sf)),
            ("neighborhood with per-head lists", per_head, per_head_tok),
            ("per-head block mask with a tail", blocks, blocks_tok),
            ("neighborhood causal + stride, text after", nbm.block_sparsity(a, sa, block_m=32, block_n=16), nbm.token_mask(a, sa)),
            ("neighborhood dilated", nbm.block_sparsity(b, sb, block_m=16, block_n=16), nbm.token_mask(b, sb)),
            ("circle, text after", clear.block_sparsity(c, 4, block_m=32, block_n=16), clear.token_mask(c, 4)),
            ("circle in tile order with pooled tokens, text after", clear.block_sparsity(c, 4, 2, tiling=ct),
             clear.kernel_mask(c, 4, 2, ct)),
            ("neighborhood in tile order, padded grid, text after", nbm.tiled_block_sparsity(d, sd, tiling), nbm.tiled_token_mask(d, sd, tiling)),
        ]

    def test_every_rule_has_a_case(self):
        kinds = {desc.rule_kind for _, desc, _ in self.cases()}
        assert kinds == set(RULES) | {"none"}, "declare a backend case for every element rule"
