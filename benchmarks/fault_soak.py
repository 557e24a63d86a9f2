"""
A long run under fire: faults injected at random moments into a torchrun job (2 gloo ranks on a CPU),
each survived by the same command line with auto_resume=True, the job's final weights compared with
those of the same job left alone. The fault table in docs/long_runs.md comes from here.

    python benchmarks/fault_soak.py --faults=8 --max_iters=60
    python benchmarks/fault_soak.py --faults=2 --max_iters=20     # a quick look

The faults, in turn from a seeded shuffle: kill -9 of a random worker (torchrun --max-restarts brings
the job back), SIGSTOP of one (the other ranks wait dist_timeout_s, the job ends, torchrun kills the
stopped one and restarts), SIGTERM to one (every rank saves and exits 0, on purpose: the same command
is started again, as a preemptible node's restart script does), and a full disk at rank 0's saves
(its saves fail until the space is freed; torchrun restarts the job meanwhile). Each row: the
iteration the fault hit, the one the job resumed from, the iterations redone, the seconds until the
job trained again. "lost" counts checkpoints that did not read back against their hashes afterwards.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (the checkout on sys.path)
import torch

from homegpt import checkpoint, weights
from homegpt.prepare_text import prepare_chars
from configurator import configure

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kill", "stop", "term", "disk")

# rank 0's saves fail while the marker file exists (a full disk), as ENOSPC from safetensors' writer would
FULL_DISK = """
import os, sys
sys.path.insert(0, {root!r})
import configurator, train
from safetensors import SafetensorError
real = checkpoint.save_file

def save_file(tensors, path, *args, **kwargs):
    if os.path.exists({marker!r}):
        raise SafetensorError('IoError(Os {{ code: 28, kind: StorageFull, message: "No space left on device" }})')
    return real(tensors, path, *args, **kwargs)

checkpoint.save_file = save_file
configurator.run(train.main, train.TrainConfig)
"""


@dataclass
class SoakConfig:
    faults: int = 8  # faults injected over the run
    max_iters: int = 60  # the run's length; it saves every eval_interval iterations
    eval_interval: int = 3
    dist_timeout_s: float = 5.0  # how long the ranks wait for a stopped one
    seed: int = 0
    out_file: str = "fault_soak.json"


def train_args(cfg, data, out):
    keys = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, dropout=0.0, sampling="sequential",
                gradient_accumulation_steps=2, eval_interval=cfg.eval_interval, eval_iters=2, warmup_iters=2,
                lr_decay_iters=cfg.max_iters, learning_rate=3e-3, min_lr=3e-4, max_iters=cfg.max_iters,
                device="cpu", dtype="float32", data_dir=data, out_dir=out, auto_resume=True,
                dist_timeout_s=cfg.dist_timeout_s, keep_last_n=3)
    return [f"--{k}={v}" for k, v in keys.items()]


def launch(script, args, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=50", str(script)] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log,
                            stderr=subprocess.STDOUT)


def trained_to(out):
    try:
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(s)["iter"] for s in lines if s.endswith("}") and "train_loss" in s), default=0)
    except (OSError, ValueError):
        return 0


def workers(p):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == p.pid:
                    kids.append(int(d))
            except OSError:
                continue
    return kids


def resumed_points(log_path):
    text = Path(log_path).read_text(errors="replace")
    return [int(part.split(" at iteration ")[1].split()[0]) for part in text.split("resuming from ")[1:]]


def inject(kind, p, marker, rng):
    """Do the fault; returns when it has been dealt (the job may still be recovering)."""
    if kind == "disk":
        marker.write_text("full")
        return
    target = rng.choice(workers(p))
    os.kill(target, {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}[kind])


def soak(cfg, work):
    data, script, marker = work / "data", work / "full_disk.py", work / "disk-full"
    prepare_chars(data, (ROOT / "data" / "shakespeare_char" / "input.txt").read_text(encoding="utf-8")[:50_000])
    script.write_text(FULL_DISK.format(root=str(ROOT), marker=str(marker)))
    alone, faulted, log_path = work / "alone", work / "faulted", work / "faulted.log"
    with open(work / "alone.log", "w") as log:
        assert launch(script, train_args(cfg, data, alone), log).wait() == 0, "the undisturbed job failed"
    rng = random.Random(cfg.seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(cfg.faults)]
    rng.shuffle(kinds)
    at = sorted(rng.sample(range(2, cfg.max_iters - 1), cfg.faults))
    rows, log = [], open(log_path, "w")
    p = launch(script, train_args(cfg, data, faulted), log)
    for kind, when in zip(kinds, at):
        while trained_to(faulted) < when:
            if p.poll() is not None:  # stopped on purpose (SIGTERM): started again, as a restart script does
                p = launch(script, train_args(cfg, data, faulted), log)
            time.sleep(0.02)
        hit, seen, t0 = trained_to(faulted), len(resumed_points(log_path)), time.time()
        inject(kind, p, marker, rng)
        if kind == "disk":  # the disk stays full until a save has failed, then space is freed
            while "No space left on device" not in log_path.read_text(errors="replace").split("resuming from")[-1]:
                time.sleep(0.05)
            marker.unlink()
        while len(resumed_points(log_path)) == seen or trained_to(faulted) <= resumed_points(log_path)[-1]:
            if p.poll() is not None:
                p = launch(script, train_args(cfg, data, faulted), log)
            time.sleep(0.05)
        back = resumed_points(log_path)[-1]  # (after SIGTERM, past `hit`: the step under way finished and saved)
        rows.append(dict(fault=kind, at_iteration=hit, resumed_from=back, redone=max(0, hit - back),
                         seconds_to_train_again=round(time.time() - t0, 1)))
        print(f"{kind:>5}: hit at iteration {hit}, resumed from {back} ({rows[-1]['redone']} redone), "
              f"training again after {rows[-1]['seconds_to_train_again']} s", flush=True)
    while p.wait() != 0 or trained_to(faulted) < cfg.max_iters:
        p = launch(script, train_args(cfg, data, faulted), log)
    log.close()
    lost = 0
    for c in sorted(faulted.glob("ckpt-*")):
        try:
            checkpoint.read_checkpoint(c)
        except (ValueError, FileNotFoundError):
            lost += 1
    a, _ = weights.load_model(alone, which="latest")
    b, _ = weights.load_model(faulted, which="latest")
    equal = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    return rows, lost, equal


def main(cfg):
    print("\n".join(common.machine_lines()))
    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        rows, lost, equal = soak(cfg, Path(work))
    survived = sum(1 for r in rows if r["redone"] <= cfg.eval_interval)
    print(f"faults: {len(rows)} injected, {survived} survived with at most {cfg.eval_interval} iterations redone; "
          f"checkpoints lost: {lost}; final weights equal to the undisturbed job's: {equal}; "
          f"{time.time() - t0:.0f} s in all")
    Path(cfg.out_file).write_text(json.dumps(dict(rows=rows, lost=lost, equal=equal,
                                                  machine=common.machine_lines()), indent=1))
    if lost or not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main(configure(SoakConfig))
