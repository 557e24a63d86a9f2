"""The fine-tuning data of the GPT-J experiments: data/hate_speech/prepare.py (1,000 train / 200
class-balanced val tweets as prompt/completion JSONL) and data/mnli/prepare.py (GLUE MNLI as
text-to-text token files plus a generate-task JSONL). Tiny synthetic inputs in tmp_path, no network."""

import csv
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from homegpt import sft
from homegpt.errors import MissingFile, UserError
from homegpt.dataloader import TokenData, gpt2_encoding
from helpers import ROOT


def load_script(name):
    # loaded under its own name: a bare `import prepare` would shadow the other data/*/prepare.py scripts
    spec = importlib.util.spec_from_file_location(f"{name}_prepare", ROOT / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hate = load_script("hate_speech")
mnli = load_script("mnli")


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub reachable, and datasets.load_dataset answering from tables given here (a real
    datasets.Dataset, so the scripts' column reads are the ones they do on the hub): no network."""
    from homegpt import hub
    datasets = pytest.importorskip("datasets")
    tables, calls = {}, []

    def load_dataset(*args, split):
        calls.append((*args, split))
        if (*args, split) not in tables:
            raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (ReadTimeout)")
        return datasets.Dataset.from_list(tables[(*args, split)])
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def run_script(name, *args):
    """The script as a user runs it, offline: (exit status, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # hub_unreachable_reason answers at once, without asking
    p = subprocess.run([sys.executable, str(ROOT / "data" / name / "prepare.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr


# ----------------------------------------------------------------------------- data/hate_speech/prepare.py

LABELS = ("hate", "offensive", "neutral")
TEMPLATE = "Classify the tweet as hate, offensive or neutral.\nTweet: {text}\nLabel:"


def tweets(counts=(100, 1100, 300), seed=0):
    """Distinct synthetic tweets, classes mixed, with what real ones hold: newlines, runs of spaces,
    commas and quotes (CSV quoting), an HTML entity, a leading space."""
    rng = random.Random(seed)
    classes = [c for c, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(classes)
    pads = [" ", "  ", "\n", " \t"]
    rows = []
    for i, c in enumerate(classes):
        words = [f"w{i}", rng.choice(["lol", '"quoted"', "a, b", "&#8220;x&#8221;", "RT @user:"]), LABELS[c]]
        rows.append({"tweet": (" " if i % 7 == 0 else "") + rng.choice(pads).join(words), "class": c})
    return rows


def write_csv(path, rows):
    """labeled_data.csv's layout: an unnamed index column, the annotator counts, class, tweet."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"])
        for i, r in enumerate(rows):
            votes = [3 if k == r["class"] else 0 for k in range(3)]
            w.writerow([i, 3, *votes, r["class"], r["tweet"]])
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rows():
    return tweets()


@pytest.fixture(scope="module")
def csv_file(rows, tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("hs") / "labeled_data.csv", rows)


def prepare_hate(input, out_dir, **kw):
    return hate.main(hate.PrepareConfig(input=str(input), out_dir=str(out_dir), **kw))


def test_hate_speech_splits_1000_random_and_200_balanced_without_overlap(rows, csv_file, tmp_path):
    counts = prepare_hate(csv_file, tmp_path)
    gold = {" ".join(r["tweet"].split()): LABELS[r["class"]] for r in rows}
    assert len(gold) == len(rows), "the synthetic tweets must be distinct for the overlap check"
    split = {}
    for name in ("train", "val"):
        examples = sft.load_examples(tmp_path / f"{name}.jsonl")  # what SFT and eval.py --tasks=generate read
        texts = [e["prompt"].removeprefix("Classify the tweet as hate, offensive or neutral.\nTweet: ")
                 .removesuffix("\nLabel:") for e in examples]
        assert [e["prompt"] for e in examples] == [TEMPLATE.format(text=t) for t in texts]
        assert [e["completion"] for e in examples] == [" " + gold[t] for t in texts], "each tweet keeps its label"
        assert all(" ".join(t.split()) == t for t in texts), "whitespace collapsed"
        split[name] = texts
    assert (len(split["train"]), len(split["val"])) == (1000, 200)
    assert len(set(split["train"])) == 1000 and not set(split["train"]) & set(split["val"])
    assert Counter(gold[t] for t in split["val"]) == {"hate": 67, "offensive": 67, "neutral": 66}
    train_mix = Counter(gold[t] for t in split["train"])
    assert train_mix["offensive"] > 600, f"training keeps the corpus' mix (1,033 of 1,300 left): {train_mix}"
    assert [gold[t] for t in split["val"]][:67] != ["hate"] * 67, "validation is shuffled, not class by class"
    meta = json.loads((tmp_path / "split.json").read_text())
    assert meta == {"source": str(csv_file), "sha256": hashlib.sha256(csv_file.read_bytes()).hexdigest(),
                    "rows": 1500, "seed": 0, "template": TEMPLATE, "labels": list(LABELS), "counts": counts}
    assert counts["val"] == {"hate": 67, "offensive": 67, "neutral": 66} and counts["train"] == dict(train_mix)
    assert counts["input"] == {"hate": 100, "offensive": 1100, "neutral": 300}


def test_hate_speech_is_seeded_and_reads_csv_jsonl_and_json_alike(rows, csv_file, tmp_path):
    prepare_hate(csv_file, tmp_path / "a")
    prepare_hate(csv_file, tmp_path / "b")
    prepare_hate(csv_file, tmp_path / "seed1", seed=1)
    prepare_hate(write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "jsonl")
    (tmp_path / "rows.json").write_text(json.dumps([dict(r, **{"class": str(r["class"])}) for r in rows]))
    prepare_hate(tmp_path / "rows.json", tmp_path / "json")  # classes as strings, as some exports write them
    for name in ("train.jsonl", "val.jsonl", "split.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("train.jsonl", "val.jsonl"):
        for other in ("jsonl", "json"):
            assert (tmp_path / other / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), (other, name)
        a, b = ((tmp_path / d / name).read_text().splitlines() for d in ("a", "seed1"))
        assert set(a) != set(b), f"another seed draws other {name} rows"


def test_hate_speech_from_the_hub_matches_the_csv(rows, csv_file, fake_hub, tmp_path):
    tables, calls = fake_hub
    with pytest.raises(UserError, match=r"(?s)ReadTimeout.*--input=labeled_data.csv"):
        prepare_hate("", tmp_path / "hub")
    assert not (tmp_path / "hub").exists()
    tables[("tdavidson/hate_speech_offensive", None, "train")] = [
        {"count": 3, "hate_speech_count": 0, "offensive_language_count": 0, "neither_count": 3, **r} for r in rows]
    prepare_hate("", tmp_path / "hub")
    prepare_hate(csv_file, tmp_path / "csv")
    assert calls == [("tdavidson/hate_speech_offensive", None, "train")] * 2
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "hub" / name).read_bytes() == (tmp_path / "csv" / name).read_bytes(), name
    meta = json.loads((tmp_path / "hub" / "split.json").read_text())
    assert meta["source"] == "hf://datasets/tdavidson/hate_speech_offensive" and meta["sha256"] is None


@pytest.mark.parametrize("kw, match", [
    ({"template": "Tweet: {tweet}\nLabel:"}, r"must use the field \{text\}"),
    ({"template": "Label:"}, r"must use the field \{text\}"),
    ({"template": "{text} {"}, "not a valid format string"),
    ({"labels": "hate,offensive"}, "must name 3 different labels"),
])
def test_hate_speech_refuses_bad_knobs_and_writes_nothing(csv_file, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        prepare_hate(csv_file, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_hate_speech_refuses_bad_or_too_few_rows_and_writes_nothing(rows, tmp_path):
    out = tmp_path / "out"
    no_hate = [r for r in rows if r["class"] != 0] + [r for r in rows if r["class"] == 0][:50]
    with pytest.raises(UserError, match=r"hate \(class 0\): 50 rows, validation needs 67"):
        prepare_hate(write_jsonl(tmp_path / "few_hate.jsonl", no_hate), out)
    with pytest.raises(UserError, match=r"hate \(class 0\): 0 rows"):
        prepare_hate(write_csv(tmp_path / "none.csv", [r for r in rows if r["class"] != 0]), out)
    with pytest.raises(UserError, match="leave 900, fewer than --train_size=1,000"):
        prepare_hate(write_jsonl(tmp_path / "small.jsonl", rows[:1100]), out)
    bad = [dict(r) for r in rows]
    del bad[3]["class"]
    bad[5]["class"] = 3
    bad[8]["tweet"] = "  \n "
    with pytest.raises(UserError, match=r"3 bad row\(s\)(.|\n)*line 4: class None(.|\n)*line 6: class 3(.|\n)*"
                                        r"line 9: tweet"):
        prepare_hate(write_jsonl(tmp_path / "bad.jsonl", bad), out)
    with pytest.raises(UserError, match="lacks"):
        prepare_hate(write_jsonl(tmp_path / "x.csv", rows), out)  # JSON named .csv: no CSV header
    with pytest.raises(MissingFile):
        prepare_hate(tmp_path / "missing.csv", out)
    assert not out.exists()


def test_hate_speech_exits_nonzero_with_the_message_offline_or_on_bad_input(csv_file, tmp_path):
    out = tmp_path / "out"
    code, err = run_script("hate_speech", f"--out_dir={out}")
    assert code == 1 and "unreachable (HF_HUB_OFFLINE=1 is set)" in err and "--input=labeled_data.csv" in err, err
    code, err = run_script("hate_speech", f"--input={csv_file}", f"--out_dir={out}", "--template=Tweet: {tweet}")
    assert code == 1 and err.startswith("error: --template=") and "{text}" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- data/mnli/prepare.py

NLI = ("entailment", "neutral", "contradiction")


def nli_rows(n, seed):
    """n pairs, every 5th unlabelled (-1) as GLUE's test rows are."""
    rng = random.Random(seed)
    return [{"premise": f"The {rng.choice(['cat', 'café owner', 'pilot'])} number {i} sat.",
             "hypothesis": f"Something {i} happened  twice.", "label": -1 if i % 5 == 4 else rng.randrange(3),
             "idx": i} for i in range(n)]


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue")
    write_jsonl(d / "train.jsonl", nli_rows(40, seed=1))
    write_jsonl(d / "validation_matched.jsonl", nli_rows(15, seed=2))
    return d


def expected_examples(rows):
    return [{"prompt": f"mnli hypothesis: {r['hypothesis']} premise: {r['premise']} target:",
             "completion": " " + NLI[r["label"]]} for r in rows if r["label"] != -1]


def test_mnli_token_files_decode_to_the_labelled_pairs(glue, tmp_path):
    counts = mnli.main(mnli.PrepareConfig(input_dir=str(glue), out_dir=str(tmp_path)))
    enc = gpt2_encoding()
    for name, split in (("train", "train"), ("val", "validation_matched")):
        rows = [json.loads(line) for line in (glue / f"{split}.jsonl").read_text().splitlines()]
        want = expected_examples(rows)
        ids = np.fromfile(tmp_path / f"{name}.bin", dtype=np.uint16).tolist()
        assert ids.count(50256) == len(want) and ids[-1] == 50256
        assert enc.decode(ids) == "".join(e["prompt"] + e["completion"] + "<|endoftext|>" for e in want)
        assert TokenData(tmp_path, name).n_tokens == len(ids), "train.py reads it (meta.json agrees)"
        labels = Counter(e["completion"].strip() for e in want)
        assert counts[split] == {"rows": len(rows), "dropped_unlabelled": sum(r["label"] == -1 for r in rows),
                                 "pairs": len(want), "tokens": len(ids), "labels": {k: labels[k] for k in NLI}}
    assert (counts["train"]["pairs"], counts["train"]["dropped_unlabelled"]) == (32, 8)
    assert (counts["validation_matched"]["pairs"], counts["validation_matched"]["dropped_unlabelled"]) == (12, 3)
    val = [json.loads(line) for line in (glue / "validation_matched.jsonl").read_text().splitlines()]
    assert sft.load_examples(tmp_path / "validation_matched.jsonl") == expected_examples(val)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["splits"] == counts and split["source"]["train"]["sha256"] == \
        hashlib.sha256((glue / "train.jsonl").read_bytes()).hexdigest()


def test_mnli_is_deterministic_and_limit_train_keeps_the_first_pairs(glue, tmp_path):
    mnli.main(mnli.PrepareConfig(input_dir=str(glue), out_dir=str(tmp_path / "a")))
    mnli.main(mnli.PrepareConfig(input_dir=str(glue), out_dir=str(tmp_path / "b")))
    for name in ("train.bin", "val.bin", "validation_matched.jsonl", "split.json", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    counts = mnli.main(mnli.PrepareConfig(input_dir=str(glue), out_dir=str(tmp_path / "c"), limit_train=5))
    rows = [json.loads(line) for line in (glue / "train.jsonl").read_text().splitlines()]
    first = expected_examples(rows)[:5]
    ids = np.fromfile(tmp_path / "c" / "train.bin", dtype=np.uint16).tolist()
    assert gpt2_encoding().decode(ids) == "".join(e["prompt"] + e["completion"] + "<|endoftext|>" for e in first)
    assert counts["train"]["pairs"] == 5
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["train_tokens"] == len(ids)
    assert (tmp_path / "c" / "val.bin").read_bytes() == (tmp_path / "a" / "val.bin").read_bytes()


def test_mnli_from_the_hub_matches_the_local_files(glue, fake_hub, tmp_path):
    tables, calls = fake_hub
    for split in ("train", "validation_matched"):
        rows = [json.loads(line) for line in (glue / f"{split}.jsonl").read_text().splitlines()]
        tables[("nyu-mll/glue", "mnli", split)] = rows
    hub_counts = mnli.main(mnli.PrepareConfig(out_dir=str(tmp_path / "hub")))
    assert calls == [("nyu-mll/glue", "mnli", "train"), ("nyu-mll/glue", "mnli", "validation_matched")]
    assert hub_counts == mnli.main(mnli.PrepareConfig(input_dir=str(glue), out_dir=str(tmp_path / "local")))
    for name in ("train.bin", "val.bin", "validation_matched.jsonl", "meta.json"):
        assert (tmp_path / "hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_mnli_refuses_bad_input_and_writes_nothing(glue, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = nli_rows(10, seed=3)
    rows[2]["label"], rows[6]["label"] = 3, "neutral"
    del rows[7]["premise"]
    write_jsonl(bad / "train.jsonl", rows)
    (bad / "validation_matched.jsonl").write_bytes((glue / "validation_matched.jsonl").read_bytes())
    with pytest.raises(UserError, match=r"3 bad row\(s\) of 10(.|\n)*line 3: label 3(.|\n)*line 7: label 'neutral'"
                                        r"(.|\n)*line 8: premise missing"):
        mnli.main(mnli.PrepareConfig(input_dir=str(bad), out_dir=str(out)))
    write_jsonl(bad / "train.jsonl", [dict(r, label=-1) for r in nli_rows(4, seed=3)])
    with pytest.raises(UserError, match=r"no labelled rows \(4 rows, 4 of them labelled -1\)"):
        mnli.main(mnli.PrepareConfig(input_dir=str(bad), out_dir=str(out)))
    (bad / "train.jsonl").write_bytes((glue / "train.jsonl").read_bytes())
    (bad / "validation_matched.jsonl").unlink()
    with pytest.raises(MissingFile, match="validation_matched.jsonl"):  # train read fine, still nothing written
        mnli.main(mnli.PrepareConfig(input_dir=str(bad), out_dir=str(out)))
    assert not out.exists()


def test_mnli_offline_without_input_dir_exits_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    code, err = run_script("mnli", f"--out_dir={out}")
    assert code == 1 and "unreachable (HF_HUB_OFFLINE=1 is set)" in err and "--input_dir=" in err, err
    assert not out.exists()
