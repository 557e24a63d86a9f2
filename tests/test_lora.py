"""LoRA and the 1-D mode: what would silently spoil a fine-tune. Run: python -m pytest -q tests/test_lora.py"""

import pytest
import torch
import torch.nn as nn

from homegpt.lora import (LoRALinear, apply_lora, count_params, freeze_base_dtype, load_trainable_state_dict,
                  merge_lora, train_only_1d, trainable_state_dict)
from model import GPT
from homegpt.optimizers import configure_optimizers


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def batch(cfg, seed=1, B=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    return x, y


def all_logits(model, x):
    # targets of -1 make forward return the logits of every position
    return model(x, torch.full_like(x, -1))[0]


def randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_zero_b_starts_equal_to_base(tiny_config):
    model = make_model(tiny_config)
    x, _ = batch(tiny_config)
    before = all_logits(model, x)
    names = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all")
    assert len(names) == 4 * tiny_config.n_layer
    assert torch.equal(all_logits(model, x), before)


@pytest.mark.parametrize("targets, suffixes", [("attn", {"attn.c_attn", "attn.c_proj"}),
                                               ("all", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"})])
def test_apply_targets_and_freezes_all_but_adapters(tiny_config, targets, suffixes):
    model = make_model(tiny_config)
    names = apply_lora(model, rank=2, alpha=4, dropout=0.0, targets=targets)
    assert {n.split(".", 3)[3] for n in names} == suffixes
    assert type(model.lm_head) is nn.Linear, "lm_head is tied to wte and must stay a plain Linear"
    assert model.lm_head.weight is model.transformer.wte.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{a}" for n in names for a in ("lora_A", "lora_B")}
    # the base keeps GPT-2's key names, so checkpoints and HF export stay key-by-key
    base_keys = set(make_model(tiny_config).state_dict())
    assert set(model.state_dict()) - trainable == base_keys
    C, r = tiny_config.n_embd, 2
    adapter = sum(r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    assert count_params(model) == (adapter, sum(p.numel() for p in make_model(tiny_config).parameters()) + adapter)
    assert adapter == tiny_config.n_layer * (r * (C + 3 * C) + r * 2 * C + (2 * r * (C + 4 * C) if targets == "all" else 0))


def test_bad_arguments_raise(tiny_config):
    with pytest.raises(ValueError, match="lora_targets"):
        apply_lora(make_model(tiny_config), rank=4, alpha=8, dropout=0.0, targets="mlp")
    for rank in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank"):
            apply_lora(make_model(tiny_config), rank=rank, alpha=8, dropout=0.0, targets="attn")
    model = make_model(tiny_config)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="attn")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="attn")


def test_optimizer_steps_change_only_adapters(tiny_config):
    model = make_model(tiny_config)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = configure_optimizers(model, weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    x, y = batch(tiny_config)
    for _ in range(3):  # step 1 moves B only (A's gradient is B^T... = 0); later steps move A too
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert not torch.equal(p, before[n]), f"adapter {n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"


def test_merge_gives_same_logits_and_plain_names(tiny_config):
    base = make_model(tiny_config)
    base_keys = list(base.state_dict())
    apply_lora(base, rank=4, alpha=8, dropout=0.1, targets="all")  # dropout must be off in eval
    randomize_adapters(base)
    base.eval()
    x, _ = batch(tiny_config)
    before = all_logits(base, x)
    assert before.sub(all_logits(make_model(tiny_config), x)).abs().max() > 1e-3, "adapters had no effect"
    merged = merge_lora(base)
    assert len(merged) == 4 * tiny_config.n_layer
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    assert list(base.state_dict()) == base_keys
    torch.testing.assert_close(all_logits(base, x), before, atol=1e-5, rtol=0)


def test_trainable_state_dict_round_trip_through_safetensors(tiny_config, tmp_path):
    from safetensors.torch import load_file, save_file
    model = make_model(tiny_config)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="attn")
    randomize_adapters(model)
    x, _ = batch(tiny_config)
    want = all_logits(model, x)
    sd = trainable_state_dict(model)
    assert set(sd) == {n for n in model.state_dict() if n.endswith(("lora_A", "lora_B"))}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "adapter.safetensors")

    fresh = make_model(tiny_config)  # the same base, adapters from scratch
    apply_lora(fresh, rank=4, alpha=8, dropout=0.0, targets="attn")
    assert not torch.equal(all_logits(fresh, x), want)
    load_trainable_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(all_logits(fresh, x), want)


def test_load_trainable_state_dict_is_strict(tiny_config):
    model = make_model(tiny_config)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="attn")
    sd = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    first = sorted(sd)[0]
    missing = dict(sd)
    del missing[first]
    with pytest.raises(ValueError, match=f"missing \\['{first}'\\]"):
        load_trainable_state_dict(model, missing)
    with pytest.raises(ValueError, match="unexpected \\['transformer.h.0.mlp.c_fc.lora_A'\\]"):
        load_trainable_state_dict(model, {**sd, "transformer.h.0.mlp.c_fc.lora_A": torch.zeros(4, 32)})
    other = make_model(tiny_config)
    apply_lora(other, rank=2, alpha=8, dropout=0.0, targets="attn")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_trainable_state_dict(other, sd)


def test_train_only_1d_trains_only_biases_and_gains(tiny_config):
    model = make_model(tiny_config)
    n = train_only_1d(model)
    one_d = {name: p.numel() for name, p in model.named_parameters() if p.dim() == 1}
    assert n == sum(one_d.values()) and count_params(model)[0] == n
    assert set(trainable_state_dict(model)) == set(one_d)
    assert any(k.endswith("ln_1.weight") for k in one_d) and any(k.endswith("c_attn.bias") for k in one_d)
    model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = configure_optimizers(model, weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    x, y = batch(tiny_config)
    model(x, y)[1].backward()
    opt.step()
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]) != (k in one_d), f"{k}: changed={not torch.equal(p, before[k])}"


