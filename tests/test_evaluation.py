"""Evaluation library: validation loss, multiple-choice / partial / LAMBADA scoring, Wilson intervals,
benchmark JSONL loading.

    python -m pytest -q tests/test_evaluation.py
"""

import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from homegpt import evaluation
from homegpt.dataloader import Tokenizer, TokenData, eval_batches, write_raw_tokens
from homegpt.evaluation import (Item, evaluate_loss, load_task, run_benchmark, run_lambada, score_choices,
                      score_pairs, score_partial, wilson_interval)
from model import GPT, GPTConfig
from homegpt.generate import generate

CPU = torch.device("cpu")
NOCTX = contextlib.nullcontext()
CHARS = sorted(set("abcdefgh xyz"))  # x, y, z never occur in the training text


@pytest.fixture(scope="module")
def trained():
    """A tiny char model trained on 'abcdefgh ' repeated: each next character is near-certain.
    60 AdamW steps take well under a second on CPU and bring the loss below 0.05."""
    tok = Tokenizer({"tokenizer": "char", "itos": CHARS})
    torch.manual_seed(0)
    data = torch.tensor(tok.encode("abcdefgh " * 200))
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=len(CHARS), dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds waiting on a busy machine
    try:
        for _ in range(60):
            ix = torch.randint(len(data) - 17, (16,), generator=g)
            x = torch.stack([data[i:i + 16] for i in ix])
            y = torch.stack([data[i + 1:i + 17] for i in ix])
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05, f"the fixture model did not learn the pattern: loss {loss.item():.3f}"
    model.eval()
    return model, tok


def direct_logprob(model, context, cont):
    """log p(cont | context) by hand: one sequence, full logits, a log-softmax, a loop over positions."""
    T = model.config.block_size
    seq = (list(context) + list(cont))[-(T + 1):]
    x = torch.tensor([seq[:-1]])
    with torch.no_grad():
        logits, _ = model(x, torch.full_like(x, -1))  # all-ignored targets: full logits, loss unused
    logp = F.log_softmax(logits[0].float(), dim=-1)
    start = len(seq) - 1 - len(cont)  # position whose output predicts cont[0]
    return sum(logp[start + i, t].item() for i, t in enumerate(cont))


# ----------------------------------------------------------------------------- evaluate_loss

def _val_dir(tmp_path, n_tokens, vocab_size=65, seed=0):
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=n_tokens)
    write_raw_tokens(tmp_path / "val.bin", tokens)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "tokenizer": "gpt2",
                                                    "train_tokens": 0, "val_tokens": n_tokens}))
    return tokens


def test_evaluate_loss_equals_direct_cross_entropy_with_ragged_last_batch(tmp_path, tiny_config):
    T = tiny_config.block_size
    tokens = _val_dir(tmp_path, 7 * T + 6)  # 7 windows; batch_size 3 -> batches of 3, 3, 1
    data = TokenData(tmp_path, "val")
    assert [len(x) for x, _ in eval_batches(data, 3, T)] == [3, 3, 1]
    tiny_config.dropout = 0.2  # would make the number random if evaluate_loss forgot model.eval()
    torch.manual_seed(0)
    model = GPT(tiny_config)

    model.train()
    r = evaluate_loss(model, eval_batches(data, 3, T), CPU, NOCTX)
    assert model.training, "evaluate_loss must restore train mode"
    model.eval()
    windows = np.stack([tokens[s:s + T + 1] for s in range(0, 7 * T, T)])
    x, y = torch.from_numpy(windows[:, :-1]).long(), torch.from_numpy(windows[:, 1:]).long()
    with torch.no_grad():
        logits, _ = model(x, y)
    direct = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert r["tokens"] == 7 * T
    assert r["loss"] == pytest.approx(direct, rel=1e-6)
    assert r["perplexity"] == pytest.approx(np.exp(direct), rel=1e-6)
    # a per-batch mean (batches weighted equally) would be visibly different on this ragged split
    per_batch = [F.cross_entropy(logits[i:i + 3].reshape(-1, logits.size(-1)), y[i:i + 3].reshape(-1)).item()
                 for i in (0, 3, 6)]
    assert abs(np.mean(per_batch) - direct) > 1e-4

    again = evaluate_loss(model, eval_batches(data, 3, T), CPU, NOCTX)
    assert again == r, "two evaluations of the same weights must agree exactly"
    assert not model.training, "evaluate_loss must leave an eval-mode model in eval mode"


