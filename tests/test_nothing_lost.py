"""Nothing a user does loses a run: a missing or damaged pointer, a damaged checkpoint, a second process
evaluating a live run, a diverged run, a stop signal during an evaluation, and wrong input.

    python -m pytest -q tests/test_nothing_lost.py
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from homegpt import checkpoint as ckpt_lib
import train
from homegpt import weights
from homegpt.errors import UserError
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config
from model import GPT, GPTConfig
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("data"), 30_000)


def final_weights(out):
    ckpt, _ = ckpt_lib.read_checkpoint(out)
    return load_file(str(ckpt / "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(out):
    """Every file of a run with its bytes: what 'untouched' is checked against."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def flip_a_byte(path):
    """Damage a file without changing its size: only the sha256 check finds it."""
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


# ----------------------------------------------------------------------------- auto_resume keeps every checkpoint

def test_auto_resume_without_latest_json_resumes_the_newest_checkpoint(data, tmp_path, capsys):
    """latest.json gone (deleted by a user, or a crash between a checkpoint's rename and its pointer):
    auto_resume finds the newest complete checkpoint by scanning and continues it; nothing is deleted."""
    straight, out = tmp_path / "straight", tmp_path / "out"
    train.main(tiny_train_config(data, straight, max_iters=6, eval_interval=2))
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, auto_resume=True))
    (out / "latest.json").unlink()
    capsys.readouterr()
    assert train.main(tiny_train_config(data, out, max_iters=6, eval_interval=2, auto_resume=True))["iter_num"] == 6
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "ckpt-0000004" in printed and "deleted" not in printed
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000004", "ckpt-0000006"]
    assert same_weights(final_weights(out), final_weights(straight))
    # a pointer left one behind (the crash came after ckpt-0000008's rename): the newer, intact one wins
    train.main(tiny_train_config(data, out, max_iters=8, eval_interval=2, auto_resume=True))
    (out / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-0000006", "iter_num": 6}))
    capsys.readouterr()
    train.main(tiny_train_config(data, out, max_iters=10, eval_interval=2, auto_resume=True))
    assert "latest.json names ckpt-0000006, but ckpt-0000008 is newer and intact" in capsys.readouterr().out


def test_auto_resume_skips_a_damaged_latest_checkpoint_and_says_why(data, tmp_path, capsys):
    """A bit flipped in the newest checkpoint: the resume takes the newest one that verifies, names the
    one it skipped, and ends with the weights of the run left alone (it redoes the lost iterations)."""
    straight, out = tmp_path / "straight", tmp_path / "out"
    train.main(tiny_train_config(data, straight, max_iters=6, eval_interval=2))
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, auto_resume=True))
    flip_a_byte(out / "ckpt-0000004" / "model.safetensors")
    capsys.readouterr()
    train.main(tiny_train_config(data, out, max_iters=6, eval_interval=2, auto_resume=True))
    printed = capsys.readouterr().out
    assert "skipping ckpt-0000004, which is damaged" in printed and "sha256 mismatch" in printed
    assert f"resuming from {out / 'ckpt-0000002'}" in printed
    assert same_weights(final_weights(out), final_weights(straight))
    # sample.py / eval.py / export read latest and refuse a damaged one naming the intact ones (as before);
    # damaged pointers are one line each, and a resume goes on without them
    (out / "latest.json").write_text("[1, 2")
    with pytest.raises(UserError, match="(?s)damaged pointer file.*intact beside it: ckpt-0000006"):
        weights.load_model(out)
    (out / "latest.json").write_text(json.dumps({"checkpoint": "../../etc"}))
    with pytest.raises(UserError, match="damaged pointer file"):
        weights.load_model(out)
    assert train.main(tiny_train_config(data, out, max_iters=8, eval_interval=2, auto_resume=True))["iter_num"] == 8


def test_a_pointer_to_a_missing_checkpoint_lists_the_intact_ones(data, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2))
    (out / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-0000009", "iter_num": 9}))
    with pytest.raises(UserError, match=r"(?s)ckpt-0000009.*intact beside it: ckpt-0000004 \(iteration 4\)"):
        weights.load_model(out)


def test_no_intact_checkpoint_is_refused_and_nothing_is_deleted(data, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2, auto_resume=True))
    flip_a_byte(out / "ckpt-0000002" / "model.safetensors")
    before = snapshot(out)
    with pytest.raises(UserError, match="no intact checkpoint in .*ckpt-0000002: .*sha256 mismatch.*Nothing was changed"):
        train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, auto_resume=True))
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- data that would stop a run

def test_a_validation_split_too_short_is_refused_before_the_first_step(tmp_path):
    """The CPU recipes evaluate only at the end: a too-short val split used to surface there, after all the
    training, with no checkpoint written."""
    data = char_dataset(tmp_path / "data", n_chars=300)  # 270 train characters, 30 val: fewer than block_size+1
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"every 'val' token file is shorter than block_size\+1 = 33 tokens"):
        train.main(tiny_train_config(data, out, max_iters=4, eval_interval=100, initial_eval=False))
    assert not out.exists()


# ----------------------------------------------------------------------------- a second process never rewrites a run

