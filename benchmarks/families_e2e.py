"""One transformer forward per video family at its native size and real config (random bf16
weights): dense vs radial vs neighborhood (Triton), in one run per family, and the family's whole
default schedule estimated from the step times.

    python benchmarks/families_e2e.py                                  # every family below
    python benchmarks/families_e2e.py --families mochi ltx2 --json out.json

Families (``FAMILIES``: config of the public checkpoint, the pipeline's default size and steps):
HunyuanVideo-1.5 8.3B 480p 121 frames, Mochi 1 (10B) 480x848 163 frames, CogVideoX-5B 480x720 49
frames, LTX-Video 2B 512x704 161 frames, LTX-2 19B 512x768 121 frames (with its audio stream),
SkyReels-V2-14B 544x960 97 frames. Dense attention is torch SDPA with cuDNN first; the methods run
every step sparse (``dense_steps=0``) with the family's other defaults (dense layers, decay, window).
The schedule estimate: the family's default steps, its ``dense_steps`` warm-up at the dense time and
the rest at the method's, against every step dense (CFG doubles both sides alike). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffattn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/e2e.py, run as a script or imported
import e2e  # noqa: E402


@dataclass(frozen=True)
class Case:
    label: str
    cls: str                 # diffusers class
    config: dict             # the public checkpoint's config (diffusers defaults where they are the checkpoint's)
    steps: int               # the pipeline's default denoising steps
    inputs: callable         # (model, (F, H, W) latent grid, generator) -> forward kwargs
    grid: tuple              # the latent grid (frames, height, width) at the native size, before patchifying


def _randn(*shape, g):
    return torch.randn(*shape, device=g.device, dtype=torch.bfloat16, generator=g)


def _ones(*shape, g, dtype=torch.bfloat16):
    return torch.ones(*shape, device=g.device, dtype=dtype)


def _t(value, g):
    """A timestep as the pipelines pass it: floats in the latents' dtype (bf16), ints as they are."""
    return torch.tensor([value], device=g.device, dtype=torch.bfloat16 if isinstance(value, float) else None)


def _hunyuan15(model, grid, g):  # Qwen 256 + ByT5 64 text tokens, T2V (zero image embeds)
    c = model.config
    return dict(hidden_states=_randn(1, c.in_channels, *grid, g=g), timestep=_t(500.0, g),
                encoder_hidden_states=_randn(1, 256, c.text_embed_dim, g=g), encoder_attention_mask=_ones(1, 256, g=g),
                encoder_hidden_states_2=_randn(1, 64, c.text_embed_2_dim, g=g), encoder_attention_mask_2=_ones(1, 64, g=g),
                image_embeds=torch.zeros(1, 1, c.image_embed_dim, device=g.device, dtype=torch.bfloat16), return_dict=False)


def _mochi(model, grid, g):  # 256 T5 tokens
    return dict(hidden_states=_randn(1, model.config.in_channels, *grid, g=g), encoder_hidden_states=_randn(1, 256, 4096, g=g),
                timestep=_t(500, g), encoder_attention_mask=_ones(1, 256, g=g, dtype=torch.bool), return_dict=False)


