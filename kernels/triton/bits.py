"""An element rule as per-block bit masks, built once per description for the attention kernels.

Evaluating a rule per score inside the attention loop costs a chain of integer divisions and
compares per score: on the H200 a 3-D neighborhood block cost about 8x a full block that way
(RESULTS.md, 2026-12-02). Here the rule is evaluated once per description, by the same Triton
predicate (``kernels.triton.rules``), into bits; the kernels then test one bit per score (a shift
and an and).

Layout, for a description with lists on ``Hm`` heads (1: shared), ``nq`` query blocks and at most
``P`` partial blocks per query block:

- ``bits`` ``[Hm, nq, P, block_m, W]`` int32, ``W = ceil(block_n / 32)``: entry ``j`` of query
  block ``qb``'s partial list holds, for each of its ``block_m`` query rows, ``W`` words; bit ``i``
  of word ``w`` is key ``w * 32 + i`` of the key block (1 = attended; keys past ``kv_len`` and queries past ``q_len`` are 0).
- ``q_part_slot`` ``[Hm, nk, Pq]`` int32, parallel to the transposed partial lists
  (``q_part_idx``): the position of that (query block, key block) pair in the query block's
  partial list, so that the dK/dV pass reads the same bits.

Memory: ``4 * block_m * W`` bytes per partial block (1 KiB at 128 x 64); e.g. about 240 MiB for the
HunyuanVideo window preset on Wan2.1-14B's 720p grid (every block partial). Bits are batch- and
head-independent unless the lists are per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from diffattn.patterns.blocks import BlockSparsity

from .rules import _predicate


@dataclass(frozen=True, eq=False)
class ElementBits:
    bits: torch.Tensor  # [Hm, nq, P, block_m, W] int32
    q_part_slot: torch.Tensor  # [Hm, nk, Pq] int32

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size() + self.q_part_slot.numel() * 4


@triton.jit
def _pack_kernel(part_num, part_idx, pred_ptr, bits, nq, width, q_len, kv_len,
                 SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr, W: tl.constexpr, PREDICATE: tl.constexpr):
    row = tl.program_id(0)  # h * nq + query block
    j = tl.program_id(1)  # entry of the row's partial list
    if j < tl.load(part_num + row):
        qb = row % nq
        kb = tl.load(part_idx + row.to(tl.int64) * width + j)
        offs_m = qb * SPARSE_M + tl.arange(0, SPARSE_M)
        lanes = tl.arange(0, 32)
        base = bits + (row.to(tl.int64) * width + j) * (SPARSE_M * W)
        for w in tl.static_range(W):
            col = w * 32 + lanes  # key column in the block
            offs_n = kb * SPARSE_N + col
            ok = _predicate(offs_m[:, None], offs_n[None, :], pred_ptr, PREDICATE)
            ok = ok & (col[None, :] < SPARSE_N) & (offs_n[None, :] < kv_len) & (offs_m[:, None] < q_len)  # [SPARSE_M, 32]
            word = tl.sum(ok.to(tl.int32) << lanes[None, :], 1)  # distinct bits: sum = or (bit 31 wraps to the sign)
            tl.store(base + tl.arange(0, SPARSE_M) * W + w, word)


def element_bits(sparsity: BlockSparsity) -> ElementBits:
    """The bits of ``sparsity``'s element rule on its partial blocks, on the description's device.

    Raises ValueError for a block-level description (no element rule: nothing to pack).
    """
    s = sparsity
    if s.rule is None:
        raise ValueError("element_bits: the description has no element rule; its partial blocks only mask the sequence tail")
    hm, nq, width = s.part_idx.shape
    nk = s.q_part_num.shape[1]
    words = -(-s.block_n // 32)
    device = s.part_idx.device
    bits = torch.zeros(hm, nq, width, s.block_m, words, dtype=torch.int32, device=device)
    if hm * nq * width:
        _pack_kernel[(hm * nq, width)](
            s.part_num, s.part_idx, s.rule_params, bits, nq, width, s.q_len, s.kv_len,
            SPARSE_M=s.block_m, SPARSE_N=s.block_n, W=words, PREDICATE=s.rule.kernel_id,
        )
    # position of every (query block, key block) pair in its query block's partial list
    listed = torch.arange(width, device=device) < s.part_num[..., None]  # [Hm, nq, P]
    head, qb, j = listed.nonzero(as_tuple=True)
    pos = torch.zeros(hm, nq, nk, dtype=torch.int32, device=device)
    pos[head, qb, s.part_idx[head, qb, j].long()] = j.to(torch.int32)
    slot = pos.transpose(1, 2).gather(2, s.q_part_idx.long())  # [Hm, nk, Pq]; unlisted entries never read
    return ElementBits(bits, slot.to(torch.int32).contiguous())
