"""
nanoGPT beside homegpt on the same GPU, in one run: benchmarks/gpu_check.py's nanogpt part.

  (a) time to quality: the GPU baby GPT on Tiny Shakespeare, each project's own script and recipe
      (our `train.py config/train_shakespeare_char.py`, nanoGPT's `train.py
      config/train_shakespeare_char.py`), torch.compile on both, each stopped after nanogpt_wall_s:
      the seconds from process start to the first val loss <= nanogpt_target, and the val loss each
      has printed by that same wall time
  (b) GPT-2 124M training throughput, compiled, in the card's dtype: nanoGPT's own bench.py
      (random tokens; its printed ms per iteration) against our train_step rows (gpu_rows.train_row)
      at the same micro-batches; tokens/s and MFU at the batch each does best, and the ratio

    python benchmarks/gpu_check.py --parts=nanogpt --nanogpt_dir=/path/to/nanoGPT
    python benchmarks/gpu_check.py --device=cpu --dry_run=True --parts=nanogpt --nanogpt_dir=/path/to/nanoGPT

nanoGPT runs from a copy of the checkout in a temporary directory, never from the checkout itself.
Its data/shakespeare_char/prepare.py downloads input.txt unless the file is there, so ours (the same
text) is copied in first and prepare.py runs offline, untimed. Each run's output is read line by
line as it comes and stamped with the seconds since the process was started, so both sides are
timed alike from their own log lines: nanoGPT's `step N: train loss X, val loss Y`, ours
`iter N: val loss Y`. nanoGPT estimates val loss on 200 random batches, we on 200 fixed ones.
Its printed MFU assumes an A100 (312 TFLOP/s); the table's MFU of both sides uses this card's peak
and our FLOP count of the same shape. Without bench.py (or in a dry run, whose CPU cannot run
its unconditional torch.cuda.synchronize), nanoGPT's train.py times a few iterations instead, on
random tokens, and the median of its printed `time ...ms` after the first few is used.
"""

import contextlib
import os
import re
import shutil
import signal
import statistics
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gpu_rows  # first: it puts the checkout on sys.path for a plain `python benchmarks/...`
import numpy as np

from configurator import parse_list
from gpu_rows import DRY_SHAPE, ROOT, builder, recipe, shape_of, train_row

QUALITY_CONFIG = "config/train_shakespeare_char.py"  # the same file name in both projects
THROUGHPUT_CONFIG = "config/train_gpt2.py"  # GPT-2 124M: 12 x 12 x 768, biases, vocab 50304, block 1024
NANOGPT_NEEDS = ("train.py", "model.py", "configurator.py", QUALITY_CONFIG, "data/shakespeare_char/prepare.py")
# a dry run's baby GPTs: both scripts take these keys; a handful of iterations on a CPU, no compilation
DRY_RUN_ARGS = (*DRY_SHAPE, "--batch_size=4", "--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=2",
                "--eval_interval=10", "--eval_iters=2", "--log_interval=5", "--compile=False", "--dtype=float32")
DRY_BATCHES = (2, 4)
FALLBACK_ITERS, FALLBACK_SKIP = 20, 5  # nanoGPT's train.py fallback: iterations run, first ones not counted
# prepare.py imports requests at the top even when it downloads nothing: a stub where it is missing
PREPARE = ("import runpy, sys, types\ntry:\n    import requests\nexcept ImportError:\n"
           "    sys.modules['requests'] = types.ModuleType('requests')\n"
           "runpy.run_path('prepare.py', run_name='__main__')")

NANOGPT_VAL = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")
OURS_VAL = re.compile(r"^iter (\d+): val loss ([\d.]+)")
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms, mfu (-?[\d.]+)%")
NANOGPT_BENCH = re.compile(r"time per iteration: ([\d.]+)ms, MFU: (-?[\d.]+)%")


# ----------------------------------------------------------------------------- reading the logs

