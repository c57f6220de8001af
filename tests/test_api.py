"""Public API errors and contracts that every method and model inherits."""

import ast
import pathlib

import pytest
import torch

import diffattn
from diffattn_testbed.tiny import tiny_wan_transformer

pytestmark = pytest.mark.cpu
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_unsupported_model_lists_supported_families():
    with pytest.raises(NotImplementedError, match="WanTransformer3DModel") as info:
        diffattn.apply(torch.nn.Linear(2, 2), "radial")
    assert "HunyuanVideoTransformer3DModel" in str(info.value)


def test_pipeline_without_transformer():
    class NotAPipeline:
        pass

    with pytest.raises(NotImplementedError, match="no transformer"):
        diffattn.apply(NotAPipeline(), "radial")


def test_unknown_method_lists_methods():
    with pytest.raises(ValueError, match="available methods: \\['radial'\\]"):
        diffattn.apply(tiny_wan_transformer(), "sparse-magic")


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(decay=-1), "decay must be a finite number > 0"),
        (dict(block_size=48), "block_size must be one of 16, 32, 64, 128"),
        (dict(dense_steps=-2), "dense_steps must be an int >= 0"),
        (dict(dense_layers=1.5), "dense_layers must be an int >= 0"),
        (dict(sink="yes"), "sink must be True or False"),
        (dict(window=3), "unknown option"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_invalid_config_values(options, match):
    model = tiny_wan_transformer()
    with pytest.raises(ValueError, match=match):
        diffattn.apply(model, "radial", **options)
    assert not hasattr(model, "_diffattn_handle")  # a failed apply leaves nothing behind


def test_remove_without_apply():
    with pytest.raises(ValueError, match="not applied"):
        diffattn.remove(tiny_wan_transformer())


def test_forced_backend_that_cannot_run_says_why():
    model = tiny_wan_transformer()
    x = torch.randn(1, 16, 3, 8, 8)
    with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=16, backend="flex"):
        with pytest.raises(NotImplementedError, match="CUDA"):
            model(x, torch.tensor([500]), torch.randn(1, 4, 32))


LAYERS = {  # package -> packages it may import (layers import downward only)
    "diffattn/core": set(),
    "diffattn/patterns": {"diffattn.core"},
    "kernels": {"diffattn.core", "diffattn.patterns"},
    "diffattn/methods": {"diffattn.core", "diffattn.patterns", "diffattn.kernels"},
    "pipelines": {"diffattn.core", "diffattn.patterns", "diffattn.kernels", "diffattn.methods"},
}


def test_layers_import_downward_only():
    bad = []
    for folder, allowed in LAYERS.items():
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    if name == "diffattn" or (name.startswith("diffattn.") and not any(
                        name == a or name.startswith(a + ".") for a in allowed | {"diffattn." + folder.split("/")[-1]}
                    )):
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "upward imports: " + "; ".join(bad)
