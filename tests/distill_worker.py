"""One process of the multi-process CLEAR distillation test (``tests/test_parallel.py``), under torchrun:

    torchrun --standalone --nproc_per_node N tests/distill_worker.py OUT ddp|fsdp [full|lora] [bf16]

distils the testbed FLUX student of ``test_clear_distill.py``'s tiny config into OUT, data
parallel (DDP) or sharded over the processes (FSDP; the pipeline is handed to the trainer);
``full``: the projections fine-tuned instead of a LoRA (the teacher is then a sharded copy);
``bf16``: bf16 mixed precision (fp32 otherwise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffattn.lora import clear_distill
from diffattn_testbed.pipelines import load_pipeline
from diffattn_testbed.shapes import sample

PROMPTS = [sample(i, image=True).caption for i in range(4)]


def config(out, **kw) -> clear_distill.DistillConfig:
    base = dict(pipeline="testbed", out=str(out), radius=3, attn_every=1, num_samples=4, steps=4, checkpoint_every=2,
                gen_steps=2, batch_size=1, mixed_precision="no", height=64, width=64, rank=4, max_sequence_length=32,
                warmup=1, lr=1e-3)
    return clear_distill.DistillConfig(**{**base, **kw})


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    full = len(sys.argv) > 3 and sys.argv[3] == "full"
    precision = sys.argv[4] if len(sys.argv) > 4 else "no"
    torch.set_num_threads(1)
    pipe = load_pipeline("image-dit")
    clear_distill.train(config(out, fsdp=mode == "fsdp", full=full, mixed_precision=precision), pipe=pipe, prompts=PROMPTS,
                        consume=mode == "fsdp")
    if mode == "fsdp":
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in pipe.transformer.parameters()), "every parameter is a shard"
    return 0


if __name__ == "__main__":
    sys.exit(main())