def val_points(lines, pattern):
    """[(seconds since start, iteration, val loss)] of the stamped lines that match pattern."""
    out = []
    for t, line in lines:
        m = pattern.search(line)
        if m:
            out.append((t, int(m.group(1)), float(m.group(2))))
    return out


def quality(points, target, wall_s):
    """When a run first printed a val loss <= target, and what it had printed by wall_s."""
    hit = next((p for p in points if p[2] <= target), None)
    seen = [p for p in points if p[0] <= wall_s]
    return {"target": target, "time_to_target_s": hit[0] if hit else None, "iter_at_target": hit[1] if hit else None,
            "val_at_target": hit[2] if hit else None, "last_val": seen[-1][2] if seen else None,
            "last_val_iter": seen[-1][1] if seen else None, "last_val_s": seen[-1][0] if seen else None,
            "best_val": min((p[2] for p in seen), default=None), "evals": len(seen)}


def nanogpt_iter_ms(lines, skip=FALLBACK_SKIP):
    """Median ms per iteration of nanoGPT's train.py `iter N: ... time Xms` lines from iteration skip
    on (the first include the compilation), and its own (A100-relative) MFU of the last line."""
    rows = [(int(m.group(1)), float(m.group(2)), float(m.group(3)))
            for m in (NANOGPT_ITER.search(line) for _, line in lines) if m]
    kept = [ms for it, ms, _ in rows if it >= skip]
    if not kept:
        raise RuntimeError(f"nanoGPT's train.py printed {len(rows)} iteration lines, none from iteration {skip} on")
    return statistics.median(kept), rows[-1][2] / 100


def nanogpt_bench_ms(lines):
    """(ms per iteration, its own A100-relative MFU) from nanoGPT's bench.py."""
    for _, line in lines:
        m = NANOGPT_BENCH.search(line)
        if m:
            return float(m.group(1)), float(m.group(2)) / 100
    raise RuntimeError("nanoGPT's bench.py printed no 'time per iteration' line")


# ----------------------------------------------------------------------------- running nanoGPT

def stamped_run(cmd, cwd, wall_s, log_path, threads=0):
    """Run cmd (unbuffered Python), stamping each output line with the seconds since its start;
    stop its whole process group (compile workers included) after wall_s. The stamped log is
    written to log_path. threads > 0: OMP_NUM_THREADS for it (a dry run's 1)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=wall_s)
        stopped = False
    except subprocess.TimeoutExpired:
        stopped = True
    seconds = time.perf_counter() - t0
    with contextlib.suppress(ProcessLookupError):  # the group this call started, and only it
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    Path(log_path).write_text("".join(f"{t:9.2f}  {line}\n" for t, line in lines))
    return {"lines": lines, "returncode": proc.returncode, "stopped_at_wall": stopped, "seconds": seconds}


def copy_checkout(src, dst):
    """A writable copy of a nanoGPT checkout (no .git, no out-* runs); a checkout lacking a file the
    part runs is an error naming it."""
    src = Path(src)
    missing = [f for f in NANOGPT_NEEDS if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"nanogpt_dir={str(src)!r} is not a nanoGPT checkout: no {', '.join(missing)}")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "out*", "__pycache__"))
    for path in [dst, *Path(dst).rglob("*")]:  # a read-only checkout copies read-only
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return Path(dst)


def checkout_version(src):
    """The checkout's commit: its COMMIT file (a copy without .git, as carried to a lent machine),
    else `git rev-parse HEAD` of its own .git (never of a repository around it), else None."""
    src = Path(src)
    if (src / "COMMIT").is_file():
        return (src / "COMMIT").read_text().split()[0]
    if not (src / ".git").exists() or not shutil.which("git"):
        return None
    r = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return r.stdout.strip() or None


def prepare_nanogpt_data(work):
    """nanoGPT's Tiny Shakespeare from our input.txt (the file its prepare.py would download)."""
    data = work / "data" / "shakespeare_char"
    shutil.copy(ROOT / "data" / "shakespeare_char" / "input.txt", data / "input.txt")
    r = subprocess.run([sys.executable, "-c", PREPARE], cwd=data, capture_output=True, text=True, timeout=300)
    if r.returncode or not (data / "train.bin").is_file():
        raise RuntimeError(f"nanoGPT's prepare.py failed ({r.returncode}): {(r.stderr or r.stdout)[-1500:]}")


