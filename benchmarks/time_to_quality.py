"""
Time to quality: how low the validation loss gets, start to finish of one train.py command, beside
nanoGPT's documented CPU recipe (val 1.886 in 116 s on the same 2-core Xeon).

    python benchmarks/time_to_quality.py                   # python train.py config/train_shakespeare_char_cpu.py
    python benchmarks/time_to_quality.py --nanogpt=True    # and nanoGPT's recipe, run by our train.py
    python benchmarks/time_to_quality.py --train_args="--max_iters=20 --n_layer=2"   # a quick check

Runs the command in a subprocess (python start-up, imports, data, model, training, the final
evaluation over the whole fixed validation split and the checkpoint all count), into a fresh out_dir,
and reads the final val_loss from out_dir/metrics.jsonl. The wall time depends on what else the
machine is doing: the load average is printed at the start and the end.

Measured on a 2-core AVX512-BF16/AMX Xeon (quiet machine, load ~1.7 from other work): the config as
shipped (Muon + AdamW, 470 iterations) val 1.5944 in 115.2 s at 17,551 tokens/s, within the 1.60 in
120 s aimed for; with AdamW alone (480 iterations) it had been 1.8187 in 106.2 s. The margin is thin:
a machine ~4% busier, and the wall time passes 120 s.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]

# nanoGPT's README, "I only have a macbook" CPU recipe, with float32 as on a CPU there
NANOGPT_RECIPE = ("config/train_shakespeare_char.py --device=cpu --dtype=float32 --compile=False --eval_iters=20 "
                  "--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 "
                  "--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0")
NANOGPT_DOCUMENTED = (1.886, 116.0)  # (val loss, seconds) of nanoGPT itself on this machine


@dataclass
class TimeToQualityConfig:
    config_file: str = "config/train_shakespeare_char_cpu.py"  # the recipe under test
    train_args: str = ""  # extra --key=value for train.py (a quick check: "--max_iters=20")
    out_dir: str = ""  # '' = a fresh temporary directory per run (train.py appends to an existing metrics.jsonl)
    nanogpt: bool = False  # also run nanoGPT's recipe with our train.py (~2 min more), after ours
    budget_s: float = 120.0  # the promise: target_loss within this many seconds
    target_loss: float = 1.60
    timeout_s: float = 3600.0  # give up on a run after this long
    # torch threads of the runs (OMP_NUM_THREADS); 0 = torch's default, one per core. On a machine other
    # jobs keep busy, 1 can be 2-3x faster: a thread that waits for a descheduled partner stalls every op
    threads: int = 0


def final_metrics(out_dir):
    """(last val_loss, its iteration, median tokens/s of the training lines) from metrics.jsonl."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        raise RuntimeError(f"{path} was not written: the run did not log anything")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    vals = [r for r in rows if "val_loss" in r]
    if not vals:
        raise RuntimeError(f"{path} holds no val_loss line: the final evaluation did not run")
    tps = sorted(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r)
    return vals[-1]["val_loss"], vals[-1]["iter"], (tps[len(tps) // 2] if tps else float("nan"))


def timed_run(args, out_dir, log_path, timeout_s, threads=0):
    """Run `python train.py args --out_dir=out_dir`; (seconds, val loss, iteration, tokens/s)."""
    cmd = [sys.executable, "train.py"] + shlex.split(args) + [f"--out_dir={out_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    print(("$ " if not threads else f"$ OMP_NUM_THREADS={threads} ") + " ".join(shlex.quote(c) for c in cmd[1:]),
          flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout_s, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"train.py exited with {proc.returncode}:\n{tail}")
    loss, it, tps = final_metrics(out_dir)
    print(f"  {seconds:.1f} s wall, final val loss {loss:.4f} at iteration {it}, median {tps:,.0f} tokens/s "
          f"(log: {log_path})", flush=True)
    return seconds, loss, it, tps


def main(cfg):
    common.print_machine("time to quality: python train.py " + cfg.config_file)
    with tempfile.TemporaryDirectory(prefix="homegpt-ttq-") as tmp:
        runs = {"ours": (f"{cfg.config_file} {cfg.train_args}", cfg.out_dir or os.path.join(tmp, "ours"))}
        if cfg.nanogpt:
            runs["nanogpt"] = (f"{NANOGPT_RECIPE} {cfg.train_args}", os.path.join(tmp, "nanogpt"))
        # the log sits beside a given out_dir (kept), else in the temporary directory
        results = {name: timed_run(args, out, f"{out}.log" if cfg.out_dir and name == "ours" else
                                   os.path.join(tmp, f"{name}.log"), cfg.timeout_s, cfg.threads)
                   for name, (args, out) in runs.items()}
    if hasattr(os, "getloadavg"):
        print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    seconds, loss = results["ours"][:2]
    met = loss <= cfg.target_loss and seconds <= cfg.budget_s
    print(f"RESULT time_to_quality: val loss {loss:.4f} in {seconds:.1f} s (target <= {cfg.target_loss} "
          f"within {cfg.budget_s:g} s: {'met' if met else 'NOT met'})")
    ref_loss, ref_s = NANOGPT_DOCUMENTED
    # a ratio of wall times only means something beside the two losses, so both are on the line
    print(f"RATIO time_to_quality vs nanoGPT documented: {ref_s / seconds:.2f}x (wall time nanoGPT / ours; "
          f"ours val {loss:.3f} in {seconds:.1f} s vs nanoGPT val {ref_loss} in {ref_s:g} s)")
    if "nanogpt" in results:
        n_s, n_loss = results["nanogpt"][:2]
        print(f"RATIO time_to_quality vs nanoGPT recipe measured here: {n_s / seconds:.2f}x (wall time theirs / "
              f"ours; ours val {loss:.3f} in {seconds:.1f} s vs nanoGPT's recipe val {n_loss:.3f} in {n_s:.1f} s)")
    return results


if __name__ == "__main__":
    from configurator import configure
    main(configure(TimeToQualityConfig))
