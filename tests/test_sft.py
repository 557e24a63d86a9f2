"""SFT data, loss masks, samplers and generation accuracy. Run: python -m pytest -q tests/test_sft.py"""

import json
import re
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from homegpt import sft
from homegpt.dataloader import Tokenizer
from helpers import Terminal
from model import GPT, GPTConfig
from homegpt.sft import (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, SFTSampler, choose_shots, evaluate_generation,
                 format_generation_report, load_examples, sft_eval_batches, tokenize_examples)

CHARS = sorted(set(string.ascii_letters + string.digits + ":?,.! \n<>|"))


def char_tok():
    return Tokenizer({"tokenizer": "char", "itos": CHARS})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def numbered_examples(n):
    """Example i: prompt 'i:' + lowercase filler (distinct lengths), completion uppercase + newline.
    Digits appear only in prompts' ids, uppercase and newline only in completions."""
    return [{"prompt": f"{i}:" + "abcdefg"[:i % 7], "completion": "XYZW"[:1 + i % 4] + "\n"} for i in range(n)]


def ids_in(tok, x_rows):
    """The example numbers in the order they appear in a batch's x rows (stream order)."""
    return [int(m) for row in x_rows for m in re.findall(r"(\d+):", tok.decode(row.tolist()))]


# ----------------------------------------------------------------------------- reading examples

def test_load_alpaca_records_and_prompt_completion(tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye"},
        {"prompt": "Q: 1+1?\nA:", "completion": " 2"},
    ])
    ex = load_examples(p)
    assert ex[0] == {"prompt": ALPACA_TEMPLATE.format(instruction="Add the numbers.", input="2 and 3"),
                     "completion": "5"}
    assert ex[0]["prompt"].endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert ex[1]["prompt"] == ALPACA_TEMPLATE_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in ex[2]["prompt"] and ex[2]["prompt"].endswith("### Instruction:\nSay bye.\n\n### Response:\n")
    assert ex[3] == {"prompt": "Q: 1+1?\nA:", "completion": " 2"}


def test_custom_template_and_json_array(tmp_path):
    p = tmp_path / "alpaca_data.json"  # Stanford Alpaca publishes one JSON array
    p.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "red"},
                             {"instruction": "Negate", "input": "yes", "output": "no"}], indent=2))
    ex = load_examples(p, template="Task: {instruction} [{input}]\nAnswer:")
    assert [e["prompt"] for e in ex] == ["Task: Name a colour. []\nAnswer:", "Task: Negate [yes]\nAnswer:"]
    assert load_examples(p, template="")[0]["prompt"] == ALPACA_TEMPLATE_NO_INPUT.format(instruction="Name a colour.")
    with pytest.raises(ValueError, match=r"unknown fields \['question'\]"):
        load_examples(p, template="{instruction} {question}")


def test_bad_lines_name_file_line_and_fields(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n'
                 '{"instruction": "no output here"}\n'
                 '\n'
                 '{"prompt": "p", "completion": 3}\n'
                 '{not json\n'
                 '{"text": "wrong schema"}\n')
    with pytest.raises(ValueError) as e:
        load_examples(p)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "4 bad record(s)" in msg
    assert "line 2: missing or non-string fields ['output']" in msg
    assert "line 4: missing or non-string fields ['completion']" in msg
    assert "line 5: not valid JSON" in msg
    assert "line 6: missing fields: found keys ['text']" in msg
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: holds no examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_a_file_of_many_bad_lines_lists_the_first_ten_and_counts_the_rest(tmp_path):
    """All bad lines are reported at once, but a file of thousands gives a message a user can read."""
    p = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "p"}] * 13)
    with pytest.raises(ValueError) as e:
        load_examples(p)
    lines = str(e.value).splitlines()
    assert "13 bad record(s)" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:-1]] == [f"line {n}" for n in range(1, 11)]
    assert lines[-1] == "  ... and 3 more"


# ----------------------------------------------------------------------------- tokens and masks

def test_tokenize_marks_completion_and_eot():
    tok = Tokenizer({"tokenizer": "gpt2"})
    ex = [{"prompt": "Classify: good movie\nLabel:", "completion": " positive"}]
    (ids, mask), = tokenize_examples(ex, tok, block_size=64)[0]
    p, c = tok.encode(ex[0]["prompt"]), tok.encode(" positive")
    assert ids.dtype == np.int64 and mask.dtype == bool
    assert ids.tolist() == p + c + [tok.eot]
    assert mask.tolist() == [False] * len(p) + [True] * (len(c) + 1)


