"""
Peak memory of training against the size of the dataset: train.py on a 1 GB token file and on a small
one, the same model and steps, each in its own process; prints both peak RSS (ru_maxrss of the child).

    python benchmarks/memory_rss.py                              # 1 GB vs 2 MB train.bin, 100 steps
    python benchmarks/memory_rss.py --big_gb=4 --steps=300
    python benchmarks/memory_rss.py --big_gb=0.01 --steps=5      # a quick check

Random windows from a file read through one long-lived np.memmap pull every touched page into the
process: the pages stay mapped, so RSS grows towards the whole file. dataloader.TokenData opens a fresh
memmap per read, so the peak should not depend on the file's size. The files are written in a temporary
directory (deleted afterwards unless work_dir is given) with random character ids and a meta.json,
and each run uses random windows over the whole file, batch 64, so 100 steps touch 6,400 places.
A ratio near 1.0x means the peak is the process, not the data. Measured figures: docs/speed.md.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MemoryConfig:
    big_gb: float = 1.0  # size of the large train.bin in GB (uint16 tokens: 0.5 G tokens per GB)
    small_tokens: int = 1_000_000  # tokens of the small train.bin
    steps: int = 100  # training steps of each run
    batch_size: int = 64  # random windows per step
    train_args: str = "--n_layer=2 --n_head=2 --n_embd=64 --block_size=64"  # the model: small, memory is about data
    repeats: int = 1  # runs per file, alternating small and large
    work_dir: str = ""  # '' = a temporary directory, deleted afterwards
    seed: int = 0
    tolerance: float = 1.05  # largest allowed (large-file peak) / (small-file peak)


def write_dataset(path, n_train, seed, vocab=65):
    """train.bin of n_train random char ids, a small val.bin and meta.json, written chunk by chunk so
    that making a 1 GB file needs ~32 MB of memory. A random 16M-token block is written repeatedly,
    each time rolled by a random amount: fast, and no two windows line up."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    block = rng.integers(0, vocab, size=min(n_train, 1 << 24), dtype=np.uint16)
    with open(path / "train.bin", "wb") as f:
        left = n_train
        while left > 0:
            chunk = np.roll(block, int(rng.integers(block.size)))[:left]
            f.write(chunk.tobytes())
            left -= chunk.size
    val = rng.integers(0, vocab, size=100_000, dtype=np.uint16)
    (path / "val.bin").write_bytes(val.tobytes())
    itos = [chr(ord("!") + i) for i in range(vocab)]
    meta = {"vocab_size": vocab, "tokenizer": "char", "itos": itos, "train_tokens": n_train, "val_tokens": val.size}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def peak_rss_of_run(cmd, log_path):
    """Run cmd; return its peak RSS in bytes (ru_maxrss of this one child, via wait4). Raises on failure."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    # Linux reports kilobytes, macOS bytes
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main(cfg):
    common.print_machine("peak RSS of training vs dataset size")
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="homegpt-rss-"))
    try:
        n_big = int(cfg.big_gb * 1e9) // 2
        t0 = time.perf_counter()
        data = {"small": write_dataset(work / "small", cfg.small_tokens, cfg.seed),
                "large": write_dataset(work / "large", n_big, cfg.seed + 1)}
        sizes = {k: (d / "train.bin").stat().st_size for k, d in data.items()}
        print(f"data: train.bin of {sizes['small'] / 1e6:,.1f} MB and {sizes['large'] / 1e9:,.2f} GB "
              f"written in {time.perf_counter() - t0:.1f} s to {work}", flush=True)
        peaks = {k: [] for k in data}
        for r in range(cfg.repeats):
            for name, d in data.items():
                out = work / f"out-{name}-{r}"
                cmd = [sys.executable, "train.py", f"--data_dir={d}", f"--out_dir={out}", "--device=cpu",
                       "--dtype=float32", "--compile=False", f"--batch_size={cfg.batch_size}",
                       f"--max_iters={cfg.steps}", f"--eval_interval={cfg.steps}", "--eval_iters=2",
                       f"--log_interval={max(1, cfg.steps // 5)}", "--warmup_iters=0", "--dropout=0.0",
                       f"--seed={cfg.seed}"] + cfg.train_args.split()
                t0 = time.perf_counter()
                peak = peak_rss_of_run(cmd, work / f"train-{name}-{r}.log")
                peaks[name].append(peak)
                print(f"{name}: peak RSS {peak / 1e6:,.1f} MB after {cfg.steps} steps "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
        small, large = max(peaks["small"]), max(peaks["large"])
        ratio = large / small
        print(f"RATIO memory_rss: {ratio:.3f}x (peak RSS with a {sizes['large'] / 1e9:,.2f} GB train.bin "
              f"{large / 1e6:,.1f} MB vs with a {sizes['small'] / 1e6:,.1f} MB train.bin {small / 1e6:,.1f} MB; "
              f"target <= {cfg.tolerance:g}x: {'met' if ratio <= cfg.tolerance else 'NOT met'})", flush=True)
        return {"small": small, "large": large, "ratio": ratio}
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from configurator import configure
    main(configure(MemoryConfig))
