"""
FineWeb / FineWeb-Edu, or your own parquet / JSONL / text files -> GPT-2 token shards for train.py.

    python data/fineweb/prepare.py --dataset=fineweb-edu --sample=10BT --tokens=chinchilla:163e6
    python data/fineweb/prepare.py --data_files='corpus/**/*.parquet' --text_column=content --tokens=1e8
    python train.py config/train_gpt2_chinchilla.py      # its data_dir is the directory printed at the end

Documents are streamed (from the Hugging Face hub with `datasets` streaming, or read file by file),
tokenised with tiktoken's GPT-2 BPE in a process pool, each one preceded by the end-of-text token
50256 (as llm.c does), and cut into llm.c shards of `shard_size` tokens:
`<prefix>_val_NNNNNN.bin` holds the first `val_tokens` tokens of the stream, `<prefix>_train_NNNNNN.bin`
the rest, up to the training-token budget `--tokens` (3.2e9, or chinchilla:<params> = 20 x params;
validation comes on top of it). Without --tokens the whole input is used.

Offline (the hub unreachable, or HF_HUB_OFFLINE=1) --dataset stops at once, pointing to --data_files:
FineWeb is streamed, so there is no cache to fall back on; parquet files copied over work the same.

Where things go: shards are written to `<out_dir>/.partial/` with a progress file rewritten after
every finished shard. Only when the last shard is done are they moved into `<out_dir>` and meta.json
is written, so an interrupted preparation never looks like a dataset train.py could read.

Restarting: rerun the same command. Finished shards are verified against the sizes and sha256
checksums in the progress file and kept; the stream resumes at the recorded document and token offset
of the last good shard. Documents before it are skipped without tokenising them (parquet skips whole
row groups from the file footer, JSONL skips lines without parsing them, a hub stream restores the
`datasets` iterator state), which is exact because the stream is deterministic: files in sorted
order, rows in file order, the hub dataset pinned to the commit recorded at the first run.
Re-tokenising from the start would be just as correct, but on 10B tokens it costs hours.

Memory: one preallocated shard buffer (shard_size uint16 = 200 MB at the default), at most
2 x num_proc batches of about 1 MB of text in flight, and write_shard's copy of the buffer while it
writes: about 0.7 GB in the main process at the default settings, whatever the corpus size. Each
worker holds the BPE ranks and one batch.
"""

import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: its modules are not installed
from homegpt.errors import UserError  # noqa: E402
from configurator import run  # noqa: E402
from homegpt.dataloader import gpt2_encoding, read_header, shard_header, write_shard  # noqa: E402
from homegpt.fileio import check_dir_target, file_sha256, write_json  # noqa: E402


@dataclass
class PrepareConfig:
    dataset: str = ""              # 'fineweb' or 'fineweb-edu' (HuggingFaceFW/..., streamed); or set data_files
    sample: str = "10BT"           # hub subset: 10BT -> config sample-10BT; '' = all of it (not used with data_files)
    revision: str = "main"         # hub branch, tag or commit; the commit it resolves to is recorded and kept on resume
    data_files: str = ""           # glob of local .parquet / .jsonl / .json / .jsonl.gz / .txt files (** recurses)
    text_column: str = "text"      # column (parquet, hub) or key (JSONL) holding the document text
    tokens: str = ""               # training-token budget: 3.2e9, or chinchilla:163e6 (= 20 x params); '' = all input
    val_tokens: int = 10_000_000   # the first tokens of the stream, a fixed validation set never trained on
    shard_size: int = 100_000_000  # tokens per shard file (200 MB of uint16, the size of the write buffer)
    num_proc: int = 0              # tokeniser processes; 0 = all cores
    out_dir: str = ""              # '' = data/fineweb/<dataset>_<sample>_<budget>, named from these settings