def test_truncation_keeps_prompt_tail_and_completion():
    tok = char_tok()
    ex = [{"prompt": "abcdefghijklmnop:", "completion": "XY\n"},   # 17 + 3 > 12: prompt keeps its tail
          {"prompt": "ab:", "completion": "XYZXYZXYZXYZXYZ"},      # long completion: half the window each
          {"prompt": "ab:", "completion": "X\n"},                  # fits
          {"prompt": "", "completion": "X"}]                       # nothing predicts the first token: dropped
    out, n_truncated = tokenize_examples(ex, tok, block_size=11)
    assert n_truncated == 2 and len(out) == 3
    (a, ma), (b, mb), (c, mc) = out
    assert tok.decode(a.tolist()) == "ijklmnop:XY\n" and ma.sum() == 3  # whole completion, prompt's tail
    assert tok.decode(b.tolist()) == "ab:XYZXYZXYZ" and mb.sum() == 9   # prompt (<= half) kept, completion head
    assert len(c) == 5 and mc.tolist() == [False] * 3 + [True] * 2
    with pytest.raises(ValueError, match="SFT example 0 has an empty completion"):
        tokenize_examples([{"prompt": "ab", "completion": ""}], tok, block_size=11)
    with pytest.raises(ValueError, match="SFT example 1: character '@'"):
        tokenize_examples([{"prompt": "ab", "completion": "X"}, {"prompt": "a@", "completion": "X"}], tok, 11)


def check_targets(tok, x, y):
    """Every target is the next input token and a completion character; nothing else is a target."""
    B, T = x.shape
    targets = y[y != -1]
    assert targets.size > 0
    assert set(tok.decode(targets.tolist())) <= set("XYZW\n"), "a prompt token became a target"
    nxt = np.concatenate([x[:, 1:], np.full((B, 1), -1)], axis=1)
    inside = (y != -1) & (np.arange(T)[None, :] < T - 1)
    assert (y[inside] == nxt[inside]).all(), "targets are not the next tokens"


@pytest.mark.parametrize("packing", [False, True])
def test_sampler_shapes_targets_and_one_epoch(packing):
    tok = char_tok()
    examples = numbered_examples(24)
    data, _ = tokenize_examples(examples, tok, block_size=16)
    s = SFTSampler(data, batch_size=4, block_size=16, seed=7, packing=packing)
    seen = []
    while s.cursor < 24:
        x, y = s.next_batch()
        assert x.shape == y.shape and x.dtype == y.dtype == np.int64
        assert x.shape[0] == 4 and (x.shape[1] == 16 if packing else x.shape[1] <= 16)
        check_targets(tok, x, y)
        got = ids_in(tok, x)
        # targets per batch = completion lengths (uppercase + newline) of the examples in it
        assert (y != -1).sum() == sum(len(examples[i]["completion"]) for i in got)
        seen += got
    assert sorted(seen[:24]) == list(range(24)), "every example exactly once per epoch"
    assert seen[:24] != list(range(24)), "the order is shuffled"
    if not packing:  # rows padded to the longest example of the batch, never beyond
        x, y = SFTSampler(data, 4, 16, seed=7).next_batch()
        assert x.shape[1] == max(len(data[i][0]) for i in ids_in(tok, x)) - 1


def test_padding_target_positions_are_exactly_the_completion():
    tok = char_tok()
    data, _ = tokenize_examples([{"prompt": "5:abc", "completion": "XY\n"}, {"prompt": "6:", "completion": "Z\n"}],
                                tok, block_size=16)
    x, y = next(sft_eval_batches(data, batch_size=2, block_size=16))
    assert x.shape == (2, 7)
    # position t predicts token t+1: the prompt of 5 tokens makes positions 4..6 targets
    assert (y[0] != -1).nonzero()[0].tolist() == [4, 5, 6]
    assert (y[1] != -1).nonzero()[0].tolist() == [1, 2] and (y[1, 3:] == -1).all()  # padding never a target


