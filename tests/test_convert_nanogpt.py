"""nanoGPT runs come along: the same logits, the vocabulary from meta.pkl (read without running
code), and a converted run that resumes training where nanoGPT left it."""

import dataclasses
import json
import math
import os
import pickle
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from homegpt import weights
from homegpt import checkpoint as ckpt_lib
import convert_nanogpt as cn
import train
from configurator import parse_config
from helpers import ROOT, char_dataset, read_metrics
from model import GPT, GPTConfig
from homegpt.optimizers import configure_optimizers

NANOGPT_KEYS = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"]

# the config dict nanoGPT's train.py stores in ckpt.pt: all its knobs (its defaults, as in its train.py),
# here with the tiny model's shape and a char dataset
NANOGPT_CONFIG = dict(
    out_dir="out-shakespeare-char", eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False,
    always_save_checkpoint=True, init_from="scratch", wandb_log=False, wandb_project="owt", wandb_run_name="gpt2",
    dataset="shakespeare_char", gradient_accumulation_steps=1, batch_size=16, block_size=32, n_layer=2, n_head=2,
    n_embd=32, dropout=0.0, bias=False, learning_rate=3e-3, max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.99,
    grad_clip=1.0, decay_lr=True, warmup_iters=100, lr_decay_iters=5000, min_lr=3e-4, backend="nccl", device="cuda",
    dtype="bfloat16", compile=True)
STEPS = 80  # enough for the loss to fall well below ln(vocab): ~2.9 against ln(62) = 4.13


