"""CLEAR distillation: a student with CLEAR attention learns from the same weights run dense.

    diffattn train clear --pipeline PATH --radius 16 --out student/        # FLUX.1 or SD3 folder
    accelerate launch -m diffattn.lora.clear_distill --pipeline PATH ...   # the same, N processes
    pipe = FluxPipeline.from_pretrained(PATH); diffattn.apply(pipe, "clear", lora="student/")

The recipe of research/clear.md §3 (Huage001/CLEAR ``distill.py``), with LoRA by default:
1. **Data the teacher generates itself** (§3.4: better than real data): ``num_samples`` latents
   from the dense pipeline on the prompts, cached under ``out/data`` in shards (safetensors).
2. **Loss** L = L_fm + 0.5 L_pred + 0.5 L_attn: flow matching against (noise - x0), the teacher's
   prediction, and the mean squared error of the raw attention outputs (before the out-projection)
   of a layer subset: the single-stream layers whose index (the adapter's numbering) is a multiple
   of ``attn_every`` (FLUX.1-dev: single blocks 1, 5, ..., 37, CLEAR's 10 layers). Outputs are
   captured per processor through the handle (``handle.capture``).
   A pipeline sampled with classifier-free guidance (SD3; FLUX with ``true_cfg_scale``) also runs the
   student on the empty prompt, and guidance scale w multiplies that branch's error by w - 1; the
   reference (guidance-distilled FLUX-dev) never trains it. Two options, both off by default (the
   reference recipe; on the testbed they bring the student closer to dense pixel for pixel but lower
   the judge, benchmarks/RESULTS.md 2026-12-08): ``caption_dropout`` conditions that share of the
   samples on the empty prompt instead; ``guidance_scale`` w > 0 runs every sample on its prompt and
   on the empty prompt (L_fm, L_pred and L_attn cover both branches) and adds ``guided_weight`` *
   mean||g_student - g_teacher||^2, g = v_empty + w (v_prompt - v_empty): what the sampler steps
   with; a step then costs about twice as much.
3. **Trainable**: LoRA (rank ``rank``, alpha = rank) on the image-stream ``to_q/to_k/to_v/to_out.0``
   (SD3.5's ``attn2`` too); ``full=True`` fine-tunes those linears instead, as CLEAR does. The teacher
   is the same model with the adapter disabled and attention bypassed to dense (LoRA), or a frozen
   copy (full).
4. bf16 mixed precision (accelerate), gradient checkpointing, AdamW; sparse attention forward and
   backward on diffattn's kernels. Noise levels: u ~ U(0, 1) with the scheduler's shift.

Resuming: every ``checkpoint_every`` steps the trainable tensors, the optimizer state (safetensors +
JSON) and the step are written atomically to ``out/checkpoints``; everything random (batch, noise,
sigma, caption dropout) is drawn from generators seeded by (seed, step, process), so the data
position and RNG follow from the step. Running the same command again resumes from the newest
checkpoint (at most ``checkpoint_every`` steps are lost) and gives the same result as an
uninterrupted run. A changed
option (other than ``steps``, ``max_minutes``, ``checkpoint_every``, ``fsdp``) raises.

FSDP (``--fsdp true``, under ``accelerate launch``): the student, and a full fine-tune's teacher
copy, sharded over the processes (``diffattn.lora.common.shard_model``) once the teacher samples
are generated (the pipeline is loaded whole on every process first, and its text encoders and VAE
stay whole); checkpoints and outputs
are gathered whole. A passed pipeline is sharded in place, so ``train`` takes one only with
``consume=True``.

Output: ``out/pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``) or
``out/full_weights.safetensors``, with ``out/diffattn.json`` (radius, down_factor, base model).
Logs: a tqdm bar (loss, ETA), TensorBoard under ``out/logs`` (when ``tensorboard`` is installed:
``pip install diffattn[train]``) and ``out/log.jsonl``.

Testbed run (one H200, under 15 minutes; benchmarks/RESULTS.md has the result):

    diffattn train clear --pipeline testbed --radius 4 --attn-every 1 --num-samples 512 \\
        --steps 1500 --batch-size 16 --lr 2e-4 --out runs/clear-testbed
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

import diffattn
from diffattn.core.weights import FULL_NAME, LORA_NAME, write_meta

from .common import (
    Killed, RunLog, RunOptions, batch_indices, check_fsdp, check_resume, config_from_argv, deadline_reached, load_checkpoint,
    make_accelerator, now, save_checkpoint, shard_model, trainable_state, warmup_lr,
)

FAMILY_TARGETS = {  # image-stream projections the student trains (module name suffixes)
    "flux": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"),
    "sd3": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
}
RESUMABLE = ("steps", "max_minutes", "checkpoint_every", "fsdp")  # options a resumed run may change (fsdp: the same files)
SHARD = 16  # teacher samples per data shard


@dataclass(frozen=True)
class DistillConfig(RunOptions):
    NAME: ClassVar[str] = "clear_distill"
    pipeline: str = "testbed"      # a FLUX.1 / SD3 diffusers folder (or hub id), or "testbed" (the CLI's)
    out: str = "clear-student"
    radius: int = 16
    down_factor: int = 1
    full: bool = False             # full fine-tune of the projections instead of LoRA
    rank: int = 32
    steps: int = 1000
    batch_size: int = 1            # per process
    lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 1e-4
    pred_weight: float = 0.5
    attn_weight: float = 0.5
    attn_every: int = 4
    num_samples: int = 64          # teacher-generated training samples
    prompts: str = ""              # a text file, one prompt per line ("" with the testbed: its captions)
    height: int = 0                # 0: the pipeline's default
    width: int = 0
    gen_steps: int = 0             # teacher sampling steps (0: the pipeline's default)
    max_sequence_length: int = 0   # text tokens (0: the pipeline's default); longer prompts are refused
    shift: float = 3.0             # the flow-matching shift of the noise levels
    caption_dropout: float = 0.0   # share of samples trained on the empty prompt (the CFG branch)
    guidance_scale: float = 0.0    # > 0: distil the guided prediction at this CFG scale too (both branches per sample)
    guided_weight: float = 0.5     # the guided prediction's loss weight (with guidance_scale > 0)

    def __post_init__(self):
        super().__post_init__()
        for name in ("rank", "steps", "batch_size", "num_samples", "attn_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"clear_distill: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"clear_distill: caption_dropout must be in [0, 1), got {self.caption_dropout}")
        for name in ("guidance_scale", "guided_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"clear_distill: {name} must be >= 0 (guidance_scale 0: off), got {getattr(self, name)}")
        if self.guidance_scale > 0 and self.caption_dropout > 0:
            raise ValueError("clear_distill: with guidance_scale every sample also runs on the empty prompt; "
                             "caption_dropout would blank some prompted branches: pass --caption-dropout 0")


# ----------------------------------------------------------------------------------- model calls


def _family(pipe) -> str:
    name = type(pipe.transformer).__name__
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "SD3Transformer2DModel":
        return "sd3"
    raise ValueError(f"clear_distill: CLEAR distillation supports FLUX.1 and SD3 pipelines (FLUX.2 students are not supported yet); got {name}")


def _t5(pipe):
    return getattr(pipe, "tokenizer_3", None) or getattr(pipe, "tokenizer_2", None) or pipe.tokenizer


def _check_prompts(pipe, prompts: list[str], limit: int) -> None:
    tokenizer = _t5(pipe)
    for text in prompts:
        count = len(tokenizer(text).input_ids)
        if count > limit:
            raise ValueError(
                f"clear_distill: the prompt {text[:60]!r} has {count} tokens but the text encoder reads {limit} "
                "(max_sequence_length); shorten it or pass --max-sequence-length (nothing is truncated)"
            )


def _encode(pipe, family: str, prompt: list[str], limit: int):
    """(text embeddings [N, T, C], pooled [N, P]) of prompts."""
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=limit)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                                      do_classifier_free_guidance=False, max_sequence_length=limit)
    return embeds, pooled


def _forward(model, family: str, x, sigma, embeds, pooled, grid, guidance_embeds: bool = False):
    """The transformer's velocity for latents ``x`` at noise levels ``sigma`` [B] (``model`` may be
    wrapped by accelerate: its config is not read here)."""
    if family == "flux":
        rows, cols = grid
        ids = torch.zeros(rows, cols, 3, device=x.device)
        ids[..., 1] = torch.arange(rows, device=x.device)[:, None]
        ids[..., 2] = torch.arange(cols, device=x.device)[None, :]
        guidance = torch.full_like(sigma, 3.5) if guidance_embeds else None
        return model(hidden_states=x, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                     encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device),
                     img_ids=ids.reshape(-1, 3), return_dict=False)[0]
    return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                 pooled_projections=pooled, return_dict=False)[0]


# ------------------------------------------------------------------------------------------- data


def _generate(pipe, family: str, cfg: DistillConfig, prompts: list[str], limit: int, folder: Path, accelerator, log):
    """Teacher samples in shards of ``SHARD`` (each process writes its own; kept across restarts)."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-cfg.num_samples // SHARD)
    call = {k: v for k, v in (("height", cfg.height), ("width", cfg.width), ("num_inference_steps", cfg.gen_steps)) if v}
    # every process generates its own shards (shard % processes == rank), then all wait
    for shard in range(accelerator.process_index, shards, accelerator.num_processes):
        path = folder / f"shard_{shard:05d}.safetensors"
        if path.is_file():
            continue
        ids = list(range(shard * SHARD, min((shard + 1) * SHARD, cfg.num_samples)))
        texts = [prompts[i % len(prompts)] for i in ids]
        gens = [torch.Generator(pipe.device).manual_seed(cfg.seed * 1_000_003 + i) for i in ids]
        with torch.no_grad():  # one batched teacher call per shard
            latents = pipe(prompt=texts, generator=gens, output_type="latent", max_sequence_length=limit, **call).images
        embeds, pooled = _encode(pipe, family, texts, limit)
        rows = {"latents": [latents.float().cpu()], "embeds": [embeds.float().cpu()], "pooled": [pooled.float().cpu()]}
        tmp = path.with_suffix(".tmp")
        save_file({k: torch.cat(v) for k, v in rows.items()}, str(tmp))
        os.replace(tmp, path)
        log(f"teacher samples: shard {shard + 1}/{shards} (process {accelerator.process_index})")
    accelerator.wait_for_everyone()
    parts = [load_file(str(folder / f"shard_{s:05d}.safetensors")) for s in range(shards)]
    data = {k: torch.cat([p[k] for p in parts])[: cfg.num_samples] for k in ("latents", "embeds", "pooled")}
    return data