def test_packed_rows_never_target_the_next_example():
    tok = char_tok()
    data, _ = tokenize_examples([{"prompt": "1:", "completion": "X\n"}] * 6, tok, block_size=11)
    x, y = SFTSampler(data, batch_size=1, block_size=11, seed=0, packing=True).next_batch()
    # three 4-token examples fill 12 = block_size + 1 tokens; only 'X' and '\n' of each are targets
    assert tok.decode(x[0].tolist()) == "1:X\n1:X\n1:X"
    assert tok.decode(y[0][y[0] != -1].tolist()) == "X\nX\nX\n"
    assert (y[0][[3, 7]] == -1).all(), "an example's last token must not predict the next example"


@pytest.mark.parametrize("packing", [False, True])
def test_sampler_resumes_exactly_mid_epoch(packing):
    data, _ = tokenize_examples(numbered_examples(30), char_tok(), block_size=16)
    a = SFTSampler(data, batch_size=3, block_size=16, seed=3, packing=packing)
    for _ in range(4):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able, as checkpoints store it
    want = [a.next_batch() for _ in range(12)]  # runs across the epoch boundary
    b = SFTSampler(data, batch_size=3, block_size=16, seed=999, packing=packing)
    b.load_state_dict(state)
    for (wx, wy), (gx, gy) in zip(want, (b.next_batch() for _ in range(12))):
        assert np.array_equal(wx, gx) and np.array_equal(wy, gy)
    with pytest.raises(ValueError, match="29 examples but the checkpoint's sampler had 30"):
        SFTSampler(data[:29], 3, 16, seed=3).load_state_dict(state)


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_take_disjoint_examples(packing):
    tok = char_tok()
    data, _ = tokenize_examples(numbered_examples(40), tok, block_size=16)
    ranks = [SFTSampler(data, batch_size=2, block_size=16, seed=5, rank=r, world_size=2, packing=packing)
             for r in range(2)]
    stream = []
    while ranks[0].cursor < 40:
        got = [ids_in(tok, s.next_batch()[0]) for s in ranks]
        assert ranks[0].cursor == ranks[1].cursor
        assert not set(got[0]) & set(got[1]), f"ranks share examples {set(got[0]) & set(got[1])}"
        stream += got[0] + got[1]
    assert sorted(stream[:40]) == list(range(40))


def test_eval_batches_in_file_order():
    tok = char_tok()
    data, _ = tokenize_examples(numbered_examples(7), tok, block_size=16)
    batches = list(sft_eval_batches(data, batch_size=3, block_size=16))
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    assert [i for x, _ in batches for i in ids_in(tok, x)] == list(range(7))
    assert len(list(sft_eval_batches(data, batch_size=3, block_size=16, max_batches=2))) == 2


# ----------------------------------------------------------------------------- loss masks in the model

def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size, dropout=0.0))


def test_masked_positions_get_zero_gradient():
    tok = char_tok()
    data, _ = tokenize_examples(numbered_examples(8), tok, block_size=16)
    x, y = SFTSampler(data, batch_size=4, block_size=16, seed=0).next_batch()
    model = tiny_model(len(CHARS))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    logits, loss = model(xt, yt, reduction="sum")
    logits.retain_grad()
    loss.backward()
    g = logits.grad.abs().sum(-1)  # (B, T)
    assert (g[yt == -1] == 0).all(), "prompt or padding positions leak into the loss"
    assert (g[yt != -1] > 0).all()
    # the loss is exactly the cross-entropy of the completion tokens, position by position
    logp = torch.log_softmax(logits.detach().float(), -1)
    b, t = (yt != -1).nonzero(as_tuple=True)
    torch.testing.assert_close(loss.detach(), -logp[b, t, yt[b, t]].sum())
    # rewriting the target of a prompt position (as an unmasked loss would) does change the loss
    y2 = yt.clone()
    y2[0, 0] = xt[0, 1]
    assert model(xt, y2, reduction="sum")[1].item() != pytest.approx(loss.item(), abs=1e-4)


