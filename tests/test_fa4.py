"""The optional FlashAttention-4 backend: its refusals, its block lists (CPU), and on a Hopper GPU
with flash-attn-4 installed, forward and gradients vs the fp32 reference (marker gpu)."""

import os
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

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to build element bits on CPU")


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
    assert cut["full_cnt"].shape == (4, 2, 6) and cut["full_idx"].shape[0] == 1  # indices broadcast
    for b, n in enumerate(kv_len.tolist()):
        for h in range(2):
            for r in range(6):
                got = []
                for kind in ("full", "mask"):
                    kept = cut[f"{kind}_idx"][0, h, r, : cut[f"{kind}_cnt"][b, h, r]].tolist()
                    assert kept == sorted(kept)
                    got += kept
                # every listed block that starts below the length, none past it
                want = [c for c in mask[h, r].nonzero().flatten().tolist() if c * 128 < n]
                assert sorted(got) == want  # so the block holding the length is the highest kept


@needs_interpreter
@pytest.mark.cpu
def test_bits_addressing_reproduces_the_token_mask():
    """The mask_mod's addressing (slot_index, word_index and the constants prepare() gives it: the
    same functions it traces) over the Triton-built bits gives the rule's token mask on every
    partial block: per-head lists, and shared lists read by every head (the head is ignored)."""
    for name, (sp, tok) in _rule_cases().items():
        slots, bits = fa4.rule_tensors(sp)
        c = fa4.mask_constants(sp)
        assert (c["heads"], c["nq"], c["nk"]) == (sp.heads, sp.num_q_blocks, sp.num_kv_blocks)
        assert bits.numel() == c["heads"] * c["nq"] * c["width"] * 128 * c["words"]
        qi, ki = torch.meshgrid(torch.arange(c["nq"] * 128), torch.arange(c["nk"] * 128), indexing="ij")
        for head in range(2):  # two query heads: per-head lists read theirs, shared lists head 0's
            row = (head * c["nq"] if c["heads"] > 1 else 0) + qi // 128  # as rule_bits computes it
            slot = slots[fa4.slot_index(row, ki, c["nk"])].long()
            got = ((bits[fa4.word_index(row, slot, qi, ki, c["width"], c["words"])] >> (ki % 32)) & 1).bool()
            h = min(head, sp.heads - 1)
            part = (sp.partial[h] & sp.mask[h]).repeat_interleave(128, 0).repeat_interleave(128, 1)  # [nq*128, nk*128]
            want = torch.zeros_like(got)
            want[: sp.q_len, : sp.kv_len] = tok[min(head, tok.shape[0] - 1)]
            assert bool(part.any()) and torch.equal(got[part], want[part]), (name, head)


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
        ((q, nb), {}, "slower than the triton kernel"),  # auto leaves element rules to triton
        ((q, nb), {"forced": True}, "CUDA only"),  # forced, they run (through their bits)
        ((q, small), {}, "128 x 128 blocks"),
        ((q.clone().requires_grad_(), sp), {"padded": True}, "forward only"),
        ((q, sp), {"padded": True}, "CUDA only"),  # padded inference goes on to the device check
        ((q.float(), sp), {}, "bf16 or fp16"),
        ((torch.zeros(1, 2, 900, 80, dtype=torch.bfloat16), sp), {}, "head_dim in (64, 96, 128)"),
        ((torch.zeros(1, 2, 900, 256, dtype=torch.bfloat16), sp), {}, "head_dim in (64, 96, 128)"),
        ((q, sp), {"padded": True, "grad": True}, "forward only"),  # k or v needs gradients, q does not
        ((q, sp), {}, "CUDA only"),
    ]
    for args, kwargs, why in cases:
        ok, reason = fa4.can_run(*args, **kwargs)
        assert not ok and why in reason, (why, reason)
    torch.use_deterministic_algorithms(True)
    try:
        ok, reason = fa4.can_run(q, sp, grad=True)
        assert not ok and "deterministic" in reason
        assert "CUDA only" in fa4.can_run(q, sp, grad=False)[1]  # inference is deterministic
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cpu
def test_forced_fa4_raises_its_reason_and_auto_skips_it(monkeypatch):
    q = torch.zeros(1, 2, 900, 128, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="CUDA only"):
        select.choose("fa4", q, _radial())
    with pytest.raises(NotImplementedError, match="forward only"):
        select.choose("fa4", q.clone().requires_grad_(), _radial(), padded=True)
    monkeypatch.setattr(fa4, "PRESENT", True)  # installed: auto tries it first on CUDA, never on CPU
    assert select.auto_order(True)[0] == "fa4" and "fa4" not in select.auto_order(False)
    backend, reasons = select.choose("auto", q, _radial())
    assert backend.name != "fa4" and not any("fa4" in r for r in reasons)
    monkeypatch.setattr(fa4, "PRESENT", False)  # absent: auto never names it
    assert "fa4" not in select.auto_order(True)
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

