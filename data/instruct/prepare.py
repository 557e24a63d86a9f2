"""
Instruction data for config/finetune_instruct.py: train / val / test JSONL of Alpaca-style records
({"instruction", "input", "output"}), split 85% / 5% / 10% in a seeded, deterministic order.

    python data/instruct/prepare.py                              # the 1,100-example set -> data/instruct/
    python data/instruct/prepare.py --source=alpaca              # Stanford Alpaca, 52,002 -> data/alpaca/
    python data/instruct/prepare.py --input=my_data.json         # a local file in the same schema

Sources: 'book', the 1,100 instructions of "Build a Large Language Model (from Scratch)" (Raschka,
2024), chapter 7, which trains GPT-2 for a few epochs and has a judge model score the answers to the
110 test items; 'alpaca', Stanford Alpaca's 52,002 (Taori et al. 2023), from its URL or else the
Hugging Face hub (tatsu-lab/alpaca). --input reads a JSON array or JSONL file instead (the download
is skipped). The download is kept beside the splits (source.json) so that a rerun needs no network.

The split shuffles with --seed, then the first 85% train, the next 10% test, the rest validates:
1,100 records -> 935 train, 110 test, 55 val (the book's counts). The same input and seed give the
same bytes, and every file is written atomically.
"""

import json
import random
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: its modules are not installed

from homegpt.errors import UserError  # noqa: E402
from configurator import run  # noqa: E402
from homegpt.fileio import atomic_write, check_dir_target, file_sha256, write_json  # noqa: E402
from homegpt.sft import read_records  # noqa: E402

SOURCES = {
    "book": {"url": "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                    "instruction-data.json",
             "hub": None, "out_dir": HERE},
    "alpaca": {"url": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
               "hub": "tatsu-lab/alpaca", "out_dir": ROOT / "data" / "alpaca"},
}
DOWNLOAD_TIMEOUT = 60  # seconds without a byte before a download is given up


@dataclass
class PrepareConfig:
    source: str = "book"  # 'book' (1,100 examples) or 'alpaca' (52,002); ignored with --input
    input: str = ""  # a local JSON array / JSONL of instruction records; '' = download the source
    out_dir: str = ""  # '' = data/instruct for 'book' and --input, data/alpaca for 'alpaca'
    seed: int = 123  # the shuffle before the split
    train_frac: float = 0.85
    test_frac: float = 0.10  # the rest (5% by default) is the validation split


def split(records, seed, train_frac, test_frac):
    """(train, val, test): a seeded shuffle, then the first train_frac, the next test_frac, the rest."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_train, n_test = int(len(records) * train_frac), int(len(records) * test_frac)
    pick = lambda idx: [records[i] for i in idx]
    return pick(order[:n_train]), pick(order[n_train + n_test:]), pick(order[n_train:n_train + n_test])


def download(source, dest):
    """Fetch a source's JSON to dest (atomically): its URL, or the Hugging Face hub when it has a copy there."""
    url, hub = SOURCES[source]["url"], SOURCES[source]["hub"]
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r:
            atomic_write(dest, iter(lambda: r.read(1 << 20), b""))
        return url
    except (urllib.error.URLError, OSError) as e:
        url_error = e
    hub_error = ""
    if hub:
        from homegpt.hub import load_hub_dataset  # the hub check and offline cache of every hub reader here
        try:
            rows = load_hub_dataset(hub, split="train", what=f"the {source!r} instructions")
        except UserError as e:  # reported beside the URL's error
            hub_error = f"; {str(e).splitlines()[0]}"
        else:
            write_json(dest, [{k: row[k] for k in ("instruction", "input", "output")} for row in rows])
            return f"hf://datasets/{hub}"
    raise UserError(f"could not download the {source!r} instructions from {url} ({url_error}){hub_error}. On a "
                    f"machine without network, copy the file here and pass --input=path/to/file.json")


def main(cfg):
    if cfg.source not in SOURCES:
        raise UserError(f"source must be one of {', '.join(SOURCES)}, got {cfg.source!r} (or give --input=file)")
    if not (0 < cfg.train_frac and 0 <= cfg.test_frac and cfg.train_frac + cfg.test_frac < 1):
        raise UserError(f"train_frac={cfg.train_frac} and test_frac={cfg.test_frac} must be positive and leave "
                        f"a validation split (their sum below 1)")
    out_dir = Path(cfg.out_dir or (HERE if cfg.input else SOURCES[cfg.source]["out_dir"]))
    check_dir_target(out_dir, "--out_dir")  # never into a run; a read-only place is refused before any work
    if cfg.input:
        path, origin = Path(cfg.input), str(cfg.input)
    else:
        path = out_dir / "source.json"
        if path.is_file():
            origin = f"{path} (downloaded earlier; delete it to fetch again)"
        else:
            print(f"downloading the {cfg.source!r} instructions ...")
            origin = download(cfg.source, path)
    records = read_records(path)  # every record checked; one error lists the bad ones
    if any("instruction" not in r for r in records):
        raise UserError(f"{path}: holds prompt/completion records; this script splits instruction records "
                        f"(instruction, input, output). Split those yourself, or give Alpaca-style data")
    parts = dict(zip(("train", "val", "test"), split(records, cfg.seed, cfg.train_frac, cfg.test_frac)))
    for name, part in parts.items():
        atomic_write(out_dir / f"{name}.jsonl", ["".join(json.dumps(r) + "\n" for r in part).encode()])
    write_json(out_dir / "split.json", {"source": origin, "sha256": file_sha256(path), "records": len(records),
                                        "seed": cfg.seed, **{name: len(p) for name, p in parts.items()}})
    print(f"{len(records):,} records from {origin} (sha256 {file_sha256(path)[:12]}...) -> "
          + ", ".join(f"{name} {len(p):,}" for name, p in parts.items()) + f" in {out_dir}")
    return {name: len(p) for name, p in parts.items()}


if __name__ == "__main__":
    run(main, PrepareConfig)