HF_REPOS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
EOT = 50256                 # <|endoftext|>: the delimiter before every document
CHINCHILLA_RATIO = 20       # tokens per parameter (Hoffmann et al. 2022, "Training Compute-Optimal LLMs")
BATCH_CHARS = 1 << 20       # text per pool task: ~250k tokens amortises pickling, small enough to bound memory
BATCH_DOCS = 4096           # ... or this many (short) documents
MAX_TEXT_FILE = 256 << 20   # a .txt file is one document, read whole; larger ones would break the memory bound
STAGE, PROGRESS, META = ".partial", "progress.json", "meta.json"
PARQUET, JSONL, TEXT = (".parquet",), (".jsonl", ".json", ".jsonl.gz", ".json.gz"), (".txt",)


# ----------------------------------------------------------------------------- settings and names

def parse_token_budget(value):
    """'' / None / 0 -> None (all input); '3.2e9' or 3.2e9 -> 3_200_000_000; 'chinchilla:163e6' -> 20 x 163e6.
    Parameter and token counts may also end in K, M or B ('chinchilla:124M')."""
    if value is None or value == "" or value == 0:
        return None
    text = str(value).strip()
    how = "expected a number of tokens like 3.2e9, or chinchilla:<params> like chinchilla:163e6"
    ratio = 1
    if text.lower().startswith("chinchilla:"):
        text, ratio = text.split(":", 1)[1], CHINCHILLA_RATIO
    m = re.fullmatch(r"([0-9.]+(?:e\+?[0-9]+)?)\s*([kmb]?)", text.lower())
    try:
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2)] if m else None
    except ValueError:
        n = None
    if n is None or n < 1:
        raise UserError(f"--tokens={value!r}: {how}")
    return int(round(n * ratio))


def format_count(n):
    """3_260_000_000 -> '3.26e9', 1_000_000 -> '1e6', 12345 -> '12345': short, exact enough for a name."""
    s = f"{n:.6g}"
    return re.sub(r"e\+?0*(\d+)", r"e\1", s)


def hf_config_name(sample):
    """--sample=10BT -> 'sample-10BT' (FineWeb's subsets); '' -> 'default' (everything); else as given."""
    if not sample:
        return "default"
    return f"sample-{sample}" if re.fullmatch(r"\d+BT", sample) else sample


def check_config(cfg):
    """Every problem with the settings at once, as one ValueError."""
    errors = []
    if bool(cfg.dataset) == bool(cfg.data_files):
        errors.append("set exactly one of --dataset (fineweb or fineweb-edu) and --data_files (a glob)")
    if cfg.dataset and cfg.dataset not in HF_REPOS:
        errors.append(f"--dataset={cfg.dataset!r}: expected one of {', '.join(HF_REPOS)} (or use --data_files)")
    if not cfg.text_column:
        errors.append("--text_column is empty: name the column holding the text")
    if cfg.val_tokens < 1:
        errors.append(f"--val_tokens={cfg.val_tokens}: must be >= 1; train.py evaluates on it")
    if not 1 <= cfg.shard_size < 2 ** 31:
        errors.append(f"--shard_size={cfg.shard_size}: must be in [1, 2^31) (the header stores an int32 count)")
    if cfg.num_proc < 0:
        errors.append(f"--num_proc={cfg.num_proc}: must be >= 0 (0 = all cores)")
    try:
        parse_token_budget(cfg.tokens)
    except ValueError as e:
        errors.append(str(e))
    if errors:
        raise UserError("\n  ".join(errors))


OFFLINE_HINT = ("Without the hub, prepare local files instead: --data_files='corpus/*.parquet' "
                "(parquet, JSONL or .txt; --text_column names the text field), e.g. FineWeb parquet "
                "files copied from a machine with access.")


def require_hub(repo):
    """Stop at once when the hub is unreachable (or HF_HUB_OFFLINE=1): FineWeb is streamed, so no
    local cache could stand in, and the libraries would retry for ~30 s before failing."""
    from homegpt.hub import hub_unreachable_reason  # the same check as GPT-2 weights and benchmarks
    offline = hub_unreachable_reason()
    if offline:
        raise UserError(f"{repo} is streamed from the Hugging Face hub, which is unreachable ({offline}).\n"
                         f"{OFFLINE_HINT}")