def _assert_matches_reference(out, q, k, v, tok, dtype):
    """``out`` and its dq, dk, dv within 2x the low-precision reference's error of the fp32 one."""
    ref32, _ = attention_reference(q, k, v, tok)
    ref_lp, _ = attention_reference(q, k, v, tok, compute_dtype=dtype)
    assert_error_ratio(out, ref32, ref_lp.to(dtype), "forward")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want32 = torch.autograd.grad(ref32, (q, k, v), do.float())
    want_lp = torch.autograd.grad(ref_lp.to(dtype), (q, k, v), do)
    for name, a, r32, rlp in zip("qkv", got, want32, want_lp):
        assert_error_ratio(a, r32, rlp, f"d{name}", floor=1e-3)


def _needs_fa4():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("fa4 runs on Hopper only")
    ok, why = fa4.installed()
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,h,s,heads_in_mask,dtype,d",
    [
        (1, 2, 21 * 300, 1, torch.bfloat16, 128),  # radial, a sequence tail
        (2, 3, 4096, 3, torch.bfloat16, 128),  # per-head lists, batch 2, aligned
        (1, 2, 2500, 2, torch.float16, 128),
        (1, 2, 21 * 300, 1, torch.bfloat16, 64),  # FA4's other sm90 tile classes
        (2, 2, 2500, 2, torch.bfloat16, 96),
    ],
)
def test_fa4_matches_reference_gpu(b, h, s, heads_in_mask, dtype, d):
    _needs_fa4()
    g = torch.Generator().manual_seed(s + h)
    nb = -(-s // 128)
    if heads_in_mask == 1:
        mask = radial.block_mask(21, 300, block_size=128, decay=0.2, sink=True)[None]
    else:
        mask = _per_head_mask(heads_in_mask, nb, nb, s)
    sp = from_block_mask(mask, s, block_m=128)
    backend, reasons = select.choose("auto", torch.zeros(1, 1, 1, d, dtype=dtype, device="cuda"), sp)
    assert backend.name == "fa4", reasons
    q, k, v = (torch.randn(b, h, s, d, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3))
    lists = fa4.block_lists(sp.to("cuda"))
    out = fa4.attention(q, k, v, lists)
    _assert_matches_reference(out, q, k, v, expand_block_mask(mask, s, s, 128, 128).to("cuda")[None], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", [("radial", torch.bfloat16), ("radial", torch.float16),
                                        ("neighborhood causal + stride, text after", torch.bfloat16),
                                        ("neighborhood, per-head lists", torch.bfloat16)])
