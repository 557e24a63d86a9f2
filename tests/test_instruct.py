"""From base model to assistant: instruction data prepared and split, early stopping that keeps the
best, the prompt template recorded in the checkpoint, and chat with the result (sample.py --chat)."""

import dataclasses
import importlib.util
import io
import json
import random
import sys

import pytest
import torch

import sample
from homegpt import sft
import train
from homegpt.weights import load_model
from homegpt.checkpoint import read_checkpoint
from homegpt.errors import MissingFile, UserError
from homegpt.dataloader import Tokenizer
from helpers import ROOT, read_metrics, tiny_train_config
from homegpt.generate import generate

# loaded under its own name: a bare `import prepare` would shadow the other data/*/prepare.py scripts
_spec = importlib.util.spec_from_file_location("instruct_prepare", ROOT / "data" / "instruct" / "prepare.py")
instruct_prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(instruct_prepare)

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "window", "candle", "garden",
         "silver", "rocket", "forest", "pencil", "butter", "dragon"]


def records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        if i % 3 == 0:
            out.append({"instruction": "Repeat the word.", "input": w, "output": f"{w}"})
        else:
            out.append({"instruction": f"Say the word {w}.", "input": "", "output": f"{w}"})
    return out


ANSWERS = {"Name a fruit.": "apple", "Name a colour.": "green", "Name an animal.": "tiger",
           "Name an instrument.": "piano"}


def assistant_records(n):
    return [{"instruction": q, "input": "", "output": ANSWERS[q]} for q in list(ANSWERS) * (n // len(ANSWERS))]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ----------------------------------------------------------------------------- data/instruct/prepare.py

def test_prepare_splits_85_5_10_deterministically_and_loses_nothing(tmp_path):
    src = tmp_path / "data.json"
    recs = [dict(r, output=f"{r['output']} #{i}") for i, r in enumerate(records(1100))]  # all distinct
    src.write_text(json.dumps(recs))
    cfg = instruct_prepare.PrepareConfig(input=str(src), out_dir=str(tmp_path / "a"))
    assert instruct_prepare.main(cfg) == {"train": 935, "val": 55, "test": 110}  # the book's counts
    instruct_prepare.main(instruct_prepare.PrepareConfig(input=str(src), out_dir=str(tmp_path / "b")))
    other = instruct_prepare.PrepareConfig(input=str(src), out_dir=str(tmp_path / "c"), seed=7)
    instruct_prepare.main(other)
    for name in ("train", "val", "test"):
        a, b = (tmp_path / d / f"{name}.jsonl" for d in "ab")
        assert a.read_bytes() == b.read_bytes(), f"{name}: the same seed must give the same bytes"
    assert (tmp_path / "a/test.jsonl").read_bytes() != (tmp_path / "c/test.jsonl").read_bytes()
    got = [r for name in ("train", "val", "test") for r in sft.read_records(tmp_path / "a" / f"{name}.jsonl")]
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, recs)), "every record lands in exactly one split"
    assert got[:935] != recs[:935], "the split is shuffled, not the file's order"
    meta = json.loads((tmp_path / "a/split.json").read_text())
    assert (meta["records"], meta["train"], meta["val"], meta["test"], meta["seed"]) == (1100, 935, 55, 110, 123)


def test_prepare_refuses_bad_input_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "no output"}\n')
    with pytest.raises(UserError, match="line 2"):
        instruct_prepare.main(instruct_prepare.PrepareConfig(input=str(bad), out_dir=str(out)))
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}] * 20)
    with pytest.raises(UserError, match="instruction records"):
        instruct_prepare.main(instruct_prepare.PrepareConfig(input=str(pc), out_dir=str(out)))
    with pytest.raises(MissingFile):
        instruct_prepare.main(instruct_prepare.PrepareConfig(input=str(tmp_path / "none.json"), out_dir=str(out)))
    with pytest.raises(UserError, match="source must be one of"):
        instruct_prepare.main(instruct_prepare.PrepareConfig(source="dolly", out_dir=str(out)))
    assert not out.exists()


