"""One WanTransformer3DModel forward at the real Wan2.1 configs (random bf16 weights): dense SDPA
vs each diffattn method (Flex and Triton backends), in one run.

    python benchmarks/e2e.py                         # 1.3B at 480x832x81 and 14B at 720x1280x81
    python benchmarks/e2e.py --models 14b --methods radial "neighborhood:kernel_size=(5,45,80)"

A method is ``name`` or ``name:option=value;option=value`` (values are Python literals). Every
method runs every step sparse (dense_steps=0), with the Wan2.1 defaults otherwise (first layer
dense; radial decay 0.2, block 128, sink). Prints ms per forward, the speed-up over dense and the
density of the method calls (``handle.summary()``), and the speed-up of the paper's 50-step schedule
(first 12 steps dense). Stock attention runs through cuDNN first. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import ast
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
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # stock attention (the dense run, dense layers and cross-attention) through cuDNN first: the
    # fastest dense kernel on Hopper (benchmarks/attention.py), as the baseline asks
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.no_grad(), sdpa_kernel(order, set_priority=True):
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


def parse_method(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        options[key.strip()] = ast.literal_eval(value.strip())
    return name, options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="*", default=["flex", "triton"])
    parser.add_argument("--methods", nargs="*", default=["radial"], help="name or name:option=value;...")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/e2e.py needs a CUDA GPU")
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
        for text in args.methods:
            method, options = parse_method(text)
            for backend in args.backends:
                with diffattn.apply(model, method, dense_steps=0, backend=backend, **options) as handle:
                    ms = time_forward(model, inputs, args.repeats)
                    summary = handle.summary()
                label = f"{text} ({backend})"
                assert {name.split(":")[0] for name in summary["backends"]} == {backend}, summary  # "triton:int8": its 8-bit mode
                print(f"Wan2.1-{name} {clip}: {label} {ms:.0f} ms, x{dense_ms / ms:.2f}, density {summary['density']:.3f}", flush=True)
                rows.append((name, clip, label, ms, dense_ms / ms, summary["density"]))
        del model
        torch.cuda.empty_cache()
    # the paper's schedule: the first 12 of 50 steps dense (the dense forward), the other 38 sparse
    print(f"\n{'model':8s} {'clip':12s} {'attention':48s} {'ms/forward':>11s} {'speed-up':>9s} {'12/50 dense':>12s} {'density':>8s}")
    dense_of = {name: ms for name, _, what, ms, _, _ in rows if what == "dense SDPA"}
    for name, clip, what, ms, speed, dens in rows:
        schedule = 50 * dense_of[name] / (12 * dense_of[name] + 38 * ms)
        print(f"{name:8s} {clip:12s} {what:48s} {ms:11.0f} {speed:9.2f} {schedule:12.2f} {dens:8.3f}")


if __name__ == "__main__":
    main()
