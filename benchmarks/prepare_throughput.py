"""
How fast data/fineweb/prepare.py turns text into shards, and how much memory it takes while doing it.

    python benchmarks/prepare_throughput.py                      # ~120M tokens, all cores, default shards
    python benchmarks/prepare_throughput.py --tokens=50_000_000 --num_proc=2 --format=jsonl

Generates a synthetic but text-like corpus in a temporary directory (Zipf-distributed words with
punctuation, documents of a few hundred words, written a row group at a time so the generator never
holds the corpus), runs prepare.py on it in a subprocess with the default val_tokens and shard_size,
and prints tokens/s and the peak RSS of the largest process of that run (ru_maxrss of the children).
The default corpus (120M tokens) fills one whole default shard of 100M tokens, so the peak includes
the full shard buffer and write_shard's copy of it. Measured figures: docs/speed.md.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the checkout on sys.path)
from homegpt.errors import UserError
from configurator import configure
from homegpt.dataloader import gpt2_encoding

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "fineweb" / "prepare.py"


@dataclass
class BenchConfig:
    tokens: int = 120_000_000      # approximate corpus size in GPT-2 tokens (at least 50M for a stable rate)
    format: str = "parquet"        # 'parquet' (as FineWeb ships) or 'jsonl'
    num_proc: int = 0              # prepare.py's tokeniser processes; 0 = all cores
    shard_size: int = 100_000_000  # prepare.py's default
    val_tokens: int = 10_000_000   # prepare.py's default
    work_dir: str = ""             # '' = a temporary directory, deleted afterwards
    seed: int = 0


COMMON = ("the of and to a in is that for it as was with be by on not he this are or his from at which "
          "but have an they you were her she there one all we their been has when who will more no if out "
          "so said what up its about into than them can only other new some could time these two may then "
          "do first any my now such like our over man me even most made after also did many before must "
          "through back years where much your way well down should because each just those people how too").split()
SYLLABLES = "ka lo mi ne ru sa te vi zo an el in or un ba de fi go hu ja".split()


def vocabulary(rng, n=20_000):
    """Common English words first, then invented words of 2-4 syllables: a long, natural-looking tail."""
    made = {"".join(rng.choice(SYLLABLES, size=rng.integers(2, 5))) for _ in range(n * 2)}
    words = COMMON + sorted(made - set(COMMON))[:n - len(COMMON)]
    return np.array(words)


def word_forms(words):
    """Every word in 8 forms, (capitalised or not) x (no mark, '.', ',', '?'): documents are then built
    by indexing one array, fast enough to write hundreds of MB of text in seconds."""
    caps = np.array([w.capitalize() for w in words])
    return np.concatenate([np.char.add(base, mark) for base in (words, caps) for mark in ("", ".", ",", "?")])


def documents(rng, forms, n_docs):
    """n_docs documents of 50-800 Zipf-ranked words in sentences of ~15 words, capitalised, punctuated."""
    v = len(forms) // 8
    cdf = np.cumsum(1.0 / np.arange(1, v + 1))
    lengths = rng.integers(50, 800, size=n_docs)
    n = int(lengths.sum())
    ids = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), v - 1)
    end = rng.random(n) < 1 / 15                                       # a word that ends a sentence
    mark = np.where(end, rng.choice([1, 2, 3], size=n, p=[0.85, 0.1, 0.05]), 0)
    cap = np.concatenate([[True], end[:-1]])                           # the word after it starts one
    words = forms[ids + v * (mark + 4 * cap)].tolist()
    cuts = np.concatenate([[0], np.cumsum(lengths)])
    return [" ".join(words[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def write_corpus(directory, cfg):
    """Write the corpus a block of documents at a time until it holds about cfg.tokens tokens."""
    rng = np.random.default_rng(cfg.seed)
    forms = word_forms(vocabulary(rng))
    enc = gpt2_encoding()
    sample = documents(rng, forms, 200)
    tokens_per_char = sum(len(enc.encode_ordinary(d)) + 1 for d in sample) / sum(len(d) for d in sample)
    target_chars = cfg.tokens / tokens_per_char
    chars, block = 0, 500  # ~1 MB of text per block (and parquet row group)
    writer, handle = None, None
    if cfg.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        schema = pa.schema([("text", pa.string())])
        writer = pq.ParquetWriter(directory / "corpus-000.parquet", schema)
    elif cfg.format == "jsonl":
        handle = open(directory / "corpus-000.jsonl", "w")
    else:
        raise UserError(f"--format={cfg.format!r}: expected 'parquet' or 'jsonl'")
    while chars < target_chars:
        docs = documents(rng, forms, block)
        chars += sum(len(d) for d in docs)
        if writer is not None:
            writer.write_table(pa.table({"text": docs}, schema=schema))  # one row group per block
        else:
            handle.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (writer.close() if writer is not None else handle.close())
    return chars, tokens_per_char


def versions():
    out = {"python": platform.python_version()}
    for name in ("numpy", "tiktoken", "pyarrow", "tqdm"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(cfg):
    if cfg.tokens < 1_000_000:
        raise UserError(f"--tokens={cfg.tokens}: use at least 1,000,000 (50M+ for a stable rate)")
    tmp = tempfile.TemporaryDirectory(prefix="prepare-bench-") if not cfg.work_dir else None
    work = Path(cfg.work_dir or tmp.name)
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        chars, ratio = write_corpus(work / "corpus", cfg)
        gen_s = time.time() - t0
        corpus_mb = sum(p.stat().st_size for p in (work / "corpus").iterdir()) / 2 ** 20
        print(f"corpus: {chars / 1e6:,.0f}M characters, {corpus_mb:,.0f} MB {cfg.format} on disk, "
              f"~{chars * ratio / 1e6:,.0f}M tokens ({ratio:.3f} tokens/char), generated in {gen_s:.0f} s")

        args = [sys.executable, str(SCRIPT), f"--data_files={work / 'corpus'}/*.{cfg.format}",
                f"--out_dir={work / 'out'}", f"--num_proc={cfg.num_proc}", f"--shard_size={cfg.shard_size}",
                f"--val_tokens={cfg.val_tokens}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        t0 = time.time()
        r = subprocess.run(args, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode:
            raise SystemExit(f"prepare.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak_mb = peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2 ** 20  # bytes on macOS
        meta = json.loads((work / "out" / "meta.json").read_text())
        total = meta["train_tokens"] + meta["val_tokens"]
    finally:
        if tmp is not None:
            tmp.cleanup()

    procs = cfg.num_proc or os.cpu_count()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {platform.system()} {platform.release()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"prepare.py --num_proc={procs} --shard_size={cfg.shard_size:,} --val_tokens={cfg.val_tokens:,}")
    print(f"tokens: {total:,} ({meta['documents']:,} documents, {len(meta['shards'])} shards)")
    print(f"time: {wall:.1f} s including start-up -> {total / wall / 1e6:.2f}M tokens/s "
          f"({total / wall / procs / 1e6:.2f}M per process), {corpus_mb / wall:.1f} MB/s of {cfg.format}")
    print(f"peak RSS of the largest process: {peak_mb:,.0f} MB (corpus {corpus_mb:,.0f} MB)")
    return {"tokens": total, "seconds": wall, "tokens_per_sec": total / wall, "peak_rss_mb": peak_mb}


if __name__ == "__main__":
    try:
        main(configure(BenchConfig))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
