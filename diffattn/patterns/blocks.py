"""Block-level description of a sparse attention pattern, the form kernels consume.

A pattern is described on a grid of ``block_m x block_n`` tiles of the ``[q_len, kv_len]`` score
matrix. For every query block it lists the key blocks to compute, split into

- **full** blocks: every (query, key) pair inside is attended; no element mask is evaluated;
- **partial** blocks: an element rule (``diffattn.rules``) decides per pair (a structured
  pattern such as a neighborhood window), and the sequence tail is masked.

and, for the backward pass, the transposed lists (for every key block, the query blocks that
touch it). Lists are ``int32`` and sorted ascending; counts say how many entries are valid.
Tensors carry a leading head axis of size 1 (shared by all heads) or H (per head).

The sequence tail (``q_len``/``kv_len`` not multiples of the block) is always masked by the
kernel; the last key block is listed as partial so that full blocks never need a bounds check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


_LISTS = ("full_num", "full_idx", "part_num", "part_idx", "q_full_num", "q_full_idx", "q_part_num", "q_part_idx",
          "mask", "partial", "rule_params")


@dataclass(frozen=True, eq=False)
class BlockSparsity:
    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    full_num: torch.Tensor  # [Hm, nq] int32
    full_idx: torch.Tensor  # [Hm, nq, max_full] int32
    part_num: torch.Tensor  # [Hm, nq] int32
    part_idx: torch.Tensor  # [Hm, nq, max_part] int32
    # transposed lists for the dK/dV pass
    q_full_num: torch.Tensor  # [Hm, nk] int32
    q_full_idx: torch.Tensor  # [Hm, nk, max] int32
    q_part_num: torch.Tensor  # [Hm, nk] int32
    q_part_idx: torch.Tensor  # [Hm, nk, max] int32
    mask: torch.Tensor  # [Hm, nq, nk] bool: listed blocks (full or partial)
    partial: torch.Tensor  # [Hm, nq, nk] bool: listed blocks that need the element rule
    rule_params: torch.Tensor  # [P] int32: rule.pack() on the lists' device, for the kernels
    rule: Any = None  # an ElementRule (diffattn.rules) for partial blocks, or None (block-level pattern)
    density: float = 1.0
    full_share: float = 1.0  # listed blocks that are full (no element rule, no tail)

    @property
    def rule_kind(self) -> str:
        return "none" if self.rule is None else self.rule.kind

    @property
    def heads(self) -> int:
        return self.full_num.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.full_num.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_full_num.shape[1]

    def select_heads(self, start: int, stop: int) -> "BlockSparsity":
        """The description of heads ``start:stop`` (a shared one, ``heads == 1``, is returned as is)."""
        if self.heads == 1:
            return self
        return dataclasses.replace(self, **{name: getattr(self, name)[start:stop] for name in _LISTS if name != "rule_params"})

    def to(self, device) -> "BlockSparsity":
        moved = {name: getattr(self, name).to(device) for name in _LISTS}
        return BlockSparsity(
            self.q_len, self.kv_len, self.block_m, self.block_n, rule=self.rule,
            density=self.density, full_share=self.full_share, **moved,
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparsity(q={self.q_len}, kv={self.kv_len}, block={self.block_m}x{self.block_n}, "
            f"heads={self.heads}, density={self.density:.3f}, rule={self.rule_kind})"
        )


def block_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending column indices of the True entries of each row: counts [.., R], idx [.., R, max].

    O(nnz): the row-major ``nonzero`` is already sorted; each entry goes to its rank in its row.
    Entries past a row's count are 0 and never read.
    """
    *lead, rows, cols = mask.shape
    flat = mask.reshape(-1, cols)
    counts = flat.sum(-1, dtype=torch.int32)  # [R']
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    row, col = flat.nonzero(as_tuple=True)
    first = torch.cumsum(counts, 0, dtype=torch.int64) - counts  # exclusive prefix sum
    rank = torch.arange(row.numel(), device=mask.device) - first[row]
    idx = torch.zeros(flat.shape[0], width, dtype=torch.int32, device=mask.device)
    idx[row, rank] = col.to(torch.int32)
    return counts.reshape(*lead, rows), idx.reshape(*lead, rows, width)


