"""memory.py: the training-memory estimate against what PyTorch really allocates and saves, on the CPU.

    python -m pytest -q tests/test_memory.py
"""

import pytest
import torch

from homegpt import memory
from model import GPT, GPTConfig
from homegpt.optimizers import configure_optimizers

B, T = 4, 64  # a micro-batch large enough that activations dominate the small per-row terms


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=64, block_size=T, vocab_size=100, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).train()


def _unique_param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weights_grads_and_optimizer_states_are_the_exact_bytes_allocated(optimizer):
    model = _model()
    est = memory.estimate_training_memory(model, B, T, optimizer=optimizer)
    p_bytes = _unique_param_bytes(model)
    if optimizer == "adamw":
        assert est["weights"] + est["gradients"] + est["optimizer"] == 4 * p_bytes  # 1 + 1 + 2 copies
    # and what torch really holds after one step
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02 if optimizer == "muon" else 0.0)
    x = torch.randint(0, 100, (B, T))
    model(x, x)[1].backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert est["gradients"] == grads and est["optimizer"] == states


def test_tied_head_is_counted_once_and_frozen_parameters_cost_no_gradients():
    tied, untied = _model(), _model(tie_weights=False)
    head = 100 * 64 * 4
    assert (memory.estimate_training_memory(untied, B, T)["weights"]
            - memory.estimate_training_memory(tied, B, T)["weights"]) == head
    for p in tied.parameters():
        p.requires_grad = p.dim() == 1  # a 1-D fine-tune: biases and LayerNorm gains only
    n_1d = sum(p.numel() for p in tied.parameters() if p.dim() == 1)
    est = memory.estimate_training_memory(tied, B, T)
    assert est["weights"] == _unique_param_bytes(tied)
    assert est["gradients"] == 4 * n_1d and est["optimizer"] == 8 * n_1d
    assert memory.estimate_training_memory(tied, B, T, trainable_params=1000)["gradients"] == 4000
    # 8-bit AdamW: one byte per state for large tensors (+ a fp32 scale per 256), fp32 for small ones
    big = _model(n_embd=128)
    est8 = memory.estimate_training_memory(big, B, T, optimizer="adamw8bit")
    est32 = memory.estimate_training_memory(big, B, T)
    assert 0.25 < est8["optimizer"] / est32["optimizer"] < 0.3


def _saved_for_backward(model, x, autocast_dtype=None):
    """Bytes of the tensors autograd keeps for backward, measured with saved_tensors_hooks: each
    storage once, parameters excluded (they are the weights, counted separately)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(x, x)
    return sum(storages.values())


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
def test_activation_formula_matches_what_autograd_saves(autocast_dtype, checkpointing):
    model = _model()
    model.activation_checkpointing = checkpointing
    c = 2 if autocast_dtype else 4
    est = memory.estimate_training_memory(model, B, T, compute_dtype_bytes=c,
                                          activation_checkpointing=checkpointing)
    measured = _saved_for_backward(model, torch.randint(0, 100, (B, T)), autocast_dtype)
    predicted = est["activations"] + est["weight_copies"] + B * T * 100 * 4  # + cross-entropy's fp32 log-probs
    if checkpointing:
        # the estimate includes one block recomputed in backward, which the forward has not saved yet
        predicted -= memory.block_activation_bytes(T, B, 64, 2, 256, c, 4)
        predicted -= est["settings"]["copied_block_weights"] // 2 * c
    # autocast keeps a bf16 copy of each matmul weight; fp32 computes on the weights themselves
    assert (est["weight_copies"] > 0) == (c == 2)
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)  # measured: within 0.15%


def test_block_formula_is_the_papers_at_16_bit_without_fused_attention():
    # Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer for 16-bit activations with
    # dropout and the full attention matrix; ours adds only the LayerNorm statistics (4 fp32 per row)
    s, b, h, a = 1024, 2, 1600, 25
    ours = memory.block_activation_bytes(s, b, h, a, 4 * h, c=2, r=2, dropout=0.1, flash_attention=False)
    assert ours == s * b * h * 34 + 5 * a * s * s * b + 16 * s * b
    fused = memory.block_activation_bytes(s, b, h, a, 4 * h, c=2, r=2, dropout=0.1)
    assert fused < ours / 3  # why fused attention matters at long context


def test_config_input_needs_no_memory_and_gives_gpt2_xl_numbers():
    xl = GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024)
    est = memory.estimate_training_memory(xl, 1, 1024, compute_dtype_bytes=2)
    assert est["settings"]["n_params"] == 1_557_611_200  # OpenAI's gpt2-xl, tied head
    assert est["weights"] == 4 * 1_557_611_200 and est["optimizer"] == 2 * est["weights"]
    assert est["logits"] == 1024 * 50257 * 12  # the backward peak of the fp32 cross-entropy (an H200 measured 12.0)
    small = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=T, vocab_size=100)
    assert (memory.estimate_training_memory(small, B, T)["total"]
            == memory.estimate_training_memory(_model(), B, T)["total"])


def test_report_says_fits_or_prices_the_knobs_that_help():
    xl = GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024)
    est = memory.estimate_training_memory(xl, 4, 1024, compute_dtype_bytes=2)
    ok = memory.memory_report(est, 10 * est["total"])
    assert "fits" in ok and "NOT" not in ok and "lora_rank" not in ok
    bad = memory.memory_report(est, 24 * memory.GB)
    assert "does NOT fit" in bad
    for knob in ("lora_rank=8", "adamw8bit", "activation_checkpointing=True", "block_size=512", "batch_size=2"):
        assert knob in bad, knob
    assert all(total < est["total"] for _, total in memory.advice(est))
    assert "available: unknown" in memory.memory_report(est, None)
    with pytest.raises(ValueError, match="optimizer"):
        memory.estimate_training_memory(xl, 1, 1024, optimizer="sgd")


def test_fsdp_divides_the_states_by_the_ranks_and_adds_what_it_gathers():
    xl = GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024)
    one = memory.estimate_training_memory(xl, 1, 1024, compute_dtype_bytes=2)
    ddp = memory.estimate_training_memory(xl, 1, 1024, compute_dtype_bytes=2, world_size=4)
    fsdp = memory.estimate_training_memory(xl, 1, 1024, compute_dtype_bytes=2, world_size=4, fsdp=True)
    assert ddp["total"] == one["total"]  # a full replica per GPU; its buckets are the gradients themselves
    block = 4 * (12 * 1600 * 1600 + 13 * 1600)  # one block's fp32 weights: 4 matmuls, their biases, 2 LayerNorms
    root = 4 * (50257 * 1600 + 1024 * 1600 + 2 * 1600)  # wte (= lm_head), wpe, ln_f
    assert block * 48 + root == one["weights"]
    assert fsdp["weights"] == one["weights"] // 4 and fsdp["optimizer"] == one["optimizer"] // 4
    assert fsdp["fsdp_gathered"] == root + 3 * block
    assert fsdp["activations"] == one["activations"]  # activations are per rank's own micro-batch
    assert one["total"] - fsdp["total"] > 15 * memory.GB
    report = memory.memory_report(fsdp, 24 * memory.GB)
    assert "per GPU of 4 (FSDP)" in report and "FSDP gathered" in report and "/4 (FSDP)" in report
    assert "DDP: a full replica each" in memory.memory_report(ddp, 80 * memory.GB)


def test_device_memory_on_cpu():
    n = memory.device_memory("cpu")
    assert n is None or 0 < n < 2 ** 50
    if not torch.cuda.is_available():
        assert memory.device_memory("cuda") is None
