"""FlexAttention backend: a block description becomes a ``BlockMask`` for compiled flex_attention.

Full blocks map to flex's full blocks (no ``mask_mod``); partial blocks map to flex's partial
blocks, whose ``mask_mod`` is the whole pattern: the listed-block lookup, the description's element
rule (its torch twin, ``rule.mask(q_idx, kv_idx)``), the sequence tail and, when keys are padded,
``kv_idx < kv_len[b]`` (every block from the first possibly padded key on is partial then). The index tensors are built
once per description (cache them on the handle through ``FlexBackend``); only the mask_mod's
captured ``kv_len`` changes per call.
"""

from __future__ import annotations

import torch

from diffattn.patterns.blocks import BlockSparsity, block_lists

FLEX_MIN_BLOCK = 16  # flex tiles must divide the sparse block; below 16 the kernel does not tile


def can_run(q: torch.Tensor, sparsity: BlockSparsity, forced: bool = False) -> tuple[bool, str]:
    if not q.is_cuda:
        return False, "flex backend runs compiled kernels on CUDA only (use backend='sdpa' on CPU)"
    if min(sparsity.block_m, sparsity.block_n) < FLEX_MIN_BLOCK:
        return False, f"flex backend needs blocks >= {FLEX_MIN_BLOCK}, got {sparsity.block_m}x{sparsity.block_n}"
    return True, ""


def _padded(num: torch.Tensor, idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    # flex reads column ids against the width of the index array: it must be >= the block count.
    out = torch.zeros(*idx.shape[:-1], width, dtype=torch.int32, device=idx.device)
    out[..., : idx.shape[-1]] = idx
    return num[None].contiguous(), out[None].contiguous()  # add the batch axis


class FlexBackend:
    """Compiled flex_attention plus the BlockMask index tensors of one description.

    Keep one per (description, device) on the handle: compiling is slow, building indices is not
    free. ``compiled``: the flex_attention callable to use (default: ``torch.compile``d; tests on the
    CPU pass the eager function).
    """

    def __init__(self, sparsity: BlockSparsity, device, compiled=None, text_key_start: int | None = None):
        from torch.nn.attention.flex_attention import flex_attention

        self.sparsity = sparsity.to(device)
        self.compiled = compiled if compiled is not None else torch.compile(flex_attention, dynamic=False)
        s = self.sparsity
        part = s.partial
        if text_key_start is not None:
            # every block from the first one holding a possibly padded key checks kv_idx < kv_len[b]
            part = part.clone()
            part[..., text_key_start // s.block_n:] |= s.mask[..., text_key_start // s.block_n:]
        self.masks_padding = text_key_start is not None
        full_num, full_idx = block_lists(s.mask & ~part)
        part_num, part_idx = block_lists(part)
        self.full_num, self.full_idx = _padded(full_num, full_idx, s.num_kv_blocks)
        self.part_num, self.part_idx = _padded(part_num, part_idx, s.num_kv_blocks)

    def __call__(self, q, k, v, kv_len: torch.Tensor | None = None, scale: float | None = None):
        from torch.nn.attention.flex_attention import BlockMask

        s = self.sparsity
        if kv_len is not None and not self.masks_padding:
            raise ValueError("FlexBackend: kv_len given but the backend was built without text_key_start")
        rule, total, listed, bm, bn = s.rule, s.kv_len, s.mask, s.block_m, s.block_n
        per_head = listed.shape[0] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            # the whole pattern, so mask_mod alone is exact (flex's contract; its unfused eager path
            # evaluates only mask_mod): listed block, key bound, element rule
            ok = listed[h if per_head else 0, q_idx // bm, kv_idx // bn]
            ok = ok & (kv_idx < (total if kv_len is None else kv_len[b]))
            if rule is not None:
                ok = ok & rule.mask(q_idx, kv_idx)
            return ok

        block_mask = BlockMask.from_kv_blocks(
            self.part_num, self.part_idx, self.full_num, self.full_idx,
            BLOCK_SIZE=(s.block_m, s.block_n), mask_mod=mask_mod, seq_lengths=(s.q_len, s.kv_len),
        )
        options = None
        if (s.block_m, s.block_n) != (128, 128):
            options = {"BLOCK_M": s.block_m, "BLOCK_N": s.block_n}
        return self.compiled(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options)
