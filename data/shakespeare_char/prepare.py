"""
Tiny Shakespeare as characters: train.bin / val.bin (uint16) and meta.json, nanoGPT's 90/10 split.

    python data/shakespeare_char/prepare.py                                 # writes data/shakespeare_char/
    python data/shakespeare_char/prepare.py --out_dir=data/my_play_chars --input=my_play.txt

The text ships beside this file (input.txt, 1,115,394 bytes), so nothing is downloaded; train.py runs
this by itself when the token files are missing. Result: 65 symbols, 1,003,854 train and 111,540 val
characters.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout: its modules are not installed

from homegpt.errors import MissingFile  # noqa: E402
from configurator import run  # noqa: E402
from homegpt.fileio import check_dir_target  # noqa: E402
from homegpt.prepare_text import prepare_chars  # noqa: E402

SHIPPED = HERE / "input.txt"


@dataclass
class PrepareConfig:
    out_dir: str = str(HERE)  # where train.bin, val.bin and meta.json go
    input: str = str(SHIPPED)  # the text (Tiny Shakespeare ships here; any UTF-8 text works)


def read_text(path):
    if not Path(path).is_file():
        raise MissingFile(f"--input={path} does not exist; give a UTF-8 text file "
                          f"(Tiny Shakespeare ships as {SHIPPED}: git checkout -- {SHIPPED.relative_to(HERE.parents[1])})")
    return Path(path).read_text(encoding="utf-8")


def main(cfg):
    check_dir_target(cfg.out_dir, "--out_dir")  # never into a run; a read-only place is refused before any work
    meta = prepare_chars(cfg.out_dir, read_text(cfg.input))
    print(f"vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"-> {cfg.out_dir}")
    return meta


if __name__ == "__main__":
    run(main, PrepareConfig)
