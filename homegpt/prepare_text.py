"""
A text file as token files: characters (nanoGPT's shakespeare_char) or GPT-2 BPE (its shakespeare),
with nanoGPT's 90/10 split. data/shakespeare_char/prepare.py and data/shakespeare/prepare.py are these
functions behind a command line; train.py and bench.py --plan call prepare_shipped when the token files
of the Tiny Shakespeare that ships in the checkout are missing.

    from homegpt.prepare_text import prepare_chars
    meta = prepare_chars("data/my_play_chars", open("my_play.txt").read())
"""

from pathlib import Path

import numpy as np

from homegpt import dataloader
from homegpt.dataloader import gpt2_encoding, write_raw_tokens
from homegpt.fileio import write_json


def prepare_chars(out_dir, text):
    """Characters -> ids, the first 90% to train.bin and the rest to val.bin; meta.json (written last,
    atomically: its token counts vouch for the .bin files) holds the vocabulary. Returns the meta."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))  # the first 90% trains, the last 10% validates
    out_dir = Path(out_dir)
    write_raw_tokens(out_dir / "train.bin", ids[:n])
    write_raw_tokens(out_dir / "val.bin", ids[n:])
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": chars,
            "train_tokens": n, "val_tokens": len(ids) - n}
    write_json(out_dir / "meta.json", meta)
    return meta


def prepare_gpt2(out_dir, text):
    """Split by characters (the first 90% trains), then each part encoded with GPT-2's BPE on its own
    (encode_ordinary: no <|endoftext|>), as nanoGPT does; meta.json last and atomically. Returns the meta."""
    n = int(0.9 * len(text))
    enc = gpt2_encoding()
    train_ids = enc.encode_ordinary(text[:n])
    val_ids = enc.encode_ordinary(text[n:])
    out_dir = Path(out_dir)
    write_raw_tokens(out_dir / "train.bin", train_ids)
    write_raw_tokens(out_dir / "val.bin", val_ids)
    meta = {"vocab_size": enc.n_vocab, "tokenizer": "gpt2", "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    write_json(out_dir / "meta.json", meta)
    return meta


SHIPPED = {"shakespeare_char": prepare_chars, "shakespeare": prepare_gpt2}  # data/<name>: the text ships


def prepare_shipped(data_dir):
    """Prepare data/shakespeare_char or data/shakespeare when their token files are missing: the text
    ships in the checkout (data/shakespeare_char/input.txt), it takes seconds and downloads nothing.
    Returns True when it did."""
    data_dir = Path(data_dir).resolve()
    data = dataloader.CHECKOUT / "data"
    if data_dir.parent != data or data_dir.name not in SHIPPED or (data_dir / "train.bin").exists():
        return False
    print(f"data: {data_dir} has no token files yet; preparing them (python data/{data_dir.name}/prepare.py)", flush=True)
    SHIPPED[data_dir.name](data_dir, (data / "shakespeare_char" / "input.txt").read_text(encoding="utf-8"))
    return True
