"""Kernels vs their reference twin on fresh random inputs (block-level patterns; element rules on
every backend are in test_backends.py).

CPU: the Triton kernel under TRITON_INTERPRET=1 at tiny sizes (CI). GPU: real sizes (marker gpu).
"""

import json
import os

import pytest
import torch

from diffattn.kernels import PRECISIONS, block_sparse, sdpa
from diffattn.kernels.merge import merge_attention
from diffattn.kernels.reference import attention_reference
from diffattn.patterns.blocks import dense, expand_block_mask, from_block_mask
from helpers import assert_error_ratio

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to run the Triton kernel on CPU")


def _random_mask(heads, nq, nk, density, generator):
    mask = torch.rand(heads, nq, nk, generator=generator) < density
    rows = torch.arange(nq)
    mask[:, rows, torch.minimum(rows * nk // nq, torch.tensor(nk - 1))] = True  # no empty row
    mask[:, :, 0] = True  # and a key below any kv_len padding
    return mask


def _check_against_reference(b, h, s, d, block, heads_in_mask, dtype, device, kv_pad=0, density=0.5, grad=True, partial=None):
    g = torch.Generator().manual_seed(s * 31 + d)
    nb = -(-s // block)
    mask = _random_mask(heads_in_mask, nb, nb, density, g)
    sp = from_block_mask(mask, s, block_m=block, partial=partial)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3))
    kv_len = None
    if kv_pad:
        kv_len = torch.tensor([s] + [s - kv_pad] * (b - 1), dtype=torch.int32, device=device)
    out, lse = block_sparse.block_sparse_attention(q, k, v, sp.to(device), kv_len=kv_len, return_lse=True)
    tok = expand_block_mask(mask, s, s, block, block).to(device)[None]
    ref32, lse32 = attention_reference(q, k, v, tok, kv_len=kv_len)
    ref_lp, lse_lp = attention_reference(q, k, v, tok, kv_len=kv_len, compute_dtype=dtype)
    assert_error_ratio(out, ref32, ref_lp.to(dtype), "forward")
    lse_tol = 1e-2 if dtype != torch.float32 else 1e-4
    assert (lse.float() - lse32).abs().max() < lse_tol
    if grad:  # through out and lse (the lse's gradient matters where partial results are merged and trained)
        do = torch.randn_like(out)
        dl = torch.randn(lse.shape, generator=g).to(device)
        got = torch.autograd.grad((out, lse), (q, k, v), (do, dl))
        want32 = torch.autograd.grad((ref32, lse32), (q, k, v), (do.float(), dl))
        want_lp = torch.autograd.grad((ref_lp.to(dtype), lse_lp), (q, k, v), (do, dl.to(lse_lp.dtype)))
        for name, a, r32, rlp in zip("qkv", got, want32, want_lp):
            assert_error_ratio(a, r32, rlp, f"d{name}", floor=1e-5 if dtype == torch.float32 else 1e-3)


@needs_interpreter
@pytest.mark.cpu
@pytest.mark.parametrize(
    "b,h,s,d,block,heads_in_mask,kv_pad",
    [
        (1, 1, 64, 16, 16, 1, 0),     # aligned
        (2, 2, 77, 24, 16, 1, 0),     # tail, head dim padded to 32
        (1, 2, 50, 16, 32, 2, 0),     # per-head lists
        (2, 1, 96, 16, 32, 1, 21),    # padded keys (kv_len) cutting into blocks
        (1, 2, 40, 40, 16, 2, 9),     # head dim 40, per head, padded keys
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_cpu(b, h, s, d, block, heads_in_mask, kv_pad, dtype):
    _check_against_reference(b, h, s, d, block, heads_in_mask, dtype, "cpu", kv_pad=kv_pad)


@needs_interpreter
@pytest.mark.cpu
def test_triton_partial_blocks_cpu():
    # blocks flagged partial run the masked path; the result must not change
    g = torch.Generator().manual_seed(3)
    partial = torch.rand(1, 4, 4, generator=g) < 0.5
    _check_against_reference(1, 1, 64, 16, 16, 1, torch.float32, "cpu", partial=partial)


@needs_interpreter
@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lazy_rescale_cpu(monkeypatch, dtype):
    # the lazy-rescale experiment (stale row maxima on full blocks) is exact: keys sorted by growing
    # scores make later tiles raise the max past the 2^8 threshold, so both branches run; a tail block
    # and per-batch key lengths hand the stale max over to the masked loops
    monkeypatch.setattr(block_sparse, "_LAZY_RESCALE", True)
    g = torch.Generator().manual_seed(5)
    s, d = 100, 16
    q = torch.randn(2, 2, s, d, generator=g)
    k = torch.randn(2, 2, s, d, generator=g) * torch.linspace(0.2, 6.0, s)[:, None]
    v = torch.randn(2, 2, s, d, generator=g)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    kv_len = torch.tensor([s, s - 23], dtype=torch.int32)
    sp = dense(s, block_m=16)
    out, lse = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len, return_lse=True)
    want, want_lse = attention_reference(q, k, v, kv_len=kv_len)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.float(), want_lse.float(), atol=tol, rtol=tol)


def _bits_where_cases():
    """(sparse_n, block_n, col0): every tile width in every block width, first and last tile."""
    for sparse_n in (16, 32, 64, 128):
        for block_n in (16, 32, 64, 128):
            if block_n <= sparse_n:
                for col0 in sorted({0, sparse_n - block_n}):
                    yield sparse_n, block_n, col0


def _check_bits_where(device: str, rows: int):
    # the kernels' element-rule select on random words, against torch: every word of a row, tiles
    # starting mid-block, both orientations, the key bound cutting into every word. On the GPU the
    # scores come from an MMA (its register layout) and the select runs as PTX
    import triton
    import triton.language as tl

    @triton.jit
    def probe(words, out, col0, n_ok, M: tl.constexpr, N: tl.constexpr, W: tl.constexpr, TRANS: tl.constexpr,
              BOUND: tl.constexpr, NEG: tl.constexpr, MMA: tl.constexpr):
        r = tl.arange(0, M)
        c = tl.arange(0, N)
        if TRANS:
            x = tl.full([N, M], 1.0, tl.float32)
            if MMA:
                x = tl.dot(tl.full([N, 16], 1.0, tl.float16), tl.full([16, M], 1.0, tl.float16)) * 0.0625
            y = block_sparse._bits_where(x, words, r, col0, n_ok, 0.0, N, W, True, BOUND)
            tl.store(out + c[:, None] * M + r[None, :], y)
        else:
            x = tl.full([M, N], 1.0, tl.float32)
            if MMA:
                x = tl.dot(tl.full([M, 16], 1.0, tl.float16), tl.full([16, N], 1.0, tl.float16)) * 0.0625
            if NEG:
                y = block_sparse._bits_where(x, words, r, col0, n_ok, float("-inf"), N, W, False, BOUND)
            else:
                y = block_sparse._bits_where(x, words, r, col0, n_ok, 0.0, N, W, False, BOUND)
            tl.store(out + r[:, None] * N + c[None, :], y)

    g = torch.Generator().manual_seed(0)
    checked, wrong = 0, []
    for sparse_n, block_n, col0 in _bits_where_cases():
        w = -(-sparse_n // 32)
        words = torch.randint(-2**31, 2**31 - 1, (rows, w), generator=g, dtype=torch.int64).to(torch.int32)
        allowed = ((words[..., None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(rows, -1)[:, col0:col0 + block_n]
        # (orientation, other): the forward (-inf), dQ (0) and the transposed dK/dV pass (0). The dK/dV
        # pass runs element bits on key tiles of at most 64 (_prune_bwd): transposed 128-key tiles got
        # words 2-3 wrong on the H200 (triton 3.6), so on the GPU they are not a kernel case
        for trans, neg in ((False, True), (False, False), (True, False)):
            if trans and block_n > 64 and device == "cuda":
                checked += 6
                continue
            for n_ok in (None, -5, 17, 33, 65, 200):
                out = torch.empty(rows * block_n, device=device)
                probe[(1,)](words.to(device), out, col0, 0 if n_ok is None else n_ok, rows, block_n, w, trans, n_ok is not None, neg, device == "cuda")
                ok = allowed if n_ok is None else allowed & (torch.arange(block_n) < n_ok)[None, :]
                want = torch.where(ok, 1.0, float("-inf") if neg else 0.0)
                got = out.cpu().view(block_n, rows).T if trans else out.cpu().view(rows, block_n)
                if not torch.equal(got, want):
                    bad = (got != want).nonzero()[:3].tolist()
                    wrong.append(f"{sparse_n=} {block_n=} {col0=} {trans=} {neg=} {n_ok=}: {int((got != want).sum())} wrong, e.g. {bad}")
                checked += 1
    assert not wrong, "\n".join(wrong[:30]) + f"\n({len(wrong)} of {checked} cases wrong)"
    assert checked == 16 * 3 * 6


@needs_interpreter
@pytest.mark.cpu
def test_bits_where_matches_torch_cpu():
    _check_bits_where("cpu", 16)


# element rules (neighborhood, circle) on every backend: tests/test_backends.py (BackendTester)


@needs_interpreter
@pytest.mark.cpu
def test_triton_fused_backward_matches_reference_cpu():
    # the fused backward (dQ added atomically); the default split passes run in every other gradient test
    g = torch.Generator().manual_seed(5)
    mask = _random_mask(2, 3, 3, 0.5, g)
    sp = from_block_mask(mask, 96, block_m=32)
    q, k, v = (torch.randn(2, 2, 96, 16, generator=g).requires_grad_(True) for _ in range(3))
    kv_len = torch.tensor([96, 75], dtype=torch.int32)
    out, lse = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len, return_lse=True, backward="fused")
    ref, ref_lse = attention_reference(q, k, v, expand_block_mask(mask, 96, 96, 32, 32), kv_len=kv_len)
    do, dl = torch.randn_like(out), torch.randn(lse.shape, generator=g)
    for a, r in zip(torch.autograd.grad((out, lse), (q, k, v), (do, dl)), torch.autograd.grad((ref, ref_lse), (q, k, v), (do, dl))):
        torch.testing.assert_close(a, r, atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'auto', 'fused' or 'split'"):
        block_sparse.block_sparse_attention(q, k, v, sp, backward="atomic")


@needs_interpreter
@pytest.mark.cpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("b,h,s,d,block,heads_in_mask,kv_pad,dtype", [
    (2, 2, 77, 24, 32, 1, 0, torch.float32),    # tail, head dim padded to 32
    (2, 2, 96, 40, 32, 2, 21, torch.float16),   # per-head lists, padded keys, fp16 in and out
])
def test_triton_8bit_matches_its_twin_cpu(precision, b, h, s, d, block, heads_in_mask, kv_pad, dtype):
    from diffattn.kernels.reference import quantized_reference

    g = torch.Generator().manual_seed(s + d)
    nb = -(-s // block)
    mask = _random_mask(heads_in_mask, nb, nb, 0.6, g)
    sp = from_block_mask(mask, s, block_m=block)
    q, k, v = (torch.randn(b, h, s, d, generator=g).add(0.5).to(dtype) for _ in range(3))  # a common offset: smoothing matters
    kv_len = torch.tensor([s] + [s - kv_pad] * (b - 1), dtype=torch.int32) if kv_pad else None
    tok = expand_block_mask(mask, s, s, block, block)[None]
    out, lse = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len, precision=precision, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    twin, twin_lse = quantized_reference(q, k, v, precision, block, block, tok, kv_len)
    ref, ref_lse = attention_reference(q, k, v, tok, kv_len=kv_len)
    rel = lambda a, r: ((a.float() - r).norm() / r.norm()).item()  # noqa: E731
    assert rel(out, ref) <= 1.5 * rel(twin, ref) + 2e-3, (rel(out, ref), rel(twin, ref))
    assert rel(out, twin) < 0.03
    torch.testing.assert_close(lse, twin_lse, atol=2e-3, rtol=1e-4)  # the smoothing's shift is added back
    torch.testing.assert_close(lse, ref_lse, atol=0.1, rtol=0)


@needs_interpreter
@pytest.mark.cpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_8bit_zero_blocks_and_padded_keys_stay_finite_cpu(precision):
    # an all-zero query block (scale 0 would make masked scores 0 x -inf = NaN) and huge padded keys
    # (which must not set a block's scale) next to a key tail
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 1, 64, 32, generator=g) for _ in range(3))
    q[:, :, :32] = 0.0
    k[1, :, 40:] = 1e4
    v[1, :, 40:] = 1e4
    kv_len = torch.tensor([64, 40], dtype=torch.int32)
    sp = dense(64, block_m=32)
    out = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len, precision=precision)
    ref, _ = attention_reference(q, k, v, kv_len=kv_len)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.08


@needs_interpreter
@pytest.mark.cpu
def test_8bit_is_inference_only_and_checks_its_name():
    sp = dense(32, block_m=32)
    q = torch.randn(1, 1, 32, 16, requires_grad=True)
    assert "at least 32" in block_sparse.can_run(q, dense(32, block_m=16), forced=True, precision="fp8")[1]
    with pytest.raises(NotImplementedError, match="forward-only"):
        block_sparse.block_sparse_attention(q, q, q, sp, precision="int8")
    with torch.no_grad():
        block_sparse.block_sparse_attention(q, q, q, sp, precision="int8")
    ok, why = block_sparse.can_run(q, sp, forced=True, precision="int4")
    assert not ok and "precision must be" in why
    from diffattn.kernels import select

    with pytest.raises(NotImplementedError, match="triton backend"):
        select.choose("sdpa", q, sp, "fp8")


@needs_interpreter
@pytest.mark.cpu
def test_autotune_keys_hold_the_problem_size(monkeypatch):
    # a small call and a large one tune apart (a test-sized first call once fixed the tiles of
    # Wan2.1-14B through the disk cache); calls of one size class share their entry
    kernels = (block_sparse._fwd_kernel, block_sparse._dkdv_kernel, block_sparse._dq_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "cache", {})
    g = torch.Generator().manual_seed(5)

    def call(heads, s, seed):
        mask = _random_mask(1, -(-s // 32), -(-s // 32), 0.5, g)
        sp = from_block_mask(mask, s, block_m=32)
        q, k, v = (torch.randn(1, heads, s, 32, generator=torch.Generator().manual_seed(seed + i), requires_grad=True) for i in range(3))
        block_sparse.block_sparse_attention(q, k, v, sp).sum().backward()

    call(1, 64, 0)
    call(6, 256, 1)
    call(1, 64, 2)  # the small size again, other inputs: no new entry
    for kernel in kernels:
        keys = list(kernel.cache)
        assert kernel.keys[0] == "size_class" and len(keys) == 2, (kernel.fn.__name__, keys)
        assert keys[0][0] < keys[1][0] and keys[0][1:] == keys[1][1:]


@pytest.mark.cpu
def test_tuned_configs_round_trip_through_the_disk_cache(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")

    from diffattn.kernels.triton import tuning

    class Fn:
        __name__ = "_fwd_kernel"
        cache_key = "0123456789abcdef-source"

    class Kernel:  # what tuning reads of a triton.autotune object
        def __init__(self):
            self.fn, self.cache = Fn(), {}
            self.configs = [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
                            triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
                            triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3, maxnreg=128)]  # a register cap only

    monkeypatch.setenv("DIFFATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_SEEN", {})
    cpu = torch.device("cpu")
    tuned = Kernel()
    key = (128, 128, 64, False, False, True, 0, 0, 0, "torch.bfloat16")
    tuned.cache[key] = tuned.configs[1]
    tuning.save(tuned, cpu)
    path = tuning.cache_file(tuned, cpu)
    assert path.parent == tmp_path / "autotune" and path.exists()
    monkeypatch.setattr(tuning, "_SEEN", {})  # a new process
    fresh = Kernel()
    tuning.load(fresh, cpu)
    assert fresh.cache == {key: fresh.configs[1]} and fresh.cache[key] is fresh.configs[1]  # the live config, pre-hooks and all
    other = Kernel()  # another process tuned another key meanwhile: both are kept
    other.cache[key[:-1] + ("torch.float16",)] = other.configs[0]
    monkeypatch.setattr(tuning, "_SEEN", {})
    tuning.save(other, cpu)
    monkeypatch.setattr(tuning, "_SEEN", {})
    both = Kernel()
    tuning.load(both, cpu)
    assert set(both.cache) == {key, key[:-1] + ("torch.float16",)}
    capped = Kernel()  # a config that differs only by its register cap comes back as itself
    capped.cache[key] = capped.configs[2]
    path.unlink()
    monkeypatch.setattr(tuning, "_SEEN", {})
    tuning.save(capped, cpu)
    monkeypatch.setattr(tuning, "_SEEN", {})
    again = Kernel()
    tuning.load(again, cpu)
    assert again.cache[key] is again.configs[2]
    old = json.loads(path.read_text())  # a file written before caps were saved: the uncapped config
    del old["entries"][0][1]["maxnreg"]
    path.write_text(json.dumps(old))
    monkeypatch.setattr(tuning, "_SEEN", {})
    before = Kernel()
    tuning.load(before, cpu)
    assert before.cache[key] is before.configs[1]
    for damage in ("{not json", '{"entries": [[1, 2]]}'):  # a damaged file is tuned again, not fatal
        path.write_text(damage)
        monkeypatch.setattr(tuning, "_SEEN", {})
        damaged = Kernel()
        tuning.load(damaged, cpu)
        assert damaged.cache == {}
    monkeypatch.setenv("DIFFATTN_AUTOTUNE_CACHE", "0")
    assert tuning.cache_file(tuned, cpu) is None


@needs_interpreter
@pytest.mark.cpu
def test_triton_full_density_equals_dense_sdpa_cpu():
    q, k, v = (torch.randn(2, 2, 70, 32) for _ in range(3))
    out = block_sparse.block_sparse_attention(q, k, v, dense(70, block_m=16))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.cpu
def test_empty_row_is_an_error_before_launch():
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="no key block"):
        from_block_mask(mask, 48, block_m=16)


@needs_interpreter
@pytest.mark.cpu
def test_bad_shapes_raise():
    sp = dense(32, block_m=16)
    q = torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match="do not match"):
        block_sparse.block_sparse_attention(q[:, :, :16], q[:, :, :16], q[:, :, :16], sp)
    with pytest.raises(ValueError, match="expected q"):
        block_sparse.block_sparse_attention(q, q[:, :1], q[:, :1], sp)


@needs_interpreter
@pytest.mark.cpu
def test_bad_element_mask_options_raise():
    from diffattn.core.layout import TokenLayout
    from diffattn.patterns import neighborhood as nbm

    layout = TokenLayout(2, 4, 4)
    desc = nbm.block_sparsity(layout, nbm.spec(layout, (1, 3, 3)), block_m=16, block_n=16)
    q = torch.randn(1, 1, layout.seq_len, 16)
    with pytest.raises(ValueError, match="'bits' or 'rule'"):
        block_sparse.block_sparse_attention(q, q, q, desc, element_mask="bitmask")
    with pytest.raises(ValueError, match="no element rule"):
        block_sparse.element_bits(dense(32, block_m=16))


@pytest.mark.cpu
def test_can_run_explains_itself():
    q = torch.randn(1, 1, 8, 16)
    ok, why = block_sparse.can_run(q, dense(8, block_m=16))
    assert not ok and "CPU" in why  # automatic choice never picks the interpreter
    ok, why = block_sparse.can_run(q, dense(8, block_m=16), forced=True)
    assert ok == INTERPRET
    ok, why = block_sparse.can_run(q.double(), dense(8, block_m=16), forced=True)
    assert not ok and "dtype" in why


@pytest.mark.cpu
def test_merge_equals_one_masked_call():
    # video x video sparse + video x text dense, merged by lse == one dense masked call
    g = torch.Generator().manual_seed(5)
    b, h, n_video, n_text, d, block = 2, 2, 64, 12, 16, 16
    s = n_video + n_text
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    kv_len = torch.tensor([s, s - 5])
    vv = _random_mask(1, 4, 4, 0.5, g)[0]
    full = torch.ones(s, s, dtype=torch.bool)
    full[:n_video, :n_video] = expand_block_mask(vv, n_video, n_video, block, block)
    want, _ = attention_reference(q, k, v, full, kv_len=kv_len)
    out_vv, lse_vv = attention_reference(q[:, :, :n_video], k[:, :, :n_video], v[:, :, :n_video], full[:n_video, :n_video])
    out_vt, lse_vt = attention_reference(q[:, :, :n_video], k[:, :, n_video:], v[:, :, n_video:], kv_len=kv_len - n_video)
    merged, _ = merge_attention(out_vv, lse_vv, out_vt, lse_vt)
    torch.testing.assert_close(merged, want[:, :, :n_video], atol=1e-5, rtol=1e-5)


@pytest.mark.cpu
def test_sdpa_backend_matches_reference():
    g = torch.Generator().manual_seed(7)
    mask = _random_mask(1, 5, 5, 0.4, g)
    sp = from_block_mask(mask, 70, block_m=16)
    q, k, v = (torch.randn(2, 3, 70, 16, generator=g) for _ in range(3))
    kv_len = torch.tensor([70, 60])
    out = sdpa.sdpa_block_sparse(q, k, v, sp, kv_len=kv_len)
    want, _ = attention_reference(q, k, v, expand_block_mask(mask, 70, 70, 16, 16), kv_len=kv_len)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# -- GPU: real sizes ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,h,s,d,block,heads_in_mask,kv_pad,density,dtype",
    [
        (1, 2, 4096, 128, 128, 1, 0, 0.3, torch.bfloat16),
        (2, 2, 3000, 64, 64, 2, 0, 0.4, torch.bfloat16),
        (1, 3, 2500, 128, 128, 1, 300, 0.5, torch.float16),
        (1, 2, 1800, 80, 64, 1, 0, 0.6, torch.bfloat16),
        (1, 2, 2048, 40, 128, 1, 77, 1.0, torch.bfloat16),
    ],
)
def test_triton_matches_reference_gpu(b, h, s, d, block, heads_in_mask, kv_pad, density, dtype):
    _check_against_reference(b, h, s, d, block, heads_in_mask, dtype, "cuda", kv_pad=kv_pad, density=density)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bits", "rule"])
@pytest.mark.parametrize("kind", ["neighborhood3d", "neighborhood3d_128_padded", "neighborhood2d_gna", "circle", "circle_tiled_pooled"])
def test_triton_predicates_gpu(kind, mode):
    from diffattn.core.layout import TokenLayout
    from diffattn.patterns import clear
    from diffattn.patterns import neighborhood as nbm

    if kind == "neighborhood3d":  # a small video grid with text after
        layout = TokenLayout(6, 30, 52, 77, "after")
        spec = nbm.spec(layout, (3, 11, 11))
        desc, tok = nbm.block_sparsity(layout, spec, device="cuda"), nbm.token_mask(layout, spec)
    elif kind == "neighborhood3d_128_padded":  # 128-key blocks (four words a row), per-batch text lengths
        layout = TokenLayout(5, 30, 52, 77, "after")
        spec = nbm.spec(layout, (3, 9, 13), (1, 2, 2))
        desc, tok = nbm.block_sparsity(layout, spec, block_m=128, block_n=128, device="cuda"), nbm.token_mask(layout, spec)
    elif kind == "neighborhood2d_gna":
        layout = TokenLayout(1, 64, 64)
        spec = nbm.spec(layout, 16, 8)
        desc, tok = nbm.block_sparsity(layout, spec, device="cuda"), nbm.token_mask(layout, spec)
    elif kind == "circle_tiled_pooled":  # CLEAR r=8 in tile order with the pooled branch (d=4), unaligned grid
        layout = TokenLayout(1, 50, 70, 77, "before")
        tiling = clear.plane_tiling(layout)
        desc, tok = clear.block_sparsity(layout, 8, 4, tiling=tiling, device="cuda"), clear.kernel_mask(layout, 8, 4, tiling)
        layout = TokenLayout(1, 1, tok.shape[0])  # the kernel sequence: tiles, text, pooled tokens
    else:  # CLEAR r=16 with text first
        layout = TokenLayout(1, 64, 64, 512, "before")
        desc, tok = clear.block_sparsity(layout, 16, device="cuda"), clear.token_mask(layout, 16)
    g = torch.Generator().manual_seed(13)
    batch, kv_len = (2, torch.tensor([layout.seq_len, layout.seq_len - 100], device="cuda")) if kind.endswith("padded") else (1, None)
    q, k, v = (torch.randn(batch, 2, layout.seq_len, 128, generator=g).to("cuda", torch.bfloat16).requires_grad_(True) for _ in range(3))
    out = block_sparse.block_sparse_attention(q, k, v, desc, kv_len=kv_len, element_mask=mode)
    tok = tok.to("cuda")[None, None]
    ref32, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
    ref_lp, _ = attention_reference(q, k, v, tok, compute_dtype=torch.bfloat16, kv_len=kv_len)
    assert_error_ratio(out, ref32, ref_lp.to(torch.bfloat16), f"{kind} forward")
    do = torch.randn_like(out)
    for name, a, r32, rlp in zip("qkv", torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref32, (q, k, v), do.float()), torch.autograd.grad(ref_lp.to(torch.bfloat16), (q, k, v), do)):
        assert_error_ratio(a, r32, rlp, f"{kind} d{name}", floor=1e-3)


@pytest.mark.gpu
def test_bits_where_matches_torch_gpu():
    _check_bits_where("cuda", 64)


@pytest.mark.gpu
def test_triton_pointer_loads_match_tma_gpu():
    # GPUs before Hopper (and unaligned strides) take the pointer-load path: same results
    g = torch.Generator().manual_seed(11)
    mask = _random_mask(1, 20, 20, 0.4, g)
    sp = from_block_mask(mask, 2500, block_m=128).to("cuda")
    q, k, v = (torch.randn(1, 2, 2500, 128, generator=g).to("cuda", torch.bfloat16).requires_grad_(True) for _ in range(3))
    kv_len = torch.tensor([2400], dtype=torch.int32, device="cuda")
    outs = []
    for tma in (True, False):
        out = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len, tma=tma)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*outs):
        assert (a.float() - b.float()).abs().max() < 2e-2


