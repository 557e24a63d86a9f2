"""
An out_dir as a run: what it holds (checkpoints, pointers, metrics), the lock that lets one training
write it at a time, and its metrics.jsonl.

    from homegpt.runs import holds_run, read_metrics
    if holds_run("out-shakespeare-char"):
        print(read_metrics("out-shakespeare-char")[-1])      # the last logged record
    python -c "from homegpt.runs import run_files; print(run_files('out-shakespeare-char'))"

    out_dir/
      run.lock          the training that writes here now (host, process, start time, torchrun job)
      metrics.jsonl     one JSON record per log line, appended while the run goes (plot.py reads it)
      latest.json, best.json, ckpt-NNNNNNN/   the checkpoints: their format is checkpoint.py's

A second training into the same out_dir is refused before it reads or writes anything; a lock whose
holder is surely gone (kill -9, a reboot) is taken over, so a crash never needs a hand-deleted lock.
What a new run may delete, and what nothing may (a checkpoint, unless --overwrite), starts from
run_files here.
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path

from homegpt.errors import UserError
from homegpt.fileio import CKPT_PREFIX, read_json_lines, write_json, write_json_lines
from homegpt.runtime import broadcast_object


# ----------------------------------------------------------------------------- what out_dir holds

def checkpoint_dirs(out_dir):
    """The ckpt-NNNNNNN directories of a run, newest (highest iteration) first."""
    return sorted((p for p in Path(out_dir).glob(f"{CKPT_PREFIX}*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def holds_checkpoint(path):
    """True for one of our runs (an out_dir with latest.json or a ckpt-* directory, whether or not
    latest.json survived) or one checkpoint directory (state.json)."""
    p = Path(path)
    return (p / "latest.json").is_file() or (p / "state.json").is_file() or bool(checkpoint_dirs(p))


def holds_run(out_dir):
    """True when out_dir already holds a run: checkpoints or metrics that a new run would mix with."""
    p = Path(out_dir)
    return holds_checkpoint(p) or (p / "metrics.jsonl").is_file()


def run_files(out_dir, checkpoints=True):
    """What a run wrote into out_dir: its checkpoints (and the debris of a killed save), pointers and
    metrics, and nothing else; checkpoints=False leaves the ckpt-* directories out."""
    p = Path(out_dir)
    debris = sorted(p.glob(f".{CKPT_PREFIX}*.tmp-*"))
    return (checkpoint_dirs(p) if checkpoints else []) + debris + [f for f in (p / "latest.json", p / "best.json", p / "metrics.jsonl") if f.is_file()]


def delete_run_files(paths):
    """Remove the paths run_files listed (the caller has named them first)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- one run per out_dir

LOCK = "run.lock"


def _this_process():
    """Who holds a lock: the host, the process and when it started (so a reused process id after a
    reboot or a long time is not taken for the holder), and torchrun's job id."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
            "boot": boot.read_text().strip() if boot.is_file() else None,
            "job": os.environ.get("TORCHELASTIC_RUN_ID")}


def _start_time(pid):
    """The process's start time in clock ticks since boot (Linux), or None where it cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _holder_alive(lock, me):
    """False when the lock's holder is surely gone: this host, and the process is dead, another
    process now has its id, or the machine rebooted since. Another host's holder counts as alive."""
    if lock.get("host") != me["host"]:
        return True
    if lock.get("boot") and me["boot"] and lock["boot"] != me["boot"]:
        return False
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return lock.get("started") is None or _start_time(lock["pid"]) == lock["started"]


def _read_lock(path):
    """The lock's holder, or None for a lock cut off mid-write: being written this very moment when it
    is seconds old, else left by a writer that died."""
    try:
        lock = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(lock, dict) or not isinstance(lock.get("pid"), (int, type(None))) or isinstance(lock.get("pid"), bool):
        return None  # damaged: as good as cut off
    return lock


def claim_out_dir(out_dir, dist_info):
    """Rank 0 takes out_dir/run.lock, so that a second training started into the same out_dir (by
    mistake, or a restart racing a run still alive) is refused before it reads or writes anything,
    while the first goes on. A lock whose holder is gone (kill -9, a reboot), this process's own, or one
    of the same torchrun job (a restart after a worker died) is taken over. Every rank calls this."""
    error = None
    if dist_info.is_master:
        path, me = Path(out_dir) / LOCK, _this_process()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # created only if absent, so two runs starting at once cannot both take it
            with open(path, "x") as f:
                json.dump(me, f)
        except FileExistsError:
            held = _read_lock(path) or {"host": me["host"], "pid": None}
            ours = (held.get("pid"), held.get("host")) == (me["pid"], me["host"])
            same_job = me["job"] is not None and held.get("job") == me["job"]
            alive = _holder_alive(held, me) if held.get("pid") else time.time() - path.stat().st_mtime < 10
            if not ours and not same_job and alive:
                error = (f"out_dir={out_dir} is in use by a live run (host {held.get('host')}, process "
                         f"{held.get('pid')}): wait for it to end, or train into another --out_dir; if that process is "
                         f"surely gone, delete {path}")
            else:
                write_json(path, me)
    error = broadcast_object(error, dist_info)
    if error:
        raise UserError(error)


def release_out_dir(out_dir, remove_empty=False):
    """Rank 0 gives out_dir/run.lock back when the run ends, however it ends (a lock left by a crash is
    taken over). remove_empty: also remove out_dir when nothing else is in it (this run made it, and
    was refused before writing anything)."""
    path = Path(out_dir) / LOCK
    try:
        if (_read_lock(path) or {}).get("pid") == os.getpid():
            path.unlink()
        if remove_empty:
            Path(out_dir).rmdir()  # only an empty directory goes
    except OSError:
        pass  # nothing to give back (never taken, or taken over), or out_dir holds what the run wrote


# ----------------------------------------------------------------------------- metrics.jsonl

class MetricsFile:
    """A run's metrics.jsonl as train.py writes it (rank 0): one JSON record per line, flushed, and
    mirrored to wandb when a wandb run is given."""

    def __init__(self, out_dir, enabled=True, wandb_run=None):
        self.file = open(Path(out_dir) / "metrics.jsonl", "a") if enabled else None
        self.wandb = wandb_run

    def log(self, record):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])

    def close(self):
        if self.file is not None:
            self.file.close()


def read_metrics(out_dir):
    """The records of a run's metrics.jsonl (readable while the run is still writing it)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no metrics file; is {out_dir} a run's out_dir? (train.py writes out_dir/metrics.jsonl)")
    return read_json_lines(path)


def trim_metrics(path, last_iter):
    """On resume, drop metric lines past the checkpoint (a crash may have logged beyond it)."""
    if not Path(path).exists():
        return
    keep = [r for r in read_json_lines(path) if r.get("iter", 0) <= last_iter]
    write_json_lines(path, keep)