def random_dataset(work, n_tokens=2_000_000, vocab=50257, seed=0):
    """data/homegpt_random/{train,val}.bin of random GPT-2 token ids for nanoGPT's train.py; no
    meta.pkl, so its model takes the padded 50304 vocabulary, as ours."""
    d = work / "data" / "homegpt_random"
    if (d / "val.bin").is_file():
        return d.name
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        rng.integers(0, vocab, n_tokens, dtype=np.uint16).tofile(d / f"{split}.bin")
    return d.name


# ----------------------------------------------------------------------------- (a) time to quality

def quality_race(cfg, work, device, tmp):
    """Each project's baby GPT for at most nanogpt_wall_s; its val points and the target's time."""
    common = [f"--device={device}"] + (list(DRY_RUN_ARGS) if cfg.dry_run else ["--compile=True"])
    runs = {"nanoGPT": ([sys.executable, "train.py", QUALITY_CONFIG, *common, f"--out_dir={tmp}/nanogpt-out"],
                        work, NANOGPT_VAL),
            "homegpt": ([sys.executable, "train.py", QUALITY_CONFIG, *common, f"--out_dir={tmp}/homegpt-out"],
                        ROOT, OURS_VAL)}
    out = {"wall_s": cfg.nanogpt_wall_s, "target": cfg.nanogpt_target}
    for name, (cmd, cwd, pattern) in runs.items():
        print(f"nanogpt: {name}: {' '.join(cmd[1:])} (stopped after {cfg.nanogpt_wall_s:g} s)", flush=True)
        run = stamped_run(cmd, cwd, cfg.nanogpt_wall_s, Path(tmp) / f"{name}-quality.log",
                          threads=1 if cfg.dry_run else 0)
        points = val_points(run["lines"], pattern)
        res = quality(points, cfg.nanogpt_target, cfg.nanogpt_wall_s)
        res |= {"points": points, "returncode": run["returncode"], "stopped_at_wall": run["stopped_at_wall"],
                "seconds": run["seconds"], "tail": [line for _, line in run["lines"][-8:]]}
        if not points:
            res["error"] = f"no val loss line in its output (exit {run['returncode']})"
        out[name] = res
        hit = (f"val {res['val_at_target']:.4f} <= {cfg.nanogpt_target} at {res['time_to_target_s']:.1f} s "
               f"(iteration {res['iter_at_target']})" if res["time_to_target_s"] is not None else
               f"val <= {cfg.nanogpt_target} not reached")
        last = f"; last val {res['last_val']:.4f} at {res['last_val_s']:.1f} s" if res["last_val"] is not None else ""
        print(f"nanogpt: {name}: {hit}{last}", flush=True)
    a, b = out["nanoGPT"]["time_to_target_s"], out["homegpt"]["time_to_target_s"]
    out["time_ratio"] = a / b if a and b else None  # nanoGPT's seconds / ours: > 1 means we got there sooner
    return out


# ----------------------------------------------------------------------------- (b) GPT-2 124M throughput

