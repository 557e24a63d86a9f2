"""
What each architecture option and schedule buys on the CPU recipe at equal wall clock: the table in
README's "Learning faster per second" section.

    python benchmarks/ablation.py                                  # every variant, 2 seeds, 150 s of training each
    python benchmarks/ablation.py --variants=baseline,qk_norm --seeds=1337 --budget_s=60   # a quick look

Each variant is the bf16-sized CPU recipe (config/train_shakespeare_char_cpu_bf16.py, plain GPT-2, the
recipe README's table was measured with) with a few --key=value changes.
Equal wall clock, not equal steps: a variant first trains 30 iterations to measure its own ms per
iteration on this machine, then runs max_iters = budget_s / that (lr_decay_iters alike), so a faster
variant gets more steps, as it would in a user's fixed time. The runs go seed by seed, every variant
in turn (interleaved: a machine whose load drifts affects all alike), each a fresh train.py process,
and the final val loss is over the whole fixed validation split. Printed: per variant the steps, the
median wall time, the mean val loss over the seeds with its spread (half the range), and the change
against the baseline.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]

# variant -> train.py overrides on top of the recipe
VARIANTS = {
    "baseline": "",
    "qk_norm": "--qk_norm=True",
    "no_bias": "--bias=False",
    "untied": "--tie_weights=False",
    "rotary": "--rotary_dim=16",
    "wsd": "--lr_schedule=wsd --cooldown_frac=0.3",
}


@dataclass
class AblationConfig:
    config_file: str = "config/train_shakespeare_char_cpu_bf16.py"  # the recipe the variants change
    variants: str = ",".join(VARIANTS)  # comma-separated names of VARIANTS
    seeds: str = "1337,1338"
    budget_s: float = 150.0  # seconds of training per run (start-up and the two evaluations come on top)
    calibration_iters: int = 30  # iterations timed to size each variant's run
    extra_args: str = ""  # --key=value for every run (e.g. "--n_layer=2" for a quick check)
    out_file: str = "ablation.json"  # every run's numbers


def run(args, out_dir):
    """train.py with args into out_dir: (wall seconds, final val loss, median ms per iteration)."""
    cmd = [sys.executable, "train.py"] + shlex.split(args) + [f"--out_dir={out_dir}", "--overwrite=True"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train.py {args} exited with {proc.returncode}:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    ms = [r["ms_per_iter"] for r in rows if "ms_per_iter" in r]
    ms = ms[1:] or ms  # the first step carries the warm-up
    return seconds, vals[-1], statistics.median(ms) if ms else float("nan")


def main(cfg):
    common.print_machine(f"ablation of {cfg.config_file} at {cfg.budget_s:g} s of training per run")
    names = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in cfg.seeds.split(",")]
    results = {v: {"runs": []} for v in names}
    with tempfile.TemporaryDirectory(prefix="homegpt-ablation-") as tmp:
        for v in names:  # calibrate: this variant's own ms per iteration on this machine
            args = f"{cfg.config_file} {VARIANTS[v]} {cfg.extra_args} --max_iters={cfg.calibration_iters} " \
                   f"--lr_decay_iters={cfg.calibration_iters} --log_interval=1 --eval_iters=1"
            _, _, ms = run(args, os.path.join(tmp, f"cal-{v}"))
            results[v]["max_iters"] = max(cfg.calibration_iters, int(cfg.budget_s * 1000 / ms))
            print(f"{v}: {ms:.1f} ms/iteration -> {results[v]['max_iters']} iterations", flush=True)
        for seed in seeds:
            for v in names:
                n = results[v]["max_iters"]
                args = f"{cfg.config_file} {VARIANTS[v]} {cfg.extra_args} --max_iters={n} --lr_decay_iters={n} --seed={seed}"
                seconds, loss, ms = run(args, os.path.join(tmp, f"{v}-{seed}"))
                results[v]["runs"].append({"seed": seed, "seconds": seconds, "val_loss": loss, "ms_per_iter": ms})
                print(f"  seed {seed} {v:<16} val {loss:.4f} in {seconds:.1f} s ({ms:.1f} ms/iteration)", flush=True)
    base = statistics.mean(r["val_loss"] for r in results[names[0]]["runs"])
    print(f"\n{'variant':<16}{'iters':>7}{'wall s':>9}{'val (mean)':>12}{'spread':>9}{'vs ' + names[0]:>14}")
    for v in names:
        losses = [r["val_loss"] for r in results[v]["runs"]]
        mean, spread = statistics.mean(losses), (max(losses) - min(losses)) / 2
        wall = statistics.median(r["seconds"] for r in results[v]["runs"])
        results[v].update(mean=mean, spread=spread, wall_s=wall)
        print(f"{v:<16}{results[v]['max_iters']:>7}{wall:>9.1f}{mean:>12.4f}{spread:>9.4f}{mean - base:>+14.4f}")
    Path(cfg.out_file).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    from configurator import run as run_script
    run_script(main, AblationConfig)
