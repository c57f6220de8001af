"""Block-sparse flash attention in Triton: forward and backward, driven by a ``BlockSparsity``.

Layout: q, k, v ``[B, H, S, D]`` (any strides), bf16 / fp16 (fp32 under ``TRITON_INTERPRET=1``
and for tests). Any S: the sequence tail is masked in-kernel, never truncated. Head dims that are
not a power of two (40, 80, 96) are padded inside the kernel with masked loads.

For every query block the kernel walks the listed key blocks: **full** blocks without any element
mask, **partial** blocks (the sequence tail) with one. Keys at positions >= ``kv_len[b]`` (padded
text) are skipped block-wise and masked element-wise. The forward returns the output and the
natural-log log-sum-exp per query, so partial results merge exactly (``kernels.merge``).

The backward is FlashAttention-2's: a pre-pass computes delta = rowsum(dO * O); one kernel walks,
for every key block, the query blocks that list it (the transposed lists) and accumulates dK, dV;
another walks each query block's key list and accumulates dQ. No atomics: deterministic. With
``backward="fused"`` the first kernel also adds each pair's dQ share atomically into an fp32 buffer
and the second is skipped (fewer matmuls, but slower on the H200 with triton 3.6: kernels/NOTES.md).

``precision="int8" | "fp8" | "int8-qk"``: the forward on 8-bit operands (``kernels.triton.quant``),
same kernel, QUANT constexpr.

Order follows the Triton fused-attention tutorial: helpers, inner loops, configs, kernels,
autograd wrapper (a ``torch.library.custom_op`` with fake implementations, so torch.compile traces
it), public function.
"""

from __future__ import annotations

import math
import os

import torch

from diffattn.patterns.blocks import BlockSparsity

try:  # triton is a Linux dependency; elsewhere the backend reports it cannot run
    import triton
    import triton.language as tl

    HAS_TRITON = True
    from diffattn.kernels.triton.bits import ElementBits, element_bits  # element rules as per-block bits
    from diffattn.kernels.triton.rules import _predicate  # the element-rule switch (one file per rule set)
    from diffattn.kernels.triton import tuning  # tuned configs kept on disk per GPU
    from diffattn.kernels.triton.quant import PRECISIONS, quantize, to_fp8  # 8-bit operands of the forward

    try:  # host-side TMA descriptors (Hopper and newer)
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - older triton
        TensorDescriptor = None
    # bulk reduce-add through a descriptor (the fused backward's dQ), where this triton has it
    _TMA_REDUCE = hasattr(getattr(tl.core, "tensor_descriptor", None), "atomic_add")
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels work in base 2
LN2 = 0.6931471805599453
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # registers: q, acc and a K tile of 256 fp32 columns is the practical limit


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_tma(*tensors: torch.Tensor) -> bool:
    """TMA loads need Hopper+, host descriptors, unit last stride and 16-byte aligned strides."""
    if TensorDescriptor is None or _interpreting() or not tensors[0].is_cuda:
        return False
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def can_run(q: torch.Tensor, sparsity: BlockSparsity, forced: bool = False, precision: str | None = None) -> tuple[bool, str]:
    """Whether this backend can run ``q`` with ``sparsity`` (at ``precision``), and why not."""
    if not HAS_TRITON:
        return False, "triton is not installed (pip install triton, Linux only)"
    if precision is not None:
        if precision not in PRECISIONS:
            return False, f"precision must be None or one of {PRECISIONS}, got {precision!r}"
        if sparsity.block_n < 32:
            return False, (f"precision={precision!r} needs key blocks of at least 32 (the 8-bit kernel's key tiles), got "
                           f"block_n={sparsity.block_n}: use block_n >= 32 or precision=None")
        if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
            name = torch.cuda.get_device_name(q.device)
            return False, (f"precision={precision!r} needs compute capability >= 8.9 (fp8 tensor cores; int8-qk, which needs none, "
                           f"is measured on those GPUs only; {name} has less): use precision=None")
    if not q.is_cuda and not (_interpreting() and forced):
        return False, "tensors are on the CPU (the Triton backend needs CUDA; under TRITON_INTERPRET=1 it runs on CPU when forced with backend='triton')"
    if q.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} is not supported (fp16, bf16; fp32 for tests)"
    if q.dtype == torch.float32 and q.is_cuda and not forced:
        return False, "fp32 runs through tf32 tensor cores in Triton; use bf16/fp16, or the flex/sdpa backend for fp32"
    if q.shape[-1] > MAX_HEAD_DIM:
        return False, f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if sparsity.block_m < 16 or sparsity.block_n < 16 or sparsity.block_m & (sparsity.block_m - 1) or sparsity.block_n & (sparsity.block_n - 1):
        return False, f"blocks must be powers of two >= 16, got {sparsity.block_m}x{sparsity.block_n}"
    return True, ""


