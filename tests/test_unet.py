"""U-Net methods: windows, token merging, agent attention and RAU-Net against their references,
presets, composition, determinism and bad input (the adapter checklist is in test_adapters.py)."""

from __future__ import annotations

import math

import pytest
import torch

import diffattn
from diffattn.core.context import AttnContext
from diffattn.core.layout import TokenLayout
from diffattn.kernels.reference import attention_reference
from diffattn.methods import METHODS, method_class
from diffattn.methods.agent import agent_attention, agent_reference
from diffattn.patterns import merge, windows
from families import SD_UNET, SDXL_UNET

pytestmark = pytest.mark.cpu


def ctx_for(rows, cols, *, step=0, num_steps=None, layer=0, level=0, latent=None, native=(32, 32), block_input=None):
    return AttnContext(TokenLayout(1, rows, cols), step, num_steps, layer, "test", level=level,
                       latent=latent or (rows, cols), native=native, block_input=block_input)


# -- windows --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,k", [(8, 8, 0), (8, 8, 1), (16, 12, 2), (9, 7, 3), (5, 11, 1), (2, 3, 2)])
def test_window_partition_round_trip_and_reference(rows, cols, k):
    g = torch.Generator().manual_seed(rows * 100 + cols * 10 + k)
    q, kk, v = (torch.randn(2, 3, rows * cols, 8, generator=g) for _ in range(3))
    method = METHODS["msw-msa"].from_options("sd1.5", shifts="cyclic")
    (qw, kw, vw), mask, (wh, ww) = method.split([q, kk, v], rows, cols, k)
    assert qw.shape == (8, 3, wh * ww, 8)
    assert torch.equal(method.join(qw, rows, cols, k), q)  # exact inverse
    out = method.join(torch.nn.functional.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask), rows, cols, k)
    want, _ = attention_reference(q, kk, v, windows.token_mask(rows, cols, k))
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


def test_window_geometry_matches_upstream():
    # SD1.5 at 1024 px: top level 128 x 128 -> windows 64 x 64, shifts 0, 16, 32, 48
    assert windows.window_size(128, 128) == (64, 64)
    assert [windows.shift(k, 128, 128) for k in range(4)] == [(0, 0), (16, 16), (32, 32), (48, 48)]
    ids = windows.window_ids(4, 4, 0).reshape(4, 4)
    assert ids.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_msw_msa_method_equals_window_reference_and_shifts_are_seeded():
    rows, cols = 12, 10
    q, k, v = (torch.randn(2, 2, rows * cols, 8) for _ in range(3))
    method = METHODS["msw-msa"].from_options("sd1.5", seed=7)
    seen = set()
    for step in range(12):
        ctx = ctx_for(rows, cols, step=step)
        shift = method.shift_index(ctx)
        assert shift == method.shift_index(ctx)  # a pure function of (seed, step, layer)
        seen.add(shift)
        want, _ = attention_reference(q, k, v, windows.token_mask(rows, cols, shift))
        torch.testing.assert_close(method(q, k, v, ctx), want, atol=2e-5, rtol=1e-5)
    assert len(seen) > 1  # the random schedule moves the windows
    cyclic = METHODS["msw-msa"].from_options("sd1.5", shifts="cyclic")
    assert [cyclic.shift_index(ctx_for(8, 8, step=s)) for s in range(5)] == [0, 1, 2, 3, 0]
    assert not method.call_active(ctx_for(8, 8, level=1))  # only the top level by default


# -- token merging -------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,sx,sy,ratio,rand", [(8, 8, 2, 2, 0.5, False), (9, 7, 2, 2, 0.4, True), (8, 12, 4, 4, 0.9, True)])
def test_merge_unmerge_equal_their_matrices(rows, cols, sx, sy, ratio, rand):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, rows * cols, 6, generator=g)
    metric = torch.randn(2, rows * cols, 4, generator=g)
    ranking = merge.rank(metric, rows, cols, sx, sy, torch.Generator().manual_seed(1) if rand else None)
    plan = ranking.plan(int(rows * cols * ratio))
    m, u = plan.matrices()
    assert plan.merge(x).shape == (2, plan.merged_len, 6)
    torch.testing.assert_close(plan.merge(x), m @ x, atol=1e-5, rtol=1e-5)
    y = torch.randn(2, plan.merged_len, 6, generator=g)
    torch.testing.assert_close(plan.unmerge(y), u @ y, atol=0, rtol=0)
    # every destination keeps its place in its own group; merged sources join their best destination
    assert plan.r == min(int(rows * cols * ratio), ranking.src.numel())


