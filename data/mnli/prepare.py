"""
GLUE MNLI (Williams et al. 2018) as text-to-text, T5's format: GPT-2 token files to train on, and the
matched validation set as {"prompt", "completion"} JSONL to score generated labels.

    python data/mnli/prepare.py                                  # the hub -> data/mnli/
    python data/mnli/prepare.py --input_dir=mnli_jsonl           # local train.jsonl + validation_matched.jsonl
    python data/mnli/prepare.py --limit_train=20000              # a quick run: the first 20,000 training pairs
    python train.py --init_from=gpt2 --data_dir=data/mnli --out_dir=out-mnli
    python eval.py --out_dir=out-mnli --tasks=generate --data_file=data/mnli/validation_matched.jsonl --max_new_tokens=4

Source: nyu-mll/glue, config 'mnli', on the Hugging Face hub: premise, hypothesis, label (0 entailment,
1 neutral, 2 contradiction, -1 unlabelled); splits 'train' (392,702 pairs) and 'validation_matched'
(9,815, the genres seen in training). --input_dir reads the same fields from JSON lines instead:
<dir>/train.jsonl and <dir>/validation_matched.jsonl (JSONL only; other fields, such as GLUE's idx,
are ignored). Offline (the hub unreachable, or HF_HUB_OFFLINE=1) without --input_dir it reads the local
datasets cache, else stops at once.

Each labelled pair is written in T5's input format (Raffel et al. 2020, appendix D), with " target:"
appended as the cue to answer, and the label's name after it:
    "mnli hypothesis: {hypothesis} premise: {premise} target:" + " " + "entailment"
Rows labelled -1 have no answer to learn or score: they are dropped and counted in split.json.
- train.bin / val.bin (train / validation_matched): every pair's whole text in GPT-2 BPE followed by
  <|endoftext|> (50256), back to back in input order, no padding: train.py packs them into its
  block_size windows as it does any corpus. meta.json beside them (tokenizer gpt2, token counts) is
  what train.py --data_dir=data/mnli reads; it is written last.
- validation_matched.jsonl: the prompt ("... target:") and the completion (" entailment"), one per
  labelled pair, for eval.py --tasks=generate. The prompt ends at ':', so its tokens followed by the
  completion's are exactly the tokens of the whole text in val.bin.
- split.json: the source (and each local file's sha256), and per split the rows read, the -1 rows
  dropped, the pairs kept (per label; --limit_train keeps the first N labelled ones) and the tokens.
The same input gives the same bytes; nothing is written unless both splits read without error.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout: its modules are not installed

from homegpt.errors import MissingFile, UserError, many_errors  # noqa: E402
from configurator import run  # noqa: E402
from homegpt.dataloader import gpt2_encoding, write_raw_tokens  # noqa: E402
from homegpt.fileio import check_dir_target, file_sha256, write_json, write_json_lines  # noqa: E402

HUB, HUB_CONFIG = "nyu-mll/glue", "mnli"
SPLITS = {"train": "train", "val": "validation_matched"}  # our token file -> GLUE's split
LABELS = ("entailment", "neutral", "contradiction")  # GLUE's label ids 0, 1, 2
PROMPT = "mnli hypothesis: {hypothesis} premise: {premise} target:"
TOKENIZE_CHUNK = 10_000  # pairs per encode_ordinary_batch call: the bar moves often, tiktoken's threads stay busy


@dataclass
class PrepareConfig:
    input_dir: str = ""  # a folder with train.jsonl and validation_matched.jsonl; '' = the Hugging Face hub
    out_dir: str = str(HERE)  # where the token files, meta.json, validation_matched.jsonl and split.json go
    limit_train: int = 0  # keep the first N labelled training pairs, for quick runs; 0 = all 392,702


# ----------------------------------------------------------------------------- reading the rows

def read_jsonl(path):
    """[(line name, record)] of a JSON-lines file."""
    if not path.is_file():
        raise MissingFile(f"{path}: no such file; --input_dir needs train.jsonl and validation_matched.jsonl "
                          f"(JSON lines with premise, hypothesis and label)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((f"line {lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); --input_dir holds JSON lines") from e
    return rows


def read_hub(split):
    """[(row name, record)] of one GLUE MNLI split; offline, the datasets cache or a stop pointing to --input_dir."""
    hint = ("Offline, save the two splits as JSON lines on a machine with access:\n"
            f"  python -c \"import datasets; ds = datasets.load_dataset('{HUB}', '{HUB_CONFIG}'); "
            "[ds[s].to_json(f'mnli_jsonl/{s}.jsonl') for s in ('train', 'validation_matched')]\"\n"
            "then copy mnli_jsonl/ over and pass --input_dir=mnli_jsonl")
    from homegpt.hub import load_hub_dataset  # the same reachability check as GPT-2 weights, benchmarks and FineWeb
    ds = load_hub_dataset(HUB, HUB_CONFIG, split=split, hint=hint)
    # whole columns at once: a Python loop over 392,702 rows of a datasets table takes a minute
    return [(f"row {i}", {"premise": p, "hypothesis": h, "label": y})
            for i, (p, h, y) in enumerate(zip(ds["premise"], ds["hypothesis"], ds["label"]))]


def check_rows(rows, where):
    """(labelled [(premise, hypothesis, label)], number of -1 rows dropped); one UserError lists bad rows."""
    out, dropped, errors = [], 0, []
    for name, r in rows:
        if not isinstance(r, dict):
            errors.append(f"{name}: expected an object with premise, hypothesis and label, got {type(r).__name__}")
            continue
        label = r.get("label")
        bad = [k for k in ("premise", "hypothesis") if not isinstance(r.get(k), str)]
        if bad:
            errors.append(f"{name}: {' and '.join(bad)} missing or not a string")
        elif isinstance(label, bool) or label not in (-1, 0, 1, 2):
            errors.append(f"{name}: label {label!r} is not 0 (entailment), 1 (neutral), 2 (contradiction) "
                          f"or -1 (unlabelled)")
        elif label == -1:
            dropped += 1
        else:
            out.append((r["premise"], r["hypothesis"], label))
    if errors:
        raise many_errors(f"{where}: {len(errors)} bad row(s) of {len(rows):,}", errors)
    if not out:
        raise UserError(f"{where}: no labelled rows ({len(rows):,} rows, {dropped:,} of them labelled -1)")
    return out, dropped


# ----------------------------------------------------------------------------- text and tokens

def example(premise, hypothesis, label):
    """T5's text-to-text pair: the prompt, and the completion a model should generate after it."""
    return {"prompt": PROMPT.format(hypothesis=hypothesis, premise=premise), "completion": " " + LABELS[label]}


