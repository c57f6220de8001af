"""The main job: ``diffattn generate`` on the testbed video pipeline."""

import pytest

from diffattn.app import cli

pytestmark = pytest.mark.cpu


def test_generate_writes_both_clips_and_reports(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    cfg = cli._parse(["generate", "--out", str(out), "--frames", "17", "--height", "64", "--width", "64", "--steps", "2", "--seed", "3"])
    report = cli.generate(cfg)
    assert out.exists() and (tmp_path / "clip_dense.mp4").exists()
    assert out.stat().st_size > 1000
    assert 0 < report["mask_density"] <= 1 and report["dense_seconds"] > 0 and report["method_seconds"] > 0
    assert report["layout"] == "TokenLayout(F=5, Y=8, X=8)"
    assert 0 < report["ssim_vs_dense"] <= 1 and set(report["judge_dense"]) == {"color", "shape", "motion"}
    printed = capsys.readouterr().out
    assert "mask density" in printed and "PSNR vs dense" in printed and "judge (dense)" in printed


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--method", "nope"], "available methods"),
        (["--height", "100"], "multiples of 8.*trained at 128x128"),
        (["--prompt", "a red zebra moving right"], "does not know \\['zebra'\\].*caption words"),
        (["--prompt", "a red circle and a red star"], "color twice"),
        (["--frames", "30"], "4k\\+1"),
        (["--steps", "0"], "steps must be >= 1"),
    ],
)
def test_bad_input_says_what_to_do(argv, match):
    cfg = cli._parse(["generate", *argv])
    with pytest.raises(SystemExit, match=match):
        cli.generate(cfg)