def test_eval_only_beside_a_live_run_never_rewrites_its_metrics(data, tmp_path):
    """The trainer holds metrics.jsonl open for appending; an eval_only of the same run must not replace
    the file under it (its later lines would go to an unlinked file), only append its one line."""
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2))
    path = out / "metrics.jsonl"
    with open(path, "a") as trainer:  # the live run's handle
        inode = path.stat().st_ino
        train.main(tiny_train_config(data, out, max_iters=4, init_from="resume", eval_only=True))
        trainer.write(json.dumps({"iter": 5, "train_loss": 1.0}) + "\n")
    assert path.stat().st_ino == inode
    records = read_metrics(out)
    assert records[-1] == {"iter": 5, "train_loss": 1.0}
    assert [r for r in records if r.get("iter") == 4 and "val_loss" in r][-1]  # the eval's line, appended


def test_eval_only_from_scratch_writes_nothing_into_a_run(data, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))
    before = snapshot(out)
    train.main(tiny_train_config(data, out, max_iters=2, eval_only=True))  # a random model's loss: printed only
    assert snapshot(out) == before
    train.main(tiny_train_config(data, tmp_path / "new", max_iters=2, eval_only=True))
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- non-finite numbers

@pytest.mark.parametrize("overrides,message", [
    (dict(learning_rate=float("inf")), "learning_rate must be a finite number, got inf"),
    (dict(min_lr=float("nan")), "min_lr must be a finite number, got nan"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*32\), got -1"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
])
def test_non_finite_or_out_of_range_numbers_are_refused_before_any_work(data, tmp_path, overrides, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        train.main(tiny_train_config(data, out, **overrides))
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--learning_rate=1e999"], "learning_rate: expected a finite number, got inf"),
    (["--seed=-1"], r"seed must be in \[0, 2\*\*32\), got -1"),
    (["CONFIG"], "learning_rate: expected a finite number, got nan"),
])
def test_non_finite_numbers_on_the_command_line_or_in_a_config_are_one_line(tmp_path, args, message):
    config = tmp_path / "nan.py"
    config.write_text("learning_rate = float('nan')\n")
    args = [str(config) if a == "CONFIG" else a for a in args]
    r = subprocess.run([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'out'}", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert any(__import__("re").search(message, line) for line in r.stderr.splitlines()), r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_diverged_run_never_saves_its_weights_over_the_finite_ones(data, tmp_path):
    """A learning rate far too large sends the weights to inf; the save that follows is refused, latest.json
    keeps naming the last finite checkpoint, and keep_last_n prunes nothing for the diverged one."""
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, keep_last_n=1))
    good = snapshot(out / "ckpt-0000004")
    with pytest.raises(UserError, match=r"val loss nan .*its weights are not saved. The last finite checkpoint "
                                        r"\(ckpt-0000004\) is untouched"):
        train.main(tiny_train_config(data, out, max_iters=12, eval_interval=2, keep_last_n=1, init_from="resume",
                                     learning_rate=1e30, min_lr=1e29, warmup_iters=0, grad_clip=0.0,
                                     max_bad_steps=2))
    assert ckpt_lib.read_checkpoint(out)[0].name == "ckpt-0000004" and snapshot(out / "ckpt-0000004") == good
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())


def test_a_save_of_weights_holding_inf_or_nan_is_refused(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 1}, model, keep_last_n=1)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(ckpt_lib.SaveFailed, match=r"hold inf or NaN \(transformer.h.0.mlp.c_fc.weight\).*"
                                                  r"The last finite checkpoint \(ckpt-0000001\) is untouched"):
        ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 2}, model, keep_last_n=1)
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-0000001"] and not list(tmp_path.glob(".ckpt-*"))


# ----------------------------------------------------------------------------- a stop signal does not wait

STOP_DURING_EVAL = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import model, train
from helpers import tiny_train_config
calls = {{"eval": 0}}
forward = model.GPT.forward
def slow_eval_forward(self, *a, **k):  # an evaluation of 400 batches at 50 ms each: 20 s
    if not self.training:
        calls["eval"] += 1
        if calls["eval"] == 1:
            print("EVALUATING", flush=True)
        time.sleep(0.05)
    return forward(self, *a, **k)
model.GPT.forward = slow_eval_forward
try:
    train.main(tiny_train_config({data!r}, {out!r}, max_iters=1000, eval_interval=5, eval_iters=400,
                                 initial_eval=False))
finally:
    print(f"EVAL FORWARDS {{calls['eval']}}", flush=True)
"""


def test_a_stop_signal_cuts_an_evaluation_short_and_saves(data, tmp_path):
    """SIGTERM in the middle of a long evaluation: a preemptible machine sends SIGKILL 30 s later, so the
    run leaves the evaluation at the next batch, saves the iteration it reached, and exits 0."""
    out = tmp_path / "out"
    code = STOP_DURING_EVAL.format(root=str(ROOT), tests=str(ROOT / "tests"), data=str(data), out=str(out))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("EVALUATING"):
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=300)
    printed = "".join(lines) + rest
    assert p.returncode == 0, printed[-3000:]
    forwards = int(printed.rsplit("EVAL FORWARDS ", 1)[1].split()[0])
    assert forwards < 40, printed[-3000:]  # of 400: the evaluation stopped within a few batches of the signal
    assert "evaluation cut short by the stop request" in printed
    _, state = ckpt_lib.read_checkpoint(out)
    assert state["iter_num"] == 5  # the iteration it reached, saved on the way out


# ----------------------------------------------------------------------------- damaged lock files

@pytest.mark.parametrize("content", ["[]", '{"pid": "x", "host": "h"}', "\x00\x01"])
def test_a_damaged_lock_file_is_taken_over_once_it_is_old(data, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").write_text(content)
    old = time.time() - 60
    os.utime(out / "run.lock", (old, old))
    assert train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))["iter_num"] == 2
    assert not (out / "run.lock").exists()  # given back at the end
