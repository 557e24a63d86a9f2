"""The architecture options of GPTConfig that the CPU recipes use (QK-norm, rotary positions in GPT-2's
block, no biases, an untied head, bigram and trigram input embeddings, smear, the q/k/v
previous-position mix) and the
warmup-stable-decay schedule: each option is causal and generates the same with and without the KV
cache; a run with options resumes exactly and refuses a change of them; export refuses what
transformers cannot compute.

    python -m pytest -q tests/test_model_options.py
"""

from types import SimpleNamespace

import pytest
import torch

from homegpt import export, hf
import train
from homegpt.weights import load_model
from homegpt.runs import read_metrics
from homegpt.errors import UserError
from helpers import all_logits, char_dataset, tiny_train_config
from homegpt.generate import KVCache, generate
from model import GPT, GPTConfig, PreviousMix, earlier_tokens, ngram_ids

V = 50
OPTIONS = {
    "qk_norm": dict(qk_norm=True),
    "gelu": dict(activation="gelu"),
    "rotary": dict(rotary_dim=8),
    "no_bias": dict(bias=False),
    "untied": dict(tie_weights=False),
    "bigram": dict(bigram_embed=V * (V + 1)),
    "trigram": dict(trigram_embed=97),
    "smear": dict(smear=True),
    "qkv_shift": dict(qkv_shift=True),
    "all": dict(qk_norm=True, activation="gelu", rotary_dim=8, bias=False, tie_weights=False, bigram_embed=V * (V + 1), trigram_embed=97,
                smear=True, qkv_shift=True),
}
PREVIOUS = ("bigram_wte", "trigram_wte", "smear_mix", "qkv_mix")  # start at zero: perturbed to be tested


