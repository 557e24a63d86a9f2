"""
How long a run takes to leave after SIGTERM, and how long the save on the way out takes: a preemptible
machine (and torchrun) sends SIGKILL about 30 s after SIGTERM, so both must fit in that.

    python benchmarks/stop_latency.py                         # the baby GPT on this machine's CPU
    python benchmarks/stop_latency.py --config=config/train_shakespeare_char_cpu.py --rounds=3

Three measurements, each the median of --rounds:
- SIGTERM during the initial evaluation (the config's eval_iters batches; the baby GPT's 200 took 86 s
  on a 2-core CPU before an evaluation stopped at the next batch): seconds from the signal to exit;
- SIGTERM during training: seconds from the signal to exit, the checkpoint of the step reached included;
- the save alone of GPT-2 124M's shape with its AdamW state (1.5 GB), as a SIGTERM save writes it
  (sizes only, no read-back of the hashes).
"""

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: its modules are not installed

from configurator import configure  # noqa: E402


@dataclass
class StopConfig:
    config: str = "config/train_shakespeare_char.py"  # the training config whose stop is timed
    rounds: int = 3  # rounds of the three measurements, interleaved; medians are printed


def time_to_exit(cmd, trigger, delay):
    """Start cmd, send SIGTERM `delay` seconds after a line starting with `trigger`; (seconds from
    the signal to exit, the output, the exit code)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, sent = [], {}

    def read():
        for line in p.stdout:
            lines.append(line)
            if "t" not in sent and line.startswith(trigger):
                threading.Timer(delay, lambda: (sent.setdefault("t", time.perf_counter()),
                                                p.send_signal(signal.SIGTERM))).start()
    reader = threading.Thread(target=read)
    reader.start()
    p.wait()
    end = time.perf_counter()
    reader.join()
    assert "t" in sent, "".join(lines)[-3000:]
    return end - sent["t"], "".join(lines), p.returncode


def save_seconds(rounds):
    """Seconds to save GPT-2 124M with AdamW state as the way out of a SIGTERM does (hash_files=False)."""
    import torch
    from homegpt import checkpoint
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    times = []
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        for i in range(rounds):
            t0 = time.perf_counter()
            checkpoint.save_checkpoint(d, {"iter_num": i + 1}, model, opt, keep_last_n=1, hash_files=False)
            times.append(time.perf_counter() - t0)
    return times


def main(args):
    during_eval, during_train = [], []
    for r in range(args.rounds):  # interleaved: one of each per round
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "train.py", args.config, f"--out_dir={d}/out", "--device=cpu", "--compile=False",
                   "--initial_eval=True", "--max_iters=100000", "--log_interval=1"]
            seconds, out, code = time_to_exit(cmd, "  available", 3.0)  # the memory report's last line: evaluating
            assert code == 0 and "evaluation cut short" in out, out[-3000:]
            during_eval.append(seconds)
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "train.py", args.config, f"--out_dir={d}/out", "--device=cpu", "--compile=False",
                   "--initial_eval=False", "--max_iters=100000", "--log_interval=1"]
            seconds, out, code = time_to_exit(cmd, "iter 2:", 0.0)
            assert code == 0 and "saved checkpoint" in out, out[-3000:]
            during_train.append(seconds)
    saves = save_seconds(args.rounds)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{args.config} on {cpu} ({os.cpu_count()} cores), {args.rounds} rounds; seconds, median (min-max):")
    for name, xs in [("SIGTERM during the initial evaluation -> exit", during_eval),
                     ("SIGTERM during training -> saved and exited", during_train),
                     ("save of GPT-2 124M + AdamW state (1.5 GB, no read-back)", saves)]:
        print(f"  {name:<58} {statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})")


if __name__ == "__main__":
    main(configure(StopConfig))
