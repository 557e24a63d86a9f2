"""
Files that are never half-written: atomic writes, durable renames, hashes, JSON and JSON lines.

    from homegpt.fileio import atomic_write, write_json, read_json_lines
    write_json("out/latest.json", {"checkpoint": "ckpt-0000500"})

Every file the project writes (token shards, meta.json, checkpoints' JSON, metrics.jsonl rewrites,
exported pictures) goes through atomic_write: a crash, kill -9 or full disk leaves the old file or
the whole new one. This module imports the standard library only, so data-preparation workers and
plot.py load it without torch.

Before any slow work, every command that writes somewhere the user named checks the place here
(check_file_target, check_dir_target, check_writable): nothing but train.py writes into a run, and
a replacement is refused unless what is in the way is what that command writes itself.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

from homegpt.errors import UserError


def atomic_write(path, chunks):
    """Write byte chunks to path through a temporary file, fsync and rename: readers and crashes see
    the old file or the whole new one, never half of it. The one place every writer of the project uses."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path):
    """sha256 of a file, read in 16 MB blocks (checkpoint files and shards are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path):
    """Make a rename inside path durable. Windows cannot open directories; its renames are durable enough."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    """Atomic JSON file (see atomic_write)."""
    atomic_write(path, [json.dumps(obj, indent=1).encode()])


def write_json_lines(path, records):
    """Atomic JSON-lines file: one record per line."""
    atomic_write(path, ["".join(json.dumps(r) + "\n" for r in records).encode()])


def read_json_lines(path):
    """The records of a JSON-lines file that another process may be appending to: an unparsable line
    without its newline is the line being written (or the one a killed writer left) and is skipped;
    an unparsable complete line is damage: a ValueError naming the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.endswith("\n"):
                    break
                raise UserError(f"{path}:{lineno}: not valid JSON ({e}); delete or repair that line") from e
            if isinstance(rec, dict):
                records.append(rec)
    return records


# ----------------------------------------------------------------------------- what a writer may replace

# the signs of one of our runs (runs.py's and checkpoint.py's layout): a directory holding one of these files, or a
# ckpt-NNNNNNN directory, is a run's, and only train.py writes there
RUN_FILES = ("latest.json", "best.json", "state.json", "metrics.jsonl", "run.lock")
CKPT_PREFIX = "ckpt-"
JSON_OBJECT = b"{"  # how every JSON report (write_json of a dict) and JSON-lines record starts


def run_signs(directory):
    """The names in directory that make it one of our runs (RUN_FILES, ckpt-* directories), sorted;
    [] for a directory that is not a run or does not exist."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.name in RUN_FILES or p.name.startswith(CKPT_PREFIX))


def checkpoint_above(path):
    """The checkpoint directory path lies in (a ckpt-* directory, or one holding state.json), else None:
    a file written there would go with the checkpoint when it is pruned, and no command but train.py may."""
    for parent in Path(path).resolve().parents:
        if parent.name.startswith(CKPT_PREFIX) or (parent / "state.json").is_file():
            return parent
    return None


def check_writable(path, option, into=False):
    """Refuse in one line, before any slow work, a path this process cannot create (into=True: a
    directory it cannot write files into): one beneath a file, or in a directory it cannot write
    (read-only, another user's). A file is made and removed in the nearest directory that exists to
    find out, as the write itself would."""
    where = Path(path).absolute() if into else Path(path).absolute().parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise UserError(f"{option}={path}: {where} is a file, not a directory; choose another {option}")
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{option}={path}: cannot write in {where} ({e.strerror or e}); choose a directory "
                        f"you can write to") from e


def check_dir_target(directory, option):
    """Refuse in one line, before any slow work, a directory a command writes its files into (a dataset,
    a converted run) when it holds one of our runs or lies in a checkpoint, which only train.py writes,
    or when it cannot be written."""
    signs, above = run_signs(directory), checkpoint_above(directory)
    if signs or above:
        what = f"holds a run ({', '.join(signs[:3])})" if signs else f"lies in the checkpoint {above}"
        raise UserError(f"{option}={directory} {what}, which only train.py writes: choose another {option}")
    check_writable(directory, option, into=True)


def check_file_target(path, option, magic, kind, overwrite=True):
    """Refuse in one line, before any slow work, a file that a command writing one (a picture, a GGUF
    file, a JSON report) must not write: a directory, a run's own file, a file inside a checkpoint
    directory, a place it cannot write, and an existing file unless overwrite and it starts with
    `magic`, the bytes every file of `kind` that command writes starts with."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option}={path} is a directory: name a file")
    if path.name in RUN_FILES or checkpoint_above(path):
        raise UserError(f"{option}={path} would write into a run's own files, which only train.py writes: "
                        f"choose another {option}")
    check_writable(path, option)
    if not path.exists():
        return
    if not overwrite:
        raise UserError(f"{path} already exists: choose another {option} or pass --overwrite=True to replace it")
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        raise UserError(f"{path} is in the way and is not a {kind}, the only kind of file {option} replaces: "
                        f"choose another {option}, or move that file away")