def resolve_hf_revision(repo, revision):
    """The commit a branch or tag points at now, so that a resumed run streams exactly the same rows."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    require_hub(repo)
    from huggingface_hub import HfApi
    try:
        return HfApi().dataset_info(repo, revision=revision).sha
    except Exception as e:  # unknown revision, rate limit, a flaky proxy: all end here, with the hub's reason
        raise UserError(f"could not resolve {repo} revision {revision!r} on the Hugging Face hub: "
                         f"{type(e).__name__}: {e}\n{OFFLINE_HINT}") from e


def local_files(pattern):
    """The sorted files a glob matches, each with its size; ValueError when none or of unknown type."""
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not files:
        raise UserError(f"--data_files={pattern!r} matches no files (relative to {os.getcwd()}); "
                         f"check the path and quote the glob so the shell does not expand it")
    unknown = [f for f in files if not f.endswith(PARQUET + JSONL + TEXT)]
    if unknown:
        raise UserError(f"--data_files={pattern!r}: cannot read {unknown[:3]}: expected "
                         f"{', '.join(PARQUET + JSONL + TEXT)} files; narrow the glob")
    return [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files]


def describe_source(cfg, revision_sha=None):
    """What is read, recorded in progress and meta.json; a resume must read exactly the same."""
    if cfg.dataset:
        repo = HF_REPOS[cfg.dataset]
        return {"kind": "hub", "dataset": repo, "config": hf_config_name(cfg.sample), "split": "train",
                "revision": cfg.revision, "revision_sha": revision_sha}
    return {"kind": "files", "data_files": cfg.data_files, "files": local_files(cfg.data_files)}


def default_out_dir(cfg, budget):
    """data/fineweb/<what>_<budget>: every dataset and budget has its own directory."""
    if cfg.dataset:
        name = cfg.dataset + (f"_{cfg.sample}" if cfg.sample else "")
    else:  # a local glob: its directory's name plus a hash of the glob, so two globs never collide
        base = Path(re.split(r"[*?\[]", cfg.data_files, maxsplit=1)[0] or ".")
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", (base.name or base.resolve().name)).strip("-") or "files"
        name = f"local-{slug}-{hashlib.sha1(os.path.abspath(cfg.data_files).encode()).hexdigest()[:6]}"
    if budget:
        name += f"_{format_count(budget)}"
    return Path(__file__).resolve().parent / name


def shard_name(prefix, split, index):
    return f"{prefix}_{split}_{index:06d}.bin"


# ----------------------------------------------------------------------------- reading documents

def local_documents(files, column, skip=0):
    """Texts (None for a null value) of every document of the files in order, from document `skip` on.
    Skipped documents are not decoded: parquet skips row groups by the counts in its footer."""
    for info in files:
        path = info["path"]
        if path.endswith(PARQUET):
            pf = _parquet_file(path)
            names = pf.schema_arrow.names
            if column not in names:
                raise UserError(f"{path}: no column {column!r}; available: {names}. Pass --text_column=<one of them>")
            kind = pf.schema_arrow.field(column).type
            if str(kind) not in ("string", "large_string", "string_view"):
                raise UserError(f"{path}: column {column!r} holds {kind}, not text; "
                                 f"pass --text_column=<a text column>")
            first = 0  # whole row groups before the start are skipped from the footer's counts
            while first < pf.num_row_groups and skip >= pf.metadata.row_group(first).num_rows:
                skip -= pf.metadata.row_group(first).num_rows
                first += 1
            groups = list(range(first, pf.num_row_groups))
            for batch in (pf.iter_batches(batch_size=1024, columns=[column], row_groups=groups) if groups else ()):
                texts = batch.column(0).to_pylist()  # 1024 rows at a time, whatever the row group size
                if skip:
                    texts, skip = texts[skip:], max(0, skip - len(texts))
                yield from texts
        elif path.endswith(JSONL):
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue  # blank lines are not documents (and not counted)
                    if skip:
                        skip -= 1
                        continue
                    yield _json_text(line, column, path, lineno)
        else:  # one .txt file is one document
            if skip:
                skip -= 1
                continue
            if info["bytes"] > MAX_TEXT_FILE:
                raise UserError(f"{path}: {info['bytes']:,} bytes in one .txt document exceeds "
                                 f"{MAX_TEXT_FILE:,}; split it into several files or convert it to JSONL")
            try:
                yield Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from e


def _parquet_file(path):
    # pyarrow only where parquet is read: JSONL and text corpora prepare without it
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"{path}: reading parquet needs pyarrow: pip install pyarrow "
                         f"(JSONL and .txt files need nothing extra)") from e
    return pq.ParquetFile(path)


def _json_text(line, column, path, lineno):
    try:
        row = json.loads(line)
    except ValueError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e}); one JSON object per line is expected") from e
    if not isinstance(row, dict):
        raise UserError(f"{path}:{lineno}: a JSON {type(row).__name__}, expected an object with a {column!r} key")
    if column not in row:
        raise UserError(f"{path}:{lineno}: no key {column!r}; available: {sorted(row)}. "
                         f"Pass --text_column=<one of them>")
    text = row[column]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{path}:{lineno}: {column!r} holds a {type(text).__name__}, not text")
    return text


def load_hf_dataset(repo, config, revision):
    """The hub dataset as a `datasets` stream (rows are fetched as they are read, nothing is cached)."""
    require_hub(repo)
    import datasets
    return datasets.load_dataset(repo, name=config, split="train", streaming=True, revision=revision)


class HubDocuments:
    """Texts of a streamed hub dataset from document `start_doc` on, resumable from a saved iterator state.

    `position()` is (state, doc) such that loading `state` and skipping to `doc` continues right after
    the last text yielded; `datasets` records that state (shard, row) so nothing before it is re-read.
    """

    def __init__(self, source, column, start_doc=0, state=None, state_doc=0):
        self.ds = load_hf_dataset(source["dataset"], source["config"], source["revision_sha"])
        self.name = f"{source['dataset']} ({source['config']})"
        self.column, self.start_doc = column, start_doc
        self.state, self.doc, self.started = state, state_doc, False
        if state is not None:
            self.ds.load_state_dict(state)

    def position(self):
        return (self.ds.state_dict() if self.started else self.state), self.doc

    def __iter__(self):
        for row in self.ds:
            if not self.started and self.column not in row:
                raise UserError(f"{self.name}: no column {self.column!r}; available: {sorted(row)}. "
                                 f"Pass --text_column=<one of them>")
            self.started = True
            self.doc += 1
            if self.doc <= self.start_doc:
                continue
            text = row[self.column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"{self.name}: {self.column!r} holds a {type(text).__name__}, not text")
            yield text


class FileDocuments:
    """Local files as a document stream; position is just the document index (skipping is cheap)."""

    def __init__(self, source, column, start_doc=0, state=None, state_doc=0):
        self.source, self.column, self.start_doc = source, column, start_doc

    def position(self):
        return None, 0

    def __iter__(self):
        return local_documents(self.source["files"], self.column, self.start_doc)


def read_batches(docs, first_doc):
    """Group the stream into pool tasks of ~BATCH_CHARS of text: (first doc index, (state, state doc), texts).
    The position is taken before the batch's first document is read, so a resume can restart there."""
    it, doc = iter(docs), first_doc
    while True:
        position, texts, chars = docs.position(), [], 0
        for text in it:
            texts.append(text)
            chars += len(text) if text else 0
            if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
                break
        if not texts:
            return
        yield doc, position, texts
        doc += len(texts)