@pytest.mark.gpu
def test_triton_compiles_under_torch_compile():
    q, k, v = (torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    sp = dense(1000, block_m=64).to("cuda")
    f = torch.compile(lambda q, k, v: block_sparse.block_sparse_attention(q, k, v, sp), fullgraph=True)
    out = f(q, k, v)
    out.sum().backward()
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - want).abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["blocks", pytest.param("neighborhood", marks=pytest.mark.xfail(
    reason="torch 2.11 / H200: compiling flex_attention with the neighborhood rule as mask_mod raised Inductor's "
           "NoValidChoicesError (benchmarks/device/2026-12-02-attention-1.log); the triton backend runs the rule",
    strict=False))])
def test_flex_compiled_matches_reference_gpu(kind):
    from diffattn.core.layout import TokenLayout
    from diffattn.kernels.flex import FlexBackend
    from diffattn.patterns import neighborhood as nbm

    g = torch.Generator().manual_seed(17)
    if kind == "blocks":
        mask = _random_mask(2, 20, 20, 0.4, g)
        desc, tok = from_block_mask(mask, 2500, block_m=128), expand_block_mask(mask, 2500, 2500, 128, 128)[None]
        text_start = 0
    else:
        layout = TokenLayout(5, 20, 24, 77, "after")
        spec = nbm.spec(layout, (3, 9, 9), (1, 2, 2))
        desc, tok = nbm.block_sparsity(layout, spec, block_m=128, block_n=64), nbm.token_mask(layout, spec)[None, None]
        text_start = layout.video_tokens
    s = desc.q_len
    q, k, v = (torch.randn(1, 2, s, 128, generator=g).to("cuda", torch.bfloat16).requires_grad_(True) for _ in range(3))
    kv_len = torch.tensor([s - 40], dtype=torch.int32, device="cuda")
    out = FlexBackend(desc, "cuda", text_key_start=text_start)(q, k, v, kv_len=kv_len)
    tok = tok.to("cuda")
    ref32, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
    ref_lp, _ = attention_reference(q, k, v, tok, kv_len=kv_len, compute_dtype=torch.bfloat16)
    assert_error_ratio(out, ref32, ref_lp.to(torch.bfloat16), f"flex {kind} forward")
    do = torch.randn_like(out)
    for name, a, r32, rlp in zip("qkv", torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref32, (q, k, v), do.float()), torch.autograd.grad(ref_lp.to(torch.bfloat16), (q, k, v), do)):
        assert_error_ratio(a, r32, rlp, f"flex {kind} d{name}", floor=1e-3)


