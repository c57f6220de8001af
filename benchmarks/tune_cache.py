"""First-call time of the block-sparse kernels with and without the on-disk autotune cache
(``kernels.triton.tuning``): two fresh processes share one empty cache folder; the first tunes and
writes, the second reads. Same shape class as Wan2.1-14B's radial forward and backward.

    python benchmarks/tune_cache.py            # prints both first-call times
    python benchmarks/tune_cache.py --child    # (one process: time its first call)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def child() -> None:
    import torch

    from diffattn.kernels.block_sparse import block_sparse_attention
    from diffattn.patterns import radial
    from diffattn.patterns.blocks import from_block_mask

    frames, tokens = 21, 3600
    mask = radial.block_mask(frames, tokens, block_size=128, decay=0.2, sink=True, device="cuda")
    sp = from_block_mask(mask, frames * tokens, block_m=128)
    q, k, v = (torch.randn(1, 4, frames * tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = block_sparse_attention(q, k, v, sp)
    out.sum().backward()
    with torch.no_grad():
        block_sparse_attention(q, k, v, sp, precision="int8")
    torch.cuda.synchronize()
    print(f"{time.perf_counter() - start:.1f}")


def main() -> None:
    if "--child" in sys.argv:
        return child()
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "DIFFATTN_CACHE_DIR": folder}
        times = [subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
                 for _ in range(2)]
        files = sorted(os.listdir(os.path.join(folder, "autotune")))
    print(f"first call (fwd + bwd + int8 fwd), empty cache: {times[0]} s; next process, cache read: {times[1]} s")
    print("cache files:", files)


if __name__ == "__main__":
    main()