def test_fa4_padded_keys_match_reference_gpu(case, dtype):
    """Padded text keys at inference (HunyuanVideo's prompt padding): each batch's lists cut at its
    key length, FA4's varlen forward, element rules and per-head lists included; with gradients on
    it raises."""
    _needs_fa4()
    if case == "radial":
        frames, tokens, text = 7, 300, 256
        mask = radial.block_mask(frames, tokens, block_size=128, decay=0.95, sink=False, text_tokens=text)
        sp = from_block_mask(mask, frames * tokens + text, block_m=128)
        tok = expand_block_mask(mask, sp.q_len, sp.q_len, 128, 128)[None]
    else:
        sp, tok = _rule_cases()[case]
    s, h = sp.q_len, 2 if sp.heads == 2 else 4
    tok = tok.to("cuda")[None]  # [1, Hm or 1, S, S]
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(3, h, s, 128, generator=g).to("cuda", dtype) for _ in range(3))
    kv_len = torch.tensor([s, s - 200, s - 131], dtype=torch.int32, device="cuda")
    backend, reasons = select.choose("fa4" if sp.rule is not None else "auto", q, sp, padded=True)
    assert backend.name == "fa4", reasons
    out = backend.run(q, k, v, sp, kv_len=kv_len)
    ref32, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
    ref_lp, _ = attention_reference(q, k, v, tok, kv_len=kv_len, compute_dtype=dtype)
    for b, n in enumerate(kv_len.tolist()):  # query rows past a batch's length are padding (unused)
        assert_error_ratio(out[b, :, :n], ref32[b, :, :n], ref_lp[b, :, :n].to(dtype), f"forward, batch {b}")
    with pytest.raises(NotImplementedError, match="forward only"):
        fa4.attention(q.requires_grad_(), k, v, fa4.prepare(sp.to("cuda")), kv_len=kv_len)


def _rule_cases():
    """(name, description at 128 x 128 blocks, token mask [Hm or 1, S, S]) with element rules."""
    from diffattn.patterns import clear

    a = TokenLayout(4, 12, 20, 0, "none")  # S = 960: a tail block
    sa = nbm.spec(a, (3, 5, 7))
    b = TokenLayout(3, 10, 16, 40, "after")  # text after, stride, causal time
    sb = nbm.spec(b, (3, 3, 5), (1, 2, 2), 1, (True, False, False))
    c = TokenLayout(2, 16, 24, 56, "after")
    base = nbm.block_sparsity(a, sa, block_m=128, block_n=128)
    drop = torch.zeros_like(base.mask[0])
    drop[1::2, 2::3] = True
    drop[:, 0] = False
    mask = torch.stack([base.mask[0], base.mask[0] & ~drop])
    mask[1][~mask[1].any(-1), 0] = True
    per_head = from_block_mask(mask, a.seq_len, block_m=128, block_n=128,
                               partial=base.partial.expand_as(mask) | ~base.mask[0], rule=base.rule)
    per_head_tok = nbm.token_mask(a, sa)[None] & expand_block_mask(mask, a.seq_len, a.seq_len, 128, 128)
    return {
        "neighborhood 3-D, tail": (base, nbm.token_mask(a, sa)[None]),
        "neighborhood causal + stride, text after": (nbm.block_sparsity(b, sb, block_m=128, block_n=128), nbm.token_mask(b, sb)[None]),
        "circle, text after": (clear.block_sparsity(c, 5, block_m=128, block_n=128), clear.token_mask(c, 5)[None]),
        "neighborhood, per-head lists": (per_head, per_head_tok),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_rule_cases()))
def test_fa4_element_rules_match_reference_gpu(name):
    """Element rules through the bits mask_mod (forced: auto takes triton for them): forward and
    gradients, batch 2, per-head lists."""
    _needs_fa4()
    sp, tok = _rule_cases()[name]
    assert sp.rule is not None and bool(sp.partial.any())
    s, h, dtype = sp.q_len, 2, torch.bfloat16
    probe = torch.zeros(1, 1, 1, 128, dtype=dtype, device="cuda")
    assert select.choose("auto", probe, sp)[0].name == "triton"  # auto: rules are faster on triton
    backend, _ = select.choose("fa4", probe, sp)
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(2, h, s, 128, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3))
    out = backend.run(q, k, v, sp)
    _assert_matches_reference(out, q, k, v, tok.to("cuda")[None], dtype)  # tok: [1, Hm or 1, S, S]
