"""HunyuanVideo adapter on a tiny HunyuanVideoTransformer3DModel: joint [video; text] attention
with padded text keys."""

import os

import pytest
import torch

import diffattn
from diffattn.core.context import AttnContext
from diffattn.core.layout import TokenLayout
from diffattn.kernels.reference import attention_reference
from diffattn.methods.radial import Radial, RadialConfig
from diffattn.patterns import radial as radial_pattern
from diffattn.patterns.blocks import expand_block_mask
from diffattn_testbed.tiny import tiny_hunyuan_transformer
from helpers import record_steps

pytestmark = pytest.mark.cpu
# forcing backend="triton" on CPU tensors needs Triton's interpreter (tests/conftest.py sets it on
# machines without CUDA, which is where CI runs)
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _inputs(frames=4, size=16, text=12, pad=5, timestep=900.0):
    g = torch.Generator().manual_seed(1)
    b = 2
    mask = torch.ones(b, text, dtype=torch.bool)
    mask[1, text - pad:] = False
    return dict(
        hidden_states=torch.randn(b, 4, frames, size, size, generator=g),
        timestep=torch.full((b,), timestep), encoder_hidden_states=torch.randn(b, text, 16, generator=g),
        encoder_attention_mask=mask, pooled_projections=torch.randn(b, 8, generator=g),
        guidance=torch.full((b,), 6000.0),
    )


@pytest.fixture(scope="module")
def model():
    return tiny_hunyuan_transformer(double_layers=2, single_layers=2)


def _run(model, **kw):
    with torch.no_grad():
        return model(**_inputs(**kw)).sample


def test_targets_skip_the_text_refiner(model):
    procs = diffattn.processors(model, "radial", dense_steps=0)
    try:
        for name, proc in procs.items():
            ours = type(proc).__module__ == "diffattn.pipelines.hunyuan_video"
            assert ours == (not name.startswith("context_embedder")), name
        layers = sorted(p.layer for p in procs.values() if hasattr(p, "layer"))
        assert layers == [0, 1, 2, 3]
    finally:
        diffattn.remove(model)


def test_full_density_equals_stock_with_padded_text(model):
    stock = _run(model)
    assert radial_pattern.block_mask(4, 256, block_size=64, decay=100.0, sink=False, text_tokens=12).all()
    with diffattn.apply(model, "radial", dense_steps=0, block_size=64, decay=100.0):
        applied = _run(model)
    torch.testing.assert_close(applied, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(_run(model), stock)


@needs_interpreter
def test_sparse_joint_attention_matches_reference_and_backends_agree(model):
    shape = dict(frames=5, size=8)  # small: the Triton kernel runs in the interpreter on CPU
    stock = _run(model, **shape)
    outs = {}
    for backend in ("sdpa", "triton"):
        with diffattn.apply(model, "radial", dense_steps=0, block_size=32, decay=0.3, backend=backend):
            outs[backend] = _run(model, **shape)
    assert (outs["sdpa"] - stock).abs().max() > 1e-3
    torch.testing.assert_close(outs["triton"], outs["sdpa"], atol=1e-4, rtol=1e-4)
    assert torch.equal(_run(model, **shape), stock)


def test_method_masks_padded_text_keys():
    layout = TokenLayout(6, 16, 16, text_tokens=12, text_position="after")
    method = Radial(RadialConfig(dense_steps=0, dense_layers=0, block_size=64, decay=0.3, sink=False), backend="sdpa")
    kv_len = torch.tensor([layout.seq_len, layout.seq_len - 5], dtype=torch.int32)
    cache = {}
    ctx = AttnContext(layout, 0, None, 0, kv_len, lambda k, f: cache.setdefault(k, f()), lambda m: None)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    out = method(q, k, v, ctx)
    mask = radial_pattern.block_mask(6, 256, block_size=64, decay=0.3, sink=False, text_tokens=12)
    tok = expand_block_mask(mask, layout.seq_len, layout.seq_len, 64, 64)
    want, _ = attention_reference(q, k, v, tok, kv_len=kv_len)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_family_defaults_and_step_tracking_without_scheduler(model):
    handle = diffattn.apply(model, "radial")
    try:
        assert handle.family == "hunyuan_video"
        c = handle.method.config
        assert (c.dense_steps, c.dense_layers, c.decay, c.block_size, c.sink) == (12, 0, 0.95, 128, False)
        seen, hook = record_steps(handle, model)
        for t in (900.0, 900.0, 600.0, 600.0, 300.0, 950.0, 950.0):
            _run(model, timestep=t)
        hook.remove()
        assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 0, 0]
    finally:
        handle.remove()