def nanogpt_throughput(cfg, work, device, dname, batch, block, tmp):
    """One nanoGPT measurement at a micro-batch: its bench.py on CUDA, else its train.py's own timing."""
    log = Path(tmp) / f"nanoGPT-batch{batch}.log"
    if (work / "bench.py").is_file() and device.type == "cuda" and not cfg.dry_run:
        method = "bench.py"
        cmd = [sys.executable, "bench.py", f"--batch_size={batch}", f"--block_size={block}", "--real_data=False",
               "--bias=True", f"--dtype={dname}", f"--device={device}", "--compile=True"]
    else:
        method = "train.py"
        shape = list(DRY_SHAPE) if cfg.dry_run else [f"--block_size={block}", "--dropout=0.0"]
        cmd = [sys.executable, "train.py", f"--dataset={random_dataset(work)}", f"--batch_size={batch}", *shape,
               "--gradient_accumulation_steps=1", f"--max_iters={FALLBACK_ITERS}", "--eval_interval=100000",
               "--eval_iters=1", "--log_interval=1", "--bias=True", f"--compile={not cfg.dry_run}",
               f"--dtype={dname}", f"--device={device}", "--always_save_checkpoint=False",
               f"--out_dir={tmp}/nanogpt-bench-out"]
    run = stamped_run(cmd, work, cfg.nanogpt_bench_timeout_s, log, threads=1 if cfg.dry_run else 0)
    if run["stopped_at_wall"]:
        raise RuntimeError(f"nanoGPT's {method} did not finish in {cfg.nanogpt_bench_timeout_s:g} s")
    ms, own_mfu = nanogpt_bench_ms(run["lines"]) if method == "bench.py" else nanogpt_iter_ms(run["lines"])
    return {"method": method, "batch_size": batch, "block_size": block, "ms_per_step": ms,
            "tokens_per_sec": batch * block * 1000 / ms, "own_mfu_vs_a100": own_mfu, "command": " ".join(cmd[1:])}


def throughput_race(cfg, work, device, dtype, peak, tmp, deadline=None):
    """nanoGPT's and our GPT-2 124M step at each micro-batch (those started before deadline); the best
    of each and their ratio."""
    dname = str(dtype).replace("torch.", "")
    tcfg = recipe(THROUGHPUT_CONFIG, dry_run=cfg.dry_run, scratch=False)  # GPT-2's vocabulary in both
    shape = shape_of(tcfg)
    flops = shape.flops_per_token(tcfg.block_size)  # the same shape on both sides
    batches = DRY_BATCHES if cfg.dry_run else [int(b) for b in parse_list(cfg.nanogpt_batches)]
    theirs, ours = [], []
    for b in batches:
        if gpu_rows.past(deadline):
            print(f"nanogpt: batch {b} skipped: time_limit_s reached", flush=True)
            continue
        try:
            r = nanogpt_throughput(cfg, work, device, "float32" if cfg.dry_run else dname, b, tcfg.block_size, tmp)
            r |= {"status": "ok", "mfu": flops * r["tokens_per_sec"] / peak}
        except (RuntimeError, subprocess.SubprocessError) as e:
            r = {"status": "error", "batch_size": b, "note": str(e)[:300]}
        theirs.append(r)
        ours.append(train_row(f"homegpt batch {b}", builder(tcfg, device, cfg.seed), tcfg, device, dtype, b,
                              gpu_rows.step_counts(cfg), compile_mode="default", fused=True, peak_flops=peak,
                              dry_run=cfg.dry_run))
        theirs_text = f"{r['tokens_per_sec']:,.0f} tok/s" if r["status"] == "ok" else f"error: {r['note']}"
        print(f"nanogpt: batch {b}: nanoGPT {theirs_text}; homegpt {gpu_rows.row_text(ours[-1])}", flush=True)
    best = lambda rows: max((r for r in rows if r["status"] == "ok"), key=lambda r: r["tokens_per_sec"], default=None)
    bt, bo = best(theirs), best(ours)
    return {"config_file": THROUGHPUT_CONFIG, "flops_per_token": flops, "peak_flops": peak, "nanoGPT": theirs,
            "homegpt": ours, "best_nanoGPT": bt, "best_homegpt": bo, "skipped_batches": batches[len(ours):],
            "ratio": bo["tokens_per_sec"] / bt["tokens_per_sec"] if bt and bo else None}


