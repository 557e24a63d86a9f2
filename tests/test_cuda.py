"""The CUDA paths on a real GPU, and the CPU side of benchmarks/gpu_check.py.

    python -m pytest -q -m cuda tests/          # on a CUDA machine: what gpu_check runs first
    python -m pytest -q tests/test_cuda.py      # anywhere: the GPU tests skip, gpu_check's own tests run

Tests marked `cuda` skip, saying why, where torch.cuda.is_available() is False; their CPU
counterparts (monkeypatched torch.cuda queries) live in tests/test_runtime.py. They cover what a
first GPU run could spoil without a crash: bf16 and fp16 + GradScaler steps through train.train_step,
the fused AdamW, the dtype chosen for this card, cached against uncached generation under autocast,
an exact resume, and DDP / FSDP set up over NCCL in one process.
"""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from homegpt import generate as generation
from homegpt.optimizers import configure_optimizers
import model as model_lib
import train
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config
from model import GPT, GPTConfig
from homegpt.runtime import Dist, autocast, make_scaler, pick_dtype

HAS_CUDA = torch.cuda.is_available()


def gpu(test):
    """Marks a test as needing CUDA: selected by -m cuda, skipped with the reason without a GPU."""
    test = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")(test)
    return pytest.mark.cuda(test)


CFG = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128, dropout=0.0)  # head size 32


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG)).to("cuda")


def batch(b=4, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(0, CFG["vocab_size"], (b, CFG["block_size"]), device="cuda", generator=g)
    y = torch.randint(0, CFG["vocab_size"], (b, CFG["block_size"]), device="cuda", generator=g)
    return x, y


def native_bf16():
    return bool(torch.version.hip) or torch.cuda.get_device_capability()[0] >= 8


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def step(model, opt, scaler, dtype, batches):
    """(loss, grad norm, stepped) of one train_step on the GPU."""
    s = train.train_step(model, opt, scaler, batches, autocast(torch.device("cuda"), dtype), 1.0, Dist(),
                         torch.device("cuda"))
    return s.loss, s.norm, s.stepped


# ----------------------------------------------------------------------------- precision

@gpu
def test_auto_dtype_agrees_with_the_compute_capability():
    cuda = torch.device("cuda")
    dtype = pick_dtype("auto", cuda)
    assert dtype == (torch.bfloat16 if native_bf16() else torch.float16), torch.cuda.get_device_name()
    assert make_scaler(cuda, dtype).is_enabled() == (dtype == torch.float16)
    if not native_bf16():  # an explicit bfloat16 falls back, as on a T4 or V100
        assert pick_dtype("bfloat16", cuda) == torch.float16


@gpu
def test_bf16_training_steps_learn_and_change_every_weight():
    if not native_bf16():
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bfloat16 (compute capability < 8.0)")
    model = tiny()
    opt = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), "cuda")
    scaler = make_scaler(torch.device("cuda"), torch.bfloat16)
    assert not scaler.is_enabled()  # bf16 has float32's range: no scaling
    before, x_y = snapshot(model), batch()
    losses = []
    for _ in range(5):
        loss, norm, stepped = step(model, opt, scaler, torch.bfloat16, [x_y])
        assert stepped and torch.isfinite(loss) and torch.isfinite(norm)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses  # the same batch five times: it must start to fit it
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed), [n for (n, _), c in zip(model.named_parameters(), changed) if not c]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32 under autocast


