"""
Tiny Shakespeare in GPT-2 BPE: train.bin / val.bin (uint16) and meta.json, for fine-tuning GPT-2.

    python data/shakespeare/prepare.py                                      # writes data/shakespeare/
    python data/shakespeare/prepare.py --out_dir=data/my_play --input=my_play.txt

The text is the copy that ships in data/shakespeare_char/input.txt, so nothing is downloaded;
train.py runs this by itself when the token files are missing. The split is nanoGPT's: the first
90% of the characters train, the last 10% validate, each encoded on its own with encode_ordinary
(no <|endoftext|>). Result: 301,966 train and 36,059 val tokens.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout: its modules are not installed

from homegpt.errors import MissingFile  # noqa: E402
from configurator import run  # noqa: E402
from homegpt.fileio import check_dir_target  # noqa: E402
from homegpt.prepare_text import prepare_gpt2  # noqa: E402

SHIPPED = HERE.parent / "shakespeare_char" / "input.txt"


@dataclass
class PrepareConfig:
    out_dir: str = str(HERE)  # where train.bin, val.bin and meta.json go
    input: str = str(SHIPPED)  # the text (Tiny Shakespeare ships there; any UTF-8 text works)


def main(cfg):
    check_dir_target(cfg.out_dir, "--out_dir")  # never into a run; a read-only place is refused before any work
    if not Path(cfg.input).is_file():
        raise MissingFile(f"--input={cfg.input} does not exist; give a UTF-8 text file")
    meta = prepare_gpt2(cfg.out_dir, Path(cfg.input).read_text(encoding="utf-8"))
    print(f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"(GPT-2 BPE, vocab {meta['vocab_size']:,}) -> {cfg.out_dir}")
    return meta


if __name__ == "__main__":
    run(main, PrepareConfig)
