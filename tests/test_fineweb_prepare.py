"""data/fineweb/prepare.py on local parquet / JSONL / text corpora and a stand-in for the hub stream.

    python -m pytest -q tests/test_fineweb_prepare.py
"""

import hashlib
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from homegpt.dataloader import TokenData, gpt2_encoding, read_header

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "fineweb" / "prepare.py"
EOT = 50256


def _load_prepare():
    spec = importlib.util.spec_from_file_location("fineweb_prepare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fineweb_prepare"] = module  # the process pool pickles encode_batch by module name
    spec.loader.exec_module(module)
    return module


prep = _load_prepare()

WORDS = ("the of and to a in is was for on with as by at from it that this be are river stone light "
         "Zürich naïve café 東京 😀 don't we'll 2024 3.14 -- (x) \"quoted\"").split()


def make_docs(n, seed=0, max_words=120):
    """Text-like documents with unicode, numbers, contractions, plus the awkward cases prepare must
    survive: empty, whitespace-only and null documents, and one that spells out <|endoftext|>."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]
    docs[3] = ""
    docs[5] = None
    docs[8] = "  \n\t "
    docs[10] = "a story ends here <|endoftext|> and another begins\n\nsecond paragraph"
    return docs


def expected_stream(docs):
    enc = gpt2_encoding()
    out = []
    for d in docs:
        if d is not None and d.strip():
            out.append(EOT)
            out.extend(enc.encode_ordinary(d))
    return np.array(out, dtype=np.uint16)


def write_parquet(path, docs, row_group_size=7):
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    table = pa.table({"id": list(range(len(docs))), "text": docs}, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)


def write_jsonl(path, docs, key="text"):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}) + "\n")
            if i % 50 == 0:
                f.write("\n")  # blank lines are not documents


def read_split(out_dir, split):
    """All tokens of one split, in shard order, checking every header on the way."""
    files = sorted(Path(out_dir).glob(f"*_{split}_*.bin"))
    parts = []
    for f in files:
        offset, n = read_header(f)
        parts.append(np.fromfile(f, dtype=np.uint16, offset=offset))
        assert parts[-1].size == n
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16), files


def dir_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir()) if p.suffix == ".bin"}


def cfg_for(tmp_path, pattern, **kw):
    kw.setdefault("val_tokens", 1000)
    kw.setdefault("shard_size", 2000)
    kw.setdefault("num_proc", 1)
    kw.setdefault("out_dir", str(tmp_path / "out"))
    return prep.PrepareConfig(data_files=str(pattern), **kw)


@pytest.fixture
def corpus(tmp_path):
    """Three parquet files (the middle one empty of rows is not allowed by shape; use small row groups)."""
    docs = make_docs(240)
    d = tmp_path / "corpus"
    d.mkdir()
    write_parquet(d / "part-000.parquet", docs[:100])
    write_parquet(d / "part-001.parquet", docs[100:180])
    write_parquet(d / "part-002.parquet", docs[180:])
    return d / "*.parquet", docs


# ----------------------------------------------------------------------------- what lands in the shards

def test_stream_is_val_then_train_with_one_delimiter_per_document(tmp_path, corpus):
    pattern, docs = corpus
    meta = prep.main(cfg_for(tmp_path, pattern))
    stream = expected_stream(docs)
    nonempty = sum(1 for d in docs if d is not None and d.strip())
    out = tmp_path / "out"

    val, val_files = read_split(out, "val")
    train, train_files = read_split(out, "train")
    # val is exactly the first val_tokens of the stream, train all the rest: disjoint, nothing lost
    assert val.size == 1000 and np.array_equal(val, stream[:1000])
    assert np.array_equal(train, stream[1000:])
    assert val.size + train.size == stream.size
    assert int((np.concatenate([val, train]) == EOT).sum()) == nonempty  # one EOT before each document
    # fixed-size shards, only the last of each split shorter
    sizes = [read_header(f)[1] for f in train_files]
    assert all(s == 2000 for s in sizes[:-1]) and 0 < sizes[-1] <= 2000
    assert [f.name for f in val_files] == ["local_val_000000.bin"]
    assert train_files[0].name == "local_train_000000.bin"

    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert (meta["val_tokens"], meta["train_tokens"]) == (val.size, train.size)
    assert meta["documents"] == nonempty and meta["empty_documents"] == len(docs) - nonempty == 3
    for r in meta["shards"]:  # the recorded size and checksum are those of the file on disk
        data = (out / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert len(data) == 1024 + 2 * r["tokens"]
    assert len(meta["source"]["files"]) == 3
    assert json.loads((out / "meta.json").read_text()) == meta
    assert not (out / ".partial").exists()
    # and train.py's loader reads the directory as it is
    assert TokenData(out, "train").n_tokens == train.size
    assert TokenData(out, "val").n_tokens == 1000


def test_jsonl_and_text_files(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 50)  # a batch per document: the trailing empties come last, alone
    docs = make_docs(60, seed=1)
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", docs[:40])
    (d / "sub" / "b.txt").write_text("a whole text file is one document", encoding="utf-8")
    (d / "sub" / "c.txt").write_text("", encoding="utf-8")  # an empty file is an empty document
    write_jsonl(d / "sub" / "d.jsonl", docs[40:] + ["", None])  # trailing empties, after the last token
    # sorted paths: a.jsonl, sub/b.txt, sub/c.txt, sub/d.jsonl
    ordered = docs[:40] + ["a whole text file is one document", ""] + docs[40:]
    stream = expected_stream(ordered)
    # one training shard that ends exactly with the input: the trailing empties still count
    meta = prep.main(cfg_for(tmp_path, d / "**" / "*.*", val_tokens=100, shard_size=stream.size - 100))
    val, _ = read_split(tmp_path / "out", "val")
    train, files = read_split(tmp_path / "out", "train")
    assert len(files) == 1 and np.array_equal(np.concatenate([val, train]), stream)
    # '', None, whitespace, the empty file and the 2 trailing ones; blank lines are not documents
    assert meta["empty_documents"] == 6
    assert meta["documents"] == sum(1 for x in ordered if x and x.strip())


def test_jsonl_and_text_need_no_pyarrow(tmp_path, monkeypatch):
    # pyarrow is imported only where parquet is read; None in sys.modules makes any import of it fail
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    docs = make_docs(40, seed=2)
    write_jsonl(tmp_path / "a.jsonl", docs)
    (tmp_path / "b.txt").write_text("a text file is one document", encoding="utf-8")
    prep.main(cfg_for(tmp_path, tmp_path / "*.*", val_tokens=100))
    val, _ = read_split(tmp_path / "out", "val")
    train, _ = read_split(tmp_path / "out", "train")
    assert np.array_equal(np.concatenate([val, train]), expected_stream(docs + ["a text file is one document"]))
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"c\.parquet: reading parquet needs pyarrow: pip install pyarrow"):
        prep.main(cfg_for(tmp_path, tmp_path / "c.parquet", out_dir=str(tmp_path / "out2")))


def test_endoftext_inside_a_document_is_ordinary_text(tmp_path):
    docs = ["before <|endoftext|> after", "<|endoftext|>", "plain"]
    write_jsonl(tmp_path / "eot.jsonl", docs)
    prep.main(cfg_for(tmp_path, tmp_path / "eot.jsonl", val_tokens=2, shard_size=100))
    val, _ = read_split(tmp_path / "out", "val")
    train, _ = read_split(tmp_path / "out", "train")
    tokens = np.concatenate([val, train])
    assert int((tokens == EOT).sum()) == 3  # only the delimiters, never the text
    assert gpt2_encoding().decode(tokens[1:tokens.tolist().index(EOT, 1)].tolist()) == docs[0]


def test_token_budget_cuts_training_exactly(tmp_path, corpus):
    pattern, docs = corpus
    meta = prep.main(cfg_for(tmp_path, pattern, tokens="4.5e3"))
    stream = expected_stream(docs)
    train, files = read_split(tmp_path / "out", "train")
    assert train.size == meta["train_tokens"] == 4500  # the budget counts training tokens; val comes on top
    assert np.array_equal(train, stream[1000:5500])
    assert [read_header(f)[1] for f in files] == [2000, 2000, 500]
    assert meta["train_token_budget"] == 4500


def test_token_budget_parsing_and_directory_names():
    assert prep.parse_token_budget("") is None
    assert prep.parse_token_budget("3.2e9") == 3_200_000_000
    assert prep.parse_token_budget("chinchilla:163e6") == 3_260_000_000  # 20 tokens per parameter
    assert prep.parse_token_budget("chinchilla:124M") == 2_480_000_000
    for bad in ("lots", "-5", "chinchilla:", "1e9tokens"):
        with pytest.raises(ValueError, match="--tokens"):
            prep.parse_token_budget(bad)
    cfg = prep.PrepareConfig(dataset="fineweb-edu", sample="10BT")
    assert prep.default_out_dir(cfg, 3_200_000_000).name == "fineweb-edu_10BT_3.2e9"
    assert prep.default_out_dir(cfg, 3_260_000_000).name == "fineweb-edu_10BT_3.26e9"
    assert prep.default_out_dir(cfg, None).name == "fineweb-edu_10BT"
    a = prep.default_out_dir(prep.PrepareConfig(data_files="/x/corpus/*.parquet"), None).name
    b = prep.default_out_dir(prep.PrepareConfig(data_files="/x/corpus/*.jsonl"), None).name
    assert a.startswith("local-corpus-") and a != b  # two globs never share a directory
    assert prep.hf_config_name("10BT") == "sample-10BT" and prep.hf_config_name("") == "default"


def test_missing_tokens_hint_prepares_the_same_directory():
    # dataloader's "no train tokens" hint reverses default_out_dir: the command it names must write
    # exactly the directory train.py looked in, for the configs' data_dirs and any budget
    import shlex

    from configurator import parse_config
    from homegpt.dataloader import prepare_command
    settings = [("fineweb-edu", "10BT", ""), ("fineweb-edu", "10BT", "chinchilla:163e6"), ("fineweb", "", "3.2e9"),
                ("fineweb", "CC-MAIN-2024-10", "chinchilla:124M"), ("fineweb-edu", "100BT", "1234567")]
    dirs = [prep.default_out_dir(prep.PrepareConfig(dataset=d, sample=s), prep.parse_token_budget(t))
            for d, s, t in settings]
    for config in sorted((ROOT / "config").glob("train_gpt2*.py")):  # the recipes that read FineWeb
        m = re.search(r'^data_dir = "(data/fineweb/[^"]+)"', config.read_text(), re.M)
        assert m, f"{config.name}: no data/fineweb/ data_dir"
        dirs.append(ROOT / m.group(1))
    for d in dirs:
        command = shlex.split(prepare_command(d))
        assert command[:2] == ["python", str(SCRIPT)], command
        cfg = parse_config(prep.PrepareConfig, command[2:])
        assert prep.default_out_dir(cfg, prep.parse_token_budget(cfg.tokens)) == d, command


# ----------------------------------------------------------------------------- same input, same bytes

def test_two_runs_and_any_num_proc_give_identical_bytes(tmp_path, corpus, monkeypatch):
    pattern, _ = corpus
    monkeypatch.setattr(prep, "BATCH_CHARS", 3000)  # many small pool tasks, so ordering is really exercised
    prep.main(cfg_for(tmp_path, pattern, out_dir=str(tmp_path / "a")))
    prep.main(cfg_for(tmp_path, pattern, out_dir=str(tmp_path / "b")))
    prep.main(cfg_for(tmp_path, pattern, out_dir=str(tmp_path / "c"), num_proc=2))
    a = dir_bytes(tmp_path / "a")
    assert len(a) > 3
    assert a == dir_bytes(tmp_path / "b") == dir_bytes(tmp_path / "c")


def test_pool_stops_when_the_process_has_a_flag_only_sigterm_handler(tmp_path):
    # train.main's StopFlag turns SIGTERM into a flag and stays installed (in-process tests, notebooks).
    # Pool workers forked under it ignored Pool.terminate()'s SIGTERM, and one left waiting for the task
    # queue's lock (which terminate takes) hung the run forever: a race, lost within 3 runs of 10 when
    # measured. In a subprocess, so that a hang is a timeout here, not a stuck suite.
    write_jsonl(tmp_path / "c.jsonl", make_docs(400, seed=3))
    code = f"""
