"""Faults injected into torchrun jobs (2 gloo ranks on this CPU), as they happen on long runs: a worker
killed (-9), a worker that stops answering (SIGSTOP), a full disk at a save, SIGTERM, and two "nodes"
on one machine. Every job runs the same command line with auto_resume=True, so torchrun --max-restarts
brings it back; the final weights must equal those of the same job left alone, bit for bit.

    python -m pytest -q tests/test_faults.py
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from homegpt import checkpoint, weights
import train
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config

pytestmark = pytest.mark.slow

COMMON = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, dropout=0.0, sampling="sequential",
              gradient_accumulation_steps=2, eval_interval=3, eval_iters=2, warmup_iters=2, lr_decay_iters=18,
              learning_rate=3e-3, min_lr=3e-4, max_iters=18, auto_resume=True, dist_timeout_s=10)
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks on two cores: no fight over threads


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("data"), 50_000)


def command(data, out, torchrun_args=("--standalone", "--nproc_per_node=2"), script="train.py", **overrides):
    cfg = tiny_train_config(data, out, **(COMMON | overrides))
    return ([sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(script)]
            + [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None])


def launch(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=240):
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def last_iter(out_dir):
    try:
        return max((m["iter"] for m in read_metrics(out_dir) if "train_loss" in m), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def wait_until_iter(p, out_dir, n, timeout=120):
    t0 = time.time()
    while last_iter(out_dir) < n:
        assert p.poll() is None and time.time() - t0 < timeout, "the job ended before the fault"
        time.sleep(0.05)


def worker(p, local_rank):
    """The pid of torchrun's worker of this local rank (a child of the torchrun process)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                environ = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if parent == p.pid and f"LOCAL_RANK={local_rank}".encode() in environ:
                return int(d)
    raise AssertionError(f"no worker of local rank {local_rank}")


def same_weights(a, b):
    x, _ = weights.load_model(a, which="latest")
    y, _ = weights.load_model(b, which="latest")
    return all(torch.equal(u, v) for u, v in zip(x.state_dict().values(), y.state_dict().values()))


def every_checkpoint_loads(out_dir):
    ckpts = sorted(out_dir.glob("ckpt-*"))
    assert ckpts and not list(out_dir.glob(".ckpt-*"))  # no debris of a cut save
    for c in ckpts:
        checkpoint.read_checkpoint(c)  # reads every file back against its sha256