@pytest.mark.gpu
def test_fused_backward_matches_split_gpu():
    # the atomic dQ of the fused backward vs the deterministic split passes, at a real size
    g = torch.Generator().manual_seed(21)
    mask = _random_mask(1, 24, 24, 0.3, g)
    sp = from_block_mask(mask, 3000, block_m=128).to("cuda")
    q, k, v = (torch.randn(1, 4, 3000, 128, generator=g).to("cuda", torch.bfloat16).requires_grad_(True) for _ in range(3))
    kv_len = torch.tensor([2900], dtype=torch.int32, device="cuda")
    do = torch.randn(1, 4, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    grads = {}
    for mode in ("fused", "split"):
        out = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len, backward=mode)
        grads[mode] = torch.autograd.grad(out, (q, k, v), do)
    tok = expand_block_mask(mask, 3000, 3000, 128, 128).to("cuda")[None]
    ref32, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
    ref_lp, _ = attention_reference(q, k, v, tok, kv_len=kv_len, compute_dtype=torch.bfloat16)
    want32 = torch.autograd.grad(ref32, (q, k, v), do.float())
    want_lp = torch.autograd.grad(ref_lp.to(torch.bfloat16), (q, k, v), do)
    for mode, got in grads.items():
        for name, a, r32, rlp in zip("qkv", got, want32, want_lp):
            assert_error_ratio(a, r32, rlp, f"{mode} d{name}", floor=1e-3)
    block_sparse_default = block_sparse.DEFAULT_BACKWARD
    block_sparse.DEFAULT_BACKWARD = "fused"  # so that only the determinism rule can pick the split passes
    torch.use_deterministic_algorithms(True)
    try:  # "auto" under determinism runs the split passes: bit-identical run to run
        runs = [torch.autograd.grad(block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len), (q,), do)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
        block_sparse.DEFAULT_BACKWARD = block_sparse_default
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], grads["split"][0])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("d,kv_pad", [(128, 0), (64, 300), (80, 0)])
def test_triton_8bit_matches_its_twin_gpu(precision, d, kv_pad):
    from diffattn.kernels.reference import quantized_reference

    g = torch.Generator().manual_seed(d + kv_pad)
    s = 2500
    mask = _random_mask(1, 20, 40, 0.4, g)
    sp = from_block_mask(mask, s, block_m=128, block_n=64).to("cuda")
    # attention with structure: keys share a direction and queries lean on it (smoothing matters)
    q, k, v = (torch.randn(1, 2, s, d, generator=g) for _ in range(3))
    k = k + 2.0 * torch.randn(1, 2, 1, d, generator=g)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in (q, k, v))
    kv_len = torch.tensor([s - kv_pad], dtype=torch.int32, device="cuda") if kv_pad else None
    out, lse = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len, precision=precision, return_lse=True)
    tok = expand_block_mask(mask, s, s, 128, 64).to("cuda")[None]
    twin, twin_lse = quantized_reference(q, k, v, precision, 128, 64, tok, kv_len)
    ref32, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
    bf16 = block_sparse.block_sparse_attention(q, k, v, sp, kv_len=kv_len)
    rel = lambda a, r: ((a.float() - r.float()).norm() / r.float().norm()).item()  # noqa: E731
    assert rel(out, ref32) <= 1.5 * rel(twin, ref32) + 2e-3, (rel(out, ref32), rel(twin, ref32))
    assert rel(out, twin) < 0.03
    torch.testing.assert_close(lse, twin_lse, atol=5e-3, rtol=1e-4)
    print(f"{precision} d={d}: rel err {rel(out, ref32):.4f}, bf16 {rel(bf16, ref32):.4f}, twin {rel(twin, ref32):.4f}")


@needs_interpreter
@pytest.mark.cpu
def test_bits_of_another_description_refused():
    from diffattn.core.layout import TokenLayout
    from diffattn.patterns import neighborhood as nbm

    layout = TokenLayout(2, 6, 12)
    spec = nbm.spec(layout, (1, 3, 5))
    a, b = (nbm.block_sparsity(layout, spec, block_m=32, block_n=n) for n in (32, 64))
    q = torch.randn(1, 1, layout.seq_len, 16)
    with pytest.raises(ValueError, match="do not fit this description"):
        block_sparse.block_sparse_attention(q, q, q, b, bits=block_sparse.element_bits(a))


@pytest.mark.cpu
def test_kernels_folder_refuses_to_shadow_hugging_face_kernels():
    # with the checkout's root on sys.path (python -m from the root) kernels/ would be imported as
    # Hugging Face's 'kernels' (transformers imports it): the error says so and names the fix
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = "import sys; sys.path.insert(0, ''); import kernels"  # the root first, also under PYTHONSAFEPATH
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "shadowing Hugging Face's 'kernels' package" in run.stderr, run.stderr[-2000:]
    assert "Run from another directory" in run.stderr
