"""Data-parallel training under torchrun, on this CPU with gloo: DDP and FSDP give the losses of one
process, their checkpoints resume on any world size, only rank 0 speaks.

    python -m pytest -q tests/test_distributed.py

The end-to-end tests launch `python -m torch.distributed.run --standalone --nproc_per_node=2 train.py`
in a subprocess. Two ranks with accumulation 1 each do the same arithmetic as one process with
accumulation 2: with sampling='sequential' rank r reads windows [cursor + r*B, cursor + (r+1)*B),
which is what micro-step r of the single process reads (test_micro_steps_read_what_ranks_read).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from homegpt import weights
from homegpt import checkpoint as ckpt_lib
import train
from homegpt.dataloader import SequentialSampler, TokenData
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config
from homegpt.runtime import Dist, init_distributed
from homegpt.optimizers import configure_optimizers

# float32 throughout; two ranks sum the same numbers in another order, so allow rounding, nothing more
TOL = 1e-5
COMMON = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, dropout=0.0, sampling="sequential",
              gradient_accumulation_steps=2, eval_interval=3, eval_iters=2, warmup_iters=2, lr_decay_iters=6,
              learning_rate=3e-3, min_lr=3e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("data"), 50_000)


def _cli(cfg):
    """--key=value arguments for a TrainConfig."""
    return [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None]


def torchrun(cfg, nproc=2, script="train.py", check=True, timeout=300, **env):
    """Run train.py (or a test script) on nproc gloo ranks; returns the combined output (with
    check=False, also the exit status). env: extra environment variables for the ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)  # two ranks on two cores: don't fight over threads
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script] + _cli(cfg)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if not check:
        return r.returncode, out
    assert r.returncode == 0, out[-4000:]
    return out


def train_losses(out_dir, first=1):
    return {m["iter"]: m["train_loss"] for m in read_metrics(out_dir) if "train_loss" in m and m["iter"] >= first}


def assert_close(a, b):
    assert a.keys() == b.keys() and a, (a, b)
    for k in a:
        assert abs(a[k] - b[k]) <= TOL, (k, a[k], b[k], a, b)


def resume(src, dst, data, max_iters):
    """Copy a run and continue it in this (single) process."""
    shutil.copytree(src, dst)
    train.main(tiny_train_config(data, dst, max_iters=max_iters, init_from="resume", fsdp=False, **COMMON))
    return dst


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Reference runs shared by the tests: one process to 6 and to 10 iterations, two DDP ranks to 6."""
    base = tmp_path_factory.mktemp("runs")
    one6, one10, ddp6 = base / "one6", base / "one10", base / "ddp6"
    train.main(tiny_train_config(data, one6, max_iters=6, **COMMON))
    train.main(tiny_train_config(data, one10, max_iters=10, **COMMON))
    ddp_out = torchrun(tiny_train_config(data, ddp6, max_iters=6, **COMMON))
    return {"one6": one6, "one10": one10, "ddp6": ddp6, "ddp_out": ddp_out, "base": base}


# ----------------------------------------------------------------------------- fast checks

def test_micro_steps_read_what_ranks_read(data):
    """Micro-step m of one process reads the windows rank m of two reads in the same step."""
    d = TokenData(data, "train")
    one = SequentialSampler(d, 4, 16, seed=1)
    ranks = [SequentialSampler(d, 4, 16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # three optimizer steps of accumulation 2
        for r in range(2):
            x1, y1 = one.next_batch()
            x2, y2 = ranks[r].next_batch()
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert one.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()  # one global cursor


def test_accumulation_must_divide_across_ranks_and_backend_is_checked():
    cfg = tiny_train_config("d", "o", gradient_accumulation_steps=3, backend="mpi")
    with pytest.raises(ValueError) as e:
        train.check_config(cfg, Dist(world_size=2))
    assert "gradient_accumulation_steps=3 is not divisible by the 2 ranks" in str(e.value)
    assert "backend must be 'auto', 'nccl' or 'gloo', got 'mpi'" in str(e.value)
    train.check_config(tiny_train_config("d", "o", gradient_accumulation_steps=4), Dist(world_size=2))


def test_nccl_on_a_cpu_is_refused_before_starting(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="backend='nccl' needs CUDA"):
        init_distributed("cpu", "nccl")
    assert not torch.distributed.is_initialized()


def test_gathered_optimizer_state_is_saved_in_the_same_format(tiny_config):
    """The name-keyed optimizer state that FSDP runs gather becomes the same optimizer.safetensors."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from model import GPT
    torch.manual_seed(0)
    model = GPT(tiny_config)
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 65, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    t1, rest1 = ckpt_lib.optimizer_tensors(model, opt)
    t2, rest2 = ckpt_lib.optimizer_tensors(model, opt, full_osd=get_optimizer_state_dict(model, opt))
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert json.dumps(rest1) == json.dumps(rest2)


# ----------------------------------------------------------------------------- two processes

