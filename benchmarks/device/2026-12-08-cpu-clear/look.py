import sys, torch, numpy as np
from PIL import Image
import diffattn
from diffattn_testbed.pipelines import load_pipeline
from diffattn_testbed.shapes import sample
from diffattn_testbed.training import EVAL_SEED
n = 8
prompts = [sample(EVAL_SEED + i, image=True).caption for i in range(n)]
pipe = load_pipeline("image-dit")
rows = []
def gen():
    return pipe(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(n)], output_type="np").images
rows.append(gen())
for path in sys.argv[1:]:
    with diffattn.apply(pipe, "clear", **({"lora": path} if path != "zero" else {})):
        rows.append(gen())
grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
Image.fromarray((grid * 255).clip(0, 255).astype(np.uint8)).save("/tmp/exp/look.png")
for p in prompts: print(p)
