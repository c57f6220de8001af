"""The CLEAR distillation trainer at tiny size on CPU: resuming after a kill loses at most one
checkpoint interval and gives the uninterrupted result; the output loads through diffattn and
through diffusers' LoRA loader; bad inputs raise naming the fix."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import diffattn
from diffattn.lora import clear_distill
from diffattn_testbed.pipelines import load_pipeline
from diffattn_testbed.shapes import sample

pytestmark = pytest.mark.cpu

PROMPTS = [sample(i, image=True).caption for i in range(4)]


def _cfg(out, **kw):
    base = dict(pipeline="testbed", out=str(out), radius=3, attn_every=1, num_samples=4, steps=4, checkpoint_every=2,
                gen_steps=2, batch_size=2, mixed_precision="no", height=64, width=64, rank=4, max_sequence_length=32,
                warmup=1, lr=1e-3)
    return clear_distill.DistillConfig(**{**base, **kw})


def _train(cfg, **kw):
    return clear_distill.train(cfg, pipe=load_pipeline("image-dit"), prompts=PROMPTS, **kw)


def _call(pipe):
    with torch.no_grad():
        return pipe(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(_cfg(tmp_path_factory.mktemp("whole")))


def test_resume_after_a_kill_gives_the_uninterrupted_result(trained, tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(clear_distill.Killed):
        _train(cfg, _stop_after=3)  # killed after step 3: the step-2 checkpoint survives
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]
    _train(cfg)  # the same command again
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 3, 4]  # step 3 redone: one interval at most
    a = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="other options.*radius"):
        _train(dataclasses.replace(cfg, radius=2))


@pytest.mark.parametrize("full", [False, True])
def test_training_leaves_the_callers_pipeline_as_it_was(tmp_path, full):
    pipe = load_pipeline("image-dit")
    keys = {k: v.dtype for k, v in pipe.transformer.state_dict().items()}
    before = _call(pipe)
    clear_distill.train(_cfg(tmp_path, full=full, steps=2), pipe=pipe, prompts=PROMPTS)
    assert {k: v.dtype for k, v in pipe.transformer.state_dict().items()} == keys
    assert not pipe.transformer.training and not any(p.requires_grad for p in pipe.transformer.parameters())
    assert torch.equal(_call(pipe), before)
    assert (tmp_path / ("full_weights.safetensors" if full else "pytorch_lora_weights.safetensors")).is_file()


def test_student_loads_through_diffattn_and_diffusers(trained):
    pipe = load_pipeline("image-dit")
    stock = _call(pipe)
    with diffattn.apply(pipe, "clear", radius=3):
        zero_shot = _call(pipe)
    with diffattn.apply(pipe, "clear", lora=trained) as handle:  # radius from the student's diffattn.json
        student = _call(pipe)
        assert handle.method.config.radius == 3
    assert torch.equal(_call(pipe), stock), "remove() must unload the student bit for bit"
    assert (student - zero_shot).abs().max() > 1e-4
    pipe.load_lora_weights(str(trained), weight_name="pytorch_lora_weights.safetensors")
    with diffattn.apply(pipe, "clear", radius=3):
        via_diffusers = _call(pipe)
    torch.testing.assert_close(via_diffusers, student, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="has LoRA adapters loaded"):  # the student is trained on the bare base
        diffattn.apply(pipe, "clear", lora=trained)


def test_trained_weights_refuse_another_radius_or_base(trained):
    pipe = load_pipeline("image-dit")
    with pytest.raises(ValueError, match="trained with radius=3, not radius=5"):
        diffattn.apply(pipe, "clear", radius=5, lora=trained)
    from diffattn_testbed.tiny import tiny_flux_transformer

    with pytest.raises(ValueError, match="another base model"):
        diffattn.apply(tiny_flux_transformer(), "clear", lora=trained)
    with pytest.raises(ValueError, match="not a diffattn training output"):
        diffattn.apply(pipe, "clear", lora=trained / "data")
    assert not any(type(p).__module__.startswith("diffattn") for p in pipe.transformer.attn_processors.values())


def test_a_run_stopped_by_its_deadline_exports_nothing_and_resumes(tmp_path):
    cfg = _cfg(tmp_path, max_minutes=1e-6)  # past the deadline after the first step
    _train(cfg)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]
    _train(dataclasses.replace(cfg, max_minutes=0.0))  # a resumable option: the run finishes
    assert json.loads((tmp_path / "diffattn.json").read_text())["steps"] == 4


def test_bad_trainer_inputs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="has .* tokens but the text encoder reads 4"):
        clear_distill.train(_cfg(tmp_path, max_sequence_length=4), pipe=load_pipeline("image-dit"), prompts=PROMPTS)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        _cfg(tmp_path, steps=0)
    with pytest.raises(ValueError, match="attn-every"):
        _train(_cfg(tmp_path / "b", attn_every=7))


def test_caption_dropout_puts_the_empty_prompt_in_its_share_of_the_batch(tmp_path):
    n, tokens = 64, 5
    data = {"latents": torch.randn(n, 16, 4), "embeds": torch.randn(n, tokens, 8), "pooled": torch.randn(n, 6),
            "empty": (torch.randn(1, tokens, 8), torch.randn(1, 6))}
    cfg = _cfg(tmp_path, batch_size=n, num_samples=n)
    plain = clear_distill._batch(data, cfg, 3, 0, 1, "cpu")
    cfg = dataclasses.replace(cfg, caption_dropout=0.25)
    dropped = clear_distill._batch(data, cfg, 3, 0, 1, "cpu")
    for a, b in zip(plain[:3], dropped[:3]):  # samples, noise and noise levels are the ones drawn without dropout
        assert torch.equal(a, b)
    empty = (dropped[3] == data["empty"][0]).flatten(1).all(1)
    assert torch.equal(empty, (dropped[4] == data["empty"][1]).all(1))
    assert 4 <= int(empty.sum()) <= 28  # about a quarter of 64
    assert torch.equal(dropped[3][~empty], plain[3][~empty]) and torch.equal(dropped[4][~empty], plain[4][~empty])
    assert not (plain[3] == data["empty"][0]).flatten(1).all(1).any()
    later = clear_distill._batch(data, cfg, 4, 0, 1, "cpu")[3]
    assert not torch.equal((later == data["empty"][0]).flatten(1).all(1), empty)  # a new draw per step
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        _cfg(tmp_path, caption_dropout=1.0)


def test_guided_loss_is_the_cfg_prediction_error_over_both_branches(tmp_path):
    from safetensors.torch import load_file as load

    w = 3.0
    out = _train(_cfg(tmp_path, steps=1, guidance_scale=w, pred_weight=0.25, guided_weight=0.75))
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    # step 0 again by hand: the untrained student is the base model with CLEAR (peft's B = 0), the teacher dense
    pipe = load_pipeline("image-dit")
    data = load(str(out / "data" / "shard_00000.safetensors"))
    data["empty"] = clear_distill._encode(pipe, "flux", [""], 32)
    x0, noise, sigma, embeds, pooled = clear_distill._batch(data, _cfg(tmp_path), 0, 0, 1, "cpu")
    n, s = x0.shape[0], sigma.view(-1, 1, 1)
    xt = torch.cat([(1 - s) * x0 + s * noise] * 2)
    args = (torch.cat([sigma, sigma]), torch.cat([embeds, data["empty"][0].expand_as(embeds)]),
            torch.cat([pooled, data["empty"][1].expand_as(pooled)]), (8, 8))
    with torch.no_grad():
        teacher = clear_distill._forward(pipe.transformer, "flux", xt, *args)
        with diffattn.apply(pipe.transformer, "clear", radius=3):
            student = clear_distill._forward(pipe.transformer, "flux", xt, *args)
    guide = lambda v: v[n:] + w * (v[:n] - v[n:])  # noqa: E731
    expected = torch.nn.functional.mse_loss(guide(student), guide(teacher)).item()
    assert logged["guided"] == pytest.approx(expected, rel=1e-4)
    assert logged["pred"] == pytest.approx(torch.nn.functional.mse_loss(student, teacher).item(), rel=1e-4)
    assert logged["fm"] == pytest.approx(torch.nn.functional.mse_loss(student, torch.cat([noise - x0] * 2)).item(), rel=1e-4)
    assert logged["loss"] == pytest.approx(logged["fm"] + 0.25 * logged["pred"] + 0.5 * logged["attn"] + 0.75 * expected, rel=1e-4)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        _cfg(tmp_path, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="guided_weight must be >= 0"):
        _cfg(tmp_path, guidance_scale=4.0, guided_weight=-0.5)
    with pytest.raises(ValueError, match="pass --caption-dropout 0"):
        _cfg(tmp_path, guidance_scale=4.0, caption_dropout=0.1)
    pipe = load_pipeline("image-dit")
    pipe.transformer.register_to_config(guidance_embeds=True)  # as FLUX.1-dev declares (read before any forward)
    with pytest.raises(ValueError, match="guidance-distilled .* pass --guidance-scale 0"):
        clear_distill.train(_cfg(tmp_path / "dev", guidance_scale=4.0), pipe=pipe, prompts=PROMPTS)
