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


def test_warmup_leaves_the_timed_runs_unchanged(tmp_path):
    import imageio.v3 as iio

    runs = {}
    for flag in ("--warmup", "--no-warmup"):
        cfg = cli._parse(["generate", flag, "--pipeline", "image-dit", "--steps", "2", "--out", str(tmp_path / f"{flag[2:]}.png")])
        assert cfg.warmup == (flag == "--warmup")
        runs[flag] = cli.generate(cfg)
    assert runs["--warmup"]["method_calls"] == runs["--no-warmup"]["method_calls"] == 16  # the warm-up is not counted
    # and changes no output (the warm-up handle is gone, the seed is the run's)
    assert (iio.imread(tmp_path / "warmup.png") == iio.imread(tmp_path / "no-warmup.png")).all()
    assert (iio.imread(tmp_path / "warmup_dense.png") == iio.imread(tmp_path / "no-warmup_dense.png")).all()


def test_method_options_come_from_the_config_fields(tmp_path):
    cfg = cli._parse(["generate", "--method", "neighborhood", "--kernel-size", "3", "5", "5", "--stride", "1", "2", "1",
                      "--causal", "true", "false", "false", "--dense-steps", "0", "--out", str(tmp_path / "nb.mp4"), *SMALL])
    assert cfg.options == dict(kernel_size=(3, 5, 5), stride=(1, 2, 1), causal=(True, False, False), dense_steps=0)
    report = cli.generate(cfg)
    assert report["method_calls"] > 0 and 0 < report["mask_density"] < 1
    radial = cli._parse(["generate", "--decay", "0.5", "--no-sink", "--block-size", "32"])
    assert radial.options == dict(decay=0.5, sink=False, block_size=32)


def test_guidance_with_the_method_and_alone(tmp_path, capsys):
    cfg = cli._parse(["generate", "--guide", "soft-pag", "--guide-scale", "1", "--guide-layers", "2", "3", "--dense-steps", "1",
                      "--out", str(tmp_path / "g.mp4"), *SMALL])
    assert cfg.method == "radial" and cfg.guide == "soft-pag" and cfg.guide_options == dict(scale=1.0, layers=(2, 3))
    report = cli.generate(cfg)
    assert report["guidance"]["weak_forwards"] == 2 and report["method_calls"] > 0  # one weak pass per step, radial ran
    assert "radial+soft-pag: " in capsys.readouterr().out
    alone = cli._parse(["generate", "--method", "headhunter", "--guide-heads", "1:0", "2:1", "--out", str(tmp_path / "h.mp4"), *SMALL])
    assert alone.method == "none" and alone.guide == "headhunter" and alone.guide_options == dict(heads=[(1, 0), (2, 1)])
    report = cli.generate(alone)
    assert report["mask_density"] is None and report["method_calls"] == 0 and report["guidance"]["weak_forwards"] == 2
    assert (tmp_path / "h.mp4").exists() and (tmp_path / "h_dense.mp4").exists()


@pytest.mark.parametrize("pipeline, method, extra, count", [
    ("image-dit", "clear", ["--radius", "2", "--steps", "2"], 16),          # 2 steps x (cond + uncond: true CFG) x 4 attention layers
    ("image-unet", "hidiffusion", ["--method-seed", "1", "--steps", "4"], None),  # RAU-Net: the early steps (T1)
])
def test_image_pipelines_write_pngs(pipeline, method, extra, count, tmp_path):
    cfg = cli._parse(["generate", "--pipeline", pipeline, "--out", str(tmp_path / "i.png"), *extra])
    assert cfg.method == method and cfg.frames == 1 and (cfg.height == 256) == (pipeline == "image-unet")
    report = cli.generate(cfg)
    assert (tmp_path / "i.png").exists() and (tmp_path / "i_dense.png").exists()
    assert report["method_calls"] > 0 and 0 < report["ssim_vs_dense"] <= 1 and "count" in report["judge_dense"]
    if count is not None:
        assert report["method_calls"] + report["dense_calls"] == count
    if method == "hidiffusion":
        assert cfg.options == {"seed": 1} and report["backends"].get("rau-net", 0) > 0


