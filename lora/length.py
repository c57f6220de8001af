"""LoRA length extension: a video model learns to generate longer clips than it was trained for,
with a sparse attention method (radial) in the loop, forward and backward on diffattn's kernels.

    diffattn train length --frames 113 --method radial --self-generate 1024 --out runs/len4x   # testbed, 4x
    diffattn train length --pipeline PATH --frames 161 --height 720 --width 1280 --data clips/ --out wan-2x
    accelerate launch -m diffattn.lora.length --pipeline PATH --frames 161 --data clips/ ...      # N processes
    accelerate launch -m diffattn.lora.length --pipeline PATH ... --fsdp true                      # the model sharded over them
    pipe = WanPipeline.from_pretrained(PATH); diffattn.apply(pipe, "radial", lora="wan-2x")        # then frames=161
    diffattn generate --model PATH --lora wan-2x --frames 161

The recipe of research/radial.md §3 (the radial paper's §4.3 / App. B; its code was never released):
- **LoRA** (peft) on the q/k/v/out projections of the attention modules the method runs on
  (``diffattn.attention_modules``: Wan's self-attention ``blocks.N.attn1``; HunyuanVideo's dual- and
  single-stream ``attn``), rank ``lora_rank`` (paper: 128), alpha ``lora_alpha`` (0: = rank);
- **the method stays on in training** at every noise level (no dense steps), the first
  ``dense_blocks`` blocks dense (paper: 2); inference then uses the method's own dense warm-up
  steps, and the LoRA's ``diffattn.json`` makes ``apply(..., lora=)`` use the trained options;
  ``--method dense`` trains the dense-attention baseline on the stock processors;
- **flow matching** with the pipeline's conventions: x_t = (1 - s) x0 + s n, target n - x0,
  timestep 1000 s, noise levels s from a logit-normal shifted by the scheduler's flow shift;
  ``caption_dropout`` of the captions replaced by the empty one (classifier-free guidance; by default 0.1,
  and 0 for guidance-distilled models such as HunyuanVideo, which run without CFG);
- bf16 mixed precision (accelerate), gradient checkpointing, AdamW with a linear warm-up (and with
  ``lr_decay`` a linear ramp to 0 over that last share of the steps).

Data: ``--data DIR`` (videos with .txt/.json captions, ``diffattn.lora.video_data``: resized,
centre-cropped, resampled to the model's frame rate (``--fps``), ``frames`` frames from the start;
bad clips are reported and skipped, or refused with
``--on-bad refuse``), or on the testbed ``--self-generate N``: N fresh clips of the procedural
generator at the target length (the CLI renders them). Clips are VAE-encoded once; the latents and
text embeddings are cached under ``data_cache`` (default ``out/data``, safetensors) and reused by a
rerun or by another run given the same ``--data-cache`` (the dense baseline reads the radial run's).

Resuming: every ``checkpoint_every`` steps the LoRA tensors, optimizer, learning-rate scheduler and
step are written atomically to ``out/checkpoints``; batches, noise, noise levels and caption dropout
are drawn from generators seeded by (seed, step, process), so the data position and RNG follow from
the step. Rerunning the same command resumes from the newest checkpoint (at most one interval is
lost) and ends where an uninterrupted run ends. A changed option (other than ``steps``,
``max_minutes``, ``checkpoint_every`` and the validation options) raises, naming the difference.

FSDP (``--fsdp true``): torch's FSDP2 shards the model over every process, block by block
(``diffattn.lora.common.shard_model``); it composes with ``--context-parallel``; checkpoints and the
export are gathered whole (the same files as without it). The transformer is sharded in place, so
``train`` loads the pipeline itself or takes a passed one only with ``consume=True``.

``--compile true`` runs the training forward and backward through ``torch.compile`` (static shapes;
the caller's module is left uncompiled): fewer launches and fused element-wise work, which is much
of a small model's step. The first step of a run (or a resume) runs eagerly, so that the method's
descriptions are built outside the graph; the second step compiles (once: the handle records only
eager calls, see ``Handle.record``). One process only (no ``--fsdp``, ``--context-parallel`` or
several processes: untested there, refused). It may be switched on or off when resuming.

Logs: a tqdm bar (loss, seconds per step, ETA), TensorBoard under ``out/logs`` (``pip install
diffattn[train]``), ``out/log.jsonl``; every ``validate_every`` steps an mp4 sample at the target
length in ``out/validation`` (the training attention, the pipeline's sampler).

Output: ``out/pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``; rank and alpha
in its metadata) and ``out/diffattn.json`` (base model, method, options, trained frames and size).

Testbed runs of benchmarks/RESULTS.md (one H200, 2.5-3 minutes each; ``benchmarks/length_round.sh``):

    diffattn train length --frames 113 --method radial --dense-blocks 1 --self-generate 2048 --lora-rank 32 \\
        --steps 800 --batch-size 32 --lr 5e-4 --gradient-checkpointing false --data-cache runs/data4x --out runs/len4x-radial
    diffattn train length --frames 113 --method dense --self-generate 2048 --lora-rank 32 \\
        --steps 800 --batch-size 32 --lr 5e-4 --gradient-checkpointing false --data-cache runs/data4x --out runs/len4x-dense
"""

