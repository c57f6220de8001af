"""Train the testbed text-to-video pipeline (``WanPipeline`` at toy width) on procedural clips.

    python -m diffattn_testbed.train_video --out OUT/video --max-minutes 8            # from scratch
    python -m diffattn_testbed.train_video --init OUT/video --out OUT2/video --vae-steps 0 --max-minutes 6
    python -m diffattn_testbed.train_video --out /tmp/v --size 32 --frames 9 --scenes 8 --steps 2 --device cpu  # smoke

The committed weights are 16 rounds of this script (and one decoder-only VAE round) (``testbed/train_all.sh`` lists them;
``testbed.json`` records each round's config and steps). Seeded. Two stages on one GPU, then the fp16 pipeline is written with ``save_pretrained``:

1. the ``AutoencoderKLWan`` (4x space, 4x time, 8 latent channels) learns to reconstruct ``--vae-crop``-frame
   crops (MSE + L1 + a small KL; ``--vae-train decoder`` trains the decoder only, keeping the latent
   space a trained transformer knows; ``--vae-from`` takes the VAE of another saved round); its per-channel latent mean / std go into its config
   (``latents_mean`` / ``latents_std``, which ``WanPipeline`` uses to unscale before decoding);
2. ``scenes`` clips (29 frames, 128x128, 1 to ``max_objects`` objects) are encoded once, and the
   ``WanTransformer3DModel`` and the UMT5 text encoder train together with flow matching (velocity
   target, logit-normal noise levels shifted like the scheduler's ``flow_shift``), 10 % empty
   captions for classifier-free guidance, bf16 autocast and an EMA of the weights.

Text goes through the pipeline's own ``encode_prompt`` (padded to ``TEXT_TOKENS``, as at inference).
``--max-minutes`` stops early and saves. The learning rate warms up, stays constant, and with
``--decay F`` ramps to 0 over the last fraction F of the run (by steps, or by the clock under
``--max-minutes``). ``--compile true`` compiles the transformer blocks (regional ``torch.compile``).
``testbed.json`` records what was done.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .pipelines import DEFAULTS, TEXT_TOKENS, build_pipeline
from .training import (
    EVAL_SEED, EMA, Clock, LossLog, adamw, compile_blocks, config_from_argv, drop_captions, folder_mb, history, optimizer_step, print_config,
    render_stream, run_progress, save_pipeline, scheduled_lr, shifted_sigmas, to_unit, training_attention, vae_loss, warmup_lr, write_preview,
)


@dataclass(frozen=True)
class VideoTrainConfig:
    out: str = "testbed/weights/video"
    seed: int = 0
    size: int = 128
    frames: int = 29
    max_objects: int = 2
    scenes: int = 16000
    vae_scenes: int = 2048
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    steps: int = 9000
    batch: int = 48
    lr: float = 4e-4
    warmup: int = 300
    ema: float = 0.999
    shift: float = 3.0
    caption_dropout: float = 0.1
    workers: int = 8
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    max_minutes: float | None = None
    init: str = ""  # continue from a saved video pipeline folder (fresh optimizer; its record goes to "history")
    vae_crop: int = 13  # frames per VAE training crop (4k+1; >= 13 so that the causal cache of later chunks is trained)
    preview: str = ""  # PNG of held-out samples written after saving (empty: none)
    vae_max_minutes: float | None = None
    vae_train: str = "all"  # "all", or "decoder": the encoder (and so the latent space the DiT knows) stays fixed
    decay: float = 0.0  # last fraction of the run (steps or --max-minutes) over which the learning rate ramps to 0
    compile: bool = False  # regional torch.compile of the transformer blocks (CUDA)
    scene_offset: int = 0  # transformer scenes are seeds offset .. offset + scenes - 1 (a later round can see new ones)
    vae_from: str = ""  # take the VAE from this saved video pipeline folder instead of --init's


def _clips(pixels: np.ndarray, device) -> torch.Tensor:
    # uint8 [N, F, H, W, 3] -> [N, 3, F, H, W] in [-1, 1]
    return to_unit(torch.from_numpy(pixels).to(device)).permute(0, 4, 1, 2, 3).contiguous()


def train_vae(cfg: VideoTrainConfig, vae, clock: Clock, loaded: bool) -> dict:
    dev = cfg.device
    data = []  # with vae_steps=0 (keep an --init VAE as it is) only the 64 clips for the statistics
    for pixels, _ in render_stream(range(cfg.vae_scenes if cfg.vae_steps else 64), image=False, max_objects=cfg.max_objects, frames=cfg.frames,
                                   size=cfg.size, workers=cfg.workers, chunk=256):
        data.append(torch.from_numpy(pixels).to(dev))
    data = torch.cat(data)  # uint8 [N, F, H, W, 3]
    clock.log(f"vae: rendered {len(data)} clips")
    if cfg.vae_train not in ("all", "decoder"):
        raise SystemExit(f"train_video: --vae-train must be 'all' or 'decoder', got {cfg.vae_train!r}")
    # the latent statistics the DiT was trained with stay when the encoder does not change
    keep_stats = cfg.vae_train == "decoder" or (loaded and cfg.vae_steps == 0)
    vae.train().to(dev)
    if cfg.vae_train == "decoder":  # the encoder, quant_conv and statistics stay as loaded
        vae.requires_grad_(False)
        for part in (vae.decoder, vae.post_quant_conv):
            part.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    crop = cfg.vae_crop
    step = -1
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(data), (cfg.vae_batch,), generator=g)
        t0 = int(torch.randint(0, cfg.frames - crop + 1, (1,), generator=g))
        x = to_unit(data[idx.to(dev), t0 : t0 + crop]).permute(0, 4, 1, 2, 3).contiguous()
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, cfg.vae_lr, 100)
        loss, recon = vae_loss(vae, x)
        optimizer_step(opt, loss, [p for p in vae.parameters() if p.requires_grad])
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            clock.log(f"vae step {step} loss {loss.item():.4f} mse {F.mse_loss(recon, x).item():.5f}")
        if cfg.vae_max_minutes is not None and clock.elapsed() > 60 * cfg.vae_max_minutes:
            clock.log(f"vae: time budget reached after step {step}")
            break
    vae.eval()
    # per-channel statistics of the posterior means: the pipeline's latents_mean / latents_std
    with torch.no_grad(), torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
        x = _clips(data[:64].cpu().numpy(), dev)
        mu = torch.cat([vae.encode(x[i : i + 16]).latent_dist.mode().float() for i in range(0, len(x), 16)])
        recon = torch.cat([vae.decode(mu[i : i + 16]).sample.float() for i in range(0, len(x), 16)])
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), x)))
    mean = mu.mean(dim=(0, 2, 3, 4)).tolist()
    std = mu.std(dim=(0, 2, 3, 4)).tolist()
    if not keep_stats:
        vae.register_to_config(latents_mean=[round(v, 5) for v in mean], latents_std=[round(v, 5) for v in std])
    clock.log(f"vae: {step + 1} steps ({cfg.vae_train}), full-clip reconstruction PSNR {psnr:.2f} dB; latent mean {mean} std {std}")
    return {"steps": step + 1, "train": cfg.vae_train, "crop": crop, "psnr_db": psnr}  # steps 0: the VAE was kept as loaded


def train_transformer(cfg: VideoTrainConfig, pipe, clock: Clock) -> tuple[int, float]:
    """Flow matching of the transformer and text encoder on VAE-encoded clips: (steps done, final loss)."""
    dev = cfg.device
    vae = pipe.vae.requires_grad_(False)
    mean = torch.tensor(vae.config.latents_mean, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=dev).view(1, -1, 1, 1, 1)

    latents, captions = [], []
    with torch.no_grad(), torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
        for pixels, caps in render_stream(range(cfg.scene_offset, cfg.scene_offset + cfg.scenes), image=False,
                                          max_objects=cfg.max_objects, frames=cfg.frames, size=cfg.size, workers=cfg.workers, chunk=256):
            x = _clips(pixels, dev)
            for i in range(0, len(x), 32):
                mu = vae.encode(x[i : i + 32]).latent_dist.mode().float()
                latents.append(((mu - mean) / std).to(torch.bfloat16))
            captions += caps
    latents = torch.cat(latents)  # [N, C, F', Y', X'] normalized
    clock.log(f"encoded {len(latents)} clips -> latents {tuple(latents.shape[1:])}")
    transformer, text_encoder = pipe.transformer.to(dev).train(), pipe.text_encoder.to(dev).train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = adamw(params, cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_t, ema_e = EMA(transformer, cfg.ema), EMA(text_encoder, cfg.ema)
    if cfg.compile:
        compile_blocks(transformer)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # noise comes from the default generator of the device, where it is used
    step, log = 0, LossLog(clock)
    for step in range(cfg.steps):
        idx = rng.integers(0, len(latents), cfg.batch)
        x0 = latents[torch.from_numpy(idx).to(dev)].float()
        noise = torch.randn(x0.shape, device=dev)
        sigma = shifted_sigmas(cfg.batch, cfg.shift, g, dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        caps = drop_captions([captions[i] for i in idx], cfg.caption_dropout, rng)
        lr = scheduled_lr(step, cfg.lr, cfg.warmup, decay=cfg.decay, progress=run_progress(step, cfg.steps, clock, cfg.max_minutes))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
            text, _ = pipe.encode_prompt(caps, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS, device=dev)
            pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        optimizer_step(opt, loss, params)
        ema_t.update(transformer, step)
        ema_e.update(text_encoder, step)
        log.add(step, loss, last=step == cfg.steps - 1)
        if clock.left() < 45:
            clock.log(f"deadline: stopping after step {step}")
            break
    ema_t.copy_to(transformer)
    ema_e.copy_to(text_encoder)
    transformer.eval()
    text_encoder.eval()
    return step + 1, log.mean()


def train(cfg: VideoTrainConfig) -> dict:
    clock = Clock(cfg.max_minutes)
    print_config(cfg)
    if cfg.scene_offset + cfg.scenes > EVAL_SEED:
        raise SystemExit(f"train_video: training scenes must stay below the held-out seeds ({EVAL_SEED}); lower --scene-offset")
    if (cfg.frames - 1) % 4:
        raise SystemExit(f"train_video: --frames must be 4k+1 (the VAE's time compression), got {cfg.frames}")
    if cfg.init:
        from diffusers import WanPipeline

        torch.manual_seed(cfg.seed)
        pipe = WanPipeline.from_pretrained(cfg.init, torch_dtype=torch.float32)
    else:
        pipe = build_pipeline("video", seed=cfg.seed)
    past = history(cfg.init)
    if cfg.vae_from:  # the VAE of another saved video pipeline (e.g. a decoder-only round run beside this one)
        from diffusers import AutoencoderKLWan

        pipe.vae = None
        pipe.register_modules(vae=AutoencoderKLWan.from_pretrained(Path(cfg.vae_from) / "vae", torch_dtype=torch.float32))
        past.append({"vae_from": cfg.vae_from, "rounds": history(cfg.vae_from)})
    vae_record = train_vae(cfg, pipe.vae, clock, loaded=bool(cfg.init or cfg.vae_from))
    steps, final_loss = train_transformer(cfg, pipe, clock) if cfg.steps > 0 else (0, None)
    record = {
        "kind": "video", "config": asdict(cfg), "history": past, "vae": vae_record, "steps": steps,
        "final_loss": final_loss, "seconds": round(clock.elapsed(), 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "defaults": DEFAULTS["video"],
    }
    out = Path(cfg.out)
    save_pipeline(pipe, out, record)
    clock.log(f"saved {out} ({folder_mb(out):.2f} MB) after {steps} transformer steps")
    print(json.dumps({k: v for k, v in record.items() if k not in ("config", "history")}), flush=True)
    if cfg.preview:
        write_preview("video", out, Path(cfg.preview), cfg.device)
        clock.log(f"preview written to {cfg.preview}")
    return record


def main(argv=None) -> None:
    cfg = config_from_argv(VideoTrainConfig, argv, __doc__)
    with training_attention():
        train(cfg)


if __name__ == "__main__":
    main()
