"""diffattn command line.

    diffattn generate                                   # the testbed video pipeline, radial vs dense
    diffattn generate --prompt "a red circle moving right" --method radial --out clip.mp4 --seed 3
    diffattn generate --method neighborhood --kernel-size 3 7 7 --stride 1 2 2
    diffattn generate --method neighborhood --help                # that method's options
    diffattn generate --guide soft-pag --guide-scale 1                             # radial with SoftPAG guidance
    diffattn generate --method stg --help                                          # STG alone, its options
    diffattn generate --pipeline image-dit --method clear --radius 4 --out image.png     # testbed FLUX
    diffattn generate --pipeline image-unet --method hidiffusion --height 256 --width 256  # testbed SD at 2x
    diffattn bench --model hunyuan --method radial --backward                      # kernels at a model's size (GPU)
    diffattn train clear --radius 4 --attn-every 1 --steps 200 --out runs/clear    # distil CLEAR (testbed FLUX)
    diffattn train length --frames 113 --self-generate 1024 --out runs/len4x        # 4x-length LoRA (testbed video)
    diffattn generate --lora runs/len4x --frames 113                                # uses it
    diffattn mask --model wan --height 720 --width 1280 --frames 81 --method radial # density + block map, no weights
    diffattn demo                                                                   # Gradio app on 127.0.0.1:7860
    diffattn headhunter --rounds 2 --top-k 2 --out heads.json                      # head search (testbed video)
    diffattn generate --model /path/to/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --height 480 --width 832 --frames 81 --steps 50 --out wan.mp4

``generate`` runs the pipeline twice with the same seed, dense and with the method (and the
``--guide`` guidance, or the guidance alone), writes both clips (``clip.mp4`` and
``clip_dense.mp4``; images: ``image.png`` and ``image_dense.png``) and prints the time of each, the mask density and the
attention calls that ran sparse and dense (``handle.summary()``), and the
method's quality against dense: PSNR and SSIM, and on the testbed pipeline the judge's reading of
both clips (colour / shape / motion asked by the prompt, ``diffattn_testbed.judge``).

The embedded default is the testbed video pipeline (``diffattn_testbed.load_pipeline("video")``):
a ``WanPipeline`` at toy width trained on procedural shapes, 128x128, 29 frames (8 latent frames of
16x16 tokens), 25 steps. Its prompts use the caption words (``diffattn_testbed.shapes.VOCABULARY``);
other words are refused. ``--model`` loads a real diffusers checkpoint from a local path (or the
hub, when the machine can reach it); its ``model_index.json`` says whether it is a video, image DiT
or U-Net pipeline, and size, frames and steps default to the pipeline's (Wan 480x832, 81, 50;
HunyuanVideo 720p, 129; LTX-2 512x768, 121, 30; FLUX and SD3 1024², 28; SDXL 1024², SD 1.5 512², 50;
``run.MODEL_DEFAULTS``). ``--pipeline image-dit|image-unet`` picks the
testbed FLUX or SD pipeline instead of the video one.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import asdict, dataclass, field

import torch

import diffattn
from diffattn.app import run as run_tools
from diffattn.kernels import PRECISIONS
from diffattn.kernels.select import BACKENDS


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str
    method: str          # a diffattn method; "dense" (a dense-trained --lora); "none" (guidance alone)
    out: str
    seed: int
    model: str | None
    pipeline: str        # "video", "image-dit" or "image-unet"
    height: int
    width: int
    frames: int
    steps: int
    guidance: float      # the classifier-free guidance scale
    device: str
    backend: str
    fps: int
    warmup: bool = False  # an untimed 1-step call of each before the timed runs (default on CUDA)
    precision: str | None = None  # the method's 8-bit forward (diffattn.kernels.PRECISIONS), or the model's dtype
    lora: str | None = None
    lora_scale: float = 1.0
    guide: str | None = None  # a guidance method (diffattn.guidance_methods())
    options: dict = field(default_factory=dict)        # the method's options the user set (the rest: defaults)
    guide_options: dict = field(default_factory=dict)  # the guidance's options the user set
    context_parallel: str = ""  # "ulysses=N", "ring=N" or both: diffusers' context parallelism over torchrun's processes


def _testbed(module: str):
    return run_tools.testbed(module)


def _token(text: str):
    """One value of a multi-valued option: true/false, an int, a float, or the text itself."""
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


OPTION = "option__"  # argparse dest prefix of the method's fields (kept apart from the command's own: seed)


def _method_arguments(parser: argparse.ArgumentParser, method: str) -> list[str]:
    """One argparse option per field of the method's config (``--kernel-size 3 7 7``); defaults are
    None so the model family's (and the pipeline's declared) defaults apply. Returns the names."""
    group = parser.add_argument_group(f"{method} options (default: the model family's; see diffattn.config_class({method!r}))")
    names = []
    for f in dataclasses.fields(diffattn.config_class(method)):
        help_text = f.metadata.get("help", "")
        declared = str(f.type)  # the annotation ("int | None", "str"; a string under postponed annotations)
        if f.metadata.get("nargs"):
            spec = dict(nargs="+", type=_token, metavar="V", help=f"{help_text} (one value or F Y X)")
        elif isinstance(f.default, bool) or "bool" in declared:
            spec = dict(action=argparse.BooleanOptionalAction, help=help_text)
        elif isinstance(f.default, str) or declared.startswith("str") or "Literal" in declared:
            spec = dict(type=str, help=help_text)
        elif (isinstance(f.default, int) or "int" in declared) and "float" not in declared:
            spec = dict(type=int, help=help_text)
        elif "float" in declared or isinstance(f.default, float):
            spec = dict(type=float, help=help_text)
        else:  # anything else (tuples, unions of types): read each value as it reads
            spec = dict(type=_token, help=help_text)
        try:
            group.add_argument("--" + f.name.replace("_", "-"), dest=OPTION + f.name, default=None, **spec)
        except argparse.ArgumentError:  # named like one of the command's own flags (seed): --method-seed
            group.add_argument("--method-" + f.name.replace("_", "-"), dest=OPTION + f.name, default=None, **spec)
        names.append(OPTION + f.name)
    return names


def documented_fields(cls) -> dict[str, str]:
    """``{field: text}`` from the ``name: text`` lines of the docstrings of ``cls`` and its bases
    (the guidance configs document their fields there)."""
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        current = None
        for line in (klass.__doc__ or "").splitlines():
            match = re.match(r"^\s{4}(\w+):\s+(.*)$", line)
            if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
                current = match.group(1)
                out[current] = match.group(2).strip()
            elif current and line.startswith(" " * 8) and line.strip():
                out[current] += " " + line.strip()
            else:
                current = None
    return {k: v.replace("%", "%%") for k, v in out.items()}


GUIDE_ONLY_PYTHON = ("table",)  # a [layers][heads] weight table: diffattn.guide("headhunter", table=...) from Python


def _guide_arguments(parser: argparse.ArgumentParser, name: str) -> list[str]:
    """``--guide-<field>`` per field of the guidance config ``name``; returns the dest names."""
    from diffattn.guidance import GUIDANCE

    cls = GUIDANCE[name]
    docs = documented_fields(cls)
    group = parser.add_argument_group(f"{name} guidance options (default: the method's and the family's; "
                                      f"see diffattn.guide({name!r}, ...))")
    names = []
    for f in dataclasses.fields(cls):
        if f.name in GUIDE_ONLY_PYTHON:
            continue
        flag, dest = "--guide-" + f.name.replace("_", "-"), "guide_" + f.name
        text = docs.get(f.name, "")
        if f.name == "heads" and name == "headhunter":
            text = "a head search's JSON (diffattn headhunter --out) or LAYER:HEAD pairs, e.g. 3:5 7:0"
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(f.default, float):
            group.add_argument(flag, dest=dest, type=float, default=None, help=text)
        else:
            group.add_argument(flag, dest=dest, nargs="+", type=_token, default=None, metavar="V", help=text)
        names.append(dest)
    return names


def _guide_options(args: dict, names: list[str], guide: str) -> dict:
    options = {}
    for dest in names:
        value = args.pop(dest)
        if value is None:
            continue
        key = dest.removeprefix("guide_")
        if key == "heads" and guide == "headhunter" and isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str) and value[0].endswith(".json"):
                value = value[0]
            else:
                try:
                    value = [tuple(int(x) for x in str(v).split(":")) for v in value]
                except ValueError:
                    raise SystemExit(f"diffattn: --guide-heads takes LAYER:HEAD pairs (e.g. 3:5 7:0) or a JSON file, "
                                     f"got {' '.join(map(str, value))[:80]}") from None
        elif isinstance(value, list):
            value = value[0] if len(value) == 1 else tuple(value)
        options[key] = value
    return options


def _kind(model: str | None, pipeline: str | None) -> str:
    """The pipeline kind: from ``--model``'s ``model_index.json`` where there is one, else ``--pipeline``."""
    from pathlib import Path

    if model is not None and Path(model).is_dir():
        try:
            found = run_tools.kind_of_class(run_tools.pipeline_class(model))
        except ValueError:
            return pipeline or "video"  # _precheck says what is wrong with the folder
        if found is not None:
            return found
    return pipeline or "video"


