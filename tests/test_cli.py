"""The main job: ``diffattn generate`` on the testbed video pipeline."""

import pytest
import torch

from diffattn.app import cli

pytestmark = pytest.mark.cpu

SMALL = ["--frames", "17", "--height", "64", "--width", "64", "--steps", "2", "--seed", "3"]


def test_generate_writes_both_clips_and_reports(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    cfg = cli._parse(["generate", "--out", str(out), "--dense-steps", "1", *SMALL])
    report = cli.generate(cfg)
    assert out.exists() and (tmp_path / "clip_dense.mp4").exists()
    assert out.stat().st_size > 1000
    assert 0 < report["mask_density"] <= 1 and report["dense_seconds"] > 0 and report["method_seconds"] > 0
    assert report["layout"] == "TokenLayout(F=5, Y=8, X=8)"
    # step 1 dense, step 2 radial (Wan's first layer stays dense)
    assert report["method_calls"] > 0 and report["dense_calls"] > 0
    assert 0 < report["ssim_vs_dense"] <= 1 and set(report["judge_dense"]) == {"color", "shape", "motion"}
    printed = capsys.readouterr().out
    assert "mask density" in printed and "PSNR vs dense" in printed and "judge (dense)" in printed


def test_method_options_come_from_the_config_fields(tmp_path):
    cfg = cli._parse(["generate", "--method", "neighborhood", "--kernel-size", "3", "5", "5", "--stride", "1", "2", "1",
                      "--causal", "true", "false", "false", "--dense-steps", "0", "--out", str(tmp_path / "nb.mp4"), *SMALL])
    assert cfg.options == dict(kernel_size=(3, 5, 5), stride=(1, 2, 1), causal=(True, False, False), dense_steps=0)
    report = cli.generate(cfg)
    assert report["method_calls"] > 0 and 0 < report["mask_density"] < 1
    radial = cli._parse(["generate", "--decay", "0.5", "--no-sink", "--block-size", "32"])
    assert radial.options == dict(decay=0.5, sink=False, block_size=32)


def test_help_is_per_method(capsys):
    with pytest.raises(SystemExit):
        cli._parse(["generate", "--method", "neighborhood", "--help"])
    text = capsys.readouterr().out
    assert "--kernel-size" in text and "--dilation" in text and "--decay" not in text
    with pytest.raises(SystemExit):
        cli._parse(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--decay" in text and "--kernel-size" not in text


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--method", "nope"], "available methods"),
        (["--height", "100"], "multiples of 16.*e.g. 96x128.*trained at 128x128"),
        (["--height", "120"], "multiples of 16"),
        (["--decay", "-1"], "decay"),
        (["--block-size", "100"], "block_size"),
        (["--dense-steps", "-1"], "dense_steps"),
        (["--dense-steps", "25"], "covers all 25 steps.*never run"),
        (["--fps", "0"], "--fps must be >= 1"),
        (["--out", "clip"], "--out must end in .mp4"),
        (["--out", "/no/such/folder/clip.mp4"], "does not exist; create it"),
        (["--model", "/no/such/model"], "does not exist; pass a local diffusers pipeline folder"),
        (["--prompt", " ".join(["red"] * 10_000)], "has 10000 words; the testbed reads 32"),
        (["--prompt", " ".join(f"w{i}" for i in range(30))], "does not know \\['w0', 'w1', 'w2', 'w3', 'w4'\\] \\(and 25 more\\)"),
        (["--prompt", "a red zebra moving right"], "does not know \\['zebra'\\].*caption words"),
        (["--prompt", "a red circle and a red star"], "color twice"),
        (["--frames", "30"], "4k\\+1"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--method", "neighborhood", "--kernel-size", "3", "3"], "one value or three"),
        (["--method", "neighborhood", "--kernel-size", "3", "20", "3", "--dense-steps", "0"], "kernel \\* dilation must be <= the grid length"),
    ],
)
def test_bad_input_says_what_to_do(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = cli._parse(["generate", *argv, *(SMALL if "--kernel-size" in argv else [])])
    with pytest.raises(SystemExit, match=match) as err:
        cli.generate(cfg)
    assert len(str(err.value)) < 1000 and "\n" not in str(err.value)  # one line, never the whole input echoed
    assert not list(tmp_path.iterdir())  # no clip written


def test_model_folder_checks_name_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    for folder, match in ((tmp_path / "empty", "no model_index.json"), (flux, "is a FluxPipeline; use diffattn.apply")):
        with pytest.raises(SystemExit, match=match):
            cli.generate(cli._parse(["generate", "--model", str(folder), "--out", str(tmp_path / "c.mp4")]))


def test_cuda_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="no CUDA GPU; use --device cpu"):
        cli.generate(cli._parse(["generate", "--device", "cuda", "--out", str(tmp_path / "c.mp4")]))


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {c} " in text for c in ("generate", "mask", "demo", "train"))
    with pytest.raises(SystemExit, match="unknown command 'bogus'"):
        cli.main(["bogus"])