def test_prepare_without_network_says_how_to_give_a_local_file(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--input=path/to/file.json"):
        instruct_prepare.main(instruct_prepare.PrepareConfig(out_dir=str(tmp_path)))
    assert not (tmp_path / "source.json").exists() and not (tmp_path / "train.jsonl").exists()


def test_alpaca_falls_back_to_the_hub_and_offline_reads_only_the_datasets_cache(tmp_path, monkeypatch):
    """Alpaca's URL failing, its hub copy (tatsu-lab/alpaca) is read through hub.load_hub_dataset: the
    splits come from it, and with the hub unreachable the error names both failures and --input."""
    import urllib.request

    from homegpt import hub
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i), "text": "unused"} for i in range(40)]
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, config, split: asked.append((repo, split, datasets.config.HF_HUB_OFFLINE))
                        or datasets.Dataset.from_list(rows))
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    out = tmp_path / "alpaca"
    counts = instruct_prepare.main(instruct_prepare.PrepareConfig(source="alpaca", out_dir=str(out)))
    assert counts == {"train": 34, "val": 2, "test": 4} and asked[0][:2] == ("tatsu-lab/alpaca", "train")
    assert json.loads((out / "source.json").read_text())[0] == {"instruction": "say 0", "input": "", "output": "0"}

    def not_cached(repo, config, split):
        asked.append((repo, split, datasets.config.HF_HUB_OFFLINE))
        raise FileNotFoundError("not in the cache")
    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "no DNS")
    with pytest.raises(UserError, match=r"no route.*hub is unreachable \(no DNS\).*--input=path/to/file.json"):
        instruct_prepare.main(instruct_prepare.PrepareConfig(source="alpaca", out_dir=str(tmp_path / "b")))
    assert asked[-1][2] is True  # offline: the datasets cache only, no request
    assert not (tmp_path / "b" / "source.json").exists()


# ----------------------------------------------------------------------------- early stopping

def test_early_stopping_stops_an_overfitting_run_and_keeps_its_best(tmp_path, capsys):
    torch.manual_seed(0)
    train_file = write_jsonl(tmp_path / "train.jsonl", records(6, seed=1))
    # validation answers unrelated to their instructions: memorising the 6 training answers only hurts
    val_file = write_jsonl(tmp_path / "val.jsonl", [dict(r, output=random.Random(i).choice(WORDS) + " and "
                                                         + random.Random(i + 99).choice(WORDS))
                                                    for i, r in enumerate(records(8, seed=2))])
    out = tmp_path / "run"
    cfg = tiny_train_config(tmp_path, out, sft_train_file=str(train_file), sft_val_file=str(val_file),
                            block_size=48, batch_size=6, max_iters=400, lr_decay_iters=400, eval_interval=10,
                            eval_iters=0, log_interval=10, learning_rate=1e-2, min_lr=1e-2, warmup_iters=1,
                            always_save_checkpoint=False, early_stop_patience=2)
    result = train.main(cfg)
    assert result["early_stopped"] and result["iter_num"] < 400, result
    vals = [(m["iter"], m["val_loss"]) for m in read_metrics(out) if "val_loss" in m]
    best_iter, best = min(vals, key=lambda v: v[1])
    assert result["best_iter"] == best_iter and result["best_val_loss"] == pytest.approx(best)
    after = [v for i, v in vals if i > best_iter]
    assert len(after) == 2 and all(v >= best for v in after), vals  # exactly the patience, none better
    assert result["iter_num"] == vals[-1][0]
    assert "early stop at iteration" in capsys.readouterr().out
    best_dir, best_state = read_checkpoint(out, "best")
    last_dir, last_state = read_checkpoint(out, "latest")
    assert best_state["iter_num"] == best_iter and last_state["iter_num"] == result["iter_num"]
    # a resume with the same patience stops where it stood; a larger one trains on
    again = train.main(dataclasses.replace(cfg, init_from="resume"))
    assert again["iter_num"] == result["iter_num"] and again["early_stopped"]
    more = train.main(dataclasses.replace(cfg, init_from="resume", early_stop_patience=3))
    assert more["iter_num"] > result["iter_num"]