from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F

import diffattn
from diffattn.core.weights import LORA_NAME, write_meta

from .common import (
    Killed, RunLog, RunOptions, batch_indices, check_fsdp, check_resume, config_from_argv, deadline_reached, enable_sequence_parallel, load_checkpoint,
    make_accelerator, now, parse_context_parallel, save_checkpoint, scheduled_lr, shard_model, trainable_state,
)
from .video_data import BadClip, DataReport, check_caption, fit, folder_clips

# options a rerun may change (fsdp: its checkpoints are the plain files, gathered whole)
RESUMABLE = ("steps", "max_minutes", "checkpoint_every", "validate_every", "validation_prompt", "validation_steps", "fsdp", "compile")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SCHEDULE_FIELDS = ("dense_steps", "last_dense_steps")  # training runs the method at every noise level
SHARD = 64  # clips per cached data shard
ENCODE_BATCH = 4


@dataclass(frozen=True)
class LengthConfig(RunOptions):
    NAME: ClassVar[str] = "length"
    pipeline: str = "testbed"     # a Wan / HunyuanVideo diffusers folder (or hub id), or "testbed" (the CLI's)
    out: str = "length-lora"
    frames: int = 0               # target pixel frames (4k+1 for Wan and HunyuanVideo); required
    height: int = 0               # 0: the pipeline's default
    width: int = 0
    method: str = "radial"        # a diffattn method, or "dense" (the stock attention: the baseline)
    method_options: str = ""      # "decay=0.9;block_size=64" (Python literals), on top of the family's defaults
    dense_blocks: int = 2         # first blocks that keep dense attention (the paper: 2)
    lora_rank: int = 128
    lora_alpha: int = 0           # 0: = lora_rank
    steps: int = 1000
    batch_size: int = 1           # per process
    lr: float = 1e-4
    warmup: int = 50
    lr_decay: float = 0.0         # last share of the steps over which the learning rate ramps to 0 (0: constant after warm-up)
    weight_decay: float = 1e-4
    caption_dropout: float = -1.0    # share of empty captions (CFG); -1: 0.1, or 0 for guidance-distilled models (HunyuanVideo)
    shift: float = 0.0            # flow shift of the noise levels (0: the scheduler's)
    data: str = ""                # a folder of videos with captions
    fps: float = 0.0              # --data clips resampled to this frame rate (0: the model's, Wan 16 / HunyuanVideo 24; -1: as decoded)
    self_generate: int = 0        # testbed: this many clips of the procedural generator (the CLI renders them)
    data_cache: str = ""          # latents + text embeddings (default: out/data); shared by runs on the same data
    cache_latents: bool = True    # write the cache to disk (false: encode into memory at every start)
    on_bad: str = "skip"          # "skip" (report and leave out) or "refuse" (raise) unusable clips
    max_sequence_length: int = 0  # text tokens (0: the pipeline's default); longer captions are reported
    validate_every: int = 0       # 0: no validation samples
    validation_prompt: str = ""   # "": the first training caption
    validation_steps: int = 0     # 0: the pipeline's default
    context_parallel: str = ""    # sequence parallelism for long clips: "ulysses=N", "ring=N" or both ("ulysses=2,ring=2")
    compile: bool = False         # torch.compile the training forward and backward (fewer launches, fused element-wise work)

    def __post_init__(self):
        super().__post_init__()
        for name in ("lora_rank", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"length: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("frames", "height", "width", "dense_blocks", "lora_alpha", "self_generate", "validate_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"length: {name} must be >= 0, got {getattr(self, name)}")
        if self.on_bad not in ("skip", "refuse"):
            raise ValueError(f"length: on_bad must be 'skip' or 'refuse', got {self.on_bad!r}")
        if not (0.0 <= self.caption_dropout < 1.0 or self.caption_dropout == -1.0):
            raise ValueError(f"length: caption_dropout must be in [0, 1) (or -1: automatic), got {self.caption_dropout}")
        if self.warmup < 0:
            raise ValueError(f"length: warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.lr_decay <= 1.0:
            raise ValueError(f"length: lr_decay is a share of the steps in [0, 1], got {self.lr_decay}")
        if self.method != "dense" and self.method not in diffattn.methods():
            raise ValueError(f"length: unknown method {self.method!r}; use 'dense' or one of {list(diffattn.methods())}")
        parse_options(self.method_options)
        parse_context_parallel(self.context_parallel, "length")


def parse_options(text: str) -> dict:
    """``"name=value;name=value"`` (Python literals) -> dict."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"length: method options are name=value separated by ';', got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"length: the value of {key.strip()!r} is not a Python literal: {value.strip()!r}") from None
    return options


# ---------------------------------------------------------------------------------- model families


class _Family:
    """What the trainer needs of a family: text conditioning, latent normalization, the forward."""

    SIZE = (480, 832)  # the pipeline's default height, width
    FPS = 16           # the frame rate the model generates at (clips of a --data folder are resampled to it)

    def __init__(self, pipe):
        self.pipe = pipe

    def tokenizers(self):
        return [t for t in (getattr(self.pipe, "tokenizer", None), getattr(self.pipe, "tokenizer_2", None)) if t is not None]

    def default_limit(self) -> int:
        raise NotImplementedError

    def encode_text(self, captions: list[str], limit: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model, x, sigma, cond: dict) -> torch.Tensor:
        raise NotImplementedError


class _Wan(_Family):
    def default_limit(self) -> int:
        return 512  # WanPipeline.__call__'s max_sequence_length

    def encode_text(self, captions, limit):
        embeds, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=limit,
                                            device=self.pipe.device)
        return {"embeds": embeds}

    def normalize(self, mu):
        vae = self.pipe.vae
        mean = torch.tensor(vae.config.latents_mean, device=mu.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=mu.device).view(1, -1, 1, 1, 1)
        return (mu - mean) / std  # WanPipeline decodes latents * std + mean

    def forward(self, model, x, sigma, cond):
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["embeds"], return_dict=False)[0]


class _Hunyuan(_Family):
    GUIDANCE = 6.0  # HunyuanVideoPipeline's default embedded guidance
    SIZE = (720, 1280)
    FPS = 24

    def default_limit(self) -> int:
        return 256

    def encode_text(self, captions, limit):
        embeds, pooled, mask = self.pipe.encode_prompt(prompt=captions, prompt_2=None, device=self.pipe.device,
                                                       max_sequence_length=limit)
        return {"embeds": embeds, "pooled": pooled, "mask": mask.to(torch.int64)}

    def normalize(self, mu):
        return mu * self.pipe.vae.config.scaling_factor  # HunyuanVideoPipeline decodes latents / scaling_factor

    def forward(self, model, x, sigma, cond):
        guided = cond.get("guidance_embeds", False)
        guidance = torch.full_like(sigma, self.GUIDANCE * 1000) if guided else None
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["embeds"],
                     encoder_attention_mask=cond["mask"], pooled_projections=cond["pooled"], guidance=guidance,
                     return_dict=False)[0]


FAMILIES = {"WanTransformer3DModel": _Wan, "HunyuanVideoTransformer3DModel": _Hunyuan}


def _family(pipe) -> _Family:
    model = getattr(pipe, "transformer", None)
    name = type(model).__name__
    if name not in FAMILIES:
        raise ValueError(f"length: the length trainer supports pipelines with {sorted(FAMILIES)}; got {name} "
                         f"({type(pipe).__name__})")
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(
            "length: this pipeline has two experts (Wan2.2 A14B: transformer for high noise, transformer_2 for low "
            "noise); the trainer trains one transformer: not supported yet for two-expert pipelines"
        )
    latent = getattr(pipe.vae.config, "z_dim", None) or getattr(pipe.vae.config, "latent_channels", None)
    if latent is not None and model.config.in_channels != latent:
        raise ValueError(
            f"length: the transformer takes {model.config.in_channels} input channels but the VAE makes {latent}: an "
            f"image-to-video model ({type(pipe).__name__}); the trainer trains text-to-video pipelines only"
        )
    return FAMILIES[name](pipe)


def valid_frames(frames: int, temporal: int) -> None:
    if frames < 1 or (frames - 1) % temporal:
        low = max(1, (frames - 1) // temporal * temporal + 1)
        raise ValueError(
            f"length: --frames must be {temporal}k+1 for this model (its VAE compresses time {temporal}x); "
            f"{frames} is not: the nearest valid lengths are {low} and {low + temporal}"
        )


def _size(pipe, cfg: LengthConfig, model, family: _Family) -> tuple[int, int]:
    height, width = cfg.height or family.SIZE[0], cfg.width or family.SIZE[1]
    multiple = pipe.vae_scale_factor_spatial * diffattn.patch_size(model)[1]
    if height % multiple or width % multiple:
        raise ValueError(f"length: --height/--width must be multiples of {multiple} for this model, got {height}x{width}")
    return height, width


# ------------------------------------------------------------------------------------------- data


def _fingerprint(cfg: LengthConfig, model, height: int, width: int, limit: int) -> dict:
    """What the cached data depend on: the source (for a folder: every file's name, size and
    modification time), the target size and length, the text length, the base model, on_bad."""
    import hashlib

    from diffattn.core.weights import fingerprint

    if cfg.data:
        root = Path(cfg.data)
        listing = sorted((str(f.relative_to(root)), f.stat().st_size, int(f.stat().st_mtime)) for f in root.rglob("*") if f.is_file())
        source = f"folder:{root.resolve()}:" + hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:16]
    else:
        source = f"generated:{cfg.self_generate}:seed{cfg.seed}"
    base = hashlib.sha1(json.dumps(fingerprint(model), sort_keys=True).encode()).hexdigest()[:16]
    return {"source": source, "frames": cfg.frames, "fps": cfg.fps, "height": height, "width": width, "text_tokens": limit,
            "base_model": base, "on_bad": cfg.on_bad}


def _encode_clips(family: _Family, clips: Iterable, cfg: LengthConfig, height: int, width: int, limit: int,
                  report: DataReport, log) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(latents and text conditioning of every usable clip (CPU tensors, bf16 latents), names, captions)."""
    pipe = family.pipe
    vae = pipe.vae
    tokenizers = family.tokenizers()
    rows: dict[str, list[torch.Tensor]] = {}
    names: list[str] = []
    captions: list[str] = []
    pending: list[tuple[str, torch.Tensor, str]] = []

    def flush():
        if not pending:
            return
        x = torch.stack([p for _, p, _ in pending]).to(pipe.device)  # uint8 [B, F, H, W, 3]
        x = x.permute(0, 4, 1, 2, 3).to(vae.dtype) / 127.5 - 1.0  # [B, 3, F, H, W] in [-1, 1]
        with torch.no_grad():
            mu = vae.encode(x).latent_dist.mode()
            latents = family.normalize(mu.float())
            cond = family.encode_text([c for _, _, c in pending], limit)
        rows.setdefault("latents", []).append(latents.to(torch.bfloat16).cpu())
        for key, value in cond.items():  # bf16 like the latents (a Wan clip's 512 x 4096 embedding: 4 MiB)
            rows.setdefault(key, []).append(value.to(torch.bfloat16).cpu() if value.is_floating_point() else value.cpu())
        names.extend(n for n, _, _ in pending)
        captions.extend(c for _, _, c in pending)
        pending.clear()
        if len(names) % (ENCODE_BATCH * 16) == 0:
            log(f"encoded {len(names)} clips")

    for name, pixels, caption in clips:
        try:
            pixels = torch.as_tensor(pixels)
            if pixels.dim() != 4 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
                raise BadClip("unreadable", f"expected uint8 [F, H, W, 3] frames, got {pixels.dtype} {tuple(pixels.shape)}")
            if pixels.shape[0] < cfg.frames:
                raise BadClip("too short", f"{pixels.shape[0]} frames, {cfg.frames} needed")
            check_caption(caption, tokenizers, limit)
        except BadClip as bad:
            report.add(name, bad)
            continue
        pixels = pixels[: cfg.frames]
        if tuple(pixels.shape[1:3]) != (height, width):
            pixels = fit(pixels.numpy(), height, width)
        pending.append((name, pixels, caption))
        report.used += 1
        if len(pending) == ENCODE_BATCH:
            flush()
    flush()
    if report.skipped:
        message = f"length: data: {report.text()}"
        if cfg.on_bad == "refuse":
            raise ValueError(message + "; fix or remove these clips, or pass --on-bad skip to leave them out")
        log(message + " (left out; --on-bad refuse raises instead)")
    if not names:
        raise ValueError(f"length: no usable training clips ({report.text()})")
    data = {k: torch.cat(v) for k, v in rows.items()}
    empty = family.encode_text([""], limit)  # the caption-dropout condition
    data.update({f"empty.{k}": (v.to(torch.bfloat16) if v.is_floating_point() else v).cpu() for k, v in empty.items()})
    return data, names, captions


def _load_or_encode(family, clips, cfg, height, width, limit, accelerator, log) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the training data, its captions): from the cache, or encoded by the main process (and cached)."""
    from safetensors.torch import load_file, save_file

    folder = Path(cfg.data_cache or Path(cfg.out) / "data")
    index = folder / "index.json"
    fingerprint = _fingerprint(cfg, family.pipe.transformer, height, width, limit)
    if cfg.cache_latents and index.is_file():
        saved = json.loads(index.read_text())
        if saved["fingerprint"] != fingerprint:
            diff = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
            was = ", ".join(f"{k}: {saved['fingerprint'].get(k)!r}" for k in diff)
            raise ValueError(f"length: the data cache {folder} was built for other data ({was}); "
                             "pass another --data-cache, or delete that folder")
        parts = [load_file(str(folder / name)) for name in saved["shards"]]
        log(f"data: {saved['report']['used']} clips from the cache {folder}")
        data = {k: torch.cat([p[k] for p in parts]) if not k.startswith("empty.") else parts[0][k] for k in parts[0]}
        return data, saved["captions"]
    if not cfg.cache_latents and accelerator.num_processes > 1:
        raise ValueError("length: --cache-latents false runs in one process only (the other processes read the cache)")
    if accelerator.is_main_process:
        report = DataReport()
        data, names, captions = _encode_clips(family, clips(cfg.frames, height, width, report), cfg, height, width, limit, report, log)
        if cfg.cache_latents:
            folder.mkdir(parents=True, exist_ok=True)
            shards = []
            n = data["latents"].shape[0]
            for s, start in enumerate(range(0, n, SHARD)):
                part = {k: (v if k.startswith("empty.") else v[start : start + SHARD]).contiguous() for k, v in data.items()}
                path = folder / f"shard_{s:05d}.safetensors"
                save_file(part, str(path.with_suffix(".tmp")))
                os.replace(path.with_suffix(".tmp"), path)
                shards.append(path.name)
            tmp = index.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "shards": shards, "clips": names, "captions": captions,
                                       "report": report.as_dict()}, indent=1))
            os.replace(tmp, index)  # written last: a cache without it is rebuilt
    accelerator.wait_for_everyone()
    if not cfg.cache_latents:
        return data, captions
    return _load_or_encode(family, clips, cfg, height, width, limit, accelerator, log)


def _batch(data: dict, cfg: LengthConfig, step: int, rank: int, world: int, shift: float, device, dropout: float):
    """Latents, noise, noise levels and conditioning of (step, process)."""
    idx = batch_indices(data["latents"].shape[0], cfg.batch_size, step, rank, world, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    x0 = data["latents"][idx].float()
    noise = torch.randn(x0.shape, generator=g)
    u = torch.sigmoid(torch.randn(len(idx), generator=g))  # logit-normal, then the scheduler's shift
    sigma = shift * u / (1 + (shift - 1) * u)
    drop = torch.rand(len(idx), generator=g) < dropout
    cond = {}
    for key in data:
        if key == "latents" or key.startswith("empty."):
            continue
        value = data[key][idx].clone()
        if drop.any():
            value[drop] = data[f"empty.{key}"].to(value.dtype).expand(int(drop.sum()), *value.shape[1:])
        cond[key] = (value.float() if value.is_floating_point() else value).to(device)
    return x0.to(device), noise.to(device), sigma.to(device), cond


# ------------------------------------------------------------------------------------------ train


def method_options(pipe, cfg: LengthConfig) -> dict:
    """The options the LoRA is trained and later run with: the pipeline's declared defaults for the
    method, the user's ``method_options`` and ``dense_layers = dense_blocks`` (step schedule apart)."""
    if cfg.method == "dense":
        return {}
    declared = dict((getattr(pipe, "diffattn_defaults", None) or {}).get(cfg.method, {}))
    user = parse_options(cfg.method_options)
    clash = sorted(set(user) & {*SCHEDULE_FIELDS, "dense_layers"})
    if clash:
        raise ValueError(f"length: {clash} cannot go in --method-options: training runs the method at every step, and "
                         "the dense blocks are --dense-blocks (inference takes the method's own dense steps)")
    options = {k: v for k, v in {**declared, **user}.items() if k not in SCHEDULE_FIELDS}
    options["dense_layers"] = cfg.dense_blocks
    from diffattn.methods import METHODS

    METHODS[cfg.method].from_options(diffattn.detect_family(pipe), **options)  # bad values raise here, naming the option
    return options


