"""The model's behaviours that would silently spoil training or sampling if they broke."""

import math

import pytest
import torch

from model import GPT, GPTConfig, sample_next


def tiny(**kw):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def test_gpt2_small_parameter_count():
    # GPT-2 small as OpenAI shipped it: tied head, biases everywhere
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024))
    assert model.get_num_params() == 124_439_808


def test_home_experiment_parameter_count():
    # untied head, no q/k/v bias, other biases kept
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, tie_weights=False, qkv_bias=False))
    assert model.get_num_params() == 163_009_536
    assert model.transformer.h[0].attn.c_attn.bias is None
    assert model.transformer.h[0].attn.c_proj.bias is not None


def test_initial_loss_is_close_to_uniform():
    model = tiny(vocab_size=512, n_embd=64)
    torch.manual_seed(1)
    idx = torch.randint(0, 512, (8, 16))
    targets = torch.randint(0, 512, (8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.1


def test_later_tokens_do_not_change_earlier_logits():
    model = tiny()
    idx = torch.randint(0, 65, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 65
    ignore = torch.full_like(idx, -1)
    a, _ = model(idx, ignore)
    b, _ = model(changed, ignore)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_ignored_targets_do_not_count():
    model = tiny()
    idx = torch.randint(0, 65, (2, 16))
    targets = torch.randint(0, 65, (2, 16))
    masked = targets.clone()
    masked[:, :8] = -1
    logits, loss = model(idx, masked)
    direct = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 65), targets[:, 8:].reshape(-1))
    assert torch.allclose(loss, direct, atol=1e-6)
    _, loss_sum = model(idx, masked, reduction="sum")
    assert torch.allclose(loss_sum, direct * 16, atol=1e-4)


@pytest.mark.parametrize("new_tokens", [10, 30])  # 30 outgrows block_size 16 from a 5-token prompt
def test_kv_cache_generation_equals_recompute(new_tokens):
    model = tiny()
    prompt = torch.randint(0, 65, (3, 5))
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    full = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    # sampling with the same generator seed draws the same tokens too
    a = model.generate(prompt, new_tokens, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, new_tokens, top_k=10, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)


def test_generate_restores_training_mode_and_ignores_dropout():
    model = tiny(dropout=0.5)
    model.train()
    prompt = torch.randint(0, 65, (1, 4))
    a = model.generate(prompt, 8, temperature=0)
    b = model.generate(prompt, 8, temperature=0)
    assert torch.equal(a, b)  # no dropout while generating
    assert model.training


def test_top_k_keeps_exactly_k_tokens_even_with_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        seen.add(sample_next(logits, top_k=2, generator=gen).item())
    assert len(seen) == 2  # a `< kth value` mask would have kept all four tied tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    seen = {sample_next(probs.log(), top_p=0.75, generator=gen).item() for _ in range(300)}
    assert seen == {0, 1}
    assert sample_next(probs.log(), temperature=0).item() == 0


def test_weight_decay_only_on_matrices():
    model = tiny()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    logits, _ = model(torch.randint(0, 65, (1, 8)))
    assert logits.shape == (1, 1, 65)
    with pytest.raises(AssertionError):
        model(torch.randint(0, 65, (1, 9)))


def test_flops_per_token_counts_matmuls_and_attention():
    model = tiny()
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # per layer: c_attn 32*96 + c_proj 32*32 + c_fc 32*128 + c_proj 128*32; plus lm_head 65*32
    assert n_linear == 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 65 * 32
    assert model.flops_per_token(16) == 6 * n_linear + 12 * 2 * 16 * 32


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny()
    idx = torch.randint(0, 65, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    _, loss = model(idx, idx)
    loss.backward()
    for a, p in zip(ref, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