def _parse(argv) -> GenerateConfig:
    from diffattn.guidance import GUIDANCE

    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--method", "--lora", "--guide", "--pipeline", "--model"):
        pre.add_argument(flag, default=None)
    known = pre.parse_known_args(argv)[0]
    kind = _kind(known.model, known.pipeline)
    method = known.method or (_lora_meta(known.lora)["method"] if known.lora else run_tools.DEFAULT_METHOD.get(kind, "radial"))
    guide = known.guide
    if method in GUIDANCE:  # --method soft-pag: the guidance alone
        if guide is not None:
            raise SystemExit(f"diffattn: --method {method} is a guidance method; pass the sparse method with --method and the "
                             f"guidance with --guide (or --method {method} alone)")
        method, guide = "none", method
    parser = argparse.ArgumentParser(prog="diffattn", description="diffattn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate dense and with a diffattn method, compare them",
        description="Generate a clip (or an image) dense and with a diffattn method and compare them. "
                    "`diffattn generate --method NAME --help` lists that method's options, "
                    "`--guide NAME --help` the guidance's.",
    )
    gen.add_argument("--prompt", default=None, help="what to generate (the testbed knows its caption words only; default: "
                     "'a red circle moving right on a dark blue background', 'a red circle' for images)")
    gen.add_argument("--pipeline", choices=run_tools.KINDS, default=None,
                     help="the testbed pipeline: video (Wan, the default), image-dit (FLUX) or image-unet (SD); "
                          "with --model the folder's model_index.json decides")
    gen.add_argument("--method", default=method, help=f"one of {list(diffattn.methods())}, a guidance method alone "
                     f"({', '.join(GUIDANCE)}), or none with --guide (default: radial for video, clear for image-dit, "
                     "hidiffusion for image-unet, or the --lora's)")
    gen.add_argument("--guide", default=None, choices=sorted(GUIDANCE),
                     help="attention guidance added to the method run (its options: --guide NAME --help)")
    gen.add_argument("--lora", default=None, help="a LoRA folder from `diffattn train length` (its method, options and "
                     "trained length become the defaults; the dense reference runs without it)")
    gen.add_argument("--lora-scale", type=float, default=1.0, help="weight of the --lora")
    gen.add_argument("--out", default=None, help="the method's clip (.mp4) or image (.png); the dense one goes beside it as "
                     "*_dense.mp4 / *_dense.png (default clip.mp4 or image.png)")
    gen.add_argument("--seed", type=int, default=0, help="generator seed (the same for the dense and the method run)")
    gen.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the testbed pipeline)")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the testbed's 128, 256 for image-unet; "
                     "with --model the model card's: 480 Wan, 1024 FLUX / SD3 / SDXL, 512 SD 1.5)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default as --height; 832 for Wan)")
    gen.add_argument("--frames", type=int, default=None, help="pixel frames of a video, 4k+1 for Wan (default: the --lora's "
                     "trained length, else 29 testbed, 81 --model)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25 on the testbed; 50 with --model, "
                     "28 for FLUX and SD3)")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the pipeline's; "
                     "FLUX.1-dev: its distilled guidance)")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cuda or cpu (default: cuda if this machine has one)")
    gen.add_argument("--backend", default="auto", choices=list(BACKENDS),
                     help="attention backend of the method (auto: the fastest that can run each call; fa4 needs "
                          "flash-attn-4 installed, Hopper, block-level patterns)")
    gen.add_argument("--precision", default=None, choices=list(PRECISIONS),
                     help="the method's 8-bit attention forward on the triton backend (CUDA, compute capability >= 8.9; "
                          "the method's dense steps and layers stay at the model's dtype; default: the model's dtype)")
    gen.add_argument("--fps", type=int, default=16, help="frame rate of the written clips")
    gen.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                     help="run 1 untimed step dense and with the method first, so the times leave out kernel compilation "
                          "and autotuning (default: on with CUDA, off on the CPU)")
    gen.add_argument("--context-parallel", default="", metavar="ulysses=N[,ring=M]",
                     help="split each clip's tokens over the processes of torchrun (diffusers' context parallelism: "
                          "Ulysses over heads, diffattn's sparse ring over the sequence); N x M = --nproc_per_node")
    names = _method_arguments(gen, method) if method in diffattn.methods() else []
    if known.lora and method == "dense":
        names = []
    guide_names = _guide_arguments(gen, guide) if guide in GUIDANCE else []
    args = vars(parser.parse_args(argv))
    options = _collect(args, names)
    guide_options = _guide_options(args, guide_names, guide)
    values = {k: v for k, v in args.items() if k != "command"}
    if values["warmup"] is None:
        values["warmup"] = values["device"].startswith("cuda")
    values["pipeline"], values["guide"], values["method"] = kind, guide, method if guide == known.method else values["method"]
    if values["prompt"] is None:
        values["prompt"] = "a red circle moving right on a dark blue background" if kind == "video" else "a red circle"
    if values["out"] is None:
        values["out"] = "clip.mp4" if kind == "video" else "image.png"
    if values["model"] is None:
        h, w, frames, steps, cfg_scale = run_tools.testbed_defaults(kind)
        if kind == "image-unet":
            h = w = 256  # HiDiffusion's job: twice the size the testbed U-Net was trained at (128)
        fallback = dict(height=h, width=w, frames=frames, steps=steps, guidance=cfg_scale)
    else:
        h, w, frames, steps, cfg_scale = run_tools.MODEL_DEFAULTS.get(_class_or_none(values["model"]),
                                                                      run_tools.MODEL_DEFAULTS["video"])
        fallback = dict(height=h, width=w, frames=frames, steps=steps, guidance=cfg_scale)
    if kind != "video":
        fallback["frames"] = 1
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
    return GenerateConfig(**values, options=options, guide_options=guide_options)


