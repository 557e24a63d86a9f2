"""
Tiny Shakespeare in GPT-2 BPE: train.bin / val.bin (uint16) and meta.json, for fine-tuning GPT-2.

    python data/shakespeare/prepare.py                      # writes data/shakespeare/
    python data/shakespeare/prepare.py --out_dir=data/shakespeare_copy   # anywhere else

The text is the copy that ships in data/shakespeare_char/input.txt (a data/shakespeare/input.txt of
your own takes precedence); when neither exists it is downloaded from the char-rnn repository.
The split is nanoGPT's: the first 90% of the characters train, the last 10% validate, each encoded
on its own with encode_ordinary (no <|endoftext|>). Result: 301,966 train and 36,059 val tokens.
"""

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dataloader import gpt2_encoding, write_raw_tokens

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "shakespeare_char" / "input.txt"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


@dataclass
class PrepareConfig:
    out_dir: str = str(HERE)  # where train.bin, val.bin and meta.json go
    input: str = ""  # the text; "" = data/shakespeare/input.txt, else the shipped shakespeare_char copy


def find_text(path=""):
    """The Tiny Shakespeare text: `path` if given, else the first that exists of our input.txt and the
    shipped copy, else downloaded to data/shakespeare/input.txt."""
    if path:
        if not Path(path).is_file():
            raise SystemExit(f"error: --input={path} does not exist; give a text file or leave it empty")
        return Path(path).read_text(encoding="utf-8")
    for candidate in (HERE / "input.txt", SHIPPED):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    target = HERE / "input.txt"
    print(f"downloading {URL} -> {target}")
    try:
        urllib.request.urlretrieve(URL, target)
    except OSError as e:
        raise SystemExit(f"error: no Tiny Shakespeare at {HERE / 'input.txt'} or {SHIPPED}, and the download "
                         f"failed ({e}); put the text at one of those paths") from e
    return target.read_text(encoding="utf-8")


def prepare(out_dir, text):
    """Encode, split and write; returns the meta.json dict."""
    n = int(0.9 * len(text))  # split by characters, before encoding, as nanoGPT does
    enc = gpt2_encoding()
    train_ids = enc.encode_ordinary(text[:n])
    val_ids = enc.encode_ordinary(text[n:])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_raw_tokens(out_dir / "train.bin", train_ids)
    write_raw_tokens(out_dir / "val.bin", val_ids)
    meta = {"vocab_size": enc.n_vocab, "tokenizer": "gpt2",
            "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    # meta.json last and atomically: its token counts vouch for the .bin files beside it
    tmp = out_dir / "meta.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / "meta.json")
    return meta


def main(cfg):
    meta = prepare(cfg.out_dir, find_text(cfg.input))
    print(f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"(GPT-2 BPE, vocab {meta['vocab_size']:,}) -> {cfg.out_dir}")
    return meta


if __name__ == "__main__":
    from configurator import run
    run(main, PrepareConfig)
