"""diffattn command line.

    diffattn generate                                   # the testbed video pipeline, radial vs dense
    diffattn generate --prompt "a red circle moving right" --method radial --out clip.mp4 --seed 3
    diffattn generate --model /path/to/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --height 480 --width 832 --frames 81 --steps 50 --out wan.mp4

``generate`` runs the pipeline twice with the same seed, dense and with the method, writes both
clips (``clip.mp4`` and ``clip_dense.mp4``) and prints the time of each, the mask density, and the
method's quality against dense: PSNR and SSIM, and on the testbed pipeline the judge's reading of
both clips (colour / shape / motion asked by the prompt, ``diffattn_testbed.judge``).

The embedded default is the testbed video pipeline (``diffattn_testbed.load_pipeline("video")``):
a ``WanPipeline`` at toy width trained on procedural shapes, 128x128, 29 frames (8 latent frames of
16x16 tokens), 25 steps. Its prompts use the caption words (``diffattn_testbed.shapes.VOCABULARY``);
other words are refused. ``--model`` loads a real diffusers checkpoint from a local path (or the
hub, when the machine can reach it); size, frames and steps then default to Wan's 480x832, 81, 50.
"""

from __future__ import annotations

import argparse
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
    height: int | None
    width: int | None
    frames: int | None
    steps: int | None
    guidance: float | None
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
    gen.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the testbed video pipeline)")
    gen.add_argument("--height", type=int, default=None, help="default: 128 on the testbed, 480 with --model")
    gen.add_argument("--width", type=int, default=None, help="default: 128 on the testbed, 832 with --model")
    gen.add_argument("--frames", type=int, default=None, help="pixel frames, 4k+1 for Wan (default: 29 testbed, 81 --model)")
    gen.add_argument("--steps", type=int, default=None, help="default: 25 on the testbed, 50 with --model")
    gen.add_argument("--guidance", type=float, default=None, help="default: the testbed pipeline's (DEFAULTS[\"video\"]), 5.0 with --model")
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
    values = {k: v for k, v in vars(args).items() if k != "command"}
    if values["model"] is None:
        from diffattn_testbed.pipelines import DEFAULTS

        d = DEFAULTS["video"]
        fallback = dict(height=d["height"], width=d["width"], frames=d["num_frames"], steps=d["num_inference_steps"],
                        guidance=d["guidance_scale"])
    else:
        fallback = dict(height=480, width=832, frames=81, steps=50, guidance=5.0)
    for name, value in fallback.items():
        if values[name] is None:
            values[name] = value
    return GenerateConfig(**values)


def _check_prompt(cfg: GenerateConfig) -> None:
    """The testbed understands its caption words only: say which words are unknown and list them."""
    from diffattn_testbed.shapes import VOCABULARY, parse_caption, unknown_words

    unknown = unknown_words(cfg.prompt)
    if unknown:
        raise SystemExit(
            f"diffattn: the testbed pipeline does not know {unknown} (its tokenizer would read them as <unk>); "
            f"use its caption words {list(VOCABULARY)}, e.g. 'a red circle moving right on a dark blue background', "
            "or pass --model for a real checkpoint"
        )
    try:
        parse_caption(cfg.prompt)
    except ValueError as exc:
        raise SystemExit(f"diffattn: {exc}") from None


def _check(cfg: GenerateConfig, pipe) -> None:
    if cfg.method not in diffattn.methods():
        raise SystemExit(f"diffattn: unknown method {cfg.method!r}; available methods: {diffattn.methods()}")
    multiple = pipe.vae_scale_factor_spatial * 2  # VAE x patchify
    if cfg.height % multiple or cfg.width % multiple or cfg.height <= 0 or cfg.width <= 0:
        raise SystemExit(
            f"diffattn: --height/--width must be positive multiples of {multiple} for this model, got "
            f"{cfg.height}x{cfg.width} (e.g. {cfg.height // multiple * multiple or multiple}x{cfg.width // multiple * multiple or multiple})"
            + ("; the testbed model was trained at 128x128, 29 frames" if cfg.model is None else "")
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
        from diffattn_testbed.pipelines import load_pipeline

        return load_pipeline("video", device=cfg.device)
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


def generate(cfg: GenerateConfig) -> dict:
    from diffusers.utils import export_to_video

    from diffattn_testbed.metrics import psnr, ssim

    print("diffattn generate", asdict(cfg), flush=True)
    if cfg.model is None:
        _check_prompt(cfg)
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
        from diffattn_testbed.pipelines import METHOD_OPTIONS

        # the testbed's frames are 16 x 16 tokens: 128-token blocks would be near dense
        options.setdefault("block_size", METHOD_OPTIONS["video"].get(cfg.method, {}).get("block_size", 64))
    with diffattn.apply(pipe, cfg.method, **options) as handle:
        method_frames, method_s = _run(pipe, cfg)
        density = handle.method.density(handle.state.layout)
    export_to_video(list(method_frames), cfg.out, fps=cfg.fps)

    report = {
        "dense_seconds": round(dense_s, 3), "method_seconds": round(method_s, 3),
        "speedup": round(dense_s / method_s, 3), "mask_density": round(density, 4),
        "psnr_vs_dense_db": round(psnr(method_frames, dense_frames), 2),
        "ssim_vs_dense": round(ssim(method_frames, dense_frames), 4),
        "layout": repr(handle.state.layout), "clips": [cfg.out, dense_path],
    }
    print(
        f"dense: {dense_s:.2f} s -> {dense_path}\n"
        f"{cfg.method}: {method_s:.2f} s -> {cfg.out} (x{dense_s / method_s:.2f})\n"
        f"{cfg.method} mask density {density:.3f} over {handle.state.layout}, "
        f"PSNR vs dense {report['psnr_vs_dense_db']} dB, SSIM {report['ssim_vs_dense']}",
        flush=True,
    )
    if cfg.model is None:
        from diffattn_testbed.judge import load_judge, score

        judge = load_judge("video")
        for name, frames in (("dense", dense_frames), (cfg.method, method_frames)):
            report[f"judge_{name}"] = score(judge, frames[None], [cfg.prompt])["accuracy"]
            found = ", ".join(f"{k} {v:.0%}" for k, v in report[f"judge_{name}"].items())
            print(f"judge ({name}): prompt attributes found: {found}", flush=True)
    return report


def main(argv=None) -> int:
    cfg = _parse(sys.argv[1:] if argv is None else argv)
    generate(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
