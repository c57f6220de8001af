"""Wan-specific behaviour on a tiny WanPipeline (the shared checklist runs in test_adapters.py)."""

import pytest
import torch

import diffattn
from diffattn_testbed.tiny import tiny_wan_pipeline
from families import _wan_call
from helpers import record_steps

pytestmark = pytest.mark.cpu

SPARSE = dict(dense_steps=0, dense_layers=0, block_size=32, decay=0.5)


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


def _call(pipe, **kw):
    return lambda: _wan_call(pipe, **kw)


@pytest.mark.parametrize("method", ["radial", "neighborhood"])
def test_step_index_with_cfg_and_restart(pipe, method):
    with diffattn.apply(pipe, method, dense_steps=1) as handle:
        seen, hook = record_steps(handle, pipe.transformer)
        _call(pipe, steps=3)()
        _call(pipe, steps=2)()
        hook.remove()
        rows = handle.report()
    # CFG: two forwards per step; the second call restarts at step 0
    assert seen == [(0, 3), (0, 3), (1, 3), (1, 3), (2, 3), (2, 3), (0, 2), (0, 2), (1, 2), (1, 2)]
    # dense_steps=1 and Wan's one dense layer: of 10 forwards, 4 dense by step on every layer
    layer0 = [r for r in rows if r["layer"] == 0][0]
    other = [r for r in rows if r["layer"] == 1][0]
    assert (layer0["method_calls"], layer0["dense_calls"]) == (0, 10)
    assert (other["method_calls"], other["dense_calls"]) == (6, 4)


def test_two_experts_share_one_handle_and_step_count():
    pipe = tiny_wan_pipeline(two_experts=True)
    call = _call(pipe, steps=4, guidance=1.0)
    stock = call()
    handle = diffattn.apply(pipe, "radial", **SPARSE)
    assert handle.family == "wan2.2" and len(handle.models) == 2
    assert handle.method.config.block_size == 32  # user value beats the wan2.2 default of 64
    seen1, h1 = record_steps(handle, pipe.transformer)
    seen2, h2 = record_steps(handle, pipe.transformer_2)
    call()
    h1.remove(), h2.remove()
    # the high-noise expert runs the first steps, the low-noise one continues the count
    first, second = [s for s, _ in seen1], [s for s, _ in seen2]
    assert first and second and first + second == [0, 1, 2, 3]
    sites = {r["site"].split(".")[0] for r in handle.report() if r["calls"]}
    assert sites == {"transformer", "transformer_2"}
    diffattn.remove(pipe)
    assert torch.equal(call(), stock)
    for model in (pipe.transformer, pipe.transformer_2):
        assert not any(type(p).__module__.startswith("diffattn") for p in model.attn_processors.values())


def test_last_dense_steps(pipe):
    with diffattn.apply(pipe, "radial", dense_steps=0, dense_layers=0, last_dense_steps=1, block_size=32) as handle:
        _call(pipe, steps=3, guidance=1.0)()
        row = handle.report()[0]
    assert (row["method_calls"], row["dense_calls"]) == (2, 1)


def test_last_dense_steps_on_a_bare_model_says_apply_to_the_pipeline(pipe):
    with diffattn.apply(pipe.transformer, "radial", dense_steps=0, last_dense_steps=1):
        with pytest.raises(ValueError, match="apply diffattn to the pipeline"):
            _call(pipe, steps=1, guidance=1.0)()


def test_i2v_transformer_keeps_image_cross_attention_stock():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64, image_dim=8, added_kv_proj_dim=32,
    ).eval()
    g = torch.Generator().manual_seed(2)
    inputs = dict(
        hidden_states=torch.randn(1, 36, 4, 32, 32, generator=g), timestep=torch.tensor([700]),
        encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
        encoder_hidden_states_image=torch.randn(1, 5, 8, generator=g),
    )
    with torch.no_grad():
        stock = model(**inputs).sample
        with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=64, decay=100.0) as handle:
            assert handle.family == "wan2.1"
            assert all(".attn1." in k for k, p in model.attn_processors.items() if type(p).__module__.startswith("diffattn"))
            full = model(**inputs).sample
        with diffattn.apply(model, "neighborhood", dense_steps=0, dense_layers=0, kernel_size=(3, 7, 7)):
            sparse = model(**inputs).sample
        restored = model(**inputs).sample
    torch.testing.assert_close(full, stock, atol=1e-5, rtol=1e-5)
    assert (sparse - stock).abs().max() > 1e-4
    assert torch.equal(restored, stock)


def test_testbed_pipeline_declares_its_defaults_once():
    """apply() on the testbed pipeline and the CLI read the same defaults (the pipeline's own)."""
    from diffattn_testbed import load_pipeline

    pipe = load_pipeline("video")
    with diffattn.apply(pipe, "radial") as handle:
        assert (handle.method.config.block_size, handle.method.config.dense_steps) == (64, 6)
    with diffattn.apply(pipe, "radial", block_size=32) as handle:
        assert handle.method.config.block_size == 32  # the user's value wins