def test_lora_linear_bf16_weight_with_fp32_activations():
    torch.manual_seed(0)
    ref = nn.Linear(32, 48)
    lin = LoRALinear.from_linear(ref, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(3, 5, 32, requires_grad=True)
    want = lin(x)
    lin.weight.data, lin.bias.data = lin.weight.data.bfloat16(), lin.bias.data.bfloat16()
    out = lin(x)  # no autocast: the base matmul runs in bfloat16, the adapter in float32
    assert out.dtype == torch.float32 and lin.lora_A.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=0.05, rtol=0.02)
    out.square().sum().backward()
    assert lin.lora_B.grad.dtype == torch.float32 and lin.lora_B.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lin(x)
    assert auto.dtype == torch.bfloat16
    torch.testing.assert_close(auto.float(), want, atol=0.1, rtol=0.05)


def test_bf16_base_lora_model_trains_on_cpu(tiny_config):
    model = make_model(tiny_config)
    x, y = batch(tiny_config)
    ref_loss = model(x, y)[1].item()
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all")
    freeze_base_dtype(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == (torch.float32 if n.endswith(("lora_A", "lora_B")) else torch.bfloat16) for n, d in dtypes.items())
    model.train()
    opt = configure_optimizers(model, weight_decay=0.0, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - ref_loss) < 0.05, (losses[0], ref_loss)  # bf16 storage, same model
    assert losses[-1] < losses[0], losses  # the adapters learn through a bf16 base
    merge_lora(model)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16


def test_freeze_base_dtype_keeps_trainable_fp32_and_tied_once(tiny_config):
    model = make_model(tiny_config)
    train_only_1d(model)
    freeze_base_dtype(model, "bfloat16")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="base_dtype"):
        freeze_base_dtype(model, "int8")