# ----------------------------------------------------------------------------- tokenising

_ENC = None  # one encoder per process; set in the parent before the pool forks so workers share it


def encode_batch(texts):
    """(tokens uint16, per-document lengths): each non-empty document becomes [EOT] + its BPE tokens.
    encode_ordinary treats '<|endoftext|>' inside a text as plain characters, never as the delimiter.
    Empty, whitespace-only or null documents get length 0 and no tokens."""
    global _ENC
    if _ENC is None:
        _ENC = gpt2_encoding()
    out, lengths = [], np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if text is None or not text.strip():
            continue
        ids = _ENC.encode_ordinary(text)
        out.append(EOT)
        out.extend(ids)
        lengths[i] = len(ids) + 1
    return np.array(out, dtype=np.uint16), lengths


def tokenize(batches, pool, in_flight):
    """Tokenised batches in input order. At most `in_flight` tasks are queued: Pool.imap would read
    the whole input ahead of the workers (the 90 GB OOMs of other prepare scripts)."""
    if pool is None:
        for first_doc, position, texts in batches:
            yield first_doc, position, encode_batch(texts)
        return
    pending = deque()
    for first_doc, position, texts in batches:
        pending.append((first_doc, position, pool.apply_async(encode_batch, (texts,))))
        if len(pending) >= in_flight:
            first_doc, position, result = pending.popleft()
            yield first_doc, position, result.get()
    while pending:
        first_doc, position, result = pending.popleft()
        yield first_doc, position, result.get()


