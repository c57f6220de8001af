"""The main job: ``diffattn generate`` on the testbed video pipeline."""

import pytest

from diffattn.app import cli

pytestmark = pytest.mark.cpu

SMALL = ["--frames", "17", "--height", "64", "--width", "64", "--steps", "2", "--seed", "3"]


def test_generate_writes_both_clips_and_reports(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    cfg = cli._parse(["generate", "--out", str(out), *SMALL])
    report = cli.generate(cfg)
    assert out.exists() and (tmp_path / "clip_dense.mp4").exists()
    assert out.stat().st_size > 1000
    assert 0 < report["mask_density"] <= 1 and report["dense_seconds"] > 0 and report["method_seconds"] > 0
    assert report["layout"] == "TokenLayout(F=5, Y=8, X=8)"
    # the testbed's declared dense_steps=6 > 2 steps: every call ran the stock path
    assert report["method_calls"] == 0 and report["dense_calls"] > 0
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
        (["--height", "100"], "multiples of 8.*trained at 128x128"),
        (["--prompt", "a red zebra moving right"], "does not know \\['zebra'\\].*caption words"),
        (["--prompt", "a red circle and a red star"], "color twice"),
        (["--frames", "30"], "4k\\+1"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--method", "neighborhood", "--kernel-size", "3", "3"], "one value or three"),
        (["--method", "neighborhood", "--kernel-size", "3", "20", "3", "--dense-steps", "0"], "kernel \\* dilation must be <= the grid length"),
    ],
)
def test_bad_input_says_what_to_do(argv, match):
    cfg = cli._parse(["generate", *argv, *(SMALL if "--kernel-size" in argv else [])])
    with pytest.raises(SystemExit, match=match):
        cli.generate(cfg)
