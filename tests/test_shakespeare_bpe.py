"""data/shakespeare/prepare.py: Tiny Shakespeare in GPT-2 BPE with nanoGPT's exact token counts.

    python -m pytest -q tests/test_shakespeare_bpe.py
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from homegpt.dataloader import TokenData, gpt2_encoding

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "shakespeare" / "prepare.py"
SHIPPED = ROOT / "data" / "shakespeare_char" / "input.txt"

pytestmark = pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped Tiny Shakespeare text is missing")


def _load_prepare():
    spec = importlib.util.spec_from_file_location("shakespeare_prepare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_writes_nanogpts_token_counts(tmp_path):
    prep = _load_prepare()
    meta = prep.main(prep.PrepareConfig(out_dir=str(tmp_path)))
    assert meta == {"vocab_size": 50257, "tokenizer": "gpt2", "train_tokens": 301_966, "val_tokens": 36_059}
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    train, val = TokenData(tmp_path, "train"), TokenData(tmp_path, "val")
    assert (train.n_tokens, val.n_tokens) == (301_966, 36_059)
    enc = gpt2_encoding()
    head = train.read(0, 0, 5).astype(np.int64).tolist()
    assert enc.decode(head) == "First Citizen:\nBefore"
    # the validation split starts mid-text, where the first 90% of the characters end
    text = SHIPPED.read_text(encoding="utf-8")
    val_head = enc.decode(val.read(0, 0, 20).astype(np.int64).tolist())
    assert text[int(0.9 * len(text)):].startswith(val_head)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_command_line_out_dir_and_missing_input(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "shk"
    r = subprocess.run([sys.executable, str(SCRIPT), f"--out_dir={out}"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "301,966" in r.stdout and json.loads((out / "meta.json").read_text())["val_tokens"] == 36_059
    r = subprocess.run([sys.executable, str(SCRIPT), f"--out_dir={tmp_path / 'x'}", f"--input={tmp_path / 'nope.txt'}"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "nope.txt" in r.stderr
    assert not (tmp_path / "x").exists()


def test_finetune_and_eval_configs_parse_and_match_their_arithmetic():
    from configurator import parse_config
    from train import TrainConfig
    cfg = parse_config(TrainConfig, [str(ROOT / "config" / "finetune_shakespeare.py")])
    assert (cfg.init_from, cfg.dataset, cfg.out_dir) == ("gpt2-xl", "shakespeare", "out-shakespeare")
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    assert tokens_per_iter == 32_768 and round(301_966 / tokens_per_iter, 1) == 9.2
    assert round(cfg.max_iters * tokens_per_iter / 301_966, 1) == 2.2
    assert not cfg.decay_lr and not cfg.always_save_checkpoint
    assert {train.get_lr(it, cfg) for it in range(cfg.max_iters)} == {3e-5}  # constant from the first step
    eval_mod = pytest.importorskip("eval")
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        path = ROOT / "config" / f"eval_{name.replace('-', '_')}.py"
        ecfg = parse_config(eval_mod.EvalConfig, [str(path)])
        assert (ecfg.init_from, ecfg.dataset, ecfg.eval_iters) == (name, "shakespeare", 0)


def test_training_on_shipped_shakespeare_prepares_it_first(tmp_path, monkeypatch):
    """One command to a first model: the token files of the shipped Tiny Shakespeare are made on the
    spot when missing (here in a copy of the checkout's data folder, so the real one is untouched)."""
    import shutil
    from homegpt import dataloader
    fake = tmp_path / "checkout"
    shutil.copytree(ROOT / "data" / "shakespeare_char", fake / "data" / "shakespeare_char",
                    ignore=shutil.ignore_patterns("*.bin", "meta.json"))
    monkeypatch.setattr(dataloader, "CHECKOUT", fake)
    monkeypatch.chdir(tmp_path)  # another working directory: data/ is found in the checkout
    cfg = train.TrainConfig(out_dir=str(tmp_path / "out"), device="cpu", dtype="float32", n_layer=1, n_head=2, n_embd=16,
                            block_size=16, batch_size=2, max_iters=1, eval_interval=1, eval_iters=1, warmup_iters=0)
    train.main(cfg)
    meta = json.loads((fake / "data" / "shakespeare_char" / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["train_tokens"] == 1_003_854
    # anything else stops with the command that prepares it
    from homegpt.prepare_text import prepare_shipped
    assert not prepare_shipped(fake / "data" / "fineweb" / "fineweb-edu_10BT")
