"""Context parallelism (``pipelines.parallel``): Ulysses, the sparse ring and both, on diffusers'
machinery, against one process; gloo over 2 and 4 CPU processes (``tests/cp_worker.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import diffattn
from diffattn.core.layout import TokenLayout
from diffattn.methods.radial import Radial
from diffattn.patterns.blocks import expand_block_mask
from diffattn.pipelines import parallel

WORKER = Path(__file__).with_name("cp_worker.py")
TOL = 1e-5  # fp32, relative to the largest value


def _launch(world: int, cases: list[str], tmp: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    init = tmp / "init"
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world", str(world), "--init", str(init),
                          "--out", str(tmp), *cases], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for r in range(world)
    ]
    done = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return done


def _results(world: int, cases: list[str], tmp: Path) -> dict[str, list[dict]]:
    runs = _launch(world, cases, tmp)
    for r, run in enumerate(runs):
        assert run.returncode == 0, f"rank {r} failed:\n{run.stdout[-4000:]}"
    return {case: [json.loads((tmp / f"{case}.rank{r}.json").read_text()) for r in range(world)] for case in cases}


def _check(results: dict[str, list[dict]]) -> None:
    for case, ranks in results.items():
        for row in ranks:
            assert row["out"] <= TOL and row["attention"] <= TOL, row  # the model output, every attention call's rows
            assert row["grad_input"] <= TOL and row["grad_params"] <= TOL, row
            assert not row["missing_grads"], row
            assert row["method_calls"] >= 1 and row["dense_calls"] >= 1, row  # layer 0 dense, layer 1 sparse
            mode = case.split("-")[2]
            u, r = (int(x) for x in mode[1:].split("r"))
            sparse = row["parallel"][-1]
            assert sparse["mode"] == ("ulysses" if r == 1 else "ring" if u == 1 else "ulysses+ring"), row
            assert sparse["degree"] == u * r
            if case.startswith("hunyuan"):  # diffattn's plan went with the handle: the model runs whole again
                assert row["after_remove"] <= TOL, row


WORLD2 = ["wan-radial-u2r1", "wan-radial-u1r2", "wan-neighborhood-u1r2", "hunyuan-radial-u2r1", "hunyuan-radial-u1r2",
          "flux-clear-u2r1", "flux-neighborhood2d-u1r2", "ltx-radial-u2r1"]
WORLD4 = ["wan-radial-u4r1", "wan-radial-u2r2", "hunyuan-radial-u1r4", "hunyuan-radial-u2r2"]


def test_two_processes_equal_one(tmp_path):
    """Ulysses and ring, Wan and LTX (diffusers' plans, enable_parallelism before apply), HunyuanVideo
    (diffattn's plan, padded text) and FLUX (text first, split): forward and gradients equal the
    single-process run; the dense layer goes through diffusers' path (or ours for padded text)."""
    results = _results(2, WORLD2, tmp_path)
    _check(results)
    wan = results["wan-radial-u2r1"][0]["parallel"]
    assert wan[0]["mode"] == "diffusers"  # Wan's dense layer: the stock context-parallel attention
    hunyuan = results["hunyuan-radial-u2r1"][0]["parallel"]
    assert hunyuan[0]["mode"] == "ulysses"  # padded text: the dense layer rebuilds each rank's mask here
    # the sparse ring moves fewer keys than an all-gather ring: radial's rank 0 (frames 0-3) needs none
    ring = results["wan-radial-u1r2"]
    assert ring[0]["parallel"][-1]["keys_moved"] < ring[0]["parallel"][-1]["keys_all_gather"]


def test_four_processes_equal_one(tmp_path):
    _check(_results(4, WORLD4, tmp_path))


def test_failing_rank_raises_everywhere(tmp_path):
    """Rank 1 raises in its second attention call; every rank ends with an error (gloo's peer
    closes its connection; the worker's process group has a timeout), none hangs."""
    start = time.monotonic()
    runs = _launch(2, ["fail"], tmp_path, timeout=120)
    assert all(run.returncode != 0 for run in runs), [run.stdout[-2000:] for run in runs]
    assert "injected failure on rank 1" in runs[1].stdout
    assert "Error" in runs[0].stdout
    assert time.monotonic() - start < 120


# -- single-process pieces ---------------------------------------------------------------------

def _radial(layout, **options):
    method = Radial.from_options("wan2.1", dense_steps=0, dense_layers=0, block_size=16, **options)
    return method.describe(layout, "cpu")


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("text", [0, 6])
def test_ring_plan_covers_every_needed_key(world, text):
    """Every key a rank's query rows attend (token mask of the full description) is local or
    received; nothing else is received; the placeholder rows never reach beyond the video."""
    layout = TokenLayout(6, 4, 8, text * world, "after" if text else "none")
    sparsity = _radial(layout, decay=0.3)
    members = [parallel.positions(layout, world, r, "cpu") for r in range(world)]
    token = expand_block_mask(sparsity.mask.any(0), layout.seq_len, layout.seq_len, sparsity.block_m, sparsity.block_n)
    for me in range(world):
        plan = parallel.ring_plan(sparsity, layout, members, me)
        have = torch.zeros(layout.seq_len, dtype=torch.bool)
        have[torch.cat([plan.mine, *plan.recv])] = True
        glob = parallel.global_rows(sparsity, "cpu")
        assert bool(glob[layout.video_tokens:].all()) and not bool(glob[: layout.video_tokens - 16].any())  # text rows
        main = plan.mine[~glob[plan.mine]]  # the rest come from every rank's part, merged
        assert torch.equal(plan.mine[plan.glob], plan.mine[glob[plan.mine]])
        rows_blocks = torch.zeros(sparsity.mask.shape[1], dtype=torch.bool)
        rows_blocks[main // sparsity.block_m] = True
        needed = token[rows_blocks.repeat_interleave(sparsity.block_m)[: layout.seq_len]].any(0)
        assert bool(have[needed].all())
        assert int(have.sum()) == int((needed | torch.isin(torch.arange(layout.seq_len), plan.mine)).sum())
        if text:  # the text rows no longer pull every key: the ring moves less than an all-gather
            assert plan.tokens_moved < plan.tokens_dense or world == 2
        assert plan.tokens_moved == sum(int(r.numel()) for r in plan.recv)
        # sends mirror receives: what rank j gets from me is what I send to j
        other = [parallel.ring_plan(sparsity, layout, members, j) for j in range(world)]
        for j in range(world):
            if j != me:
                assert torch.equal(plan.mine[plan.send[j]], other[j].recv[me])
        rows = plan.rows
        assert bool((rows.mask[:, rows_blocks] == sparsity.mask[:, rows_blocks]).all())


@pytest.mark.parametrize("masked", [False, True])
def test_partial_attention_merges_to_dense_with_gradients(masked):
    """Attention by parts over disjoint key sets, merged by lse, equals dense SDPA: output and the
    gradients of q, k and v (the merge weights carry gradient into each part's lse)."""
    from diffattn.kernels.partial import merge_parts, partial_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (5, 23, 23))
    valid = torch.ones(2, 23, dtype=torch.bool)
    if masked:
        valid[1, 15:] = False
        valid[0, :7] = False  # the first part of sample 0 has no valid key: lse -inf there
    weights = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)

    def by_parts(q, k, v):
        cuts = [(0, 7), (7, 16), (16, 23)]
        parts = [partial_attention(q, k[:, :, a:b], v[:, :, a:b], valid[:, a:b]) for a, b in cuts]
        return merge_parts(torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts]))

    def dense(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])

    results = []
    for fn in (by_parts, dense):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * weights).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a.to(b.dtype), b, atol=1e-10, rtol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_global_rows_kernel_matches_the_torch_parts_gpu():
    """On CUDA a ring's global rows run the block-sparse kernel (every block listed, padded keys
    by count) with its lse gradient; it equals the plain-torch parts, output, lse and gradients."""
    from diffattn.kernels import block_sparse
    from diffattn.kernels.partial import partial_attention
    from diffattn.patterns.blocks import dense

    g = torch.Generator("cuda").manual_seed(0)
    probe = torch.zeros(1, 4, 300, 128, device="cuda", dtype=torch.bfloat16)
    assert block_sparse.can_run(probe, dense(300, 5000, block_m=64, block_n=64).to("cuda"))[0]  # the kernel path runs
    q, k, v = (torch.randn(2, 4, n, 128, device="cuda", generator=g) for n in (300, 5000, 5000))
    valid = torch.ones(2, 5000, dtype=torch.bool, device="cuda")
    valid[1, 4000:] = False
    do, dl = torch.randn(2, 4, 300, 128, device="cuda", generator=g), torch.randn(2, 4, 300, device="cuda", generator=g)
    results = []
    for fn, dtype in ((parallel.part_attention, torch.bfloat16), (partial_attention, torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, valid)
        grads = torch.autograd.grad((out, lse), leaves, (do, dl))
        results.append([out.float(), lse.float(), *(t.float() for t in grads)])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 2e-2, (name, err)  # bf16 kernel vs fp32 torch


def test_positions_and_split_errors():
    layout = TokenLayout(4, 2, 2, 4, "after")  # 16 video + 4 text
    pos = [parallel.positions(layout, 2, r, "cpu").tolist() for r in range(2)]
    assert pos == [list(range(0, 8)) + [16, 17], list(range(8, 16)) + [18, 19]]
    flux = TokenLayout(1, 4, 4, 4, "before")
    assert parallel.positions(flux, 2, 1, "cpu").tolist() == [2, 3] + list(range(12, 20))
    with pytest.raises(ValueError, match="must divide by 3"):
        parallel.check_split(layout, 3, 6, "radial")
    with pytest.raises(NotImplementedError, match="equal slices"):
        parallel.check_config(SimpleNamespace(ulysses_anything=True, ring_anything=False), "radial")


def test_traffic_counts_bytes():
    layout = TokenLayout(16, 8, 8)
    sparsity = _radial(layout, decay=0.2)
    row = parallel.traffic(sparsity, layout, 4, heads=2, head_dim=8)
    per_token = 2 * 2 * 8 * 2
    assert row["dense_bytes"] == (layout.seq_len - layout.seq_len // 4) * per_token
    assert 0 <= row["sparse_bytes_mean"] <= row["sparse_bytes_max"] <= row["dense_bytes"]
    assert 0.0 < row["saved"] < 1.0  # far frames need only the sink and thin bands


def test_cp_plans_and_refusals():
    from diffattn_testbed.tiny import tiny_hunyuan_transformer, tiny_mochi_transformer, tiny_wan_transformer

    wan = tiny_wan_transformer()
    assert diffattn.cp_plan(wan) is type(wan)._cp_plan
    hunyuan = tiny_hunyuan_transformer()
    plan = diffattn.cp_plan(hunyuan)
    assert set(plan) == {"rope", "x_embedder", "context_embedder", "proj_out"}
    with pytest.raises(NotImplementedError, match="per-sample loop"):
        diffattn.cp_plan(tiny_mochi_transformer())
    with pytest.raises(RuntimeError, match="call diffattn.apply"):
        diffattn.enable_parallelism(hunyuan, object())  # before apply: refused before diffusers is called


def test_remove_hands_parallel_config_to_the_stock_processors():
    """enable_parallelism after apply sets the config on diffattn's processors; remove() gives it
    to the restored stock ones, so the model stays context-parallel."""
    from diffattn_testbed.tiny import tiny_wan_transformer

    model = tiny_wan_transformer()
    handle = diffattn.apply(model, "radial")
    marker = SimpleNamespace(context_parallel_config=None)
    for proc in model.attn_processors.values():
        proc._parallel_config = marker  # what enable_parallelism does to every processor
    handle.remove()
    swapped = [p for key, p in model.attn_processors.items() if ".attn1." in key]  # the ones diffattn replaced
    assert swapped and all(p._parallel_config is marker for p in swapped)


# -- the trainer under torchrun / accelerate ----------------------------------------------------

TRAIN_WORKER = Path(__file__).with_name("train_worker.py")


def _torchrun(world: int, out: Path, context_parallel: str, *extra: str, code: int = 0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                          str(TRAIN_WORKER), str(out), context_parallel, *extra], capture_output=True, text=True, env=env, timeout=600)
    assert (run.returncode == 0) == (code == 0), run.stdout[-3000:] + run.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    sys.path.insert(0, str(TRAIN_WORKER.parent))
    from train_worker import clips, config

    from diffattn.lora import length
    from diffattn_testbed.pipelines import load_pipeline

    out = tmp_path_factory.mktemp("one")
    length.train(config(out), pipe=load_pipeline("video"), clips=clips)
    return out


def test_sequence_parallel_training_equals_one_process(single_process_run, tmp_path):
    """Two processes share each batch, each holding half of every clip's tokens (radial forward and
    backward on the sparse ring; Ulysses training: the groups test below): the loss of every step
    is the single-process run's, and so is the LoRA (up to Adam's amplification of fp32 rounding
    in near-zero gradients)."""
    from safetensors.torch import load_file

    _torchrun(2, tmp_path, "ring=2")
    assert _losses(tmp_path) == pytest.approx(_losses(single_process_run), rel=1e-5)
    a = load_file(str(single_process_run / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=5e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(2, out, "")
    return out


def test_data_parallel_training_runs_on_two_processes(data_parallel_run, tmp_path):
    """Plain DDP (accelerate's gloo group on CPU): both processes train, the checkpoint records two
    processes, and a one-process rerun of the same folder is refused rather than mixed up."""
    state = json.loads(sorted((data_parallel_run / "checkpoints").glob("step_*"))[-1].joinpath("state.json").read_text())
    assert state["processes"] == 2 and state["step"] == 4
    assert len(_losses(data_parallel_run)) == 4 and (data_parallel_run / "pytorch_lora_weights.safetensors").is_file()
    import shutil

    shutil.copytree(data_parallel_run, tmp_path, dirs_exist_ok=True)  # the same run, moved to another folder
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "out": str(tmp_path)}))
    sys.path.insert(0, str(TRAIN_WORKER.parent))
    from train_worker import clips, config

    from diffattn.lora import length
    from diffattn_testbed.pipelines import load_pipeline

    with pytest.raises(ValueError, match="2 processes"):
        length.train(config(tmp_path, steps=6), pipe=load_pipeline("video"), clips=clips)


