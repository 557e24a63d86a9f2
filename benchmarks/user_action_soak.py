"""
Ordinary user actions on one run, each followed by the same training command again (as a restart loop
or a user would run it), against the same run left alone: what each action costs and whether anything
is lost. The "user actions" half of docs/long_runs.md's fault table.

    python benchmarks/user_action_soak.py                 # 8 actions, about 2 minutes on 2 cores
    python benchmarks/user_action_soak.py --seed=2 --rounds=2

Every command is the real one in a subprocess (train.py, sample.py, export_hf.py), on the tiny model
and 30,000 characters of Tiny Shakespeare, with auto_resume=True, keep_last_n=2 and a save every 5
iterations. After every action the checkpoints are read back against their sha256: one that was
intact and is gone counts as lost unless keep_last_n pruned it after a newer intact one was saved.
"""

import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: its modules are not installed
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from homegpt import checkpoint, runs  # noqa: E402
from configurator import configure  # noqa: E402
from helpers import char_dataset, intact_checkpoints  # noqa: E402

ACTIONS = ["kill -9 while training", "SIGTERM during an evaluation", "delete latest.json", "damage the newest checkpoint",
           "write a malformed latest.json", "eval_only beside the run", "sample.py", "export_hf.py --overwrite onto the run"]


@dataclass
class SoakConfig:
    seed: int = 1  # the shuffle of the actions and the moments of the kills
    rounds: int = 1  # times through the shuffled list of actions


def train_cmd(data, out, max_iters):
    return [sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--dtype=float32",
            "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=16", "--dropout=0.1",
            "--eval_interval=5", "--eval_iters=20", "--log_interval=1", "--warmup_iters=10", "--lr_decay_iters=2000",
            "--learning_rate=3e-3", "--min_lr=3e-4", "--keep_last_n=2", "--auto_resume=True", f"--max_iters={max_iters}"]


def run(cmd, stop_at=None, sig=signal.SIGKILL):
    """(output, seconds from start to the first trained iteration or None); stop_at: a regex of an
    output line after which the process gets `sig`."""
    t0, first, lines = time.perf_counter(), None, []
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        lines.append(line)
        if first is None and re.match(r"iter \d+: loss", line):
            first = time.perf_counter() - t0
        if stop_at and re.match(stop_at, line):
            p.send_signal(sig)
            stop_at = None
    p.wait()
    return "".join(lines), first


def reached(out):
    """The last iteration metrics.jsonl records."""
    return max((r["iter"] for r in runs.read_metrics(out)), default=0)


def act(action, data, out, target, rng):
    """Do one user action to the run; returns (the iteration the run had reached when it was hit, the
    checkpoint the action damaged on purpose or None)."""
    damaged = None
    if action == "kill -9 while training":
        start = reached(out)
        run(train_cmd(data, out, target), stop_at=rf"iter {start + rng.randint(3, 12)}: loss")
    elif action == "SIGTERM during an evaluation":
        run(train_cmd(data, out, target) + ["--eval_iters=400"], stop_at=r"iter \d*5: loss", sig=signal.SIGTERM)
    elif action == "delete latest.json":
        (out / "latest.json").unlink(missing_ok=True)
    elif action == "damage the newest checkpoint":
        damaged = runs.checkpoint_dirs(out)[0].name
        f = out / damaged / "model.safetensors"
        b = bytearray(f.read_bytes())
        b[rng.randrange(len(b))] ^= 0xFF
        f.write_bytes(bytes(b))
    elif action == "write a malformed latest.json":
        (out / "latest.json").write_text('{"checkpoint": ')
    elif action == "eval_only beside the run":
        run(train_cmd(data, out, target) + ["--init_from=resume", "--eval_only=True"])
    elif action == "sample.py":
        run([sys.executable, "sample.py", f"--out_dir={out}", "--device=cpu", "--max_new_tokens=20", "--num_samples=1"])
    elif action == "export_hf.py --overwrite onto the run":
        out_text, _ = run([sys.executable, "export_hf.py", f"--out_dir={out}", f"--hf_dir={out}", "--overwrite=True"])
        assert "error:" in out_text, out_text[-2000:]
    return reached(out), damaged


def main(args):
    rng = random.Random(args.seed)
    rows, lost, step = [], [], 40
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = char_dataset(work / "data", 30_000)
        out, target = work / "out", step
        run(train_cmd(data, out, target))
        known = intact_checkpoints(out)
        for action in [a for _ in range(args.rounds) for a in rng.sample(ACTIONS, len(ACTIONS))]:
            hit, damaged = act(action, data, out, target + step, rng)
            known.pop(damaged, None)  # damaged by the user, not lost by the code
            now = intact_checkpoints(out)
            for name, content in known.items():  # lost: gone or changed, with no newer intact checkpoint
                if now.get(name) != content and not any(n > name for n in now):
                    lost.append((action, name))
            target += step
            printed, first = run(train_cmd(data, out, target))  # the same command again
            resumed = re.search(r"resuming from \S+ckpt-(\d+) at iteration", printed)
            assert f"saved checkpoint to {out}/ckpt-{target:07d}" in printed, printed[-3000:]
            frm = int(resumed.group(1)) if resumed else None
            rows.append((action, hit, frm, hit - frm if frm is not None else None, first))
            after = intact_checkpoints(out)
            for name, content in known.items():
                if after.get(name) != content and not any(n > name for n in after):
                    lost.append((action, name))
            known = after
        ref = work / "ref"
        run(train_cmd(data, ref, target))
        a, b = (load_file(str(checkpoint.read_checkpoint(d)[0] / "model.safetensors")) for d in (out, ref))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print("| user action, then the same command | hit at iteration | resumed from | iterations redone | "
          "seconds until it trained again |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for action, hit, frm, redone, first in rows:
        print(f"| {action} | {hit} | {frm if frm is not None else '-'} | {redone if redone is not None else '-'} | "
              f"{first:.1f} |")
    print(f"\n{len(rows)} actions, {len(rows) - len({a for a, _ in lost})} held, {len(lost)} intact checkpoints lost; final "
          f"weights {'equal to' if same else 'DIFFERENT from'} the undisturbed run's at iteration {target}")
    print(json.dumps({"actions": len(rows), "lost": lost, "same_final_weights": same}))
    if lost or not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main(configure(SoakConfig))