# ----------------------------------------------------------------------------- writing shards

def shard_sha256(tokens):
    """sha256 of the shard file write_shard makes from these tokens, hashed from memory (no copy)."""
    h = hashlib.sha256(shard_header(tokens.size).tobytes())
    h.update(memoryview(np.ascontiguousarray(tokens, dtype=np.uint16)))
    return h.hexdigest()


class ShardWriter:
    """Fills a preallocated buffer from the token stream and writes a shard whenever it is full or a
    split ends (validation after val_tokens, training at the budget). After every shard the progress
    file records the stream position right after its last token, so a rerun continues from there."""

    def __init__(self, stage, prefix, shard_size, val_tokens, budget, progress):
        self.stage, self.prefix, self.progress = Path(stage), prefix, progress
        self.limits = {"val": val_tokens, "train": budget if budget else float("inf")}
        self.written = {s: sum(r["tokens"] for r in progress["shards"] if r["split"] == s) for s in ("val", "train")}
        self.count = {s: sum(r["split"] == s for r in progress["shards"]) for s in ("val", "train")}
        self.split = "val" if self.written["val"] < val_tokens else "train"
        start = progress["shards"][-1]["resume"] if progress["shards"] else START
        self.docs, self.empty = start["docs"], start["empty"]  # before the current batch
        self.done = self.written["train"] >= self.limits["train"]
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.final = None

    def tokens_done(self):
        return self.written["val"] + self.written["train"] + self.fill

    def add(self, first_doc, position, tokens, lengths, drop=0):
        """Take one tokenised batch starting at document first_doc, minus its first `drop` tokens
        (those of a partly written document on resume)."""
        ends = np.cumsum(lengths)
        total, t = (int(ends[-1]) if len(ends) else 0), drop
        while t < total and not self.done:
            room = self.limits[self.split] - self.written[self.split] - self.fill
            take = int(min(self.buf.size - self.fill, room, total - t))
            self.buf[self.fill:self.fill + take] = tokens[t:t + take]
            self.fill, t = self.fill + take, t + take
            if self.fill == self.buf.size or take == room:
                self._flush(self._resume(first_doc, position, lengths, ends, t))
        if self.done:
            return
        self.docs += int(np.count_nonzero(lengths))
        self.empty += int(np.count_nonzero(lengths == 0))

    def _resume(self, first_doc, position, lengths, ends, t):
        """Where the stream continues after token t of this batch: document index, token offset in it,
        counts of documents before it, and the reader's (state, doc) from which to skip there."""
        j = int(np.searchsorted(ends, t, side="right"))  # first document not completely written
        offset = t - (int(ends[j - 1]) if j else 0) if j < len(lengths) else 0
        state, state_doc = position
        return {"doc": first_doc + j, "offset": offset,
                "docs": self.docs + int(np.count_nonzero(lengths[:j])),
                "empty": self.empty + int(np.count_nonzero(lengths[:j] == 0)),
                "state": state, "state_doc": state_doc}

    def _flush(self, resume):
        split, tokens = self.split, self.buf[:self.fill]
        name = shard_name(self.prefix, split, self.count[split])
        write_shard(self.stage / name, tokens)
        self.progress["shards"].append({"file": name, "split": split, "tokens": int(tokens.size),
                                        "sha256": shard_sha256(tokens), "resume": resume})
        write_json(self.stage / PROGRESS, self.progress)
        self.written[split] += self.fill
        self.count[split] += 1
        self.fill = 0
        if split == "val" and self.written["val"] >= self.limits["val"]:
            self.split = "train"
        if self.written["train"] >= self.limits["train"]:
            self.done = True
            self.final = resume

    def finish(self, next_doc):
        """End of the input (or budget): write what the buffer holds and return the final counts."""
        if self.fill:
            self._flush({"doc": next_doc, "offset": 0, "docs": self.docs, "empty": self.empty,
                         "state": None, "state_doc": 0})
        if not self.done:  # the whole input was read: every document is counted
            return {"documents": self.docs, "empty_documents": self.empty}
        last = self.final or self.progress["shards"][-1]["resume"]  # the budget stopped it here
        return {"documents": last["docs"] + (1 if last["offset"] else 0), "empty_documents": last["empty"]}


