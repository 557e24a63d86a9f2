"""
Time to quality: how low the validation loss gets, start to finish of one train.py command, for the
two CPU recipes, beside nanoGPT's own CPU recipe run by nanoGPT's own code on the same machine.

    python benchmarks/time_to_quality.py --nanogpt_dir=/path/to/nanoGPT --plot=docs/time_to_quality.png
    python benchmarks/time_to_quality.py                   # our two recipes only (budget: nanoGPT's documented 116 s)
    python benchmarks/time_to_quality.py --recipes=config/train_shakespeare_char_cpu.py --targets=1.55 \
        --budgets_s=120 --train_args="--max_iters=20 --n_layer=2"                       # a quick check

Each recipe runs in a subprocess (python start-up, imports, data, model, training, the final
evaluation over the whole fixed validation split and the checkpoint all count), into a fresh out_dir,
and its final val_loss is read from out_dir/metrics.jsonl. nanoGPT's recipe (its README's "I only have
a macbook" command: 4 x 128, block 64, batch 12, 2,000 iterations, float32) runs first from a copy of
the given checkout, its data prepared beforehand from our input.txt; its val loss is its own estimate
over 20 random batches. The 2-minute recipe's budget is the wall time nanoGPT's took in the same run.
The wall time depends on what else the machine is doing: the load average is printed at the start and
the end. The picture has each run's training loss against wall time and its final val loss.

Measured: see README's "Learning faster per token and per second" (both machines' figures).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]

NANOGPT_DOCUMENTED = (1.886, 116.0)  # (val loss, seconds) of nanoGPT itself on this machine
# nanoGPT's README CPU recipe, as its own train.py takes it (it computes in float32 on a CPU)
NANOGPT_CPU_ARGS = ("config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 "
                    "--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 "
                    "--lr_decay_iters=2000 --dropout=0.0")
NANOGPT_TOKENS_PER_ITER = 12 * 64


@dataclass
class TimeToQualityConfig:
    # the recipes under test, each with the val loss it must reach and its wall-time budget
    recipes: str = "config/train_shakespeare_char_cpu.py,config/train_shakespeare_char_cpu_10min.py"
    targets: str = "1.55,1.50"  # comma-separated, one per recipe
    # seconds, one per recipe; 'nanogpt' = the wall time nanoGPT's own CPU recipe takes in this run
    # (needs nanogpt_dir; without it, the 116 s it took on the Xeon)
    budgets_s: str = "nanogpt,600"
    train_args: str = ""  # extra --key=value for every recipe (a quick check: "--max_iters=20")
    # a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT /path/to/nanoGPT): its own
    # train.py runs its CPU recipe first, copied to a temporary directory with its data prepared there (not timed)
    nanogpt_dir: str = ""
    timeout_s: float = 3600.0  # give up on a run after this long
    # torch threads of the runs (OMP_NUM_THREADS); 0 = torch's default, one per core. On a machine other
    # jobs keep busy, 1 can be 2-3x faster: a thread that waits for a descheduled partner stalls every op
    threads: int = 0
    plot: str = ""  # a PNG of the loss against wall time (docs/time_to_quality.png); '' = none


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


def nanogpt_run(src, tmp, timeout_s, threads=0):
    """nanoGPT's own CPU recipe from a copy of its checkout: (seconds, its last val loss, iteration,
    median tokens/s). Its data is prepared first from our input.txt (nanoGPT would download the same
    file), outside the timed run. Its val loss is its own estimate: eval_iters=20 random batches."""
    work = Path(tmp) / "nanoGPT"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns(".git", "out-*"))
    data = work / "data" / "shakespeare_char"
    shutil.copy(ROOT / "data" / "shakespeare_char" / "input.txt", data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True, timeout=timeout_s)
    cmd = [sys.executable, "train.py"] + shlex.split(NANOGPT_CPU_ARGS) + [f"--out_dir={Path(tmp) / 'nanogpt-out'}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    print(f"$ (nanoGPT {src}) " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s, env=env)
    seconds = time.perf_counter() - t0
    (Path(tmp) / "nanogpt.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    evals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout)
    times = sorted(float(ms) for ms in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", proc.stdout)[1:])
    if not evals:
        raise RuntimeError(f"nanoGPT printed no val loss:\n{proc.stdout[-2000:]}")
    tps = NANOGPT_TOKENS_PER_ITER / (times[len(times) // 2] / 1000) if times else float("nan")
    it, loss = int(evals[-1][0]), float(evals[-1][1])
    print(f"  {seconds:.1f} s wall, final val loss {loss:.4f} at iteration {it} (its 20-batch estimate), "
          f"median {tps:,.0f} tokens/s", flush=True)
    return seconds, loss, it, tps


def curve(out_dir, seconds):
    """[(seconds, train loss)] of a run's log lines, the wall time spread over the iterations."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["iter"] for r in rows) or 1
    return [(seconds * r["iter"] / last, r["train_loss"]) for r in rows if "train_loss" in r]


