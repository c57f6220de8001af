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