if HAS_TRITON:

    # -- helpers -------------------------------------------------------------------------------

    @triton.jit
    def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
        if MASK_ROWS and MASK_COLS:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        elif MASK_ROWS:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        elif MASK_COLS:
            return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            return tl.load(ptrs)

    # The element rule's score select as one PTX block (and to a predicate, select: two SASS
    # instructions per score). Written in Triton, LLVM's SLP vectorizer packs the tests into <32 x i1>
    # vectors whose lowering extracts every bit with a shift and an and: about 1.8x the loop's
    # instructions (kernels/NOTES.md, 2026-12-03 third round). The interpreter runs the Triton form.
    _ASM_SELECT = tl.constexpr(not _interpreting() and torch.version.hip is None)  # PTX: NVIDIA only

    @triton.jit
    def _word_bound(n_ok, lead, i):
        """The bits of word ``i`` of a tile whose first ``n_ok`` keys are inside the key bound; the
        tile's first key is bit ``lead`` of word 0 (scalars; a prefix of ones)."""
        keep = tl.minimum(tl.maximum(n_ok + lead - 32 * i, 0), 32).to(tl.int64)
        return ((tl.full([], 1, tl.int64) << keep) - 1).to(tl.int32)  # 32 -> all ones

    @triton.jit
    def _bits_where(x, words_ptr, rows, col0, n_ok, other: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
                    TRANS: tl.constexpr, BOUND: tl.constexpr):
        """``x`` where the element rule's bits (``kernels.triton.bits``) allow the score, else ``other``.

        ``words_ptr``: the [SPARSE_M, W] int32 words of one (query block, key block) pair (rows past
        the sequence have none); ``rows``: the tile's rows in it; ``col0``: the tile's first key
        column in it. With BOUND only the tile's first ``n_ok`` keys count (the per-batch key
        length): applied to each row's words, so the bound costs nothing per score. ``x`` is
        [rows, BLOCK_N], or [BLOCK_N, rows] with TRANS (the dK/dV pass)."""
        cols = tl.arange(0, BLOCK_N)
        if BLOCK_N <= 32:  # one word per row; a tile of 16 may start mid-word
            bit = tl.full([BLOCK_N], 1, tl.int32) << ((col0 + cols) % 32)
            word = tl.load(words_ptr + rows * W + col0 // 32)  # [rows]
            if BOUND:
                word = word & _word_bound(n_ok, col0 % 32, 0)
            if TRANS:
                sel = tl.broadcast_to(word[None, :], x.shape)
            else:
                sel = tl.broadcast_to(word[:, None], x.shape)
        else:  # BLOCK_N // 32 words per row, chosen per column: the choice folds at compile time
            bit = tl.full([BLOCK_N], 1, tl.int32) << (cols % 32)  # col0 is a multiple of BLOCK_N
            which = cols // 32
            base = words_ptr + rows * W + col0 // 32
            word = tl.load(base)
            if BOUND:
                word = word & _word_bound(n_ok, 0, 0)
            if TRANS:
                sel = tl.broadcast_to(word[None, :], x.shape)
            else:
                sel = tl.broadcast_to(word[:, None], x.shape)
            for i in tl.static_range(1, BLOCK_N // 32):
                word = tl.load(base + i)
                if BOUND:
                    word = word & _word_bound(n_ok, 0, i)
                if TRANS:
                    sel = tl.where(which[:, None] == i, word[None, :], sel)
                else:
                    sel = tl.where(which[None, :] == i, word[:, None], sel)
        if TRANS:
            bits = tl.broadcast_to(bit[:, None], x.shape)
        else:
            bits = tl.broadcast_to(bit[None, :], x.shape)
        if _ASM_SELECT:
            if other == 0.0:
                return tl.inline_asm_elementwise(
                    "{ .reg .pred p; .reg .b32 t; and.b32 t, $2, $3; setp.ne.b32 p, t, 0; selp.f32 $0, $1, 0f00000000, p; }",
                    "=f,f,r,r", [x, sel, bits], dtype=tl.float32, is_pure=True, pack=1)
            else:
                tl.static_assert(other == float("-inf"), "other: 0 or -inf")
                return tl.inline_asm_elementwise(
                    "{ .reg .pred p; .reg .b32 t; and.b32 t, $2, $3; setp.ne.b32 p, t, 0; selp.f32 $0, $1, 0fFF800000, p; }",
                    "=f,f,r,r", [x, sel, bits], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.where((sel & bits) != 0, x, other)

    # -- forward inner loop ----------------------------------------------------------------------

    @triton.jit
    def _load_rows(desc, base, b, h, start, rows, offs_d, stride_r, stride_d, n_rows, head_dim,
                   BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr,
                   USE_TMA: tl.constexpr):
        """A [BLOCK, HEAD_DIM] tile of rows starting at rows[0]: TMA (out-of-bounds rows and
        columns read as 0) or masked pointer loads."""
        if USE_TMA:
            return desc.load([b, h, start, 0]).reshape([BLOCK, HEAD_DIM])
        else:
            return _load_tile(base, rows, offs_d, stride_r, stride_d, n_rows, head_dim, MASK_ROWS, PAD_D)

    @triton.jit
    def _load_vt(desc, base, b, h, start, rows, offs_d, stride_r, stride_d, n_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
        """A [BLOCK, HEAD_DIM] tile of the transposed 8-bit V ([Dp, Sk'] per head, keys contiguous)."""
        if USE_TMA:
            return tl.trans(desc.load([b, h, 0, start]).reshape([HEAD_DIM, BLOCK]))
        else:
            return _load_tile(base, rows, offs_d, stride_r, stride_d, n_rows, HEAD_DIM, MASK_ROWS, False)

    @triton.jit
    def _fwd_update(acc, l_i, m_i, qk, v, tile_scale, MASKED: tl.constexpr, RULE: tl.constexpr, QUANT: tl.constexpr,
                    PREROUND: tl.constexpr, LAZY: tl.constexpr):
        """One key tile's online-softmax step: the running max, P = exp2(scores - max), l and
        acc += P.V. ``qk`` [BLOCK_M, BLOCK_N] fp32 scores, masked ones already -inf."""
        PV8: tl.constexpr = (QUANT == 1) | (QUANT == 2)
        if LAZY & (not MASKED) & (RULE == 0) & (QUANT == 0):
            # FlashAttention-4's lazy rescale on full blocks: keep a stale max until some row's
            # grows by more than 2^8 (p <= 256, exact after the final division), so most tiles
            # skip the accumulator's rescale (one multiply per output element) for one CTA-wide max
            m_new = tl.maximum(m_i, tl.max(qk, 1) * tile_scale)
            if tl.max(m_new - m_i, 0) > 8.0:
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.math.exp2(qk * tile_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * tile_scale)  # running max of base-2 logits
            if MASKED | (RULE != 0):  # a fully masked row keeps m = -inf: subtract 0 instead (exp2(-inf) = 0)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_safe = m_new
            alpha = tl.math.exp2(m_i - m_safe)
            if PV8:  # p x 448 (e4m3's range) by a shifted max: l carries the same factor, which cancels
                m_safe = m_safe - 8.807354922057604  # log2(448)
            p = tl.math.exp2(qk * tile_scale - m_safe[:, None])  # one FMA per score, then exp2
            l_i = l_i * alpha + tl.sum(p, 1)
            if PV8:  # p in [0, 448]; the running sum goes through the MMA's accumulator (kernels/NOTES.md:
                # adding each tile's P.V in fp32 outside it changed the error by 0.5 % and cost 27 %)
                acc = tl.dot(to_fp8(p, PREROUND), v, acc * alpha[:, None])
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # rescale, then accumulate in the MMA
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _load_kv(k_base, v_base, k_desc, v_desc, b, h, start, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                 kv_end, head_dim, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr,
                 PAD_D: tl.constexpr, USE_TMA: tl.constexpr, QUANT: tl.constexpr):
        """The K and V tiles of keys start.. start + BLOCK_N (the 8-bit P.V's V from its transposed copy)."""
        k = _load_rows(k_desc, k_base, b, h, start, offs_n, offs_d, stride_kn, stride_kd, kv_end, head_dim, BLOCK_N, HEAD_DIM, MASK_ROWS, PAD_D, USE_TMA)
        if (QUANT == 1) | (QUANT == 2):
            v = _load_vt(v_desc, v_base, b, h, start, offs_n, offs_d, stride_vn, stride_vd, kv_end, BLOCK_N, HEAD_DIM, MASK_ROWS, USE_TMA)
        else:
            v = _load_rows(v_desc, v_base, b, h, start, offs_n, offs_d, stride_vn, stride_vd, kv_end, head_dim, BLOCK_N, HEAD_DIM, MASK_ROWS, PAD_D, USE_TMA)
        return k, v

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, idx_ptr, count, kv_end,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits_base,
        BLOCK_N: tl.constexpr, SPARSE_N: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
        HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, PREDICATE: tl.constexpr, RULE: tl.constexpr, W: tl.constexpr,
        SPARSE_M: tl.constexpr, ks_row, QUANT: tl.constexpr, PREROUND: tl.constexpr, LAZY: tl.constexpr,
    ):
        # QUANT (kernels.triton.quant, _quant_code): q, k are int8 / fp8 with k's scale per sparse
        # key block at ks_row[kb] (q's is folded into qk_scale). With an 8-bit P.V (PV8) v is fp8,
        # transposed ([Dp, Sk'] per head), and p and l carry a factor 448 (p fills e4m3's range)
        tl.static_assert(SPARSE_N % BLOCK_N == 0, "the kernel tile must divide the sparse block")
        SUB: tl.constexpr = SPARSE_N // BLOCK_N
        MASK_ROWS: tl.constexpr = MASKED | (RULE == 2)
        for t in range(0, count * SUB):
            kb = tl.load(idx_ptr + t // SUB)
            start = kb * SPARSE_N + (t % SUB) * BLOCK_N
            offs_n = start + tl.arange(0, BLOCK_N)
            k, v = _load_kv(k_base, v_base, k_desc, v_desc, b, h, start, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, kv_end, head_dim, BLOCK_N, HEAD_DIM, MASK_ROWS, PAD_D, USE_TMA, QUANT)
            qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] raw scores (int32 from int8)
            if QUANT:  # k's block scale joins the per-tile scale: no extra multiply per score
                qk = qk.to(tl.float32)
                tile_scale = qk_scale * tl.load(ks_row + kb)
            else:
                tile_scale = qk_scale
            # MASKED: the key bound (kv_end); RULE: the element rule (1 per score, 2 from its bits,
            # which also hold the static sequence tail, so partial blocks may skip the bound)
            if RULE == 2:  # the rule's bits for this block pair ([SPARSE_M rows, W words]), bounded per word
                qk = _bits_where(qk, bits_base + (t // SUB) * (SPARSE_M * W), tl.arange(0, SPARSE_M), (t % SUB) * BLOCK_N, kv_end - start, float("-inf"), BLOCK_N, W, False, MASKED)
            elif MASKED:
                valid = offs_n[None, :] < kv_end
                if RULE == 1:
                    valid = valid & _predicate(offs_m[:, None], offs_n[None, :], pred_ptr, PREDICATE)
                qk = tl.where(valid, qk, float("-inf"))
            acc, l_i, m_i = _fwd_update(acc, l_i, m_i, qk, v, tile_scale, MASKED, RULE, QUANT, PREROUND, LAZY)
        return acc, l_i, m_i

    # -- configs -----------------------------------------------------------------------------

    def _set_block_shapes(nargs):
        # host TMA descriptors take their block shape from the config being launched
        head = nargs["HEAD_DIM"]
        for name, rows in (("K_desc", "BLOCK_N"), ("V_desc", "BLOCK_N"), ("Q_desc", "BLOCK_M"), ("dO_desc", "BLOCK_M"), ("DQ_desc", "BLOCK_M")):
            desc = nargs.get(name)
            if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
                if name == "V_desc" and nargs.get("QUANT", 0) in (1, 2):  # the 8-bit V is transposed: [Dp, Sk'] per head
                    desc.block_shape = [1, 1, head, nargs[rows]]
                else:
                    desc.block_shape = [1, 1, nargs[rows], head]

    def _fwd_configs():
        if _interpreting():
            # the interpreter pays per loop iteration: the pruner keeps the largest tile that fits
            # (it only runs with more than one config, so there is always a ladder)
            return [triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=1) for bn in (128, 64, 32, 16)]
        # (BLOCK_N, warps, stages): measured candidates on H100/H200 for head dims 64-128
        shapes = ((128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 8, 3), (32, 4, 2)) + _QUANT_ONLY
        configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st, pre_hook=_set_block_shapes) for bn, w, st in shapes]
        # capped at 128 registers a thread (kernels/NOTES.md): with 2 stages (about 98 KB of shared
        # memory) two CTAs fit an SM, so one CTA's softmax can run under the other's MMAs without warp
        # specialization (the bf16 winner); 3 stages (about 130 KB) fit one, within 2-9 % of the
        # winner for the 3-D window and int8 (RESULTS.md, 2026-12-04)
        return configs + [triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=st, maxnreg=128, pre_hook=_set_block_shapes) for st in (2, 3)]

    # candidates of the 8-bit forward only (QUANT): one warpgroup per 128 query rows won there
    # (64, 4, 3) among the bf16 candidates; these try it deeper and wider
    _QUANT_ONLY = ((128, 4, 3), (64, 4, 4), (128, 4, 4))

    def _prune_fwd(configs, named_args, **kwargs):
        sparse_n = kwargs.get("SPARSE_N", named_args.get("SPARSE_N"))
        head = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        quant = kwargs.get("QUANT", named_args.get("QUANT", 0))
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= sparse_n and not (head > 128 and c.kwargs["BLOCK_N"] > 64)
                and (quant or (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) not in _QUANT_ONLY)
                and not (quant and c.kwargs["BLOCK_N"] < 32)  # the 8-bit P.V sums over >= 32 keys
                and not (c.maxnreg and head > 128)]  # 128 registers cannot hold a wider accumulator
        if _interpreting():
            kept = [max(kept, key=lambda c: c.kwargs["BLOCK_N"])]
        return kept

    # -- forward kernel --------------------------------------------------------------------------

    @triton.autotune(
        configs=_fwd_configs(), key=["size_class", "HEAD_DIM", "SPARSE_M", "SPARSE_N", "HAS_KV_LEN", "PAD_D", "USE_TMA", "PREDICATE", "RULE", "QUANT", "LAZY"],
        prune_configs_by={"early_config_prune": _prune_fwd},
    )
    @triton.jit
    def _fwd_kernel(
        Q, K, V, K_desc, V_desc, Out, Lse,
        full_num, full_idx, part_num, part_idx, kv_len_ptr, pred_ptr, bits, QS, KS, VS,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        num_heads, q_len, kv_len, head_dim, qk_scale,
        list_head_stride, num_q_blocks, full_width, part_width, num_k_blocks, size_class,
        HEAD_DIM: tl.constexpr, SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
        HAS_KV_LEN: tl.constexpr, PAD_D: tl.constexpr, USE_TMA: tl.constexpr, PREDICATE: tl.constexpr,
        RULE: tl.constexpr, W: tl.constexpr, PART_BOUND: tl.constexpr, QUANT: tl.constexpr, PREROUND: tl.constexpr,
        LAZY: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        offs_m = qb * SPARSE_M + tl.arange(0, SPARSE_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim), other=0.0)

        kv_end = kv_len
        if HAS_KV_LEN:
            kv_end = tl.minimum(tl.load(kv_len_ptr + b), kv_len)
        ks_row = KS + bh.to(tl.int64) * num_k_blocks  # 8-bit k's block scales (unused otherwise)
        if QUANT:
            qk_scale = qk_scale * tl.load(QS + bh.to(tl.int64) * num_q_blocks + qb)
        row = h.to(tl.int64) * list_head_stride + qb
        n_full = tl.load(full_num + row)
        n_part = tl.load(part_num + row)

        m_i = tl.full([SPARSE_M], float("-inf"), tl.float32)
        l_i = tl.zeros([SPARSE_M], tl.float32)
        acc = tl.zeros([SPARSE_M, HEAD_DIM], tl.float32)
        full_list = full_idx + row * full_width
        if HAS_KV_LEN:
            # full blocks wholly inside the valid keys run unmasked; later ones (sorted) masked
            n_clean = 0
            for i in range(0, n_full):
                kb = tl.load(full_list + i)
                n_clean += ((kb + 1) * SPARSE_N <= kv_end).to(tl.int32)
            if PAD_D:
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, b, h, full_list, n_clean, kv_end, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits, BLOCK_N, SPARSE_N, False, True, HEAD_DIM, USE_TMA, PREDICATE, 0, W, SPARSE_M, ks_row, QUANT, PREROUND, LAZY)
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, b, h, full_list + n_clean, n_full - n_clean, kv_end, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits, BLOCK_N, SPARSE_N, True, True, HEAD_DIM, USE_TMA, PREDICATE, 0, W, SPARSE_M, ks_row, QUANT, PREROUND, LAZY)
            else:
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, b, h, full_list, n_clean, kv_end, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits, BLOCK_N, SPARSE_N, False, False, HEAD_DIM, USE_TMA, PREDICATE, 0, W, SPARSE_M, ks_row, QUANT, PREROUND, LAZY)
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, b, h, full_list + n_clean, n_full - n_clean, kv_end, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits, BLOCK_N, SPARSE_N, True, False, HEAD_DIM, USE_TMA, PREDICATE, 0, W, SPARSE_M, ks_row, QUANT, PREROUND, LAZY)
        else:
            if PAD_D:
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, b, h, full_list, n_full, kv_end, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits, BLOCK_N, SPARSE_N, False, True, HEAD_DIM, USE_TMA, PREDICATE, 0, W, SPARSE_M, ks_row, QUANT, PREROUND, LAZY)
            else:
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, b, h, full_list, n_full, kv_end, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits, BLOCK_N, SPARSE_N, False, False, HEAD_DIM, USE_TMA, PREDICATE, 0, W, SPARSE_M, ks_row, QUANT, PREROUND, LAZY)
        part_list = part_idx + row * part_width
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, b, h, part_list, n_part, kv_end, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, head_dim, qk_scale, offs_m, pred_ptr, bits + row * part_width * (SPARSE_M * W), BLOCK_N, SPARSE_N, PART_BOUND, True, HEAD_DIM, USE_TMA, PREDICATE, RULE, W, SPARSE_M, ks_row, QUANT, PREROUND, LAZY)

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        if (QUANT == 1) | (QUANT == 2):  # the 8-bit P.V: v's channel scales (p's 448 cancelled against l's)
            out = out * tl.load(VS + bh.to(tl.int64) * HEAD_DIM + offs_d)[None, :]
            l_safe = l_safe * (1.0 / 448.0)  # l summed p x 448
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim))
        tl.store(Lse + bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)

    # -- backward ------------------------------------------------------------------------------

    @triton.jit
    def _bwd_delta(Out, dOut, Delta, stride_ob, stride_oh, stride_om, stride_od,
                   stride_db, stride_dh, stride_dm, stride_dd, num_heads, q_len, head_dim, stat_len,
                   BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        offs_m = pid * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim)
        o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
        do = tl.load(dOut + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + bh.to(tl.int64) * stat_len + offs_m, delta, mask=offs_m < q_len)

    @triton.jit
    def _dkdv_inner(
        dk, dv, k, v, q_base, do_base, q_desc, do_desc, b, h, lse_base, delta_base, idx_ptr, count,
        offs_n, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, q_len, kv_end, head_dim, qk_scale,
        pred_ptr, slot_ptr, bits_head, bits_width, key_col0, key_ok,
        BLOCK_M: tl.constexpr, SPARSE_M: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAD_D: tl.constexpr, USE_TMA: tl.constexpr, PREDICATE: tl.constexpr, RULE: tl.constexpr, W: tl.constexpr,
        BLOCK_N: tl.constexpr, dq_base, dq_desc, FUSED: tl.constexpr, TMA_REDUCE: tl.constexpr,
    ):
        # FUSED: also add this key tile's share of dQ (dS K) into the fp32 dQ buffer, atomically
        # (5 matmuls per block pair instead of the split passes' 7; not deterministic)
        tl.static_assert(SPARSE_M % BLOCK_M == 0, "the kernel tile must divide the sparse block")
        SUB: tl.constexpr = SPARSE_M // BLOCK_M
        for t in range(0, count * SUB):
            qb = tl.load(idx_ptr + t // SUB)
            start = qb * SPARSE_M + (t % SUB) * BLOCK_M
            offs_m = start + tl.arange(0, BLOCK_M)
            q = _load_rows(q_desc, q_base, b, h, start, offs_m, offs_d, stride_qm, stride_qd, q_len, head_dim, BLOCK_M, HEAD_DIM, True, PAD_D, USE_TMA)
            do = _load_rows(do_desc, do_base, b, h, start, offs_m, offs_d, stride_dom, stride_dod, q_len, head_dim, BLOCK_M, HEAD_DIM, True, PAD_D, USE_TMA)
            lse = tl.load(lse_base + offs_m)  # base 2, +inf on rows with no key and past q_len: p = 0
            delta = tl.load(delta_base + offs_m)  # 0 past q_len
            qkT = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M] base-2
            pT = tl.math.exp2(qkT - lse[None, :])
            if RULE == 2:  # bits of (query block qb, this key block) at its slot in qb's list; rows past
                # q_len have no bits (the packer), the key bound goes per word
                slot = tl.load(slot_ptr + t // SUB)
                words = bits_head + (qb.to(tl.int64) * bits_width + slot) * (SPARSE_M * W)
                pT = _bits_where(pT, words, (t % SUB) * BLOCK_M + tl.arange(0, BLOCK_M), key_col0, key_ok, 0.0, BLOCK_N, W, True, MASKED)
            elif MASKED:
                valid = offs_n[:, None] < kv_end
                if RULE == 1:
                    valid = valid & _predicate(offs_m[None, :], offs_n[:, None], pred_ptr, PREDICATE)
                pT = tl.where(valid, pT, 0.0)
            elif RULE == 1:
                pT = tl.where(_predicate(offs_m[None, :], offs_n[:, None], pred_ptr, PREDICATE), pT, 0.0)
            # query rows past q_len need no select: their lse is +inf (p = 0) and their dO and
            # delta load as 0, so they add nothing to dK or dV
            dv += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q)
            if FUSED:
                dq = tl.dot(tl.trans(dsT.to(k.dtype)), k)  # [BLOCK_M, HEAD_DIM] fp32, unscaled
                if TMA_REDUCE:  # one bulk reduce-add per tile; rows past q_len fall outside the descriptor
                    dq_desc.atomic_add([b, h, start, 0], dq.reshape([1, 1, BLOCK_M, HEAD_DIM]))
                else:
                    ptrs = dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
                    tl.atomic_add(ptrs, dq, mask=offs_m[:, None] < q_len, sem="relaxed")
        return dk, dv

    def _bwd_configs(kind: str):
        if _interpreting():
            return [triton.Config({"BLOCK_M": b, "BLOCK_N": b}, num_warps=4, num_stages=1) for b in (128, 64, 32, 16)]
        if kind == "dkdv":  # a tall key tile (BLOCK_N) accumulates dK, dV over short query tiles
            shapes = ((64, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3))
        else:  # dq: a tall query tile accumulates dQ over short key tiles
            shapes = ((128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3))
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st, pre_hook=_set_block_shapes)
            for bm, bn, w, st in shapes
        ]

    def _prune_bwd(configs, named_args, **kwargs):
        sm = kwargs.get("SPARSE_M", named_args.get("SPARSE_M"))
        sn = kwargs.get("SPARSE_N", named_args.get("SPARSE_N"))
        head = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        rule = kwargs.get("RULE", named_args.get("RULE", 0))
        kept = [
            c for c in configs
            if c.kwargs["BLOCK_M"] <= sm and c.kwargs["BLOCK_N"] <= sn
            and not (head > 128 and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] > 64 * 64)
            # element bits in the dK/dV pass's transposed tiles of 128 keys: words 2 and 3 came out
            # wrong on the H200 with triton 3.6 (tests/test_kernels.py test_bits_where_matches_torch_gpu,
            # RESULTS.md 2026-12-03), while 64-key tiles are right; such descriptions use 64-key tiles
            # (on the GPU only the dK/dV configs have 128-key tiles; the interpreter's shared ladder is cut too)
            and not (rule == 2 and c.kwargs["BLOCK_N"] > 64)
        ]
        if _interpreting():
            kept = [max(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept or [triton.Config({"BLOCK_M": min(sm, 32), "BLOCK_N": min(sn, 32)}, num_warps=4, num_stages=2, pre_hook=_set_block_shapes)]

    @triton.autotune(
        configs=_bwd_configs("dkdv"), key=["size_class", "HEAD_DIM", "SPARSE_M", "SPARSE_N", "HAS_KV_LEN", "PAD_D", "USE_TMA", "PREDICATE", "RULE", "FUSED"],
        prune_configs_by={"early_config_prune": _prune_bwd},
        reset_to_zero=["DQ"],  # FUSED adds into DQ: every benchmarked candidate must start from 0
    )
    @triton.jit
    def _dkdv_kernel(
        Q, K, V, dO, Q_desc, dO_desc, Lse, Delta, dK, dV, DQ, DQ_desc,
        q_full_num, q_full_idx, q_part_num, q_part_idx, kv_len_ptr, pred_ptr, bits, q_part_slot,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        num_heads, q_len, kv_len, head_dim, qk_scale, sm_scale, stat_len,
        list_head_stride, full_width, part_width, bits_head_stride, bits_width, size_class,
        HEAD_DIM: tl.constexpr, SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
        HAS_KV_LEN: tl.constexpr, PAD_D: tl.constexpr, USE_TMA: tl.constexpr, PREDICATE: tl.constexpr,
        RULE: tl.constexpr, W: tl.constexpr, PART_BOUND: tl.constexpr, FUSED: tl.constexpr, TMA_REDUCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        tile = tl.program_id(0)  # key tile of BLOCK_N rows
        bh = tl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        kb = (tile * BLOCK_N) // SPARSE_N
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_end = kv_len
        if HAS_KV_LEN:
            kv_end = tl.minimum(tl.load(kv_len_ptr + b), kv_len)
        k_mask = (offs_n[:, None] < kv_end) & (offs_d[None, :] < head_dim)
        k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=k_mask, other=0.0)
        v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=k_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = Lse + bh.to(tl.int64) * stat_len  # row statistics padded to whole query blocks
        delta_base = Delta + bh.to(tl.int64) * stat_len
        dq_base = DQ + bh.to(tl.int64) * q_len * HEAD_DIM  # FUSED: the fp32 dQ buffer [B, H, Sq, HEAD_DIM]
        row = h.to(tl.int64) * list_head_stride + kb
        clean = (kb + 1) * SPARSE_N <= kv_end
        bits_head = bits + h.to(tl.int64) * bits_head_stride * bits_width * (SPARSE_M * W)  # forward lists' head
        key_col0 = tile * BLOCK_N - kb * SPARSE_N  # this key tile's first column in its sparse block
        key_ok = kv_end - tile * BLOCK_N  # keys of this tile inside the bound (from its first)
        if tile * BLOCK_N < kv_end:
            n_full = tl.load(q_full_num + row)
            n_part = tl.load(q_part_num + row)
            if clean:
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Q_desc, dO_desc, b, h, lse_base, delta_base, q_full_idx + row * full_width, n_full, offs_n, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, q_len, kv_end, head_dim, qk_scale, pred_ptr, q_part_slot, bits_head, bits_width, key_col0, key_ok, BLOCK_M, SPARSE_M, False, HEAD_DIM, PAD_D, USE_TMA, PREDICATE, 0, W, BLOCK_N, dq_base, DQ_desc, FUSED, TMA_REDUCE)
            else:
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Q_desc, dO_desc, b, h, lse_base, delta_base, q_full_idx + row * full_width, n_full, offs_n, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, q_len, kv_end, head_dim, qk_scale, pred_ptr, q_part_slot, bits_head, bits_width, key_col0, key_ok, BLOCK_M, SPARSE_M, True, HEAD_DIM, PAD_D, USE_TMA, PREDICATE, 0, W, BLOCK_N, dq_base, DQ_desc, FUSED, TMA_REDUCE)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Q_desc, dO_desc, b, h, lse_base, delta_base, q_part_idx + row * part_width, n_part, offs_n, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, q_len, kv_end, head_dim, qk_scale, pred_ptr, q_part_slot + row * part_width, bits_head, bits_width, key_col0, key_ok, BLOCK_M, SPARSE_M, PART_BOUND, HEAD_DIM, PAD_D, USE_TMA, PREDICATE, RULE, W, BLOCK_N, dq_base, DQ_desc, FUSED, TMA_REDUCE)
        dk = dk * sm_scale
        out_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < head_dim)
        dk_off = b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        tl.store(dK + dk_off, dk.to(dK.dtype.element_ty), mask=out_mask)
        tl.store(dV + dk_off, dv.to(dV.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, b, h, idx_ptr, count, offs_m, offs_d,
        stride_kn, stride_kd, stride_vn, stride_vd, q_len, kv_end, head_dim, qk_scale,
        pred_ptr, bits_base, row0, BLOCK_N: tl.constexpr, SPARSE_N: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAD_D: tl.constexpr, USE_TMA: tl.constexpr, PREDICATE: tl.constexpr, RULE: tl.constexpr, W: tl.constexpr,
        SPARSE_M: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        tl.static_assert(SPARSE_N % BLOCK_N == 0, "the kernel tile must divide the sparse block")
        SUB: tl.constexpr = SPARSE_N // BLOCK_N
        for t in range(0, count * SUB):
            kb = tl.load(idx_ptr + t // SUB)
            start = kb * SPARSE_N + (t % SUB) * BLOCK_N
            offs_n = start + tl.arange(0, BLOCK_N)
            k = _load_rows(k_desc, k_base, b, h, start, offs_n, offs_d, stride_kn, stride_kd, kv_end, head_dim, BLOCK_N, HEAD_DIM, MASKED | (RULE == 2), PAD_D, USE_TMA)
            v = _load_rows(v_desc, v_base, b, h, start, offs_n, offs_d, stride_vn, stride_vd, kv_end, head_dim, BLOCK_N, HEAD_DIM, MASKED | (RULE == 2), PAD_D, USE_TMA)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.math.exp2(qk - lse[:, None])
            if RULE == 2:  # bits of this pair; row0: the tile's first row in its sparse block
                p = _bits_where(p, bits_base + (t // SUB) * (SPARSE_M * W), row0 + tl.arange(0, BLOCK_M), (t % SUB) * BLOCK_N, kv_end - start, 0.0, BLOCK_N, W, False, MASKED)
            elif MASKED:
                valid = offs_n[None, :] < kv_end
                if RULE == 1:
                    valid = valid & _predicate(offs_m[:, None], offs_n[None, :], pred_ptr, PREDICATE)
                p = tl.where(valid, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.autotune(
        configs=_bwd_configs("dq"), key=["size_class", "HEAD_DIM", "SPARSE_M", "SPARSE_N", "HAS_KV_LEN", "PAD_D", "USE_TMA", "PREDICATE", "RULE"],
        prune_configs_by={"early_config_prune": _prune_bwd},
    )
    @triton.jit
    def _dq_kernel(
        Q, K, V, dO, K_desc, V_desc, Lse, Delta, dQ,
        full_num, full_idx, part_num, part_idx, kv_len_ptr, pred_ptr, bits,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        num_heads, q_len, kv_len, head_dim, qk_scale, sm_scale, stat_len,
        list_head_stride, full_width, part_width, size_class,
        HEAD_DIM: tl.constexpr, SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
        HAS_KV_LEN: tl.constexpr, PAD_D: tl.constexpr, USE_TMA: tl.constexpr, PREDICATE: tl.constexpr,
        RULE: tl.constexpr, W: tl.constexpr, PART_BOUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        tile = tl.program_id(0)  # query tile of BLOCK_M rows
        bh = tl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        qb = (tile * BLOCK_M) // SPARSE_M
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        qmask = (offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qmask, other=0.0)
        do = tl.load(dO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=qmask, other=0.0)
        # row statistics padded to whole query blocks: lse in base 2, +inf on rows that saw no key
        # (their gradient is 0: p = exp2(x - inf) = 0) and past q_len; delta 0 there
        lse = tl.load(Lse + bh.to(tl.int64) * stat_len + offs_m)
        delta = tl.load(Delta + bh.to(tl.int64) * stat_len + offs_m)
        kv_end = kv_len
        if HAS_KV_LEN:
            kv_end = tl.minimum(tl.load(kv_len_ptr + b), kv_len)
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        row = h.to(tl.int64) * list_head_stride + qb
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = tl.load(full_num + row)
        n_part = tl.load(part_num + row)
        if HAS_KV_LEN:
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, K_desc, V_desc, b, h, full_idx + row * full_width, n_full, offs_m, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, q_len, kv_end, head_dim, qk_scale, pred_ptr, bits + row * part_width * (SPARSE_M * W), tile * BLOCK_M - qb * SPARSE_M, BLOCK_N, SPARSE_N, True, HEAD_DIM, PAD_D, USE_TMA, PREDICATE, 0, W, SPARSE_M, BLOCK_M)
        else:
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, K_desc, V_desc, b, h, full_idx + row * full_width, n_full, offs_m, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, q_len, kv_end, head_dim, qk_scale, pred_ptr, bits + row * part_width * (SPARSE_M * W), tile * BLOCK_M - qb * SPARSE_M, BLOCK_N, SPARSE_N, False, HEAD_DIM, PAD_D, USE_TMA, PREDICATE, 0, W, SPARSE_M, BLOCK_M)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, K_desc, V_desc, b, h, part_idx + row * part_width, n_part, offs_m, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, q_len, kv_end, head_dim, qk_scale, pred_ptr, bits + row * part_width * (SPARSE_M * W), tile * BLOCK_M - qb * SPARSE_M, BLOCK_N, SPARSE_N, PART_BOUND, HEAD_DIM, PAD_D, USE_TMA, PREDICATE, RULE, W, SPARSE_M, BLOCK_M)
        dq = dq * sm_scale
        tl.store(dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(dQ.dtype.element_ty), mask=qmask)


# -- launchers -----------------------------------------------------------------------------------

def _head_dim_pow2(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _list_head_stride(num: torch.Tensor) -> int:
    # lists shared by all heads (Hm = 1) are read at head stride 0
    return 0 if num.shape[0] == 1 else num.shape[1]


def _check_inputs(q, k, v, num_heads_lists: int):
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"block_sparse_attention: expected q [B, H, Sq, D] and k, v [B, H, Sk, D], got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if num_heads_lists not in (1, q.shape[1]):
        raise ValueError(f"block_sparse_attention: block lists have {num_heads_lists} heads, expected 1 or {q.shape[1]}")


def _descriptors(use_tma: bool, head: int, *tensors):
    """Host TMA descriptors (block shapes are set per config by the pre-hook), or the tensors."""
    if not use_tma:
        return tensors
    return tuple(TensorDescriptor.from_tensor(t, [1, 1, 16, head]) for t in tensors)


# Lazy rescale of full blocks (FlashAttention-4): an experiment, timed against the default by
# ``benchmarks/attention.py --compare-lazy`` (kernels/NOTES.md)
_LAZY_RESCALE = False


def _size_class(programs: int, row_blocks: int) -> int:
    """The problem size in the kernels' autotune keys: log2 classes of the program count at the
    sparse block size (batch x heads x query or key blocks: config-independent, unlike the launch
    grid of a tile size) and of the widest row's block list (both known on the host, no sync).
    Tiles that win on a small call lose on a large one (kernels/NOTES.md: GPU tests at 3,000 tokens
    tuned 64-key tiles that cost 11 % in the forward and 45 % in the backward at Wan2.1-14B's
    75,600); without the class the first call of a process, and through the disk cache of a
    machine, fixed the config for every size."""
    return int(programs).bit_length() * 64 + int(row_blocks).bit_length()


def _rule_mode(predicate: int, bits, bound: bool) -> dict:
    """Kernel constants of the element rule: RULE 0 none, 1 the in-kernel predicate, 2 the bits
    (W words a row); PART_BOUND: partial blocks test keys against kv_end (only bits may skip it)."""
    rule, words = (0, 1) if predicate == 0 else ((2, bits.shape[-1]) if bits is not None else (1, 1))
    return {"RULE": rule, "W": words, "PART_BOUND": rule != 2 or bound}


def _quant_code(precision: str | None) -> int:
    """The forward's QUANT constant: 0 the inputs' dtype; 1 int8 and 2 fp8 Q.K^T with fp8 P.V; 3 int8
    Q.K^T with P.V in v's dtype."""
    return 0 if precision is None else {"int8": 1, "fp8": 2, "int8-qk": 3}[precision]


def _forward(q, k, v, full_num, full_idx, part_num, part_idx, kv_len, pred, predicate, bits, bound, scale, sparse_m, sparse_n, tma,
             precision=None):
    b, h, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    head = _head_dim_pow2(d)
    shift = None
    if precision is None:
        use_tma = tma and _use_tma(q, k, v)
        qs = ks = vs = full_num  # never read when QUANT is 0
        v_strides = v.stride()
    else:  # 8-bit operands, head dim padded with zeros in the tensors (kernels.triton.quant)
        head = max(head, 32)  # the 8-bit MMA sums over at least 32 elements
        q, k, v8, qs, ks, vs, shift = quantize(q, k, v, precision, sparse_m, sparse_n, head, kv_len)
        if v8 is None:  # "int8-qk": P.V in v's dtype
            vs = ks  # never read
            v_strides = v.stride()
        else:
            v = v8
            v_strides = (v.stride(0), v.stride(1), v.stride(3), v.stride(2))  # V is [B, H, Dp, Sk']: (b, h, key, dim)
        use_tma = tma and _use_tma(q, k, v)
    k_desc, v_desc = _descriptors(use_tma, head, k, v)
    kv_ptr = kv_len if kv_len is not None else full_num  # never read when HAS_KV_LEN is False
    grid = (-(-sq // sparse_m), b * h)
    tuning.launch(
        _fwd_kernel, grid, q.device, q, k, v, k_desc, v_desc, out, lse, full_num, full_idx, part_num, part_idx, kv_ptr,
        pred if pred is not None else full_num, bits if bits is not None else full_num, qs, ks, vs,
        *q.stride(), *k.stride(), *v_strides, *out.stride(),
        h, sq, sk, d, scale * LOG2E,
        _list_head_stride(full_num), full_num.shape[1], full_idx.shape[-1], part_idx.shape[-1], -(-sk // sparse_n),
        _size_class(grid[0] * grid[1], full_idx.shape[-1] + part_idx.shape[-1]),
        HEAD_DIM=head, SPARSE_M=sparse_m, SPARSE_N=sparse_n, HAS_KV_LEN=kv_len is not None,
        PAD_D=head != d, USE_TMA=use_tma, PREDICATE=predicate, **_rule_mode(predicate, bits, bound),
        QUANT=_quant_code(precision), PREROUND=_interpreting(), LAZY=_LAZY_RESCALE,
    )
    if shift is not None:  # the kernel's lse is of the smoothed scores: add back q . c (x softmax scale)
        lse = lse + shift * scale
    return out, lse


def _backward(do, q, k, v, out, lse, lists, kv_len, pred, predicate, bits, q_part_slot, bound, scale, sparse_m, sparse_n, tma,
              dlse=None, fused=False):
    (full_num, full_idx, part_num, part_idx, q_full_num, q_full_idx, q_part_num, q_part_idx) = lists
    b, h, sq, d = q.shape
    sk = k.shape[2]
    head = _head_dim_pow2(d)
    # row statistics padded to whole query blocks, so that the kernels load them unmasked: delta = 0
    # and lse = +inf (p = 0) past q_len, lse in base 2 with +inf on rows that saw no key
    stat_len = -(-sq // sparse_m) * sparse_m
    delta = torch.zeros(b, h, stat_len, device=q.device, dtype=torch.float32)
    _bwd_delta[(-(-sq // 64), b * h)](out, do, delta, *out.stride(), *do.stride(), h, sq, d, stat_len, BLOCK=64, HEAD_DIM=head)
    if dlse is not None:
        # a gradient on the lse (partial results merged by it): dS = P (dP - delta + dlse), i.e. delta - dlse
        delta[..., :sq] -= torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(lse, dtype=torch.float32))
    lse2 = torch.full((b, h, stat_len), float("inf"), device=q.device, dtype=torch.float32)
    lse2[..., :sq] = torch.where(lse == float("-inf"), float("inf"), lse.float() * LOG2E)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_ptr = kv_len if kv_len is not None else full_num
    has_kv = kv_len is not None
    use_tma = tma and _use_tma(q, k, v, do)
    q_desc, do_desc, k_desc, v_desc = _descriptors(use_tma, head, q, do, k, v)
    dq32 = dq32_desc = dq  # FUSED only: the fp32 buffer dQ is added into
    if fused:
        dq32 = torch.zeros(b, h, sq, head, device=q.device, dtype=torch.float32)
        dq32_desc = _descriptors(use_tma and _TMA_REDUCE, head, dq32)[0]
    pad_d = head != d
    pred_ptr = pred if pred is not None else full_num
    rule_mode = _rule_mode(predicate, bits, bound)
    bits_ptr = bits if bits is not None else full_num
    slot_ptr = q_part_slot if q_part_slot is not None else full_num
    tuning.launch(
        _dkdv_kernel, lambda meta: (-(-sk // meta["BLOCK_N"]), b * h), q.device,
        q, k, v, do, q_desc, do_desc, lse2, delta, dk, dv, dq32, dq32_desc, q_full_num, q_full_idx, q_part_num, q_part_idx,
        kv_ptr, pred_ptr, bits_ptr, slot_ptr,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        h, sq, sk, d, scale * LOG2E, scale, stat_len,
        _list_head_stride(q_full_num), q_full_idx.shape[-1], q_part_idx.shape[-1],
        _list_head_stride(full_num), part_idx.shape[-1],
        _size_class(-(-sk // sparse_n) * b * h, q_full_idx.shape[-1] + q_part_idx.shape[-1]),
        HEAD_DIM=head, SPARSE_M=sparse_m, SPARSE_N=sparse_n, HAS_KV_LEN=has_kv, PAD_D=pad_d, USE_TMA=use_tma, PREDICATE=predicate,
        **rule_mode, FUSED=fused, TMA_REDUCE=fused and use_tma and _TMA_REDUCE,
    )
    if fused:
        return (dq32[..., :d] * scale).to(q.dtype), dk, dv
    tuning.launch(
        _dq_kernel, lambda meta: (-(-sq // meta["BLOCK_M"]), b * h), q.device,
        q, k, v, do, k_desc, v_desc, lse2, delta, dq, full_num, full_idx, part_num, part_idx, kv_ptr, pred_ptr, bits_ptr,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        h, sq, sk, d, scale * LOG2E, scale, stat_len,
        _list_head_stride(full_num), full_idx.shape[-1], part_idx.shape[-1],
        _size_class(-(-sq // sparse_m) * b * h, full_idx.shape[-1] + part_idx.shape[-1]),
        HEAD_DIM=head, SPARSE_M=sparse_m, SPARSE_N=sparse_n, HAS_KV_LEN=has_kv, PAD_D=pad_d, USE_TMA=use_tma, PREDICATE=predicate,
        **rule_mode,
    )
    return dq, dk, dv


# -- custom op + autograd ------------------------------------------------------------------------

@torch.library.custom_op("diffattn::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_num: torch.Tensor, full_idx: torch.Tensor, part_num: torch.Tensor, part_idx: torch.Tensor,
    q_full_num: torch.Tensor, q_full_idx: torch.Tensor, q_part_num: torch.Tensor, q_part_idx: torch.Tensor,
    kv_len: torch.Tensor | None, pred: torch.Tensor | None, predicate: int,
    bits: torch.Tensor | None, q_part_slot: torch.Tensor | None, bound: bool,
    scale: float, sparse_m: int, sparse_n: int, tma: bool, fused_bwd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out [B, H, Sq, D], lse [B, H, Sq] fp32 natural log); ``fused_bwd``: which
    backward the autograd rule runs (``block_sparse_attention``'s ``backward``)."""
    return _forward(q, k, v, full_num, full_idx, part_num, part_idx, kv_len, pred, predicate, bits, bound, scale, sparse_m, sparse_n, tma)


@block_sparse_fwd.register_fake
def _(q, k, v, full_num, full_idx, part_num, part_idx, q_full_num, q_full_idx, q_part_num, q_part_idx, kv_len, pred, predicate,
      bits, q_part_slot, bound, scale, sparse_m, sparse_n, tma, fused_bwd=False):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("diffattn::block_sparse_fwd_8bit", mutates_args=())
def block_sparse_fwd_8bit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_num: torch.Tensor, full_idx: torch.Tensor, part_num: torch.Tensor, part_idx: torch.Tensor,
    kv_len: torch.Tensor | None, pred: torch.Tensor | None, predicate: int,
    bits: torch.Tensor | None, bound: bool, scale: float, sparse_m: int, sparse_n: int, tma: bool, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit forward (inference only, no autograd): (out [B, H, Sq, D], lse [B, H, Sq])."""
    return _forward(q, k, v, full_num, full_idx, part_num, part_idx, kv_len, pred, predicate, bits, bound, scale, sparse_m, sparse_n, tma,
                    precision)


@block_sparse_fwd_8bit.register_fake
def _(q, k, v, *rest):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("diffattn::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    full_num: torch.Tensor, full_idx: torch.Tensor, part_num: torch.Tensor, part_idx: torch.Tensor,
    q_full_num: torch.Tensor, q_full_idx: torch.Tensor, q_part_num: torch.Tensor, q_part_idx: torch.Tensor,
    kv_len: torch.Tensor | None, pred: torch.Tensor | None, predicate: int,
    bits: torch.Tensor | None, q_part_slot: torch.Tensor | None, bound: bool,
    scale: float, sparse_m: int, sparse_n: int, tma: bool, dlse: torch.Tensor | None = None, fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv); ``dlse``: the gradient of the returned lse, or None; ``fused``: one
    pass with dQ added atomically, else the split deterministic passes."""
    lists = (full_num, full_idx, part_num, part_idx, q_full_num, q_full_idx, q_part_num, q_part_idx)
    return _backward(do.contiguous(), q, k, v, out, lse, lists, kv_len, pred, predicate, bits, q_part_slot, bound, scale, sparse_m,
                     sparse_n, tma, dlse, fused)


@block_sparse_bwd.register_fake
def _(do, q, k, v, out, lse, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *lists, kv_len, pred, predicate, bits, q_part_slot, bound, scale, sparse_m, sparse_n, tma, fused = inputs
    out, lse = output
    ctx.fused = fused
    optional = (kv_len, pred, bits, q_part_slot)
    ctx.save_for_backward(q, k, v, out, lse, *lists, *(t for t in optional if t is not None))
    ctx.present = tuple(t is not None for t in optional)
    ctx.predicate, ctx.bound, ctx.scale, ctx.sparse_m, ctx.sparse_n, ctx.tma = predicate, bound, scale, sparse_m, sparse_n, tma


def _backward_rule(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    lists = saved[5:13]
    rest = iter(saved[13:])
    kv_len, pred, bits, q_part_slot = (next(rest) if present else None for present in ctx.present)
    # the lse's gradient (partial results merged by their lse and trained through) folds into delta
    dq, dk, dv = block_sparse_bwd(
        grad_out, q, k, v, out, lse, *lists, kv_len, pred, ctx.predicate, bits, q_part_slot, ctx.bound,
        ctx.scale, ctx.sparse_m, ctx.sparse_n, ctx.tma, grad_lse, ctx.fused,
    )
    return (dq, dk, dv) + (None,) * 19


block_sparse_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


# Partial blocks with bits apply the key bound to each row's words (a scalar mask per word), so it
# costs nothing per score: measured the same with and without it (RESULTS.md 2026-12-03, Wan2.1-14B
# 720p, without / with: 73.4 / 73.9 ms for the 3-D window, 68.4 / 67.7 ms for the temporal one). The default keeps it.

# The backward ``backward="auto"`` runs when determinism is not asked for (RESULTS.md, kernel session).
DEFAULT_BACKWARD = "split"

# -- public function -------------------------------------------------------------------------------

def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sparsity: BlockSparsity,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    tma: bool = True,
    element_mask: str = "bits",
    bits: ElementBits | None = None,
    bound_partial: bool | None = None,
    precision: str | None = None,
    backward: str = "auto",
):
    """Attention of q ``[B, H, Sq, D]`` over k, v ``[B, H, Sk, D]`` restricted to ``sparsity``.

    kv_len: ``[B]`` int32, keys at positions >= kv_len[b] are ignored (padded text), or None.
    tma:    load tiles through the Hopper tensor-memory accelerator where the GPU and strides allow
            (performance knob; False forces masked pointer loads).
    element_mask: how partial blocks apply the description's element rule: ``"bits"`` reads the
            rule from per-block bit masks (``kernels.triton.bits``; built here unless ``bits`` is
            given: build them once with ``element_bits(sparsity)`` when a description is reused),
            ``"rule"`` evaluates the rule per score in the kernel. Same result; bits are faster
            (RESULTS.md) and cost 4 x block_m x ceil(block_n / 32) bytes per partial block.
    bound_partial: with bits and no ``kv_len``, whether partial blocks still bound their keys by
            the sequence end (the bits already hold it). Same result either way and, measured, the
            same speed; ``None`` keeps the bound.
    precision: None (the inputs' dtype), or ``"int8"`` / ``"fp8"``: the 8-bit forward
            (``kernels.triton.quant``; SageAttention-style int8 or fp8 Q.K^T with per-block scales
            and K smoothing, fp8 P.V accumulated in fp32); ``"int8-qk"``: int8 Q.K^T, P.V in the
            inputs' dtype (less error, less speed). Inference only: faster, with a few times bf16's
            error (RESULTS.md); needs a GPU with fp8 tensor cores (compute capability >= 8.9).
    backward: ``"fused"``: one pass per key tile computes dK, dV and adds dQ atomically into an
            fp32 buffer (fewer matmuls; the sum order, so the last bits of dQ, vary run to run);
            ``"split"``: a dK/dV pass and a dQ pass, deterministic; ``"auto"``: split when
            ``torch.use_deterministic_algorithms`` is on, else ``DEFAULT_BACKWARD`` (measured).
    Returns out ``[B, H, Sq, D]`` (and lse ``[B, H, Sq]`` fp32, natural log, with return_lse).
    Differentiable in q, k, v, through out and lse (not with ``precision``). Rows that see no key
    return 0 with lse -inf.
    """
    ok, why = can_run(q, sparsity, forced=True, precision=precision)
    if not ok:
        raise NotImplementedError(f"block_sparse_attention cannot run: {why}")
    if backward not in ("auto", "fused", "split"):
        raise ValueError(f"block_sparse_attention: backward must be 'auto', 'fused' or 'split', got {backward!r}")
    if backward == "auto":
        backward = "split" if torch.are_deterministic_algorithms_enabled() else DEFAULT_BACKWARD
    if precision is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            f"block_sparse_attention: precision={precision!r} is a forward-only (inference) mode and has no "
            "backward; train with precision=None, or run inference under torch.no_grad()"
        )
    _check_inputs(q, k, v, sparsity.heads)
    if (q.shape[2], k.shape[2]) != (sparsity.q_len, sparsity.kv_len):
        raise ValueError(
            f"block_sparse_attention: q/k lengths {(q.shape[2], k.shape[2])} do not match the "
            f"description's {(sparsity.q_len, sparsity.kv_len)}; rebuild it for this layout"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if kv_len is not None:
        kv_len = kv_len.to(device=q.device, dtype=torch.int32).contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = sparsity
    predicate = s.rule.kernel_id if s.rule is not None else 0  # 0: block-level pattern, no element rule
    pred = s.rule_params if predicate else None  # built with the description, on its device
    if element_mask not in ("bits", "rule"):
        raise ValueError(f"block_sparse_attention: element_mask must be 'bits' or 'rule', got {element_mask!r}")
    if predicate and element_mask == "bits":
        bits = element_bits(s) if bits is None else bits
        if bits.bits.device != q.device:
            raise ValueError(f"block_sparse_attention: bits on {bits.bits.device}, tensors on {q.device}; build them with the description's device")
        want = (*s.part_idx.shape, s.block_m, -(-s.block_n // 32))
        if bits.bits.dtype != torch.int32 or tuple(bits.bits.shape) != want:
            raise ValueError(f"block_sparse_attention: bits of {bits.bits.dtype} {tuple(bits.bits.shape)} do not fit this description "
                             f"(int32 {want}); build them with element_bits(sparsity) for this description")
        words, slot = bits.bits, bits.q_part_slot
    else:
        words = slot = None
    # per-batch key lengths are never in the bits: with kv_len partial blocks always bound their keys
    bound = kv_len is not None or bound_partial is None or bool(bound_partial)
    if precision is not None:
        out, lse = block_sparse_fwd_8bit(
            q, k, v, s.full_num, s.full_idx, s.part_num, s.part_idx, kv_len, pred, predicate, words, bound, scale,
            s.block_m, s.block_n, bool(tma), precision,
        )
        return (out, lse) if return_lse else out
    out, lse = block_sparse_fwd(
        q, k, v, s.full_num, s.full_idx, s.part_num, s.part_idx,
        s.q_full_num, s.q_full_idx, s.q_part_num, s.q_part_idx,
        kv_len, pred, predicate, words, slot, bound, scale, s.block_m, s.block_n, bool(tma), backward == "fused",
    )
    return (out, lse) if return_lse else out