def test_merge_picks_the_most_similar_sources():
    # sources identical to a destination merge first; the others stay
    rows = cols = 4
    metric = torch.randn(1, 16, 8)
    src, dst = merge.split_indices(rows, cols, 2, 2, None, "cpu")
    metric[0, src[0]] = metric[0, dst[0]]
    plan = merge.rank(metric, rows, cols, 2, 2).plan(1)
    assert int(src[plan.merged[0, 0]]) == int(src[0]) and int(plan.target[0, 0]) == 0


def test_tome_method_equals_merged_attention_reference():
    rows, cols = 8, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 64, 8, generator=g) for _ in range(3))
    metric = torch.randn(2, 64, 16, generator=g)
    method = METHODS["tome"].from_options("sd1.5", ratio=0.5, use_rand=False)
    ctx = ctx_for(rows, cols, block_input=metric)
    plan = merge.rank(metric, rows, cols, 2, 2).plan(32)
    m, u = plan.matrices()
    qm, km, vm = ((m[:, None] @ t) for t in (q, k, v))  # [B, H, N', D]
    want = u[:, None] @ torch.softmax(qm @ km.transpose(-1, -2) / math.sqrt(8), -1) @ vm
    torch.testing.assert_close(method(q, k, v, ctx), want, atol=2e-5, rtol=1e-5)


def test_tome_ratio_beyond_every_source_raises():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.750\]"):
        METHODS["tome"].from_options("sd1.5", ratio=0.8)


# -- agent attention -----------------------------------------------------------------------------

@pytest.mark.parametrize("fp32", [False, True])
def test_agent_attention_equals_its_formula(fp32):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g) for _ in range(3))
    agents = torch.randn(2, 2, 6, 16, generator=g)
    got = agent_attention(q, k, v, agents, 0.3, 0.075, fp32)
    torch.testing.assert_close(got.double(), agent_reference(q, k, v, agents, 0.3, 0.075), atol=1e-5, rtol=1e-5)


def test_agent_method_uses_merged_queries_as_agents():
    rows = cols = 8
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 64, 8, generator=g) for _ in range(3))
    metric = torch.randn(2, 64, 16, generator=g)
    method = METHODS["agent"].from_options("sd1.5", use_rand=False, end=1.0)
    out = method(q, k, v, ctx_for(rows, cols, block_input=metric))
    ranking = merge.rank(metric, rows, cols, 4, 4)
    plan = ranking.plan(min(ranking.src.numel(), int(64 * 0.95)))  # every source merged: 64 / 16 agents
    assert plan.merged_len == 4
    m, _ = plan.matrices()
    want = agent_reference(q, k, v, m[:, None] @ q, 0.3, 0.075)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    pooled = METHODS["agent"].from_options("sd1.5", agents="pool", end=1.0)
    agents = torch.nn.functional.adaptive_avg_pool2d(q.reshape(4, 8, 8, 8).permute(0, 3, 1, 2), (2, 2)).flatten(2).transpose(1, 2).reshape(2, 2, 4, 8)
    torch.testing.assert_close(pooled(q, k, v, ctx_for(rows, cols)).double(), agent_reference(q, k, v, agents, 0.3, 0.075), atol=1e-5, rtol=1e-5)


def test_agent_runs_early_steps_only_by_default():
    method = METHODS["agent"].from_options("sd1.5")
    assert method.call_active(ctx_for(8, 8, step=3, num_steps=10))
    assert not method.call_active(ctx_for(8, 8, step=4, num_steps=10))
    assert METHODS["agent"].from_options("sd2.1").fp32 and not method.fp32


# -- RAU-Net -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 17, 30, 33])
def test_rad_is_the_stock_conv_on_every_other_pixel(size):
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(1, 3, size, size + 3)
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2)
    torch.testing.assert_close(conv(x[:, :, ::2, ::2]), want, atol=1e-5, rtol=1e-5)


def plan_at(family, scale, step, n, **options):
    method = METHODS["rau-net"].from_options(family, **options)
    native = (128, 128) if family.startswith("sdxl") else (64, 64)
    latent = (int(native[0] * scale), int(native[1] * scale))
    p = method.plan(AttnContext(TokenLayout(1, *latent), step, n, 0, latent=latent, native=native))
    return p.rad, p.pool


def test_rau_net_presets_follow_upstream_timelines():
    # SD1.5 @1024 (2x): RAD steps 0-19 of 50; @2048 (4x): RAD 0-34 and pool 0-14
    assert [plan_at("sd1.5", 2, s, 50) for s in (0, 19, 20)] == [(True, False), (True, False), (False, False)]
    assert [plan_at("sd1.5", 4, s, 50) for s in (14, 15, 34, 35)] == [(True, True), (True, False), (True, False), (False, False)]
    # SDXL @2048 (aggressive): RAD 0-7, pool 8-19; @4096: RAD 0-14 with pool 0-34
    assert [plan_at("sdxl", 2, s, 50) for s in (7, 8, 19, 20)] == [(True, False), (False, True), (False, True), (False, False)]
    assert plan_at("sdxl", 2, 5, 50, aggressive=False) == (False, True)
    assert [plan_at("sdxl", 4, s, 50) for s in (14, 15, 35)] == [(True, True), (False, True), (False, False)]
    assert [plan_at("sdxl-turbo", 2, s, 4) for s in (0, 1, 2)] == [(False, True), (False, True), (False, False)]
    assert plan_at("sd1.5", 1, 0, 50) == (False, False)  # the guard: at the trained size the plain U-Net runs
    assert plan_at("sd1.5", 1, 0, 50, min_scale=0) == (True, False)


