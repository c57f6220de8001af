"""Wan adapter end to end on a tiny WanPipeline built in code."""

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
from diffattn_testbed.tiny import tiny_wan_pipeline
from helpers import record_steps, run_twice_with_remove

pytestmark = pytest.mark.cpu
# forcing backend="triton" on CPU tensors needs Triton's interpreter (tests/conftest.py sets it on
# machines without CUDA, which is where CI runs)
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

SPARSE = dict(dense_steps=0, dense_layers=0, block_size=32, decay=0.5)


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


def _call(pipe, frames=25, size=128, steps=2, guidance=5.0):
    def run():
        return pipe(
            prompt="a red circle moving right", negative_prompt="blue square", height=size, width=size,
            num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames
    return run


def test_dense_config_and_remove_are_exact(pipe):
    # every step dense: the stock path runs unchanged, bit for bit
    stock, applied = run_twice_with_remove(pipe, _call(pipe), "radial", dense_steps=100)
    assert torch.equal(stock, applied)


def test_full_density_equals_stock(pipe):
    # 4 latent frames of 16 x 16 tokens: d <= 3 all kept, a huge decay covers every frame pair
    call = _call(pipe, frames=13, size=256)
    assert radial_pattern.block_mask(4, 256, block_size=64, decay=100.0).all()
    stock, applied = run_twice_with_remove(pipe, call, "radial", dense_steps=0, dense_layers=0, block_size=64, decay=100.0)
    torch.testing.assert_close(applied, stock, atol=1e-5, rtol=1e-5)


def test_sparse_changes_output_and_remove_restores(pipe):
    stock, applied = run_twice_with_remove(pipe, _call(pipe), "radial", **SPARSE)
    assert (applied - stock).abs().max() > 1e-3  # the pattern genuinely changes the computation


@needs_interpreter
def test_backends_agree_inside_the_pipeline(pipe):
    outs = {}
    for backend in ("sdpa", "triton"):
        handle = diffattn.apply(pipe, "radial", backend=backend, **SPARSE)
        outs[backend] = _call(pipe, steps=1, guidance=1.0)()  # the interpreter is slow: one forward
        handle.remove()
    torch.testing.assert_close(outs["triton"], outs["sdpa"], atol=1e-4, rtol=1e-4)


def test_method_equals_token_masked_reference():
    layout = TokenLayout(7, 8, 8)
    method = Radial(RadialConfig(dense_steps=0, dense_layers=0, block_size=32, decay=0.5, sink=True), backend="sdpa")
    cache = {}
    ctx = AttnContext(layout, 0, None, 3, None, lambda k, f: cache.setdefault(k, f()), lambda m: None)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    out = method(q, k, v, ctx)
    mask = radial_pattern.block_mask(7, 64, block_size=32, decay=0.5, sink=True)
    want, _ = attention_reference(q, k, v, expand_block_mask(mask, 448, 448, 32, 32))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert len(cache) == 1


def test_new_frame_count_and_resolution_rederive_masks(pipe):
    with diffattn.apply(pipe, "radial", **SPARSE) as handle:
        first = _call(pipe, frames=25, size=128)()
        second = _call(pipe, frames=17, size=96)()
        layouts = {key[1] for key in handle._cache}
    assert layouts == {TokenLayout(7, 8, 8), TokenLayout(5, 6, 6)}
    with diffattn.apply(pipe, "radial", **SPARSE):
        fresh_second = _call(pipe, frames=17, size=96)()
    with diffattn.apply(pipe, "radial", **SPARSE):
        fresh_first = _call(pipe, frames=25, size=128)()
    assert torch.equal(second, fresh_second) and torch.equal(first, fresh_first)


def test_step_index_with_cfg_and_restart(pipe):
    with diffattn.apply(pipe, "radial", **SPARSE) as handle:
        seen, hook = record_steps(handle, pipe.transformer)
        _call(pipe, steps=3)()
        _call(pipe, steps=2)()
        hook.remove()
    # CFG: two forwards per step; the second call restarts at step 0
    assert seen == [(0, 3), (0, 3), (1, 3), (1, 3), (2, 3), (2, 3), (0, 2), (0, 2), (1, 2), (1, 2)]


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
    diffattn.remove(pipe)
    assert torch.equal(call(), stock)
    for model in (pipe.transformer, pipe.transformer_2):
        assert not any(type(p).__module__.startswith("diffattn") for p in model.attn_processors.values())


def test_last_dense_steps(pipe):
    with diffattn.apply(pipe, "radial", dense_steps=0, dense_layers=0, last_dense_steps=1, block_size=32) as handle:
        active = []
        hook = pipe.transformer.register_forward_hook(
            lambda *_: active.append(handle.method.active(pipe.transformer.blocks[0].attn1.processor.context(handle.state.layout)))
        )
        _call(pipe, steps=3, guidance=1.0)()
        hook.remove()
    assert active == [True, True, False]


def test_processors_dict_is_a_complete_install():
    pipe = tiny_wan_pipeline()
    model = pipe.transformer
    stock = _call(pipe)()
    procs = diffattn.processors(model, "radial", **SPARSE)
    assert set(procs) == set(model.attn_processors)
    assert all(type(p).__module__ == "diffattn.pipelines.wan" for k, p in procs.items() if ".attn1." in k)
    assert all(type(p).__module__.startswith("diffusers") for k, p in procs.items() if ".attn2." in k)
    model.set_attn_processor(procs)
    sparse = _call(pipe)()
    assert (sparse - stock).abs().max() > 1e-3
    diffattn.remove(model)
    assert torch.equal(_call(pipe)(), stock)


def test_apply_twice_says_remove_first(pipe):
    with diffattn.apply(pipe, "radial", **SPARSE):
        with pytest.raises(RuntimeError, match="remove"):
            diffattn.apply(pipe, "radial")
    diffattn.apply(pipe, "radial").remove()  # after remove, apply works again


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
        with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=32, decay=0.2):
            sparse = model(**inputs).sample
        restored = model(**inputs).sample
    torch.testing.assert_close(full, stock, atol=1e-5, rtol=1e-5)
    assert (sparse - stock).abs().max() > 1e-4
    assert torch.equal(restored, stock)
