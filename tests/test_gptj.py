"""GPT-J in model.py (rotary positions, parallel block, GPT-J's biases): transformers' GPTJForCausalLM
logits on import and export, rotary KV-cache generation, and GPT-2 left exactly as it was.

    python -m pytest -q tests/test_gptj.py
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPTJConfig, GPTJForCausalLM  # noqa: E402

from homegpt import export, hf  # noqa: E402
from homegpt.errors import UserError  # noqa: E402
from helpers import all_logits  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from homegpt.generate import generate

VOCAB = 101


@torch.no_grad()
def make_hf_gptj(seed=0, rotary_dim=4):
    """A random small GPT-J with non-trivial biases and LayerNorm gains (the init's zeros and ones
    would hide a dropped or misplaced one)."""
    torch.manual_seed(seed)
    cfg = GPTJConfig(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, rotary_dim=rotary_dim,
                     bos_token_id=None, eos_token_id=None)
    model = GPTJForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("rotary_dim", [4, 8])  # part of each 8-wide head, and all of it
def test_import_gives_transformers_gptj_logits(tmp_path, rotary_dim):
    theirs = make_hf_gptj(rotary_dim=rotary_dim)
    theirs.save_pretrained(tmp_path / "gptj")
    ours = hf.from_pretrained(str(tmp_path / "gptj")).eval()
    c = ours.config
    assert (c.rotary_dim, c.parallel_residual, c.qkv_bias, c.attn_proj_bias, c.lm_head_bias, c.tie_weights) == \
        (rotary_dim, True, False, False, True, False)
    assert "wpe" not in ours.transformer and not hasattr(ours.transformer.h[0], "ln_2")
    assert ours.get_num_params() == sum(p.numel() for p in theirs.parameters())
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (all_logits(ours, idx) - theirs(idx).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_export_round_trip_loads_in_transformers_with_the_same_logits(tmp_path):
    make_hf_gptj().save_pretrained(tmp_path / "gptj")
    ours = hf.from_pretrained(str(tmp_path / "gptj")).eval()
    export.export_hf(ours, tmp_path / "out", tokenizer=None)
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again).__name__ == "GPTJForCausalLM"
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (all_logits(ours, idx) - again(idx).logits).abs().max().item() < 1e-5


def test_rotary_generation_with_the_cache_equals_without():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=VOCAB, rotary_dim=4,
                          parallel_residual=True, qkv_bias=False, attn_proj_bias=False, tie_weights=False,
                          lm_head_bias=True)).eval()
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = generate(model, idx, 20, temperature=0.0, use_cache=True)
    full = generate(model, idx, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)


def test_rotary_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=VOCAB, rotary_dim=8,
                          parallel_residual=True)).eval()
    a = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % VOCAB  # change the future only
    la, lb = all_logits(model, a), all_logits(model, b)
    assert torch.allclose(la[:, :10], lb[:, :10], atol=1e-6) and not torch.allclose(la[:, 10:], lb[:, 10:])


def test_gpt2_defaults_are_unchanged():
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB))
    assert "wpe" in m.transformer and hasattr(m.transformer.h[0], "ln_2") and m.lm_head.bias is None
    assert m.transformer.h[0].attn.c_proj.bias is not None
    assert hf.architecture(m.config) == "gpt2"
    # GPT-2's module order: the init draws module by module, so a seed must give the weights it gave
    # before the GPT-J options (a reordered wpe changed every seeded run, and a seed-sensitive test)
    assert [n for n, _ in m.named_parameters()][:3] == ["transformer.wte.weight", "transformer.wpe.weight",
                                                        "transformer.h.0.ln_1.weight"]


def test_a_combination_transformers_cannot_load_is_refused_naming_the_fields(tmp_path):
    rotary_only = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=VOCAB, rotary_dim=4))
    with pytest.raises(UserError, match="rotary_dim=4, parallel_residual=False"):
        export.export_hf(rotary_only, tmp_path / "x", tokenizer=None)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="rotary_dim must be"):
        GPTConfig(n_head=2, n_embd=16, rotary_dim=3)


def test_a_checkpoint_from_before_these_fields_still_loads_into_gpt2():
    from homegpt.weights import check_model_args
    old = {"block_size": 16, "vocab_size": VOCAB, "n_layer": 2, "n_head": 2, "n_embd": 32, "bias": True,
           "qkv_bias": True, "tie_weights": True, "dropout": 0.0, "activation": "gelu_tanh"}
    now = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB)
    check_model_args(old, vars(now))  # no error: the new fields take GPT-2's defaults
    with pytest.raises(UserError, match="rotary_dim"):
        check_model_args(old, vars(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB,
                                             rotary_dim=4, parallel_residual=True)))


@pytest.mark.slow
def test_lora_fine_tune_of_a_gptj_directory_exports_a_gptj_that_matches(tmp_path):
    """train.py on a (tiny) GPT-J directory with LoRA, as the GPT-J recipes do, then export_hf.py: the
    exported GPTJForCausalLM computes what our merged model does."""
    import json

    import export_hf
    import train
    from homegpt.weights import load_model
    from helpers import tiny_train_config
    torch.manual_seed(0)
    base = GPTJForCausalLM(GPTJConfig(vocab_size=50400, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      rotary_dim=4, bos_token_id=50256, eos_token_id=50256))
    base.save_pretrained(tmp_path / "gptj")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {w}\nA:", "completion": f" {w.upper()}"}) + "\n"
                            for w in ["red", "blue", "green", "gold"] * 4))
    out = tmp_path / "run"
    result = train.main(tiny_train_config(tmp_path, out, init_from=str(tmp_path / "gptj"), sft_train_file=str(data),
                                          sft_val_file=str(data), lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                                          block_size=32, max_iters=30, eval_interval=30, learning_rate=3e-2,
                                          min_lr=3e-3, lr_decay_iters=30, warmup_iters=2, eval_iters=0))
    val = [m["val_loss"] for m in __import__("helpers").read_metrics(out) if "val_loss" in m]
    assert val[-1] < val[0] - 0.3, val  # the adapters alone (base frozen, random) lower the loss
    export_hf.main(export_hf.ExportConfig(out_dir=str(out), hf_dir=str(tmp_path / "hf")))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours, _ = load_model(out)
    assert type(theirs).__name__ == "GPTJForCausalLM" and result["iter_num"] == 30
    idx = torch.randint(0, 50400, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (all_logits(ours, idx) - theirs(idx).logits).abs().max().item() < 1e-5