def test_evaluate_loss_weights_by_counted_targets(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 65, (4, 16), generator=g)
    y = torch.randint(0, 65, (4, 16), generator=g)
    y[0, :10] = -1  # masked prompt tokens (SFT): batches hold different numbers of targets
    y[2:, :3] = -1
    r = evaluate_loss(model, [(x[:1], y[:1]), (x[1:], y[1:])], CPU, NOCTX)
    with torch.no_grad():
        logits, loss = model(x, y)
    assert r["tokens"] == int((y != -1).sum()) == 4 * 16 - 10 - 6
    assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_evaluate_loss_rejects_empty_split(tiny_config):
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_loss(GPT(tiny_config), [], CPU, NOCTX)


# ----------------------------------------------------------------------------- scoring

def test_score_choices_picks_the_pattern_and_matches_direct_logprob(trained):
    model, tok = trained
    E = tok.encode
    context, endings = E("abcd"), [E("gfe"), E("efg"), E("xyz")]
    r = score_choices(model, context, endings, CPU, NOCTX)
    assert r["pred"] == 1 and r["pred_norm"] == 1
    for i, e in enumerate(endings):
        direct = direct_logprob(model, context, e)
        assert r["sum_logprob"][i] == pytest.approx(direct, abs=1e-4)
        assert r["mean_logprob"][i] == pytest.approx(direct / len(e), abs=1e-4)
    assert r["sum_logprob"][1] > -0.5  # the continuation of the pattern is near-certain


def test_length_normalisation_changes_the_pick(trained):
    """One wrong character in a 1-token ending vs two wrong in a 12-token ending: the total favours
    the short ending, the per-token mean the long one. Both scores must be reported as such."""
    model, tok = trained
    E = tok.encode
    r = score_choices(model, E("abcd"), [E("x"), E("efghabcdxfgx")], CPU, NOCTX)
    assert r["pred"] == 0
    assert r["pred_norm"] == 1
    assert r["mean_logprob"][1] == pytest.approx(r["sum_logprob"][1] / 12, rel=1e-6)


def test_long_context_is_cropped_from_the_left(trained):
    model, tok = trained
    context = tok.encode("abcdefgh " * 4)  # 36 tokens, block_size 16
    ending = tok.encode("abc")
    r = score_choices(model, context, [ending, tok.encode("xbc")], CPU, NOCTX)
    assert r["sum_logprob"][0] == pytest.approx(direct_logprob(model, context[-14:], ending), abs=1e-4)
    assert r["pred"] == 0
    with pytest.raises(ValueError, match="block_size 16"):
        score_choices(model, context, [tok.encode("abcdefgh abcdefgh")], CPU, NOCTX)


def test_partial_scoring_scores_only_the_shared_suffix(trained):
    """Winogrande: 'abc_efgh' with options 'd' / 'x'; the option is context, 'efgh' is scored."""
    model, tok = trained
    E = tok.encode
    contexts, suffix = [E("h abcx"), E("h abcd")], E("efgh")
    r = score_partial(model, contexts, suffix, CPU, NOCTX)
    assert r["pred"] == 1 and r["pred_norm"] == 1
    for i, c in enumerate(contexts):
        assert r["sum_logprob"][i] == pytest.approx(direct_logprob(model, c, suffix), abs=1e-4)
        assert r["mean_logprob"][i] == pytest.approx(r["sum_logprob"][i] / 4, rel=1e-6)
    # including the option token itself would add its (very unlikely, for 'x') log-probability
    with_option = direct_logprob(model, E("h abc"), E("xefgh"))
    assert with_option < r["sum_logprob"][0] - 1.0


