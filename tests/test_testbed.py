"""The trained testbed pipelines, the judge and the training scripts (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffattn_testbed import judge as judge_mod
from diffattn_testbed.metrics import psnr, ssim
from diffattn_testbed.pipelines import DEFAULTS, KINDS, TEXT_TOKENS, load_pipeline, pipeline_path
from diffattn_testbed.shapes import parse_caption, render, sample, unknown_words
from diffattn_testbed.training import EVAL_SEED, Clock, LossLog, folder_mb, scheduled_lr, warmup_lr

from helpers import run_twice_with_remove

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def video():
    return load_pipeline("video")


def _video(pipe, prompt="a red circle moving right on a dark blue background", seed=0, **kw):
    kw = {"num_inference_steps": 2, "height": 64, "width": 64, "num_frames": 9, "guidance_scale": 4.0,
          "max_sequence_length": DEFAULTS["video"]["max_sequence_length"], **kw}
    return lambda: torch.from_numpy(
        pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).frames
    )


def test_committed_pipelines_fit_the_size_budget():
    # fp16 safetensors, all three pipelines (the image pipelines share one VAE folder by symlink)
    total = sum(folder_mb(pipeline_path(k)) for k in KINDS) - folder_mb(pipeline_path("image-dit") / "vae")
    assert total <= 16.0, f"testbed pipelines take {total:.1f} MB; the budget is 16 MB"
    for kind in KINDS:
        record = json.loads((pipeline_path(kind) / "testbed.json").read_text())
        assert record["kind"] == kind and record["steps"] > 0


def test_plain_call_uses_the_trained_defaults(video):
    # steps overridden to keep CI fast; size and frames come from DEFAULTS
    frames = video(prompt="a blue star bouncing", num_inference_steps=1, output_type="np").frames
    d = DEFAULTS["video"]
    assert frames.shape == (1, d["num_frames"], d["height"], d["width"], 3)
    assert type(video).__mro__[2].__name__ == "WanPipeline"


def test_folder_loads_with_the_stock_class_and_matches(video):
    from diffusers import WanPipeline

    stock = WanPipeline.from_pretrained(str(pipeline_path("video")), torch_dtype=torch.float32)
    stock.set_progress_bar_config(disable=True)
    assert type(stock) is WanPipeline
    assert torch.equal(_video(stock)(), _video(video)())


def test_video_is_seeded_and_conditioned_on_the_prompt(video):
    # quality is the benchmark's job (benchmarks/quality.py); here: same seed and prompt reproduce,
    # another prompt changes the clip, another seed changes it too
    a = _video(video, "a white square standing still on a dark green background")()
    assert torch.equal(a, _video(video, "a white square standing still on a dark green background")())
    assert (a - _video(video, "a red star moving up on a black striped background")()).abs().mean() > 0.01
    assert (a - _video(video, "a white square standing still on a dark green background", seed=1)()).abs().mean() > 0.01


def test_video_pipeline_draws_the_prompted_colour_shape_and_motion(video):
    # the full default call (128x128, 29 frames, 25 steps; ~50 s on 2 CPU cores), read back by the judge
    judge = judge_mod.load_judge("video")
    prompts = ["a red square moving right on a black background", "a blue circle moving down on a dark gray background",
               "a yellow star standing still on a dark green background", "a white triangle moving left on a dark blue background"]
    frames = video(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(4)], output_type="np").frames
    right = judge_mod.score(judge, frames, prompts)["accuracy"]
    assert right["color"] >= 0.75 and right["shape"] >= 0.5 and right["motion"] >= 0.5, right
    wrong = judge_mod.score(judge, frames, prompts[1:] + prompts[:1])["accuracy"]  # each clip asked about another's prompt
    assert wrong["color"] <= right["color"] - 0.5, (right, wrong)
    # same colours and motions, other shapes: only the shape answer may change
    other = [p.replace(a, b) for p, (a, b) in zip(prompts, [("square", "circle"), ("circle", "star"), ("star", "triangle"), ("triangle", "square")])]
    swapped = judge_mod.score(judge, frames, other)["accuracy"]
    assert swapped["shape"] <= right["shape"] - 0.5 and swapped["color"] == right["color"], (right, swapped)


def test_radial_dense_config_equals_stock_and_remove_restores(video):
    stock, applied = run_twice_with_remove(video, _video(video), "radial", dense_steps=100, block_size=64)
    assert torch.equal(stock, applied)
    stock, applied = run_twice_with_remove(video, _video(video), "radial", dense_steps=0, dense_layers=0, block_size=16)
    assert not torch.equal(stock, applied)


@pytest.mark.parametrize("kind", ["image-dit", "image-unet"])
def test_image_pipelines_load_and_run_at_their_defaults(kind):
    pipe = load_pipeline(kind)
    images = pipe(prompt="a red circle on a black background", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, DEFAULTS[kind]["height"], DEFAULTS[kind]["width"], 3)
    assert np.isfinite(images).all() and images.std() > 0.01


@pytest.mark.parametrize("kind", ["image-dit", "image-unet"])
def test_image_pipelines_draw_the_prompted_colour_and_shape(kind):
    pipe = load_pipeline(kind)
    judge = judge_mod.load_judge("image")
    prompts = ["a red square on a black background", "a blue circle on a dark gray background",
               "a yellow ring on a dark green background", "a green cross on a dark blue background"]
    images = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(4)], output_type="np").images
    acc = judge_mod.score(judge, images, prompts)["accuracy"]
    assert acc["color"] >= 0.75 and acc["shape"] >= 0.5, acc


@pytest.mark.parametrize("kind", ["video", "image"])
def test_judge_reads_rendered_scenes_and_rejects_wrong_prompts(kind):
    judge = judge_mod.load_judge(kind)
    clips = [sample(EVAL_SEED + 500 + i, image=kind == "image", max_objects=2) for i in range(16)]
    frames = np.stack([render(c, frames=29 if kind == "video" else 1, height=128, width=128) for c in clips]) / 255.0
    prompts = [c.caption for c in clips]
    right = judge_mod.score(judge, frames, prompts)["accuracy"]
    assert min(right.values()) >= 0.85, right
    wrong = judge_mod.score(judge, frames, prompts[1:] + prompts[:1])["accuracy"]  # every sample gets another's prompt
    assert wrong["shape"] < right["shape"] - 0.3, (right, wrong)


def test_judge_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_judge"):
        judge_mod.load_judge("video", path=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="one sample per prompt"):
        judge_mod.score(judge_mod.load_judge("image"), np.zeros((2, 64, 64, 3)), ["a red circle"])


def test_long_prompts_are_refused_not_truncated(video):
    long = " and ".join(["a red circle moving right"] * 8)  # 48 tokens with </s>; the testbed reads TEXT_TOKENS (32)
    with pytest.raises(ValueError, match="48 tokens but this pipeline reads 32"):
        video(prompt=long, num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_prompt has 48 tokens"):
        video(prompt="a red circle", negative_prompt=long, num_inference_steps=1)
    with pytest.raises(ValueError, match="48 tokens but this pipeline reads 32"):
        load_pipeline("image-dit")(prompt=long, num_inference_steps=1)
    # the longest generated caption (3 objects) fits
    longest = max((sample(s, max_objects=3).caption for s in range(3000)), key=lambda c: len(c.split()))
    assert len(video.tokenizer(longest).input_ids) <= TEXT_TOKENS


def test_learning_rate_schedule():
    assert warmup_lr(0, 1.0, 10) == pytest.approx(0.1) and warmup_lr(50, 1.0, 10) == 1.0
    flat = [scheduled_lr(s, 1.0, 10, decay=0.0, progress=s / 100) for s in range(100)]
    assert flat[10:] == [1.0] * 90
    annealed = [scheduled_lr(s, 1.0, 10, decay=0.3, progress=(s + 1) / 100) for s in range(100)]
    assert annealed[69] == 1.0 and annealed[84] == pytest.approx(0.5) and annealed[99] == 0.0
    assert all(a >= b for a, b in zip(annealed[10:], annealed[11:]))  # monotone after warm-up


def test_loss_log_means_and_keeps_no_loss_buffer():
    # mse_loss(mean) returns a 0-dim view of its elementwise buffer: holding it would hold that buffer
    a, b = torch.randn(4, 1000), torch.randn(4, 1000)
    probe = torch.nn.functional.mse_loss(a, b)
    assert probe.untyped_storage().nbytes() > 4 * 100  # the pytorch behaviour LossLog guards against
    log, values = LossLog(Clock(None), every=5), []
    for step in range(12):
        loss = torch.nn.functional.mse_loss(a * (step + 1), b)
        values.append(float(loss))
        log.add(step, loss, last=step == 11)
        assert log.total is None or log.total.untyped_storage().nbytes() == 4
    assert log.mean() == pytest.approx(np.mean(values[11:12]))  # the window since the step-10 line
    log.add(12, loss)
    log.add(13, loss * 3)
    assert log.mean() == pytest.approx(2 * values[11])


def test_load_pipeline_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        load_pipeline("audio")
    with pytest.raises(FileNotFoundError, match="train_video"):
        load_pipeline("video", path=tmp_path)


def test_captions_parse_back_to_their_labels():
    for seed in range(300):
        clip = sample(seed)
        got = parse_caption(clip.caption)
        assert [(o["color"], o["shape"], o["motion"]) for o in got] == [(o.color, o.shape, o.motion) for o in clip.objects]
        assert unknown_words(clip.caption) == []
    assert parse_caption("A Red circle moving right") == [{"color": "red", "shape": "circle", "motion": "right"}]
    assert parse_caption("a red circle on a black checkered background") == [{"color": "red", "shape": "circle", "motion": None}]
    assert unknown_words("a red zebra") == ["zebra"]
    for bad, match in [("a circle", "cannot read"), ("a red circle moving sideways", "unknown motion"),
                       ("a red circle and a red star", "color twice"),
                       ("a red circle on a dark blue background star", "cannot read the background"),
                       ("a red circle moving right on a blue circle", "cannot read the background"),
                       ("a red circle on a background", "cannot read the background")]:
        with pytest.raises(ValueError, match=match):
            parse_caption(bad)


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.random((2, 32, 32, 3))
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    noisier = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
    assert psnr(a, noisier) < psnr(a, noisy) < 30 and ssim(a, noisier) < ssim(a, noisy) < 1
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[:1])


def test_training_scripts_run_end_to_end(tmp_path):
    # tiny sizes: the scripts save loadable pipelines with their training record
    from diffattn_testbed import train_image, train_judge, train_video

    common = ["--workers", "1", "--device", "cpu"]
    train_video.main(["--out", str(tmp_path / "video"), "--size", "32", "--frames", "9", "--scenes", "8",
                      "--vae-scenes", "4", "--vae-steps", "1", "--vae-crop", "5", "--vae-batch", "1", "--steps", "2",
                      "--batch", "2", *common])
    train_image.main(["--kind", "vae", "--out", str(tmp_path / "vae"), "--size", "32", "--scenes", "8",
                      "--vae-steps", "1", "--vae-batch", "2", *common])
    train_image.main(["--kind", "image-unet", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "unet"),
                      "--size", "32", "--scenes", "8", "--steps", "2", "--batch", "2", *common])
    train_image.main(["--kind", "image-unet", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "unet2"),
                      "--init", str(tmp_path / "unet"), "--size", "32", "--scenes", "8", "--steps", "1", "--batch", "2",
                      *common])
    train_judge.main(["--kind", "image", "--out", str(tmp_path / "j.safetensors"), "--scenes", "16", "--steps", "2",
                      "--batch", "4", "--eval-scenes", "4", *common])
    # a decoder-only VAE round keeps the encoder and the latent statistics the transformer was trained with
    train_video.main(["--init", str(tmp_path / "video"), "--out", str(tmp_path / "video-dec"), "--size", "32", "--frames", "9",
                      "--vae-scenes", "4", "--vae-steps", "2", "--vae-train", "decoder", "--vae-crop", "9", "--vae-batch", "1",
                      "--steps", "0", *common])
    train_video.main(["--init", str(tmp_path / "video"), "--vae-from", str(tmp_path / "video-dec"), "--out", str(tmp_path / "video2"),
                      "--size", "32", "--frames", "9", "--scenes", "4", "--scene-offset", "100", "--vae-steps", "0", "--steps", "1",
                      "--batch", "2", *common])
    from safetensors.torch import load_file

    before, after = (load_file(str(tmp_path / d / "vae" / "diffusion_pytorch_model.safetensors")) for d in ("video", "video2"))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    cfg_before, cfg_after = (json.loads((tmp_path / d / "vae" / "config.json").read_text()) for d in ("video", "video2"))
    assert cfg_before["latents_std"] == cfg_after["latents_std"] and cfg_before["latents_mean"] == cfg_after["latents_mean"]
    record = json.loads((tmp_path / "video2" / "testbed.json").read_text())
    assert record["steps"] == 1 and record["history"][-1]["vae_from"] == str(tmp_path / "video-dec")
    assert record["history"][-1]["rounds"][-1]["vae"]["train"] == "decoder"
    with pytest.raises(SystemExit, match="held-out seeds"):
        train_video.main(["--out", str(tmp_path / "x"), "--scene-offset", str(EVAL_SEED), *common])

    record = json.loads((tmp_path / "unet2" / "testbed.json").read_text())
    assert record["steps"] == 1 and record["history"][0]["steps"] == 2
    pipe = load_pipeline("video", path=tmp_path / "video")
    assert pipe(prompt="a red circle", num_inference_steps=1, height=32, width=32, num_frames=5, output_type="np").frames.shape == (1, 5, 32, 32, 3)
    assert judge_mod.load_judge("image", path=tmp_path / "j.safetensors").config.kind == "image"


def _benchmark_module(name: str = "quality"):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"diffattn_{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_dense_only_and_method_errors(tmp_path):
    quality = _benchmark_module()
    out = tmp_path / "rows.json"
    rows = quality.main(["--kinds", "image-dit", "--prompts", "2", "--batch", "2", "--device", "cpu", "--methods", "dense",
                         "--json", str(out)])
    assert [r["method"] for r in rows] == ["dense"] and json.loads(out.read_text()) == rows
    assert set(rows[0]) >= {"judge_color", "judge_shape", "s_per_sample"}
    with pytest.raises(SystemExit, match="unknown method"):
        quality.main(["--kinds", "image-dit", "--methods", "radial,bogus", "--device", "cpu"])


def test_sweep_applies_each_setting_and_leaves_the_pipeline_as_it_was(tmp_path):
    sweep = _benchmark_module("sweep")
    assert sweep.parse_setting("default") == {}
    assert sweep.parse_setting("guidance_scale=3,flow_shift=4.5,scheduler=euler") == {
        "guidance_scale": 3, "flow_shift": 4.5, "scheduler": "euler"}
    with pytest.raises(SystemExit, match="key=value"):
        sweep.parse_setting("guidance_scale")
    pipe = load_pipeline("image-dit")
    prompts = [sample(EVAL_SEED + i, image=True, max_objects=2).caption for i in range(2)]

    def run(**setting):
        return sweep.run_setting(pipe, "image-dit", {"num_inference_steps": 2, **setting}, prompts, [0, 1], 2, "cpu")

    scheduler = pipe.scheduler
    base = run()
    np.testing.assert_array_equal(run(), base)  # same seeds, same samples
    assert np.abs(run(true_cfg_scale=1.0) - base).max() > 1e-3  # a call argument reaches the pipeline
    assert np.abs(run(shift=3.0, use_dynamic_shifting=False) - base).max() > 1e-3  # so does a scheduler key
    assert pipe.scheduler is scheduler
    np.testing.assert_array_equal(run(), base)  # nothing stuck to the pipeline
    with pytest.raises(SystemExit, match="true_cfg_scale"):
        run(bogus=1)
    with pytest.raises(SystemExit, match="choose from"):
        run(scheduler="ddim")
    out = tmp_path / "rows.json"
    rows = sweep.main(["--kind", "image-dit", "--prompts", "2", "--batch", "2", "--device", "cpu", "--json", str(out),
                       "num_inference_steps=2", "num_inference_steps=2,dtype=float32"])
    assert [r["setting"] for r in rows] == ["num_inference_steps=2", "num_inference_steps=2,dtype=float32"]
    assert json.loads(out.read_text()) == rows and {r["judge_shape"] for r in rows} == {rows[0]["judge_shape"]}
    with pytest.raises(SystemExit, match="unknown setting 'bogus'"):
        sweep.main(["--kind", "image-dit", "--device", "cpu", "default", "bogus=2"])
