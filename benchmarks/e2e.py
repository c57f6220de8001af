"""One WanTransformer3DModel forward at the real Wan2.1 configs (random bf16 weights): dense SDPA
vs radial attention (Flex and Triton backends), in one run.

    python benchmarks/radial_e2e.py                  # 1.3B at 480x832x81 and 14B at 720x1280x81
    python benchmarks/radial_e2e.py --models 1.3b

Radial runs every step sparse (dense_steps=0) with the Wan2.1 defaults otherwise (first layer dense,
decay 0.2, block 128, sink). Prints ms per forward and the speed-up over dense. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

import diffattn

CONFIGS = {
    # name: (transformer config, latent [C, F, H, W] of the clip)
    "1.3b": (dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), (16, 21, 60, 104), "480x832x81"),
    "14b": (dict(num_attention_heads=40, ffn_dim=13824, num_layers=40), (16, 21, 90, 160), "720x1280x81"),
}


def build(name: str):
    from diffusers import WanTransformer3DModel

    cfg, _, _ = CONFIGS[name]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 on the GPU: 14B in fp32 does not fit
    try:
        with torch.device("cuda"):
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024, **cfg,
            )
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def time_forward(model, inputs, repeats: int) -> float:
    with torch.no_grad():
        model(**inputs)  # warm-up: compilation, autotuning, mask build
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            model(**inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="*", default=["flex", "triton"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/radial_e2e.py needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for name in args.models:
        model = build(name)
        _, latent, clip = CONFIGS[name]
        g = torch.Generator("cuda").manual_seed(0)
        inputs = dict(
            hidden_states=torch.randn(1, *latent, device="cuda", dtype=torch.bfloat16, generator=g),
            timestep=torch.tensor([500], device="cuda"),
            encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g),
            return_dict=False,
        )
        dense_ms = time_forward(model, inputs, args.repeats)
        print(f"Wan2.1-{name} {clip}: dense SDPA {dense_ms:.0f} ms", flush=True)
        rows.append((name, clip, "dense SDPA", dense_ms, 1.0, 1.0))
        for backend in args.backends:
            with diffattn.apply(model, "radial", dense_steps=0, backend=backend) as handle:
                ms = time_forward(model, inputs, args.repeats)
                sparsity = next(v for k, v in handle._cache.items() if k[0] == "radial" and len(k) == 6)
            print(f"Wan2.1-{name} {clip}: radial ({backend}) {ms:.0f} ms, x{dense_ms / ms:.2f}, density {sparsity.density:.3f}", flush=True)
            rows.append((name, clip, f"radial ({backend})", ms, dense_ms / ms, sparsity.density))
        del model
        torch.cuda.empty_cache()
    print(f"\n{'model':8s} {'clip':12s} {'attention':16s} {'ms/forward':>11s} {'speed-up':>9s} {'density':>8s}")
    for name, clip, what, ms, speed, dens in rows:
        print(f"{name:8s} {clip:12s} {what:16s} {ms:11.0f} {speed:9.2f} {dens:8.3f}")


if __name__ == "__main__":
    main()