def _batch(data: dict, cfg: DistillConfig, step: int, rank: int, world: int, device):
    """The batch of (step, process): its samples, noise, noise levels and which samples get the empty
    prompt (``caption_dropout`` of them, from ``data["empty"]``) follow from the step."""
    idx = batch_indices(data["latents"].shape[0], cfg.batch_size, step, rank, world, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    x0 = data["latents"][idx]
    noise = torch.randn(x0.shape, generator=g)
    u = torch.rand(len(idx), generator=g)
    sigma = cfg.shift * u / (1 + (cfg.shift - 1) * u)
    embeds, pooled = data["embeds"][idx], data["pooled"][idx]  # [B, T, C], [B, P] (copies: indexed)
    if cfg.caption_dropout > 0:  # drawn after the rest: runs without dropout draw what they always drew
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        embeds[drop], pooled[drop] = data["empty"][0], data["empty"][1]
    return tuple(t.to(device) for t in (x0, noise, sigma, embeds, pooled))


# ------------------------------------------------------------------------------------------ train


def attention_sites(handle, model, attn_every: int) -> list[str]:
    """The single-stream sites (FLUX) or all sites (SD3) whose layer is a multiple of ``attn_every``."""
    rows = handle.report()
    single = [r for r in rows if "single_transformer_blocks" in r["site"]]
    pool = single or rows
    return [r["site"] for r in pool if r["layer"] % attn_every == 0]


def train(cfg: DistillConfig, *, pipe=None, prompts: list[str] | None = None, consume: bool = False,
          _stop_after: int | None = None) -> Path:
    """Run (or resume) a distillation; returns the output folder. ``pipe``: an already loaded
    pipeline (else ``cfg.pipeline`` is loaded; a passed one is left as it was found; with
    ``cfg.fsdp``, which shards it in place, only with ``consume=True``, and it is not usable
    afterwards); ``prompts``: the prompts (else ``cfg.prompts``, a file)."""
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, out, lambda msg: print(f"[clear_distill] {msg}", flush=True))
    check_fsdp(cfg, accelerator, pipe is not None, consume)
    log = lambda msg: print(f"[clear_distill] {msg}", flush=True) if accelerator.is_main_process else None  # noqa: E731
    check_resume(out, cfg, RESUMABLE, "clear_distill", write=accelerator.is_main_process)  # every process raises alike
    accelerator.wait_for_everyone()

    if pipe is None:
        from diffusers import DiffusionPipeline

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        pipe = DiffusionPipeline.from_pretrained(cfg.pipeline, torch_dtype=dtype)
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    family = _family(pipe)
    if prompts is None:
        if not cfg.prompts:
            raise ValueError("clear_distill: pass --prompts FILE (one prompt per line) for the teacher's samples")
        prompts = [line.strip() for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("clear_distill: no prompts (the prompts file is empty)")
    limit = cfg.max_sequence_length or (512 if family == "flux" else 256)
    _check_prompts(pipe, prompts, limit)

    model = pipe.transformer
    guided = bool(getattr(model.config, "guidance_embeds", False))
    if guided and cfg.guidance_scale > 0:
        raise ValueError("clear_distill: the transformer is guidance-distilled (guidance_embeds: FLUX.1-dev), which is "
                         "sampled without classifier-free guidance; pass --guidance-scale 0")
    data = _generate(pipe, family, cfg, prompts, limit, out / "data", accelerator, log)
    data["empty"] = tuple(t.float().cpu() for t in _encode(pipe, family, [""], limit))  # the CFG branch's condition
    grid = None
    if family == "flux":  # packed latents [N, S, C]: the token grid of the generation size
        scale = pipe.vae_scale_factor * 2
        default = pipe.default_sample_size * pipe.vae_scale_factor
        grid = ((cfg.height or default) // scale, (cfg.width or default) // scale)
        if grid[0] * grid[1] != data["latents"].shape[1]:
            raise ValueError(f"clear_distill: the teacher samples have {data['latents'].shape[1]} tokens, not the "
                             f"{grid[0]} x {grid[1]} grid of --height/--width; pass the size the pipeline generates at")
    if getattr(model, "peft_config", None):
        raise ValueError(
            f"clear_distill: the transformer has LoRA adapters loaded ({sorted(model.peft_config)}); fuse them into the "
            "weights (pipe.fuse_lora(); pipe.unload_lora_weights()) or unload them before distilling"
        )
    for p in pipe.components.values():
        if isinstance(p, torch.nn.Module):
            p.requires_grad_(False)
    teacher = copy.deepcopy(model) if cfg.full else None
    names = FAMILY_TARGETS[family]
    if cfg.full:
        for name, module in model.named_modules():
            if name.endswith(names):
                module.requires_grad_(True)
    else:
        from peft import LoraConfig

        with torch.random.fork_rng(devices=[]):  # the adapter's initialisation follows --seed only
            torch.manual_seed(cfg.seed)
            model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian", target_modules=list(names)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}  # restored afterwards
    for p in trainable:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()

    options = dict(radius=cfg.radius, down_factor=cfg.down_factor, backend=cfg.backend)
    handle = diffattn.apply(model, "clear", **options)
    teacher_handle = diffattn.apply(teacher, "clear", **options) if teacher is not None else handle
    sites = attention_sites(handle, model, cfg.attn_every)
    teacher_sites = attention_sites(teacher_handle, teacher if teacher is not None else model, cfg.attn_every)
    if cfg.attn_weight > 0 and not sites:
        raise ValueError(f"clear_distill: no layer has an index that is a multiple of attn_every={cfg.attn_every}; "
                         "pass a smaller --attn-every (1: every layer) or --attn-weight 0")
    if cfg.fsdp:  # the student (and a full fine-tune's teacher copy) sharded: the optimizer takes the new parameters
        shard_model(model, accelerator, cfg.mixed_precision, "clear_distill")
        if teacher is not None:
            shard_model(teacher, accelerator, cfg.mixed_precision, "clear_distill")
        trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"{family}: {sum(p.numel() for p in trainable) / 1e6:.2f} M trainable ({'full' if cfg.full else f'LoRA r={cfg.rank}'}), "
        f"attention loss on {len(sites)} layers, {data['latents'].shape[0]} teacher samples, caption dropout {cfg.caption_dropout}"
        + (f", guided prediction at scale {cfg.guidance_scale}" if cfg.guidance_scale > 0 else "")
        + (f", sharded over {accelerator.num_processes} processes (FSDP)" if cfg.fsdp else ""))

    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_lr(s, 1.0, cfg.warmup))
    start = load_checkpoint(out, model, optimizer, scheduler, world=accelerator.num_processes)
    if start:
        log(f"resuming at step {start}")
    if cfg.fsdp:  # sharded already: accelerate must not wrap it in DDP too
        wrapped, optimizer = model, accelerator.prepare(optimizer)
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    run = RunLog(accelerator, out, "clear_distill", cfg, cfg.steps, start)
    deadline = None if not cfg.max_minutes else now() + 60 * cfg.max_minutes
    step = start
    empty = tuple(t.to(accelerator.device) for t in data["empty"])  # [1, T, C], [1, P]: the guided loss's empty branch
    try:
        while step < cfg.steps:
            x0, noise, sigma, embeds, pooled = _batch(data, cfg, step, accelerator.process_index, accelerator.num_processes, accelerator.device)
            s = sigma.view(-1, *([1] * (x0.dim() - 1)))
            xt = (1 - s) * x0 + s * noise
            target = noise - x0
            if cfg.guidance_scale > 0:  # [prompted; empty] of the same noisy latents: both branches of a CFG step
                n = x0.shape[0]
                xt, sigma, target = torch.cat([xt, xt]), torch.cat([sigma, sigma]), torch.cat([target, target])
                embeds, pooled = torch.cat([embeds, empty[0].expand_as(embeds)]), torch.cat([pooled, empty[1].expand_as(pooled)])
            with accelerator.autocast():
                with torch.no_grad(), _teacher_mode(model, teacher is None), teacher_handle.bypass(), teacher_handle.capture(teacher_sites) as t_attn:
                    v_teacher = _forward(teacher if teacher is not None else model, family, xt, sigma, embeds, pooled, grid, guided)
                with handle.capture(sites) as s_attn:
                    v_student = _forward(wrapped, family, xt, sigma, embeds, pooled, grid, guided)
                fm = F.mse_loss(v_student.float(), target.float())
                pred = F.mse_loss(v_student.float(), v_teacher.float())
                attn = sum(F.mse_loss(s_attn[a].float(), t_attn[b].float()) for a, b in zip(sites, teacher_sites)) / max(len(sites), 1)
                loss = fm + cfg.pred_weight * pred + cfg.attn_weight * attn
                if cfg.guidance_scale > 0:  # g = v_empty + w (v_prompt - v_empty), student against teacher
                    guide = lambda v: v[n:] + cfg.guidance_scale * (v[:n] - v[n:])  # noqa: E731
                    guided_loss = F.mse_loss(guide(v_student.float()), guide(v_teacher.float()))
                    loss = loss + cfg.guided_weight * guided_loss
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            terms = [loss, fm, pred, torch.as_tensor(attn, device=loss.device)] + ([guided_loss] if cfg.guidance_scale > 0 else [])
            terms = torch.stack([t.detach().float() for t in terms]).tolist()
            run.step(step, dict(zip(("loss", "fm", "pred", "attn", "guided"), terms), lr=scheduler.get_last_lr()[0]))
            stop = deadline_reached(accelerator, deadline)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                accelerator.wait_for_everyone()
                save_checkpoint(out, step, accelerator.unwrap_model(wrapped), optimizer, scheduler, world=accelerator.num_processes,
                                write=accelerator.is_main_process)  # every process: FSDP gathers the shards
            if _stop_after is not None and step >= _stop_after:
                raise Killed(step)
            if stop:
                log(f"--max-minutes reached at step {step}; the same command resumes")
                break
    finally:
        run.close()
    accelerator.wait_for_everyone()
    if step >= cfg.steps:
        # gathered whole on every process under FSDP (a collective), else read by the writer only
        state = trainable_state(accelerator.unwrap_model(wrapped)) if cfg.fsdp or accelerator.is_main_process else None
        if accelerator.is_main_process:
            _export(out, pipe, accelerator.unwrap_model(wrapped), cfg, family, state)
    else:
        log(f"stopped at step {step} of {cfg.steps}: no student exported yet; the same command resumes")
    accelerator.end_training()
    accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)  # drops accelerate's autocast wrapper from the model
    if not cfg.fsdp:  # (sharded in place, the pipeline was the trainer's: nothing to hand back)
        _restore(model, teacher, handle, teacher_handle, cfg, dtypes)
    return out