def test_early_stopping_needs_validation_data(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", records(6))
    with pytest.raises(UserError, match="early_stop_patience needs validation data"):
        train.main(tiny_train_config(tmp_path, tmp_path / "o", sft_train_file=str(f), early_stop_patience=2))


# ----------------------------------------------------------------------------- a tiny assistant, and chat

@pytest.fixture(scope="module")
def assistant(tmp_path_factory):
    """A tiny GPT-2-BPE model tuned from scratch to answer four instructions ('Name an animal.' -> 'tiger')."""
    tmp = tmp_path_factory.mktemp("assistant")
    torch.manual_seed(0)
    train_file = write_jsonl(tmp / "train.jsonl", assistant_records(64))
    val_file = write_jsonl(tmp / "val.jsonl", assistant_records(8))
    out = tmp / "out-instruct"
    train.main(tiny_train_config(tmp, out, sft_train_file=str(train_file), sft_val_file=str(val_file),
                                 n_embd=64, block_size=64, batch_size=16, max_iters=80, lr_decay_iters=80,
                                 eval_interval=80, log_interval=50, learning_rate=1e-2, min_lr=1e-3,
                                 warmup_iters=10))
    return out


def test_a_run_records_the_template_it_trained_with(assistant, tmp_path):
    _, state = read_checkpoint(assistant)
    assert state["data_meta"]["prompt_template"] == {"input": sft.ALPACA_TEMPLATE,
                                                     "no_input": sft.ALPACA_TEMPLATE_NO_INPUT}
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: x\nA:", "completion": " y"}] * 8)
    custom = write_jsonl(tmp_path / "c.jsonl", records(8))
    for data, template, expect in ((pc, "", None), (custom, "Task: {instruction} {input}\n", "Task: {instruction} {input}\n")):
        out = tmp_path / f"o{len(str(expect))}"
        # tuned from the assistant: a base's template must not leak into a run on other data
        train.main(tiny_train_config(tmp_path, out, init_from=str(assistant), sft_train_file=str(data),
                                     sft_template=template, block_size=64, max_iters=1, eval_interval=1))
        _, state = read_checkpoint(out)
        got = state["data_meta"].get("prompt_template")
        assert got == (None if expect is None else {"input": expect, "no_input": expect})


def test_early_stopping_says_when_no_iteration_beat_the_starting_weights(assistant, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", assistant_records(16))
    out = tmp_path / "worse"
    # a learning rate that can only wreck a converged model: every evaluation is worse than iteration 0's
    r = train.main(tiny_train_config(tmp_path, out, init_from=str(assistant), sft_train_file=str(data),
                                     sft_val_file=str(data), block_size=64, max_iters=100, eval_interval=2,
                                     eval_iters=0, learning_rate=0.5, min_lr=0.5, warmup_iters=1, grad_clip=0.0,
                                     early_stop_patience=2, always_save_checkpoint=False))
    assert r["early_stopped"] and r["best_iter"] == 0 and r["iter_num"] == 4
    out_text = capsys.readouterr().out
    assert "no iteration beat the weights the run started from" in out_text and str(assistant) in out_text
    assert not (out / "best.json").exists()  # nothing was better; the last weights are latest's alone


def greedy_answer(model, tok, prompt, max_new_tokens):
    x = torch.tensor([tok.encode(prompt)])
    ids = generate(model, x, max_new_tokens, temperature=0.0)[0, x.size(1):].tolist()
    return ids


def test_chat_wraps_the_instruction_in_the_runs_template_and_stops_at_end_of_text(assistant, capsys):
    model, info = load_model(assistant, which="best")
    tok = Tokenizer(info["data_meta"])
    instruction = "Name an animal."
    ids = greedy_answer(model, tok, sft.ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction), 30)
    assert tok.eot in ids, f"the fixture model should end its answer: {tok.decode(ids)!r}"
    expected = tok.decode(ids[:ids.index(tok.eot)])
    cfg = sample.SampleConfig(out_dir=str(assistant), chat=True, start=instruction, temperature=0.0,
                              max_new_tokens=30, device="cpu", dtype="float32")
    answers = sample.main(cfg)
    assert answers == [expected] and expected.strip() == "tiger"
    out = capsys.readouterr().out
    assert expected in out and "<|endoftext|>" not in out and "### Instruction" not in out


def test_chat_reads_instructions_from_a_pipe_until_a_blank_line(assistant, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name an instrument.\nName a fruit.\n\nName a colour.\n"))
    cfg = sample.SampleConfig(out_dir=str(assistant), chat=True, temperature=0.0, max_new_tokens=30,
                              device="cpu", dtype="float32")
    answers = sample.main(cfg)
    assert [a.strip() for a in answers] == ["piano", "apple"]  # the blank line ended the session


def test_chat_on_a_model_without_a_template_says_how_to_give_one(tmp_path):
    data = tmp_path / "pc.jsonl"
    write_jsonl(data, [{"prompt": "Q: x\nA:", "completion": " y"}] * 8)
    out = tmp_path / "pc-run"
    train.main(tiny_train_config(tmp_path, out, sft_train_file=str(data), block_size=32, max_iters=1))
    cfg = sample.SampleConfig(out_dir=str(out), chat=True, start="hello", device="cpu", dtype="float32",
                              max_new_tokens=2)
    with pytest.raises(UserError, match="--chat_template="):
        sample.main(cfg)
    with pytest.raises(UserError, match="must contain"):
        sample.main(sample.SampleConfig(out_dir=str(out), chat=True, chat_template="Q: {input}", start="x"))
    answers = sample.main(sample.SampleConfig(out_dir=str(out), chat=True, start="x", chat_template="Q: {instruction}\nA:",
                                              device="cpu", dtype="float32", max_new_tokens=2, temperature=0.0))
    assert len(answers) == 1