START = {"doc": 0, "offset": 0, "docs": 0, "empty": 0, "state": None, "state_doc": 0}


# ----------------------------------------------------------------------------- resume bookkeeping

def verify_shard(path, record):
    """None when the file is exactly the recorded shard, else what is wrong with it."""
    if not path.exists():
        return "missing"
    try:
        _, n = read_header(path)
    except ValueError as e:
        return str(e)
    if n != record["tokens"]:
        return f"{n:,} tokens, expected {record['tokens']:,}"
    if file_sha256(path) != record["sha256"]:
        return "checksum differs"
    return None


def token_files(directory):
    d = Path(directory)
    return sorted(p.name for pat in ("*_train_*.bin", "*_val_*.bin", "train.bin", "val.bin") for p in d.glob(pat))


def settings_diff(old, new):
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def load_progress(stage, out_dir, settings):
    """The progress of an earlier run with the same settings, trimmed to its verified shards. Shards
    after the first damaged or missing one, and stray files (.tmp, unrecorded shards), are deleted so
    they are written again."""
    path = stage / PROGRESS
    progress = {"settings": settings, "shards": [], "complete": False}
    if path.exists():
        progress = json.loads(path.read_text())
        diff = settings_diff(progress["settings"], settings)
        if diff:
            raise UserError(f"{stage} holds an unfinished preparation with other settings ({'; '.join(diff)}); "
                             f"rerun with the same settings to continue it, or delete {out_dir} to start over")
    good = []
    for record in progress["shards"]:
        where = stage / record["file"] if (stage / record["file"]).exists() else out_dir / record["file"]
        problem = verify_shard(where, record)
        if problem:
            print(f"{where}: {problem}; writing it again from there")
            break
        good.append(record)
    if len(good) < len(progress["shards"]):
        progress["shards"], progress["complete"] = good, False
    keep = {r["file"] for r in good} | {PROGRESS}
    for p in stage.iterdir():
        if p.name not in keep:
            p.unlink()
    for name in token_files(out_dir):  # ours (checked by the caller), moved by an interrupted finish
        if name not in keep:
            (out_dir / name).unlink()
    write_json(path, progress)
    return progress


def finalize(stage, out_dir, progress, summary):
    """Move the shards into out_dir, then write meta.json last: its presence means complete."""
    for r in progress["shards"]:
        if (stage / r["file"]).exists():
            os.replace(stage / r["file"], out_dir / r["file"])
    s = progress["settings"]
    meta = {
        "tokenizer": "gpt2", "vocab_size": 50257, "eot_token": EOT,
        "train_tokens": sum(r["tokens"] for r in progress["shards"] if r["split"] == "train"),
        "val_tokens": sum(r["tokens"] for r in progress["shards"] if r["split"] == "val"),
        "source": s["source"], "text_column": s["text_column"], "train_token_budget": s["train_token_budget"],
        "shard_size": s["shard_size"], **summary,
        "shards": [{k: r[k] for k in ("file", "split", "tokens", "sha256")} for r in progress["shards"]],
        "settings": s,
    }
    write_json(out_dir / META, meta)
    shutil.rmtree(stage)
    return meta