import importlib.util, signal, sys
signal.signal(signal.SIGTERM, lambda signum, frame: None)
spec = importlib.util.spec_from_file_location("fineweb_prepare", {str(SCRIPT)!r})
prep = importlib.util.module_from_spec(spec)
sys.modules["fineweb_prepare"] = prep
spec.loader.exec_module(prep)
prep.BATCH_CHARS = 100  # many small tasks; the budget stops the stream with some still queued
for run in range(10):
    prep.main(prep.PrepareConfig(data_files={str(tmp_path / "c.jsonl")!r}, val_tokens=100, tokens="200",
                                 shard_size=1000, num_proc=6, out_dir={str(tmp_path)!r} + f"/out{{run}}"))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stuck workers too, not only their parent
        proc.communicate()
        pytest.fail("prepare.py hung: its pool workers survived Pool.terminate()")
    assert proc.returncode == 0, err[-2000:]
    assert [TokenData(tmp_path / f"out{run}", "train").n_tokens for run in range(10)] == [200] * 10


# ----------------------------------------------------------------------------- interruption and resume

def _interrupt_after(monkeypatch, n_shards):
    real, calls = prep.write_shard, []

    def flaky(path, tokens):
        if len(calls) == n_shards:
            raise KeyboardInterrupt("simulated crash")
        calls.append(path)
        real(path, tokens)
    monkeypatch.setattr(prep, "write_shard", flaky)


