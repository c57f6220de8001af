"""``diffattn demo`` (or ``python -m diffattn.app``): the Gradio demo, dense and a method side by side.

    diffattn demo                              # http://127.0.0.1:7860, the testbed pipelines
    diffattn demo --port 7870 --device cuda
    diffattn demo --model /path/to/Wan2.1-T2V-1.3B-Diffusers --device cuda
    diffattn demo --host 0.0.0.0               # other machines may connect (only when asked); --share: a gradio.live link

A user picks the pipeline (the testbed video Wan, image FLUX or SD U-Net, or ``--model``), the
method and its options (a JSON object prefilled with the config the method gets on that pipeline:
the family's defaults and the pipeline's declared ones), the attention guidance (PAG, SoftPAG,
HeadHunter, STG, SEG: added to the method, or alone with method "none") and its options, prompt,
seed, steps, size, frames and the CFG scale.
"Generate" runs dense and the method on the same seed and shows both, with the time of each, the
speed-up, the mask density, PSNR / SSIM against dense and, on the testbed, what the judge reads in
each (the prompt's colour, shape, motion); the block map of the method at that size, the density
of every attention layer and the calls and density of every denoising step. "Show mask" draws the
block map alone (no generation).

Progress follows the denoising steps (``gr.Progress(track_tqdm=True)``); "Stop" cancels a running
job; requests queue (one at a time, ``max_size`` waiting); inputs are bounded (``LIMITS``) and
checked before any model runs, with a message that says what to do; each pipeline is loaded once
and reused; CUDA memory is released after every job, also a failed one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import diffattn
from diffattn.app import mask as mask_tool
from diffattn.app import run as run_tools

KINDS = {"video": "video (testbed WanPipeline, 29 frames at 128x128)", "image-dit": "image DiT (testbed FluxPipeline, 128x128)",
         "image-unet": "U-Net (testbed StableDiffusionPipeline, trained at 128x128: HiDiffusion is for 256)"}
MASK_PRESET = {"video": "testbed", "image-dit": "testbed-flux"}


@dataclass(frozen=True)
class Limits:
    min_size: int = 64
    max_size: int = 256
    size_step: int = 16       # WanPipeline and FluxPipeline need multiples of 16
    max_frames: int = 113     # 4x the testbed video length
    max_steps: int = 50
    max_prompt_words: int = 32


LIMITS = Limits()


def _testbed(module: str):
    return run_tools.testbed(module, "diffattn demo")


class Models:
    """Each pipeline loaded once (on first use) and reused by every request of this app."""

    def __init__(self, device: str, model_path: str | None = None):
        self.device, self.model_path, self._pipes = device, model_path, {}

    def kinds(self) -> dict[str, str]:
        if self.model_path:
            return {"custom": f"--model {self.model_path}"}
        return dict(KINDS)

    def get(self, kind: str):
        if kind not in self._pipes:
            self._pipes[kind] = run_tools.load(self.model_path if kind == "custom" else None, kind, self.device)
        return self._pipes[kind]

    def pipeline_kind(self, kind: str) -> str:
        """"video", "image-dit" or "image-unet" (a --model folder: from its model_index.json)."""
        if kind != "custom":
            return kind
        return run_tools.kind_of_class(run_tools.pipeline_class(self.model_path)) or "video"

    def is_video(self, kind: str) -> bool:
        return self.pipeline_kind(kind) == "video"


def method_names(models: Models, kind: str) -> list[str]:
    """Methods that fit the family of ``kind``'s model."""
    family = _family(models, kind)
    names = [m for m, fits in diffattn.methods().items() if family in fits]
    return sorted(names, key=lambda m: m != "radial")  # radial first where it fits (the flagship video method)


def _family(models: Models, kind: str) -> str:
    if kind == "video":
        return "wan2.1"
    if kind == "image-dit":
        return "flux"
    if kind == "image-unet":
        return "sd1.5"
    return diffattn.detect_family(models.get(kind))