def nanogpt_checkpoint(model, optimizer, iter_num, best_val_loss, config):
    """A dict shaped like nanoGPT's ckpt.pt: a compiled model's `_orig_mod.` keys, the causal-mask buffers
    of its non-flash attention, torch's own optimizer state_dict, best_val_loss as a tensor."""
    sd = {"_orig_mod." + k: v.clone() for k, v in model.state_dict().items()}
    bs = model.config.block_size
    for i in range(model.config.n_layer):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs)
    margs = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")}
    return {"model": sd, "optimizer": optimizer.state_dict(), "model_args": margs | {"dropout": config["dropout"]},
            "iter_num": iter_num, "best_val_loss": torch.tensor(best_val_loss), "config": config}


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory):
    """A nanoGPT checkout after `python data/shakespeare_char/prepare.py` and a short training run:
    root/data/shakespeare_char/{train.bin, meta.pkl}, root/out-shakespeare-char/ckpt.pt. The model is
    trained here, as nanoGPT trains it (AdamW, random windows); returns (root, ckpt path, its last loss)."""
    root = tmp_path_factory.mktemp("nanoGPT")
    data = char_dataset(root / "data" / "shakespeare_char", 200_000)  # the same ids as nanoGPT's prepare.py
    itos = json.loads((data / "meta.json").read_text())["itos"]
    (data / "meta.json").unlink()  # nanoGPT has none: its vocabulary is in meta.pkl
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(itos), "itos": dict(enumerate(itos)), "stoi": {c: i for i, c in enumerate(itos)}}, f)
    cfg = NANOGPT_CONFIG
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=len(itos), bias=False,
                          activation="gelu"))
    opt = configure_optimizers(model, cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), "cpu")
    tokens = torch.from_numpy(np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        ix = torch.randint(len(tokens) - 33, (16,), generator=gen)
        x = torch.stack([tokens[i:i + 32] for i in ix])
        y = torch.stack([tokens[i + 1:i + 33] for i in ix])
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    run_dir = root / cfg["out_dir"]
    run_dir.mkdir()
    torch.save(nanogpt_checkpoint(model, opt, STEPS, losses[-1], cfg), run_dir / "ckpt.pt")
    last_loss = sum(losses[-10:]) / 10
    assert last_loss < math.log(len(itos)) - 1.0, losses[-10:]  # a model that learned something, or the test proves nothing
    return root, run_dir / "ckpt.pt", last_loss, itos


def test_converted_nanogpt_checkpoint_gives_the_same_logits_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    ref = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=False, activation="gelu"))
    opt = configure_optimizers(ref, 0.1, 1e-3, (0.9, 0.99), "cpu")
    x = torch.randint(0, 65, (2, 16))
    ref(x, x)[1].backward()
    opt.step()
    old = nanogpt_checkpoint(ref, opt, 250, 1.47, {"dataset": "shakespeare_char", "learning_rate": 1e-3,
                                                   "beta2": 0.99, "device": "cuda", "dropout": 0.2})
    assert all(k in old["model"] for k in ["_orig_mod." + k for k in NANOGPT_KEYS])
    torch.save(old, tmp_path / "ckpt.pt")
    out = tmp_path / "converted"
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"tokenizer": "char", "vocab_size": 65, "itos": [chr(32 + i) for i in range(65)]}))
    r = subprocess.run([sys.executable, "convert_nanogpt.py", f"--ckpt={tmp_path / 'ckpt.pt'}", f"--out_dir={out}",
                        f"--dataset_meta={meta}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, info = weights.load_model(out)
    assert info["iter_num"] == 250 and info["best_val_loss"] == pytest.approx(1.47)
    assert info["data_meta"]["tokenizer"] == "char"
    ref.eval()
    ignore = torch.full_like(x, -1)
    assert torch.equal(model(x, ignore)[0], ref(x, ignore)[0])
    # AdamW's moments arrive on the parameters they belong to (they are keyed by name in our format)
    ckpt_dir, state = ckpt_lib.read_checkpoint(out)
    fresh = GPT(GPTConfig(**state["model_args"]))
    opt2 = configure_optimizers(fresh, 0.1, 1e-3, (0.9, 0.99), "cpu")
    ckpt_lib.restore_optimizer(fresh, opt2, ckpt_dir, state)
    for p, q in zip(ref.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_conversion_refuses_unsafe_pickles_without_consent(tmp_path):
    import argparse  # an arbitrary Python object, as nanoGPT-era scripts stored: weights_only refuses it
    torch.save({"model": {}, "model_args": {}, "extra": argparse.Namespace(a=1)}, tmp_path / "ckpt.pt")
    r = subprocess.run([sys.executable, "convert_nanogpt.py", f"--ckpt={tmp_path / 'ckpt.pt'}",
                        f"--out_dir={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--trust_pickle=True" in r.stderr
    assert not (tmp_path / "o").exists()


def test_meta_pkl_is_found_beside_nanogpts_dataset_and_sampling_decodes(nanogpt, tmp_path, monkeypatch):
    root, ckpt, _, itos = nanogpt
    monkeypatch.chdir(tmp_path)  # neither our checkout nor nanoGPT's: found from the checkpoint's place
    out = tmp_path / "converted"
    cn.convert(cn.ConvertConfig(ckpt=str(ckpt), out_dir=str(out)))
    meta = ckpt_lib.read_checkpoint(out)[1]["data_meta"]
    # exactly what our data/shakespeare_char/prepare.py writes, so sample.py, eval.py and train.py agree
    assert meta == {"tokenizer": "char", "vocab_size": len(itos), "itos": itos}
    import sample
    text = sample.main(sample.SampleConfig(out_dir=str(out), device="cpu", num_samples=1, max_new_tokens=20,
                                           start="ROMEO:"))[0]
    assert text.startswith("ROMEO:") and len(text) == 26 and set(text) <= set(itos)
    # given by hand, the same
    cn.convert(cn.ConvertConfig(ckpt=str(ckpt), out_dir=str(tmp_path / "again"),
                                dataset_meta=str(root / "data" / "shakespeare_char" / "meta.pkl")))
    assert ckpt_lib.read_checkpoint(tmp_path / "again")[1]["data_meta"] == meta


class Evil:
    def __reduce__(self):
        return os.system, ("touch pwned",)


class Harmless:
    pass


def test_a_meta_pkl_naming_any_class_or_function_is_refused_without_running_it(nanogpt, tmp_path):
    _, ckpt, _, _ = nanogpt
    evil = tmp_path / "meta.pkl"
    evil.write_bytes(pickle.dumps({"vocab_size": 65, "itos": Evil()}))
    r = subprocess.run([sys.executable, str(ROOT / "convert_nanogpt.py"), f"--ckpt={ckpt}", f"--out_dir={tmp_path / 'o'}",
                        f"--dataset_meta={evil}"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "refused" in r.stderr and ".system" in r.stderr  # os.system pickles as posix.system
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()
    (tmp_path / "x.pkl").write_bytes(pickle.dumps({"itos": [Harmless()]}))  # any class at all
    with pytest.raises(ValueError, match="refused: the pickle references .*Harmless"):
        cn.read_meta_pkl(tmp_path / "x.pkl")
    plain = {"vocab_size": 2, "itos": {0: "a", 1: "b"}, "extra": [(1.5, None, True, b"x")]}
    (tmp_path / "x.pkl").write_bytes(pickle.dumps(plain))
    assert cn.read_meta_pkl(tmp_path / "x.pkl") == plain  # plain data comes out as it went in
    (tmp_path / "x.pkl").write_bytes(pickle.dumps({"itos": ["a"]})[:-3])
    with pytest.raises(ValueError, match="not a readable pickle"):
        cn.read_meta_pkl(tmp_path / "x.pkl")


@pytest.mark.parametrize("meta,match", [
    ({"vocab_size": 2, "itos": {0: "a", 2: "b"}}, "ids are not 0..1"),
    ({"vocab_size": 2, "itos": {0: "ab", 1: "c"}}, "not single characters"),
    ({"vocab_size": 3, "itos": {0: "a", 1: "b"}}, "vocab_size 3 but itos has 2"),
    ({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 1, "b": 0}}, "stoi and itos disagree"),
    ({"vocab_size": 2}, "expected nanoGPT's character vocabulary"),
])
def test_a_vocabulary_that_would_decode_wrongly_is_refused(meta, match):
    with pytest.raises(ValueError, match=match):
        cn.char_meta(meta, "meta.pkl")


def test_a_vocabulary_larger_than_the_model_is_refused(nanogpt, tmp_path):
    _, ckpt, _, itos = nanogpt
    big = tmp_path / "meta.pkl"
    big.write_bytes(pickle.dumps({"vocab_size": 100, "itos": {i: chr(40 + i) for i in range(100)}}))
    with pytest.raises(ValueError, match=f"100 tokens, more than the model's vocab_size {len(itos)}"):
        cn.convert(cn.ConvertConfig(ckpt=str(ckpt), out_dir=str(tmp_path / "o"), dataset_meta=str(big)))


@pytest.mark.parametrize("where", ["dataset", "data_dir"])
def test_a_converted_run_resumes_with_only_its_shape_given(nanogpt, tmp_path, monkeypatch, capsys, where):
    root, ckpt, last_loss, itos = nanogpt
    ours = tmp_path / "homegpt"  # our checkout, where data/shakespeare_char/prepare.py has run
    data = char_dataset(ours / "data" / "shakespeare_char", 200_000)
    monkeypatch.chdir(ours)
    out = tmp_path / "out-converted"
    cn.convert(cn.ConvertConfig(ckpt=str(ckpt), out_dir=str(out), data_dir=str(data) if where == "data_dir" else ""))
    command = capsys.readouterr().out.split("resume it with")[1].splitlines()[1].strip()
    converted = ckpt_lib.read_checkpoint(out)[1]

    # just the unavoidable: where the data is, and the model's shape where it is not our default
    # (device and dtype fix this test's machine; max_iters and eval_iters keep it short)
    base = dict(init_from="resume", out_dir=str(out), n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False,
                device="cpu", dtype="float32", max_iters=STEPS + 4, eval_iters=2)
    base |= {"data_dir": str(data)} if where == "data_dir" else {"dataset": "shakespeare_char"}
    result = train.main(train.TrainConfig(**base))
    assert result["iter_num"] == STEPS + 4
    losses = [m["train_loss"] for m in read_metrics(out) if "train_loss" in m]
    assert len(losses) == 4
    # the weights came along: training goes on from nanoGPT's loss, not from ln(vocab) ~ 4.1 of a fresh model
    assert abs(losses[0] - last_loss) < 0.25 and losses[0] < math.log(len(itos)) - 1.0, (losses, last_loss)

    saved = converted["config"]
    # every key of ours is there, none None where ours cannot be None (a None can't be typed on the command
    # line); qkv_bias and attn_proj_bias are None by default, meaning "as bias"
    assert set(saved) == {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert all(v is not None or k in ("qkv_bias", "attn_proj_bias") for k, v in saved.items())
    assert saved["learning_rate"] == 3e-3 and saved["warmup_iters"] == 100 and saved["bias"] is False  # nanoGPT's
    assert converted["tokens_seen"] == STEPS * 16 * 32  # nanoGPT's iterations x its 1 accum x 16 batch x 32 block

    # the printed command is the whole of nanoGPT's run in our keys: parsed, it matches the saved config
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"]
    parsed = dataclasses.asdict(parse_config(train.TrainConfig, args[2:]))
    differ = {k for k in saved if parsed[k] != saved[k]}
    assert differ <= {"init_from", *cn.MACHINE_KEYS}, differ
