"""Every code block of the README runs: Python blocks are executed, shell blocks' commands are run
(patterns, benchmark --help) or parsed (the CLI), except the set-up lines CI itself runs."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu
ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "bash"]


def test_readme_has_blocks():
    assert len(PYTHON) >= 4 and len(SHELL) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON[index], f"README.md python block {index}", "exec"), {"__name__": f"readme_{index}"})


def _commands():
    for block in SHELL:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line


COMMANDS = list(_commands())


@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_shell_command(index, tmp_path):
    from diffattn.app import cli

    line = COMMANDS[index]
    for part in [p.strip() for p in line.split("&&")]:
        argv = shlex.split(part)
        if argv[0] in ("pip", "pytest"):
            continue  # the set-up and test commands: .ci/run runs exactly these
        if argv[:3] == ["diffattn", "train", "clear"]:
            from diffattn.lora.clear_distill import DistillConfig
            from diffattn.lora.common import config_from_argv

            config_from_argv(DistillConfig, argv[3:], "")  # every flag exists and parses
        elif argv[:3] == ["diffattn", "train", "length"]:
            from diffattn.lora.common import config_from_argv
            from diffattn.lora.length import LengthConfig

            config_from_argv(LengthConfig, argv[3:], "")
        elif argv[0] == "torchrun":  # torchrun ... $(which diffattn) generate ...: the diffattn part parses
            from diffattn.lora.common import parse_context_parallel

            cfg = cli._parse(argv[argv.index("generate"):])
            u, r = parse_context_parallel(cfg.context_parallel, "readme")
            assert int(argv[argv.index("--nproc_per_node") + 1]) == u * r, part
        elif argv[:2] == ["accelerate", "launch"]:  # accelerate launch ... -m MODULE ...: the trainer's flags parse
            from diffattn.lora.common import config_from_argv, parse_context_parallel

            module = argv[argv.index("-m") + 1]
            assert module in ("diffattn.lora.length", "diffattn.lora.clear_distill"), part
            if module == "diffattn.lora.length":
                from diffattn.lora.length import LengthConfig as Config
            else:
                from diffattn.lora.clear_distill import DistillConfig as Config
            cfg = config_from_argv(Config, argv[argv.index("-m") + 2:], "")
            u, r = parse_context_parallel(getattr(cfg, "context_parallel", ""), "readme")
            assert int(argv[argv.index("--num_processes") + 1]) % (u * r) == 0, part
        elif argv[0] == "diffattn" and "--lora" in argv:  # a stand-in training output: the flags parse, its length is used
            i = argv.index("--lora") + 1
            stub = tmp_path / argv[i]
            stub.mkdir(parents=True)
            (stub / "pytorch_lora_weights.safetensors").write_bytes(b"")
            (stub / "diffattn.json").write_text('{"method": "radial", "kind": "lora", "options": {}, "frames": 113}')
            argv[i] = str(stub)
            cfg = cli._parse(argv[1:])
            assert cfg.lora == str(stub) and cfg.frames == (113 if "--frames" not in argv else cfg.frames)
        elif argv[:2] == ["diffattn", "demo"]:
            from diffattn.app import demo

            demo.parser().parse_args(argv[2:])  # every flag exists (launching is tests/test_demo.py's)
        elif argv[:2] == ["diffattn", "headhunter"]:
            from diffattn.app import headhunter

            headhunter.parser().parse_args(argv[2:])  # every flag exists (the search is test_guidance's)
        elif argv[:2] == ["diffattn", "mask"]:
            cli.mask([*argv[2:], "--out", str(tmp_path / "mask.png")])
        elif argv[:2] == ["diffattn", "bench"]:
            args, options = cli.bench_arguments(argv[2:])  # every flag exists and parses (timing needs a GPU)
            from diffattn.app import bench

            for model in args.model:  # and the case is valid: grid, method, options
                size = __import__("diffattn.app.mask", fromlist=["MODELS"]).MODELS[model].size
                bench.check_case(model, args.method, args.height or size[0], args.width or size[1], args.frames or size[2], options)
        elif argv[0] == "diffattn":
            cfg = cli._parse(argv[1:])  # every flag exists and parses
            assert cfg.method in (*__import__("diffattn").methods(), "none")
        elif argv[:2] == ["python", "-m"]:
            subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, check=True, capture_output=True, timeout=300)
        elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
            assert (ROOT / argv[1]).exists(), argv[1]
            subprocess.run([sys.executable, str(ROOT / argv[1]), "--help"], check=True, capture_output=True, timeout=120)
        elif argv[0] == "bash":
            assert (ROOT / argv[1]).exists(), argv[1]
        else:
            raise AssertionError(f"README command not covered by this test: {part}")
