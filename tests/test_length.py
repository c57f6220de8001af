"""The LoRA length-extension trainer at tiny size on CPU: resuming after a kill loses at most one
checkpoint interval and gives the uninterrupted result; bad clips are reported and skipped or
refused; the LoRA loads through diffattn (alone or beside a style LoRA) and diffusers; bad inputs
raise naming the fix. On the GPU: a radial training step on the Triton kernels gives the gradients
of the masked-SDPA twin."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffattn
from diffattn.lora import length
from diffattn.lora.video_data import BadClip
from diffattn_testbed.pipelines import load_pipeline
from diffattn_testbed.shapes import render, sample

FRAMES, SIZE = 13, 64  # 4 latent frames of 8 x 8 tokens


def _clips(count=4, first=200_000):
    def clips(frames, height, width, report):
        for seed in range(first, first + count):
            scene = sample(seed, max_objects=2)
            yield f"scene {seed}", render(scene, frames=frames, height=height, width=width), scene.caption
    return clips


def _cfg(out, **kw):
    base = dict(out=str(out), frames=FRAMES, height=SIZE, width=SIZE, steps=4, checkpoint_every=2, batch_size=2,
                lora_rank=4, lora_alpha=8, dense_blocks=1, mixed_precision="no", max_sequence_length=32, warmup=1,
                lr=1e-3, self_generate=4)
    return length.LengthConfig(**{**base, **kw})


def _train(cfg, clips=None, **kw):
    return length.train(cfg, pipe=load_pipeline("video"), clips=clips or _clips(), **kw)


def _call(pipe, frames=FRAMES):
    with torch.no_grad():
        return pipe(prompt=sample(7, max_objects=2).caption, height=SIZE, width=SIZE, num_frames=frames, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(_cfg(tmp_path_factory.mktemp("whole")))


@pytest.mark.cpu
def test_resume_after_a_kill_gives_the_uninterrupted_result(trained, tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(length.Killed):
        _train(cfg, _stop_after=3)  # killed after step 3: the step-2 checkpoint survives
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]
    _train(cfg, clips=lambda *a: pytest.fail("the cached data is reused"))  # the same command again
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3, 4]  # step 3 redone: one interval at most
    a = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 4 * 6  # lora_A/B of q, k, v, out in each of the 6 blocks
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="other options.*lora_rank"):
        _train(dataclasses.replace(cfg, lora_rank=2))


@pytest.mark.cpu
def test_lora_targets_the_self_attention_projections(trained):
    keys = load_file(str(trained / "pytorch_lora_weights.safetensors")).keys()
    assert all(".attn1." in k for k in keys)  # not the cross-attention
    modules = {k.split(".lora_")[0] for k in keys}
    assert {m.rsplit(".attn1.", 1)[1] for m in modules} == {"to_q", "to_k", "to_v", "to_out.0"}
    meta = json.loads((trained / "diffattn.json").read_text())
    assert meta["method"] == "radial" and meta["frames"] == FRAMES and meta["options"]["dense_layers"] == 1
    assert meta["options"]["block_size"] == 64  # the testbed pipeline's declared radial option, as trained


@pytest.mark.cpu
def test_training_leaves_the_callers_pipeline_as_it_was(tmp_path):
    pipe = load_pipeline("video")
    pipe.text_encoder.requires_grad_(False)  # a mix of states, all restored
    grads = {n: [p.requires_grad for p in m.parameters()] for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    before = _call(pipe)
    length.train(_cfg(tmp_path, steps=2), pipe=pipe, clips=_clips())
    assert not getattr(pipe.transformer, "peft_config", None) and not pipe.transformer.training
    assert not pipe.transformer.is_gradient_checkpointing
    assert grads == {n: [p.requires_grad for p in m.parameters()] for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert torch.equal(_call(pipe), before)
    with pytest.raises(length.Killed):  # also after a failure mid-run
        length.train(_cfg(tmp_path / "k", steps=4), pipe=pipe, clips=_clips(), _stop_after=1)
    assert not getattr(pipe.transformer, "peft_config", None) and torch.equal(_call(pipe), before)


@pytest.mark.cpu
def test_lora_loads_through_diffattn_and_diffusers(trained):
    pipe = load_pipeline("video")
    stock = _call(pipe)
    with diffattn.apply(pipe, "radial", dense_layers=1):
        untuned = _call(pipe)
    with diffattn.apply(pipe, "radial", lora=trained) as handle:
        tuned = _call(pipe)
        assert handle.method.config.dense_layers == 1  # the trained option
        assert pipe.transformer.peft_config["diffattn"].lora_alpha == 8  # alpha from the file's metadata
    assert not torch.equal(tuned, untuned) and not torch.equal(tuned, stock)
    assert torch.equal(_call(pipe), stock)  # remove() unloads it: bit-identical
    pipe.load_lora_weights(str(trained), adapter_name="len")  # plain diffusers
    assert pipe.transformer.peft_config["len"].r == 4 and pipe.transformer.peft_config["len"].lora_alpha == 8
    with diffattn.apply(pipe, "radial", dense_layers=1):
        assert torch.equal(_call(pipe), tuned)


@pytest.mark.cpu
def test_length_lora_joins_a_style_lora_and_leaves_it_as_it_was(trained, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline("video")
    model = pipe.transformer
    # on the same projections as the length LoRA, and one more
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["attn1.to_q", "ffn.net.2"]),
                      adapter_name="tmp")
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="tmp"))
    model.unload_lora()
    pipe.load_lora_weights(str(tmp_path), adapter_name="style")
    pipe.set_adapters(["style"], [0.5])
    styled = _call(pipe)
    with diffattn.apply(pipe, "radial", lora=trained, lora_scale=0.8):
        both = _call(pipe)
        assert sorted(model.active_adapters()) == ["diffattn", "style"]
    assert model.active_adapters() == ["style"] and torch.equal(_call(pipe), styled)
    with diffattn.apply(pipe, "radial", lora=trained):  # an adapter loaded meanwhile stays after remove()
        pipe.load_lora_weights(str(tmp_path), adapter_name="later")
    assert sorted(model.peft_config) == ["later", "style"]
    pipe.load_lora_weights(str(trained), adapter_name="len")
    pipe.set_adapters(["style", "len"], [0.5, 0.8])
    with diffattn.apply(pipe, "radial", dense_layers=1):
        torch.testing.assert_close(_call(pipe), both, atol=1e-6, rtol=1e-5)
    pipe.delete_adapters(["len", "later"])
    pipe.fuse_lora()
    with pytest.raises(RuntimeError, match="fused LoRA.*unfuse_lora"):
        diffattn.apply(pipe, "radial", lora=trained)
    assert sorted(model.peft_config) == ["style"]


@pytest.mark.cpu
def test_bad_clips_are_reported_and_skipped_or_refused(tmp_path, capsys):
    import imageio.v3 as iio

    data = tmp_path / "clips"
    data.mkdir()
    for i, seed in enumerate(range(200_000, 200_003)):
        scene = sample(seed, max_objects=2)
        iio.imwrite(data / f"good_{i}.mp4", render(scene, frames=FRAMES, height=80, width=96), fps=8)  # resized + cropped
        (data / f"good_{i}.txt").write_text(scene.caption)
    iio.imwrite(data / "short.mp4", render(sample(1), frames=5, height=SIZE, width=SIZE), fps=8)
    (data / "short.json").write_text(json.dumps({"caption": sample(1).caption}))
    (data / "broken.mp4").write_bytes(b"not a video at all")
    (data / "broken.txt").write_text(sample(2).caption)
    iio.imwrite(data / "nocaption.mp4", render(sample(3), frames=FRAMES, height=SIZE, width=SIZE), fps=8)
    iio.imwrite(data / "words.mp4", render(sample(4), frames=FRAMES, height=SIZE, width=SIZE), fps=8)
    (data / "words.txt").write_text("a purple dragon moving left")
    cfg = _cfg(tmp_path / "run", self_generate=0, data=str(data), steps=1)
    with pytest.raises(ValueError, match=r"1 no caption.*1 too short: short.mp4 \(5 frames, 7 needed for 13 at 16 fps \(the file has 8\)\)"
                                         r".*1 unknown words.*dragon.*1 unreadable"):
        length.train(dataclasses.replace(cfg, on_bad="refuse"), pipe=load_pipeline("video"))
    length.train(dataclasses.replace(cfg, out=str(tmp_path / "run2")), pipe=load_pipeline("video"))
    assert "3 clips used, 1 no caption" in capsys.readouterr().out
    index = json.loads((tmp_path / "run2" / "data" / "index.json").read_text())
    assert index["clips"] == ["good_0.mp4", "good_1.mp4", "good_2.mp4"] and index["report"]["skipped"]["too short"] == 1


@pytest.mark.cpu
def test_a_run_started_before_an_option_existed_still_resumes(tmp_path):
    from diffattn.lora.common import check_resume

    cfg = _cfg(tmp_path)
    check_resume(tmp_path, cfg, length.RESUMABLE, "length")
    saved = json.loads((tmp_path / "config.json").read_text())
    for newer in ("lr_decay", "fsdp"):  # options this run's version did not have
        del saved[newer]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume(tmp_path, cfg, length.RESUMABLE, "length")  # their defaults are what it ran with
    check_resume(tmp_path, dataclasses.replace(cfg, fsdp=True), length.RESUMABLE, "length")  # the same checkpoint files
    with pytest.raises(ValueError, match="lr_decay: 0.0 -> 0.5"):
        check_resume(tmp_path, dataclasses.replace(cfg, lr_decay=0.5), length.RESUMABLE, "length")


@pytest.mark.cpu
def test_bad_trainer_inputs_name_the_fix(tmp_path, trained):
    with pytest.raises(ValueError, match="4k\\+1.*nearest valid lengths are 13 and 17"):
        _train(_cfg(tmp_path / "a", frames=15))
    assert not (tmp_path / "a" / "config.json").exists()  # a typo leaves nothing that blocks the corrected command
    with pytest.raises(ValueError, match="cannot go in --method-options"):
        _train(_cfg(tmp_path / "a", method_options="dense_steps=3"))
    with pytest.raises(ValueError, match="decay"):
        _train(_cfg(tmp_path / "a", method_options="decay=-1.0"))
    with pytest.raises(ValueError, match="lr_decay is a share of the steps"):
        _cfg(tmp_path, lr_decay=1.5)
    with pytest.raises(ValueError, match="pass --frames"):
        _train(_cfg(tmp_path / "b", frames=0))
    with pytest.raises(ValueError, match="unknown method 'radiall'"):
        _cfg(tmp_path, method="radiall")
    with pytest.raises(ValueError, match="not a Python literal"):
        _cfg(tmp_path, method_options="decay=fast")
    with pytest.raises(ValueError, match="multiples of 8"):
        _train(_cfg(tmp_path / "c", height=60))
    with pytest.raises(ValueError, match="no usable training clips.*too short"):
        _train(_cfg(tmp_path / "d"), clips=lambda f, h, w, r: [("x", np.zeros((3, SIZE, SIZE, 3), np.uint8), "a red circle")])
    with pytest.raises(ValueError, match="was built for other data.*frames"):  # a shared cache of another length
        _train(_cfg(tmp_path / "e", frames=17, data_cache=str(trained / "data")))
    from diffattn_testbed.tiny import tiny_wan_pipeline

    i2v = load_pipeline("video")
    i2v.transformer.register_to_config(in_channels=36)  # as Wan's image-to-video transformer declares
    with pytest.raises(ValueError, match="image-to-video model.*text-to-video pipelines only"):
        length.train(_cfg(tmp_path / "f"), pipe=i2v, clips=_clips())
    other = tiny_wan_pipeline()
    with pytest.raises(ValueError, match="trained on another base model"):
        diffattn.apply(other, "radial", lora=trained)
    meta = json.loads((trained / "diffattn.json").read_text())
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "pytorch_lora_weights.safetensors").write_bytes((trained / "pytorch_lora_weights.safetensors").read_bytes())
    (dense / "diffattn.json").write_text(json.dumps({**meta, "method": "dense", "options": {}}))
    with pytest.raises(ValueError, match="trained with dense attention.*load_lora_weights"):
        diffattn.apply(load_pipeline("video"), "radial", lora=dense)


@pytest.mark.cpu
def test_clips_are_resampled_to_the_models_frame_rate(tmp_path):
    import imageio.v3 as iio

    from diffattn.lora.video_data import frame_indices, read_video

    assert frame_indices(4, 32, 16) == [0, 2, 4, 6] and frame_indices(4, 8, 16) == [0, 0, 1, 1]
    assert frame_indices(3, None, None) == [0, 1, 2]
    with pytest.raises(BadClip, match="no frame rate.*--fps -1"):
        frame_indices(3, None, 16)
    pixels = np.zeros((9, SIZE, SIZE, 3), np.uint8)
    pixels[:, :, :, 0] = (np.arange(9) * 28)[:, None, None]  # frame i has red 28 i
    iio.imwrite(tmp_path / "c.mp4", pixels, fps=32)
    got = read_video(tmp_path / "c.mp4", 5, SIZE, SIZE, fps=16)  # every second frame
    np.testing.assert_allclose(got[..., 0].float().mean(dim=(1, 2)).numpy(), [0, 56, 112, 168, 224], atol=8)
    with pytest.raises(BadClip, match="9 frames, 11 needed for 6 at 16 fps"):
        read_video(tmp_path / "c.mp4", 6, SIZE, SIZE, fps=16)
    assert read_video(tmp_path / "c.mp4", 9, SIZE, SIZE, fps=None).shape == (9, SIZE, SIZE, 3)  # --fps -1: as decoded


@pytest.mark.cpu
def test_caption_check_reads_clip_style_tokenizers():
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from diffattn.lora.video_data import check_caption

    vocab = {"<|endoftext|>": 0, "a": 1, "red": 2, "circle": 3}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<|endoftext|>"))  # CLIP: the unknown token is the end token
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    clip = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|endoftext|>")
    check_caption("a red circle", [clip], 77)
    with pytest.raises(BadClip, match="unknown words.*'blue'"):
        check_caption("a blue circle", [clip], 77)
    with pytest.raises(BadClip, match="caption too long: 4 tokens"):
        check_caption("a red circle", [clip], 3)


@pytest.mark.cpu
def test_dense_method_trains_on_the_stock_processors(tmp_path):
    out = _train(_cfg(tmp_path, method="dense", steps=4, checkpoint_every=4, lr_decay=0.5))
    meta = json.loads((out / "diffattn.json").read_text())
    assert meta["method"] == "dense" and meta["options"] == {}
    # lr_decay 0.5: full rate for the first half of the steps, then a linear ramp to 0
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 0.0])  # the rate after each step: the last step ran at half


@pytest.mark.cpu
def test_cli_trains_and_generates_with_the_lora(tmp_path, capsys):
    from diffattn.app import cli

    out = tmp_path / "cli"
    cli.main(["train", "length", "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--self-generate", "4",
              "--steps", "2", "--batch-size", "2", "--lora-rank", "4", "--mixed-precision", "no", "--dense-blocks", "1",
              "--validate-every", "2", "--validation-steps", "1", "--out", str(out)])
    assert (out / "validation" / "step_0000002.mp4").stat().st_size > 0
    report = cli.generate(cli._parse(["generate", "--lora", str(out), "--height", str(SIZE), "--width", str(SIZE), "--steps", "1", "--dense-steps", "0",
                                      "--warmup", "--out", str(tmp_path / "clip.mp4")]))  # the warm-up keeps the LoRA's dense layers
    assert report["files"][0].endswith("clip.mp4") and "with the LoRA" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--self-generate renders the testbed"):
        cli.main(["train", "length", "--pipeline", "/some/wan", "--frames", "13", "--self-generate", "4"])


@pytest.mark.cpu
def test_compile_option_runs_the_first_step_eagerly_and_may_change_on_resume(tmp_path, monkeypatch):
    compiles, calls = [], []

    def compile_spy(fn, **kw):  # stands for torch.compile: counts the calls of the "compiled" function
        compiles.append((getattr(fn, "__name__", ""), kw))

        def compiled_fn(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        return compiled_fn

    monkeypatch.setattr(torch, "compile", compile_spy)
    cfg = _cfg(tmp_path, steps=3, checkpoint_every=1, compile=True)
    _train(cfg)
    assert compiles == [("forward", {"dynamic": False})]  # the family's forward, not the caller's module
    assert len(calls) == 2  # step 1 eager (the descriptions are built outside the graph), steps 2-3 compiled
    _train(dataclasses.replace(cfg, steps=5))  # a resume: its first step (4) eager again, step 5 compiled
    assert len(calls) == 3
    _train(dataclasses.replace(cfg, steps=6, compile=False))  # a speed option: the run resumes without it
    assert len(calls) == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="without --compile"):
        _train(dataclasses.replace(cfg, steps=7, context_parallel="ulysses=2"))


@pytest.mark.cpu
def test_compiled_training_matches_eager_and_compiles_once(tmp_path, trained, monkeypatch):
    import functools

    import torch._dynamo

    # dynamo and AOTAutograd trace forward and backward as with inductor, without its code generation
    # (which costs a minute and a half on CI's CPUs); the GPU test runs inductor
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _train(_cfg(tmp_path, compile=True))  # the fixture's run (gradient checkpointing on), compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    assert not breaks  # the first step built the descriptions eagerly; nothing is written inside the graph
    assert graphs == 1  # step 2 traces; steps 3 and 4 run its code (a recompile per step would add one each)
    a = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3)


@pytest.mark.cpu
def test_hunyuan_video_trains_and_loads(tmp_path):
    from diffattn_testbed.tiny import tiny_hunyuan_pipeline

    cfg = _cfg(tmp_path, steps=2, max_sequence_length=24, method_options="block_size=64", lora_alpha=0)
    out = length.train(cfg, pipe=tiny_hunyuan_pipeline(), clips=_clips(2))
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[1] for k in keys} == {"transformer_blocks", "single_transformer_blocks"}  # dual and single stream
    assert any(".attn.to_out.0." in k for k in keys) and not any("add_q_proj" in k for k in keys)
    pipe = tiny_hunyuan_pipeline()
    call = dict(prompt=sample(7).caption, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2,
                output_type="latent", max_sequence_length=24)
    with torch.no_grad():
        stock = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
        with diffattn.apply(pipe, "radial", lora=out, dense_steps=0) as handle:  # 2 steps: no dense warm-up
            tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
            assert handle.method.config.dense_layers == 1 and handle.summary()["method_calls"] > 0
        assert not torch.equal(tuned, stock)
        assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).frames, stock)


@pytest.mark.gpu
def test_radial_training_step_on_triton_matches_the_sdpa_twin():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peft import LoraConfig

    pipe = load_pipeline("video", device="cuda", dtype=torch.bfloat16)
    model = pipe.transformer
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=length.lora_targets(model)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 8, 29, 32, 32, device="cuda", generator=g)  # 4x the trained length: 29 latent frames
    text = torch.randn(2, 32, 64, device="cuda", generator=g)
    grads = {}
    for backend in ("triton", "sdpa"):
        model.zero_grad(set_to_none=True)
        with diffattn.apply(model, "radial", backend=backend, block_size=64, dense_steps=0, dense_layers=1) as handle:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(hidden_states=x, timestep=torch.tensor([500.0, 800.0], device="cuda"), encoder_hidden_states=text,
                            return_dict=False)[0]
            out.float().square().mean().backward()
            assert set(handle.summary()["backends"]) == {backend}
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, ref in grads["sdpa"].items():
        err = (grads["triton"][name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 2e-2, (name, float(err))


@pytest.mark.gpu
def test_compiled_radial_training_matches_eager_on_the_gpu(tmp_path):
    """``compile=True``: the LoRA after three radial steps on the Triton kernels equals the eager run's
    (bf16 autocast; the compiled graph fuses the element-wise work, so bit equality is not expected)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import torch._dynamo

    weights = {}
    for compiled in (False, True):
        cfg = _cfg(tmp_path / str(compiled), steps=3, checkpoint_every=3, mixed_precision="bf16", compile=compiled,
                   gradient_checkpointing=False, backend="triton", frames=29, height=128, width=128)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = length.train(cfg, pipe=load_pipeline("video", device="cuda"), clips=_clips())
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (1 if compiled else 0)
        weights[compiled] = load_file(str(out / "pytorch_lora_weights.safetensors"))
    for key, ref in weights[False].items():
        err = (weights[True][key] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 2e-2, (key, float(err))
