"""
Files that are never half-written: atomic writes, durable renames, hashes, JSON and JSON lines.

    from fileio import atomic_write, write_json, read_json_lines
    write_json("out/latest.json", {"checkpoint": "ckpt-0000500"})

Every file the project writes (token shards, meta.json, checkpoints' JSON, metrics.jsonl rewrites,
exported pictures) goes through atomic_write: a crash, kill -9 or full disk leaves the old file or
the whole new one. This module imports the standard library only, so data-preparation workers and
plot.py load it without torch.
"""

import hashlib
import json
import os
from pathlib import Path

from errors import UserError


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