def check_finished(out_dir, settings):
    """meta.json of an earlier complete run with the same settings, verified; None when there is none."""
    meta_path = out_dir / META
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    diff = settings_diff(meta.get("settings", {}), settings)
    if diff:
        raise UserError(f"{out_dir} already holds a dataset prepared with other settings ({'; '.join(diff)}); "
                         f"choose another --out_dir or delete it")
    for r in meta["shards"]:
        problem = verify_shard(out_dir / r["file"], r)
        if problem:
            raise UserError(f"{out_dir / r['file']}: {problem}; delete {out_dir} and prepare it again")
    return meta


# ----------------------------------------------------------------------------- main

def main(cfg):
    check_config(cfg)
    budget = parse_token_budget(cfg.tokens)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg, budget)
    check_dir_target(out_dir, "--out_dir")  # never into a run; a read-only place is refused before any work
    stage = out_dir / STAGE
    prefix = cfg.dataset or "local"
    settings = {"source": describe_source(cfg), "text_column": cfg.text_column, "val_tokens": cfg.val_tokens,
                "shard_size": cfg.shard_size, "train_token_budget": budget, "prefix": prefix, "tokenizer": "gpt2"}
    if settings["source"]["kind"] == "hub":  # keep the commit of the first run, resolve only when new
        settings["source"]["revision_sha"] = _recorded_sha(out_dir, stage, settings) or \
            resolve_hf_revision(settings["source"]["dataset"], cfg.revision)

    meta = check_finished(out_dir, settings)
    if meta is not None:
        print(f"{out_dir} is already prepared ({len(meta['shards'])} shards verified)")
        _print_done(out_dir, meta)
        return meta
    foreign = [n for n in token_files(out_dir) if not n.startswith(prefix + "_")]
    if foreign:  # another dataset's files would be read as part of this one
        raise UserError(f"{out_dir} holds token files that are not from this preparation ({foreign[:3]}); "
                         f"choose another --out_dir or delete them")
    created = not stage.exists()
    stage.mkdir(parents=True, exist_ok=True)
    progress = load_progress(stage, out_dir, settings)
    try:
        if not progress["complete"]:
            summary = _run(cfg, settings, stage, budget, progress)
            progress.update(complete=True, summary=summary)
            write_json(stage / PROGRESS, progress)
    except _InputUnusable:
        shutil.rmtree(stage)  # nothing worth resuming: leave no trace, not even a .partial
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    except BaseException:
        if created and not progress["shards"]:
            shutil.rmtree(stage, ignore_errors=True)  # failed before the first shard: no half-made dir
            if out_dir.exists() and not any(out_dir.iterdir()):
                out_dir.rmdir()
        elif progress["shards"]:
            print(f"stopped: {len(progress['shards'])} finished shards kept in {stage}; "
                  f"rerun the same command to continue", file=sys.stderr)
        raise
    meta = finalize(stage, out_dir, progress, progress["summary"])
    _print_done(out_dir, meta)
    return meta


class _InputUnusable(ValueError):
    """The input cannot make a dataset (empty, or too small for the validation set)."""


def _recorded_sha(out_dir, stage, settings):
    """The commit recorded by an earlier run of these settings (meta.json or progress), if any."""
    for path in (out_dir / META, stage / PROGRESS):
        if path.exists():
            old = json.loads(path.read_text()).get("settings", {})
            src = dict(old.get("source", {}), revision_sha=None)
            if src == settings["source"] and not settings_diff(
                    {k: v for k, v in old.items() if k != "source"},
                    {k: v for k, v in settings.items() if k != "source"}):
                return old["source"]["revision_sha"]
    return None


