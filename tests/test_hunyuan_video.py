"""HunyuanVideo-specific behaviour on a tiny transformer: joint [video; text] attention with padded
text keys (the shared checklist runs in test_adapters.py)."""

import pytest
import torch

import diffattn
from diffattn.core.layout import TokenLayout
from diffattn.kernels.reference import attention_reference
from diffattn.methods.radial import Radial, RadialConfig
from diffattn_testbed.tiny import tiny_hunyuan_transformer
from families import hunyuan_inputs
from helpers import record_steps
from testers import make_context

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def model():
    return tiny_hunyuan_transformer(double_layers=2, single_layers=2)


def _run(model, **kw):
    with torch.no_grad():
        return model(**hunyuan_inputs(**kw)).sample


def test_targets_skip_the_text_refiner_and_number_layers_like_the_reference(model):
    procs = diffattn.processors(model, "radial", dense_steps=0)
    try:
        layers = sorted(p.layer for p in procs.values() if hasattr(p, "layer"))
        assert layers == [0, 1, 2, 3]
        assert all(not k.startswith("context_embedder") for k, p in procs.items() if hasattr(p, "layer"))
    finally:
        diffattn.remove(model)


@pytest.mark.parametrize("method,options", [
    ("radial", dict(block_size=64, decay=0.3, sink=False)),
    ("neighborhood", dict(kernel_size=(3, 5, 7), stride=(1, 2, 1))),
])
def test_method_masks_padded_text_keys(method, options):
    from diffattn.methods import METHODS

    layout = TokenLayout(6, 16, 16, text_tokens=12, text_position="after")
    m = METHODS[method].from_options("hunyuan_video", backend="sdpa", dense_steps=0, **options)
    kv_len = torch.tensor([layout.seq_len, layout.seq_len - 5], dtype=torch.int32)
    ctx, _ = make_context(layout, kv_len)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    want, _ = attention_reference(q, k, v, m.reference_mask(layout), kv_len=kv_len)
    torch.testing.assert_close(m(q, k, v, ctx), want, atol=1e-5, rtol=1e-5)


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


def test_neighborhood_preset_follows_the_grid(model):
    with diffattn.apply(model, "neighborhood", dense_steps=0) as handle:
        _run(model, frames=6, size=16)
        spec = handle.method.spec(handle.state.layout)
    # the GNA HunyuanVideo preset (18, 24, 24) / (16, 8, 8) on (30, 48, 80), rescaled to (6, 16, 16)
    assert spec.kernel == (4, 8, 5) and spec.stride == (3, 3, 2)
