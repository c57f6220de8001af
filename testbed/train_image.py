"""Train the testbed text-to-image pipelines on procedural images.

    python -m diffattn_testbed.train_image --kind vae --out OUT/image-vae --max-minutes 1.3
    python -m diffattn_testbed.train_image --kind image-dit --vae OUT/image-vae --out OUT/image-dit --max-minutes 7
    python -m diffattn_testbed.train_image --kind image-unet --vae OUT/image-vae --out OUT/image-unet --max-minutes 7
    python -m diffattn_testbed.train_image --kind image-unet --init OUT/image-unet --vae OUT/image-vae --out OUT2/image-unet

The committed weights are 3 (U-Net) and 11 (FLUX) rounds of this script, listed in
``testbed/train_all.sh``; ``testbed.json`` records each round. Seeded.

``--kind vae`` trains the 4x ``AutoencoderKL`` the two image pipelines share (MSE + L1 + a
small KL) and stores ``scaling_factor`` = 1 / std of its latents (``shift_factor`` 0, which both
FLUX's and SD's decode formulas then agree on). The pipeline kinds encode ``scenes`` images
(128x128, 1 to ``max_objects`` still objects) once with that VAE and train the denoiser together with
its text encoders through the pipeline's own ``encode_prompt``:

- ``image-dit`` (``FluxPipeline``): flow matching on packed 2x2 latents with the pipeline's own
  latent ids, noise levels shifted by 2 (what the scheduler's dynamic shift gives at 256 tokens);
- ``image-unet`` (``StableDiffusionPipeline``): v-prediction on the pipeline's zero-terminal-SNR
  DDIM schedule (``add_noise`` / ``get_velocity``).

10 % empty captions for classifier-free guidance, bf16 autocast, EMA weights, a learning rate that
warms up, stays constant and with ``--decay F`` ramps to 0 over the last fraction F of the run;
``--compile true`` compiles the FLUX blocks; ``--max-minutes`` stops early and saves;
``testbed.json`` records the steps.
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
    EMA, Clock, LossLog, adamw, compile_blocks, config_from_argv, drop_captions, folder_mb, history, optimizer_step, print_config,
    render_stream, run_progress, save_pipeline, scheduled_lr, shifted_sigmas, to_unit, training_attention, vae_loss, warmup_lr, write_preview,
)


@dataclass(frozen=True)
class ImageTrainConfig:
    kind: str = "image-dit"
    out: str = ""
    vae: str = "testbed/weights/image-vae"
    seed: int = 0
    size: int = 128
    max_objects: int = 2
    scenes: int = 60000
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    steps: int = 8000
    batch: int = 128
    lr: float = 4e-4
    warmup: int = 300
    ema: float = 0.999
    shift: float = 2.0
    caption_dropout: float = 0.1
    workers: int = 4
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    max_minutes: float | None = None
    init: str = ""  # continue from a saved pipeline folder of this kind (fresh optimizer; record -> "history")
    preview: str = ""  # PNG of held-out samples written after saving (empty: none)
    decay: float = 0.0  # last fraction of the run (steps or --max-minutes) over which the learning rate ramps to 0
    compile: bool = False  # regional torch.compile of the transformer blocks (image-dit, CUDA)


def _render(cfg: ImageTrainConfig, n: int, clock: Clock):
    pixels, captions = [], []
    for px, caps in render_stream(range(n), image=True, max_objects=cfg.max_objects, frames=1, size=cfg.size,
                                  workers=cfg.workers, chunk=2048):
        pixels.append(torch.from_numpy(px[:, 0]).to(cfg.device))
        captions += caps
    clock.log(f"rendered {n} images")
    return torch.cat(pixels), captions  # uint8 [N, H, W, 3]


def _images(pixels: torch.Tensor) -> torch.Tensor:
    return to_unit(pixels).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] in [-1, 1]


def train_vae(cfg: ImageTrainConfig, clock: Clock) -> dict:
    from .pipelines import _image_vae

    dev = cfg.device
    torch.manual_seed(cfg.seed)
    vae = _image_vae().to(dev).train()
    data, _ = _render(cfg, min(cfg.scenes, 16384), clock)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    for step in range(cfg.vae_steps):
        x = _images(data[torch.randint(0, len(data), (cfg.vae_batch,), generator=g).to(dev)])
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, cfg.vae_lr, 100)
        loss, _ = vae_loss(vae, x)
        optimizer_step(opt, loss, vae.parameters())
        if step % 250 == 0 or step == cfg.vae_steps - 1:
            clock.log(f"vae step {step} loss {loss.item():.4f}")
        if clock.left() < 20:
            clock.log(f"deadline: stopping after step {step}")
            break
    vae.eval()
    with torch.no_grad(), torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
        x = _images(data[:512])
        mu = vae.encode(x).latent_dist.mode().float()
        recon = vae.decode(mu).sample.float().clamp(-1, 1)
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon, x)))
    vae.register_to_config(scaling_factor=round(float(1 / mu.std()), 5), shift_factor=0.0)
    record = {"kind": "vae", "config": asdict(cfg), "steps": step + 1, "psnr_db": psnr, "seconds": round(clock.elapsed(), 1),
              "latent_mean": float(mu.mean()), "latent_std": float(mu.std())}
    out = Path(cfg.out)
    vae.to("cpu", torch.float16).save_pretrained(str(out), safe_serialization=True)
    (out / "testbed.json").write_text(json.dumps(record, indent=1) + "\n")
    clock.log(f"saved {out}: {step + 1} steps, reconstruction PSNR {psnr:.2f} dB, latent std {float(mu.std()):.4f}")
    return record


def train(cfg: ImageTrainConfig) -> dict:
    clock = Clock(cfg.max_minutes)
    print_config(cfg)
    if not cfg.out:
        raise SystemExit("train_image: pass --out FOLDER")
    if cfg.kind == "vae":
        return train_vae(cfg, clock)
    if cfg.kind not in ("image-dit", "image-unet"):
        raise SystemExit(f"train_image: --kind must be vae, image-dit or image-unet, got {cfg.kind!r}")
    from diffusers import AutoencoderKL

    dev = cfg.device
    if not (Path(cfg.vae) / "config.json").exists():
        raise SystemExit(f"train_image: no trained VAE at {cfg.vae}; run `--kind vae --out {cfg.vae}` first")
    if cfg.init:
        from diffusers import FluxPipeline, StableDiffusionPipeline

        torch.manual_seed(cfg.seed)
        cls = FluxPipeline if cfg.kind == "image-dit" else StableDiffusionPipeline
        pipe = cls.from_pretrained(cfg.init, torch_dtype=torch.float32)
    else:
        pipe = build_pipeline(cfg.kind, seed=cfg.seed)
    pipe.vae = None
    vae = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=torch.float32).to(dev).requires_grad_(False)
    pipe.register_modules(vae=vae)
    scale = vae.config.scaling_factor

    pixels, captions = _render(cfg, cfg.scenes, clock)
    latents = []
    with torch.no_grad(), torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
        for i in range(0, len(pixels), 256):
            latents.append((vae.encode(_images(pixels[i : i + 256])).latent_dist.mode().float() * scale).to(torch.bfloat16))
    latents = torch.cat(latents)  # [N, 4, Y, X], scaled
    del pixels
    clock.log(f"encoded {len(latents)} images -> latents {tuple(latents.shape[1:])}, std {latents.float().std():.3f}")

    net = (pipe.transformer if cfg.kind == "image-dit" else pipe.unet).to(dev).train()
    encoders = [m.to(dev).train() for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    params = list(net.parameters()) + [p for m in encoders for p in m.parameters()]
    opt = adamw(params, cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    emas = [EMA(m, cfg.ema) for m in [net, *encoders]]
    if cfg.compile and cfg.kind == "image-dit":
        compile_blocks(net)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # noise comes from the default generator of the device, where it is used
    b, c, ly, lx = cfg.batch, *latents.shape[1:]
    if cfg.kind == "image-dit":
        img_ids = pipe._prepare_latent_image_ids(b, ly // 2, lx // 2, dev, torch.float32)
    step, log = 0, LossLog(clock)
    for step in range(cfg.steps):
        idx = rng.integers(0, len(latents), b)
        x0 = latents[torch.from_numpy(idx).to(dev)].float()
        noise = torch.randn(x0.shape, device=dev)
        caps = drop_captions([captions[i] for i in idx], cfg.caption_dropout, rng)
        lr = scheduled_lr(step, cfg.lr, cfg.warmup, decay=cfg.decay, progress=run_progress(step, cfg.steps, clock, cfg.max_minutes))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16):
            if cfg.kind == "image-dit":
                text, pooled, text_ids = pipe.encode_prompt(caps, prompt_2=None, device=dev, max_sequence_length=TEXT_TOKENS)
                sigma = shifted_sigmas(b, cfg.shift, g, dev)
                s = sigma.view(-1, 1, 1, 1)
                xt = pipe._pack_latents((1 - s) * x0 + s * noise, b, c, ly, lx)
                target = pipe._pack_latents(noise - x0, b, c, ly, lx)
                pred = net(hidden_states=xt, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=text,
                           txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
            else:
                text = pipe.encode_prompt(caps, dev, 1, False)[0]
                t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (b,), generator=g).to(dev)
                xt = pipe.scheduler.add_noise(x0, noise, t)
                target = pipe.scheduler.get_velocity(x0, noise, t)
                pred = net(xt, t, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        optimizer_step(opt, loss, params)
        for ema, m in zip(emas, [net, *encoders]):
            ema.update(m, step)
        log.add(step, loss, last=step == cfg.steps - 1)
        if clock.left() < 45:
            clock.log(f"deadline: stopping after step {step}")
            break
    for ema, m in zip(emas, [net, *encoders]):
        ema.copy_to(m)
        m.eval()
    record = {
        "kind": cfg.kind, "config": asdict(cfg), "history": history(cfg.init), "steps": step + 1, "final_loss": log.mean(),
        "seconds": round(clock.elapsed(), 1), "defaults": DEFAULTS[cfg.kind],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    out = Path(cfg.out)
    save_pipeline(pipe, out, record)
    clock.log(f"saved {out} ({folder_mb(out):.2f} MB) after {step + 1} steps")
    print(json.dumps({k: v for k, v in record.items() if k != "config"}), flush=True)
    if cfg.preview:
        write_preview(cfg.kind, out, Path(cfg.preview), cfg.device)
        clock.log(f"preview written to {cfg.preview}")
    return record


def main(argv=None) -> None:
    cfg = config_from_argv(ImageTrainConfig, argv, __doc__)
    with training_attention():
        train(cfg)


if __name__ == "__main__":
    main()
