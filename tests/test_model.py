"""The model's behaviours that would silently spoil training or sampling if they broke."""

import copy
import math

import pytest
import torch

from model import fast_dropout
from homegpt.generate import sample_next, generate
from model import GPT, GPTConfig
from homegpt.optimizers import configure_optimizers, muon_matrices


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
    cached = generate(model, prompt, new_tokens, temperature=0, use_cache=True)
    full = generate(model, prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    # sampling with the same generator seed draws the same tokens too
    a = generate(model, prompt, new_tokens, top_k=10, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, new_tokens, top_k=10, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)


def test_generate_restores_training_mode_and_ignores_dropout():
    model = tiny(dropout=0.5)
    model.train()
    prompt = torch.randint(0, 65, (1, 4))
    a = generate(model, prompt, 8, temperature=0)
    b = generate(model, prompt, 8, temperature=0)
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
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny()
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    adamw, muon = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= in_adamw and not in_adamw & in_muon  # wte = lm_head
    assert len(in_adamw) + len(in_muon) == len(list(model.parameters()))
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, 20.0]  # muon_lr / learning_rate


def _step(model, opt, seed):
    torch.manual_seed(seed)
    idx = torch.randint(0, 65, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad()


def test_chained_optimizer_state_round_trip():
    # two steps, save, two more; against a copy that loads the saved state: the same weights bit for bit
    model = tiny()
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    for s in range(2):
        _step(model, opt, s)
    twin = tiny()
    twin.load_state_dict(model.state_dict())
    twin_opt = configure_optimizers(twin, 0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no tensors shared
    assert twin_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    for s in range(2, 4):
        _step(model, opt, s)
        _step(twin, twin_opt, s)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    plain = configure_optimizers(tiny(), 0.1, 1e-3, (0.9, 0.95), "cpu")
    with pytest.raises(ValueError, match="parameter groups"):
        twin_opt.load_state_dict(plain.state_dict())


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


def test_frozen_weights_cost_4_flops_per_token_and_adapters_6():
    """LoRA and 1-D fine-tunes compute no gradient for the frozen matrices: counting 6N for them
    would overstate MFU by half of the frozen part."""
    from homegpt import lora
    model = tiny()
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * 2 * 16 * 32
    lora.train_only_1d(model)
    assert model.flops_per_token(16) == 4 * n_linear + attention
    model = tiny()
    lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets="attn")
    adapters = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    assert adapters == 2 * (4 * (32 + 96) + 4 * (32 + 32))
    assert model.flops_per_token(16) == 4 * n_linear + 6 * adapters + attention


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


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_fast_dropout_drops_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = fast_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.002  # 1e6 draws: the standard error is below 0.0005
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.005
    # the same seed gives the same mask (exact resume), another seed another one
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, p), y)
    assert not torch.equal(fast_dropout(x, p), y)


def test_fast_dropout_edge_probabilities():
    x = torch.randn(4, 7, dtype=torch.bfloat16)  # an element count that is not a multiple of 4
    assert fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))
    assert fast_dropout(x, 0.3).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="between 0 and 1"):
        fast_dropout(x, 1.5)


