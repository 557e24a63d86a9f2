"""A property of one run under any sequence of user actions: train, kill -9, resume, auto_resume,
eval_only, sample, export, a damaged file, a deleted pointer. After every action,

- no intact checkpoint is gone or changed, except one pruned by keep_last_n once a newer intact one exists;
- a resume continues from the newest intact checkpoint (and, with none intact, is refused);
- eval_only, sample and export leave the checkpoints and pointers as they were.

Seeded random sequences of 20 actions, each bounded (a killed run lives at most 6 s): about 40 s a
sequence on a 2-core machine.

    python -m pytest -q tests/test_user_actions.py
"""

import contextlib
import io
import random
import re
import signal
import subprocess
import sys

import pytest

from homegpt import runs
import sample
import train
from homegpt.errors import UserError
from helpers import ROOT, char_dataset, intact_checkpoints, tiny_train_config

KEEP = 2  # keep_last_n: small, so that pruning happens often
ACTIONS = ["train", "train", "kill -9", "kill -9", "resume", "eval_only", "sample", "export", "damage",
           "delete pointer"]


def pointers_and_checkpoints(out):
    """What a reader must leave as it was: the pointers and every file of every checkpoint."""
    files = [p for p in out.glob("ckpt-*/*")] + [p for p in (out / "latest.json", out / "best.json") if p.exists()]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def quietly(fn, *args):
    """(output, error) of fn(*args): a UserError is the refusal a user sees as one line."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            fn(*args)
    except UserError as e:
        return buf.getvalue(), e
    return buf.getvalue(), None


def killed_run(data, out, max_iters, rng):
    """train.py with auto_resume, as a restart loop runs it, killed with SIGKILL at a random moment."""
    cmd = [sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--dtype=float32",
           "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_interval=2",
           "--eval_iters=4", "--log_interval=5", "--warmup_iters=5", "--lr_decay_iters=20", "--learning_rate=3e-3",
           "--min_lr=3e-4", "--dropout=0.0", f"--keep_last_n={KEEP}", f"--max_iters={max_iters}", "--auto_resume=True"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = p.communicate(timeout=rng.uniform(2.5, 6.0))
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        stdout, _ = p.communicate()
    return stdout


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_no_user_action_loses_an_intact_checkpoint(tmp_path, seed):
    rng = random.Random(seed)
    data = char_dataset(tmp_path / "data", 30_000)
    out = tmp_path / "out"
    target, exports = 0, 0
    known = {}
    for step in range(20):
        action = rng.choice(ACTIONS)
        before = intact_checkpoints(out) if out.exists() else {}
        newest, had_checkpoints = (max(before) if before else None), bool(runs.checkpoint_dirs(out))
        frozen = pointers_and_checkpoints(out) if out.exists() else {}
        printed, refused = "", None
        target = max([target] + [int(n.split("-")[1]) for n in before]) + rng.randint(2, 6)
        if action in ("train", "resume"):
            resume = action == "resume" and runs.holds_checkpoint(out)
            cfg = tiny_train_config(data, out, max_iters=target, eval_interval=2, log_interval=5, keep_last_n=KEEP,
                                    auto_resume=not resume, init_from="resume" if resume else "scratch")
            printed, refused = quietly(train.main, cfg)
        elif action == "kill -9":
            printed = killed_run(data, out, target + 400, rng)
        elif action == "eval_only" and runs.holds_checkpoint(out):
            printed, refused = quietly(train.main, tiny_train_config(data, out, init_from="resume", eval_only=True))
        elif action == "sample" and runs.holds_checkpoint(out):
            printed, refused = quietly(sample.main, sample.SampleConfig(out_dir=str(out), device="cpu", num_samples=1,
                                                                        max_new_tokens=8, which="latest"))
        elif action == "export" and runs.holds_checkpoint(out):
            import export_hf
            exports += 1
            printed, refused = quietly(export_hf.main, export_hf.ExportConfig(
                out_dir=str(out), which="latest", hf_dir=str(tmp_path / f"hf-{exports}")))
            # and the export told to overwrite the run itself is refused, the run left as it was
            _, onto_run = quietly(export_hf.main, export_hf.ExportConfig(
                out_dir=str(out), which="latest", hf_dir=str(out), overwrite=True))
            assert onto_run is not None, "an export with --overwrite=True replaced a run's out_dir"
        elif action == "damage" and len(before) >= 2:  # (one intact checkpoint always stays, so the run goes on)
            victim = rng.choice(sorted(before))
            f = out / victim / rng.choice(["model.safetensors", "optimizer.safetensors"])
            b = bytearray(f.read_bytes())
            b[rng.randrange(len(b))] ^= 0xFF
            f.write_bytes(bytes(b))
            known.pop(victim, None)
        elif action == "delete pointer" and (out / "latest.json").exists():
            (out / "latest.json").unlink()
        else:
            continue
        after = intact_checkpoints(out)
        story = f"seed {seed}, action {step} ({action}): {printed[-1500:]}"
        # 1. an intact checkpoint goes only by keep_last_n, once a newer intact one exists
        for name, content in known.items():
            if after.get(name) != content:
                assert action in ("train", "resume", "kill -9") and any(n > name for n in after), \
                    f"{name} was lost: {story}"
        # 2. a resume continues from the newest intact checkpoint; with none intact, it is refused
        resumed = re.search(r"resuming from (\S+) at iteration", printed)
        if resumed:
            assert resumed.group(1).rsplit("/", 1)[-1] == newest, f"resumed from {resumed.group(1)}, not {newest}: {story}"
        if action in ("train", "resume") and before:
            assert resumed or (refused is None and "the run is finished" in printed), story
        if action in ("train", "resume") and not before and had_checkpoints:
            assert refused is not None and "no intact checkpoint" in str(refused), story
        # 3. readers leave the run's checkpoints and pointers alone
        if action in ("eval_only", "sample", "export"):
            assert pointers_and_checkpoints(out) == frozen, story
        known = after
    assert known, "the sequence ended without an intact checkpoint"