def _class_or_none(path: str) -> str | None:
    from pathlib import Path

    try:
        return run_tools.pipeline_class(path) if Path(path).is_dir() else None
    except ValueError:
        return None  # _precheck reports the broken index


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
        example = "a red circle moving right on a dark blue background" if cfg.pipeline == "video" else "a red circle and a blue star"
        raise SystemExit(
            f"diffattn: the testbed pipeline does not know {unknown[:5]}{f' (and {len(unknown) - 5} more)' if len(unknown) > 5 else ''} "
            "(its tokenizer would read them as <unk>); "
            f"use its caption words {list(VOCABULARY)}, e.g. {example!r}, "
            "or pass --model for a real checkpoint"
        )
    try:
        parse_caption(cfg.prompt)
    except ValueError as exc:
        raise SystemExit(f"diffattn: {exc}") from None


MAX_PROMPT_WORDS = 32  # the testbed's text length (TEXT_TOKENS); real models: their tokenizer's
TESTBED_MULTIPLE = {"video": 16, "image-dit": 8, "image-unet": 8}  # WanPipeline's 16; FLUX 4x VAE x 2 packing; SD's 8
TESTBED_GRID = {"video": "testbed", "image-dit": "testbed-flux"}  # the mask tool's presets of the testbed pipelines
TESTBED_FAMILY = {"video": "wan2.1", "image-dit": "flux", "image-unet": "sd1.5"}


