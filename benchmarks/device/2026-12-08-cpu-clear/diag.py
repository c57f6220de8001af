"""Student-vs-teacher velocity error on held-out prompts, conditional vs unconditional (CPU)."""
import sys, torch
import diffattn
from diffattn.lora.clear_distill import _forward, _encode
from diffattn_testbed.pipelines import load_pipeline
from diffattn_testbed.shapes import sample
from diffattn_testbed.training import EVAL_SEED

lora = sys.argv[1] if len(sys.argv) > 1 else None
n = 32
prompts = [sample(EVAL_SEED + i, image=True).caption for i in range(n)]
teacher = load_pipeline("image-dit"); student = load_pipeline("image-dit")
h = diffattn.apply(student, "clear", **({"lora": lora} if lora else {}))
torch.manual_seed(0)
with torch.no_grad():
    x0 = teacher(prompt=prompts, output_type="latent", generator=[torch.Generator().manual_seed(i) for i in range(n)]).images
    emb, pooled = _encode(teacher, "flux", prompts, 32)
    e0, p0 = _encode(teacher, "flux", [""], 32)
    eu, pu = e0.expand(n, -1, -1), p0.expand(n, -1)
    noise = torch.randn_like(x0)
    for s in (0.95, 0.8, 0.6, 0.4, 0.2):
        sig = torch.full((n,), s)
        xt = (1 - s) * x0 + s * noise
        vc_t = _forward(teacher.transformer, "flux", xt, sig, emb, pooled, (16, 16))
        vu_t = _forward(teacher.transformer, "flux", xt, sig, eu, pu, (16, 16))
        vc_s = _forward(student.transformer, "flux", xt, sig, emb, pooled, (16, 16))
        vu_s = _forward(student.transformer, "flux", xt, sig, eu, pu, (16, 16))
        cfg_t = vu_t + 4 * (vc_t - vu_t); cfg_s = vu_s + 4 * (vc_s - vu_s)
        m = lambda a, b: (a - b).pow(2).mean().item()
        print(f"sigma {s}: cond {m(vc_s, vc_t):.4f}  uncond {m(vu_s, vu_t):.4f}  cfg4 {m(cfg_s, cfg_t):.4f}  (|v| {vc_t.pow(2).mean().item():.3f})")