def lora_targets(model) -> list[str]:
    """Full names of the q/k/v/out projections of the attention modules diffattn's methods run on."""
    names = dict(model.named_modules())
    targets = [f"{m}.{p}" for m in diffattn.attention_modules(model) for p in PROJECTIONS
               if isinstance(names.get(f"{m}.{p}"), torch.nn.Linear)]
    if not targets:
        raise ValueError(f"length: no q/k/v/out linear layers found in the attention modules of {type(model).__name__}")
    return targets


def train(cfg: LengthConfig, *, pipe=None, clips=None, consume: bool = False, _stop_after: int | None = None) -> Path:
    """Run (or resume) a length-extension LoRA training; returns the output folder.

    ``pipe``: an already loaded pipeline (else ``cfg.pipeline`` is loaded; a passed one is left as
    it was found, also when training fails). With ``cfg.fsdp`` the transformer is sharded in place,
    which cannot be undone: a passed pipeline is then refused unless ``consume=True`` hands it to
    the trainer (it is not usable afterwards). ``clips``: a callable ``clips(frames, height, width,
    report)`` returning an iterable of ``(name, uint8 [F, H, W, 3], caption)`` (the testbed's
    procedural generator; clips it cannot use go to ``report.add(name, BadClip(reason, detail))``),
    used instead of ``cfg.data``; it is only called when the data cache has to be built."""
    if cfg.frames == 0:
        raise ValueError("length: pass --frames, the target length in pixel frames (e.g. 113 for 4x the testbed's 29)")
    if clips is None and not cfg.data:
        raise ValueError("length: pass --data DIR (videos with .txt/.json captions)"
                         + (" or, on the testbed, --self-generate N" if cfg.pipeline == "testbed" else ""))
    if clips is not None and cfg.data:
        raise ValueError("length: pass either --data or generated clips, not both")
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, out, lambda msg: print(f"[length] {msg}", flush=True))
    check_fsdp(cfg, accelerator, pipe is not None, consume)
    if cfg.compile and (accelerator.num_processes > 1 or cfg.fsdp or cfg.context_parallel):
        raise ValueError(f"length: --compile true is tested in one process without --fsdp or --context-parallel (this run: "
                         f"{accelerator.num_processes} processes, fsdp={cfg.fsdp}, context_parallel={cfg.context_parallel!r}); "
                         "run it without --compile")
    log = lambda msg: print(f"[length] {msg}", flush=True) if accelerator.is_main_process else None  # noqa: E731
    if pipe is None:
        from diffusers import DiffusionPipeline

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        pipe = DiffusionPipeline.from_pretrained(cfg.pipeline, torch_dtype=dtype)
    family = _family(pipe)
    model = pipe.transformer
    valid_frames(cfg.frames, pipe.vae_scale_factor_temporal)
    height, width = _size(pipe, cfg, model, family)
    limit = cfg.max_sequence_length or family.default_limit()
    if getattr(model, "peft_config", None):
        raise ValueError(f"length: the transformer has LoRA adapters loaded ({sorted(model.peft_config)}); fuse them "
                         "(pipe.fuse_lora(); pipe.unload_lora_weights()) or unload them before training")
    options = method_options(pipe, cfg)  # raises for bad option values, before anything is written
    check_resume(out, cfg, RESUMABLE, "length", write=accelerator.is_main_process)  # the inputs are valid
    accelerator.wait_for_everyone()
    if clips is None:
        fps = None if cfg.fps < 0 else (cfg.fps or family.FPS)
        clips = lambda frames, h, w, report: folder_clips(cfg.data, frames, h, w, report, fps)  # noqa: E731
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    data, captions = _load_or_encode(family, clips, cfg, height, width, limit, accelerator, log)
    shift = cfg.shift or float(pipe.scheduler.config.get("flow_shift") or pipe.scheduler.config.get("shift") or 1.0)
    guided = bool(getattr(model.config, "guidance_embeds", False))
    dropout = (0.0 if guided else 0.1) if cfg.caption_dropout < 0 else cfg.caption_dropout
    saved = {name: (m.training, [p.requires_grad for p in m.parameters()])
             for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    handle = wrapped = None
    ulysses, ring = parse_context_parallel(cfg.context_parallel, "length")
    sequence_parallel = ulysses * ring > 1
    try:
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.requires_grad_(False)
        lora_config, targets = _add_lora(model, cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        if cfg.method != "dense":
            handle = diffattn.apply(model, cfg.method, backend=cfg.backend, dense_steps=0, last_dense_steps=0, **options)
            options = trained_options(handle)
        group = (accelerator.process_index, accelerator.num_processes)  # (data-parallel rank, world)
        if sequence_parallel:
            group = enable_sequence_parallel(model, accelerator, ulysses, ring, "length")
        model_name = type(model).__name__
        if cfg.fsdp:  # the parameters become shards: the optimizer takes the new ones
            shard_model(model, accelerator, cfg.mixed_precision, "length")
            trainable = [p for p in model.parameters() if p.requires_grad]
        latent_frames = data["latents"].shape[2]
        log(f"{model_name}: {sum(p.numel() for p in trainable) / 1e6:.2f} M trainable (LoRA r={cfg.lora_rank}, "
            f"alpha={lora_config.lora_alpha}, {len(targets)} projections), method {cfg.method} {options}, "
            f"{data['latents'].shape[0]} clips of {cfg.frames} frames ({latent_frames} latent) at {height}x{width}, "
            f"caption dropout {dropout}"
            + (f", sequence parallel over {ulysses * ring} processes (ulysses {ulysses}, ring {ring})" if sequence_parallel else "")
            + (f", sharded over {accelerator.num_processes} processes (FSDP)" if cfg.fsdp else ""))
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the decay follows --steps (a resume with more steps moves it; --max-minutes does not)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: scheduled_lr(s, 1.0, cfg.warmup, decay=cfg.lr_decay, progress=s / cfg.steps))
        start = load_checkpoint(out, model, optimizer, scheduler, world=accelerator.num_processes)
        if start:
            log(f"resuming at step {start}")
        if cfg.fsdp:  # sharded already: accelerate must not wrap it in DDP too
            wrapped, optimizer = model, accelerator.prepare(optimizer)
        else:
            wrapped, optimizer = accelerator.prepare(model, optimizer)
        step = _loop(cfg, accelerator, wrapped, optimizer, scheduler, trainable, family, data, captions, shift, dropout,
                     guided, start, pipe, model, height, width, limit, log, _stop_after, group, ulysses * ring)
        accelerator.wait_for_everyone()
        if step >= cfg.steps:
            # gathered whole on every process under FSDP (a collective), else read by the writer only
            state = trainable_state(accelerator.unwrap_model(wrapped)) if cfg.fsdp or accelerator.is_main_process else None
            if accelerator.is_main_process:
                _export(out, pipe, accelerator.unwrap_model(wrapped), cfg, lora_config, options, height, width, latent_frames, limit, state)
        elif step < cfg.steps:
            log(f"stopped at step {step} of {cfg.steps}: no LoRA exported yet; the same command resumes")
        accelerator.end_training()
    finally:  # the caller's pipeline as it was: processors, no adapter, checkpointing, modes, requires_grad
        if not cfg.fsdp:  # (sharded in place, the pipeline was the trainer's: nothing to hand back)
            _restore(pipe, model, accelerator, wrapped, handle, sequence_parallel, cfg, checkpointing, saved)
    return out


def _restore(pipe, model, accelerator, wrapped, handle, sequence_parallel, cfg, checkpointing, saved) -> None:
    if wrapped is not None:
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    if handle is not None:
        handle.remove()
    if sequence_parallel:
        diffattn.disable_parallelism(model)
    if getattr(model, "peft_config", None):
        model.unload_lora()  # ours was the only adapter (others are refused above)
    if cfg.gradient_checkpointing and not checkpointing:
        model.disable_gradient_checkpointing()
    for name, (training, flags) in saved.items():
        module = pipe.components[name]
        module.train(training)
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _add_lora(model, cfg: LengthConfig):
    from peft import LoraConfig

    targets = lora_targets(model)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights=True,
                        target_modules=targets)
    with torch.random.fork_rng(devices=[]):  # the adapter's initialisation follows --seed only
        torch.manual_seed(cfg.seed)
        model.add_adapter(config)
    return config, targets


