"""
GPT-J-6B with an int8 base, LoRA on attention and 8-bit AdamW: does one training step fit 11 GB?
Measured for real on this machine's CPU, beside memory.py's estimate.

    python benchmarks/gptj_memory.py                     # full size: ~6.5 GB of int8 weights, a few minutes
    python benchmarks/gptj_memory.py --estimate_only     # memory.py's estimate alone, nothing allocated
    python benchmarks/gptj_memory.py --n_layer=2         # a quick check of the script

The model has GPT-J-6B's shape (28 layers, 16 heads, 4,096 wide, rotary 64, vocabulary 50,400) and
random weights (std 0.02), made without ever holding a float32 copy of it (24 GB): it is built on the
meta device and each weight is drawn, then placed by the loader's own hf.place_weight, which
quantises a block matmul as it arrives, exactly as loading EleutherAI/gpt-j-6b does. Then LoRA
(rank 8, attention), bitsandbytes' 8-bit AdamW, activation checkpointing, and one train.train_step
(forward, backward, optimizer step) at batch 1 x 256 tokens, in float32 as a CPU computes.

Reported: the peak resident memory (VmHWM) of the process while loading and over the step, which
includes the Python process itself (printed as the baseline), and the time of each; memory.py's
estimate for the same step on this CPU (float32 compute) and for an 11 GB GPU (fp16 autocast, as a
GTX 1080 Ti, which has no bf16), with its verdict. The target: the measured peak under 11 GB.
Measured figures: docs/gptj.md.
"""

import time
from dataclasses import dataclass

import common  # noqa: F401  (puts the checkout on sys.path)
import torch

from configurator import run
from homegpt import lora, memory
from model import GPT, GPTConfig
from homegpt.hf import place_weight
from homegpt.hardware import proc_status_bytes, reset_peak_rss
from homegpt.runtime import Dist, make_scaler
from train import train_step
from homegpt.optimizers import configure_optimizers

GIB = 2 ** 30


@dataclass
class GPTJMemoryConfig:
    n_layer: int = 28  # GPT-J-6B: 28 blocks
    n_head: int = 16
    n_embd: int = 4096
    rotary_dim: int = 64
    vocab_size: int = 50400  # GPT-2's BPE padded to 50,400
    base_quant: str = "int8"  # 'int8' or 'nf4'
    lora_rank: int = 8
    lora_targets: str = "attn"
    train_1d_only: bool = False  # instead of LoRA: the biases and LayerNorm gains (finetune_gptj_1d.py)
    batch_size: int = 1
    block_size: int = 256
    budget_gb: float = 11.0  # the card's memory (GiB): a GTX 1080 Ti's 11
    estimate_only: bool = False  # print memory.py's estimate and stop: no weights are made
    seed: int = 0


def gptj_config(cfg):
    return GPTConfig(block_size=2048, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, bias=True, qkv_bias=False, attn_proj_bias=False, tie_weights=False,
                     lm_head_bias=True, rotary_dim=cfg.rotary_dim, parallel_residual=True)


def estimate(model, cfg, compute_bytes, base_quant=""):
    return memory.estimate_training_memory(model, cfg.batch_size, cfg.block_size, compute_dtype_bytes=compute_bytes,
                                           optimizer="adamw8bit", activation_checkpointing=True,
                                           base_quant=base_quant)


def random_quantized_model(cfg):
    """The GPT-J-shaped model, each weight drawn at random and placed (quantised) one at a time."""
    with torch.device("meta"):
        model = GPT(gptj_config(cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    for key, p in list(model.named_parameters()):
        if key.endswith(("ln_1.weight", "ln_f.weight")):
            t = torch.ones(p.shape)
        elif p.dim() == 1:
            t = torch.zeros(p.shape)
        else:
            t = torch.randn(p.shape, generator=g).mul_(0.02)
        place_weight(model, key, t, cfg.base_quant)
        del t
    return model


def finetune(model, cfg):
    if cfg.train_1d_only:
        lora.train_only_1d(model)
    else:
        lora.apply_lora(model, cfg.lora_rank, 16.0, 0.0, cfg.lora_targets)


def main(cfg):
    for line in common.machine_lines():
        print(line)
    budget = int(cfg.budget_gb * GIB)
    with torch.device("meta"):  # the same run's shapes, for the estimates: nothing is allocated
        shape = GPT(gptj_config(cfg))
    finetune(shape, cfg)
    gpu = estimate(shape, cfg, 2, cfg.base_quant)
    way = "1-D parameters" if cfg.train_1d_only else f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}"
    print(f"\nGPT-J ({cfg.n_layer} layers, {cfg.n_embd} wide), base {cfg.base_quant}, {way}, adamw8bit, "
          f"activation checkpointing, batch {cfg.batch_size} x {cfg.block_size}")
    print("on an 11 GB GPU (fp16 autocast):")
    print(memory.memory_report(gpu, budget))
    if cfg.estimate_only:
        return {"estimate_gpu_bytes": gpu["total"]}

    baseline = proc_status_bytes("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    model = random_quantized_model(cfg)
    load_s = time.perf_counter() - t0
    load_peak = proc_status_bytes("VmHWM")
    finetune(model, cfg)
    model.activation_checkpointing = True
    trained, total = lora.count_params(model)
    cpu = estimate(model, cfg, 4)  # the model as it is (quantised): float32 compute on this CPU
    optimizer = configure_optimizers(model, 0.0, 1e-4, (0.9, 0.95), "cpu", eight_bit=True)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = (torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size), generator=g) for _ in range(2))
    reset_peak_rss()
    t0 = time.perf_counter()
    step = train_step(model, optimizer, make_scaler(torch.device("cpu"), torch.float32), [(x, y)], torch.autocast("cpu", enabled=False), 1.0, Dist(),
                      torch.device("cpu"))
    step_s = time.perf_counter() - t0
    step_peak = proc_status_bytes("VmHWM")
    print(f"\nmeasured on this CPU ({trained:,} trained of {total:,} stored parameters; loss {step.loss.item():.3f}):")
    print(f"  process before the model       {baseline / GIB:6.2f} GB")
    print(f"  peak while making the model    {load_peak / GIB:6.2f} GB   ({load_s:.0f} s)")
    print(f"  peak over the training step    {step_peak / GIB:6.2f} GB   ({step_s:.0f} s)")
    print(f"  memory.py's estimate (float32 compute) {cpu['total'] / GIB:.2f} GB + the process "
          f"{baseline / GIB:.2f} GB = {(cpu['total'] + baseline) / GIB:.2f} GB")
    fits = max(load_peak, step_peak) < budget
    print(f"RATIO peak / budget = {max(load_peak, step_peak) / budget:.3f} "
          f"({'under' if fits else 'OVER'} {cfg.budget_gb:g} GB)")
    return {"baseline_bytes": baseline, "load_peak_bytes": load_peak, "step_peak_bytes": step_peak, "load_s": load_s,
            "step_s": step_s, "estimate_cpu_bytes": cpu["total"], "estimate_gpu_bytes": gpu["total"],
            "trained": trained, "fits": fits}


if __name__ == "__main__":
    run(main, GPTJMemoryConfig)