def test_run_benchmark_on_items_of_both_shapes(trained):
    model, tok = trained
    items = [Item("abcd", ["gfe", "efg"], 1),               # right
             Item("efgh", [" abc", " xbc"], 0),              # right
             Item(["h abcx", "h abcd"], ["efgh"], 1),        # partial, right
             Item("abcd", ["efg", "zzz"], 1)]                # labelled wrong on purpose
    r = run_benchmark(model, tok, items, CPU, NOCTX, progress=False)
    assert (r["correct"], r["correct_norm"], r["n"]) == (3, 3, 4)
    assert r["acc"] == r["acc_norm"] == 0.75
    assert r["acc_ci95"] == pytest.approx(wilson_interval(3, 4))


def test_lambada_needs_every_token_of_the_last_word(trained):
    model, tok = trained
    items = [Item("abcdefgh abcdefgh", [" abcdefgh"], 0),    # the pattern: right
             Item("abcdefgh abcdefgh", [" abcdhgfe"], 0),    # wrong from the 5th character
             Item("abcdefgh abcdefgh", [" abcdefgx"], 0)]    # only the last character wrong
    r = run_lambada(model, tok, items, CPU, NOCTX, batch_size=2, progress=False)
    assert (r["correct"], r["n"], r["tokens"]) == (1, 3, 27)
    # accuracy by greedy decoding, the definition the teacher-forced argmax stands in for
    x = torch.tensor([tok.encode("abcdefgh abcdefgh")])
    out = tok.decode(generate(model, x, 9, temperature=0)[0, x.size(1):].tolist())
    assert out == " abcdefgh"
    logprob = sum(direct_logprob(model, tok.encode(it.context), tok.encode(it.endings[0])) for it in items)
    assert r["perplexity"] == pytest.approx(np.exp(-logprob / 27), rel=1e-4)
    assert r["word_perplexity"] == pytest.approx(np.exp(-logprob / 3), rel=1e-4)


def test_score_pairs_restores_train_mode(trained):
    model, tok = trained
    model.train()
    try:
        score_pairs(model, [(tok.encode("ab"), tok.encode("c"))], CPU, NOCTX)
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- intervals and loading

