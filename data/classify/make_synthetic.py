"""
A synthetic 3-class message-labelling task in the classifier recipes' prompt format, to try the
fine-tuning pipeline end to end without downloading a dataset.

    python data/classify/make_synthetic.py                       # -> data/classify/{train,val,test}.jsonl
    python train.py config/finetune_classify_lora.py --init_from=gpt2 --max_iters=100 --lr_decay_iters=100
    python eval.py --out_dir=out-classify-lora --tasks=generate --data_file=data/classify/test.jsonl --max_new_tokens=4

Messages are short chat lines about the weather, sport or food, built from word lists: one or two topic
words among filler, so that the label is decided by words a pretrained model already knows. This is a
stand-in for the format and the plumbing, not for the difficulty of real moderation data.

It writes the files every config/finetune_classify_*.py reads (data/classify/{train,val,test}.jsonl),
so the recipes run as they are. Their 700 steps of 32 examples are sized for the real data (21,783
training rows) and would be ~7.5 epochs of these 3,000: --max_iters=100 is plenty for the stand-in.
Files there that hold something else (the real split) are never overwritten unless --overwrite=True;
the same seed writes the same bytes, so running it again is fine.
"""

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: its modules are not installed
from homegpt.errors import UserError  # noqa: E402
from configurator import run  # noqa: E402
from homegpt.fileio import check_dir_target  # noqa: E402

PROMPT = "Classify the message as weather, sport or food.\nMessage: {text}\nLabel:"
TOPICS = {
    "weather": ["rain", "sunshine", "storm", "forecast", "snow", "wind", "umbrella", "heatwave", "fog", "thunder"],
    "sport": ["match", "goal", "referee", "team", "coach", "league", "tennis", "score", "penalty", "stadium"],
    "food": ["pizza", "soup", "recipe", "dinner", "noodles", "bakery", "curry", "salad", "dessert", "breakfast"],
}
OPENERS = ["honestly", "lol", "ok so", "did you see", "cannot believe", "anyone else think", "wow", "so"]
FILLER = ["the", "today", "was", "really", "that", "again", "this week", "at last", "with my friends",
          "kind of", "way too much", "for once", "in town", "all day"]


@dataclass
class SyntheticConfig:
    out_dir: str = "data/classify"  # writes train.jsonl, val.jsonl, test.jsonl here (the configs' files)
    n_train: int = 3000  # examples per split
    n_val: int = 300
    n_test: int = 300
    seed: int = 0  # the same seed writes the same files
    overwrite: bool = False  # replace files in out_dir that hold other data (e.g. the real split)


def message(rng, topic):
    words = [rng.choice(OPENERS)] + rng.sample(FILLER, rng.randint(2, 4))
    for w in rng.sample(TOPICS[topic], rng.randint(1, 2)):
        words.insert(rng.randint(1, len(words)), w)
    return " ".join(words)


def make_examples(n, rng):
    labels = sorted(TOPICS)
    return [{"prompt": PROMPT.format(text=message(rng, t)), "completion": " " + t}
            for t in (rng.choice(labels) for _ in range(n))]


def write_jsonl(path, text):
    """Atomic: a temporary file, fsynced, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(cfg):
    for key in ("n_train", "n_val", "n_test"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)}: each split needs at least one example")
    rng = random.Random(cfg.seed)
    out = Path(cfg.out_dir)
    check_dir_target(out, "--out_dir")  # never into a run; a read-only place is refused before any work
    splits = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        rows = make_examples(n, rng)
        splits[out / f"{split}.jsonl"] = (rows, "".join(json.dumps(r) + "\n" for r in rows))
    # the configs read these names for the real data too: never replace it with the stand-in silently
    other = [str(p) for p, (_, text) in splits.items()
             if p.exists() and p.read_text(encoding="utf-8", errors="replace") != text]
    if other and not cfg.overwrite:
        raise UserError(f"{', '.join(other)} already hold other data (the real split?); "
                         f"pass --out_dir=<another directory> or --overwrite=True to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for path, (rows, text) in splits.items():
        write_jsonl(path, text)
        print(f"{path}: {len(rows):,} examples")
    print("example:", json.dumps(rows[0]))


if __name__ == "__main__":
    run(main, SyntheticConfig)  # a bad setting or a refused overwrite: one line "error: ..." and exit 1