def test_bench_times_every_kernel_and_checks_ours(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = cli.bench(["--device", "cpu", "--model", "testbed", "--frames", "17", "--height", "64", "--width", "64",
                      "--block-size", "32", "--dense-steps", "0", "--json", str(out)])
    kernels = [r.kernel for r in rows]
    assert kernels == ["SDPA math (dense)", "SDPA token mask (radial)", "diffattn Triton (radial)"]
    ours = rows[-1]
    assert 0 < ours.density < 1 and ours.fwd_ms > 0 and ours.max_err < 1e-4  # Triton (interpreted) == SDPA with the mask
    assert len(__import__("json").loads(out.read_text())) == 3 and "| diffattn Triton (radial) |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--method", "tome"], "tome is not a block-sparse attention"),
    (["--model", "nope"], "unknown --model 'nope'"),
    (["--model", "wan", "--frames", "80"], "--frames must be 4k\\+1"),
    (["--model", "flux", "--method", "radial"], "radial does not fit the flux family"),
    (["--device", "cpu", "--json", "x.txt"], "--json must name a .json file"),
    (["--heads", "0"], "--heads and --head-dim must be >= 1"),
    (["--model", "wan", "--height", "0"], "positive multiples of 16"),
    (["--device", "cpu", "--json", "/no/such/folder/b.json"], "does not exist or is not writable"),
])
def test_bench_bad_input(argv, match):
    with pytest.raises(SystemExit, match=match):
        cli.bench(argv)


def test_bench_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="no CUDA GPU; bench times GPU kernels"):
        cli.main(["bench"])


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
        (["--prompt", "a red circle moving right on a dark blue background star"], "cannot read the background"),
        (["--frames", "30"], "4k\\+1"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--method", "neighborhood", "--kernel-size", "3", "3"], "one value or three"),
        (["--method", "neighborhood", "--kernel-size", "3", "20", "3", "--dense-steps", "0"], "kernel \\* dilation must be <= the grid length"),
        (["--pipeline", "image-dit", "--method", "radial"], "radial does not fit this flux pipeline; methods for it: \\['clear', 'neighborhood'\\]"),
        (["--pipeline", "image-dit", "--out", "x.mp4"], "--out must end in .png for the image-dit pipeline"),
        (["--pipeline", "image-dit", "--height", "100"], "multiples of 8"),
        (["--pipeline", "image-unet", "--method", "rau-net", "--height", "128", "--width", "128"],
         "runs only from 1.5x the size the U-Net was trained at \\(128 px\\).*>= 192 or lower --min-scale"),
        (["--pipeline", "image-unet", "--method", "tome", "--backend", "triton"], "--backend picks the attention kernel of"),
        (["--pipeline", "image-unet", "--method", "tome", "--precision", "int8"], "--precision sets the 8-bit kernel of"),
        (["--precision", "fp8", "--device", "cpu"], "--precision runs the 8-bit Triton kernel on a CUDA GPU"),
        (["--precision", "int8", "--backend", "flex"], "--precision runs on the triton backend only"),
        (["--guide", "soft-pag", "--guide-u", "2"], "u must be in"),
        (["--method", "headhunter", "--guide-heads", "1-0"], "--guide-heads takes LAYER:HEAD pairs"),
        (["--method", "headhunter"], "pass heads="),
        (["--method", "none"], "--method none runs nothing but dense; add --guide NAME"),
        (["--method", "soft-pag", "--guide", "stg"], "is a guidance method; pass the sparse method with --method"),
        (["--device", "tpu"], "--device must be cuda"),
        (["--pipeline", "image-unet", "--method", "hidiffusion", "--shifts", "sideways"], "shifts"),
        (["--pipeline", "image-unet", "--method", "agent", "--pool", "0"], "pool"),
        (["--prompt", "  "], "--prompt is empty"),
    ],
)
def test_bad_input_says_what_to_do(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=match) as err:
        cli.generate(cli._parse(["generate", *argv, *(SMALL if "--kernel-size" in argv else [])]))
    assert len(str(err.value)) < 1000 and "\n" not in str(err.value)  # one line, never the whole input echoed
    assert not list(tmp_path.iterdir())  # no clip written