def _worker_signals():
    """Pool workers die on SIGTERM and leave Ctrl-C to the parent. A forked worker inherits the
    parent's Python handlers: under a SIGTERM handler that only sets a flag (train.py's StopFlag, once
    train.main ran in the same process) Pool.terminate() could not stop a worker and waited forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(cfg, settings, stage, budget, progress):
    """Stream, tokenise and write from the recorded position; returns the document counts."""
    global _ENC
    from tqdm import tqdm
    _ENC = gpt2_encoding()
    assert _ENC.eot_token == EOT, f"unexpected end-of-text id {_ENC.eot_token}"
    source = settings["source"]
    start = progress["shards"][-1]["resume"] if progress["shards"] else START
    writer = ShardWriter(stage, settings["prefix"], cfg.shard_size, cfg.val_tokens, budget, progress)
    if writer.done:
        return writer.finish(start["doc"])
    if progress["shards"]:
        print(f"resuming after {len(progress['shards'])} verified shards ({writer.tokens_done():,} tokens), "
              f"at document {start['doc']:,}")
    num_proc = cfg.num_proc or os.cpu_count() or 1
    # the pool forks before any reader thread or the shard buffer exists: workers start small and safe
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    pool = ctx.Pool(num_proc, initializer=_worker_signals) if num_proc > 1 else None
    reader = (HubDocuments if source["kind"] == "hub" else FileDocuments)(
        source, cfg.text_column, start["doc"], start["state"], start["state_doc"])
    total = cfg.val_tokens + budget if budget else _expected_tokens(cfg)
    # disable=None: drawn on a terminal, silent when stderr is a log file (a bar's redraws would fill it)
    bar = tqdm(total=total, initial=writer.tokens_done(), unit="tok", unit_scale=True, mininterval=1.0,
               desc="tokens", dynamic_ncols=True, disable=None)
    next_doc, drop = start["doc"], start["offset"]
    try:
        for first_doc, position, (tokens, lengths) in tokenize(read_batches(reader, start["doc"]), pool, 2 * num_proc):
            before = writer.tokens_done()
            writer.add(first_doc, position, tokens, lengths, drop)
            drop, next_doc = 0, first_doc + len(lengths)
            bar.update(writer.tokens_done() - before)
            bar.set_postfix(docs=f"{writer.docs:,}", empty=f"{writer.empty:,}", refresh=False)
            if writer.done:
                break
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # the budget may stop us with batches still queued
            pool.join()
    summary = writer.finish(next_doc)
    where = _source_name(source)
    if writer.written["val"] == 0 and writer.written["train"] == 0:
        raise _InputUnusable(f"{where}: no text found in column {cfg.text_column!r} "
                             f"({summary['empty_documents']:,} empty or null documents); nothing written")
    if writer.written["train"] == 0:
        raise _InputUnusable(f"{where}: only {writer.written['val']:,} tokens, all taken by the validation "
                             f"set (--val_tokens={cfg.val_tokens:,}); lower --val_tokens or add input")
    if budget and writer.written["train"] < budget:
        print(f"note: the input ended after {writer.written['train']:,} training tokens, "
              f"short of the budget of {budget:,}")
    return summary


def _expected_tokens(cfg):
    """For a progress bar ETA: FineWeb's sample-NBT subsets hold about N billion GPT-2 tokens."""
    m = re.fullmatch(r"(\d+)BT", cfg.sample) if cfg.dataset else None
    return int(m.group(1)) * 10 ** 9 if m else None


def _source_name(source):
    if source["kind"] == "hub":
        return f"{source['dataset']} ({source['config']})"
    return f"--data_files={source['data_files']!r} ({len(source['files'])} files)"


def _print_done(out_dir, meta):
    try:
        shown = os.path.relpath(out_dir)
    except ValueError:  # another drive on Windows
        shown = str(out_dir)
    shown = shown if not shown.startswith("..") else str(out_dir)
    print(f"{meta['documents']:,} documents ({meta['empty_documents']:,} empty or null skipped) -> "
          f"{meta['val_tokens']:,} validation + {meta['train_tokens']:,} training tokens in "
          f"{len(meta['shards'])} shards")
    print(f"dataset: {out_dir}")
    print(f"train on it with: python train.py <config> --data_dir={shown}")


if __name__ == "__main__":
    run(main, PrepareConfig)
