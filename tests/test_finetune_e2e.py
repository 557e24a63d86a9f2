"""End to end: pretrain a tiny char model, LoRA-fine-tune it on a labelling task from JSONL, and check
that it beats its own few-shot baseline. Run: python -m pytest -q -m slow tests/test_finetune_e2e.py"""

import json
import random

import numpy as np
import pytest
import torch

import train
from homegpt.weights import load_model
from homegpt.dataloader import Tokenizer, write_raw_tokens
from helpers import read_metrics, tiny_train_config
from homegpt.lora import LoRALinear
from homegpt.sft import evaluate_generation, format_generation_report, load_examples

# the task: a message of 3-6 letters a-l, labelled by its last letter
LABELS = {"abcd": "RED", "efgh": "GREEN", "ijkl": "BLUE"}


def make_examples(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice("abcdefghijkl") for _ in range(rng.randint(3, 6)))
        label = next(v for k, v in LABELS.items() if s[-1] in k)
        out.append({"prompt": s, "completion": f"{label}\n"})
    return out


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def pretraining_data(path):
    """Lines in the task's format with *random* labels: the base model learns the 'language' (letters,
    the label words, one item per line) but not the rule, as GPT-2 knows English but not our task."""
    rng = random.Random(0)
    text = "".join(e["prompt"] + rng.choice(list(LABELS.values())) + "\n" for e in make_examples(8000, 0))
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    path.mkdir(parents=True)
    write_raw_tokens(path / "train.bin", ids[:n])
    write_raw_tokens(path / "val.bin", ids[n:])
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": chars, "train_tokens": n, "val_tokens": len(ids) - n}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.slow
def test_lora_finetune_beats_chance_and_few_shot(tmp_path):
    torch.manual_seed(0)
    data = pretraining_data(tmp_path / "data")
    train_file = write_jsonl(tmp_path / "train.jsonl", make_examples(400, 1))
    val_file = write_jsonl(tmp_path / "val.jsonl", make_examples(50, 2))
    test = make_examples(90, 3)

    pre = tmp_path / "pre"
    train.main(tiny_train_config(data, pre, block_size=64, batch_size=8, max_iters=100, lr_decay_iters=100,
                                 eval_interval=100, log_interval=50, learning_rate=1e-2, min_lr=1e-3, warmup_iters=10))
    ft = tmp_path / "ft"
    train.main(tiny_train_config(data, ft, init_from=str(pre), sft_train_file=str(train_file),
                                 sft_val_file=str(val_file), lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                 lora_targets="all", block_size=32, batch_size=16, max_iters=150,
                                 lr_decay_iters=150, eval_interval=150, log_interval=50, learning_rate=2e-2,
                                 min_lr=1e-3, warmup_iters=5, weight_decay=0.0))
    val = [m["val_loss"] for m in read_metrics(ft) if "val_loss" in m]
    assert val[-1] < 0.5 * val[0], f"SFT validation loss (completions only) did not drop: {val}"

    model, info = load_model(ft)  # the adapter merged into a plain GPT
    base, _ = load_model(pre)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight), "LoRA must leave wte frozen"
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    tok = Tokenizer(info["data_meta"])
    tuned = evaluate_generation(model, tok, test, "cpu", None, max_new_tokens=8)
    # few-shot: the demonstrations written as the pretraining text's lines (the completion ends in \n)
    few = evaluate_generation(base, tok, test, "cpu", None, max_new_tokens=8, k_shot=3,
                              shots=load_examples(train_file), template="{prompt}{completion}")
    report = format_generation_report(tuned) + "\n" + format_generation_report(few)
    assert sorted(tuned["labels"]) == ["blue", "green", "red"]  # normalised: lower case, no newline
    assert tuned["accuracy"] >= 0.8, report  # chance is 1/3
    assert tuned["accuracy"] >= few["accuracy"] + 0.3, report