def test_model_folder_checks_name_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    audio, flux = tmp_path / "audio", tmp_path / "flux"
    for folder, name in ((audio, "AudioLDMPipeline"), (flux, "FluxPipeline")):
        folder.mkdir()
        (folder / "model_index.json").write_text(f'{{"_class_name": "{name}"}}')
    for folder, out, match in ((tmp_path / "empty", "c.mp4", "no model_index.json"),
                               (audio, "c.mp4", "is a AudioLDMPipeline; use diffattn.apply"),
                               (flux, "c.mp4", "--out must end in .png for the image-dit pipeline"),  # the folder says image
                               (flux, "c.png", "could not load --model .*flux: ")):  # a folder without its weights
        with pytest.raises(SystemExit, match=match) as err:
            cli.generate(cli._parse(["generate", "--model", str(folder), "--out", str(tmp_path / out)]))
        assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.mp4"))


def test_method_options_are_typed_from_their_fields():
    cfg = cli._parse(["generate", "--pipeline", "image-unet", "--method", "agent", "--agents", "pool", "--pool", "2", "--fp32"])
    assert cfg.options == dict(agents="pool", pool=2, fp32=True) and isinstance(cfg.options["pool"], int)
    cfg = cli._parse(["generate", "--pipeline", "image-unet", "--shifts", "cyclic", "--no-aggressive"])
    assert cfg.options == dict(shifts="cyclic", aggressive=False)


def test_broken_model_index_and_dense_lora_guidance_say_what_to_do(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(SystemExit, match="model_index.json is not valid JSON"):
        cli.generate(cli._parse(["generate", "--model", str(broken), "--out", str(tmp_path / "c.mp4")]))
    lora = tmp_path / "dense_lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (lora / "diffattn.json").write_text('{"method": "dense", "kind": "lora", "options": {}, "frames": 29}')
    with pytest.raises(SystemExit, match="trained with dense attention; --guide needs a diffattn method"):
        cli.generate(cli._parse(["generate", "--lora", str(lora), "--guide", "stg", "--out", str(tmp_path / "c.mp4")]))


def test_cuda_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="no CUDA GPU; use --device cpu"):
        cli.generate(cli._parse(["generate", "--device", "cuda", "--out", str(tmp_path / "c.mp4")]))


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {c} " in text for c in ("generate", "mask", "bench", "demo", "train", "headhunter"))
    with pytest.raises(SystemExit, match="unknown command 'bogus'"):
        cli.main(["bogus"])


def test_vae_factors_read_every_video_familys_names():
    from types import SimpleNamespace

    from diffattn.app import run

    assert run.vae_factors(SimpleNamespace(vae_scale_factor_spatial=8, vae_scale_factor_temporal=4)) == (8, 4)  # Wan
    assert run.vae_factors(SimpleNamespace(vae_spatial_compression_ratio=32, vae_temporal_compression_ratio=8)) == (32, 8)  # LTX
    assert run.vae_factors(SimpleNamespace(vae_spatial_scale_factor=8, vae_temporal_scale_factor=6)) == (8, 6)  # Mochi
    with pytest.raises(NotImplementedError, match="names no VAE compression"):
        run.vae_factors(SimpleNamespace())
    assert {run.kind_of_class(n) for n in ("LTX2Pipeline", "MochiPipeline", "FluxPipeline", "StableDiffusionXLPipeline")} == {
        "video", "image-dit", "image-unet"}