def sd_run(pipe, size=256, steps=3, seed=0, **kw):
    return pipe(prompt="a red circle", height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
                output_type="latent", generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.fixture(scope="module")
def sd():
    return SD_UNET.build()


def test_rau_net_shrinks_the_deep_levels(sd):
    with diffattn.apply(sd, "rau-net", t1=1.0, t2=1.0) as handle:
        sd_run(sd, steps=1)
        grids = {r["site"].removeprefix("unet."): (r["layout"].rows, r["layout"].cols) for r in handle.report() if r["layer"] >= 0}
    # latent 64: RAD after level 0 gives level 1 a 16 x 16 map (32 x 32 stock), pooled to 8 x 8 after its
    # attention; the up path meets 8 x 8, restores 16 x 16 before the full-size skip, then x4 to 64 x 64
    first = "attentions.0.transformer_blocks.0.attn1.processor"
    assert grids[f"down_blocks.0.{first}"] == (64, 64) and grids[f"down_blocks.1.{first}"] == (16, 16)
    assert grids[f"mid_block.{first}"] == (4, 4)
    assert grids[f"up_blocks.1.{first}"] == (8, 8) and grids["up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor"] == (16, 16)
    assert grids[f"up_blocks.2.{first}"] == (64, 64)


def test_exception_mid_call_then_remove_is_exact(sd):
    stock = sd_run(sd)
    handle = diffattn.apply(sd, "hidiffusion", t1=1.0)
    calls = []

    def boom(pipe, step, timestep, kwargs):
        calls.append(step)
        if step == 1:
            raise RuntimeError("interrupted")
        return kwargs

    with pytest.raises(RuntimeError, match="interrupted"):
        sd_run(sd, callback_on_step_end=boom)
    again = sd_run(sd)  # a fresh call after the failure starts at step 0 again
    handle.remove()
    with diffattn.apply(sd, "hidiffusion", t1=1.0):
        fresh = sd_run(sd)
    assert torch.equal(again, fresh)
    assert torch.equal(sd_run(sd), stock)


def test_same_seed_same_image_and_global_rng_untouched(sd):
    with diffattn.apply(sd, "hidiffusion+tome", seed=11):
        torch.manual_seed(123)
        a = sd_run(sd)
        after = torch.rand(1)
        torch.manual_seed(123)
        b = sd_run(sd)
        assert torch.equal(torch.rand(1), after)
    with diffattn.apply(sd, "hidiffusion+tome", seed=12):
        c = sd_run(sd)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_min_scale_guard_runs_stock_and_says_why(sd):
    stock = sd_run(sd, size=128)
    with diffattn.apply(sd, "hidiffusion", min_scale=1.5) as handle:
        out = sd_run(sd, size=128)
        notes = handle.summary()
    assert torch.equal(out, stock)
    assert notes["method_calls"] == 0


def test_odd_and_non_square_sizes_run(sd):
    for height, width in ((200, 136), (216, 264)):  # latents 50 x 34 and 54 x 66: odd maps one level down
        with diffattn.apply(sd, "hidiffusion+tome", t1=1.0) as handle:
            out = sd(prompt="a red circle", height=height, width=width, num_inference_steps=2, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images
            assert torch.isfinite(out).all()
            assert handle.summary()["method_calls"] > 0
    # an odd latent straight into the U-Net: padded windows at the top level
    unet = sd.unet
    sample, text = torch.randn(2, 4, 33, 47), torch.randn(2, 77, unet.config.cross_attention_dim)
    stock = unet(sample, 500, text).sample
    with diffattn.apply(unet, "msw-msa+tome") as handle:
        out = unet(sample, 500, text).sample
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert any("odd window grid" in n for n in handle.summary()["notes"])
    assert torch.equal(unet(sample, 500, text).sample, stock)


# -- composition and bad input -------------------------------------------------------------------

def test_combinations_and_their_errors():
    assert method_class("hidiffusion").PART_NAMES == ("rau-net", "msw-msa")
    assert method_class("hidiffusion+tome").PART_NAMES == ("rau-net", "msw-msa", "tome")
    with pytest.raises(ValueError, match="do not combine.*combinations that do"):
        method_class("agent+msw-msa")
    with pytest.raises(ValueError, match="twice"):
        method_class("tome+tome")
    assert method_class("radial+tome") is None
    with pytest.raises(ValueError, match="unknown method 'radial\\+tome'.*combine with"):
        diffattn.config_class("radial+tome")


def test_bad_inputs_raise_at_apply(sd):
    with pytest.raises(NotImplementedError, match="Methods for 'sd1.5'.*hidiffusion"):
        diffattn.apply(sd, "radial")
    with pytest.raises(ValueError, match="'kernel_size' is an option of"):
        diffattn.apply(sd, "msw-msa", kernel_size=3)
    with pytest.raises(ValueError, match="start=0.5 must be below end=0.2"):
        diffattn.apply(sd, "msw-msa", start=0.5, end=0.2)
    with pytest.raises(ValueError, match="shifts must be one of"):
        diffattn.apply(sd, "msw-msa", shifts="sideways")
    from diffusers import UNet3DConditionModel

    with pytest.raises(NotImplementedError, match="does not support UNet3DConditionModel"):
        diffattn.apply(UNet3DConditionModel(block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=8,
                                            attention_head_dim=2, layers_per_block=1,
                                            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")), "msw-msa")


def test_controlnet_pipelines_refuse_rau_net(sd):
    class WithControlNet:
        components = {"unet": sd.unet, "controlnet": torch.nn.Linear(1, 1)}
        controlnet = components["controlnet"]
        scheduler = sd.scheduler

    with pytest.raises(NotImplementedError, match="ControlNet.*msw-msa"):
        diffattn.apply(WithControlNet(), "hidiffusion")
    diffattn.apply(WithControlNet(), "msw-msa").remove()


def test_families_are_detected():
    assert diffattn.detect_family(SDXL_UNET.build()) == "sdxl"
    from diffattn.pipelines import unet

    model = SDXL_UNET.build().unet
    assert unet.levels(model)["down_blocks.1.attentions.0.transformer_blocks.1.attn1.processor"] == 0
    assert unet.levels(model)["up_blocks.1.attentions.2.transformer_blocks.0.attn1.processor"] == 0
    assert unet.levels(model)["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] == 1


@pytest.mark.parametrize("name,options,rows,cols", [
    ("msw-msa", dict(shifts="cyclic"), 12, 10), ("msw-msa", dict(shifts="cyclic"), 9, 7), ("tome", dict(ratio=0.5), 12, 10),
    ("agent", dict(end=1.0), 12, 12), ("agent", dict(agents="pool", end=1.0), 9, 11), ("agent+tome", dict(end=1.0), 16, 12),
    ("msw-msa+tome", dict(ratio=0.4), 16, 16), ("hidiffusion+tome", dict(min_scale=0), 16, 12),
])
def test_token_fast_path_equals_qkv_reference(name, options, rows, cols):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(24, heads=3, dim_head=8, bias=False, out_bias=True)
    x = torch.randn(2, rows * cols, 24)
    metric = torch.randn(2, rows * cols, 24)
    method = method_class(name).from_options("sd1.5", **options)
    for step in range(3):
        ctx = ctx_for(rows, cols, step=step, num_steps=10, block_input=metric)

        def project(t, which):
            q = attn.to_q(t).unflatten(-1, (3, -1)).transpose(1, 2)
            return q if which == "q" else (q, attn.to_k(t).unflatten(-1, (3, -1)).transpose(1, 2), attn.to_v(t).unflatten(-1, (3, -1)).transpose(1, 2))

        fast = method.run_tokens(x, ctx, project, lambda out: attn.to_out[0](out.transpose(1, 2).flatten(2)))
        q, k, v = project(x, "qkv")
        ref = attn.to_out[0](method(q, k, v, ctx).transpose(1, 2).flatten(2))
        torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)


def test_img2img_counts_the_strength_cut_steps(sd):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 256, 256)
    seen = []

    def run(**kw):
        return img2img(prompt="a red circle", image=image, strength=0.5, num_inference_steps=10, output_type="latent",
                       generator=torch.Generator().manual_seed(0), **kw).images

    stock = run()
    with diffattn.apply(img2img, "rau-net", t1=0.5) as handle:
        hook = img2img.unet.register_forward_hook(lambda *_: seen.append((handle.state.step, handle.state.num_steps)))
        out = run()
        hook.remove()
        rows = {r["site"]: r for r in handle.report()}
    assert seen == [(i, 5) for i in range(5)]  # strength 0.5 of 10 steps: 5 steps, counted from 0
    rad = rows["unet.down_blocks.0.downsamplers.0.conv"]
    assert (rad["method_calls"], rad["dense_calls"]) == (2, 3)  # t1 0.5 of 5 steps: the first 2
    assert not torch.equal(out, stock) and torch.equal(run(), stock)
