"""diffattn command line.

    diffattn generate                                   # embedded tiny Wan pipeline, radial vs dense
    diffattn generate --prompt "a red circle moving right" --method radial --out clip.mp4 --seed 3
    diffattn generate --model /path/to/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --height 480 --width 832 --frames 81 --steps 50 --out wan.mp4

``generate`` runs the pipeline twice with the same seed, dense and with the method, writes both
clips (``clip.mp4`` and ``clip_dense.mp4``) and prints the time of each, the mask density and the
PSNR of the method's clip against the dense one.

The embedded default is a tiny Wan-architecture pipeline built in code with random weights
(``diffattn.testbed.tiny``): its clips are noise-like, but every attention path, token layout and
schedule is the real one. ``--model`` loads a real diffusers checkpoint from a local path (or the
hub, when the machine can reach it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

import diffattn


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str
    method: str
    out: str
    seed: int
    model: str | None
    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    device: str
    backend: str
    dense_steps: int | None
    decay: float | None
    block_size: int | None
    fps: int


def _parse(argv) -> GenerateConfig:
    parser = argparse.ArgumentParser(prog="diffattn", description="diffattn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a clip dense and with a diffattn method, compare them")
    gen.add_argument("--prompt", default="a red circle moving right on a dark blue background")
    gen.add_argument("--method", default="radial", help=f"one of {diffattn.methods()}")
    gen.add_argument("--out", default="clip.mp4", help="the method's clip; the dense one goes beside it as *_dense.mp4")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the embedded tiny pipeline)")
    gen.add_argument("--height", type=int, default=256)
    gen.add_argument("--width", type=int, default=256)
    gen.add_argument("--frames", type=int, default=61, help="pixel frames; Wan needs 4k+1 (61 -> 16 latent frames)")
    gen.add_argument("--steps", type=int, default=8)
    gen.add_argument("--guidance", type=float, default=5.0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--backend", default="auto", choices=["auto", "triton", "flex", "sdpa"])
    gen.add_argument("--dense-steps", type=int, default=None, help="default: a quarter of --steps (the paper: 12 of 50)")
    gen.add_argument("--decay", type=float, default=None, help="radial window decay (default: the model family's)")
    gen.add_argument(
        "--block-size", type=int, default=None,
        help="radial block size (default: the model family's; 64 for the embedded pipeline's 256-token frames)",
    )
    gen.add_argument("--fps", type=int, default=16)
    args = parser.parse_args(argv)
    return GenerateConfig(**{k: v for k, v in vars(args).items() if k != "command"})


def _check(cfg: GenerateConfig, pipe) -> None:
    if cfg.method not in diffattn.methods():
        raise SystemExit(f"diffattn: unknown method {cfg.method!r}; available methods: {diffattn.methods()}")
    multiple = pipe.vae_scale_factor_spatial * 2  # VAE x patchify
    if cfg.height % multiple or cfg.width % multiple or cfg.height <= 0 or cfg.width <= 0:
        raise SystemExit(
            f"diffattn: --height/--width must be positive multiples of {multiple} for this model, got "
            f"{cfg.height}x{cfg.width} (e.g. {cfg.height // multiple * multiple or multiple}x{cfg.width // multiple * multiple or multiple})"
        )
    temporal = pipe.vae_scale_factor_temporal
    if cfg.frames < 1 or (cfg.frames - 1) % temporal:
        raise SystemExit(
            f"diffattn: --frames must be {temporal}k+1 for this model (1, {temporal + 1}, {2 * temporal + 1}, ...), got {cfg.frames}"
        )
    if cfg.steps < 1:
        raise SystemExit(f"diffattn: --steps must be >= 1, got {cfg.steps}")


def _load(cfg: GenerateConfig):
    if cfg.model is None:
        from diffattn.testbed.tiny import tiny_wan_pipeline

        pipe = tiny_wan_pipeline(seed=0)
    else:
        from diffusers import DiffusionPipeline

        dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
        pipe = DiffusionPipeline.from_pretrained(cfg.model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(cfg.device)


def _run(pipe, cfg: GenerateConfig):
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    frames = pipe(
        prompt=cfg.prompt, height=cfg.height, width=cfg.width, num_frames=cfg.frames,
        num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=generator, output_type="np",
    ).frames[0]
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return frames, time.perf_counter() - start  # [F, H, W, 3] floats in [0, 1]


def _psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def generate(cfg: GenerateConfig) -> dict:
    from diffusers.utils import export_to_video

    print("diffattn generate", asdict(cfg), flush=True)
    pipe = _load(cfg)
    _check(cfg, pipe)
    dense_frames, dense_s = _run(pipe, cfg)
    dense_path = cfg.out[:-4] + "_dense.mp4" if cfg.out.endswith(".mp4") else cfg.out + "_dense.mp4"
    export_to_video(list(dense_frames), dense_path, fps=cfg.fps)

    options = {"backend": cfg.backend, "dense_steps": cfg.dense_steps if cfg.dense_steps is not None else cfg.steps // 4}
    if cfg.decay is not None:
        options["decay"] = cfg.decay
    if cfg.block_size is not None:
        options["block_size"] = cfg.block_size
    elif cfg.model is None:
        options["block_size"] = 64  # the embedded pipeline's frames are 16 x 16 tokens: 128 would be near dense
    with diffattn.apply(pipe, cfg.method, **options) as handle:
        method_frames, method_s = _run(pipe, cfg)
        density = handle.method.density(handle.state.layout)
    export_to_video(list(method_frames), cfg.out, fps=cfg.fps)

    report = {
        "dense_seconds": round(dense_s, 3), "method_seconds": round(method_s, 3),
        "speedup": round(dense_s / method_s, 3), "mask_density": round(density, 4),
        "psnr_vs_dense_db": round(_psnr(method_frames, dense_frames), 2),
        "layout": repr(handle.state.layout), "clips": [cfg.out, dense_path],
    }
    print(
        f"dense: {dense_s:.2f} s -> {dense_path}\n"
        f"{cfg.method}: {method_s:.2f} s -> {cfg.out} (x{dense_s / method_s:.2f})\n"
        f"{cfg.method} mask density {density:.3f} over {handle.state.layout}, "
        f"PSNR vs dense {report['psnr_vs_dense_db']} dB",
        flush=True,
    )
    return report


def main(argv=None) -> int:
    cfg = _parse(sys.argv[1:] if argv is None else argv)
    generate(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