def _cogvideox(model, grid, g):  # 226 T5 tokens; 3-D RoPE as the pipeline builds it
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    f, h, w = grid
    p = model.config.patch_size
    rope = get_3d_rotary_pos_embed(embed_dim=model.config.attention_head_dim, crops_coords=((0, 0), (h // p, w // p)),
                                   grid_size=(h // p, w // p), temporal_size=f, device=g.device)
    return dict(hidden_states=_randn(1, f, model.config.in_channels, h, w, g=g), encoder_hidden_states=_randn(1, 226, 4096, g=g),
                timestep=_t(500, g), image_rotary_emb=rope, return_dict=False)


def _ltx(model, grid, g):  # packed tokens, the grid as num_frames / height / width; 128 T5 tokens
    f, h, w = grid
    return dict(hidden_states=_randn(1, f * h * w, model.config.in_channels, g=g), encoder_hidden_states=_randn(1, 128, 4096, g=g),
                timestep=_t(500, g), encoder_attention_mask=_ones(1, 128, g=g), num_frames=f, height=h, width=w, return_dict=False)


def _ltx2(model, grid, g):  # + audio: 25 latents per second over the clip (126 for 121 frames at 24 fps); 256 text tokens
    f, h, w = grid
    c, audio = model.config, max(2, round((8 * (f - 1) + 1) / 24 * 25))
    return dict(hidden_states=_randn(1, f * h * w, c.in_channels, g=g), audio_hidden_states=_randn(1, audio, c.audio_in_channels, g=g),
                encoder_hidden_states=_randn(1, 256, c.caption_channels, g=g),
                audio_encoder_hidden_states=_randn(1, 256, c.caption_channels, g=g), timestep=_t(500.0, g),
                encoder_attention_mask=_ones(1, 256, g=g), audio_encoder_attention_mask=_ones(1, 256, g=g),
                num_frames=f, height=h, width=w, audio_num_frames=audio, return_dict=False)


def _skyreels(model, grid, g):  # 512 umT5 tokens
    return dict(hidden_states=_randn(1, model.config.in_channels, *grid, g=g), timestep=_t(500, g),
                encoder_hidden_states=_randn(1, 512, 4096, g=g), return_dict=False)


FAMILIES = {  # latent grids: pixel size / VAE compression (frames: (n - 1) / temporal + 1)
    "hunyuan15": Case("HunyuanVideo-1.5 480x848x121", "HunyuanVideo15Transformer3DModel", dict(task_type="t2v"), 50, _hunyuan15,
                      (31, 30, 53)),  # VAE 16 x 4, patch 1
    "mochi": Case("Mochi 1 480x848x163", "MochiTransformer3DModel", {}, 64, _mochi, (28, 60, 106)),  # VAE 8 x 6, patch 2
    "cogvideox": Case("CogVideoX-5B 480x720x49", "CogVideoXTransformer3DModel",
                      dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True), 50, _cogvideox,
                      (13, 60, 90)),  # VAE 8 x 4, patch 2
    "ltx": Case("LTX-Video 2B 512x704x161", "LTXVideoTransformer3DModel", {}, 50, _ltx, (21, 16, 22)),  # VAE 32 x 8
    "ltx2": Case("LTX-2 19B 512x768x121", "LTX2VideoTransformer3DModel", {}, 30, _ltx2, (16, 16, 24)),  # VAE 32 x 8
    "skyreels": Case("SkyReels-V2-14B 544x960x97", "SkyReelsV2Transformer3DModel",
                     dict(num_attention_heads=40, ffn_dim=13824, num_layers=40), 50, _skyreels, (25, 68, 120)),  # Wan's VAE
}


def build(case: Case, device: str = "cuda", **override):
    import diffusers

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU (19B in fp32 would not fit)
    try:
        with torch.device(device):
            model = getattr(diffusers, case.cls)(**{**case.config, **override})
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def time_forward(model, inputs, repeats: int) -> float:
    """e2e.py's timing (warm-up, then the median of ``repeats`` CUDA-event timed forwards), SDPA with cuDNN first."""
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH], set_priority=True):
        return e2e.time_forward(model, inputs, repeats)


def run(name: str, repeats: int, methods: list[str]) -> list[dict]:
    case = FAMILIES[name]
    model = build(case)
    inputs = case.inputs(model, case.grid, torch.Generator("cuda").manual_seed(0))
    dense = time_forward(model, inputs, repeats)
    print(f"{case.label}: dense {dense:.0f} ms per forward", flush=True)
    rows = [dict(family=name, label=case.label, method="dense", ms=round(dense, 1), speedup=1.0, density=1.0)]
    for method in methods:
        with diffattn.apply(model, method, dense_steps=0, backend="triton") as handle:
            ms = time_forward(model, inputs, repeats)
            summary = handle.summary()
        from diffattn.methods import METHODS

        default = METHODS[method].from_options(handle.family).config
        d, n = min(default.dense_steps, case.steps), case.steps
        schedule = n * dense / (d * dense + (n - d) * ms)
        row = dict(family=name, label=case.label, method=method, ms=round(ms, 1), speedup=round(dense / ms, 3),
                   density=round(summary["density"], 4), layout=repr(summary["layout"]), calls=summary["method_calls"],
                   dense_calls=summary["dense_calls"], steps=n, dense_steps=d, schedule_speedup=round(schedule, 3))
        print(f"  {method}: {ms:.0f} ms (x{dense / ms:.2f}), density {summary['density']:.3f} over {summary['layout']}, "
              f"{summary['method_calls']} sparse / {summary['dense_calls']} dense calls; {n} steps with {d} dense: "
              f"x{schedule:.2f} end to end", flush=True)
        rows.append(row)
    del model
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--methods", nargs="*", default=["radial", "neighborhood"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/families_e2e.py needs a CUDA GPU")
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for name in args.families:
        rows += run(name, args.repeats, args.methods)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
    print(f"\n{'family':34s} {'attention':14s} {'ms/forward':>11s} {'x dense':>8s} {'density':>8s} {'schedule':>9s}")
    for r in rows:
        sched = f"x{r['schedule_speedup']:.2f}" if "schedule_speedup" in r else ""
        print(f"{r['label']:34s} {r['method']:14s} {r['ms']:11.0f} {r['speedup']:8.2f} {r['density']:8.3f} {sched:>9s}")


if __name__ == "__main__":
    main()