@gpu
def test_fp16_with_grad_scaler_steps_and_skips_a_step_whose_gradients_overflow():
    cuda = torch.device("cuda")
    model = tiny()
    opt = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), "cuda")
    scaler = make_scaler(cuda, torch.float16)
    assert scaler.is_enabled()
    x_y = batch()
    before = snapshot(model)
    loss, _, _ = step(model, opt, scaler, torch.float16, [x_y])
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a real step
    # an overflow in one gradient, as fp16 produces: the scaler must skip the whole step and back off
    before, scale = snapshot(model), scaler.get_scale()
    hook = model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss, norm, _ = step(model, opt, scaler, torch.float16, [x_y])
    hook.remove()
    assert torch.isfinite(loss) and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a step with inf gradients ran"
    assert scaler.get_scale() == scale * 0.5  # GradScaler's backoff_factor
    step(model, opt, scaler, torch.float16, [x_y])  # and the next good step goes through
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@gpu
def test_fused_adamw_on_cuda_matches_the_foreach_kernel():
    model = tiny()
    ref = copy.deepcopy(model)
    # weight decay 1.0 so that a kernel which dropped it would be visibly off (lr * wd * |w| ~ 2e-5 a step)
    opt = configure_optimizers(model, 1.0, 1e-3, (0.9, 0.95), "cuda")
    ref_opt = configure_optimizers(ref, 1.0, 1e-3, (0.9, 0.95), "cuda", fused=False)
    assert all(g["fused"] for g in opt.param_groups) and not any(g["fused"] for g in ref_opt.param_groups)
    scaler = make_scaler(torch.device("cuda"), torch.float32)
    for i in range(3):
        x_y = batch(seed=i)
        a, _, _ = step(model, opt, scaler, torch.float32, [x_y])
        b, _, _ = step(ref, ref_opt, scaler, torch.float32, [x_y])
        assert abs(a.item() - b.item()) < 1e-5, (i, a.item(), b.item())
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        # the same float32 arithmetic in another order: ~1e-6 after 3 steps (1.2e-6 measured with the
        # CPU's fused kernel), where tiny gradients meet Adam's eps. Bias correction or weight decay
        # gone wrong would be off by 6e-5 to 5e-4.
        assert torch.allclose(p, q, atol=1e-5, rtol=0), (n, (p - q).abs().max().item())


# ----------------------------------------------------------------------------- generation

# Tolerance of cached against uncached generation under bf16/fp16 autocast. The two paths round
# differently (a one-query attention kernel against the full causal one; bf16 keeps 8 significant
# bits), so where the model's two best tokens are nearly tied either may win. Greedy tokens must be
# identical up to the first position whose top-two logits (uncached) are within NEAR_TIE of each
# other; from there on the two continuations may legitimately differ. A broken cache (a wrong
# position, a stale key) changes logits by their whole spread (~0.1-0.5 here), far above this.
NEAR_TIE = 0.02


@gpu
def test_cached_generation_agrees_with_uncached_under_autocast(monkeypatch):
    cuda = torch.device("cuda")
    dtype = pick_dtype("auto", cuda)  # bf16 where native, else fp16
    made = []
    real = generation.KVCache
    monkeypatch.setattr(generation, "KVCache", lambda *a: made.append(real(*a)) or made[-1])
    model = tiny()
    prompt = torch.randint(0, CFG["vocab_size"], (4, 3), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(5))
    new = CFG["block_size"] - 3  # the whole block: the cache is used for every token
    with torch.inference_mode(), autocast(cuda, dtype):
        cached = generation.generate(model, prompt, new, temperature=0)
        full = generation.generate(model, prompt, new, temperature=0, use_cache=False)
        assert made and made[0].k.dtype == dtype and made[0].v.dtype == dtype  # autocast's dtype, not float32
        for row in range(prompt.size(0)):
            differ = (cached[row] != full[row]).nonzero()
            if len(differ) == 0:
                continue
            t = differ[0].item()
            logits = model(full[:, :t])[0][row, -1].float()  # the step at which the uncached run chose
            gap = (logits[full[row, t]] - logits[cached[row, t]]).item()
            assert abs(gap) <= NEAR_TIE, (f"row {row}: cached and uncached part at token {t - 3} where the "
                                          f"logits differ by {gap:.4f} > {NEAR_TIE}: not a rounding tie")


# ----------------------------------------------------------------------------- resume

@gpu
def test_a_resumed_gpu_run_continues_exactly(tmp_path):
    data = char_dataset(tmp_path / "data", 50_000)
    common = dict(device="cuda", dtype="float32", max_iters=8, lr_decay_iters=8, warmup_iters=2, eval_interval=4,
                  eval_iters=2, n_embd=64)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(tiny_train_config(data, straight, **common))
    train.main(tiny_train_config(data, split, **(common | {"max_iters": 4})))
    train.main(tiny_train_config(data, split, **(common | {"init_from": "resume"})))
    after = lambda d: [(m["iter"], k, m[k]) for m in read_metrics(d) if m["iter"] > 4
                       for k in ("train_loss", "val_loss") if k in m]
    a, b = after(straight), after(split)
    assert [x[:2] for x in a] == [x[:2] for x in b] == [(5, "train_loss"), (6, "train_loss"), (7, "train_loss"),
                                                        (8, "train_loss"), (8, "val_loss")], (a, b)
    # float32 (TF32 matmuls, the same in both runs); what remains is the order of atomic additions in
    # CUDA backward kernels, ~1e-6 after a few steps. A resume that lost the optimizer state, RNG or
    # data position would be off by 1e-2 or more.
    assert all(abs(x[2] - y[2]) < 1e-4 for x, y in zip(a, b)), (a, b)