@pytest.mark.slow
def test_two_ranks_reproduce_one_process_with_accumulation(runs):
    assert_close(train_losses(runs["ddp6"]), train_losses(runs["one6"]))
    vals = lambda d: [m["val_loss"] for m in read_metrics(d) if "val_loss" in m]
    assert np.allclose(vals(runs["ddp6"]), vals(runs["one6"]), atol=TOL, rtol=0)
    out = runs["ddp_out"]
    assert "world_size=2 (DDP over gloo)" in out
    assert "2 accum x 4 batch x 16 block = 128 (1 micro-steps on each of 2 rank(s))" in out
    # only rank 0 evaluates, logs and saves: each event once
    assert out.count("saved checkpoint to") == 2 and out.count("val loss") == 3
    assert [m["iter"] for m in read_metrics(runs["ddp6"])] == [0, 1, 2, 3, 3, 4, 5, 6, 6]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process(runs, data):
    resumed = resume(runs["ddp6"], runs["base"] / "ddp6_then_one", data, 10)
    assert_close(train_losses(resumed, first=7), train_losses(runs["one10"], first=7))
    a, _ = weights.load_model(resumed)
    b, _ = weights.load_model(runs["one10"])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


@pytest.mark.slow
def test_fsdp_matches_ddp_and_checkpoints_move_between_sharded_and_not(runs, data, tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this PyTorch has no FSDP2 fully_shard: {e}")
    fsdp6 = tmp_path / "fsdp6"
    out = torchrun(tiny_train_config(data, fsdp6, max_iters=6, fsdp=True, **COMMON))
    assert "world_size=2 (FSDP over gloo)" in out
    assert_close(train_losses(fsdp6), train_losses(runs["ddp6"]))
    # the gathered checkpoint has the unsharded format: same tensors, same shapes, tie stored once
    _, st_f = ckpt_lib.read_checkpoint(fsdp6)
    _, st_d = ckpt_lib.read_checkpoint(runs["ddp6"])
    assert st_f["optimizer"]["param_groups"] == st_d["optimizer"]["param_groups"]
    fm, _ = weights.load_model(fsdp6)
    dm, _ = weights.load_model(runs["ddp6"])
    assert fm.lm_head.weight is fm.transformer.wte.weight
    for (n, p), q in zip(fm.named_parameters(), dm.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    # sharded -> one process
    resumed = resume(fsdp6, tmp_path / "fsdp6_then_one", data, 10)
    assert_close(train_losses(resumed, first=7), train_losses(runs["one10"], first=7))
    # one process -> sharded: the optimizer state is split across ranks on load
    one_then_fsdp = tmp_path / "one6_then_fsdp"
    shutil.copytree(runs["one6"], one_then_fsdp)
    torchrun(tiny_train_config(data, one_then_fsdp, max_iters=10, init_from="resume", fsdp=True, **COMMON))
    assert_close(train_losses(one_then_fsdp, first=7), train_losses(runs["one10"], first=7))


def test_each_rank_resumes_its_own_data_position():
    state = {"sampler": {"kind": "random", "rng": 0}, "sampler_ranks": [{"kind": "random", "rng": 0},
                                                                        {"kind": "random", "rng": 1}]}
    assert ckpt_lib.rank_sampler_state(state, 1) == {"kind": "random", "rng": 1}
    # more ranks than were saved: a random stream starts afresh rather than duplicate rank 0's
    assert ckpt_lib.rank_sampler_state(state, 2) is None
    seq = {"sampler": {"kind": "sequential", "cursor": 64}, "sampler_ranks": [{"kind": "sequential", "cursor": 64}]}
    # one global cursor: a rank the saved run did not have shares it
    assert ckpt_lib.rank_sampler_state(seq, 3) == seq["sampler"]


@pytest.mark.slow
def test_two_ranks_with_random_windows_resume_exactly(data, tmp_path):
    """Each rank draws its own random windows; a resume must give each its own stream back."""
    common = dict(COMMON, sampling="random", dropout=0.1, eval_interval=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(tiny_train_config(data, straight, max_iters=4, **common))
    torchrun(tiny_train_config(data, split, max_iters=2, **common))
    torchrun(tiny_train_config(data, split, max_iters=4, init_from="resume", **common))
    assert_close(train_losses(split, first=3), train_losses(straight, first=3))


NAN_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {root!r})
import torch, model, train
from configurator import configure
real = model.GPT.forward
calls = {{"n": 0}}
def forward(self, idx, targets=None, **kw):
    logits, loss = real(self, idx, targets, **kw)
    if self.training and targets is not None:
        calls["n"] += 1
        if calls["n"] == 3 and os.environ["RANK"] == "1":  # the third training step, on one rank only
            loss = loss * float("nan")
    return logits, loss
model.GPT.forward = forward
train.main(configure(train.TrainConfig))
"""


@pytest.mark.slow
def test_every_rank_skips_a_step_that_is_non_finite_on_one_rank(data, tmp_path, runs):
    script = tmp_path / "nan_rank1.py"
    script.write_text(NAN_ON_RANK_1.format(root=str(ROOT)))
    out_dir = tmp_path / "nan"
    out = torchrun(tiny_train_config(data, out_dir, max_iters=6, **COMMON), script=str(script))
    assert "iter 2: non-finite loss or gradient" in out
    metrics = [m for m in read_metrics(out_dir) if "train_loss" in m]
    # iteration 3 had no good step to average, so it has no train_loss line
    assert [(m["iter"], m["skipped_steps"]) for m in metrics] == [(1, 0), (2, 0), (4, 1), (5, 1), (6, 1)]
    assert all(np.isfinite(m["train_loss"]) for m in metrics)
    # had rank 1 stepped alone the ranks would differ from here on; they skipped together, so the
    # first two steps are the reference's and the run finished (no rank waited for another forever)
    ref = train_losses(runs["ddp6"])
    assert_close({k: v for k, v in train_losses(out_dir).items() if k <= 2}, {1: ref[1], 2: ref[2]})


RANKS_DISAGREE = """
import os, sys
sys.path.insert(0, {root!r})
from homegpt import evaluation
import train
from configurator import configure
# rank 0 improves at iteration 2 and rank 1 does not: if each rank decided on its own number, rank 0
# would enter save() (a collective) alone and the job would hang
vals = {{"0": iter([3.0, 2.0, 2.5]), "1": iter([2.0, 3.0, 3.5])}}[os.environ["RANK"]]
evaluation.evaluate_loss = lambda *a, **k: {{"loss": next(vals)}}
train.main(configure(train.TrainConfig))
"""


@pytest.mark.slow
def test_fsdp_ranks_take_rank_0s_validation_number_and_the_same_save_decision(data, tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(RANKS_DISAGREE.format(root=str(ROOT)))
    out_dir = tmp_path / "fsdp"
    cfg = tiny_train_config(data, out_dir, max_iters=4, fsdp=True, always_save_checkpoint=False, **COMMON)
    cfg.eval_interval = 2
    torchrun(cfg, script=str(script), timeout=120)  # a hang is a timeout: the test fails
    assert json.loads((out_dir / "best.json").read_text())["iter_num"] == 2
    assert [m["val_loss"] for m in read_metrics(out_dir) if "val_loss" in m] == [3.0, 2.0, 2.5]


COUNT_SYNCS = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch, train
from homegpt import checkpoint
from configurator import configure
syncs, marks = [0], []
for name in ("item", "tolist"):
    real = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, lambda self, _real=real: (syncs.__setitem__(0, syncs[0] + 1), _real(self))[1])
real_step = train.train_step
def train_step(*a, **k):
    marks.append(syncs[0])
    return real_step(*a, **k)
train.train_step = train_step
bucket_view = []
real_wrap = train.wrap_for_training
def wrap_for_training(*a, **k):
    runner = real_wrap(*a, **k)
    bucket_view.append(getattr(runner, "gradient_as_bucket_view", None))
    return runner
train.wrap_for_training = wrap_for_training
hashed = [0]
real_hash = checkpoint.file_sha256
def file_sha256(path):
    hashed[0] += 1
    return real_hash(path)
checkpoint.file_sha256 = file_sha256
if os.environ.get("BLIND_RANK") == os.environ["RANK"]:  # this rank's node cannot see out_dir
    real_read = checkpoint.read_checkpoint
    def read_checkpoint(path, which="latest", verify=True):
        raise FileNotFoundError(f"{{path}}: No such file or directory")
    checkpoint.read_checkpoint = read_checkpoint
train.main(configure(train.TrainConfig))
print("RANK", os.environ["RANK"], json.dumps({{"between_steps": [b - a for a, b in zip(marks, marks[1:])],
                                              "hashed": hashed[0], "bucket_view": bucket_view}}), flush=True)
"""


def _rank_reports(out):
    return {int(l.split()[1]): json.loads(l.split(" ", 2)[2]) for l in out.splitlines() if l.startswith("RANK ")}


@pytest.mark.slow
def test_ddp_steps_sync_once_and_a_resume_is_verified_by_rank_0_alone(data, tmp_path):
    script = tmp_path / "count.py"
    script.write_text(COUNT_SYNCS.format(root=str(ROOT)))
    out_dir = tmp_path / "ddp"
    cfg = tiny_train_config(data, out_dir, max_iters=8, **dict(COMMON, eval_interval=100, log_interval=100))
    reports = _rank_reports(torchrun(cfg, script=str(script)))
    for rank in (0, 1):  # between two train_step calls, the previous step's one sync and nothing else
        assert reports[rank]["between_steps"] == [1] * 7, reports
        assert reports[rank]["bucket_view"] == [True]  # DDP's buckets hold the gradients: no second copy
    cfg.max_iters = 10
    cfg.init_from = "resume"
    reports = _rank_reports(torchrun(cfg, script=str(script)))
    assert reports[0]["hashed"] >= 2 and reports[1]["hashed"] == 0  # rank 1 trusted rank 0's check
    # a rank that cannot see the checkpoint (out_dir not shared between nodes): one clear error, no hang
    cfg.max_iters = 12
    code, out = torchrun(cfg, script=str(script), check=False, timeout=120, BLIND_RANK="1")
    assert code != 0 and "rank(s) [1] cannot read" in out and "filesystem every node shares" in out
