"""How long building a kernel description takes: pattern -> block mask -> BlockSparsity.

    python benchmarks/builder.py                 # on CUDA when available, else CPU
    python benchmarks/builder.py --device cpu

Shapes from DESIGN.md, largest last (HunyuanVideo 4x length: 460,800 video tokens + 256 text).
Median of 5 builds after one warm-up; descriptions are cached on the handle per layout, so this
is paid once per shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffattn.core.layout import TokenLayout
from diffattn.patterns import clear, neighborhood, radial
from diffattn.patterns.blocks import from_block_mask


def _time(fn, device) -> float:
    fn()
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    def radial_case(frames, tokens, text, decay, sink):
        def build():
            mask = radial.block_mask(frames, tokens, block_size=128, decay=decay, sink=sink, text_tokens=text, device=device)
            return from_block_mask(mask, frames * tokens + text, block_m=128)
        return build

    def na_case(layout, kernel):
        spec = neighborhood.spec(layout, kernel)
        return lambda: neighborhood.block_sparsity(layout, spec, device=device)

    cases = [
        ("radial Wan2.1-14B 720x1280x81", radial_case(21, 3600, 0, 0.2, True)),
        ("radial HunyuanVideo 720x1280x129 +256", radial_case(33, 3600, 256, 0.95, False)),
        ("radial HunyuanVideo 720x1280x509 +256", radial_case(128, 3600, 256, 1.0, False)),
        ("neighborhood 3x11x11 Wan2.1-14B 720p", na_case(TokenLayout(21, 45, 80), (3, 11, 11))),
        ("CLEAR r=16 FLUX 4096^2 +512", lambda: clear.block_sparsity(TokenLayout(1, 256, 256, 512, "before"), 16, device=device)),
    ]
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    for name, fn in cases:
        desc = fn()
        print(f"{name:42s} {_time(fn, device):9.1f} ms   {desc}")


if __name__ == "__main__":
    main()