def _method_fits(cfg: GenerateConfig, family: str) -> None:
    if cfg.method in ("none", "dense"):
        return
    fits = diffattn.methods()[cfg.method]
    if family not in fits:
        fitting = [m for m, families in diffattn.methods().items() if family in families]
        raise SystemExit(f"diffattn: {cfg.method} does not fit this {family} pipeline; methods for it: {fitting}")


def _never_runs(config, steps: int, method: str) -> None:
    dense_steps = getattr(config, "dense_steps", 0)
    if dense_steps >= steps:
        raise SystemExit(f"diffattn: --dense-steps {dense_steps} covers all {steps} steps, so {method} would never run; "
                         "lower --dense-steps or raise --steps")


def _size_guard(config, cfg: GenerateConfig, trained: int) -> None:
    """U-Net methods run only from ``min_scale`` x the trained size (shorter side) on: say so before any run."""
    scale = getattr(config, "min_scale", 0.0)
    if scale and min(cfg.height, cfg.width) < scale * trained:
        raise SystemExit(f"diffattn: {cfg.method} runs only from {scale:g}x the size the U-Net was trained at ({trained} px), "
                         f"so never at {cfg.height}x{cfg.width}; use --height/--width >= {int(-(-scale * trained // 8) * 8)} "
                         "or lower --min-scale")