def _restore(model, teacher, handle, teacher_handle, cfg: DistillConfig, dtypes: dict) -> None:
    """Leave the caller's pipeline as it was: processors, the training adapter (or the fine-tuned
    weights, from the teacher's copy), gradient checkpointing, eval mode, frozen parameters."""
    handle.remove()
    if teacher is not None:
        teacher_handle.remove()
        with torch.no_grad():
            originals = dict(teacher.named_parameters())
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.data = originals[name].data.to(dtypes[name])
    else:
        model.unload_lora()  # the peft layers go; the base modules are back (no other adapter was loaded)
    if cfg.gradient_checkpointing:
        model.disable_gradient_checkpointing()
    model.requires_grad_(False)
    model.eval()


@contextlib.contextmanager
def _teacher_mode(model, lora: bool):
    """The LoRA student's weights as the teacher: adapters off inside the block. peft's own switch
    (``model.disable_adapters()``) also sets the adapters' ``requires_grad`` to False; under FSDP the
    first forward fixes each group's dtypes from the parameters that need gradients then, and
    with none it would reduce the gradients in bf16 into fp32 shards (which raises). So only the
    layers' disable flag is flipped here, the one peft's layers read in their forward."""
    if not lora:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before):
            m._disable_adapters = flag


def _export(out: Path, pipe, model, cfg: DistillConfig, family: str, state: dict) -> None:
    """``state``: the trainable tensors, whole (``trainable_state``)."""
    from safetensors.torch import save_file

    if cfg.full:
        names = FAMILY_TARGETS[family]
        tensors = {f"transformer.{n}": p.to(torch.bfloat16 if cfg.mixed_precision == "bf16" else p.dtype).contiguous()
                   for n, p in state.items() if n.rsplit(".", 1)[0].endswith(names)}
        save_file(tensors, str(out / FULL_NAME))
        kind = "full"
    else:
        from peft.utils import get_peft_model_state_dict

        type(pipe).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model, state_dict=state), weight_name=LORA_NAME)
        kind = "lora"
    write_meta(out, method="clear", options={"radius": cfg.radius, "down_factor": cfg.down_factor}, model=model,
               kind=kind, extra={"base_path": cfg.pipeline, "steps": cfg.steps})


def main(argv=None) -> None:
    """``python -m diffattn.lora.clear_distill --pipeline PATH ...`` (also under ``accelerate launch``)."""
    cfg = config_from_argv(DistillConfig, sys.argv[1:] if argv is None else argv, __doc__)
    if cfg.pipeline == "testbed":
        raise ValueError("clear_distill: --pipeline testbed is resolved by the CLI (diffattn train clear); "
                         "pass the testbed folder (testbed/weights/image-dit) and --prompts here")
    train(cfg)


__all__ = ["DistillConfig", "attention_sites", "main", "train"]

if __name__ == "__main__":
    main()
