"""The optional FlashAttention-4 backend: its refusals, its block lists (CPU), and on a Hopper GPU
with flash-attn-4 installed, forward and gradients vs the fp32 reference (marker gpu)."""

import sys

import pytest
import torch

from diffattn.kernels import fa4, select
from diffattn.kernels.reference import attention_reference
from diffattn.patterns import neighborhood as nbm
from diffattn.patterns import radial
from diffattn.core.layout import TokenLayout
from diffattn.patterns.blocks import expand_block_mask, from_block_mask
from helpers import assert_error_ratio


def _per_head_mask(heads, nq, nk, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, nq, nk, generator=g) < 0.35
    mask[:, torch.arange(nq), torch.arange(nq) * nk // nq] = True  # no empty query block
    return mask


@pytest.mark.cpu
def test_block_lists_are_the_descriptions_lists():
    s = 5 * 128 + 37  # a tail: the last key block is partial (FA4 masks it as its sequence end)
    mask = _per_head_mask(2, 6, 6, 0)
    sp = from_block_mask(mask, s, block_m=128)
    lists = fa4.block_lists(sp)
    assert lists["mask_cnt"].shape == (1, 2, 6) and lists["bwd_full_cnt"].shape == (1, 2, 6)
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in lists.values())
    for h in range(2):
        for r in range(6):
            full = lists["full_idx"][0, h, r, : lists["full_cnt"][0, h, r]].tolist()
            part = lists["mask_idx"][0, h, r, : lists["mask_cnt"][0, h, r]].tolist()
            assert sorted(full + part) == mask[h, r].nonzero().flatten().tolist()
            assert part == ([5] if mask[h, r, 5] else [])  # only the tail block is a "mask" block
            assert full == sorted(full)
        for c in range(6):  # the backward's lists: query blocks per key block
            full = lists["bwd_full_idx"][0, h, c, : lists["bwd_full_cnt"][0, h, c]].tolist()
            part = lists["bwd_mask_idx"][0, h, c, : lists["bwd_mask_cnt"][0, h, c]].tolist()
            assert sorted(full + part) == mask[h, :, c].nonzero().flatten().tolist()
            assert (part != []) == (c == 5 and bool(mask[h, :, 5].any()))


@pytest.mark.cpu
def test_padded_lists_cut_each_batch_at_its_key_length():
    s = 5 * 128 + 37
    mask = _per_head_mask(2, 6, 6, 1)
    mask[:, :, 0] = True
    lists = fa4.block_lists(from_block_mask(mask, s, block_m=128))
    kv_len = torch.tensor([s, 300, 256, 129])
    cut = fa4.padded_lists(lists, kv_len)
    assert cut["full_cnt"].shape == (4, 2, 6) and cut["full_idx"].shape[0] == 4
    for b, n in enumerate(kv_len.tolist()):
        for h in range(2):
            for r in range(6):
                got = []
                for kind in ("full", "mask"):
                    kept = cut[f"{kind}_idx"][b, h, r, : cut[f"{kind}_cnt"][b, h, r]].tolist()
                    assert kept == sorted(kept)
                    got += kept
                # every listed block that starts below the length, none past it
                want = [c for c in mask[h, r].nonzero().flatten().tolist() if c * 128 < n]
                assert sorted(got) == want
                assert max(got) == max(want)  # the block FA4 masks at the length: the last it processes


def _radial(frames=3, tokens=300):
    m = radial.block_mask(frames, tokens, block_size=128, decay=0.2, sink=True)
    return from_block_mask(m, frames * tokens, block_m=128)


@pytest.mark.cpu
def test_can_run_says_why_not():
    q = torch.zeros(1, 2, 900, 128, dtype=torch.bfloat16)
    sp = _radial()
    layout = TokenLayout(2, 6, 7, 0, "none")
    nb = nbm.block_sparsity(layout, nbm.spec(layout, (1, 3, 3)), block_m=128, block_n=128)
    small = from_block_mask(torch.ones(1, 15, 15, dtype=torch.bool), 900, block_m=64)
    cases = [
        ((q, sp), {"precision": "int8"}, "triton backend"),
        ((q, nb), {}, "element rule"),
        ((q, small), {}, "128 x 128 blocks"),
        ((q.clone().requires_grad_(), sp), {"padded": True}, "forward only"),
        ((q, sp), {"padded": True}, "CUDA only"),  # padded inference goes on to the device check
        ((q.float(), sp), {}, "bf16 or fp16"),
        ((torch.zeros(1, 2, 900, 96 + 4, dtype=torch.bfloat16), sp), {}, "multiple of 8"),
        ((torch.zeros(1, 2, 900, 256, dtype=torch.bfloat16), sp), {}, "head_dim <= 128"),
        ((q, sp), {}, "CUDA only"),
    ]
    for args, kwargs, why in cases:
        ok, reason = fa4.can_run(*args, **kwargs)
        assert not ok and why in reason, (why, reason)