def _precheck(cfg: GenerateConfig) -> None:
    """The checks that need no model: device, paths, output file, prompt, method and its options,
    guidance options, steps and fps. Raises SystemExit with one line that says what to do."""
    import os
    from pathlib import Path

    if cfg.context_parallel:
        _check_parallel(cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("diffattn: --device cuda, but this machine has no CUDA GPU; use --device cpu")
    if not cfg.device.startswith(("cuda", "cpu")):
        raise SystemExit(f"diffattn: --device must be cuda (cuda:N) or cpu, got {cfg.device!r}")
    hub_id = cfg.model is not None and not Path(cfg.model).exists() and cfg.model.count("/") == 1 \
        and not cfg.model.startswith((".", "/", "~"))  # "owner/name": diffusers fetches it where the hub is reachable
    if cfg.model is not None and not hub_id:
        folder = Path(cfg.model)
        if not folder.exists():
            raise SystemExit(f"diffattn: --model {cfg.model} does not exist; pass a local diffusers pipeline folder "
                             "(or a hub id owner/name)")
        try:
            name = run_tools.pipeline_class(folder)
        except ValueError as exc:
            raise SystemExit(f"diffattn: --model {cfg.model}: {exc}") from None
        if name is None:
            raise SystemExit(f"diffattn: --model {cfg.model} is not a diffusers pipeline folder (no model_index.json)")
        kind = run_tools.kind_of_class(name)
        if kind is None:
            known = run_tools.VIDEO_PIPELINES + run_tools.IMAGE_DIT_PIPELINES + run_tools.UNET_PIPELINES
            raise SystemExit(f"diffattn: generate runs the pipelines {', '.join(known)}; {cfg.model} is a {name}; "
                             "use diffattn.apply from Python for other pipelines")
    out = Path(cfg.out)
    suffix = ".mp4" if cfg.pipeline == "video" else ".png"
    if out.suffix.lower() != suffix:
        raise SystemExit(f"diffattn: --out must end in {suffix} for the {cfg.pipeline} pipeline, got {cfg.out!r}")
    if not out.parent.is_dir():
        raise SystemExit(f"diffattn: the folder of --out ({out.parent}) does not exist; create it or pick another path")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise SystemExit(f"diffattn: cannot write {cfg.out}; pick a writable path")
    if cfg.fps < 1:
        raise SystemExit(f"diffattn: --fps must be >= 1, got {cfg.fps}")
    if cfg.steps < 1:
        raise SystemExit(f"diffattn: --steps must be >= 1, got {cfg.steps}")
    if not cfg.prompt.strip():
        raise SystemExit("diffattn: --prompt is empty; say what to generate")
    if len(cfg.prompt.split()) > MAX_PROMPT_WORDS and cfg.model is None:
        raise SystemExit(f"diffattn: the prompt has {len(cfg.prompt.split())} words; the testbed reads {MAX_PROMPT_WORDS} tokens "
                         "(shorten it)")
    if cfg.method == "none" and cfg.guide is None:
        raise SystemExit("diffattn: --method none runs nothing but dense; add --guide NAME or pick a method")
    if cfg.guide is not None:
        try:
            diffattn.guide(cfg.guide, **cfg.guide_options)
        except (ValueError, TypeError, OSError) as exc:
            raise SystemExit(f"diffattn: {exc}") from None
    if cfg.method not in ("dense", "none") and cfg.method not in diffattn.methods():
        raise SystemExit(f"diffattn: unknown method {cfg.method!r}; available methods: {list(diffattn.methods())}")
    if cfg.backend != "auto" and not _takes_backend(cfg.method):
        from diffattn.methods import METHODS

        kernels = [m for m in METHODS if _takes_backend(m)]
        raise SystemExit(f"diffattn: --backend picks the attention kernel of {kernels}; {cfg.method} has none to pick "
                         "(leave --backend out)")
    if cfg.precision is not None and not _takes_knob(cfg.method, "precision"):
        from diffattn.methods import METHODS

        kernels = [m for m in METHODS if _takes_knob(m, "precision")]
        raise SystemExit(f"diffattn: --precision sets the 8-bit kernel of {kernels}; {cfg.method} has none (leave --precision out)")
    if cfg.precision is not None and cfg.backend not in ("auto", "triton"):
        raise SystemExit(f"diffattn: --precision runs on the triton backend only; leave --backend {cfg.backend} or --precision out")
    if cfg.precision is not None and not cfg.device.startswith("cuda"):
        raise SystemExit("diffattn: --precision runs the 8-bit Triton kernel on a CUDA GPU (compute capability >= 8.9); "
                         "on the CPU leave it out")
    if cfg.method == "dense" and cfg.guide is not None:
        raise SystemExit("diffattn: this LoRA was trained with dense attention; --guide needs a diffattn method run "
                         "(leave --guide out, or train the LoRA with a method)")
    if cfg.device.startswith("cuda:") and torch.cuda.is_available():
        index = cfg.device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise SystemExit(f"diffattn: --device {cfg.device}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
    if cfg.model is not None:
        run_tools.testbed("metrics")  # PSNR / SSIM against dense come from the testbed's metrics: say so before any run
    if cfg.method == "dense" and not cfg.lora:
        raise SystemExit("diffattn: --method dense is the reference run itself; pick a method (or --guide NAME)")
    if cfg.model is None:
        _check_prompt(cfg)
        multiple = TESTBED_MULTIPLE[cfg.pipeline]
        if cfg.height % multiple or cfg.width % multiple or cfg.height <= 0 or cfg.width <= 0:
            raise SystemExit(
                f"diffattn: --height/--width must be positive multiples of {multiple} for this model, got "
                f"{cfg.height}x{cfg.width} (e.g. {max(multiple, cfg.height // multiple * multiple)}x"
                f"{max(multiple, cfg.width // multiple * multiple)}); the testbed model was trained at 128x128"
                + (", 29 frames" if cfg.pipeline == "video" else "")
            )
        if cfg.pipeline == "video" and (cfg.frames < 1 or (cfg.frames - 1) % 4):
            raise SystemExit(f"diffattn: --frames must be 4k+1 for this model (1, 5, 9, ...), got {cfg.frames}")
        family = TESTBED_FAMILY[cfg.pipeline]
        _method_fits(cfg, family)
        if cfg.method in ("dense", "none"):
            return
        from diffattn.methods import METHODS

        declared = _testbed("pipelines").METHOD_OPTIONS.get(cfg.pipeline, {}).get(cfg.method, {})
        try:
            method = METHODS[cfg.method].from_options(family, declared=declared, **cfg.options)
            if cfg.pipeline in TESTBED_GRID and hasattr(method, "describe"):  # block-sparse: the grid fits the window
                from diffattn.app import mask as mask_tool

                method.check_layout(mask_tool.layout_of(TESTBED_GRID[cfg.pipeline], cfg.height, cfg.width, cfg.frames)[1])
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise SystemExit(f"diffattn: {exc}") from None
        _never_runs(method.config, cfg.steps, cfg.method)
        if cfg.pipeline == "image-unet":
            _size_guard(method.config, cfg, 128)  # the testbed U-Net's training size


def _takes_knob(method: str, knob: str) -> bool:
    from diffattn.methods import METHODS

    return method in METHODS and knob in getattr(METHODS[method], "KNOBS", ())


def _takes_backend(method: str) -> bool:
    return _takes_knob(method, "backend")


def _apply(pipe, cfg: GenerateConfig, **overrides):
    """The method (and guidance, and LoRA) on ``pipe``, as ``diffattn.apply`` takes them."""
    extra = {**cfg.options, **overrides}
    if _takes_backend(cfg.method):
        extra["backend"] = cfg.backend
    if cfg.precision is not None:
        extra["precision"] = cfg.precision
    if cfg.lora:
        extra.update(lora=cfg.lora, lora_scale=cfg.lora_scale)
    return run_tools.apply(pipe, cfg.method, extra, cfg.guide, cfg.guide_options)


def _check(cfg: GenerateConfig, pipe) -> None:
    """The checks that need the loaded pipeline (before the first run): size multiple, frames, the
    method fitting the model family, and the method and guidance applied once (their options against
    this model), then removed."""
    try:
        multiple = run_tools.size_multiple(pipe, cfg.pipeline)
        temporal = run_tools.vae_factors(pipe)[1] if cfg.pipeline == "video" else 1
    except NotImplementedError as exc:
        raise SystemExit(str(exc)) from None
    if cfg.height % multiple or cfg.width % multiple or cfg.height <= 0 or cfg.width <= 0:
        raise SystemExit(
            f"diffattn: --height/--width must be positive multiples of {multiple} for this model, got "
            f"{cfg.height}x{cfg.width} (e.g. {cfg.height // multiple * multiple or multiple}x{cfg.width // multiple * multiple or multiple})"
            + ("; the testbed model was trained at 128x128" if cfg.model is None else "")
        )
    if cfg.pipeline == "video":
        if cfg.frames < 1 or (cfg.frames - 1) % temporal:
            raise SystemExit(
                f"diffattn: --frames must be {temporal}k+1 for this model (1, {temporal + 1}, {2 * temporal + 1}, ...), got {cfg.frames}"
            )
    _method_fits(cfg, diffattn.detect_family(pipe))
    if cfg.method == "dense":
        return
    try:
        handle = _apply(pipe, cfg)
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as exc:
        raise SystemExit(f"diffattn: {exc}") from None
    handle.remove()
    if cfg.method != "none":
        _never_runs(handle.method.config, cfg.steps, cfg.method)
        if cfg.pipeline == "image-unet":
            _size_guard(handle.method.config, cfg, pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _check_parallel(cfg: GenerateConfig) -> None:
    import os

    from diffattn.lora.common import parse_context_parallel

    try:
        ulysses, ring = parse_context_parallel(cfg.context_parallel, "diffattn")
    except ValueError as exc:
        raise SystemExit(f"diffattn: --context-parallel: {exc}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ulysses * ring != world:
        raise SystemExit(f"diffattn: --context-parallel {cfg.context_parallel} needs {ulysses * ring} processes, this run has {world}; "
                         f"launch with torchrun --nproc_per_node {ulysses * ring} $(which diffattn) generate ...")
    if cfg.pipeline == "image-unet":
        raise SystemExit("diffattn: --context-parallel runs DiT pipelines (video, image-dit); U-Nets have no context-parallel plan")
    if cfg.method in ("none", "dense") or cfg.guide is not None:
        raise SystemExit("diffattn: --context-parallel runs a sparse method alone (radial, neighborhood, clear); guidance and "
                         "dense LoRAs run on one GPU per process")


def _start_parallel(cfg: GenerateConfig):
    """The process group of torchrun's processes (NCCL on CUDA, gloo on the CPU), this process's
    device, and the ``ContextParallelConfig``."""
    import dataclasses
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from diffattn.lora.common import parse_context_parallel

    ulysses, ring = parse_context_parallel(cfg.context_parallel, "diffattn")
    device = cfg.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=30))
    return dataclasses.replace(cfg, device=device), ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)


def _run_parallel(pipe, cfg: GenerateConfig, config):
    """The dense and the method run under context parallelism. The dense run goes through
    diffattn's processors with every step dense (the stock attention, computed as the stock
    processors do: HunyuanVideo's plan needs them to rebuild each rank's padded-text mask)."""
    def parallel(**overrides):
        handle = _apply(pipe, cfg, **overrides)
        model = pipe.transformer
        if getattr(model, "_parallel_config", None) is None:  # diffusers' plan stays; diffattn's goes with its handle
            diffattn.enable_parallelism(pipe, config)
        return handle

    every_step_dense = {"dense_steps": cfg.steps + 1, "last_dense_steps": 0}
    with parallel(**every_step_dense):
        if cfg.warmup:
            run_tools.call(pipe, cfg.pipeline, **{**_call_args(cfg), "steps": 1})
        dense_media, dense_s = _run(pipe, cfg)
    if cfg.warmup:
        with parallel(**run_tools.SCHEDULE_OFF):
            run_tools.call(pipe, cfg.pipeline, **{**_call_args(cfg), "steps": 1})
    handle = parallel()
    with handle:
        method_media, method_s = _run(pipe, cfg)
        summary = handle.summary()
        parallel = [row["parallel"] for row in handle.report() if row.get("parallel")]
    return dense_media, dense_s, method_media, method_s, summary, handle, parallel


def _run_single(pipe, cfg: GenerateConfig):
    """The warm-up, the dense run and the method run (or the dense-trained LoRA's) in this process."""
    if cfg.warmup and cfg.method != "dense":
        overrides = {} if cfg.method == "none" else dict(run_tools.SCHEDULE_OFF)
        if cfg.lora:  # a LoRA fixes the options it was trained with (its dense layers): the warm-up keeps them
            overrides = {k: v for k, v in overrides.items() if k not in _lora_meta(cfg.lora).get("options", {})}
        try:
            run_tools.warm_up(pipe, cfg.pipeline, lambda **o: _apply(pipe, cfg, **o), _call_args(cfg), overrides)
        except ValueError as exc:  # grid-dependent option checks run in the first forward's layout hook
            raise SystemExit(f"diffattn: {exc}") from None
    dense_media, dense_s = _run(pipe, cfg)
    handle = None
    # defaults come from the model family and the pipeline's own declaration, as in diffattn.apply
    if cfg.method == "dense":  # a dense-trained LoRA: diffusers loads it, attention stays stock
        pipe.load_lora_weights(cfg.lora, adapter_name="diffattn-dense")
        pipe.set_adapters(["diffattn-dense"], [cfg.lora_scale])
        try:
            method_media, method_s = _run(pipe, cfg)
        finally:
            pipe.delete_adapters("diffattn-dense")
        summary = {"density": None, "layout": None, "method_calls": 0, "dense_calls": None, "backends": {}}
    else:
        try:
            handle = _apply(pipe, cfg)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise SystemExit(f"diffattn: {exc}") from None
        with handle:
            try:
                method_media, method_s = _run(pipe, cfg)
            except ValueError as exc:  # grid-dependent option checks run in the first forward's layout hook
                raise SystemExit(f"diffattn: {exc}") from None
            summary = handle.summary()
    return dense_media, dense_s, method_media, method_s, summary, handle


def _call_args(cfg: GenerateConfig) -> dict:
    return dict(prompt=cfg.prompt, seed=cfg.seed, steps=cfg.steps, height=cfg.height, width=cfg.width, frames=cfg.frames,
                cfg=cfg.guidance, device=cfg.device)


def _run(pipe, cfg: GenerateConfig):
    return run_tools.call(pipe, cfg.pipeline, **_call_args(cfg))


def generate(cfg: GenerateConfig) -> dict:
    _precheck(cfg)  # every input checked before any model loads or any file is written
    config = None
    if cfg.context_parallel:
        cfg, config = _start_parallel(cfg)
        try:
            return _generate(cfg, config)
        finally:
            import torch.distributed as dist

            dist.destroy_process_group()
    return _generate(cfg, config)


def _generate(cfg: GenerateConfig, config) -> dict:
    import torch.distributed as dist

    lead = config is None or dist.get_rank() == 0  # under context parallelism rank 0 writes and reports
    shown = {**asdict(cfg), "prompt": cfg.prompt if len(cfg.prompt) <= 80 else cfg.prompt[:77] + "..."}
    if lead:
        print("diffattn generate", shown, flush=True)
    try:
        pipe = run_tools.load(cfg.model, cfg.pipeline, cfg.device)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # a broken or partial folder
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        what = f"--model {cfg.model}" if cfg.model is not None else f"the testbed {cfg.pipeline} pipeline"
        raise SystemExit(f"diffattn: could not load {what}: {first}") from None
    _check(cfg, pipe)
    stem, suffix = cfg.out[:-4], cfg.out[-4:]
    dense_path = f"{stem}_dense{suffix}"
    label = cfg.method if cfg.guide is None else (cfg.guide if cfg.method == "none" else f"{cfg.method}+{cfg.guide}")
    parallel = None
    if config is not None:
        try:
            dense_media, dense_s, method_media, method_s, summary, handle, parallel = _run_parallel(pipe, cfg, config)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise SystemExit(f"diffattn: {exc}") from None
        if not lead:
            return {}
    else:
        dense_media, dense_s, method_media, method_s, summary, handle = _run_single(pipe, cfg)
    if cfg.method not in ("none", "dense") and summary["method_calls"] == 0:
        raise SystemExit(f"diffattn: {cfg.method} ran on no call at {cfg.height}x{cfg.width} over {cfg.steps} steps "
                         f"(its step window, size guard or dense steps left everything stock: {handle.method.config}); "
                         "change those options or the size")
    if cfg.method != "dense":
        what = f"{cfg.method} config: {handle.method.config}" if cfg.method != "none" else ""
        if cfg.guide is not None:
            what += f"{'; ' if what else ''}{cfg.guide}: {summary['guidance']}"
        print(what + (f" with the LoRA {cfg.lora}" if cfg.lora else ""), flush=True)
    if parallel:
        print(f"context parallel {cfg.context_parallel} over {dist.get_world_size()} processes: {parallel[-1]}", flush=True)
    run_tools.save(dense_media, cfg.pipeline, dense_path, cfg.fps)  # both written once both ran: no half output
    run_tools.save(method_media, cfg.pipeline, cfg.out, cfg.fps)

    compared = run_tools.compare(cfg.pipeline, cfg.prompt, dense_media, method_media, judged=cfg.model is None)
    density = summary["density"]
    report = {
        "dense_seconds": round(dense_s, 3), "method_seconds": round(method_s, 3),
        "speedup": round(dense_s / method_s, 3), "mask_density": None if density is None else round(density, 4),
        "psnr_vs_dense_db": round(compared["psnr"], 2), "ssim_vs_dense": round(compared["ssim"], 4),
        "layout": repr(summary["layout"]), "files": [cfg.out, dense_path],
        "method_calls": summary["method_calls"], "dense_calls": summary["dense_calls"], "backends": summary["backends"],
    }
    if "guidance" in summary:
        report["guidance"] = summary["guidance"]
    if parallel:
        report["parallel"] = parallel[-1]
    shown_density = "(no sparse attention)" if density is None else f"{density:.3f}"
    print(
        f"dense: {dense_s:.2f} s -> {dense_path}\n"
        f"{label}: {method_s:.2f} s -> {cfg.out} (x{dense_s / method_s:.2f})\n"
        f"{label} mask density {shown_density} over {summary['layout']} "
        f"({summary['method_calls']} method / {summary['dense_calls']} stock attention calls, backends {summary['backends']}), "
        f"PSNR vs dense {report['psnr_vs_dense_db']} dB, SSIM {report['ssim_vs_dense']}",
        flush=True,
    )
    for name, reading in zip(("dense", label), compared.get("judge", ())):
        report[f"judge_{'dense' if name == 'dense' else 'method'}"] = reading
        found = ", ".join(f"{k} {v:.0%}" for k, v in reading.items())
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
    return clear_distill.train(cfg, pipe=pipe, prompts=prompts, consume=True)  # the testbed pipeline was loaded for this run


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
    return length.train(cfg, pipe=pipe, clips=clips, consume=True)  # the testbed pipeline was loaded for this run


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
    for dest in names:
        value = args.pop(dest)
        name = dest.removeprefix(OPTION)
        if value is not None:
            options[name] = value[0] if isinstance(value, list) and len(value) == 1 else tuple(value) if isinstance(value, list) else value
    return options


def _tool_arguments(argv, prog: str, tool):
    """(argparse namespace, method options) of a tool command (``mask``, ``bench``): the tool's own
    flags plus one per field of the ``--method``'s config."""
    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="radial")
    method = pre.parse_known_args(argv)[0].method
    parser = argparse.ArgumentParser(prog=prog, description=tool.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tool.add_arguments(parser, method)
    names = _method_arguments(parser, method) if method in diffattn.methods() else []
    args = parser.parse_args(argv)
    return args, _collect(vars(args), names)


def mask(argv) -> dict:
    """``diffattn mask``: density and block-map picture of a method at a model's size (no weights)."""
    from diffattn.app import mask as mask_tool

    args, options = _tool_arguments(argv, "diffattn mask", mask_tool)
    try:
        return mask_tool.run(args, options)
    except ValueError as exc:
        raise SystemExit(f"diffattn mask: {exc}") from None


def bench(argv) -> list:
    """``diffattn bench``: one attention call of a model at its real size on this GPU, every kernel."""
    from diffattn.app import bench as bench_tool

    args, options = bench_arguments(argv)
    try:
        return bench_tool.run(args, options)
    except ValueError as exc:
        raise SystemExit(f"diffattn bench: {exc}") from None


def bench_arguments(argv):
    """(argparse namespace, method options) of ``diffattn bench``'s command line."""
    from diffattn.app import bench as bench_tool

    return _tool_arguments(argv, "diffattn bench", bench_tool)


USAGE = """usage: diffattn {generate,mask,bench,demo,train,headhunter} ...

  generate   a clip dense and with a method, compared (time, density, PSNR/SSIM, the judge)
  mask       a method's density and block-map picture at a model's size, without weights
  bench      time one attention call at a model's size on this GPU: dense cuDNN / FA2, Flex and ours
  demo       the Gradio demo on 127.0.0.1 (needs the [app] extra)
  train      a trainer: `train clear` (CLEAR distillation) or `train length` (LoRA length extension)
  headhunter the greedy attention-head search for HeadHunter guidance (writes a head list as JSON)

`diffattn COMMAND --help` explains each command's options."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in ("generate", "mask", "bench", "demo", "train", "headhunter"):
        raise SystemExit(f"diffattn: unknown command {argv[0]!r}\n{USAGE}")
    if argv and argv[0] == "train":
        train(argv[1:])
        return 0
    if argv and argv[0] == "mask":
        mask(argv[1:])
        return 0
    if argv[0] == "bench":
        bench(argv[1:])
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