def test_loss_normalisation_is_invariant_to_micro_batch_split():
    """train.py's rule: sum token losses per micro-batch, divide by the target count of the whole step."""
    tok = char_tok()
    examples = [{"prompt": f"{i}:", "completion": "XY" * (1 + 2 * (i % 3)) + "\n"} for i in range(8)]
    data, _ = tokenize_examples(examples, tok, block_size=16)
    x, y = SFTSampler(data, batch_size=4, block_size=16, seed=0).next_batch()
    counts = (y != -1).sum(1)
    assert len(set(counts.tolist())) > 1, f"need uneven target counts, got {counts}"
    model = tiny_model(len(CHARS)).double()
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        full = model(X, Y, reduction="sum")[1].item() / (y != -1).sum()
        for splits in ([1, 1, 1, 1], [1, 3], [3, 1], [2, 2]):
            micro = np.split(np.arange(4), np.cumsum(splits)[:-1])
            n_total = sum(int((Y[m] != -1).sum()) for m in micro)
            ours = sum(model(X[m], Y[m], reduction="sum")[1].item() for m in micro) / n_total
            naive = sum(model(X[m], Y[m])[1].item() for m in micro) / len(micro)
            assert abs(ours - full) < 1e-6, (splits, ours, full)
            if len(micro) > 1:
                assert abs(naive - full) > 1e-3, f"{splits}: the naive mean should weigh tokens unequally here"


# ----------------------------------------------------------------------------- generation accuracy

@pytest.fixture(autouse=True)
def rigged_generation(monkeypatch):
    """sft's greedy answers come from homegpt.generate.generate(model, ...); a RiggedModel answers itself."""
    real = sft.generate
    monkeypatch.setattr(sft, "generate", lambda model, idx, n, **kw: model.generate(idx, n, **kw)
                        if isinstance(model, RiggedModel) else real(model, idx, n, **kw))


class RiggedModel(nn.Module):
    """Stands in for GPT: answers each prompt from a table, records what it was asked."""

    def __init__(self, tok, answers, block_size=64):
        super().__init__()
        self.tok, self.answers, self.config = tok, answers, SimpleNamespace(block_size=block_size)
        self.prompts, self.temperatures = [], []

    def generate(self, idx, max_new_tokens, temperature=1.0, **kw):
        self.temperatures.append(temperature)
        rows = []
        for row in idx.tolist():
            prompt = self.tok.decode(row)
            self.prompts.append(prompt)
            key = next(k for k in self.answers if prompt.endswith(k))
            ans = list(self.answers[key]) if isinstance(self.answers[key], list) else self.tok.encode(self.answers[key])
            ans = (ans + self.tok.encode(" " * max_new_tokens))[:max_new_tokens]
            rows.append(row + ans)
        return torch.tensor(rows)


def test_exact_match_per_class_and_confusion():
    tok = char_tok()
    gold = {"m1:": " pos", "m2:": " pos", "m3:": " neg", "m4:": " neg", "m5:": " neu", "m6:": " neu"}
    answers = {"m1:": " POS\nmore text", "m2:": "  pos  ", "m3:": " pos\n", "m4:": "\nneg",
               "m5:": " maybe", "m6:": " neu"}
    examples = [{"prompt": p, "completion": c + "\n"} for p, c in gold.items()]
    model = RiggedModel(tok, answers)
    r = evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=12)
    assert set(model.temperatures) == {0.0}, "greedy decoding"
    assert r["predictions"] == ["pos", "pos", "pos", "neg", "maybe", "neu"]
    assert (r["n"], r["correct"], r["accuracy"]) == (6, 4, 4 / 6)
    assert r["labels"] == ["neg", "neu", "pos"]
    assert r["per_class"]["pos"] == {"n": 2, "predicted": 3, "correct": 2, "precision": 2 / 3, "recall": 1.0,
                                     "f1": 0.8}
    assert r["per_class"]["neu"]["recall"] == 0.5 and r["per_class"]["neu"]["precision"] == 1.0
    assert r["confusion"]["neg"] == {"neg": 1, "neu": 0, "pos": 1, "<other>": 0}
    assert r["confusion"]["neu"] == {"neg": 0, "neu": 1, "pos": 0, "<other>": 1}
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.8) / 3)
    report = format_generation_report(r)
    assert "0.6667 (4/6), 0-shot" in report and "<other>" in report
    assert re.search(r"neu\s+2\s+1\s+1\s+1\.000\s+0\.500\s+0\.667", report), report


def test_generation_stops_at_end_of_text():
    tok = Tokenizer({"tokenizer": "gpt2"})
    answer = tok.encode(" yes") + [tok.eot] + tok.encode(" and more")
    examples = [{"prompt": "Is it? A:", "completion": " Yes"}, {"prompt": "Multi? A:", "completion": "line one\nline two"}]
    multi = tok.encode("line one\nline two") + [tok.eot]
    model = RiggedModel(tok, {"Is it? A:": answer, "Multi? A:": multi})
    r = evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=8)
    assert r["predictions"] == ["yes", "line one line two"] and r["accuracy"] == 1.0