@pytest.fixture(scope="module")
def left_alone(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "left_alone"
    rc, log = finish(launch(command(data, out)))
    assert rc == 0, log[-3000:]
    return out


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(data, tmp_path, left_alone):
    out = tmp_path / "run"
    p = launch(command(data, out, torchrun_args=("--standalone", "--nproc_per_node=2", "--max-restarts=2")))
    wait_until_iter(p, out, 8)
    at = last_iter(out)
    os.kill(worker(p, 1), signal.SIGKILL)
    rc, log = finish(p)
    assert rc == 0, log[-3000:]
    resumed_at = int(log.split("resuming from ")[1].split(" at iteration ")[1].split()[0])
    assert at - resumed_at <= COMMON["eval_interval"]  # redone: at most the iterations since the last save
    assert last_iter(out) == COMMON["max_iters"] and same_weights(out, left_alone)
    every_checkpoint_loads(out)


def test_a_worker_that_stops_answering_ends_the_job_within_the_timeout_and_it_comes_back(data, tmp_path, left_alone):
    out = tmp_path / "run"
    p = launch(command(data, out, torchrun_args=("--standalone", "--nproc_per_node=2", "--max-restarts=2")))
    wait_until_iter(p, out, 8)
    os.kill(worker(p, 1), signal.SIGSTOP)  # alive, holding its sockets, answering nothing
    rc, log = finish(p)
    assert rc == 0, log[-3000:]
    assert "waited 10 s for another rank that stopped answering" in log  # one line, from the rank that waited
    assert same_weights(out, left_alone)
    every_checkpoint_loads(out)


FULL_DISK = """
import sys
sys.path.insert(0, {root!r})
import configurator, train
from homegpt import checkpoint
from safetensors import SafetensorError
real = checkpoint.save_file

def full(tensors, path, *args, **kwargs):  # rank 0's disk fills up at iteration 9's save
    if "ckpt-0000009" in str(path):
        raise SafetensorError('IoError(Os {{ code: 28, kind: StorageFull, message: "No space left on device" }})')
    return real(tensors, path, *args, **kwargs)

checkpoint.save_file = full
configurator.run(train.main, train.TrainConfig)
"""


def test_a_full_disk_at_a_save_stops_every_rank_with_one_line_and_the_run_resumes_once_freed(data, tmp_path,
                                                                                          left_alone):
    out, script = tmp_path / "run", tmp_path / "full_disk.py"
    script.write_text(FULL_DISK.format(root=str(ROOT)))
    t0 = time.time()
    rc, log = finish(launch(command(data, out, script=script)))
    assert rc != 0 and time.time() - t0 < 60  # every rank stopped: no one waited out a timeout
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "ckpt-0000009" in errors[0], log[-3000:]
    assert json.loads((out / "latest.json").read_text())["iter_num"] == 6  # the previous checkpoint, intact
    every_checkpoint_loads(out)
    rc, log = finish(launch(command(data, out)))  # space freed: the same command continues
    assert rc == 0 and "resuming from" in log, log[-3000:]
    assert same_weights(out, left_alone)


def test_sigterm_saves_and_stays_stopped_under_max_restarts(data, tmp_path):
    out = tmp_path / "run"
    p = launch(command(data, out, torchrun_args=("--standalone", "--nproc_per_node=2", "--max-restarts=2")))
    wait_until_iter(p, out, 4)
    os.kill(worker(p, 0), signal.SIGTERM)  # one worker told to stop (a preemption notice): every rank stops
    rc, log = finish(p)
    assert rc == 0 and "resuming from" not in log, log[-3000:]  # stopped on purpose: not restarted
    saved = json.loads((out / "latest.json").read_text())["iter_num"]
    assert saved == last_iter(out) < COMMON["max_iters"]  # saved where it stopped
    p = launch(command(data, out, torchrun_args=("--standalone", "--nproc_per_node=2", "--max-restarts=2")))
    wait_until_iter(p, out, saved + 2)
    p.send_signal(signal.SIGTERM)  # torchrun itself: it forwards the signal, the workers save, nothing restarts
    rc, log = finish(p)
    assert "resuming from" in log and log.count("resuming from") == 1, log[-3000:]
    assert json.loads((out / "latest.json").read_text())["iter_num"] == last_iter(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_the_run_of_one_node_with_two_ranks(data, tmp_path, left_alone):
    out, port = tmp_path / "run", free_port()
    nodes = [launch(command(data, out, torchrun_args=(
        "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d", "--rdzv_id=two-nodes",
        f"--rdzv_endpoint=127.0.0.1:{port}"))) for rank in (0, 1)]
    for node in nodes:
        rc, log = finish(node)
        assert rc == 0, log[-3000:]
    ours = {m["iter"]: m["train_loss"] for m in read_metrics(out) if "train_loss" in m}
    theirs = {m["iter"]: m["train_loss"] for m in read_metrics(left_alone) if "train_loss" in m}
    assert ours.keys() == theirs.keys() and all(abs(ours[k] - theirs[k]) <= 1e-5 for k in ours)
    assert len(list(out.glob("ckpt-*"))) == 3  # one checkpoint stream (keep_last_n), written by rank 0 alone
    more = train.main(tiny_train_config(data, out, **(COMMON | dict(max_iters=21, init_from="resume"))))
    assert more["iter_num"] == 21  # and it resumes in one process