def test_sequence_parallel_groups_are_data_parallel(data_parallel_run, tmp_path):
    """Four processes in two Ulysses groups of two (the 3-D mesh dp x ring x ulysses): each group
    trains on what one process of the two-process DDP run trains on, so the losses and the LoRA
    are that run's (the loss scale by the group size makes DDP's average the batches' average)."""
    from safetensors.torch import load_file

    _torchrun(4, tmp_path, "ulysses=2")
    assert _losses(tmp_path) == pytest.approx(_losses(data_parallel_run), rel=1e-5)
    a = load_file(str(data_parallel_run / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=5e-4, rtol=1e-3)


def test_fsdp_training_equals_ddp_and_resumes_after_a_kill(data_parallel_run, tmp_path):
    """FSDP over two processes (torch's fully_shard per block: each process holds half of the frozen
    base and of the LoRA): killed after step 3, the same command resumes from the step-2 checkpoint
    (gathered whole, so it is the plain format), and the losses and the exported LoRA are the DDP
    run's; the LoRA's metadata names the model's own class, not FSDP's subclass."""
    from safetensors.torch import load_file

    _torchrun(2, tmp_path, "", "fsdp", "3", code=3)
    assert (tmp_path / "killed.0").is_file() and (tmp_path / "killed.1").is_file()  # both stopped by the kill, no crash
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]
    _torchrun(2, tmp_path, "", "fsdp")
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3, 4]
    want = _losses(data_parallel_run)
    assert [line["loss"] for line in lines if line is not lines[2]] == pytest.approx(want, rel=1e-5)
    a = load_file(str(data_parallel_run / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=5e-4, rtol=1e-3)
    assert json.loads((tmp_path / "diffattn.json").read_text())["base"]["class"] == "WanTransformer3DModel"
    sys.path.insert(0, str(TRAIN_WORKER.parent))
    from train_worker import clips, config

    from diffattn.lora import length
    from diffattn_testbed.pipelines import load_pipeline

    with pytest.raises(ValueError, match="fsdp shards the transformer in place.*consume=True"):
        length.train(config(tmp_path / "x", fsdp=True), pipe=load_pipeline("video"), clips=clips)
    with pytest.raises(ValueError, match="this run has one: launch it with accelerate launch --num_processes N"):
        length.train(config(tmp_path / "y", fsdp=True), pipe=load_pipeline("video"), clips=clips, consume=True)
    with pytest.raises(ValueError, match="bf16 or no, not fp16"):  # in the config, before anything loads
        config(tmp_path / "z", fsdp=True, mixed_precision="fp16")


def test_fsdp_with_ulysses_equals_one_process(single_process_run, tmp_path):
    """Sharded and sequence parallel at once (FSDP over both processes, Ulysses over the same two):
    the single-process run's losses and LoRA."""
    from safetensors.torch import load_file

    _torchrun(2, tmp_path, "ulysses=2", "fsdp")
    assert _losses(tmp_path) == pytest.approx(_losses(single_process_run), rel=1e-5)
    a = load_file(str(single_process_run / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=5e-4, rtol=1e-3)


DISTILL_WORKER = Path(__file__).with_name("distill_worker.py")


@pytest.mark.parametrize("full,precision", [(True, "no"), (False, "bf16")])  # (CI time: fp32 LoRA is the length trainer's test)
def test_clear_distillation_under_fsdp_equals_ddp(tmp_path, full, precision):
    """The CLEAR distillation trainer on two processes, DDP against FSDP (the student sharded; a
    full fine-tune's teacher copy too): in fp32 the same losses at every step and the same exported
    weights. In bf16 (FSDP casts the LoRA to bf16 where DDP's autocast does not) close, and the
    LoRA teacher's adapter switch leaves FSDP's fp32 gradient reduction in place (it raised before)."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for mode in ("ddp", "fsdp"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DISTILL_WORKER),
                              str(tmp_path / mode), mode, "full" if full else "lora", precision],
                             capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    exact = precision == "no"
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "ddp"), rel=1e-5 if exact else 2e-2)
    name = "full_weights.safetensors" if full else "pytorch_lora_weights.safetensors"
    a, b = load_file(str(tmp_path / "ddp" / name)), load_file(str(tmp_path / "fsdp" / name))
    assert a.keys() == b.keys() and a
    for key in a:
        assert b[key].dtype == a[key].dtype
        if exact:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_fsdp_refuses_mixed_dtypes_without_mixed_precision():
    from diffattn.lora.common import shard_model

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(ValueError, match="one dtype.*--mixed-precision bf16"):
        shard_model(model, None, "no", "length")
    with pytest.raises(ValueError, match="bf16 or no, not fp16"):
        shard_model(model, None, "fp16", "length")


def test_context_parallel_option_is_checked():
    sys.path.insert(0, str(TRAIN_WORKER.parent))
    from train_worker import config

    with pytest.raises(ValueError, match="ulysses=N"):
        config("unused", "ulysses=two")
    with pytest.raises(ValueError, match="ulysses=N"):
        config("unused", "tensor=2")


def test_cli_generate_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 diffattn generate --context-parallel ring=2`` on the testbed
    video pipeline writes the clips a single process writes (decoded frames within one level)."""
    import imageio.v3 as iio

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = ["generate", "--device", "cpu", "--steps", "2", "--dense-steps", "1", "--seed", "3"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "diffattn.app.cli", *common, "--context-parallel", "ring=2", "--out", str(tmp_path / "cp.mp4")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)  # not the root: kernels/ shadows HF's
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "context parallel ring=2 over 2 processes: {'mode': 'ring'" in run.stdout
    one = subprocess.run([sys.executable, "-m", "diffattn.app.cli", *common, "--out", str(tmp_path / "one.mp4")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    for name in ("", "_dense"):
        a = iio.imread(tmp_path / f"cp{name}.mp4").astype(int)
        b = iio.imread(tmp_path / f"one{name}.mp4").astype(int)
        assert a.shape == b.shape and int(abs(a - b).max()) <= 1, name


def test_cli_context_parallel_errors_say_what_to_do(capsys):
    from diffattn.app import cli

    with pytest.raises(SystemExit, match="needs 2 processes, this run has 1; launch with torchrun --nproc_per_node 2"):
        cli.generate(cli._parse(["generate", "--device", "cpu", "--context-parallel", "ulysses=2"]))
    with pytest.raises(SystemExit, match="ulysses=N"):
        cli.generate(cli._parse(["generate", "--device", "cpu", "--context-parallel", "heads=2"]))
