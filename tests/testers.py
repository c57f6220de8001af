"""Shared testers: a new method, model family or backend gets the whole checklist by declaring
itself, never by copying tests.

- ``AdapterTester``: one test class per (family x method). Declare ``family`` (a ``Family``: how to
  build the tiny model and call it) and ``method`` with ``sparse`` (options that change the output),
  ``full`` (options whose pattern covers everything: must equal stock to 1e-5) and optionally
  ``other`` (a second layout). Checks: dense schedule == stock bit for bit, full density == stock,
  sparse differs and ``remove`` restores bit for bit, apply twice raises, ``processors`` +
  ``set_attn_processor`` is a complete install, an unset ``processors`` dict blocks nothing, a layout
  change re-derives descriptions (== fresh handles), the report lists every target site, and the
  Triton kernel (interpreter on CPU) agrees with SDPA inside the model.
- ``MethodTester``: declare ``method`` and ``cases`` [(layout, options)]; checks the method's SDPA
  and Triton paths against its token-level reference (``method.reference_mask``) on fresh random
  inputs with padded keys, and that ``full_options`` reproduces dense attention.
- ``BackendTester``: every backend vs the fp32 reference on descriptions with every element rule.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import diffattn
from diffattn.core.context import AttnContext
from diffattn.kernels import PRECISIONS
from diffattn.kernels.reference import attention_reference
from diffattn.methods import METHODS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest on CPU machines)")


@dataclass
class Family:
    """How the testers build and call one model family at toy size.

    build():              the target diffattn is applied to (a pipeline or a model).
    call(target, **shape): one deterministic run -> a tensor (latents / model output).
    models(target):       the nn.Modules diffattn installs on.
    shape / other_shape:  two call shapes with different layouts (the second smaller: the Triton
                          interpreter runs the ``small`` shape).
    """

    name: str
    build: Callable[[], Any]
    call: Callable[..., torch.Tensor]
    models: Callable[[Any], list]
    shape: dict = field(default_factory=dict)
    other_shape: dict = field(default_factory=dict)
    small: dict = field(default_factory=dict)
    ours: Callable[[str], bool] = lambda key: True  # processor keys diffattn replaces


def _ours(processor) -> bool:
    return type(processor).__module__.startswith("diffattn")


class AdapterTester:
    family: Family
    method: str
    sparse: dict
    full: dict | None  # None: the method has no full-density setting (an approximation, e.g. agent)
    dense: dict = {"dense_steps": 10_000}
    needs_pipeline: bool = False  # the method needs the pipeline's step count (rau-net): processors() on a bare model raises
    full_shape: dict = {}  # a call shape where ``full`` covers every pair (default: the family's)

    @pytest.fixture(scope="class")
    def target(self):
        return self.family.build()

    def run(self, target, **shape):
        with torch.no_grad():
            return self.family.call(target, **{**self.family.shape, **shape})

    def test_dense_schedule_equals_stock_and_remove_is_exact(self, target):
        stock = self.run(target)
        with diffattn.apply(target, self.method, **{**self.sparse, **self.dense}) as handle:
            applied = self.run(target)
        assert torch.equal(applied, stock)
        assert torch.equal(self.run(target), stock)
        rows = handle.report()
        assert rows and all(r["method_calls"] == 0 and r["dense_calls"] > 0 for r in rows)

    def test_full_density_equals_stock(self, target):
        if self.full is None:
            pytest.skip(f"{self.method} has no full-density setting; its own tests check it against its formula")
        stock = self.run(target, **self.full_shape)
        with diffattn.apply(target, self.method, **self.full) as handle:
            applied = self.run(target, **self.full_shape)
        torch.testing.assert_close(applied, stock, atol=1e-5, rtol=1e-5)
        assert handle.summary()["density"] == pytest.approx(1.0)

    def test_sparse_changes_output_and_remove_restores(self, target):
        stock = self.run(target)
        handle = diffattn.apply(target, self.method, **self.sparse)
        try:
            applied = self.run(target)
        finally:
            handle.remove()
        assert (applied - stock).abs().max() > 1e-4, "the pattern must change the computation"
        assert torch.equal(self.run(target), stock), "remove() did not restore the stock output bit for bit"
        for model in self.family.models(target):
            assert not any(_ours(p) for p in diffattn.attn_processors(model).values())
            assert not hasattr(model, "_diffattn_handle")

    def test_apply_twice_says_remove_first(self, target):
        with diffattn.apply(target, self.method, **self.sparse):
            with pytest.raises(RuntimeError, match="remove"):
                diffattn.apply(target, self.method, **self.sparse)
        diffattn.apply(target, self.method, **self.sparse).remove()  # after remove, apply works again

    def test_processors_dict_is_a_complete_install(self, target):
        stock = self.run(target)
        model = self.family.models(target)[0]
        procs = diffattn.processors(model, self.method, **self.sparse)
        if self.needs_pipeline:
            diffattn.set_attn_processors(model, procs)
            try:
                with pytest.raises(ValueError, match="apply diffattn to the pipeline"):
                    self.run(target)
            finally:
                diffattn.remove(model)
            assert torch.equal(self.run(target), stock)
            return
        assert set(procs) == set(diffattn.attn_processors(model))
        for key, proc in procs.items():
            assert _ours(proc) == self.family.ours(key), key
        diffattn.set_attn_processors(model, procs)  # model.set_attn_processor where diffusers has it
        if len(self.family.models(target)) == 1:
            assert (self.run(target) - stock).abs().max() > 1e-4
        diffattn.remove(model)
        assert torch.equal(self.run(target), stock)

    def test_unset_processors_dict_blocks_nothing(self, target):
        model = self.family.models(target)[0]
        diffattn.processors(model, self.method, **self.sparse)  # never set
        stock = self.run(target)
        with diffattn.apply(target, self.method, **self.sparse):
            assert (self.run(target) - stock).abs().max() > 1e-4
        assert torch.equal(self.run(target), stock)

    def test_layout_change_rederives_descriptions(self, target):
        def grids(handle):
            return {(r["site"], r["layout"].frames, r["layout"].rows, r["layout"].cols) for r in handle.report() if r["layout"] is not None}

        with diffattn.apply(target, self.method, **self.sparse) as handle:
            first = self.run(target)
            second = self.run(target, **self.family.other_shape)
            seen = grids(handle)  # the report keeps each site's last layout
        with diffattn.apply(target, self.method, **self.sparse) as handle:
            fresh_second = self.run(target, **self.family.other_shape)
            assert grids(handle) == seen
        with diffattn.apply(target, self.method, **self.sparse):
            fresh_first = self.run(target)
        assert torch.equal(second, fresh_second) and torch.equal(first, fresh_first)

    def test_report_lists_every_target_site(self, target):
        with diffattn.apply(target, self.method, **self.sparse) as handle:
            self.run(target)
            rows = handle.report()
        expected = sum(sum(1 for k in diffattn.attn_processors(m) if self.family.ours(k)) for m in self.family.models(target))
        assert len([r for r in rows if r["layer"] >= 0]) == expected  # layer -1: structural rows (RAU-Net)
        assert any(r["method_calls"] for r in rows)
        for r in rows:
            if r["layer"] < 0:
                continue
            if r["method_calls"]:
                assert r["backends"] and 0 < r["density"] <= 1 and r["layout"] is not None

    @needs_interpreter
    def test_triton_agrees_with_sdpa_in_the_model(self, target):
        if "backend" not in getattr(diffattn.config_class(self.method), "__dataclass_fields__", {}) and "backend" not in getattr(METHODS.get(self.method), "KNOBS", ()):
            pytest.skip(f"{self.method} runs no block-sparse kernel (no backend knob)")
        outs = {}
        for backend in ("sdpa", "triton"):
            with diffattn.apply(target, self.method, backend=backend, **self.sparse) as handle:
                outs[backend] = self.run(target, **self.family.small)
                assert set(handle.summary()["backends"]) == {backend}
        torch.testing.assert_close(outs["triton"], outs["sdpa"], atol=1e-4, rtol=1e-4)


def make_context(layout, kv_len=None, layer=0, step=0):
    """An AttnContext with a plain dict as the cache (what a handle would hold)."""
    cache = {}

    def lookup(key, build):
        if key not in cache:
            cache[key] = build()
        return cache[key]

    return AttnContext(layout, step, None, layer, "test", kv_len, lookup), cache


class MethodTester:
    method: str
    family: str = "wan2.1"
    cases: list  # [(TokenLayout, options)]
    full_cases: list = []  # [(TokenLayout, options)] whose pattern covers every pair

    def build(self, options, backend):
        return METHODS[self.method].from_options(self.family, backend=backend, **{"dense_steps": 0, "dense_layers": 0, **options})

    @pytest.mark.parametrize("case", range(8))
    def test_sdpa_path_equals_token_reference(self, case):
        self._check(case, "sdpa")

    @needs_interpreter
    @pytest.mark.parametrize("case", range(8))
    def test_triton_path_equals_token_reference(self, case):
        self._check(case, "triton", heads=1)

    def _check(self, case, backend, heads=2):
        if case >= len(self.cases):
            pytest.skip("fewer cases declared")
        layout, options = self.cases[case]
        method = self.build(options, backend)
        g = torch.Generator().manual_seed(1000 + case)
        s = layout.seq_len
        kv_len = torch.tensor([s, s - min(3, layout.text_tokens)], dtype=torch.int32) if layout.text_position == "after" else None
        ctx, cache = make_context(layout, kv_len)
        q, k, v = (torch.randn(2, heads, s, 16, generator=g) for _ in range(3))
        out = method(q, k, v, ctx)
        k_ref, v_ref = method.reference_keys(k, v, layout)
        want, _ = attention_reference(q, k_ref, v_ref, method.reference_mask(layout), kv_len=kv_len)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
        assert len(cache) >= 1  # the description came from the handle's cache

    @needs_interpreter
    def test_8bit_path_is_close_and_only_on_triton(self):
        # the precision knob reaches the kernel (the output moves, by about the 8-bit error) and no
        # other backend takes it
        layout, options = self.cases[0]
        s = layout.seq_len
        g = torch.Generator().manual_seed(77)
        q, k, v = (torch.randn(1, 1, s, 32, generator=g) for _ in range(3))
        want = self.build(options, "triton")(q, k, v, make_context(layout)[0])
        for precision in PRECISIONS:
            method = METHODS[self.method].from_options(self.family, backend="triton", precision=precision,
                                                       **{"dense_steps": 0, "dense_layers": 0, **options})
            assert f"precision={precision!r}" in repr(method)
            facts = []
            ctx = dataclasses.replace(make_context(layout)[0], record=lambda site, **f: facts.append(f))
            with torch.no_grad():
                out = method(q, k, v, ctx)
            assert facts[-1]["backend"] == f"triton:{precision}"  # handle.report() names the 8-bit mode
            rel = ((out - want).norm() / want.norm()).item()
            assert 0 < rel < 0.06, f"{self.method} precision={precision}: relative error {rel:.4f} against fp32"
            with pytest.raises(NotImplementedError, match="triton backend"):
                METHODS[self.method].from_options(self.family, backend="sdpa", precision=precision, **options)(q, k, v, make_context(layout)[0])
        with pytest.raises(ValueError, match="precision must be one of"):
            METHODS[self.method].from_options(self.family, precision="int4", **options)

    def test_full_pattern_equals_dense_attention(self):
        for layout, options in self.full_cases:
            method = self.build(options, "sdpa")
            ctx, _ = make_context(layout)
            q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
            torch.testing.assert_close(method(q, k, v, ctx), torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
            assert method.density(layout) == pytest.approx(1.0)


class BackendTester:
    """Declare ``cases()`` -> [(name, BlockSparsity, token mask [S, S] or [H, S, S])]."""

    def cases(self):
        raise NotImplementedError

    def _inputs(self, desc, seed, grad=False):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(2, 2, desc.q_len, 16, generator=g).requires_grad_(grad) for _ in range(3)]

    def _kv_len(self, desc):
        # padded text of the second sample (the word-level key bound: test_bits_where_matches_torch_*)
        return torch.tensor([desc.kv_len, desc.kv_len - 3], dtype=torch.int32)

    def test_sdpa_equals_reference(self):
        from diffattn.kernels import sdpa

        for i, (name, desc, tok) in enumerate(self.cases()):
            q, k, v = self._inputs(desc, i)
            kv_len = self._kv_len(desc)
            want, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
            torch.testing.assert_close(sdpa.sdpa_block_sparse(q, k, v, desc, kv_len=kv_len), want, atol=2e-5, rtol=1e-5, msg=name)

    def test_flex_equals_reference(self):
        # the eager flex_attention on CPU (forward only there); CUDA runs the compiled kernel
        from torch.nn.attention.flex_attention import flex_attention

        from diffattn.kernels.flex import FlexBackend

        for i, (name, desc, tok) in enumerate(self.cases()):
            q, k, v = self._inputs(desc, i)
            kv_len = self._kv_len(desc)
            runner = FlexBackend(desc, "cpu", compiled=flex_attention, text_key_start=0)
            want, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
            torch.testing.assert_close(runner(q, k, v, kv_len=kv_len), want, atol=2e-5, rtol=1e-5, msg=name)

    @needs_interpreter
    def test_triton_equals_reference_with_gradients(self):
        from diffattn.kernels import block_sparse

        rule_cases = 0
        for i, (name, desc, tok) in enumerate(self.cases()):
            # element rules both ways: per-block bits (the default; with and without per-batch key
            # lengths; without them partial blocks may skip the key bound: both kernel variants) and the
            # per-score rule. Every rule case runs the default and one other mode, in turn (CI time)
            modes = [("bits", True, None), ("bits", False, False), ("bits", False, True), ("rule", True, None)]
            ran = modes[:1] if desc.rule is None else [modes[0], modes[1 + rule_cases % 3]]
            rule_cases += desc.rule is not None
            for mode, padded, bound in ran:
                q, k, v = self._inputs(desc, i, grad=True)
                kv_len = self._kv_len(desc) if padded else None
                out = block_sparse.block_sparse_attention(q, k, v, desc, kv_len=kv_len, element_mask=mode, bound_partial=bound)
                want, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
                torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5, msg=f"{name} ({mode}, kv_len={padded}, bound={bound})")
                g = torch.randn_like(out)
                for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
                    torch.testing.assert_close(a, r, atol=5e-5, rtol=1e-5, msg=f"{name} ({mode}, kv_len={padded}, bound={bound})")

    @needs_interpreter
    def test_triton_8bit_close_to_its_twin(self):
        # the 8-bit forward on every element rule: as close to the fp32 reference as its twin
        # (kernels.reference.quantized_reference) is, which differs only in where P is rounded
        from diffattn.kernels import block_sparse
        from diffattn.kernels.reference import quantized_reference

        ran = 0
        for i, (name, desc, tok) in enumerate(self.cases()):
            q, k, v = self._inputs(desc, i)
            kv_len = self._kv_len(desc)
            if desc.block_n < 32:  # the 8-bit MMA sums over >= 32 keys: refused with the reason
                with pytest.raises(NotImplementedError, match="at least 32"):
                    block_sparse.block_sparse_attention(q, k, v, desc, precision="int8")
                continue
            ran += desc.rule is not None
            want, want_lse = attention_reference(q, k, v, tok, kv_len=kv_len)
            for precision in (PRECISIONS[ran % len(PRECISIONS)],):  # the cases take turns (CI time); all run at every size in test_kernels
                out, lse = block_sparse.block_sparse_attention(q, k, v, desc, kv_len=kv_len, precision=precision, return_lse=True)
                twin, twin_lse = quantized_reference(q, k, v, precision, desc.block_m, desc.block_n, tok, kv_len)
                err, twin_err = ((out - want).norm() / want.norm()).item(), ((twin - want).norm() / want.norm()).item()
                assert err <= 1.5 * twin_err + 1e-3 and ((out - twin).norm() / twin.norm()).item() < 0.03, f"{name} {precision}: {err=:.4f} {twin_err=:.4f}"
                torch.testing.assert_close(lse, twin_lse, atol=1e-3, rtol=1e-4, msg=f"{name} {precision} lse")
        assert ran, "declare a case with key blocks of 32 or more and an element rule"

    @needs_interpreter
    def test_bits_equal_the_rule(self):
        # every bit of every partial block equals the rule's torch twin at that (query, key)
        from diffattn.kernels import block_sparse

        for name, desc, tok in self.cases():
            if desc.rule is None:
                continue
            packed = block_sparse.element_bits(desc)
            hm, nq, width, bm, words = packed.bits.shape
            lanes = torch.arange(32, dtype=torch.int32)
            for h in range(hm):
                for qb in range(nq):
                    for j in range(int(desc.part_num[h, qb])):
                        kb = int(desc.part_idx[h, qb, j])
                        got = ((packed.bits[h, qb, j][..., None] >> lanes) & 1).bool().reshape(bm, -1)[:, : desc.block_n]
                        rows = slice(qb * bm, min((qb + 1) * bm, desc.q_len))
                        cols = slice(kb * desc.block_n, min((kb + 1) * desc.block_n, desc.kv_len))
                        want = tok[min(h, tok.shape[0] - 1), rows, cols] if tok.dim() == 3 else tok[rows, cols]
                        n_r, n_c = want.shape
                        assert torch.equal(got[:n_r, :n_c], want), f"{name}: bits of block ({qb}, {kb})"
                        assert not got[:, n_c:].any(), f"{name}: bits past the sequence in block ({qb}, {kb})"
                        assert not got[n_r:].any(), f"{name}: bits of queries past the sequence in block ({qb}, {kb})"
                # the transposed lists find each pair's slot in the query block's list
                for kb in range(desc.num_kv_blocks):
                    for i in range(int(desc.q_part_num[h, kb])):
                        qb, j = int(desc.q_part_idx[h, kb, i]), int(packed.q_part_slot[h, kb, i])
                        assert int(desc.part_idx[h, qb, j]) == kb, f"{name}: slot of ({qb}, {kb})"


# -- guidance -----------------------------------------------------------------------------------

class GuidanceTester:
    """One class per model family: guidance on a model called alone (every row conditional, so the
    output must be ``c + s (c - weak)``, the formula without CFG). Declare ``family`` and optionally
    ``method`` / ``method_options`` (an attention method that guidance must compose with).
    Checks: the output is the formula for SoftPAG, STG and SEG, and ``remove`` restores bit for bit;
    the blend is linear in u (the core output at the perturbed layer under ``handle.weak``); joint
    and separate batching agree; the shared prefix changes nothing and is used; STG's skipped block
    hands its input on; out-of-range layers and heads name the valid range; composed with a method,
    the output is that formula around the method's own outputs."""

    family: Family
    method: str | None = None
    method_options: dict = {}

    @pytest.fixture(scope="class")
    def target(self):
        return self.family.build()

    def run(self, target):
        with torch.no_grad():
            return self.family.call(target, **self.family.shape)

    def info(self, target):
        from diffattn.pipelines.guidance import model_info

        model = self.family.models(target)[0]
        return model_info(model, diffattn._adapter_of(model), diffattn.detect_family(target))

    def guided_and_weak(self, target, method, **options):
        handle = diffattn.apply(target, method, **options)
        try:
            out = self.run(target)
            with handle.weak():
                weak = self.run(target)
            summary = handle.summary()
        finally:
            handle.remove()
        return out, weak, summary

    def test_output_is_the_formula_and_remove_is_exact(self, target):
        stock = self.run(target)
        layer = self.info(target).layers // 2
        for name, options in (("soft-pag", dict(u=0.7)), ("stg", {}), ("seg", dict(sigma=1.0))):
            out, weak, summary = self.guided_and_weak(target, name, scale=2.0, layers=[layer], **options)
            assert (weak - stock).abs().max() > 1e-5, f"{name}: the weak branch must differ from the model"
            torch.testing.assert_close(out, stock + 2.0 * (stock - weak), atol=1e-5, rtol=1e-5)
            assert summary["guidance"]["weak_forwards"] >= 1
            assert torch.equal(self.run(target), stock), f"{name}: remove() did not restore the stock output bit for bit"
        for model in self.family.models(target):
            assert not hasattr(model, "_diffattn_handle") and "forward" not in vars(model)

    def test_blend_is_linear_in_u(self, target):
        layer = self.info(target).layers - 1
        captured = {}
        for u in (1.0, 0.5, 0.25):
            with diffattn.apply(target, "soft-pag", u=u, layers=[layer]) as handle:
                sites = [r["site"] for r in handle.report() if r["layer"] == layer]
                with handle.weak(), handle.capture(sites) as kept:
                    self.run(target)
                captured[u] = {s: t.float() for s, t in kept.items()}
        for site in captured[1.0]:
            v, half = captured[1.0][site], captured[0.5][site]
            o = 2 * half - v  # the unperturbed output, from u = 0.5 = (O + V) / 2
            torch.testing.assert_close(captured[0.25][site], 0.75 * o + 0.25 * v, atol=1e-5, rtol=1e-4)

    def test_joint_equals_separate_and_the_prefix_is_shared(self, target):
        layer = self.info(target).layers - 1
        outs = {}
        for batch, share in (("joint", True), ("separate", False), ("separate", True)):
            with diffattn.apply(target, "soft-pag", u=0.6, layers=[layer], batch=batch, share_prefix=share) as handle:
                outs[batch, share] = self.run(target)
                stats = handle.summary()["guidance"]
            if batch == "separate" and share and layer > 0:
                assert stats["prefix_blocks_reused"] > 0
        torch.testing.assert_close(outs["joint", True], outs["separate", False], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs["separate", True], outs["separate", False], atol=1e-6, rtol=1e-6)

    def test_skipped_block_hands_its_input_on(self, target):
        from diffattn.pipelines.guidance import blocks_of

        model = self.family.models(target)[0]
        blocks = blocks_of(model, diffattn._adapter_of(model))
        pairs = [l for l in sorted(blocks) if l + 1 in blocks and type(blocks[l][1]) is type(blocks[l + 1][1])
                 and blocks[l][1] is not blocks[l + 1][1]]
        if not pairs:
            pytest.skip("no two consecutive blocks of one class")
        layer = pairs[0]
        seen = {}

        def keep(name):
            def hook(module, args, kwargs):
                seen[name] = (kwargs.get("hidden_states", args[0] if args else None)).clone()
            return hook

        hooks = [blocks[layer][1].register_forward_pre_hook(keep("skipped"), with_kwargs=True),
                 blocks[layer + 1][1].register_forward_pre_hook(keep("next"), with_kwargs=True)]
        try:
            with diffattn.apply(target, "stg", layers=[layer]) as handle, handle.weak():
                self.run(target)
        finally:
            for h in hooks:
                h.remove()
        assert torch.equal(seen["skipped"], seen["next"])

    def test_out_of_range_layers_and_heads_name_the_range(self, target):
        info = self.info(target)
        with pytest.raises(ValueError, match=rf"0\.\.{info.layers - 1}"):
            diffattn.apply(target, "pag", layers=[info.layers])
        with pytest.raises(ValueError, match=rf"heads 0\.\.{info.heads[0] - 1}"):
            diffattn.apply(target, "headhunter", heads=[(0, info.heads[0])])
        for model in self.family.models(target):
            assert not hasattr(model, "_diffattn_handle")

    def test_composes_with_the_method(self, target):
        if self.method is None:
            pytest.skip("no attention method declared for this family")
        with diffattn.apply(target, self.method, **self.method_options) as handle:
            alone = self.run(target)
        layer = self.info(target).layers - 1
        out, weak, summary = self.guided_and_weak(
            target, self.method, **self.method_options, guidance=diffattn.guide("soft-pag", u=0.5, scale=1.5, layers=[layer]))
        assert summary["method_calls"] > 0
        torch.testing.assert_close(out, alone + 1.5 * (alone - weak), atol=1e-5, rtol=1e-5)
