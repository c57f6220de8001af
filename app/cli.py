"""diffattn command line.

    diffattn generate                                   # the testbed video pipeline, radial vs dense
    diffattn generate --prompt "a red circle moving right" --method radial --out clip.mp4 --seed 3
    diffattn generate --method neighborhood --kernel-size 3 7 7 --stride 1 2 2
    diffattn generate --method neighborhood --help                # that method's options
    diffattn train clear --radius 4 --attn-every 1 --steps 200 --out runs/clear    # distil CLEAR (testbed FLUX)
    diffattn train length --frames 113 --self-generate 1024 --out runs/len4x        # 4x-length LoRA (testbed video)
    diffattn generate --lora runs/len4x --frames 113                                # uses it
    diffattn mask --model wan --height 720 --width 1280 --frames 81 --method radial # density + block map, no weights
    diffattn demo                                                                   # Gradio app on 127.0.0.1:7860
    diffattn headhunter --rounds 2 --top-k 2 --out heads.json                      # head search (testbed video)
    diffattn generate --model /path/to/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --height 480 --width 832 --frames 81 --steps 50 --out wan.mp4

``generate`` runs the pipeline twice with the same seed, dense and with the method, writes both
clips (``clip.mp4`` and ``clip_dense.mp4``) and prints the time of each, the mask density and the
attention calls that ran sparse and dense (``handle.summary()``), and the
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
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field

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
    fps: int
    lora: str | None = None
    lora_scale: float = 1.0
    options: dict = field(default_factory=dict)  # the method's options the user set (the rest: defaults)


def _testbed(module: str):
    """A module of the testbed distribution (the default pipeline, judge and metrics)."""
    import importlib

    try:
        return importlib.import_module(f"diffattn_testbed.{module}")
    except ImportError as exc:
        raise SystemExit(
            f"diffattn: the default job needs the testbed ({exc}); install it beside diffattn with "
            "`pip install -e ./testbed` from a checkout"
        ) from None


def _token(text: str):
    """One value of a multi-valued option: true/false, an int or a float."""
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        return float(text)


def _method_arguments(parser: argparse.ArgumentParser, method: str) -> list[str]:
    """One argparse option per field of the method's config (``--kernel-size 3 7 7``); defaults are
    None so the model family's (and the pipeline's declared) defaults apply. Returns the names."""
    group = parser.add_argument_group(f"{method} options (default: the model family's; see diffattn.config_class({method!r}))")
    names = []
    for f in dataclasses.fields(diffattn.config_class(method)):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.metadata.get("nargs"):
            group.add_argument(flag, dest=f.name, nargs="+", type=_token, default=None, metavar="V", help=f"{help_text} (one value or F Y X)")
        elif isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(f.default, int):
            group.add_argument(flag, dest=f.name, type=int, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=float, default=None, help=help_text)
        names.append(f.name)
    return names


def _parse(argv) -> GenerateConfig:
    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--lora", default=None)
    known = pre.parse_known_args(argv)[0]
    method = known.method or (_lora_meta(known.lora)["method"] if known.lora else "radial")
    parser = argparse.ArgumentParser(prog="diffattn", description="diffattn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate a clip dense and with a diffattn method, compare them",
        description="Generate a clip dense and with a diffattn method and compare them. "
                    "`diffattn generate --method NAME --help` lists that method's options.",
    )
    gen.add_argument("--prompt", default="a red circle moving right on a dark blue background",
                     help="what to generate (the testbed knows its caption words only)")
    gen.add_argument("--method", default=method, help=f"one of {list(diffattn.methods())} (default: radial, or the --lora's)")
    gen.add_argument("--lora", default=None, help="a LoRA folder from `diffattn train length` (its method, options and "
                     "trained length become the defaults; the dense reference runs without it)")
    gen.add_argument("--lora-scale", type=float, default=1.0, help="weight of the --lora")
    gen.add_argument("--out", default="clip.mp4", help="the method's clip; the dense one goes beside it as *_dense.mp4")
    gen.add_argument("--seed", type=int, default=0, help="generator seed (the same for the dense and the method run)")
    gen.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the testbed video pipeline)")
    gen.add_argument("--height", type=int, default=None, help="default: 128 on the testbed, 480 with --model")
    gen.add_argument("--width", type=int, default=None, help="default: 128 on the testbed, 832 with --model")
    gen.add_argument("--frames", type=int, default=None, help="pixel frames, 4k+1 for Wan (default: the --lora's trained length, else 29 testbed, 81 --model)")
    gen.add_argument("--steps", type=int, default=None, help="default: 25 on the testbed, 50 with --model")
    gen.add_argument("--guidance", type=float, default=None, help="default: the testbed pipeline's (DEFAULTS[\"video\"]), 5.0 with --model")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if present)")
    gen.add_argument("--backend", default="auto", choices=["auto", "triton", "flex", "sdpa"])
    gen.add_argument("--fps", type=int, default=16, help="frame rate of the written clips")
    names = _method_arguments(gen, method) if method in diffattn.methods() else []
    if known.lora and method == "dense":
        names = []
    args = vars(parser.parse_args(argv))
    options = _collect(args, names)
    values = {k: v for k, v in args.items() if k != "command"}
    if values["model"] is None:
        d = _testbed("pipelines").DEFAULTS["video"]
        fallback = dict(height=d["height"], width=d["width"], frames=d["num_frames"], steps=d["num_inference_steps"],
                        guidance=d["guidance_scale"])
    else:
        fallback = dict(height=480, width=832, frames=81, steps=50, guidance=5.0)
    if values["lora"]:  # the LoRA's trained length and size, unless given
        meta = _lora_meta(values["lora"])
        for name in ("frames", "height", "width"):
            if values[name] is None:
                values[name] = meta.get(name)
        if values["method"] != meta["method"] and "dense" in (values["method"], meta["method"]):
            raise SystemExit(f"diffattn: this LoRA was trained with {meta['method']!r}; run it with --method {meta['method']} "
                             "(or leave --method out)")
    for name, value in fallback.items():
        if values[name] is None:
            values[name] = value
    return GenerateConfig(**values, options=options)


def _lora_meta(path: str) -> dict:
    from diffattn.core.weights import read_meta

    try:
        return read_meta(path)[1]
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _check_prompt(cfg: GenerateConfig) -> None:
    """The testbed understands its caption words only: say which words are unknown and list them."""
    shapes = _testbed("shapes")
    VOCABULARY, parse_caption, unknown_words = shapes.VOCABULARY, shapes.parse_caption, shapes.unknown_words

    unknown = unknown_words(cfg.prompt)
    if unknown:
        raise SystemExit(
            f"diffattn: the testbed pipeline does not know {unknown[:5]}{f' (and {len(unknown) - 5} more)' if len(unknown) > 5 else ''} "
            "(its tokenizer would read them as <unk>); "
            f"use its caption words {list(VOCABULARY)}, e.g. 'a red circle moving right on a dark blue background', "
            "or pass --model for a real checkpoint"
        )
    try:
        parse_caption(cfg.prompt)
    except ValueError as exc:
        raise SystemExit(f"diffattn: {exc}") from None


MAX_PROMPT_WORDS = 32  # the testbed's text length (TEXT_TOKENS); real models: their tokenizer's


def _precheck(cfg: GenerateConfig) -> None:
    """The checks that need no model: device, paths, output file, prompt, method and its options,
    steps and fps. Raises SystemExit with one line that says what to do."""
    import os
    from pathlib import Path

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("diffattn: --device cuda, but this machine has no CUDA GPU; use --device cpu")
    hub_id = cfg.model is not None and not Path(cfg.model).exists() and cfg.model.count("/") == 1 \
        and not cfg.model.startswith((".", "/", "~"))  # "owner/name": diffusers fetches it where the hub is reachable
    if cfg.model is not None and not hub_id:
        folder = Path(cfg.model)
        if not folder.exists():
            raise SystemExit(f"diffattn: --model {cfg.model} does not exist; pass a local diffusers pipeline folder "
                             "(or a hub id owner/name)")
        if not (folder / "model_index.json").is_file():
            raise SystemExit(f"diffattn: --model {cfg.model} is not a diffusers pipeline folder (no model_index.json)")
        index = json.loads((folder / "model_index.json").read_text())
        if index.get("_class_name") not in VIDEO_PIPELINES:
            raise SystemExit(f"diffattn: generate runs video pipelines ({', '.join(VIDEO_PIPELINES)}); {cfg.model} is a "
                             f"{index.get('_class_name')}; use diffattn.apply from Python for other pipelines")
    out = Path(cfg.out)
    if out.suffix.lower() != ".mp4":
        raise SystemExit(f"diffattn: --out must end in .mp4, got {cfg.out!r}")
    if not out.parent.is_dir():
        raise SystemExit(f"diffattn: the folder of --out ({out.parent}) does not exist; create it or pick another path")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise SystemExit(f"diffattn: cannot write {cfg.out}; pick a writable path")
    if cfg.fps < 1:
        raise SystemExit(f"diffattn: --fps must be >= 1, got {cfg.fps}")
    if cfg.steps < 1:
        raise SystemExit(f"diffattn: --steps must be >= 1, got {cfg.steps}")
    if len(cfg.prompt.split()) > MAX_PROMPT_WORDS and cfg.model is None:
        raise SystemExit(f"diffattn: the prompt has {len(cfg.prompt.split())} words; the testbed reads {MAX_PROMPT_WORDS} tokens "
                         "(shorten it)")
    if cfg.model is None:
        _check_prompt(cfg)
        multiple = 16  # WanPipeline: height and width multiples of 16
        if cfg.height % multiple or cfg.width % multiple or cfg.height <= 0 or cfg.width <= 0:
            raise SystemExit(
                f"diffattn: --height/--width must be positive multiples of {multiple} for this model, got "
                f"{cfg.height}x{cfg.width} (e.g. {max(multiple, cfg.height // multiple * multiple)}x"
                f"{max(multiple, cfg.width // multiple * multiple)}); the testbed model was trained at 128x128, 29 frames"
            )
    if cfg.method == "dense" and cfg.lora:
        return
    if cfg.method not in diffattn.methods():
        raise SystemExit(f"diffattn: unknown method {cfg.method!r}; available methods: {list(diffattn.methods())}")
    from diffattn.methods import METHODS

    family = "wan2.1" if cfg.model is None else None
    if family is not None:
        declared = _testbed("pipelines").METHOD_OPTIONS.get("video", {}).get(cfg.method, {})
        try:
            config = METHODS[cfg.method].from_options(family, declared=declared, **cfg.options).config
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise SystemExit(f"diffattn: {exc}") from None
        if config.dense_steps >= cfg.steps:
            raise SystemExit(f"diffattn: --dense-steps {config.dense_steps} covers all {cfg.steps} steps, so {cfg.method} would "
                             "never run; lower --dense-steps or raise --steps")


VIDEO_PIPELINES = ("WanPipeline", "HunyuanVideoPipeline", "SkyReelsV2Pipeline", "MochiPipeline", "CogVideoXPipeline",
                   "LTXPipeline", "HunyuanVideo15Pipeline")


def _check(cfg: GenerateConfig, pipe) -> None:
    if cfg.method == "dense" and cfg.lora:
        pass  # a LoRA trained with dense attention: the second run is dense with the LoRA
    elif cfg.method not in diffattn.methods():
        raise SystemExit(f"diffattn: unknown method {cfg.method!r}; available methods: {list(diffattn.methods())}")
    multiple = pipe.vae_scale_factor_spatial * diffattn.patch_size(pipe)[1]  # VAE x patchify
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
        return _testbed("pipelines").load_pipeline("video", device=cfg.device)
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

    metrics = _testbed("metrics")
    psnr, ssim = metrics.psnr, metrics.ssim

    _precheck(cfg)  # every input checked before any model loads or any clip is written
    shown = {**asdict(cfg), "prompt": cfg.prompt if len(cfg.prompt) <= 80 else cfg.prompt[:77] + "..."}
    print("diffattn generate", shown, flush=True)
    pipe = _load(cfg)
    _check(cfg, pipe)
    dense_frames, dense_s = _run(pipe, cfg)
    dense_path = cfg.out[:-4] + "_dense.mp4"

    # defaults come from the model family and the pipeline's own declaration, as in diffattn.apply
    if cfg.method == "dense":  # a dense-trained LoRA: diffusers loads it, attention stays stock
        pipe.load_lora_weights(cfg.lora, adapter_name="diffattn-dense")
        pipe.set_adapters(["diffattn-dense"], [cfg.lora_scale])
        try:
            method_frames, method_s = _run(pipe, cfg)
        finally:
            pipe.delete_adapters("diffattn-dense")
        summary = {"density": None, "layout": None, "method_calls": 0, "dense_calls": None, "backends": {}}
    else:
        lora = dict(lora=cfg.lora, lora_scale=cfg.lora_scale) if cfg.lora else {}
        try:
            handle = diffattn.apply(pipe, cfg.method, backend=cfg.backend, **lora, **cfg.options)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise SystemExit(f"diffattn: {exc}") from None
        with handle:
            try:
                method_frames, method_s = _run(pipe, cfg)
            except ValueError as exc:  # grid-dependent option checks run in the first forward's layout hook
                raise SystemExit(f"diffattn: {exc}") from None
            summary = handle.summary()
        print(f"{cfg.method} config: {handle.method.config}" + (f" with the LoRA {cfg.lora}" if cfg.lora else ""), flush=True)
    density = summary["density"] if summary["density"] is not None else 1.0
    export_to_video(list(dense_frames), dense_path, fps=cfg.fps)  # both written once both ran: no half output
    export_to_video(list(method_frames), cfg.out, fps=cfg.fps)

    report = {
        "dense_seconds": round(dense_s, 3), "method_seconds": round(method_s, 3),
        "speedup": round(dense_s / method_s, 3), "mask_density": round(density, 4),
        "psnr_vs_dense_db": round(psnr(method_frames, dense_frames), 2),
        "ssim_vs_dense": round(ssim(method_frames, dense_frames), 4),
        "layout": repr(summary["layout"]), "clips": [cfg.out, dense_path],
        "method_calls": summary["method_calls"], "dense_calls": summary["dense_calls"], "backends": summary["backends"],
    }
    print(
        f"dense: {dense_s:.2f} s -> {dense_path}\n"
        f"{cfg.method}: {method_s:.2f} s -> {cfg.out} (x{dense_s / method_s:.2f})\n"
        f"{cfg.method} mask density {density:.3f} over {summary['layout']} "
        f"({summary['method_calls']} sparse / {summary['dense_calls']} dense attention calls, backends {summary['backends']}), "
        f"PSNR vs dense {report['psnr_vs_dense_db']} dB, SSIM {report['ssim_vs_dense']}",
        flush=True,
    )
    if cfg.model is None:
        judge_module = _testbed("judge")
        load_judge, score = judge_module.load_judge, judge_module.score
        judge = load_judge("video")
        for name, frames in (("dense", dense_frames), (cfg.method, method_frames)):
            report[f"judge_{name}"] = score(judge, frames[None], [cfg.prompt])["accuracy"]
            found = ", ".join(f"{k} {v:.0%}" for k, v in report[f"judge_{name}"].items())
            print(f"judge ({name}): prompt attributes found: {found}", flush=True)
    return report


TRAINERS = ("clear", "length")
SELF_GENERATE_SEED = 200_000  # first procedural scene of --self-generate (fresh: the testbed trained on seeds below 36,000)
SELF_GENERATE_STRIDE = 100_000  # scenes per --seed


def train(argv):
    """``diffattn train clear|length [options]``: the CLEAR distillation trainer
    (``diffattn.lora.clear_distill``) or the LoRA length-extension trainer (``diffattn.lora.length``).

    ``--pipeline testbed`` (the default) trains on the testbed: CLEAR distils the FLUX pipeline on its
    own captions at its trained 128 x 128; ``length`` extends the video pipeline (128 x 128, trained
    at 29 frames) on ``--self-generate N`` clips of the procedural generator at ``--frames``."""
    if not argv or argv[0] not in TRAINERS:
        raise SystemExit(f"diffattn train: the trainer to run comes first, one of {list(TRAINERS)} "
                         "(`diffattn train length --help` lists its options)")
    if argv[0] == "clear":
        return _train_clear(argv[1:])
    return _train_length(argv[1:])


def _testbed_trainer_pipeline(kind: str, cfg):
    """(the testbed pipeline of ``kind`` for a trainer, ``cfg`` with the testbed's size and text
    length where it left them 0)."""
    pipelines = _testbed("pipelines")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" and device == "cuda" else torch.float32
    pipe = pipelines.load_pipeline(kind, device=device, dtype=dtype)
    d = pipelines.DEFAULTS[kind]
    return pipe, dataclasses.replace(cfg, height=cfg.height or d["height"], width=cfg.width or d["width"],
                                     max_sequence_length=cfg.max_sequence_length or d["max_sequence_length"])


def _train_clear(argv):
    from diffattn.lora import clear_distill
    from diffattn.lora.common import config_from_argv

    cfg = config_from_argv(clear_distill.DistillConfig, argv, clear_distill.__doc__)
    pipe = prompts = None
    if cfg.pipeline == "testbed":
        pipe, cfg = _testbed_trainer_pipeline("image-dit", cfg)
        shapes = _testbed("shapes")
        if not cfg.prompts:
            prompts = [shapes.sample(cfg.seed * 100_003 + i, image=True).caption for i in range(cfg.num_samples)]
    return clear_distill.train(cfg, pipe=pipe, prompts=prompts)


def _train_length(argv):
    from diffattn.lora import length
    from diffattn.lora.common import config_from_argv

    cfg = config_from_argv(length.LengthConfig, argv, length.__doc__)
    pipe = clips = None
    if cfg.pipeline == "testbed":
        pipe, cfg = _testbed_trainer_pipeline("video", cfg)
    if cfg.self_generate:
        if cfg.pipeline != "testbed":
            raise SystemExit("diffattn train length: --self-generate renders the testbed's procedural clips, which only the "
                             "testbed pipeline knows; pass --data DIR (videos with captions) for other pipelines")
        if cfg.data:
            raise SystemExit("diffattn train length: pass --data or --self-generate, not both")
        clips = procedural_clips(cfg.self_generate, cfg.seed)
    return length.train(cfg, pipe=pipe, clips=clips)


def procedural_clips(count: int, seed: int):
    """``clips(frames, height, width, report)`` for the length trainer: ``count`` scenes of the
    testbed's generator (up to 2 objects, as the testbed video model was trained) rendered in a pool."""
    import os

    training = _testbed("training")

    def clips(frames, height, width, report):
        if height != width:
            raise SystemExit(f"diffattn train length: the procedural generator renders square clips; got {height}x{width}")
        first = SELF_GENERATE_SEED + seed * SELF_GENERATE_STRIDE  # other --seed, other scenes
        if first + count > training.EVAL_SEED:
            raise SystemExit(f"diffattn train length: --self-generate {count} with --seed {seed} reaches the held-out scenes; "
                             "use a smaller --seed or count")
        workers = max(1, min(16, os.cpu_count() or 1))
        done = 0
        for pixels, captions in training.render_stream(range(first, first + count), image=False, max_objects=2, frames=frames,
                                                       size=height, workers=workers, chunk=64):
            for px, caption in zip(pixels, captions):
                yield f"scene {first + done}", px, caption
                done += 1

    return clips