@pytest.mark.cpu
def test_forced_fa4_raises_its_reason_and_auto_skips_it(monkeypatch):
    q = torch.zeros(1, 2, 900, 128, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="CUDA only"):
        select.choose("fa4", q, _radial())
    with pytest.raises(NotImplementedError, match="forward only"):
        select.choose("fa4", q.clone().requires_grad_(), _radial(), padded=True)
    monkeypatch.setattr(fa4, "PRESENT", False)  # absent: auto never names it
    backend, reasons = select.choose("auto", q, _radial())
    assert backend.name != "fa4" and not any("fa4" in r for r in reasons)
    ok, why = fa4.installed()
    assert not ok and "pip install flash-attn-4" in why
    assert "fa4" in select.BACKENDS


@pytest.mark.cpu
def test_present_needs_the_cute_interface(tmp_path, monkeypatch):
    """flash-attn 2 also installs a ``flash_attn`` package: only one with ``cute/interface.py`` counts."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not fa4._present()
    (pkg / "cute").mkdir()
    (pkg / "cute" / "interface.py").write_text("")
    assert fa4._present()
    assert "flash_attn" not in sys.modules  # found, not imported


# -- GPU: Hopper with flash-attn-4 installed ---------------------------------------------------------

def _needs_fa4():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("fa4 runs on Hopper only")
    ok, why = fa4.installed()
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,h,s,heads_in_mask,dtype",
    [
        (1, 2, 21 * 300, 1, torch.bfloat16),  # radial, a sequence tail
        (2, 3, 4096, 3, torch.bfloat16),  # per-head lists, batch 2, aligned
        (1, 2, 2500, 2, torch.float16),
    ],
)
def test_fa4_matches_reference_gpu(b, h, s, heads_in_mask, dtype):
    _needs_fa4()
    g = torch.Generator().manual_seed(s + h)
    nb = -(-s // 128)
    if heads_in_mask == 1:
        mask = radial.block_mask(21, 300, block_size=128, decay=0.2, sink=True)[None]
    else:
        mask = _per_head_mask(heads_in_mask, nb, nb, s)
    sp = from_block_mask(mask, s, block_m=128)
    backend, reasons = select.choose("auto", torch.zeros(1, 1, 1, 128, dtype=dtype, device="cuda"), sp)
    assert backend.name == "fa4", reasons
    q, k, v = (torch.randn(b, h, s, 128, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3))
    lists = fa4.block_lists(sp.to("cuda"))
    out = fa4.attention(q, k, v, lists)
    tok = expand_block_mask(mask, s, s, 128, 128).to("cuda")[None]
    ref32, _ = attention_reference(q, k, v, tok)
    ref_lp, _ = attention_reference(q, k, v, tok, compute_dtype=dtype)
    assert_error_ratio(out, ref32, ref_lp.to(dtype), "forward")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want32 = torch.autograd.grad(ref32, (q, k, v), do.float())
    want_lp = torch.autograd.grad(ref_lp.to(dtype), (q, k, v), do)
    for name, a, r32, rlp in zip("qkv", got, want32, want_lp):
        assert_error_ratio(a, r32, rlp, f"d{name}", floor=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fa4_padded_keys_match_reference_gpu(dtype):
    """Padded text keys at inference (HunyuanVideo's prompt padding): each batch's lists cut at its
    key length, FA4's varlen forward; with gradients on it raises."""
    _needs_fa4()
    frames, tokens, text = 7, 300, 256
    s = frames * tokens + text
    mask = radial.block_mask(frames, tokens, block_size=128, decay=0.95, sink=False, text_tokens=text)
    sp = from_block_mask(mask, s, block_m=128)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(3, 4, s, 128, generator=g).to("cuda", dtype) for _ in range(3))
    kv_len = torch.tensor([s, s - 200, frames * tokens + 5], dtype=torch.int32, device="cuda")
    backend, reasons = select.choose("auto", q, sp, padded=True)
    assert backend.name == "fa4", reasons
    out = backend.run(q, k, v, sp, kv_len=kv_len)
    tok = expand_block_mask(mask, s, s, 128, 128).to("cuda")[None]
    ref32, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
    ref_lp, _ = attention_reference(q, k, v, tok, kv_len=kv_len, compute_dtype=dtype)
    rows = slice(0, frames * tokens + 5)  # query rows past a batch's length are padding (unused)
    for b in range(3):
        assert_error_ratio(out[b, :, rows], ref32[b, :, rows], ref_lp[b, :, rows].to(dtype), f"forward, batch {b}")
    with pytest.raises(NotImplementedError, match="forward only"):
        fa4.attention(q.requires_grad_(), k, v, fa4.block_lists(sp.to("cuda")), kv_len=kv_len)