def _count_encoded(monkeypatch):
    real, seen = prep.encode_batch, []

    def counting(texts):
        seen.append(len(texts))
        return real(texts)
    monkeypatch.setattr(prep, "encode_batch", counting)
    return seen


def test_interrupted_run_resumes_to_identical_output(tmp_path, corpus, monkeypatch):
    pattern, docs = corpus
    monkeypatch.setattr(prep, "BATCH_CHARS", 2000)
    prep.main(cfg_for(tmp_path, pattern, out_dir=str(tmp_path / "ref")))

    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            prep.main(cfg_for(tmp_path, pattern))
    out = tmp_path / "out"
    assert not (out / "meta.json").exists()  # nothing looks complete...
    with pytest.raises(FileNotFoundError):
        TokenData(out, "train")  # ...and train.py finds no data to start on
    progress = json.loads((out / ".partial" / "progress.json").read_text())
    assert len(progress["shards"]) == 3 and 0 < progress["shards"][-1]["resume"]["offset"]  # cut mid-document

    seen = _count_encoded(monkeypatch)
    prep.main(cfg_for(tmp_path, pattern))
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref")
    ref_meta = json.loads((tmp_path / "ref" / "meta.json").read_text())
    assert json.loads((out / "meta.json").read_text())["shards"] == ref_meta["shards"]
    # documents before the resume point were skipped, not tokenised again
    assert sum(seen) == len(docs) - progress["shards"][-1]["resume"]["doc"]