def test_wilson_interval_known_values():
    # 5/10 and 0/10 at 95% (z = 1.96), as tabulated for the Wilson score interval
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    lo, hi = wilson_interval(2955, 10042)
    assert lo < 2955 / 10042 < hi and hi - lo == pytest.approx(0.0178, abs=2e-4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_task_local_jsonl_for_each_schema(tmp_path):
    hs = _jsonl(tmp_path / "hs.jsonl", [{"ctx": "A man is sitting on a roof. he", "label": "3",
                                         "endings": ["is using wrap.", "is ripping.", "is holding.", "starts."]}])
    assert load_task("hellaswag", hs) == [Item("A man is sitting on a roof. he",
                                               [" is using wrap.", " is ripping.", " is holding.", " starts."], 3)]
    pq = _jsonl(tmp_path / "piqa.jsonl", [{"goal": "Open a jar", "sol1": "twist", "sol2": "hit", "label": 0}])
    assert load_task("piqa", pq) == [Item("Question: Open a jar\nAnswer:", [" twist", " hit"], 0)]
    wg = _jsonl(tmp_path / "wg.jsonl", [{"sentence": "Sarah was a better surgeon than Maria so _ always got "
                                                     "the harder cases.", "option1": "Sarah", "option2": "Maria",
                                         "answer": "2"}])
    assert load_task("winogrande", wg) == [Item(["Sarah was a better surgeon than Maria so Sarah",
                                                 "Sarah was a better surgeon than Maria so Maria"],
                                                [" always got the harder cases."], 1)]
    lb = _jsonl(tmp_path / "lb.jsonl", [{"text": "he reached for the door"}, {"text": "and it was blue"}])
    assert load_task("lambada", lb) == [Item("he reached for the", [" door"], 0),
                                        Item("and it was", [" blue"], 0)]
    assert len(load_task("lambada", lb, limit=1)) == 1


def test_load_task_errors_name_the_file_and_field(tmp_path):
    bad = _jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
                                           {"goal": "g", "sol1": "a", "label": 1}])
    with pytest.raises(ValueError, match=r"piqa.jsonl:2: missing field\(s\) sol2"):
        load_task("piqa", bad)
    wrong_label = _jsonl(tmp_path / "hs.jsonl", [{"ctx": "c", "endings": ["a", "b"], "label": 2}])
    with pytest.raises(ValueError, match="line 1.*label 2"):
        load_task("hellaswag", wrong_label)
    with pytest.raises(ValueError, match="data_file not found"):
        load_task("piqa", str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_task("mmlu")


@pytest.fixture
def hub(monkeypatch):
    """Sets what hub.hub_unreachable_reason answers (None = reachable): no test asks the network."""
    from homegpt import hub as hub_lib
    state = {"reason": None}
    monkeypatch.setattr(hub_lib, "hub_unreachable_reason", lambda: state["reason"])
    return state


def test_hub_failure_suggests_a_local_file(monkeypatch, hub):
    datasets = pytest.importorskip("datasets")

    def failed(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (ReadTimeout)")
    monkeypatch.setattr(datasets, "load_dataset", failed)
    with pytest.raises(ValueError, match=r"(?s)Rowan/hellaswag.*ReadTimeout.*--data_file=path.jsonl"):
        load_task("hellaswag")


def test_unreachable_hub_reads_only_the_datasets_cache(monkeypatch, hub):
    # offline, load_dataset must run in datasets' offline mode (cache only), never as the retrying
    # download; a warm cache keeps working, a cold one ends in the clear message
    datasets = pytest.importorskip("datasets")
    hub["reason"] = "HF_HUB_OFFLINE=1 is set"
    before = datasets.config.HF_HUB_OFFLINE
    modes, cached = [], {"hit": True}
    rows = [{"ctx": "a b", "endings": ["c", "d"], "label": "1"}] * 3

    def load_dataset(name, config, split):
        modes.append(datasets.config.HF_HUB_OFFLINE)
        if cached["hit"]:
            return rows
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_task("hellaswag", limit=2) == [Item("a b", [" c", " d"], 1)] * 2
    cached["hit"] = False
    with pytest.raises(ValueError) as e:
        load_task("hellaswag")
    assert modes == [True, True]
    assert datasets.config.HF_HUB_OFFLINE == before  # put back for whatever runs next in the process
    msg = str(e.value)
    assert "unreachable (HF_HUB_OFFLINE=1 is set)" in msg and "not in the local datasets cache" in msg
    assert "--data_file=path.jsonl" in msg and "ctx, endings, label" in msg


def test_hub_rows_are_converted(monkeypatch, hub):
    datasets = pytest.importorskip("datasets")
    rows = [{"sentence": "The cup fell off _ table.", "option1": "the", "option2": "a", "answer": "1"}] * 5
    seen, online = {}, datasets.config.HF_HUB_OFFLINE

    def fake(name, config, split):
        seen.update(name=name, config=config, split=split, offline=datasets.config.HF_HUB_OFFLINE)
        return rows
    monkeypatch.setattr(datasets, "load_dataset", fake)
    items = load_task("winogrande", limit=2)
    # reachable: datasets' own mode is left as the environment set it
    assert seen == {"name": "allenai/winogrande", "config": "winogrande_xl", "split": "validation",
                    "offline": online}
    assert items == [Item(["The cup fell off the", "The cup fell off a"], [" table."], 0)] * 2
    assert evaluation.BENCHMARKS["lambada"][0] == "EleutherAI/lambada_openai"