def default_options(models: Models, kind: str, method: str) -> str:
    """The config ``method`` gets on ``kind``'s pipeline, as JSON (tuples as lists)."""
    if not method or method == "none":
        return "{}"
    from diffattn.methods import METHODS

    declared = {}
    if kind in KINDS:
        declared = _testbed("pipelines").METHOD_OPTIONS.get(kind, {}).get(method, {})
    config = METHODS[method].from_options(_family(models, kind), declared=declared).config
    return json.dumps(dataclasses.asdict(config), indent=1)


def parse_options(text: str) -> dict:
    try:
        options = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"method options must be a JSON object, e.g. {{\"decay\": 0.2}}: {exc.msg} at column {exc.colno}") from None
    if not isinstance(options, dict):
        raise ValueError("method options must be a JSON object, e.g. {\"decay\": 0.2}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def check_inputs(models: Models, kind: str, prompt: str, steps: int, size: int, frames: int, video: bool) -> None:
    """Raise ValueError naming the fix for out-of-bounds inputs (before any model runs)."""
    L = LIMITS
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt, e.g. 'a red circle moving right on a dark blue background'")
    words = prompt.split()
    if len(words) > L.max_prompt_words:
        raise ValueError(f"the prompt has {len(words)} words; at most {L.max_prompt_words}")
    if kind in KINDS:
        shapes = _testbed("shapes")
        unknown = shapes.unknown_words(prompt)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(f"the testbed models do not know the words {shown}; use caption words such as "
                             "'a red circle moving right on a dark blue background'")
        shapes.parse_caption(prompt)  # raises ValueError naming what is missing
    if not 1 <= int(steps) <= L.max_steps:
        raise ValueError(f"steps must be 1 to {L.max_steps}, got {steps}")
    if not L.min_size <= int(size) <= L.max_size or int(size) % L.size_step:
        raise ValueError(f"size must be a multiple of {L.size_step} from {L.min_size} to {L.max_size}, got {size}")
    if video and (not 5 <= int(frames) <= L.max_frames or (int(frames) - 1) % 4):
        raise ValueError(f"frames must be 4k+1 from 5 to {L.max_frames} (e.g. 29, 57, 113), got {frames}")


class StepLog:
    """``callback_on_step_end`` that records, per denoising step, the attention calls that ran the
    method and the stock path and the mean density of the method's calls (from the handle's summary)."""

    def __init__(self, handle):
        self.handle, self.rows, self.seen = handle, [], (0, 0, 0.0)

    def __call__(self, pipe, step, timestep, callback_kwargs):
        s = self.handle.summary()
        weighted = (s["density"] or 0.0) * s["method_calls"]
        sparse, dense = s["method_calls"] - self.seen[0], s["dense_calls"] - self.seen[1]
        density = round((weighted - self.seen[2]) / sparse, 4) if sparse else ""
        self.rows.append([step + 1, sparse, dense, density])
        self.seen = (s["method_calls"], s["dense_calls"], weighted)
        return callback_kwargs


def mask_picture(models: Models, kind: str, method: str, options: dict, size: int, frames: int, folder: Path) -> tuple[str, str]:
    """(PNG path, one line: layout and density) of the block map at this size; for U-Net methods the
    MSW-MSA windows of the top attention level (those without windows have no mask to draw)."""
    import imageio.v3 as iio

    if _family(models, kind) in diffattn.methods()["msw-msa"]:  # the U-Net families
        return window_picture(models, kind, method, options, size, folder)
    preset = MASK_PRESET.get(kind) or ("wan" if models.is_video(kind) else "flux")
    info = mask_tool.describe(preset, method, size, size, frames if models.is_video(kind) else 1, options)
    path = folder / f"mask_{method}_{size}_{frames}.png"
    pixels = mask_tool.picture(info["mask"], info["partial"], 1024)
    scale = max(1, 512 // max(pixels.shape[:2]))  # small maps (the testbed's 32 x 32 blocks) drawn large, nearest neighbour
    iio.imwrite(path, pixels.repeat(scale, axis=0).repeat(scale, axis=1))
    return str(path), (f"{method}: {info['layout']}, {info['blocks'][0]} x {info['blocks'][1]} blocks of "
                       f"{info['block_size'][0]}, density {info['density']:.3f} (white: full, grey: partial, black: skipped)")


def window_picture(models: Models, kind: str, method: str, options: dict, size: int, folder: Path) -> tuple[str | None, str]:
    """The 2 x 2 windows (one colour each) of the top attention level at the first step's shift."""
    import imageio.v3 as iio

    from diffattn.patterns import windows

    if "msw-msa" not in method and "hidiffusion" not in method:
        return None, (f"{method}: no attention mask to draw ({'it changes the U-Net' if 'rau-net' in method else 'it merges tokens'}); "
                      "the per-layer table shows where it ran")
    pipe = models.get(kind)
    rows = cols = size // getattr(pipe, "vae_scale_factor", 8)  # the top attention level runs at the latent's size (SD 1.5 layout)
    ids = windows.window_ids(rows, cols, int(options.get("seed", 0)) % 4 if options.get("shifts") == "cyclic" else 0).reshape(rows, cols)
    palette = np.array([[230, 80, 60], [60, 160, 230], [90, 200, 90], [240, 200, 60]], dtype=np.uint8)
    pixels = palette[ids.numpy()]
    scale = max(1, 512 // rows)
    path = folder / f"windows_{method}_{size}.png"
    iio.imwrite(path, pixels.repeat(scale, axis=0).repeat(scale, axis=1))
    return str(path), (f"{method}: the top level's {rows} x {cols} tokens in 2 x 2 windows of {windows.window_size(rows, cols)} "
                       "(unshifted; each call rolls them by 0, 1/4, 1/2 or 3/4 of a window); a token attends within its colour")


def default_guide_options(name: str) -> str:
    """The options of guidance ``name`` as JSON (its defaults; None fields, the family's, left out)."""
    if not name or name == "none":
        return "{}"
    from diffattn.guidance import GUIDANCE

    config = diffattn.guide(name, heads=[(0, 0)]) if name == "headhunter" else GUIDANCE[name]()
    values = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    if name == "headhunter":  # an example pair: a search's JSON (diffattn headhunter --out) or your own pairs
        values["heads"] = [[0, 0]]
    return json.dumps(values, indent=1)


def generate(models: Models, kind: str, method: str, options_text: str, guide: str, guide_text: str, prompt: str, seed: int,
             steps: int, size: int, frames: int, cfg_scale: float, folder: Path):
    """Dense and ``method`` (with the ``guide`` guidance, or the guidance alone for method "none") on
    the same seed: (dense file, method file, metrics Markdown, mask PNG, its caption, per-layer rows,
    per-step rows)."""
    video = models.is_video(kind)
    check_inputs(models, kind, prompt, steps, size, frames, video)
    guide = None if guide in (None, "", "none") else guide
    if method != "none" and method not in method_names(models, kind):
        raise ValueError(f"{method!r} does not fit this pipeline; choose one of {method_names(models, kind)}, or none")
    if method == "none" and guide is None:
        raise ValueError("method none with guidance none is just dense; pick a method or a guidance")
    options, guide_options = parse_options(options_text), parse_options(guide_text)
    steps, size, frames = int(steps), int(size), int(frames)
    pipe = models.get(kind)
    try:
        handle = run_tools.apply(pipe, method, options, guide, guide_options)  # options checked before the dense run
    except (ValueError, NotImplementedError, TypeError, OSError) as exc:
        raise ValueError(str(exc)) from None
    handle.remove()
    dense_steps = getattr(handle.method.config, "dense_steps", 0) if method != "none" else 0
    if dense_steps >= steps:
        raise ValueError(f"dense_steps={dense_steps} covers all {steps} steps: the method would never "
                         f"run; lower dense_steps or raise steps")
    label = method if guide is None else (guide if method == "none" else f"{method}+{guide}")
    pipe.set_progress_bar_config(disable=False)
    device, pkind = models.device, models.pipeline_kind(kind)
    call = dict(prompt=prompt, seed=seed, steps=steps, height=size, width=size, frames=frames, cfg=cfg_scale, device=device)
    try:
        if device.startswith("cuda"):  # untimed 1-step calls first: the times leave out compilation and autotuning
            run_tools.warm_up(pipe, pkind, lambda **o: run_tools.apply(pipe, method, {**options, **o}, guide, guide_options), call,
                              run_tools.SCHEDULE_OFF if method != "none" else {})
        dense, dense_s = run_tools.call(pipe, pkind, **call)
        with run_tools.apply(pipe, method, options, guide, guide_options) as handle:
            per_step = StepLog(handle)
            sparse, method_s = run_tools.call(pipe, pkind, **call, on_step=per_step)
            summary, rows = handle.summary(), handle.report()
    finally:
        pipe.set_progress_bar_config(disable=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lines = [f"| | dense | {label} |", "|---|---|---|",
             f"| seconds{' (after an untimed 1-step warm-up of each)' if device.startswith('cuda') else ''} | {dense_s:.2f} | "
             f"{method_s:.2f} (x{dense_s / method_s:.2f}) |"]
    density = summary["density"]
    lines.append(f"| mask density | 1.000 | {density:.3f} |" if density is not None else "| mask density | 1.000 | (no sparse call) |")
    lines.append(f"| attention calls sparse / dense | | {summary['method_calls']} / {summary['dense_calls']} |")
    if "guidance" in summary:
        g = summary["guidance"]
        lines.append(f"| weak-branch forwards ({', '.join(g['branches'])}) | | {g['weak_forwards']} |")
    compared = run_tools.compare(pkind, prompt, dense, sparse, judged=kind in KINDS)
    lines.append(f"| PSNR / SSIM vs dense | | {compared['psnr']:.2f} dB / {compared['ssim']:.3f} |")
    if "judge" in compared:
        reads = compared["judge"]
        for key in reads[0]:
            lines.append(f"| judge: {key} | {reads[0][key]:.0%} | {reads[1][key]:.0%} |")
    if method == "none":
        picture, caption = None, f"{guide}: guidance only, no attention mask (the per-layer table shows the calls)"
    else:
        picture, caption = mask_picture(models, kind, method, options, size, frames, folder)
    table = [[r["site"], r["layer"], r["method_calls"], r["dense_calls"],
              "" if r["density"] is None else round(r["density"], 4)] for r in rows]
    stamp = f"{int(time.time() * 1000)}"
    suffix = "mp4" if video else "png"
    return (run_tools.save(dense, pkind, folder / f"dense_{stamp}.{suffix}"),
            run_tools.save(sparse, pkind, folder / f"{label}_{stamp}.{suffix}"),
            "\n".join(lines), picture, caption, table, per_step.rows)


def build(models: Models, *, max_queue: int = 8):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    folder = Path(tempfile.mkdtemp(prefix="diffattn-demo-"))
    kinds = models.kinds()
    first = next(iter(kinds))
    first_methods = (method_names(models, first) if first in KINDS else []) + ["none"]

    def on_kind(kind):
        names = method_names(models, kind) + ["none"]
        return gr.update(choices=names, value=names[0]), default_options(models, kind, names[0])

    def on_method(kind, method):
        return default_options(models, kind, method)

    def run(kind, method, options, guide, guide_options, prompt, seed, steps, size, frames, cfg_scale,
            progress=gr.Progress(track_tqdm=True)):
        try:
            return generate(models, kind, method, options, guide, guide_options, prompt, seed, steps, size, frames, cfg_scale,
                            folder)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def show(kind, method, options, size, frames):
        if method == "none":
            return None, "method none: guidance only, no attention mask"
        try:
            check_inputs(models, kind, "a red circle" if kind in KINDS else "x", 1, size, frames, models.is_video(kind))
            return mask_picture(models, kind, method, parse_options(options), int(size), int(frames), folder)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    with gr.Blocks(title="diffattn demo") as demo:
        gr.Markdown("# diffattn: sparse attention, dense and the method side by side\n"
                    "Same seed, same pipeline: the left output is stock dense attention, the right one the method.")
        with gr.Row():
            with gr.Column(scale=1):
                kind = gr.Dropdown(choices=[(label, key) for key, label in kinds.items()], value=first, label="pipeline")
                # custom values: the choices follow the pipeline in the browser; an API call may name any method
                # (generate() checks that it fits the pipeline)
                method = gr.Dropdown(choices=first_methods, value=first_methods[0] if first_methods else None, label="method",
                                     allow_custom_value=True)
                options = gr.Code(value=default_options(models, first, first_methods[0]) if first in KINDS else "{}",
                                  language="json", label="method options (the family's defaults; edit the JSON)")
                guide = gr.Dropdown(choices=["none"] + sorted(diffattn.guidance_methods()), value="none",
                                    label="attention guidance (added to the method; method none: guidance alone)")
                guide_options = gr.Code(value="{}", language="json", label="guidance options (edit the JSON)")
                prompt = gr.Textbox(value="a red circle moving right on a dark blue background", label="prompt",
                                    max_length=400)
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed")
                    steps = gr.Slider(1, LIMITS.max_steps, value=25, step=1, label="steps")
                with gr.Row():
                    size = gr.Slider(LIMITS.min_size, LIMITS.max_size, value=128, step=LIMITS.size_step, label="size (square)")
                    frames = gr.Slider(5, LIMITS.max_frames, value=29, step=4, label="frames (video)")
                cfg_scale = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="CFG scale (classifier-free guidance)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop")
                    show_mask = gr.Button("Show mask")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_out = gr.Video(label="dense", format="mp4", autoplay=True, loop=True)
                    method_out = gr.Video(label="method", format="mp4", autoplay=True, loop=True)
                with gr.Row():
                    dense_img = gr.Image(label="dense", visible=False)
                    method_img = gr.Image(label="method", visible=False)
                metrics = gr.Markdown()
                with gr.Row():
                    mask_img = gr.Image(label="block map (query blocks down, key blocks across)", type="filepath", height=360,
                                        image_mode="RGB")
                    mask_caption = gr.Markdown()
                with gr.Row():
                    layers = gr.Dataframe(headers=["site", "layer", "sparse calls", "dense calls", "density"],
                                          label="density per attention layer", interactive=False)
                    steps_table = gr.Dataframe(headers=["step", "sparse calls", "dense calls", "density"],
                                               label="per denoising step", interactive=False)

        def run_and_route(kind_v, *args, progress=gr.Progress(track_tqdm=True)):
            d, m, md, pic, cap, rows, step_rows = run(kind_v, *args)
            video = models.is_video(kind_v)
            return (gr.update(value=d if video else None, visible=video), gr.update(value=m if video else None, visible=video),
                    gr.update(value=None if video else d, visible=not video), gr.update(value=None if video else m, visible=not video),
                    md, pic, cap, rows, step_rows)

        kind.change(on_kind, kind, [method, options])
        method.change(on_method, [kind, method], options)
        guide.change(default_guide_options, guide, guide_options)
        inputs = [kind, method, options, guide, guide_options, prompt, seed, steps, size, frames, cfg_scale]
        event = go.click(run_and_route, inputs, [dense_out, method_out, dense_img, method_img, metrics, mask_img, mask_caption, layers, steps_table],
                         api_name="generate", concurrency_limit=1)
        stop.click(None, None, None, cancels=[event])
        show_mask.click(show, [kind, method, options, size, frames], [mask_img, mask_caption], api_name="mask")
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    parser.add_argument("--model", default=None, help="a local diffusers pipeline folder (default: the testbed pipelines)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-queue", type=int, default=8, help="requests that may wait (more are turned away)")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("diffattn demo: --device cuda, but this machine has no CUDA GPU; use --device cpu")
    if args.model and not (Path(args.model) / "model_index.json").is_file():
        raise SystemExit(f"diffattn demo: --model {args.model} is not a diffusers pipeline folder (no model_index.json)")
    try:
        import gradio  # noqa: F401  (checked here: the message names the extra)
    except ImportError:
        raise SystemExit("diffattn demo: needs gradio: pip install -e \".[app]\"") from None
    demo = build(Models(args.device, args.model), max_queue=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


__all__ = ["LIMITS", "Models", "build", "check_inputs", "default_options", "generate", "main", "method_names", "parse_options"]
