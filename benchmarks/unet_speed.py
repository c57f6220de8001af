"""U-Net speed at real configs (random bf16 weights): plain vs the diffattn U-Net methods, in one run.

    python benchmarks/unet_speed.py                                   # SDXL 2048 and 4096, SD1.5 1024 and 2048
    python benchmarks/unet_speed.py --models sdxl --sizes 2048 --steps 50 --methods hidiffusion msw-msa
    python benchmarks/unet_speed.py --json /tmp/unet.json

Per (model, size, method): the ms of one U-Net forward at the first denoising step (CFG batch 2;
RAU-Net is on there) and the seconds of a whole denoising loop (``--steps``, Euler, CFG batch 2, no
VAE decode), both with the method applied to a minimal pipeline object (the U-Net and its
scheduler), so the step-dependent parts (RAU-Net's schedule, agent's early steps) run as in a real
pipeline. A method is ``name`` or ``name:option=value;option=value`` (Python literals). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import torch

import diffattn

CONFIGS = {
    # the published U-Net configs of SD 1.5 and SDXL base (diffusers' unet/config.json of each)
    "sd1.5": dict(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}
TEXT = {"sd1.5": (77, 768), "sdxl": (77, 2048)}


class LoopPipeline:
    """The parts of a diffusers pipeline diffattn reads: the U-Net, its scheduler, the step count."""

    def __init__(self, unet):
        from diffusers import EulerDiscreteScheduler

        self.unet = unet
        self.scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        self.components = {"unet": unet, "scheduler": self.scheduler}
        self._num_timesteps = 0

    def inputs(self, model: str, size: int):
        g = torch.Generator("cuda").manual_seed(0)
        latent = torch.randn(1, 4, size // 8, size // 8, device="cuda", generator=g, dtype=torch.bfloat16)
        tokens, dim = TEXT[model]
        text = torch.randn(2, tokens, dim, device="cuda", generator=g, dtype=torch.bfloat16)
        extra = {}
        if model == "sdxl":
            extra = dict(added_cond_kwargs=dict(
                text_embeds=torch.randn(2, 1280, device="cuda", dtype=torch.bfloat16),
                time_ids=torch.tensor([[size, size, 0, 0, size, size]] * 2, device="cuda", dtype=torch.bfloat16)))
        return latent, text, extra

    @torch.no_grad()
    def loop(self, latent, text, extra, steps: int, forwards: int | None = None):
        self.scheduler.set_timesteps(steps, device="cuda")
        self._num_timesteps = len(self.scheduler.timesteps)
        latents = latent * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.scheduler.timesteps):
            if forwards is not None and i >= forwards:
                break
            x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = self.unet(x, t, text, **extra).sample
            uncond, cond = noise.chunk(2)
            latents = self.scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
        return latents


def build(model: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**CONFIGS[model]).to(torch.bfloat16)
    return unet.eval()


def parse(text: str):
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        options[key.strip()] = ast.literal_eval(value.strip())
    return name, options


def measure(pipe, model: str, size: int, steps: int, repeats: int) -> dict:
    latent, text, extra = pipe.inputs(model, size)
    pipe.loop(latent, text, extra, steps, forwards=1)  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):  # one forward at step 0 (the scheduler's first step)
        start = time.perf_counter()
        pipe.loop(latent, text, extra, steps, forwards=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = pipe.loop(latent, text, extra, steps)
    torch.cuda.synchronize()
    return {"first_forward_ms": round(1000 * min(times), 1), "loop_s": round(time.perf_counter() - start, 2),
            "finite": bool(torch.isfinite(out).all())}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sdxl", "sd1.5"], choices=sorted(CONFIGS))
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="pixel sizes (default: 2x and 4x the trained size)")
    parser.add_argument("--methods", nargs="+", default=["msw-msa", "hidiffusion", "tome", "hidiffusion+tome", "agent+tome"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-loop-above", type=int, default=0, help="sizes above this time only the forward (0: never)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for model in args.models:
        unet = build(model)
        pipe = LoopPipeline(unet)
        native = CONFIGS[model]["sample_size"] * 8
        for size in args.sizes or [2 * native, 4 * native]:
            base = None
            for method in ["plain", *args.methods]:
                name, options = parse(method)
                handle = None if method == "plain" else diffattn.apply(pipe, name, **options)
                try:
                    steps = args.steps if not args.skip_loop_above or size <= args.skip_loop_above else 1
                    row = {"model": model, "size": size, "method": method, "steps": steps, **measure(pipe, model, size, steps, args.repeats)}
                    if handle is not None:
                        s = handle.summary()
                        row["density"] = None if s["density"] is None else round(s["density"], 4)
                        row["method_calls"] = s["method_calls"]
                finally:
                    if handle is not None:
                        handle.remove()
                if base is None:
                    base = row
                else:
                    row["forward_speedup"] = round(base["first_forward_ms"] / row["first_forward_ms"], 2)
                    row["loop_speedup"] = round(base["loop_s"] / row["loop_s"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del unet, pipe
        torch.cuda.empty_cache()
    cols = ["model", "size", "method", "first_forward_ms", "forward_speedup", "loop_s", "loop_speedup", "density"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
