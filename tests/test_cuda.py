"""The CUDA paths on a real GPU.

    python -m pytest -q -m cuda tests/          # on a CUDA machine: what gpu_check runs first
    python -m pytest -q tests/test_cuda.py      # anywhere: without a GPU every test skips, saying why

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

import model as model_lib
import train
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config
from model import GPT, GPTConfig
from runtime import Dist, autocast, make_scaler, pick_dtype

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
    return train.train_step(model, opt, scaler, batches, autocast(torch.device("cuda"), dtype), 1.0, Dist(),
                            torch.device("cuda"))


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
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cuda")
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
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cuda")
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
    opt = model.configure_optimizers(1.0, 1e-3, (0.9, 0.95), "cuda")
    ref_opt = ref.configure_optimizers(1.0, 1e-3, (0.9, 0.95), "cuda", fused=False)
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
    real = model_lib.KVCache
    monkeypatch.setattr(model_lib, "KVCache", lambda *a: made.append(real(*a)) or made[-1])
    model = tiny()
    prompt = torch.randint(0, CFG["vocab_size"], (4, 3), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(5))
    new = CFG["block_size"] - 3  # the whole block: the cache is used for every token
    with torch.inference_mode(), autocast(cuda, dtype):
        cached = model.generate(prompt, new, temperature=0)
        full = model.generate(prompt, new, temperature=0, use_cache=False)
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
from runtime import Dist, autocast, make_scaler, shard_model

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
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
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