def test_missing_or_damaged_shard_is_written_again(tmp_path, corpus, monkeypatch):
    pattern, _ = corpus
    prep.main(cfg_for(tmp_path, pattern, out_dir=str(tmp_path / "ref")))
    with monkeypatch.context() as m:
        _interrupt_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            prep.main(cfg_for(tmp_path, pattern))
    stage = tmp_path / "out" / ".partial"
    (stage / "local_train_000002.bin").unlink()                # lost
    damaged = bytearray((stage / "local_train_000001.bin").read_bytes())
    damaged[-1] ^= 0xFF                                        # one bit pattern changed, same size
    (stage / "local_train_000001.bin").write_bytes(bytes(damaged))
    prep.main(cfg_for(tmp_path, pattern))
    assert dir_bytes(tmp_path / "out") == dir_bytes(tmp_path / "ref")


def test_rerun_of_a_finished_dataset_keeps_it_and_other_settings_are_refused(tmp_path, corpus):
    pattern, _ = corpus
    meta = prep.main(cfg_for(tmp_path, pattern))
    shard = tmp_path / "out" / meta["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    assert prep.main(cfg_for(tmp_path, pattern)) == meta
    assert shard.stat().st_mtime_ns == mtime  # verified, not rewritten
    with pytest.raises(ValueError, match="shard_size"):
        prep.main(cfg_for(tmp_path, pattern, shard_size=3000))


@pytest.fixture
def hub(monkeypatch):
    """Sets what hub.hub_unreachable_reason answers (None = reachable): no test asks the network."""
    from homegpt import hub as hub_lib
    state = {"reason": None}
    monkeypatch.setattr(hub_lib, "hub_unreachable_reason", lambda: state["reason"])
    return state


def test_hub_stream_is_pinned_and_resumes_from_the_iterator_state(tmp_path, corpus, monkeypatch, hub):
    import datasets
    pattern, docs = corpus
    files = sorted(str(p) for p in pattern.parent.glob(pattern.name))
    calls, rows_read, real_load = [], [], datasets.load_dataset

    def fake_load_dataset(path, name=None, split=None, streaming=False, revision=None, **kw):
        calls.append((path, name, split, streaming, revision))
        ds = real_load("parquet", data_files=files, split="train", streaming=True)
        return ds.map(lambda row: rows_read.append(1) or row)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(prep, "resolve_hf_revision", lambda repo, rev: "c0ffee" * 6 + "c0ff")
    monkeypatch.setattr(prep, "BATCH_CHARS", 2000)
    hub = dict(dataset="fineweb-edu", sample="10BT", val_tokens=1000, shard_size=2000, num_proc=1)

    ref = prep.main(prep.PrepareConfig(**hub, out_dir=str(tmp_path / "ref")))
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True, "c0ffee" * 6 + "c0ff")
    assert ref["source"]["revision_sha"] == "c0ffee" * 6 + "c0ff"
    stream = expected_stream(docs)
    val, _ = read_split(tmp_path / "ref", "val")
    train, _ = read_split(tmp_path / "ref", "train")
    assert np.array_equal(np.concatenate([val, train]), stream)

    with monkeypatch.context() as m:
        _interrupt_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            prep.main(prep.PrepareConfig(**hub, out_dir=str(tmp_path / "out")))
    # the hub moved on meanwhile: the resumed run must keep streaming the recorded commit
    monkeypatch.setattr(prep, "resolve_hf_revision", lambda repo, rev: pytest.fail("resolved again"))
    resume = json.loads((tmp_path / "out" / ".partial" / "progress.json").read_text())["shards"][-1]["resume"]
    assert resume["state"] is not None and resume["state_doc"] > 0
    rows_read.clear()
    prep.main(prep.PrepareConfig(**hub, out_dir=str(tmp_path / "out")))
    assert calls[-1][-1] == "c0ffee" * 6 + "c0ff"
    assert dir_bytes(tmp_path / "out") == dir_bytes(tmp_path / "ref")
    # restored from the iterator state: rows before it were not streamed again
    assert len(rows_read) == len(docs) - resume["state_doc"]