def from_block_mask(
    mask: torch.Tensor,
    q_len: int,
    kv_len: int | None = None,
    *,
    block_m: int,
    block_n: int | None = None,
    partial: torch.Tensor | None = None,
    rule=None,
) -> BlockSparsity:
    """Describe a block mask ``[nq, nk]`` or ``[H, nq, nk]`` (bool) for the kernels.

    partial: same shape, True where a listed block needs the element rule. Default: none
             besides the last key block when ``kv_len`` is not a multiple of ``block_n``.
    Raises ValueError when a query block has no key block at all (its softmax would be empty).
    """
    kv_len = q_len if kv_len is None else kv_len
    block_n = block_m if block_n is None else block_n
    if mask.dtype != torch.bool:
        raise ValueError(f"from_block_mask: mask must be bool, got dtype={mask.dtype}")
    if mask.dim() == 2:
        mask = mask[None]
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    if tuple(mask.shape[1:]) != (nq, nk):
        raise ValueError(
            f"from_block_mask: mask has {tuple(mask.shape[1:])} blocks, expected {(nq, nk)} for "
            f"q_len={q_len}, kv_len={kv_len}, blocks {block_m}x{block_n}"
        )
    empty = ~mask.any(-1)
    if bool(empty.any()):
        head, row = (int(v) for v in empty.nonzero()[0])
        raise ValueError(
            f"from_block_mask: query block {row} (head {head}) has no key block; every query needs at "
            "least one key (add the diagonal block, or check the pattern parameters)"
        )
    part = torch.zeros_like(mask) if partial is None else (partial.expand_as(mask) & mask)
    if kv_len % block_n:
        part = part.clone()
        part[..., nk - 1] |= mask[..., nk - 1]
    full = mask & ~part
    full_num, full_idx = block_lists(full)
    part_num, part_idx = block_lists(part)
    q_full_num, q_full_idx = block_lists(full.transpose(-1, -2))
    q_part_num, q_part_idx = block_lists(part.transpose(-1, -2))
    # density over computed score entries, tails included
    rows = torch.full((nq,), block_m, dtype=torch.float64, device=mask.device)
    rows[-1] = q_len - (nq - 1) * block_m
    cols = torch.full((nk,), block_n, dtype=torch.float32, device=mask.device)
    cols[-1] = kv_len - (nk - 1) * block_n
    # keys per query row: exact in fp32 (integers below 2^24), then weighted by rows in fp64
    keys_per_row = (mask.to(torch.float32) @ cols).to(torch.float64)  # [Hm, nq]
    area = (keys_per_row * rows).sum() / (mask.shape[0] * q_len * kv_len)
    params = torch.tensor(rule.pack() if rule is not None else (0,), dtype=torch.int32, device=mask.device)
    return BlockSparsity(
        q_len, kv_len, block_m, block_n, full_num, full_idx, part_num, part_idx,
        q_full_num, q_full_idx, q_part_num, q_part_idx, mask, part, params,
        rule=rule, density=float(area), full_share=float(full.sum() / mask.sum()),
    )


def dense(q_len: int, kv_len: int | None = None, *, block_m: int = 128, block_n: int | None = None) -> BlockSparsity:
    """Every block listed: the sparse kernel run as a dense one (density 1.0)."""
    kv_len = q_len if kv_len is None else kv_len
    block_n = block_m if block_n is None else block_n
    mask = torch.ones(-(-q_len // block_m), -(-kv_len // block_n), dtype=torch.bool)
    return from_block_mask(mask, q_len, kv_len, block_m=block_m, block_n=block_n)


def expand_block_mask(mask: torch.Tensor, q_len: int, kv_len: int, block_m: int, block_n: int) -> torch.Tensor:
    """Token-level mask ``[.., q_len, kv_len]`` of a block mask (for references at small sizes)."""
    out = mask.repeat_interleave(block_m, dim=-2).repeat_interleave(block_n, dim=-1)
    return out[..., :q_len, :kv_len]
