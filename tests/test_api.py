"""Public API errors and contracts that every method and model inherits."""

import ast
import pathlib

import pytest
import torch

import diffattn
from diffattn.methods import METHODS
from diffattn.methods.radial import Radial
from diffattn_testbed.tiny import tiny_hunyuan_transformer, tiny_wan_transformer

pytestmark = pytest.mark.cpu
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _wan_inputs(frames=3, size=8):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, frames, size, size, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 4, 32, generator=g))


def test_listings_say_which_method_fits_which_family():
    assert set(diffattn.methods()) == {"radial", "neighborhood", "clear", "msw-msa", "rau-net", "hidiffusion", "tome", "agent"}
    for name in ("msw-msa", "rau-net", "hidiffusion", "tome", "agent"):
        assert diffattn.methods()[name] == ("sd1.5", "sd2.1", "sdxl", "sdxl-turbo"), name
    assert diffattn.methods()["neighborhood"] == (
        "wan2.1", "wan2.2", "skyreels_v2", "hunyuan_video", "hunyuan_video15", "mochi", "cogvideox", "ltx", "ltx2", "flux", "flux2", "sd3")
    assert diffattn.methods()["radial"] == ("wan2.1", "wan2.2", "skyreels_v2", "hunyuan_video", "hunyuan_video15", "mochi", "cogvideox", "ltx", "ltx2")
    assert diffattn.methods()["clear"] == ("flux", "flux2", "sd3")
    models = diffattn.supported_models()
    assert models["WanTransformer3DModel"] == {"families": ("wan2.1", "wan2.2"), "methods": ["neighborhood", "radial"]}
    assert "HunyuanVideoTransformer3DModel" in models
    for name in ("FluxTransformer2DModel", "Flux2Transformer2DModel", "SD3Transformer2DModel"):
        assert models[name]["methods"] == ["clear", "neighborhood"], name
    assert models["UNet2DConditionModel"]["methods"] == ["agent", "hidiffusion", "msw-msa", "rau-net", "tome"]
    assert diffattn.patch_size(tiny_wan_transformer()) == (1, 2, 2)
    assert diffattn.patch_size(tiny_hunyuan_transformer()) == (1, 1, 1)


def test_unsupported_model_lists_supported_families():
    with pytest.raises(NotImplementedError, match="WanTransformer3DModel") as info:
        diffattn.apply(torch.nn.Linear(2, 2), "radial")
    assert "HunyuanVideoTransformer3DModel" in str(info.value)


def test_pipeline_without_a_supported_model():
    class NotAPipeline:
        def __init__(self):
            self.vae = torch.nn.Linear(2, 2)

    with pytest.raises(NotImplementedError, match="no model diffattn can install on.*Linear"):
        diffattn.apply(NotAPipeline(), "radial")


def test_unknown_method_lists_methods():
    with pytest.raises(ValueError, match="available methods: \\['agent', 'clear', 'hidiffusion', 'msw-msa', 'neighborhood', 'radial', 'rau-net', 'tome'\\]"):
        diffattn.apply(tiny_wan_transformer(), "sparse-magic")


def test_unknown_family_lists_families():
    with pytest.raises(ValueError, match="unknown family='wan2'.*'wan2.1'"):
        diffattn.apply(tiny_wan_transformer(), "radial", family="wan2")


def test_method_that_does_not_fit_the_family_names_what_fits(monkeypatch):
    class VideoOnlyOnHunyuan(Radial):
        name = "hunyuan-only"
        FAMILIES = ("hunyuan_video",)

    monkeypatch.setitem(METHODS, "hunyuan-only", VideoOnlyOnHunyuan)
    with pytest.raises(NotImplementedError, match="does not fit model family 'wan2.1'; it fits \\['hunyuan_video'\\]"):
        diffattn.apply(tiny_wan_transformer(), "hunyuan-only")


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("radial", dict(decay=-1), "decay must be a finite number > 0"),
        ("radial", dict(block_size=48), "block_size must be one of 16, 32, 64, 128"),
        ("radial", dict(dense_steps=-2), "dense_steps must be an int >= 0"),
        ("radial", dict(dense_layers=1.5), "dense_layers must be an int >= 0"),
        ("radial", dict(sink="yes"), "sink must be True or False"),
        ("radial", dict(window=3), "unknown option"),
        ("radial", dict(kernel_size=3), "'kernel_size' is an option of \\['neighborhood'\\], not of 'radial'"),
        ("neighborhood", dict(decay=0.5), "'decay' is an option of \\['radial'\\]"),
        ("radial", dict(backend="cuda"), "backend must be one of"),
        ("neighborhood", dict(kernel_size=(3, 5)), "one value or three"),
        ("neighborhood", dict(kernel_size=0), "ints >= 1"),
        ("neighborhood", dict(kernel_size=(3, 3, 3), stride=(1, 4, 1)), "stride must be <= kernel_size, got Y: stride 4 > kernel 3"),
        ("neighborhood", dict(stride=2), "stride needs kernel_size"),
        ("neighborhood", dict(kernel_size=3, dilation=(1, 0, 1)), "ints >= 1"),
        ("neighborhood", dict(kernel_size=3, causal=(True, 1, False)), "True/False"),
        ("neighborhood", dict(kernel_size=3, block_m=48), "block_m must be one of"),
    ],
)
def test_invalid_options_raise_at_apply(method, options, match):
    model = tiny_wan_transformer()
    with pytest.raises(ValueError, match=match):
        diffattn.apply(model, method, **options)
    assert not hasattr(model, "_diffattn_handle")  # a failed apply leaves nothing behind
    assert not any(type(p).__module__.startswith("diffattn") for p in model.attn_processors.values())