# ----------------------------------------------------------------------------- bad input

def test_missing_text_column_names_file_and_columns(tmp_path, corpus):
    pattern, _ = corpus
    with pytest.raises(ValueError, match=r"part-000\.parquet.*'body'.*\['id', 'text'\]"):
        prep.main(cfg_for(tmp_path, pattern, text_column="body"))
    assert not (tmp_path / "out").exists()  # failed before any shard: nothing left behind
    write_jsonl(tmp_path / "x.jsonl", ["hello"], key="content")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: no key 'text'.*\['content', 'id'\]"):
        prep.main(cfg_for(tmp_path, tmp_path / "x.jsonl"))


def test_unreachable_hub_stops_at_once_pointing_to_data_files(tmp_path, monkeypatch, hub):
    # FineWeb is streamed: offline there is no cache to try, and the hub libraries would retry for
    # ~30 s. Neither the revision lookup nor the stream may be attempted.
    import datasets
    import huggingface_hub
    hub["reason"] = "https://huggingface.co: [Errno -2] Name or service not known"
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("streamed from the hub"))
    pinned = "0123456789abcdef" * 2 + "01234567"  # a commit: no lookup, straight to the stream
    for revision in ("main", pinned):
        out = tmp_path / f"out-{revision[:4]}"
        with pytest.raises(ValueError) as e:
            prep.main(prep.PrepareConfig(dataset="fineweb-edu", sample="10BT", revision=revision, num_proc=1,
                                         out_dir=str(out)))
        msg = str(e.value)
        assert f"HuggingFaceFW/fineweb-edu is streamed from the Hugging Face hub, which is unreachable " \
               f"({hub['reason']})" in msg
        assert "--data_files='corpus/*.parquet'" in msg and "JSONL" in msg
        assert not out.exists()  # nothing half-made left behind