# ----------------------------------------------------------------------------- the part

def run_nanogpt(cfg, device, dtype, peak, deadline=None, save=None):
    """(a) and (b) from a copy of cfg.nanogpt_dir; skipped, saying so, without one. The stamped logs
    of every nanoGPT and homegpt run are kept in one file beside out_file. (b)'s micro-batches not
    started by deadline are skipped; save(partial result) keeps (a) if the run is cut off in (b)."""
    if not cfg.nanogpt_dir:
        return {"status": "skipped", "note": "no --nanogpt_dir: give the path of a nanoGPT checkout "
                                             "(git clone https://github.com/karpathy/nanoGPT) to compare with"}
    result = {"status": "ok", "note": "", "nanogpt_dir": str(cfg.nanogpt_dir),
              "nanogpt_commit": checkout_version(cfg.nanogpt_dir), "dry_run": cfg.dry_run}
    with tempfile.TemporaryDirectory(prefix="homegpt-nanogpt-") as tmp:
        try:
            work = copy_checkout(cfg.nanogpt_dir, Path(tmp) / "nanoGPT")
            prepare_nanogpt_data(work)
            result["quality"] = quality_race(cfg, work, device, tmp)
            if save:
                save(result)
            result["throughput"] = throughput_race(cfg, work, device, dtype, peak, tmp, deadline)
        finally:
            logs = sorted(Path(tmp).glob("*.log"))
            result["log_file"] = str(Path(cfg.out_file).with_suffix("")) + "-nanogpt.log"
            Path(result["log_file"]).write_text("".join(f"===== {p.name}\n{p.read_text()}" for p in logs))
    failed = [name for name in ("nanoGPT", "homegpt") if result["quality"][name].get("error")]
    t = result["throughput"]
    failed += ["GPT-2 throughput"] if t["ratio"] is None and not t["skipped_batches"] else []
    if failed:
        result |= {"status": "failed", "note": f"no result from {', '.join(failed)}: see {result['log_file']}"}
    return result


def nanogpt_table(res):
    if res["status"] == "skipped" or "throughput" not in res:
        return [("nanogpt", res["status"], res["note"])]
    q, t = res["quality"], res["throughput"]
    when = lambda s: (f"{s['time_to_target_s']:.1f} s (iter {s['iter_at_target']})" if s["time_to_target_s"]
                      else "not reached")
    by_wall = lambda s: f"{s['last_val']:.4f} (iter {s['last_val_iter']})" if s["last_val"] is not None else "-"
    ratio = f"; {q['time_ratio']:.2f}x sooner" if q["time_ratio"] else ""
    rows = [("nanogpt", f"baby GPT: time to val <= {q['target']} (nanoGPT / homegpt)",
             f"{when(q['nanoGPT'])} / {when(q['homegpt'])}{ratio}"),
            ("nanogpt", f"baby GPT: val by {q['wall_s']:g} s (nanoGPT / homegpt)",
             f"{by_wall(q['nanoGPT'])} / {by_wall(q['homegpt'])}")]
    bt, bo = t["best_nanoGPT"], t["best_homegpt"]
    side = lambda r, extra="": (f"{r['tokens_per_sec']:,.0f} tok/s at batch {r['batch_size']}, MFU "
                                f"{100 * r['mfu']:.1f}%{extra}" if r else "no result")
    own = f" (its own print {100 * bt['own_mfu_vs_a100']:.1f}% of an A100, via {bt['method']})" if bt else ""
    rows.append(("nanogpt", "GPT-2 124M, best micro-batch: nanoGPT", side(bt, own)))
    rows.append(("nanogpt", "GPT-2 124M, best micro-batch: homegpt",
                 side(bo) + (f"; {t['ratio']:.2f}x nanoGPT's tok/s" if t["ratio"] else "")))
    return rows
