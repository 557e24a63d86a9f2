"""Long runs come back by themselves: auto_resume continues a run with the same command, and one out_dir
holds one live training at a time (its lock is taken over once its holder is gone).

    python -m pytest -q tests/test_long_runs.py
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from homegpt import runs
import train
from homegpt.errors import UserError
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("data"), 30_000)


def losses(out):
    return [(m["iter"], m["train_loss"]) for m in read_metrics(out) if "train_loss" in m]


def test_the_same_command_starts_a_run_then_continues_it_exactly(data, tmp_path):
    """A crash after iteration 6's checkpoint, then the same command line (only the stop moved): the run
    ends as the uninterrupted one did (the schedule is lr_decay_iters', the same in both). The first
    start, into an empty out_dir, starts from init_from."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train.main(tiny_train_config(data, straight, max_iters=12, eval_interval=6))
    first = train.main(tiny_train_config(data, crashed, max_iters=6, eval_interval=6, auto_resume=True))
    assert first["iter_num"] == 6
    again = tiny_train_config(data, crashed, max_iters=12, eval_interval=6, auto_resume=True)
    assert again.init_from == "scratch"  # the same command: nothing says resume
    assert train.main(again)["iter_num"] == 12
    assert losses(crashed) == losses(straight)


def test_auto_resume_of_a_finished_run_trains_nothing_and_says_so(data, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, auto_resume=True))
    before = (out / "latest.json").read_text()
    result = train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, auto_resume=True))
    assert result["iter_num"] == 4 and "the run is finished and nothing was trained" in capsys.readouterr().out
    assert (out / "latest.json").read_text() == before


def test_auto_resume_refuses_a_run_of_another_shape(data, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2, auto_resume=True))
    with pytest.raises(UserError, match="n_layer"):
        train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, auto_resume=True, n_layer=3))


def test_auto_resume_starts_afresh_where_a_run_died_before_its_first_checkpoint(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"iter": 1, "train_loss": 9.0}) + "\n")
    with pytest.raises(UserError, match="already holds a run"):  # without auto_resume: refused, as before
        train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))
    train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2, auto_resume=True))
    assert [m["iter"] for m in read_metrics(out) if "train_loss" in m] == [1, 2]  # the dead run's line is gone


def test_a_second_training_into_a_live_runs_out_dir_is_refused_naming_it(data, tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        lock = dict(runs._this_process(), pid=live.pid, started=runs._start_time(live.pid))
        (out / runs.LOCK).write_text(json.dumps(lock))
        with pytest.raises(UserError, match=f"in use by a live run \\(host {socket.gethostname()}, process {live.pid}\\)"):
            train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))
        assert sorted(p.name for p in out.iterdir()) == [runs.LOCK]  # nothing read or written
    finally:
        live.kill()
        live.wait()
    # its holder is gone (as after kill -9): the next start takes the lock over, and gives it back at the end
    assert train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))["iter_num"] == 2
    assert not (out / runs.LOCK).exists()


def test_a_lock_from_before_a_reboot_or_of_the_same_torchrun_job_does_not_block(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    me = runs._this_process()
    (out / runs.LOCK).write_text(json.dumps(dict(me, pid=1, boot="another boot")))  # pid 1 is alive
    assert train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))["iter_num"] == 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    (out / runs.LOCK).write_text(json.dumps(dict(me, pid=1, started=None, job="job-7")))
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, init_from="resume"))
    (out / runs.LOCK).write_text(json.dumps(dict(me, pid=1, started=None, job="job-6")))
    with pytest.raises(UserError, match="in use by a live run"):  # pid 1 of another job on this boot: alive
        train.main(tiny_train_config(data, out, max_iters=6, eval_interval=2, init_from="resume"))
    assert os.path.exists(out / runs.LOCK)


def test_torchrun_restarts_without_auto_resume_are_warned_about(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")  # what torchrun --max-restarts=2 tells its workers
    train.main(tiny_train_config(data, tmp_path / "a", max_iters=2, eval_interval=2))
    assert "add --auto_resume=True" in capsys.readouterr().out
    train.main(tiny_train_config(data, tmp_path / "b", max_iters=2, eval_interval=2, auto_resume=True))
    assert "add --auto_resume=True" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- wrong input: one line, nothing written

@pytest.mark.parametrize("overrides,message", [
    (dict(learning_rate=-0.01), "learning_rate must be positive"),
    (dict(max_iters=0), "max_iters=0 trains nothing"),
    (dict(dtype="float16"), "dtype=float16 on a CPU"),
    (dict(dist_timeout_s=0), "dist_timeout_s must be positive"),
    (dict(batch_size=100_000, block_size=2048), "memory estimate above does NOT fit"),
])
def test_wrong_input_is_refused_before_any_work_and_writes_nothing(data, tmp_path, overrides, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        train.main(tiny_train_config(data, out, **overrides))
    assert not out.exists()


def test_an_out_dir_that_is_a_file_or_cannot_be_written_is_refused_before_any_work(data, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("notes")
    with pytest.raises(UserError, match="is a file, not a directory"):
        train.main(tiny_train_config(data, tmp_path / "taken" / "out"))
    assert (tmp_path / "taken").read_text() == "notes"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root may write anywhere: a read-only mount, as os sees it)
    with pytest.raises(UserError, match="cannot be written by this user"):
        train.main(tiny_train_config(data, tmp_path / "ro" / "out"))
    assert not (tmp_path / "ro").exists()


def test_a_run_that_does_not_fit_may_be_told_to_try_anyway(data, tmp_path, monkeypatch):
    from homegpt import memory
    monkeypatch.setattr(memory, "device_memory", lambda device: 1000)  # a machine with 1,000 bytes
    with pytest.raises(UserError, match="--ignore_memory_estimate=True"):
        train.main(tiny_train_config(data, tmp_path / "a", max_iters=2))
    assert train.main(tiny_train_config(data, tmp_path / "b", max_iters=2, ignore_memory_estimate=True))["iter_num"] == 2


def test_a_wrong_value_on_the_command_line_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char_cpu.py", "--learning_rate=-0.01",
                        f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-2:] == [
        "error: invalid configuration:", "  learning_rate must be positive, got -0.01"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
