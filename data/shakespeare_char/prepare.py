"""
Tiny Shakespeare as characters: train.bin / val.bin (uint16) and meta.json, nanoGPT's 90/10 split.

    python data/shakespeare_char/prepare.py

The text ships beside this file (input.txt, 1,115,394 bytes) so no network is needed; when it is
missing it is downloaded from the char-rnn repository. Result: 65 symbols, 1,003,854 train and
111,540 val characters.
"""

import json
import sys
import urllib.request
from pathlib import Path

import numpy as np

from dataloader import write_raw_tokens

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(out_dir, text):
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))  # the first 90% trains, the last 10% validates
    out_dir = Path(out_dir)
    write_raw_tokens(out_dir / "train.bin", ids[:n])
    write_raw_tokens(out_dir / "val.bin", ids[n:])
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": chars,
            "train_tokens": n, "val_tokens": len(ids) - n}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return meta


def main(out_dir=Path(__file__).parent):
    src = Path(out_dir) / "input.txt"
    if not src.exists():
        print(f"downloading {URL}")
        try:
            urllib.request.urlretrieve(URL, src)
        except OSError as e:
            raise SystemExit(f"error: {src} is missing and the download failed ({e}); put Tiny Shakespeare there")
    meta = prepare(out_dir, src.read_text(encoding="utf-8"))
    print(f"vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"-> {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