def draw(path, runs):
    """Loss against wall time, one line per run, its final val loss a dot (matplotlib, optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no picture: matplotlib is not installed (pip install -e .[plot]); {path} not written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in runs.items():
        if r.get("curve"):
            line, = ax.plot(*zip(*r["curve"]), lw=1, alpha=0.8, label=f"{name}: train loss")
            color = line.get_color()
        else:
            color = None
        ax.plot([r["seconds"]], [r["loss"]], "o", color=color, label=f"{name}: final val {r['loss']:.3f} in {r['seconds']:.0f} s")
    ax.set_xlabel("wall time from process start, s (interpolated by iteration)")
    ax.set_ylabel("loss (nats per character)")
    ax.set_ylim(1.3, 3.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Tiny Shakespeare (characters) on this machine's CPU", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"picture: {path}")


def nanogpt_curve(log_path, seconds):
    """[(seconds, train loss)] of nanoGPT's "iter N: loss X" lines, the wall time spread over the iterations."""
    points = [(int(i), float(x)) for i, x in re.findall(r"iter (\d+): loss ([\d.]+)", Path(log_path).read_text())]
    last = max((i for i, _ in points), default=1) or 1
    return [(seconds * i / last, x) for i, x in points]


def main(cfg):
    recipes = [r for r in cfg.recipes.split(",") if r]
    targets = [float(t) for t in cfg.targets.split(",")]
    budgets = cfg.budgets_s.split(",")
    if not (len(recipes) == len(targets) == len(budgets)):
        raise SystemExit(f"error: {len(recipes)} recipes, {len(targets)} targets and {len(budgets)} budgets_s: "
                         f"give one of each per recipe")
    common.print_machine("time to quality: " + ", ".join(f"python train.py {r}" for r in recipes))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="homegpt-ttq-") as tmp:
        if cfg.nanogpt_dir:
            seconds, loss, it, tps = nanogpt_run(cfg.nanogpt_dir, tmp, cfg.timeout_s, cfg.threads)
            runs["nanoGPT's CPU recipe"] = dict(seconds=seconds, loss=loss, iter=it, tokens_per_sec=tps,
                                                curve=nanogpt_curve(Path(tmp) / "nanogpt.log", seconds))
        for recipe in recipes:
            out = os.path.join(tmp, Path(recipe).stem)
            seconds, loss, it, tps = timed_run(f"{recipe} {cfg.train_args}", out, f"{out}.log", cfg.timeout_s,
                                               cfg.threads)
            runs[recipe] = dict(seconds=seconds, loss=loss, iter=it, tokens_per_sec=tps, curve=curve(out, seconds))
    if hasattr(os, "getloadavg"):
        print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    reference = runs.get("nanoGPT's CPU recipe")
    ref_loss, ref_s = (reference["loss"], reference["seconds"]) if reference else NANOGPT_DOCUMENTED
    where = "measured here" if reference else "documented, on the Xeon"
    for recipe, target, budget in zip(recipes, targets, budgets):
        r = runs[recipe]
        limit = ref_s if budget == "nanogpt" else float(budget)
        r["met"] = r["loss"] <= target and r["seconds"] <= limit
        print(f"RESULT time_to_quality {recipe}: val loss {r['loss']:.4f} in {r['seconds']:.1f} s at "
              f"{r['tokens_per_sec']:,.0f} tokens/s (target <= {target} within {limit:.0f} s: "
              f"{'met' if r['met'] else 'NOT met'})")
    first = runs[recipes[0]]
    # a ratio of wall times only means something beside the two losses, so both are on the line
    print(f"RATIO time_to_quality vs nanoGPT ({where}): {ref_s / first['seconds']:.2f}x (wall time nanoGPT / ours; "
          f"ours val {first['loss']:.3f} in {first['seconds']:.1f} s vs nanoGPT val {ref_loss:.3f} in {ref_s:.1f} s)")
    if cfg.plot:
        draw(cfg.plot, runs)
    return runs


if __name__ == "__main__":
    from configurator import configure
    main(configure(TimeToQualityConfig))