def test_no_matching_files_empty_and_too_small_inputs(tmp_path):
    with pytest.raises(ValueError, match="matches no files"):
        prep.main(cfg_for(tmp_path, tmp_path / "nothing" / "*.parquet"))
    write_parquet(tmp_path / "empty.parquet", [])
    write_parquet(tmp_path / "nulls.parquet", [None, "", "   "])
    for name in ("empty.parquet", "nulls.parquet"):
        with pytest.raises(ValueError, match="no text found in column 'text'"):
            prep.main(cfg_for(tmp_path, tmp_path / name))
        assert not (tmp_path / "out").exists()
    write_jsonl(tmp_path / "small.jsonl", ["just a few words"])
    with pytest.raises(ValueError, match="all taken by the validation set.*--val_tokens"):
        prep.main(cfg_for(tmp_path, tmp_path / "small.jsonl"))
    assert not (tmp_path / "out").exists()  # the val shard it wrote is gone too
    with pytest.raises(ValueError, match="exactly one of --dataset"):
        prep.main(prep.PrepareConfig(dataset="fineweb", data_files="x/*.parquet"))
    with pytest.raises(ValueError, match="'openwebtext'"):
        prep.main(prep.PrepareConfig(dataset="openwebtext"))


def test_script_exits_non_zero_with_the_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(SCRIPT), f"--data_files={tmp_path}/missing/*.jsonl"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "matches no files" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- bounded memory

GEN_WORDS = ("the of and to a in is was for on with as by at from it that this be are have not they "
             "river mountain valley history science energy language people children water music").split()


def _write_corpus(path, n_bytes, seed):
    """A JSONL corpus of about n_bytes, written a block at a time (never whole in memory)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(GEN_WORDS)
    written = 0
    with open(path, "w") as f:
        while written < n_bytes:
            words = vocab[rng.integers(len(vocab), size=200_000)]
            cuts = np.cumsum(rng.integers(50, 400, size=2000))
            cuts = cuts[cuts < words.size]
            for doc in np.split(words, cuts):
                line = json.dumps({"text": " ".join(doc)}) + "\n"
                f.write(line)
                written += len(line)


def _peak_rss_mb(args, env):
    """Peak RSS (MB) of the largest process of a prepare.py run, measured in a fresh parent."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, str(SCRIPT), *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    kb = int(r.stdout.strip().splitlines()[-1])
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    _write_corpus(tmp_path / "small" / "c.jsonl", 4 << 20, seed=0)
    _write_corpus(tmp_path / "large" / "c.jsonl", 100 << 20, seed=1)  # 25x larger, ~20M tokens
    common = ["--val_tokens=100000", "--shard_size=1000000", "--num_proc=2"]
    small = _peak_rss_mb([f"--data_files={tmp_path}/small/*.jsonl", f"--out_dir={tmp_path}/o1", *common], env)
    large = _peak_rss_mb([f"--data_files={tmp_path}/large/*.jsonl", f"--out_dir={tmp_path}/o2", *common], env)
    meta = json.loads((tmp_path / "o2" / "meta.json").read_text())
    assert meta["train_tokens"] > 15_000_000  # the large corpus was really processed
    # 96 MB more text (and 30 MB more tokens) must not show up in the peak: memory is bounded
    assert large - small < 20, (small, large)  # measured: +5 MB; keeping the tokens alone adds 40
    assert large < 1024