def test_window_larger_than_the_grid_raises_before_any_attention():
    model = tiny_wan_transformer()
    with diffattn.apply(model, "neighborhood", dense_steps=0, dense_layers=0, kernel_size=(3, 9, 3)) as handle:
        with pytest.raises(ValueError, match="kernel \\* dilation must be <= the grid length, got Y: 9 \\* 1 > 4.*\\(3, 4, 4\\)"):
            model(**_wan_inputs())
        assert all(r["calls"] == 0 for r in handle.report())  # the hook raised before any attention ran


def test_remove_without_apply():
    with pytest.raises(ValueError, match="not applied"):
        diffattn.remove(tiny_wan_transformer())


def test_forced_backend_that_cannot_run_says_why():
    model = tiny_wan_transformer()
    with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=16, backend="flex"):
        with pytest.raises(NotImplementedError, match="CUDA"):
            model(**_wan_inputs())


def test_report_records_the_fallback_reason():
    model = tiny_wan_transformer()
    with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=16) as handle, torch.no_grad():
        model(**_wan_inputs())
        summary = handle.summary()
    assert summary["backends"] == {"sdpa": 2} and summary["method_calls"] == 2
    assert any("triton:" in n and "flex:" in n for n in summary["notes"])


def test_cache_is_bounded():
    model = tiny_wan_transformer()
    with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=16) as handle, torch.no_grad():
        handle.cache_size = 2
        for frames in (2, 3, 4):
            model(**_wan_inputs(frames=frames))
        assert handle.cache_len == 2


def _graph_breaks(model, inputs):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**inputs).graph_break_count


@pytest.mark.parametrize("method,options", [("radial", dict(block_size=16)), ("neighborhood", dict(kernel_size=3))])
def test_compiled_model_has_no_more_graph_breaks_than_stock(method, options):
    model = tiny_wan_transformer()
    inputs = _wan_inputs(frames=3, size=16)
    with torch.no_grad():
        stock = _graph_breaks(model, inputs)
        with diffattn.apply(model, method, dense_steps=0, dense_layers=1, **options):
            model(**inputs)  # the description is cached: a hit never leaves the graph
            applied = _graph_breaks(model, inputs)
    assert applied <= stock


@pytest.mark.parametrize("method,options", [("radial", dict(block_size=16)), ("neighborhood", dict(kernel_size=3))])
def test_compiled_model_with_a_method_does_not_recompile_between_calls(method, options):
    # the handle's per-site counters are Python ints: incremented inside the graph, every call recompiled
    # (and past dynamo's recompile limit the model ran eagerly)
    model = tiny_wan_transformer()
    inputs = _wan_inputs(frames=3, size=16)
    with torch.no_grad(), diffattn.apply(model, method, dense_steps=0, dense_layers=1, **options) as handle:
        eager = model(**inputs)[0]  # builds the description outside the graph
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")  # dynamo's tracing and guards only (no code generation)
        first = compiled(**inputs)[0]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                again = compiled(**inputs)[0]
        rows = handle.report()
    torch._dynamo.reset()
    torch.testing.assert_close(first, eager)
    assert torch.equal(again, first)
    assert {r["calls"] for r in rows} == {1}  # the eager call: compiled calls are not recorded
    assert sum(r["method_calls"] for r in rows) == 1  # dense_layers=1: the second layer runs the method


def test_compiled_pipeline_model_reads_the_step_from_the_scheduler():
    from diffattn_testbed.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    inputs = _wan_inputs(frames=3, size=16)
    with torch.no_grad():
        stock = _graph_breaks(pipe.transformer, inputs)
        with diffattn.apply(pipe, "radial", dense_steps=2, block_size=16):
            pipe.transformer(**inputs)
            applied = _graph_breaks(pipe.transformer, inputs)
    assert applied <= stock