def trained_options(handle) -> dict:
    """The method's resolved config (schedule steps apart) and block-size knobs: what the LoRA was
    trained with, recorded so that ``apply(..., lora=)`` runs exactly that."""
    from dataclasses import asdict

    options = {k: v for k, v in asdict(handle.method.config).items() if k not in SCHEDULE_FIELDS}
    for knob in ("block_size", "block_m", "block_n"):
        value = getattr(handle.method, knob, None)
        if knob not in options and isinstance(value, int):
            options[knob] = value
    return options


def _loop(cfg, accelerator, wrapped, optimizer, scheduler, trainable, family, data, captions, shift, dropout, guided,
          start, pipe, model, height, width, limit, log, stop_after, group=(0, 1), cp_degree=1) -> int:
    """``group``: (data-parallel rank, world) of this process; ``cp_degree`` processes share each
    batch under sequence parallelism (each holds the gradient of its part of the sequence; DDP
    averages over every process, so the loss is scaled by ``cp_degree`` to average over batches)."""
    out = Path(cfg.out)
    run = RunLog(accelerator, out, "length", cfg, cfg.steps, start)
    deadline = None if not cfg.max_minutes else now() + 60 * cfg.max_minutes
    validation = cfg.validation_prompt or captions[0]
    step = start
    # with --compile, the first step (of a run or a resume) runs eagerly: the method builds its block
    # descriptions (cached on the handle) and logs its backend choice outside the graph, which is then
    # traced whole; traced during that first step, each would be a graph break that stays in the
    # compiled code (the blocks compiled one by one, past dynamo's recompile limit). The function is
    # compiled, not the module: the caller's pipeline is handed back uncompiled and the LoRA saved
    # from it; diffattn's kernels are torch.library custom ops, so the graph holds them whole
    fast = torch.compile(family.forward, dynamic=False) if cfg.compile else family.forward
    try:
        while step < cfg.steps:
            x0, noise, sigma, cond = _batch(data, cfg, step, group[0], group[1], shift, accelerator.device, dropout)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            with accelerator.autocast():
                pred = (family.forward if step == start else fast)(wrapped, xt, sigma, {**cond, "guidance_embeds": guided})
            loss = F.mse_loss(pred.float(), noise - x0)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss * cp_degree)
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            run.step(step, {"loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0]})
            stop = deadline_reached(accelerator, deadline)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                accelerator.wait_for_everyone()
                save_checkpoint(out, step, accelerator.unwrap_model(wrapped), optimizer, scheduler, world=accelerator.num_processes,
                                write=accelerator.is_main_process)  # every process: FSDP gathers the shards
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                if accelerator.is_main_process or cp_degree > 1 or cfg.fsdp:  # sequence parallel or sharded: every process samples
                    _validate(pipe, model, cfg, validation, step, height, width, limit, log, write=accelerator.is_main_process)
                accelerator.wait_for_everyone()
            if stop_after is not None and step >= stop_after:
                raise Killed(step)
            if stop:
                log(f"--max-minutes reached at step {step}; the same command resumes")
                break
    finally:
        run.close()
    return step


def _validate(pipe, model, cfg: LengthConfig, prompt: str, step: int, height: int, width: int, limit: int, log,
              write: bool = True) -> None:
    """An mp4 sample at the target length with the training attention (fixed seed)."""
    from diffusers.utils import export_to_video

    folder = Path(cfg.out) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    call = {"num_inference_steps": cfg.validation_steps} if cfg.validation_steps else {}
    model.eval()
    try:
        with torch.no_grad():
            frames = pipe(prompt=prompt, height=height, width=width, num_frames=cfg.frames, output_type="np", max_sequence_length=limit,
                          generator=torch.Generator("cpu").manual_seed(cfg.seed), **call).frames[0]
    finally:
        model.train()
    if not write:
        return
    path = folder / f"step_{step:07d}.mp4"
    export_to_video(list(frames), str(path), fps=16)
    log(f"validation sample: {path}")


def _export(out: Path, pipe, model, cfg: LengthConfig, lora_config, options: dict, height: int, width: int, latent_frames: int,
            limit: int, state: dict) -> None:
    """``state``: the trainable tensors, whole (``trainable_state``)."""
    from peft.utils import get_peft_model_state_dict

    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_config.to_dict().items()}
    type(pipe).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model, state_dict=state), weight_name=LORA_NAME,
                                 transformer_lora_adapter_metadata=metadata)
    write_meta(out, method=cfg.method, options=options, model=model, kind="lora", extra={
        "combinable": True, "purpose": "length", "frames": cfg.frames, "latent_frames": latent_frames,
        "height": height, "width": width, "max_sequence_length": limit, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha or cfg.lora_rank,
        "base_path": cfg.pipeline, "steps": cfg.steps,
    })


def main(argv=None) -> None:
    """``python -m diffattn.lora.length --pipeline PATH ...`` (also under ``accelerate launch``)."""
    cfg = config_from_argv(LengthConfig, sys.argv[1:] if argv is None else argv, __doc__)
    if cfg.pipeline == "testbed" or cfg.self_generate:
        raise ValueError("length: --pipeline testbed and --self-generate are resolved by the CLI (diffattn train length); "
                         "pass a pipeline folder and --data here")
    train(cfg)


__all__ = ["LengthConfig", "lora_targets", "main", "method_options", "parse_options", "train", "valid_frames"]

if __name__ == "__main__":
    main()