def _collect(args: dict, names: list[str]) -> dict:
    """The method options the user set (argparse values of ``_method_arguments``' names)."""
    options = {}
    for name in names:
        value = args.pop(name)
        if value is not None:
            options[name] = value[0] if isinstance(value, list) and len(value) == 1 else tuple(value) if isinstance(value, list) else value
    return options


def mask(argv) -> dict:
    """``diffattn mask``: density and block-map picture of a method at a model's size (no weights)."""
    from diffattn.app import mask as mask_tool

    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="radial")
    method = pre.parse_known_args(argv)[0].method
    parser = argparse.ArgumentParser(prog="diffattn mask", description=mask_tool.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mask_tool.add_arguments(parser, method)
    names = _method_arguments(parser, method) if method in diffattn.methods() else []
    args = parser.parse_args(argv)
    options = _collect(vars(args), names)
    try:
        return mask_tool.run(args, options)
    except ValueError as exc:
        raise SystemExit(f"diffattn mask: {exc}") from None


USAGE = """usage: diffattn {generate,mask,demo,train,headhunter} ...

  generate   a clip dense and with a method, compared (time, density, PSNR/SSIM, the judge)
  mask       a method's density and block-map picture at a model's size, without weights
  demo       the Gradio demo on 127.0.0.1 (needs the [app] extra)
  train      a trainer: `train clear` (CLEAR distillation) or `train length` (LoRA length extension)
  headhunter the greedy attention-head search for HeadHunter guidance (writes a head list as JSON)

`diffattn COMMAND --help` explains each command's options."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in ("generate", "mask", "demo", "train", "headhunter"):
        raise SystemExit(f"diffattn: unknown command {argv[0]!r}\n{USAGE}")
    if argv and argv[0] == "train":
        train(argv[1:])
        return 0
    if argv and argv[0] == "mask":
        mask(argv[1:])
        return 0
    if argv[0] == "headhunter":
        from diffattn.app import headhunter

        headhunter.main(argv[1:])
        return 0
    if argv and argv[0] == "demo":
        from diffattn.app import demo

        demo.main(argv[1:])
        return 0
    cfg = _parse(argv)
    generate(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
