"""One process of the multi-process trainer tests (``tests/test_parallel.py``), under torchrun:

    torchrun --standalone --nproc_per_node N tests/train_worker.py OUT CONTEXT_PARALLEL [fsdp [STOP_AFTER]]

trains the testbed video LoRA of ``test_length.py``'s tiny config with ``context_parallel`` ("" for
plain data parallelism) into OUT; ``fsdp``: sharded over the processes (the pipeline is handed to
the trainer); STOP_AFTER: killed after that step (exit code 3), as a crash would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffattn.lora import length
from diffattn_testbed.pipelines import load_pipeline
from diffattn_testbed.shapes import render, sample

FRAMES, SIZE = 13, 64  # 4 latent frames of 8 x 8 tokens


def clips(frames, height, width, report):
    for seed in range(200_000, 200_004):
        scene = sample(seed, max_objects=2)
        yield f"scene {seed}", render(scene, frames=frames, height=height, width=width), scene.caption


def config(out, context_parallel: str = "", **kw) -> length.LengthConfig:
    base = dict(out=str(out), frames=FRAMES, height=SIZE, width=SIZE, steps=4, checkpoint_every=2, batch_size=2,
                lora_rank=4, lora_alpha=8, dense_blocks=1, mixed_precision="no", max_sequence_length=32, warmup=1,
                lr=1e-3, self_generate=4, context_parallel=context_parallel)
    return length.LengthConfig(**{**base, **kw})


def main() -> int:
    out, cp = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""
    fsdp = len(sys.argv) > 3 and sys.argv[3] == "fsdp"
    stop = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    pipe = load_pipeline("video")
    if fsdp:
        try:
            length.train(config(out, cp, fsdp=True), pipe=pipe, clips=clips, consume=True, _stop_after=stop)
        except length.Killed:
            (out / f"killed.{torch.distributed.get_rank()}").write_text("")  # the stand-in kill, not a crash
            return 3
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in pipe.transformer.parameters()), "every parameter is a shard"
        return 0
    length.train(config(out, cp), pipe=pipe, clips=clips)
    assert not [n for n, _ in pipe.transformer.named_parameters() if "lora" in n], "the caller's pipeline is as it was"
    assert pipe.transformer._parallel_config is None and pipe.transformer.attn_processors["blocks.0.attn1.processor"]._parallel_config is None
    return 0


if __name__ == "__main__":
    sys.exit(main())
