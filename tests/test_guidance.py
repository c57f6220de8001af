"""Guidance (PAG, SoftPAG, HeadHunter, STG, SEG): the maths against their dense twins, the configs'
errors, the branch's bookkeeping in real pipelines, and every family through ``GuidanceTester``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import diffattn
from diffattn.core.layout import TokenLayout
from diffattn.guidance import GUIDANCE, guide
from diffattn.guidance.perturb import blend_identity, blur_queries, blur_reference, identity_blend_reference
from families import COGVIDEOX, FLUX, FLUX2, HUNYUAN, HUNYUAN15, LTX, MOCHI, SD3, SD_UNET, SKYREELS_V2, WAN, _wan_call
from testers import GuidanceTester

pytestmark = pytest.mark.cpu


# -- the maths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seq,heads,dim", [(7, 3, 8), (20, 2, 16)])
def test_fused_blend_equals_the_blended_attention_map(seq, heads, dim):
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(2, seq, heads, dim, generator=g) for _ in range(3))  # [B, S, heads, D]
    u = torch.rand(heads, generator=g)
    u[0] = 0.0  # an unperturbed head
    o = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(blend_identity(o, v, u), identity_blend_reference(q, k, v, u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [TokenLayout(3, 5, 6), TokenLayout(1, 7, 4, 3, "after"), TokenLayout(2, 4, 4, 5, "before")])
@pytest.mark.parametrize("sigma,frame_sigma", [(1.0, 0.0), (0.7, 1.5), (math.inf, 0.0), (math.inf, math.inf), (40.0, 0.0)])
def test_query_blur_equals_its_dense_operator(layout, sigma, frame_sigma):
    q = torch.randn(2, layout.seq_len, 3, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(blur_queries(q, layout, sigma, frame_sigma), blur_reference(q, layout, sigma, frame_sigma),
                               atol=1e-5, rtol=1e-5)
    if layout.text_tokens:  # text queries are left alone
        start = layout.video_start
        text = torch.cat([q[:, :start], q[:, start + layout.video_tokens:]], 1)
        out = blur_queries(q, layout, sigma, frame_sigma)
        assert torch.equal(torch.cat([out[:, :start], out[:, start + layout.video_tokens:]], 1), text)


def test_infinite_blur_is_the_mean_query():
    layout = TokenLayout(1, 4, 5)
    q = torch.randn(1, 20, 2, 3)
    out = blur_queries(q, layout, math.inf)
    torch.testing.assert_close(out, q.mean(1, keepdim=True).expand_as(q))


# -- configs and their errors ---------------------------------------------------------------------

@pytest.mark.parametrize("name,options,match", [
    ("pag", dict(scale=0), "scale must be"),
    ("pag", dict(scale=float("nan")), "scale must be"),
    ("soft-pag", dict(steps=(0.5, 0.5)), "empty window"),
    ("soft-pag", dict(steps=(0.2,)), r"steps must be \(start, end\)"),
    ("soft-pag", dict(u=0), r"u must be in \(0, 1\]"),
    ("soft-pag", dict(u=1.5), r"u must be in \(0, 1\]"),
    ("soft-pag", dict(heads=[]), "perturbs nothing"),
    ("pag", dict(layers=[1, 1]), "repeated"),
    ("pag", dict(batch="both"), "batch must be one of"),
    ("pag", dict(adaptive=-1), "adaptive must be >= 0"),
    ("headhunter", dict(), "one of them"),
    ("headhunter", dict(heads=[(0, 1)], layers=[0]), "not layers="),
    ("headhunter", dict(heads=[(0, 1), (0, 1)]), "repeated"),
    ("seg", dict(sigma=0), "sigma must be > 0"),
    ("stg", dict(mode="residual"), "mode must be one of"),
    ("pag", dict(u=0.5), r"unknown option\(s\) \['u'\]"),
])
def test_bad_options_say_what_to_do(name, options, match):
    with pytest.raises(ValueError, match=match):
        guide(name, **options)


def test_window_and_adaptive_scale():
    cfg = guide("pag", steps=(0.2, 0.5), adaptive=0.005)
    assert [i for i in range(10) if cfg.in_window(i, 10)] == [2, 3, 4]
    assert cfg.scale_at(1000.0) == 3.0 and cfg.scale_at(800.0) == pytest.approx(2.0) and cfg.scale_at(300.0) == 0.0
    with pytest.raises(ValueError, match="number of denoising steps"):
        cfg.in_window(0, None)


def test_head_list_loads_from_a_search_result(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": [[1, 0], [0, 2]], "scores": {}}))
    assert guide("headhunter", heads=str(path)).heads == ((1, 0), (0, 2))
    (tmp_path / "bad.json").write_text(json.dumps({"rounds": []}))
    with pytest.raises(ValueError, match="no 'heads' list"):
        guide("headhunter", heads=str(tmp_path / "bad.json"))


def test_the_api_lists_guidance_and_unknown_names_fail():
    assert set(diffattn.guidance_methods()) == set(GUIDANCE) == {"pag", "soft-pag", "headhunter", "stg", "seg"}
    with pytest.raises(ValueError, match="unknown guidance"):
        guide("cfg-zero")
    with pytest.raises(ValueError, match="guidance= takes"):
        diffattn.apply(HUNYUAN.build(), "radial", guidance=3)


# -- in pipelines --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan():
    return WAN.build()


def test_cond_and_uncond_calls_get_the_same_term(wan):
    """The w-independent combination: under diffusers' cache contexts the conditional call returns
    c + d and the next unconditional call u + d, with d = s (c - weak)."""
    model = wan.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)
    t = torch.tensor([700.0])
    cond, uncond = torch.randn(1, 12, 32, generator=g), torch.randn(1, 12, 32, generator=g)

    def call(text):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    with torch.no_grad():
        c, u = call(cond), call(uncond)
        with diffattn.apply(wan, "soft-pag", u=0.8, scale=2.5) as handle:
            with handle.weak():
                w = call(cond)
            with model.cache_context("cond"):
                c2 = call(cond)
            with model.cache_context("uncond"):
                u2 = call(uncond)
            with model.cache_context("uncond"):  # a second unconditional call owes nothing
                u3 = call(uncond)
    d = 2.5 * (c - w)
    torch.testing.assert_close(c2, c + d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u2, u + d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u3, u, atol=0, rtol=0)


def test_radial_with_pag_runs_the_window_and_skips_the_kernel(wan):
    stock = _wan_call(wan, frames=9, size=64, steps=4)
    with diffattn.apply(wan, "radial", dense_steps=0, block_size=32, guidance=guide("pag", steps=(0.5, 1.0))) as handle:
        out = _wan_call(wan, frames=9, size=64, steps=4)
        summary = handle.summary()
    assert summary["guidance"]["weak_forwards"] == 2 and summary["guidance"]["steps_outside_window"] == 2
    assert summary["method_calls"] > 0 and "guidance: identity attention (no kernel run)" in summary["notes"]
    assert (out - stock).abs().max() > 1e-4
    assert torch.equal(_wan_call(wan, frames=9, size=64, steps=4), stock)


@pytest.fixture(scope="module")
def sd():
    return SD_UNET.build()


def test_unet_joint_equals_separate_and_composes_with_hidiffusion(sd):
    def run():
        return SD_UNET.call(sd, size=128, steps=2)

    stock = run()
    outs = {}
    for batch in ("joint", "separate"):
        with diffattn.apply(sd, "soft-pag", u=0.5, heads=[1], batch=batch) as handle:
            outs[batch] = run()
            assert handle.summary()["guidance"][f"{batch}_calls"] == 2
    torch.testing.assert_close(outs["joint"], outs["separate"], atol=1e-4, rtol=1e-4)
    assert (outs["joint"] - stock).abs().max() > 1e-4
    with diffattn.apply(sd, "msw-msa", guidance=guide("pag", layers="all")) as handle:
        run()
        assert handle.summary()["method_calls"] > 0
    with diffattn.apply(sd, "msw-msa", guidance=guide("soft-pag", heads=[0], layers="all")):
        with pytest.raises(NotImplementedError, match="head-level guidance"):
            run()
    assert torch.equal(run(), stock)


# -- every family ---------------------------------------------------------------------------------

class TestHunyuanGuidance(GuidanceTester):
    family, method, method_options = HUNYUAN, "radial", dict(dense_steps=0, block_size=32, decay=0.3)


class TestFluxGuidance(GuidanceTester):
    family, method, method_options = FLUX, "clear", dict(radius=2)


class TestSD3Guidance(GuidanceTester):
    family, method, method_options = SD3, "neighborhood", dict(dense_steps=0, kernel_size=3)


class TestFlux2Guidance(GuidanceTester):
    family = FLUX2


class TestCogVideoXGuidance(GuidanceTester):
    family, method, method_options = COGVIDEOX, "radial", dict(dense_steps=0, block_size=32, decay=0.3)


class TestMochiGuidance(GuidanceTester):
    family, method, method_options = MOCHI, "radial", dict(dense_steps=0, block_size=32, decay=0.3)


class TestLTXGuidance(GuidanceTester):
    family = LTX


class TestHunyuan15Guidance(GuidanceTester):
    family = HUNYUAN15


class TestSkyReelsGuidance(GuidanceTester):
    family = SKYREELS_V2


# -- the head search ------------------------------------------------------------------------------

def test_head_search_is_greedy_resumes_after_a_kill_and_loads(wan, tmp_path):
    from diffattn.app.headhunter import candidate_pool, search

    pool = candidate_pool(wan, "")[:4]
    calls = []

    def generate(pipe, prompts, seeds):
        return _wan_call(pipe, frames=5, size=32, steps=1)

    def objective(samples, prompts):
        calls.append(1)
        return float(samples.float().std())

    args = dict(pool=pool, rounds=2, top_k=1, progress=False)
    full = search(wan, generate, objective, ["a red circle"], [0], state_path=tmp_path / "a.json", **args)
    state = json.loads((tmp_path / "a.json").read_text())
    assert state["complete"] and len(calls) == 4 + 3
    first = max(state["scores"][0], key=lambda k: state["scores"][0][k])
    assert list(full[0]) == [int(v) for v in first.split(",")]  # round 1 takes the best-scored head
    assert set(state["scores"][1]) == {f"{l},{h}" for l, h in pool if (l, h) != full[0]}  # round 2 scores the rest

    class Killed(Exception):
        pass

    left = [5]

    def dies(samples, prompts):
        if not left[0]:
            raise Killed
        left[0] -= 1
        return objective(samples, prompts)

    with pytest.raises(Killed):
        search(wan, generate, dies, ["a red circle"], [0], state_path=tmp_path / "b.json", **args)
    calls.clear()
    assert search(wan, generate, objective, ["a red circle"], [0], state_path=tmp_path / "b.json", **args) == full
    assert len(calls) == 7 - 5  # only the heads not scored before the kill
    assert guide("headhunter", heads=str(tmp_path / "a.json")).heads == tuple(full)
    with pytest.raises(SystemExit, match="other settings"):
        search(wan, generate, objective, ["a red circle"], [0], state_path=tmp_path / "a.json", **{**args, "rounds": 1})
    with pytest.raises(ValueError, match="rounds=3 x top_k=2"):
        search(wan, generate, objective, ["a red circle"], [0], pool=pool, rounds=3, top_k=2)


def test_diffusers_pag_pipelines_are_refused():
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    class PagPipeline(PAGMixin):  # stands in for e.g. StableDiffusionXLPAGPipeline
        pass

    pipe = PagPipeline()
    pipe.transformer = HUNYUAN.build()
    with pytest.raises(NotImplementedError, match="diffusers PAG pipeline"):
        diffattn.apply(pipe, "pag")
    assert not hasattr(pipe.transformer, "_diffattn_handle")
