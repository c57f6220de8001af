"""Context parallelism for diffattn's processors, on diffusers' own machinery.

``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))`` (diffusers
0.42) registers split hooks from the model's ``_cp_plan``: every rank then runs each attention with a
contiguous slice of every split part of the sequence. diffattn's processors see those slices and run
their method calls here:

- **Ulysses** (``ulysses_degree > 1``): diffusers' all-to-all (``SeqAllToAllDim``, with its autograd
  rule) turns ``[B, S/U, H, D]`` slices into full sequences for ``H/U`` heads. The gathered sequence is
  the ranks' local sequences one after the other (``[text_0; img_0; text_1; img_1]`` for FLUX), so it
  is permuted into the layout's order, the method runs exactly as on one GPU (per-head descriptions
  and SEG's query blur follow their heads), and the output goes back the same way.
- **Ring** (``ring_degree > 1``): a rank keeps its query slice and needs only the keys its queries'
  block lists touch. Every rank computes, from the one block description all ranks share, which of
  its key tokens each other rank needs; one ``all_to_all_single`` (torch's functional collective
  with its autograd rule: gradients flow back along the same routes) moves exactly those, and the
  method runs on the rank's query rows only (other rows get one placeholder block each). Diffusers'
  own ring all-gathers every key chunk; ``traffic`` counts what this saves.
- **Both** (unified): Ulysses over the ulysses group, then the sparse ring over the ring group.

Why one kernel call after the exchange and no per-chunk LSE merges: diffusers' equipartition cuts
the sequence at ``S / degree``, which is not a multiple of the kernel's block, so per-chunk calls
would need a key-range mask inside the kernels; one call over the assembled keys computes the same
blocks and is exact. Memory per rank is the full-length key buffer, as with diffusers' all-gather ring.

Dense calls under context parallelism: without a padded-text mask they go to diffusers' dispatcher
with the parallel config (the stock behaviour); with one (HunyuanVideo) they run here, because the
mask a split forward builds is not the mask of the rank's tokens. Equal slices only: the
``*_anything`` modes (uneven slices) are refused with what to change.
"""

from __future__ import annotations

import dataclasses

import torch

from diffattn.core.layout import TokenLayout
from diffattn.patterns.blocks import BlockSparsity, dense, from_block_mask

try:  # diffusers' Ulysses all-to-all (diffusers >= 0.36)
    from diffusers.models.attention_dispatch import SeqAllToAllDim
except ImportError:  # pragma: no cover - older diffusers
    SeqAllToAllDim = None


def cp_config(parallel_config):
    """The ``ContextParallelConfig`` of a processor's ``_parallel_config`` when it spans more than
    one rank, else None."""
    cp = getattr(parallel_config, "context_parallel_config", None) if parallel_config is not None else None
    if cp is None or getattr(cp, "_world_size", None) is None:
        return None
    return cp if cp.ring_degree * cp.ulysses_degree > 1 else None


def degree(cp) -> int:
    return cp.ring_degree * cp.ulysses_degree