def test_fast_dropout_attention_equals_sdpa_when_nothing_is_dropped():
    # p below 1/65536 rounds to "drop nothing", so the written-out CPU attention must give SDPA's
    # outputs and gradients: it is causal, scaled and softmaxed the same way
    fast, plain = tiny(dropout=1e-9), tiny(dropout=1e-9)
    plain.use_fast_dropout(False)
    idx = torch.randint(0, 65, (2, 16))
    grads = []
    for model in (fast, plain):
        model.train()
        logits, loss = model(idx, idx)
        loss.backward()
        grads.append((logits, [p.grad for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


def test_fast_dropout_attention_is_causal_and_dropout_is_off_in_eval():
    model = tiny(dropout=0.5)
    model.train()
    idx = torch.randint(0, 65, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 65
    ignore = torch.full_like(idx, -1)
    torch.manual_seed(3)
    a, _ = model(idx, ignore)
    torch.manual_seed(3)
    b, _ = model(changed, ignore)
    assert torch.equal(a[:, :10], b[:, :10])  # same masks, and the future cannot leak into the past
    model.eval()
    assert torch.equal(model(idx, ignore)[0], model(idx, ignore)[0])


def test_muon_orthogonalises_in_float32_where_bfloat16_is_emulated(monkeypatch):
    """torch.optim.Muon's Newton-Schulz runs in bfloat16, emulated (several times slower than float32)
    on CPUs without AVX512-BF16/AMX. optimizers.Muon runs it in float32 there, and torch's own path
    where bf16 is native; if torch ever renames what is swapped, the spy below stops being called."""
    import torch.optim._muon as impl

    from homegpt import optimizers
    from homegpt import runtime
    calls = []
    real = optimizers.newton_schulz_float32
    monkeypatch.setattr(optimizers, "newton_schulz_float32", lambda *a: calls.append(1) or real(*a))
    torch_ns = impl._zeropower_via_newtonschulz

    def step_once():
        """The update the first step makes to each of the blocks' matrices."""
        torch.manual_seed(0)
        model = tiny()
        before = [p.detach().clone() for p in muon_matrices(model)]
        opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
        x = torch.randint(0, 65, (2, 16))
        model(x, x)[1].backward()
        opt.step()
        return [p.detach() - b for p, b in zip(muon_matrices(model), before)]

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    emulated = step_once()
    assert len(calls) == len(emulated) and impl._zeropower_via_newtonschulz is torch_ns  # swapped back
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    calls.clear()
    native = step_once()
    assert not calls  # torch's bfloat16 path
    for a, b in zip(emulated, native):  # the same update, up to bfloat16's rounding inside torch's
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.99 and abs(a.norm() / b.norm() - 1) < 0.02, (cosine, a.norm(), b.norm())
    g = torch.randn(96, 32)
    o = real(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    s = torch.linalg.svdvals(o)
    assert o.dtype == torch.float32 and 0.5 < s.min() and s.max() < 1.5  # near-orthogonal, as torch's


@pytest.mark.parametrize("shape", [(576, 192), (192, 768), (96, 96), (8, 100)])
def test_muon_float32_newton_schulz_matches_the_direct_iteration_in_float64(shape):
    """The float32 orthogonalisation runs oblong matrices in the m x m "Gram" form (fewer flops); its
    result is the direct iteration's to float32's rounding, for a full-rank and a nearly rank-4 gradient."""
    from homegpt import optimizers
    a, b, c = coefficients = (3.4445, -4.7750, 2.0315)

    def direct_float64(g, steps):
        x = g.double().T if g.size(0) > g.size(1) else g.double()
        x = x / x.norm()
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x.T if g.size(0) > g.size(1) else x

    torch.manual_seed(0)
    m, n = shape
    for g in (torch.randn(shape), torch.randn(m, 4) @ torch.randn(4, n) + 1e-4 * torch.randn(shape)):
        for steps in (5, 3, 0):
            got = optimizers.newton_schulz_float32(g, coefficients, steps, 1e-7)
            want = direct_float64(g, steps)
            assert got.dtype == torch.float32 and got.shape == g.shape
            assert (got.double() - want).norm() / want.norm() < 3e-4, (shape, steps)


def test_generation_on_cuda_leaves_cudnn_attention_out_and_restores_the_flags(monkeypatch):
    """cuDNN attention builds a plan per new sequence length, and decoding meets a new one at every token:
    an H200 decoded GPT-2 124M at 20 tok/s through it, 282 through flash attention. Every generation
    step runs in generate.generation_attention (checked here on the CPU, where CUDA's flags can still be read)."""
    from homegpt import generate as model_lib
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with model_lib.generation_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before
    seen = []
    real = model_lib.generation_attention
    monkeypatch.setattr(model_lib, "generation_attention", lambda device: seen.append(device) or real(device))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, dropout=0.0))
    out = generate(model, torch.zeros((1, 1), dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 6) and seen == [torch.device("cpu")] * 5