def tokens(examples, desc="tokenizing"):
    """Every example's prompt + completion in GPT-2 BPE, each followed by <|endoftext|>, as one uint16 array.
    Encoded in chunks (each text on its own, so the chunking changes no token) under a progress bar:
    tqdm's disable=None draws it on a terminal and leaves a log file without it (tqdm itself rather than
    runtime.progress, which would bring torch into a script that needs none)."""
    enc = gpt2_encoding()
    texts = [e["prompt"] + e["completion"] for e in examples]
    ids = []
    with tqdm(total=len(texts), desc=desc, unit="pair", leave=False, disable=None) as bar:
        for i in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = texts[i:i + TOKENIZE_CHUNK]
            ids += enc.encode_ordinary_batch(chunk)
            bar.update(len(chunk))
    out = np.empty(sum(len(x) + 1 for x in ids), dtype=np.uint16)
    pos = 0
    for x in ids:
        out[pos:pos + len(x)] = x
        out[pos + len(x)] = enc.eot_token
        pos += len(x) + 1
    return out


def main(cfg):
    check_dir_target(cfg.out_dir, "--out_dir")  # never into a run; a read-only place is refused before any work
    if cfg.limit_train < 0:
        raise UserError(f"--limit_train={cfg.limit_train}: must be >= 0 (0 = all training pairs)")
    source, splits = {}, {}
    for name, split in SPLITS.items():  # both read and checked before anything is written
        if cfg.input_dir:
            path = Path(cfg.input_dir) / f"{split}.jsonl"
            rows, where = read_jsonl(path), str(path)
            source[split] = {"file": where, "sha256": file_sha256(path)}
        else:
            print(f"loading {HUB} ({HUB_CONFIG}) split {split} from the Hugging Face hub ...")
            rows, where = read_hub(split), f"hf://datasets/{HUB} ({HUB_CONFIG}, {split})"
            source[split] = {"hub": HUB, "config": HUB_CONFIG, "split": split}
        pairs, dropped = check_rows(rows, where)
        if name == "train" and cfg.limit_train:
            pairs = pairs[:cfg.limit_train]
        splits[name] = {"rows": len(rows), "dropped_unlabelled": dropped, "pairs": pairs}

    enc = gpt2_encoding()
    out_dir = Path(cfg.out_dir)
    counts = {}
    for name, s in splits.items():
        examples = [example(*pair) for pair in s["pairs"]]
        ids = tokens(examples, f"{name}.bin")
        write_raw_tokens(out_dir / f"{name}.bin", ids)
        if name == "val":
            write_json_lines(out_dir / "validation_matched.jsonl", examples)
        counts[SPLITS[name]] = {"rows": s["rows"], "dropped_unlabelled": s["dropped_unlabelled"],
                                "pairs": len(examples), "tokens": len(ids),
                                "labels": {LABELS[k]: sum(p[2] == k for p in s["pairs"]) for k in range(3)}}
    write_json(out_dir / "split.json", {"source": source, "limit_train": cfg.limit_train, "prompt": PROMPT,
                                        "labels": list(LABELS), "splits": counts})
    meta = {"vocab_size": enc.n_vocab, "tokenizer": "gpt2", "eot_token": enc.eot_token,
            "train_tokens": counts["train"]["tokens"], "val_tokens": counts["validation_matched"]["tokens"]}
    write_json(out_dir / "meta.json", meta)  # last: its token counts vouch for the .bin files beside it
    for name, split in SPLITS.items():
        c = counts[split]
        print(f"{split}: {c['pairs']:,} pairs ({', '.join(f'{k} {n:,}' for k, n in c['labels'].items())}; "
              f"{c['dropped_unlabelled']:,} unlabelled dropped) -> {name}.bin, {c['tokens']:,} tokens")
    print(f"in {out_dir}; train on it with: python train.py <config> --data_dir={out_dir}")
    return counts


if __name__ == "__main__":
    run(main, PrepareConfig)