# ----------------------------------------------------------------------------- DDP / FSDP on one rank

ONE_RANK = r"""
import json, os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import train
from model import GPT, GPTConfig
from homegpt.runtime import Dist, autocast, make_scaler, shard_model

device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(device)
dist.init_process_group("nccl", device_id=device)  # rank, world size, address and port from the environment
cfg = GPTConfig(**{cfg!r})
g = torch.Generator(device=device).manual_seed(1)
batches = [tuple(torch.randint(0, cfg.vocab_size, (4, cfg.block_size), device=device, generator=g) for _ in "xy")
           for _ in range(2)]  # two micro-steps: DDP syncs gradients on the last one only


def run(wrap):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    runner = wrap(model)  # FSDP shards in place, before the optimizer sees the parameters
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cuda")
    scaler = make_scaler(device, torch.float32)
    losses = [train.train_step(runner, opt, scaler, batches, autocast(device, torch.float32), 1.0, Dist(), device)[0].item()
              for _ in range(3)]
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
    return losses, {{n: full(p).detach().cpu() for n, p in model.named_parameters()}}, model


plain, w_plain, _ = run(lambda m: m)
ddp, w_ddp, _ = run(lambda m: DDP(m, device_ids=[device.index]))
fsdp, w_fsdp, m_fsdp = run(shard_model)
diff = lambda a, b: max((a[n] - b[n]).abs().max().item() for n in a)
print(json.dumps({{"backend": dist.get_backend(), "world_size": dist.get_world_size(), "plain": plain, "ddp": ddp,
                  "fsdp": fsdp, "ddp_weights": diff(w_plain, w_ddp), "fsdp_weights": diff(w_plain, w_fsdp),
                  "fsdp_tied": m_fsdp.lm_head.weight is m_fsdp.transformer.wte.weight}}))
dist.destroy_process_group()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@gpu
def test_ddp_and_fsdp_over_nccl_on_one_rank_match_one_process(tmp_path):
    script = tmp_path / "one_rank.py"
    script.write_text(ONE_RANK.format(root=str(ROOT), cfg=CFG))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0")
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["backend"] == "nccl" and res["world_size"] == 1
    # float32 throughout (no setup_backends here, so no TF32): one rank computes what one process
    # does, up to the order of atomic additions; 3 steps at lr 1e-3 move weights by ~3e-3
    for name in ("ddp", "fsdp"):
        assert all(abs(a - b) < 1e-4 for a, b in zip(res[name], res["plain"])), (name, res)
        assert res[f"{name}_weights"] < 1e-4, (name, res)
    assert res["fsdp_tied"]


# ----------------------------------------------------------------------------- benchmarks/gpu_check.py, on the CPU

@pytest.fixture
def gpu_check(monkeypatch):
    """benchmarks/gpu_check.py imported as `python benchmarks/gpu_check.py` sees its neighbours."""
    import importlib
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def test_gpu_check_without_cuda_stops_with_one_line(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(gpu_check.GpuCheckConfig(out_file=str(tmp_path / "gpu_check.json")))
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message  # SystemExit(str): exit status 1, no traceback
    assert message.startswith("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); ")
    assert capsys.readouterr().out == "" and not (tmp_path / "gpu_check.json").exists()


def test_gpu_check_command_without_cuda_exits_1_without_a_traceback(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides any GPU: is_available() is False
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--parts=tests"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: needs a CUDA GPU"), r.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_check_config_errors_come_together(gpu_check):
    with pytest.raises(ValueError) as e:
        gpu_check.check_config(gpu_check.GpuCheckConfig(parts="tests,bench", steps=0, warmup=0, device="cpu"))
    for expected in ("parts='tests,bench'", "steps must be positive", "warmup=0", "device='cpu'"):
        assert expected in str(e.value)
    assert gpu_check.check_config(gpu_check.GpuCheckConfig(parts="sampling, gpt2,gpt2")) == ["gpt2", "sampling"]


@pytest.mark.parametrize("line, counts", [
    ("9 passed, 612 deselected in 61.20s (0:01:01)", dict(passed=9, deselected=612)),
    ("2 failed, 6 passed, 1 skipped, 612 deselected, 3 warnings in 80.01s", dict(passed=6, failed=2, skipped=1,
                                                                               deselected=612)),
    ("1 error in 3.00s", dict(errors=1)),
    ("612 deselected in 2.00s", dict(deselected=612)),
])
def test_pytest_summary_is_counted(gpu_check, line, counts):
    out = f"..F.\nFAILED tests/test_cuda.py::test_x - assert 1 passed\n{line}\n"
    expected = dict(passed=0, failed=0, skipped=0, errors=0, deselected=0) | counts
    assert gpu_check.parse_pytest_summary(out) == expected


def test_the_chinchilla_eta_is_its_configs_arithmetic(gpu_check):
    import configurator
    tcfg = configurator.parse_config(train.TrainConfig, [str(ROOT / "config" / "train_gpt2_chinchilla.py")])
    eta = gpu_check.run_eta(tcfg, 20_000, eval_tokens_per_sec=100_000)
    # the config's own comment: 80 accum x 6 batch x 1024 = 491,520 tokens/iter, 6,632 iters at ~20k
    # tokens/s (an RTX 3090) = 163,000 s ~ 45 h
    assert eta["tokens_per_iter"] == 491_520
    assert eta["train_s"] == pytest.approx(6632 * 491_520 / 20_000) and round(eta["train_s"] / 3600) == 45
    # evaluations at 0, 75, ..., 6,600 and the last iteration 6,632: 90 of 200 x 6 x 1024 tokens
    assert eta["n_evals"] == 90
    assert eta["eval_s"] == pytest.approx(90 * 200 * 6 * 1024 / 100_000)
    assert gpu_check.run_eta(tcfg, 20_000)["eval_s"] is None


def test_the_parts_run_on_a_cpu_and_fill_the_table(gpu_check, monkeypatch, tmp_path):
    """The glue of gpu_check (config file -> bench.run_row rows, the batch search, the ETA, sampling,
    the table and the failure rule) on a tiny model, since no GPU is at hand where the suite runs."""
    tiny_cfg = tmp_path / "tiny.py"
    tiny_cfg.write_text("n_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\nvocab_size = 64\nbatch_size = 2\n"
                        "gradient_accumulation_steps = 4\nmax_iters = 100\neval_interval = 50\neval_iters = 2\n")
    monkeypatch.setattr(gpu_check, "MODELS", {"gpt2": (str(tiny_cfg), "tiny"), "chinchilla": (str(tiny_cfg), "tiny")})
    cfg = gpu_check.GpuCheckConfig(compile=False, warmup=1, steps=1, max_batch=4, sample_tokens=4)
    cpu = torch.device("cpu")
    model = gpu_check.run_model(cfg, "gpt2", cpu, torch.float32, 1e11)
    assert [r["status"] for r in model["rows"]] == ["ok"]
    assert model["max_batch"] == 4 and model["max_batch_note"] == " or more (max_batch=4)"
    assert [r["batch_size"] for r in model["search"]] == [1, 2, 4]
    assert model["eta"]["tokens_per_iter"] == 4 * 2 * 16 and model["eta"]["n_evals"] == 3
    sampling = gpu_check.run_sampling(cfg, cpu, torch.float32)
    assert [r["new_tokens"] for r in sampling["rows"]] == [4]
    report = {"gpu": {"name": "Test GPU", "capability": "9.0", "memory_bytes": 80 * 2**30}, "dtype": "float32",
              "peak_flops": {"float32": {"flops": 1e11, "source": "test"}},
              "parts": {"tests": {"status": "failed", "note": "", "counts": dict(passed=8, failed=1)},
                        "gpt2": model, "sampling": sampling}, "elapsed_s": {"tests": 61.0, "gpt2": 3.2}}
    rows = gpu_check.table_rows(report)
    what = {(part, w): result for part, w, result in rows}
    assert what["device", "Test GPU"] == "compute capability 9.0, 80.0 GiB, dtype float32"
    assert what["tests", "pytest -q -m cuda tests/"] == "failed: 8 passed, 1 failed"
    assert what["gpt2", "tiny float32 eager, batch 2"].endswith(" GiB)") and "ms/step" in what["gpt2", "tiny float32 eager, batch 2"]
    assert what["gpt2", "largest micro-batch (eager)"].startswith("4 or more (max_batch=4), peak ")
    eta = what["gpt2", f"{tiny_cfg} on this GPU"]
    assert eta.startswith("100 iters x 128 tokens at ") and " tok/s (eager): " in eta and eta.endswith("3 evaluations")
    assert what["sampling", "KV cache, batch 1, float32 (TF32 matmuls)"].endswith("tok/s (4 new tokens)")
    assert what["time", "tests"] == "61 s" and what["time", "gpt2"] == "3 s"
    table = gpu_check.format_table([("a", "bb", "x"), ("ccc", "d", "y")]).splitlines()
    assert table == ["part  what  result", "----  ----  ------", "a     bb    x", "ccc   d     y"]
    assert gpu_check.problems(report) == ["tests: failed"]
    model["rows"][0] |= {"status": "error", "note": "RuntimeError: boom"}
    assert gpu_check.problems(report)[1] == "gpt2: float32 batch 2 compile=False: RuntimeError: boom"


def test_the_plan_part_plans_a_run_then_runs_it(gpu_check, monkeypatch, tmp_path):
    """gpu_check's plan part on the CPU: bench.py --plan, then train.py with the overrides it printed."""
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tests"))
    from helpers import char_dataset
    data = char_dataset(tmp_path / "data", 60_000)
    tiny_cfg = tmp_path / "tiny.py"
    tiny_cfg.write_text(f"data_dir = {str(data)!r}\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\n"
                        "batch_size = 4\ngradient_accumulation_steps = 2\neval_interval = 10\neval_iters = 2\n"
                        "dropout = 0.0\nwarmup_iters = 2\n")
    monkeypatch.setattr(gpu_check, "PLAN_CONFIG", str(tiny_cfg))
    cfg = gpu_check.GpuCheckConfig(plan_iters=20, plan_calibration_s=2.0)
    result = gpu_check.run_plan(cfg, torch.device("cpu"))
    assert result["status"] == "ok", result.get("note")
    assert result["eta_s"] > 0 and result["wall_s"] > 0 and result["overrides"].startswith("--batch_size=")
    assert result["batch_size"] * int(result["overrides"].split("--gradient_accumulation_steps=")[1].split()[0]) == 8
    report = {"gpu": {"name": "Test GPU", "capability": "9.0", "memory_bytes": 80 * 2**30}, "dtype": "float32",
              "peak_flops": {}, "parts": {"plan": result}, "elapsed_s": {}}
    (part, what, res), = [r for r in gpu_check.table_rows(report) if r[0] == "plan"]
    assert what == f"{tiny_cfg}, 20 iters, {result['overrides']}" and res.startswith("ETA ")
    assert f"{result['eta_s'] / result['wall_s']:.2f}x" in res and gpu_check.problems(report) == []