LAYERS = {  # folder -> packages it may import (layers import downward only)
    "diffattn/core": set(),
    "diffattn/rules": {"diffattn.core"},
    "diffattn/patterns": {"diffattn.core", "diffattn.rules"},
    "kernels": {"diffattn.core", "diffattn.rules", "diffattn.patterns"},
    "diffattn/methods": {"diffattn.core", "diffattn.rules", "diffattn.patterns", "diffattn.kernels"},
    "diffattn/guidance": {"diffattn.core", "diffattn.rules", "diffattn.patterns", "diffattn.kernels", "diffattn.methods"},
    "pipelines": {"diffattn.core", "diffattn.rules", "diffattn.patterns", "diffattn.kernels", "diffattn.methods", "diffattn.guidance"},
    "lora": {"diffattn.core", "diffattn.rules", "diffattn.patterns", "diffattn.kernels", "diffattn.methods", "diffattn.guidance",
             "diffattn.pipelines", "diffattn"},
}
SELF = {"diffattn/core": "diffattn.core", "diffattn/rules": "diffattn.rules", "diffattn/patterns": "diffattn.patterns",
        "kernels": "diffattn.kernels", "diffattn/methods": "diffattn.methods", "diffattn/guidance": "diffattn.guidance",
        "pipelines": "diffattn.pipelines",
        "lora": "diffattn.lora"}


def test_layers_import_downward_only_and_the_library_never_imports_the_testbed():
    bad = []
    for folder, allowed in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    if name.startswith("diffattn_testbed"):
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
                    elif (name == "diffattn" and "diffattn" not in allowed) or (name.startswith("diffattn.") and not any(
                        name == a or name.startswith(a + ".") for a in allowed | {SELF[folder]}
                    )):
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "upward imports: " + "; ".join(bad)


def test_everything_meets_its_written_protocol():
    from diffattn.core.protocols import Adapter, Backend, ElementRule, Method
    from diffattn.kernels.select import BACKEND_OBJECTS
    from diffattn.pipelines import ADAPTERS
    from diffattn.rules import RULES

    for name, cls in METHODS.items():
        assert isinstance(cls.from_options(cls.FAMILIES[0]), Method), name
    for name, adapter in ADAPTERS.items():
        assert isinstance(adapter, Adapter) and hasattr(adapter, "Processor"), name
    for name, backend in BACKEND_OBJECTS.items():
        assert isinstance(backend, Backend), name
    for kind, rule in RULES.items():
        assert isinstance(rule(0, 8, 2, 2, 2), ElementRule) and rule.kind == kind
    assert len({rule.kernel_id for rule in RULES.values()}) == len(RULES)  # one Triton branch each


def test_video_method_on_an_image_model_names_the_methods_that_fit():
    from diffattn_testbed.tiny import tiny_flux_transformer

    with pytest.raises(NotImplementedError, match=r"does not fit model family 'flux'.*\['clear', 'neighborhood'\]"):
        diffattn.apply(tiny_flux_transformer(), "radial")


def test_clear_bad_inputs_name_the_fix():
    from diffattn_testbed.tiny import flux_inputs, tiny_flux_transformer

    model = tiny_flux_transformer()
    for options, match in ((dict(radius=0), "radius must be an int >= 1"), (dict(down_factor=0), "down_factor"),
                           (dict(tile=(2, 4, 4)), r"tile must be \(1, ty, tx\)"), (dict(kernel_size=3), "is an option of")):
        with pytest.raises(ValueError, match=match):
            diffattn.apply(model, "clear", **options)
    with diffattn.apply(model, "clear", radius=11):  # the 8 x 8 grid needs at most 10
        with pytest.raises(ValueError, match="larger than the grid"):
            model(**flux_inputs())
    with pytest.raises(NotImplementedError, match="does not support"):
        diffattn.apply(torch.nn.Linear(2, 2), "clear")


def test_flux_kontext_style_ids_run_dense_with_a_note():
    from diffattn_testbed.tiny import flux_inputs, tiny_flux_transformer

    model = tiny_flux_transformer()
    inputs = flux_inputs()
    ref = flux_inputs(rows=4, cols=4, seed=2)  # a reference image appended with frame id 1
    ref_ids = ref["img_ids"].clone()
    ref_ids[:, 0] = 1
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], ref["hidden_states"]], dim=1)
    inputs["img_ids"] = torch.cat([inputs["img_ids"], ref_ids])
    with torch.no_grad():
        stock = model(**inputs).sample
        with diffattn.apply(model, "clear", radius=2) as handle:
            out = model(**inputs).sample
    assert torch.equal(out, stock)
    assert any("Kontext" in n for n in handle.summary()["notes"]) and handle.summary()["method_calls"] == 0