def make(seed=0, perturb=True, **options):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=V, **options)).eval()
    if not perturb:
        return model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(part in n for part in PREVIOUS):  # else they change nothing
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_keeps_shapes_and_causality(name):
    model = make(**OPTIONS[name])
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = all_logits(model, idx)
        changed = idx.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % V  # a different future
        later = all_logits(model, changed)
    assert logits.shape == (2, 12, V)
    assert torch.equal(logits[:, :8], later[:, :8])  # positions before 8 never see it
    assert not torch.allclose(logits[:, 8:], later[:, 8:])


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_generates_the_same_with_and_without_the_cache(name):
    model = make(**OPTIONS[name])
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = generate(model, idx, 12, top_k=1, use_cache=True)  # top_k=1: greedy
        uncached = generate(model, idx, 12, top_k=1, use_cache=False)
    assert torch.equal(cached, uncached)
    # and each decoded position's logits are the full forward's: a cache that forgot what came before
    # would still pick the same greedy tokens where an option changes the logits only a little
    full = all_logits(model, cached)
    cache = KVCache(2, 2, 2, 24, 8, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        model(cached[:, :5], kv_cache=cache)
        for t in range(5, cached.size(1)):
            step = model(cached[:, t:t + 1], kv_cache=cache)[0]
            assert torch.allclose(step[:, 0], full[:, t], atol=1e-5), t


def test_the_previous_position_options_start_as_the_model_without_them():
    rest = dict(qk_norm=True, rotary_dim=8, bias=False, tie_weights=False)
    previous = dict(bigram_embed=V * (V + 1), trigram_embed=97, smear=True, qkv_shift=True)
    plain = make(seed=3, perturb=False, **rest)
    options = make(seed=3, perturb=False, **rest, **previous)
    assert all(p.abs().max() == 0 for n, p in options.named_parameters() if any(part in n for part in PREVIOUS))
    shared = dict(plain.named_parameters())
    assert all(torch.equal(p, shared[n]) for n, p in options.named_parameters() if n in shared)  # same draws
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():  # zero tables and mixes: the same function
        assert torch.allclose(all_logits(options, idx), all_logits(plain, idx), atol=1e-6)


def test_ngram_rows_are_distinct_for_distinct_ngrams_and_hash_into_a_smaller_table():
    ids = earlier_tokens(torch.tensor([[0, 1, 2, 0, 1, 2, V - 1]]))  # (1, 2 + 7), -1 before the start
    assert ids[0, :2].tolist() == [-1, -1]
    bigram = ngram_ids(ids, 2, V, V * (V + 1))[0].tolist()
    assert bigram[1] == bigram[4] and bigram[2] == bigram[5]  # (0, 1) and (1, 2) again: the same rows
    assert bigram[0] != bigram[3]  # token 0 at the start is not token 0 after a 2
    every_pair = torch.tensor([[a, b] for a in range(V) for b in range(V)])
    rows = ngram_ids(earlier_tokens(every_pair), 2, V, V * (V + 1))[:, 1]
    assert rows.unique().numel() == V * V and rows.max() < V * (V + 1)  # exact: one row per pair
    exact = ngram_ids(ids, 3, V, V * (V + 1) ** 2)[0].tolist()  # tokens 2, 0, 1, 2 at 2 .. 5
    assert exact[5] == exact[2] and exact[4] != exact[1]  # (0, 1, 2) twice; (2, 0, 1) is not (start, 0, 1)
    assert len(set(exact)) == 6 and ngram_ids(ids, 3, V, 97).max() < 97  # 7 positions, 6 trigrams; hashed


def test_previous_mix_has_the_gradients_of_its_formula():
    x = torch.randn(2, 5, 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(PreviousMix.apply, (x, w))
    expected = x + w * torch.nn.functional.pad(x[:, :-1], (0, 0, 1, 0))
    assert torch.allclose(PreviousMix.apply(x, w), expected)


def test_options_off_build_gpt2_bit_for_bit():
    """The defaults draw the same weights as before the options existed: the same parameter names,
    and the same numbers as a model built with every new option spelled at its default."""
    a = make()
    b = make(qk_norm=False, rotary_dim=0, bigram_embed=0, trigram_embed=0, smear=False, qkv_shift=False)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert isinstance(a.transformer.ln_f, torch.nn.LayerNorm) and hf.architecture(a.config) == "gpt2"


def test_wsd_schedule_at_its_boundaries():
    cfg = SimpleNamespace(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100,
                          lr_schedule="wsd", cooldown_frac=0.2)
    lr = lambda it: train.get_lr(it, cfg)  # noqa: E731
    assert 0 < lr(0) < lr(9) < 1.0  # warmup, non-zero at step 0
    assert lr(10) == lr(50) == lr(80) == 1.0  # stable until the last 20 of 100
    assert lr(81) < 1.0 and abs(lr(90) - 0.55) < 1e-12  # linear: halfway down at 90
    assert lr(100) == lr(500) == 0.1
    cfg.lr_schedule = "cosine"
    assert lr(50) < 1.0  # cosine decays from the end of warmup


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("data"), 50_000)


def test_a_run_with_options_resumes_exactly_and_refuses_a_change_of_them(data, tmp_path):
    options = dict(qk_norm=True, activation="gelu", rotary_dim=8, bias=False, lr_schedule="wsd", n_embd=32, n_head=2, bigram_embed=200,
                   trigram_embed=101, smear=True, qkv_shift=True)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(tiny_train_config(data, straight, max_iters=10, eval_interval=5, **options))
    train.main(tiny_train_config(data, split, max_iters=5, eval_interval=5, **options))
    train.main(tiny_train_config(data, split, max_iters=10, eval_interval=5, init_from="resume", **options))
    rows = lambda out: [(m["iter"], m.get("train_loss")) for m in read_metrics(out) if "train_loss" in m]  # noqa: E731
    assert rows(straight) == rows(split)
    a, _ = load_model(straight)
    b, _ = load_model(split)
    assert a.config.qk_norm and a.config.activation == "gelu"
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.trigram_embed == 101 and a.config.qkv_shift and a.smear_mix.abs().max() > 0  # trained
    for field, value in (("qk_norm", False), ("rotary_dim", 0),
                         ("trigram_embed", 0), ("smear", False), ("qkv_shift", False)):
        with pytest.raises(UserError, match=field):
            train.main(tiny_train_config(data, split, max_iters=12, init_from="resume", **{**options, field: value}))


@pytest.mark.parametrize("name", ["qk_norm", "bigram", "trigram", "smear", "qkv_shift"])
def test_export_refuses_what_transformers_cannot_compute_naming_the_option(tmp_path, name):
    model = make(**OPTIONS[name])
    with pytest.raises(UserError, match=list(OPTIONS[name])[0]):
        export.export_hf(model, tmp_path / "hf", tokenizer=None)
    assert not (tmp_path / "hf").exists()


def test_bad_options_are_all_reported_before_any_work(tmp_path):
    # the config check reads the model's own option checks: every mistake in one error, nothing written
    out = tmp_path / "out"
    cfg = tiny_train_config(char_dataset(tmp_path / "data", 20_000), out, activation="swish", rotary_dim=7,
                            bigram_embed=-1, trigram_embed=-2)
    with pytest.raises(UserError) as e:
        train.main(cfg)
    for field in ("activation", "rotary_dim", "bigram_embed", "trigram_embed"):
        assert f"{field} must be" in str(e.value), str(e.value)
    assert not out.exists()


# every GPTConfig field, and a value other than the base's below (a new field needs one here too)
OTHER_VALUE = {"block_size": 32, "vocab_size": 70, "n_layer": 3, "n_head": 4, "n_embd": 64, "dropout": 0.1,
               "bias": False, "qkv_bias": False, "tie_weights": True, "activation": "gelu", "rotary_dim": 0,
               "rotary_base": 500.0, "parallel_residual": True, "attn_proj_bias": False, "lm_head_bias": True,
               "qk_norm": True, "bigram_embed": 8, "trigram_embed": 8, "smear": True, "qkv_shift": True}
TAG_BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, tie_weights=False, rotary_dim=4)


def test_each_field_is_tagged_with_what_it_changes():
    """The resume check refuses a change of the SHAPE and COMPUTE fields and the exports refuse EXTRA ones,
    reading the tags: a field that changes the weights' shapes must be tagged SHAPE, and one that changes
    what the same weights compute, COMPUTE (activation and dropout aside: a resume builds the checkpoint's
    activation, and dropout is off in evaluation)."""
    from dataclasses import fields
    from model import COMPUTE, SHAPE
    assert {f.name for f in fields(GPTConfig)} == set(OTHER_VALUE)
    torch.manual_seed(0)
    base = GPT(GPTConfig(**TAG_BASE)).eval()
    idx = torch.randint(0, 65, (1, 16))
    for name, value in OTHER_VALUE.items():
        torch.manual_seed(0)
        other = GPT(GPTConfig(**TAG_BASE | {name: value})).eval()
        shapes = {k: v.shape for k, v in base.state_dict().items()}
        if shapes != {k: v.shape for k, v in other.state_dict().items()}:
            assert name in GPTConfig.fields_tagged(SHAPE), f"{name} changes the weights' shapes: tag it SHAPE"
            continue
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            same = torch.equal(base(idx, torch.full_like(idx, -1))[0], other(idx, torch.full_like(idx, -1))[0])
        if not same and name not in ("activation", "dropout"):
            fixed = GPTConfig.fields_tagged(SHAPE) + GPTConfig.fields_tagged(COMPUTE)  # what a resume may not change
            assert name in fixed, f"{name} changes what the weights compute: tag it COMPUTE"
