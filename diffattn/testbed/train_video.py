"""Train the testbed text-to-video pipeline (``WanPipeline`` at toy width) on procedural clips.

    python -m diffattn.testbed.train_video --out OUT/video --max-minutes 8            # from scratch
    python -m diffattn.testbed.train_video --init OUT/video --out OUT2/video --vae-steps 0 --max-minutes 6
    python -m diffattn.testbed.train_video --out /tmp/v --size 32 --frames 9 --scenes 8 --steps 2 --device cpu  # smoke

The committed weights are 4 rounds of this script (``diffattn/testbed/train_all.sh`` lists them;
``testbed.json`` records each round's config and steps). Seeded. Two stages on one GPU, then the fp16 pipeline is written with ``save_pretrained``:

1. the ``AutoencoderKLWan`` (4x space, 4x time, 8 latent channels) learns to reconstruct 9-frame
   crops (MSE + L1 + a small KL); its per-channel latent mean / std go into its config
   (``latents_mean`` / ``latents_std``, which ``WanPipeline`` uses to unscale before decoding);
2. ``scenes`` clips (29 frames, 128x128, 1 to ``max_objects`` objects) are encoded once, and the
   ``WanTransformer3DModel`` and the UMT5 text encoder train together with flow matching (velocity
   target, logit-normal noise levels shifted like the scheduler's ``flow_shift``), 10 % empty
   captions for classifier-free guidance, bf16 autocast and an EMA of the weights.

Text goes through the pipeline's own ``encode_prompt`` (512 padded tokens, as at inference).
``--max-minutes`` stops early and saves (the learning rate is constant after warm-up, so a run
stopped at step N equals one run with ``--steps N``); ``testbed.json`` records what was done.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .pipelines import DEFAULTS, build_pipeline
from .training import (
    EMA, Clock, config_from_argv, drop_captions, folder_mb, history, optimizer_step, print_config, render_stream, save_pipeline, shifted_sigmas, to_unit,
    training_attention, vae_loss, warmup_lr, write_preview,
)


@dataclass(frozen=True)
class VideoTrainConfig:
    out: str = "diffattn/testbed/weights/video"
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


def _clips(pixels: np.ndarray, device) -> torch.Tensor:
    # uint8 [N, F, H, W, 3] -> [N, 3, F, H, W] in [-1, 1]
    return to_unit(torch.from_numpy(pixels).to(device)).permute(0, 4, 1, 2, 3).contiguous()


def train_vae(cfg: VideoTrainConfig, vae, clock: Clock) -> dict:
    dev = cfg.device
    data = []  # with vae_steps=0 (keep an --init VAE as it is) only the 64 clips for the statistics
    for pixels, _ in render_stream(range(cfg.vae_scenes if cfg.vae_steps else 64), image=False, max_objects=cfg.max_objects, frames=cfg.frames,
                                   size=cfg.size, workers=cfg.workers, chunk=256):
        data.append(torch.from_numpy(pixels).to(dev))
    data = torch.cat(data)  # uint8 [N, F, H, W, 3]
    clock.log(f"vae: rendered {len(data)} clips")
    vae.train().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
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
        optimizer_step(opt, loss, vae.parameters())
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
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean], latents_std=[round(v, 5) for v in std])
    clock.log(f"vae: {step + 1} steps, full-clip reconstruction PSNR {psnr:.2f} dB; latent mean {mean} std {std}")
    return {"steps": step + 1, "psnr_db": psnr}  # steps 0: the VAE was kept as loaded


def train(cfg: VideoTrainConfig) -> dict:
    clock = Clock(cfg.max_minutes)
    print_config(cfg)
    dev = cfg.device
    if (cfg.frames - 1) % 4:
        raise SystemExit(f"train_video: --frames must be 4k+1 (the VAE's time compression), got {cfg.frames}")
    if cfg.init:
        from diffusers import WanPipeline

        torch.manual_seed(cfg.seed)
        pipe = WanPipeline.from_pretrained(cfg.init, torch_dtype=torch.float32)
    else:
        pipe = build_pipeline("video", seed=cfg.seed)
    vae_record = train_vae(cfg, pipe.vae, clock)
    vae = pipe.vae.requires_grad_(False)
    mean = torch.tensor(vae.config.latents_mean, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=dev).view(1, -1, 1, 1, 1)

    latents, captions = [], []
    with torch.no_grad(), torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
        for pixels, caps in render_stream(range(cfg.scenes), image=False, max_objects=cfg.max_objects,
                                          frames=cfg.frames, size=cfg.size, workers=cfg.workers, chunk=256):
            x = _clips(pixels, dev)
            for i in range(0, len(x), 32):
                mu = vae.encode(x[i : i + 32]).latent_dist.mode().float()
                latents.append(((mu - mean) / std).to(torch.bfloat16))
            captions += caps
    latents = torch.cat(latents)  # [N, C, F', Y', X'] normalized
    clock.log(f"encoded {len(latents)} clips -> latents {tuple(latents.shape[1:])}")

    transformer, text_encoder = pipe.transformer.to(dev).train(), pipe.text_encoder.to(dev).train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_t, ema_e = EMA(transformer, cfg.ema), EMA(text_encoder, cfg.ema)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    step, losses = 0, []
    for step in range(cfg.steps):
        idx = rng.integers(0, len(latents), cfg.batch)
        x0 = latents[torch.from_numpy(idx).to(dev)].float()
        noise = torch.randn(x0.shape, generator=g).to(dev)
        sigma = shifted_sigmas(cfg.batch, cfg.shift, g, dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        caps = drop_captions([captions[i] for i in idx], cfg.caption_dropout, rng)
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, cfg.lr, cfg.warmup)
        with torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
            text, _ = pipe.encode_prompt(caps, do_classifier_free_guidance=False, max_sequence_length=512, device=dev)
            pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        optimizer_step(opt, loss, params)
        ema_t.update(transformer, step)
        ema_e.update(text_encoder, step)
        losses.append(loss.item())
        if step % 250 == 0 or step == cfg.steps - 1:
            clock.log(f"step {step} loss {np.mean(losses[-250:]):.4f}")
        if clock.left() < 45:
            clock.log(f"deadline: stopping after step {step}")
            break
    ema_t.copy_to(transformer)
    ema_e.copy_to(text_encoder)
    transformer.eval()
    text_encoder.eval()
    record = {
        "kind": "video", "config": asdict(cfg), "history": history(cfg.init), "vae": vae_record, "steps": step + 1,
        "final_loss": float(np.mean(losses[-250:])), "seconds": round(clock.elapsed(), 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "defaults": DEFAULTS["video"],
    }
    out = Path(cfg.out)
    save_pipeline(pipe, out, record)
    clock.log(f"saved {out} ({folder_mb(out):.2f} MB) after {step + 1} steps")
    print(json.dumps({k: v for k, v in record.items() if k != "config"}), flush=True)
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