@gpu
def test_the_prepared_parts_rows_cap_and_read_the_allocator(gpu_check):
    """gpu_check's prepared parts (benchmarks/gpu_rows.py) on a real GPU: a row built on the device under
    a memory cap reads its allocated and reserved peaks, and the cap is lifted afterwards."""
    import importlib
    gpu_rows = importlib.import_module("gpu_rows")
    cuda = torch.device("cuda", torch.cuda.current_device())
    tcfg = gpu_rows.recipe("config/train_gpt2.py", dry_run=True)
    dtype = torch.bfloat16 if native_bf16() else torch.float16
    fraction = gpu_rows.cap_memory(cuda, 4.0)
    try:
        row = gpu_rows.train_row("tiny", gpu_rows.builder(tcfg, cuda, 0), tcfg, cuda, dtype, 2, (1, 2), fused=True,
                                 peak_flops=1e12)
    finally:
        gpu_rows.uncap_memory(cuda)
    assert 0 < fraction < 1 and row["status"] == "ok", row["note"]
    assert 0 < row["peak_allocated_bytes"] <= row["peak_reserved_bytes"] <= 4 * 2**30
    assert row["ms_per_step"] > 0 and row["mfu"] > 0 and row["dtype"] == str(dtype).replace("torch.", "")
    big = torch.empty(5 * 2**30, dtype=torch.uint8, device=cuda)  # over the old cap: it was lifted
    del big


@gpu
def test_the_gptj_part_quantises_its_random_base_on_the_gpu(gpu_check):
    """bitsandbytes quantises a weight that moves from the host to the GPU, not one drawn there: the
    gptj part's base must end in int8 on the GPU, or GPT-J's matmuls would stay float32 (22.5 GB)."""
    pytest.importorskip("bitsandbytes")
    import importlib
    gm = importlib.import_module("gpu_memory")
    cuda = torch.device("cuda", torch.cuda.current_device())
    model = gm.random_quantized(gm.gptj_config(gm.GPTJMemoryConfig(**gm.DRY_GPTJ)), cuda, "int8", 0)
    weights = [m.weight for n, m in model.named_modules() if n.endswith(("attn.c_attn", "mlp.c_fc"))]
    assert weights and all(w.dtype == torch.int8 and w.device.type == "cuda" for w in weights)
    assert all(p.device.type == "cuda" for p in model.parameters())