def test_k_shot_prompt_construction():
    tok = char_tok()
    shots = [{"prompt": f"s{i}:", "completion": c} for i, c in enumerate([" a", " a", " a", " b", " b", " c"])]
    shots.append({"prompt": "t1:", "completion": " a"})  # also a test prompt: never a demonstration
    chosen = choose_shots(shots, 3, seed=0, exclude=["t1:"])
    assert sorted(s["completion"] for s in chosen) == [" a", " b", " c"], "round-robin shows every label"
    assert choose_shots(shots, 3, seed=0, exclude=["t1:"]) == chosen, "seeded"
    examples = [{"prompt": "t1:", "completion": " a"}, {"prompt": "t2:", "completion": " b"}]
    model = RiggedModel(tok, {"t1:": " a", "t2:": " c"}, block_size=128)
    r = evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=4, k_shot=3, shots=shots)
    prefix = "".join(f"{s['prompt']}{s['completion']}\n\n" for s in chosen)
    assert sorted(model.prompts) == [prefix + "t1:", prefix + "t2:"]
    assert r["shots"] == chosen and r["k_shot"] == 3 and r["accuracy"] == 0.5
    assert "t1:" not in prefix
    model.prompts.clear()
    evaluate_generation(model, tok, examples[:1], "cpu", None, max_new_tokens=4, k_shot=1, shots=shots,
                        template="Q {prompt} A{completion}|")
    assert model.prompts[0].startswith("Q s") and model.prompts[0].endswith("|t1:")
    with pytest.raises(ValueError, match="unknown fields"):
        evaluate_generation(model, tok, examples, "cpu", None, k_shot=1, shots=shots, template="{instruction}")
    with pytest.raises(ValueError, match="must contain"):
        evaluate_generation(model, tok, examples, "cpu", None, k_shot=1, shots=shots, template="{prompt}")
    with pytest.raises(ValueError, match="needs shot examples"):
        evaluate_generation(model, tok, examples, "cpu", None, k_shot=2)


def test_long_prompts_keep_their_tail():
    tok = char_tok()
    long_prompt = "a" * 100 + "q9:"
    model = RiggedModel(tok, {"q9:": " x", "q1:": " x"}, block_size=32)
    r = evaluate_generation(model, tok, [{"prompt": long_prompt, "completion": " x"},
                                         {"prompt": "q1:", "completion": " x"}], "cpu", None, max_new_tokens=8)
    assert r["n_cropped"] == 1 and r["accuracy"] == 1.0
    assert sorted(map(len, model.prompts)) == [3, 24]  # block_size 32 - 8 new tokens
    assert "1 prompt(s) cropped" in format_generation_report(r)
    with pytest.raises(ValueError, match="example 0 has an empty prompt"):
        evaluate_generation(model, tok, [{"prompt": "", "completion": " x"}], "cpu", None)


def test_generation_counts_its_answers_on_a_terminal_only(monkeypatch, capfd):
    tok = char_tok()
    examples = [{"prompt": f"m{i}:", "completion": " pos"} for i in range(5)]
    model = RiggedModel(tok, {f"m{i}:": " pos" for i in range(5)})
    evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=4, batch_size=2)
    out, err = capfd.readouterr()
    assert "generating" not in out + err and "\r" not in err  # captured: not a terminal, so no bar
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=4, batch_size=2)
    assert "generating:" in terminal.getvalue() and "0/5" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=4, batch_size=2, progress=False)
    assert terminal.getvalue() == ""


def test_real_model_generation_batches_match_one_at_a_time():
    tok = char_tok()
    model = tiny_model(len(CHARS))
    examples = [{"prompt": p, "completion": " x"} for p in ["ab:", "cd:", "ef:", "abcd:", "q" * 40]]
    one = evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=4, batch_size=1)
    many = evaluate_generation(model, tok, examples, "cpu", None, max_new_tokens=4, batch_size=4)
    assert one["predictions"] == many["predictions"] and one["n_cropped"] == 1
    # greedy from an untrained model: determined by the prompt, and ends at the first newline
    assert all("\n" not in p for p in one["predictions"])