def backend_rings(backend) -> bool:
    """Whether diffusers' ring attention can run on this dispatcher backend (it merges chunks by
    their log-sum-exp, which the "native" SDPA backend does not return)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = backend if backend is not None else _AttentionBackendRegistry.get_active_backend()[0]
    return str(getattr(name, "value", name)) != "native"


def check_config(cp, method: str) -> None:
    if SeqAllToAllDim is None:
        raise NotImplementedError("diffattn: context parallelism needs diffusers >= 0.36 (SeqAllToAllDim); pip install -U diffusers")
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        raise NotImplementedError(
            f"diffattn {method}: ContextParallelConfig(ulysses_anything=True / ring_anything=True) splits the "
            "sequence unevenly; sparse steps need equal slices: use a degree that divides the token count (and, "
            "for Ulysses, the head count) with the *_anything options off"
        )


# -- where every rank's tokens sit in the layout ---------------------------------------------------

def pieces(layout: TokenLayout) -> tuple[tuple[int, int], ...]:
    """(layout offset, length) of each part a context-parallel plan splits, in the order the
    processors concatenate their local slices (text and video in the layout's order)."""
    video = (layout.video_start, layout.video_tokens)
    if layout.text_position == "before":
        return ((0, layout.text_tokens), video)
    if layout.text_position == "after":
        return (video, (layout.video_tokens, layout.text_tokens))
    return (video,)


def local_length(layout: TokenLayout, world: int) -> int:
    return sum(n // world for _, n in pieces(layout))


def check_split(layout: TokenLayout, world: int, local: int, method: str) -> None:
    bad = [n for _, n in pieces(layout) if n % world]
    if bad or local != local_length(layout, world):
        raise ValueError(
            f"diffattn {method}: under context parallelism of degree {world} this attention has {local} tokens "
            f"per rank but the layout {layout!r} splits into {local_length(layout, world)} (every split part "
            f"must divide by {world}: {[n for _, n in pieces(layout)]}); pick a size or degree that divides, "
            "and check that the model's context-parallel plan splits the text the way diffattn's plan does"
        )


def positions(layout: TokenLayout, world: int, rank: int, device) -> torch.Tensor:
    """[S/world] layout positions of the local tokens of flattened rank ``rank``."""
    parts = [torch.arange(off + rank * (n // world), off + (rank + 1) * (n // world), device=device) for off, n in pieces(layout)]
    return torch.cat(parts)


# -- Ulysses -----------------------------------------------------------------------------------

def ulysses_in(x: torch.Tensor, cp) -> torch.Tensor:
    """[B, S_local, H, D] -> [B, S_group, H / U, D] (diffusers' all-to-all; no-op for U = 1)."""
    if cp.ulysses_degree == 1:
        return x
    heads = x.shape[2]
    if heads % cp.ulysses_degree:
        raise ValueError(
            f"diffattn: Ulysses degree {cp.ulysses_degree} does not divide the {heads} attention heads; "
            "pick a ulysses_degree that divides them (and ring_degree for the rest)"
        )
    return SeqAllToAllDim.apply(cp._ulysses_mesh.get_group(), x.contiguous(), 2, 1)


def ulysses_out(x: torch.Tensor, cp) -> torch.Tensor:
    """[B, S_group, H / U, D] -> [B, S_local, H, D]."""
    if cp.ulysses_degree == 1:
        return x
    return SeqAllToAllDim.apply(cp._ulysses_mesh.get_group(), x.contiguous(), 1, 2)


def group_positions(layout: TokenLayout, cp, ring_rank: int, device) -> torch.Tensor:
    """Layout positions of the tokens a rank holds after the Ulysses all-to-all: the local slices of
    its ulysses group, in ulysses-rank order (flattened rank = ring index * U + ulysses index)."""
    world, u = degree(cp), cp.ulysses_degree
    return torch.cat([positions(layout, world, ring_rank * u + i, device) for i in range(u)])


def head_range(cp, heads_local: int) -> tuple[int, int]:
    """The heads of the full attention that this rank's ``heads_local`` heads are."""
    start = cp._ulysses_local_rank * heads_local if cp.ulysses_degree > 1 else 0
    return start, start + heads_local


# -- the sparse ring ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class RingPlan:
    """Who sends which key tokens to whom, and the description of one rank's query rows.

    send[j]: [n_j] local indices of this rank's keys that ring rank j needs (empty for j == me);
    recv[j]: [m_j] layout positions of the keys this rank gets from j; rows: the description with
    every query block outside this rank's rows reduced to one placeholder block.
    """

    me: int
    mine: torch.Tensor  # [S_local] layout positions of this rank's tokens
    send: tuple[torch.Tensor, ...]
    recv: tuple[torch.Tensor, ...]
    rows: BlockSparsity
    tokens_moved: int  # key tokens received by this rank
    tokens_dense: int  # key tokens an all-gather ring receives
    glob: torch.Tensor  # [n_me] local indices of this rank's global rows (rows that attend every key)
    glob_counts: tuple[int, ...]  # global rows per ring rank
    glob_rows: BlockSparsity | None  # every block of [all global rows, this rank's keys] listed (the kernel path)


def _block_sets(pos: torch.Tensor, block: int, count: int) -> torch.Tensor:
    sel = torch.zeros(count, dtype=torch.bool, device=pos.device)
    sel[torch.div(pos, block, rounding_mode="floor")] = True
    return sel


def ring_plan(sparsity: BlockSparsity, layout: TokenLayout, members: list[torch.Tensor], me: int) -> RingPlan:
    """The exchange and row description of ring rank ``me`` given every ring rank's layout
    positions (``members``); every rank computes the same plan for every pair (no communication)."""
    mask = sparsity.mask.to(members[0].device)  # [Hm, nq, nk]
    nq, bm, bn, seq = mask.shape[1], sparsity.block_m, sparsity.block_n, sparsity.kv_len
    any_head = mask.any(0)  # [nq, nk]
    glob_tok = global_rows(sparsity, members[0].device)  # [S] rows computed by parts on every rank, then merged
    rowsel = torch.stack([_block_sets(p[~glob_tok[p]], bm, nq) for p in members])  # [R, nq] rows of the main call
    needed = (rowsel.float() @ any_head.float()) > 0  # [R, nk] key blocks each rank's rows list
    needed_tok = needed.repeat_interleave(bn, dim=1)[:, :seq]  # [R, S]
    send = tuple(
        torch.zeros(0, dtype=torch.long, device=mask.device) if j == me else needed_tok[j][members[me]].nonzero().flatten()
        for j in range(len(members))
    )
    recv = tuple(
        torch.zeros(0, dtype=torch.long, device=mask.device) if j == me else members[j][needed_tok[me][members[j]]]
        for j in range(len(members))
    )
    rows = _rows_only(sparsity, mask, rowsel[me], layout)
    moved = sum(int(r.numel()) for r in recv)
    dense_tokens = sum(int(members[j].numel()) for j in range(len(members)) if j != me)
    glob = glob_tok[members[me]].nonzero().flatten()
    counts = tuple(int(glob_tok[p].sum()) for p in members)
    glob_rows = None
    if sum(counts):
        block = 64
        glob_rows = from_block_mask(torch.ones(-(-sum(counts) // block), -(-members[me].numel() // block), dtype=torch.bool,
                                               device=mask.device), sum(counts), members[me].numel(), block_m=block, block_n=block)
    return RingPlan(me, members[me], send, recv, rows, moved, dense_tokens, glob, counts, glob_rows)


GLOBAL_SHARE = 8  # global rows are computed by parts only while they are at most 1/8 of the sequence


def global_rows(sparsity: BlockSparsity, device) -> torch.Tensor:
    """[S] bool: the query rows that attend every key at the element level (text rows of joint
    layouts: "text global both ways"), found from the description itself: query blocks that list
    every key block, whose partial blocks' element rule keeps every key. A ring computes them on
    every rank over its own keys and merges the parts (no rank fetches every key for them). None
    when they would be more than 1/``GLOBAL_SHARE`` of the sequence (a dense description)."""
    mask, seq, bm, bn = sparsity.mask, sparsity.q_len, sparsity.block_m, sparsity.block_n
    dense_blocks = mask.all(-1).all(0)  # [nq]
    out = torch.zeros(seq, dtype=torch.bool, device=device)
    blocks = dense_blocks.nonzero().flatten().tolist()
    if sum(min((b + 1) * bm, seq) - b * bm for b in blocks) > seq // GLOBAL_SHARE:
        return out
    for b in blocks:
        rows = torch.arange(b * bm, min((b + 1) * bm, seq))
        if sparsity.rule is not None:
            cols = sparsity.partial[:, b].any(0).nonzero().flatten().tolist()
            keys = torch.cat([torch.arange(c * bn, min((c + 1) * bn, sparsity.kv_len)) for c in cols]) if cols else None
            if keys is not None and not bool(sparsity.rule.mask(rows[:, None], keys[None, :]).all()):
                continue
        out[rows.to(device)] = True
    return out


def _rows_only(sparsity: BlockSparsity, mask: torch.Tensor, rowsel: torch.Tensor, layout: TokenLayout) -> BlockSparsity:
    """The description with the query blocks outside ``rowsel`` listing one full video block only
    (their outputs are dropped; a full block with valid keys keeps them finite, so their zero
    gradients stay zero). Unchanged when no such block exists (tiny grids)."""
    bn, nk = sparsity.block_n, mask.shape[2]
    lo, hi = layout.video_start, layout.video_start + layout.video_tokens
    first = -(-lo // bn)
    if first >= nk - 1 or (first + 1) * bn > hi or bool(rowsel.all()):
        return sparsity
    keep = rowsel[None, :, None]
    placeholder = torch.zeros_like(mask)
    placeholder[:, :, first] = True
    rows = torch.where(keep, mask, placeholder)
    partial = torch.where(keep, sparsity.partial.to(mask.device), torch.zeros_like(mask))
    return from_block_mask(rows, sparsity.q_len, sparsity.kv_len, block_m=sparsity.block_m, block_n=bn,
                           partial=partial, rule=sparsity.rule)


def exchange(local: torch.Tensor, plan: RingPlan, group) -> torch.Tensor:
    """local [S_local, ...] (tokens first) -> [sum m_j, ...]: the keys this rank receives, in the
    order of ``plan.recv`` (torch's autograd all-to-all: gradients return to their owners)."""
    import torch.distributed._functional_collectives as funcol

    send = torch.cat([local.index_select(0, idx) for idx in plan.send])
    out = funcol.all_to_all_single_autograd(
        send, [int(r.numel()) for r in plan.recv], [int(s.numel()) for s in plan.send], group
    )
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def ring_attention(q, k, v, layout: TokenLayout, plan: RingPlan, group, run, kv_len=None) -> torch.Tensor:
    """q, k, v [B, S_mine, h, D] of this ring rank's tokens (layout positions ``plan.mine``) ->
    [B, S_mine, h, D]. ``run(q, k, v)`` takes full-length [B, h, S, D] tensors in layout order and
    computes ``plan.rows``; the global rows (``plan.glob``) are merged from every rank's part.
    ``kv_len`` [B]: keys at layout positions >= kv_len[b] are padding."""
    b, _, h, d = q.shape
    seq = layout.seq_len
    kv = torch.stack([k, v]).permute(2, 0, 1, 3, 4)  # [S_mine, 2, B, h, D]
    got = exchange(kv.contiguous(), plan, group)  # [M, 2, B, h, D]
    where = torch.cat([plan.mine] + list(plan.recv))
    buf = kv.new_zeros((seq,) + kv.shape[1:]).index_copy(0, where, torch.cat([kv, got]))  # [S, 2, B, h, D]
    k_full, v_full = buf.permute(1, 2, 3, 0, 4).unbind(0)  # [B, h, S, D]
    q_full = q.new_zeros((seq, b, h, d)).index_copy(0, plan.mine, q.transpose(0, 1)).permute(1, 2, 0, 3)
    out = run(q_full, k_full, v_full).index_select(2, plan.mine)  # [B, h, S_mine, D]
    if sum(plan.glob_counts):
        merged = _global_rows(q, k, v, plan, group, kv_len)  # [B, h, n_me, D]
        out = out.index_copy(2, plan.glob, merged.to(out.dtype))
    return out.transpose(1, 2)  # [B, S_mine, h, D]


def part_attention(q, k, v, valid, description: BlockSparsity | None = None):
    """Dense attention of q [B, h, G, D] over this rank's keys with its lse, both differentiable:
    the block-sparse kernel with every block listed where it runs (CUDA; valid keys a prefix of the
    rank's keys: padded text after the video; ``description``: that dense description, when cached),
    else ``kernels.partial`` (plain torch)."""
    from diffattn.kernels import block_sparse
    from diffattn.kernels.partial import partial_attention

    counts = None if valid is None else valid.sum(-1, dtype=torch.int32)  # [B]
    prefix = valid is None or bool((valid == (torch.arange(valid.shape[1], device=valid.device)[None] < counts[:, None])).all())
    if q.is_cuda and prefix:
        description = description if description is not None else dense(q.shape[2], k.shape[2], block_m=64, block_n=64)
        description = description.to(q.device)
        if not block_sparse.can_run(q, description)[0]:
            description = None
    else:
        description = None
    if description is None:
        return partial_attention(q, k, v, valid)
    out, lse = block_sparse.block_sparse_attention(q, k, v, description, kv_len=counts, return_lse=True)
    return out.float(), lse


def _global_rows(q, k, v, plan: RingPlan, group, kv_len) -> torch.Tensor:
    """Every rank's global queries over this rank's keys, sent back to their owners and merged by
    their log-sum-exp (``kernels.partial``): [B, h, n_me, D] fp32 for this rank's global rows."""
    import torch.distributed._functional_collectives as funcol

    from diffattn.kernels.partial import merge_parts

    world, n_me = len(plan.glob_counts), int(plan.glob.numel())
    b, _, h, d = q.shape
    mine_q = q.index_select(1, plan.glob).transpose(0, 1).contiguous()  # [n_me, B, h, D] tokens first
    all_q = funcol.all_to_all_single_autograd(mine_q.repeat(world, 1, 1, 1), list(plan.glob_counts), [n_me] * world, group)
    all_q = funcol.wait_tensor(all_q) if isinstance(all_q, funcol.AsyncCollectiveTensor) else all_q  # [NG, B, h, D]
    valid = None if kv_len is None else plan.mine[None, :] < kv_len.to(plan.mine.device)[:, None]  # [B, S_mine]
    out, lse = part_attention(all_q.permute(1, 2, 0, 3), k.transpose(1, 2), v.transpose(1, 2), valid, plan.glob_rows)  # [B, h, NG, D], [B, h, NG]
    packed = torch.cat([out, lse[..., None]], dim=-1).permute(2, 0, 1, 3).contiguous()  # [NG, B, h, D + 1]
    parts = funcol.all_to_all_single_autograd(packed, [n_me] * world, list(plan.glob_counts), group)
    parts = funcol.wait_tensor(parts) if isinstance(parts, funcol.AsyncCollectiveTensor) else parts  # [W * n_me, B, h, D + 1]
    parts = parts.reshape(world, n_me, b, h, d + 1).permute(0, 2, 3, 1, 4)  # [W, B, h, n_me, D + 1]
    return merge_parts(parts[..., :d], parts[..., d])


def traffic(sparsity: BlockSparsity, layout: TokenLayout, world: int, *, heads: int, head_dim: int,
            bytes_per: int = 2) -> dict:
    """Key/value bytes one attention call moves per rank under a ring of ``world`` ranks: the
    sparse ring (only the tokens the rank's query blocks list) vs an all-gather ring (every chunk),
    for the mean and the busiest rank."""
    members = [positions(layout, world, r, "cpu") for r in range(world)]
    per_token = 2 * heads * head_dim * bytes_per  # K and V
    moved = []
    for me in range(world):
        plan = ring_plan(sparsity, layout, members, me)
        n_me, total = int(plan.glob.numel()), sum(plan.glob_counts)
        # global rows: the others' queries in (bytes_per each), this rank's partial outputs and lse back (fp32)
        glob = (total - n_me) * heads * head_dim * bytes_per + (world - 1) * n_me * heads * (head_dim + 1) * 4
        moved.append(plan.tokens_moved * per_token + glob)
    dense = (layout.seq_len - layout.seq_len // world) * per_token
    return {
        "world": world, "dense_bytes": dense, "sparse_bytes_mean": sum(moved) / world,
        "sparse_bytes_max": max(moved), "saved": 1 - sum(moved) / (world * dense),
    }


def dense_rows(layout: TokenLayout, block: int = 128) -> BlockSparsity:
    """Every block listed: dense attention run through the ring (HunyuanVideo's padded text)."""
    return dense(layout.seq_len, block_m=block)