def test_flux2_reference_images_run_dense_with_a_note():
    from diffattn_testbed.tiny import flux2_inputs, tiny_flux2_transformer

    model = tiny_flux2_transformer()
    inputs = flux2_inputs()
    ref = flux2_inputs(rows=4, cols=4, seed=2)  # a reference image: its ids carry t = 10
    ref_ids = ref["img_ids"].clone()
    ref_ids[:, 0] = 10
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], ref["hidden_states"]], dim=1)
    inputs["img_ids"] = torch.cat([inputs["img_ids"], ref_ids])
    with torch.no_grad():
        stock = model(**inputs).sample
        with diffattn.apply(model, "neighborhood", kernel_size=3, dense_steps=0) as handle:
            out = model(**inputs).sample
    assert torch.equal(out, stock)
    assert any("reference images" in n for n in handle.summary()["notes"]) and handle.summary()["method_calls"] == 0


def test_flux_ip_adapter_branch_runs_and_its_weights_stay_in_the_model():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from diffattn_testbed.tiny import flux_inputs, tiny_flux_transformer

    model = tiny_flux_transformer()
    torch.manual_seed(3)
    procs = {k: (FluxIPAdapterAttnProcessor(32, 12, num_tokens=(4,), scale=0.7) if k.startswith("transformer_blocks") else p)
             for k, p in model.attn_processors.items()}
    model.set_attn_processor(procs)
    keys = set(model.state_dict())
    inputs = flux_inputs()
    inputs["joint_attention_kwargs"] = {"ip_hidden_states": [torch.randn(2, 4, 12)]}
    with torch.no_grad():
        stock = model(**inputs).sample
        with diffattn.apply(model, "clear", radius=10) as handle:  # covers the 8 x 8 grid: equals dense
            assert set(model.state_dict()) == keys
            model.to(torch.float64)  # the IP weights move with the model
            inputs64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
            inputs64["joint_attention_kwargs"] = {"ip_hidden_states": [inputs["joint_attention_kwargs"]["ip_hidden_states"][0].double()]}
            out = model(**inputs64).sample
            assert handle.summary()["method_calls"] > 0
        model.to(torch.float32)
    torch.testing.assert_close(out.float(), stock, atol=1e-4, rtol=1e-4)
    assert type(model.attn_processors["transformer_blocks.0.attn.processor"]) is FluxIPAdapterAttnProcessor


def test_cogvideox_15_temporal_patch_halves_the_frames():
    from diffattn_testbed.tiny import cogvideox_inputs, tiny_cogvideox_transformer

    model = tiny_cogvideox_transformer(patch_size_t=2)
    inputs = cogvideox_inputs(frames=4, patch_size_t=2)
    with torch.no_grad():
        stock = model(**inputs).sample
        with diffattn.apply(model, "neighborhood", kernel_size=(2, 3, 3), dense_steps=0) as handle:
            out = model(**inputs).sample
            with handle.bypass():
                assert torch.equal(model(**inputs).sample, stock)  # the teacher path is the stock model
    layout = handle.summary()["layout"]
    assert (layout.frames, layout.rows, layout.cols) == (2, 8, 8)
    assert (out - stock).abs().max() > 1e-4


def test_wan22_ti2v_5b_config_is_wan22_and_runs_radial():
    from diffattn_testbed.tiny import tiny_wan_transformer

    model = tiny_wan_transformer(in_channels=48)  # Wan2.2-TI2V-5B: 48 latent channels
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 48, 3, 16, 16, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 4, 32, generator=g))
    with torch.no_grad():
        stock = model(**inputs).sample
        with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=16) as handle:
            out = model(**inputs).sample
    assert handle.family == "wan2.2" and handle.method.config.decay == 0.8  # Wan2.2's defaults
    assert (out - stock).abs().max() > 1e-5


def test_an_unknown_processor_class_is_refused_with_the_mirrored_one():
    from diffattn_testbed.tiny import tiny_ltx_transformer

    model = tiny_ltx_transformer()

    class FutureProcessor:  # a processor class a later diffusers might ship
        def __call__(self, attn, hidden_states, **kwargs):
            return hidden_states

    model.transformer_blocks[0].attn1.set_processor(FutureProcessor())
    with pytest.raises(NotImplementedError, match="mirrors LTXVideoAttnProcessor of diffusers 0.42.1"):
        diffattn.apply(model, "radial")
    assert not any(type(p).__module__.startswith("diffattn") for p in model.attn_processors.values())
