"""
A synthetic 3-class message-labelling task in the classifier recipes' prompt format, to try the
fine-tuning pipeline end to end without downloading a dataset.

    python data/classify/make_synthetic.py                       # -> data/classify/synthetic_{train,val,test}.jsonl
    python train.py config/finetune_classify_lora.py --init_from=gpt2 --sft_train_file=data/classify/synthetic_train.jsonl \
        --sft_val_file=data/classify/synthetic_val.jsonl --out_dir=out-synthetic --max_iters=100
    python eval.py --out_dir=out-synthetic --tasks=generate --data_file=data/classify/synthetic_test.jsonl --max_new_tokens=4

Messages are short chat lines about the weather, sport or food, built from word lists: one or two topic
words among filler, so that the label is decided by words a pretrained model already knows. This is a
stand-in for the format and the plumbing, not for the difficulty of real moderation data.
"""

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from configurator import configure

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
    out_dir: str = "data/classify"  # writes synthetic_train/val/test.jsonl here
    n_train: int = 3000  # examples per split
    n_val: int = 300
    n_test: int = 300
    seed: int = 0  # the same seed writes the same files


def message(rng, topic):
    words = [rng.choice(OPENERS)] + rng.sample(FILLER, rng.randint(2, 4))
    for w in rng.sample(TOPICS[topic], rng.randint(1, 2)):
        words.insert(rng.randint(1, len(words)), w)
    return " ".join(words)


def make_examples(n, rng):
    labels = sorted(TOPICS)
    return [{"prompt": PROMPT.format(text=message(rng, t)), "completion": " " + t}
            for t in (rng.choice(labels) for _ in range(n))]


def write_jsonl(path, rows):
    """Atomic: a temporary file, fsynced, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(cfg):
    rng = random.Random(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        rows = make_examples(n, rng)
        write_jsonl(out / f"synthetic_{split}.jsonl", rows)
        print(f"{out / f'synthetic_{split}.jsonl'}: {n:,} examples")
    print("example:", json.dumps(rows[0]))


if __name__ == "__main__":
    main(configure(SyntheticConfig))
