"""The newer architecture options of GPTConfig (RMSNorm, QK-norm, ReLU², zero-initialised projections,
logit soft-capping, rotary positions in GPT-2's block, no biases, an untied head) and the
warmup-stable-decay schedule: each option is causal and generates the same with and without the KV
cache; a run with options resumes exactly and refuses a change of them; export refuses what
transformers cannot compute.

    python -m pytest -q tests/test_model_options.py
"""

import math
from types import SimpleNamespace

import pytest
import torch

import hf
import train
from checkpoint import load_model, read_metrics
from configurator import UserError
from helpers import all_logits, char_dataset, tiny_train_config
from model import GPT, GPTConfig

V = 50
OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "zero_init_proj": dict(zero_init_proj=True),
    "softcap": dict(logit_softcap=15.0),
    "rotary": dict(rotary_dim=8),
    "no_bias": dict(bias=False),
    "untied": dict(tie_weights=False),
    "all": dict(norm="rmsnorm", qk_norm=True, activation="relu2", zero_init_proj=True, logit_softcap=15.0,
                rotary_dim=8, bias=False, tie_weights=False),
}


def make(seed=0, **options):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=V, **options)).eval()
    if options.get("zero_init_proj"):  # zero projections make every block the identity: perturb them to test
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("c_proj.weight"):
                    p.normal_(0.0, 0.02)
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
        cached = model.generate(idx, 12, top_k=1, use_cache=True)  # top_k=1: greedy
        uncached = model.generate(idx, 12, top_k=1, use_cache=False)
    assert torch.equal(cached, uncached)


def test_softcap_bounds_the_logits_and_zero_init_starts_at_the_uniform_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=V, logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # raw logits in the hundreds
        logits = all_logits(model, torch.zeros(1, 8, dtype=torch.long))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=V, zero_init_proj=True))
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if n.endswith("c_proj.weight"))
    idx, targets = torch.randint(0, V, (2, 4, 8))
    loss = model(idx, targets)[1].item()
    assert abs(loss - math.log(V)) < 0.1  # small logits at init: about ln(vocab)


def test_options_off_build_gpt2_bit_for_bit():
    """The defaults draw the same weights as before the options existed: the same parameter names,
    and the same numbers as a model built with every new option spelled at its default."""
    a = make()
    b = make(norm="layernorm", qk_norm=False, zero_init_proj=False, logit_softcap=0.0, rotary_dim=0)
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
    options = dict(norm="rmsnorm", qk_norm=True, activation="relu2", zero_init_proj=True, logit_softcap=15.0,
                   rotary_dim=8, bias=False, lr_schedule="wsd", n_embd=32, n_head=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(tiny_train_config(data, straight, max_iters=10, eval_interval=5, **options))
    train.main(tiny_train_config(data, split, max_iters=5, eval_interval=5, **options))
    train.main(tiny_train_config(data, split, max_iters=10, eval_interval=5, init_from="resume", **options))
    rows = lambda out: [(m["iter"], m.get("train_loss")) for m in read_metrics(out) if "train_loss" in m]  # noqa: E731
    assert rows(straight) == rows(split)
    a, _ = load_model(straight)
    b, _ = load_model(split)
    assert a.config.qk_norm and a.config.norm == "rmsnorm" and a.config.activation == "relu2"
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    for field, value in (("qk_norm", False), ("logit_softcap", 30.0), ("norm", "layernorm"), ("rotary_dim", 0)):
        with pytest.raises(UserError, match=field):
            train.main(tiny_train_config(data, split, max_iters=12, init_from="resume", **{**options, field: value}))


@pytest.mark.parametrize("name", ["rmsnorm", "qk_norm", "relu2", "softcap"])
def test_export_refuses_what_transformers_cannot_compute_naming_the_option(tmp_path, name):
    model = make(**OPTIONS[name])
    with pytest.raises(UserError, match=list(OPTIONS[name])[0]):
        hf.export_hf(model, tmp_path / "hf", tokenizer=None)
    assert not (tmp_path / "hf").exists()


def test_bad_options_are_all_reported_before_any_work(tmp_path):
    # the config check reads the model's own option checks: every mistake in one error, nothing written
    out = tmp_path / "out"
    cfg = tiny_train_config(char_dataset(tmp_path / "data", 20_000), out, activation="swish", norm="batch",
                            logit_softcap=-1.0, rotary_dim=7)
    with pytest.raises(UserError) as e:
        train.main(cfg)
    for field in ("activation", "norm", "logit_softcap", "rotary_dim"):
        assert f"{field} must be" in str(e.value), str(e.value)
    assert not out.exists()
