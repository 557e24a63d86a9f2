"""
Evaluation throughput: evaluation.evaluate_loss (inference mode, runtime.autocast with the fast dtype),
as train.py's validation and eval.py call it, against a plain float32 eager forward under no_grad
(nanoGPT's estimate_loss on a CPU), over the same fixed validation windows.

    python benchmarks/eval_throughput.py                               # baby GPT, Tiny Shakespeare val
    python benchmarks/eval_throughput.py --max_batches=2 --batch_size=8
    python benchmarks/eval_throughput.py --out_dir=out-shakespeare-char-cpu

Both sides see the same batches, alternating in one process (a repeat is one pass over all
max_batches batches per side); the medians give tokens/s. Also prints both losses: the fast path
must agree with float32 to about 0.01 or it is not the same evaluation. Measured figures: docs/speed.md.
"""

from dataclasses import dataclass

import torch

import common
from homegpt import evaluation
from homegpt.dataloader import TokenData, eval_batches, to_device
from model import GPT, GPTConfig
from homegpt.runtime import autocast, pick_device, pick_dtype
from homegpt.weights import load_model


@dataclass
class EvalThroughputConfig:
    out_dir: str = ""  # a trained run to evaluate; '' = random weights of the shape below
    data_dir: str = "data/shakespeare_char"  # a prepared dataset; its val split is read
    n_layer: int = 6  # the baby GPT (config/train_shakespeare_char.py)
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    batch_size: int = 64
    max_batches: int = 4  # validation batches per pass; 0 = the whole split
    repeats: int = 3  # timed passes per side, after one untimed warm-up pass each
    device: str = "cpu"
    dtype: str = "auto"  # the fast side's precision, as train.py picks it
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 1337
    target: float = 2.0  # the promised speed-up


def float32_eager_loss(model, batches, device):
    """The baseline: nanoGPT's estimate_loss on a CPU (float32, eager, no_grad), token-weighted like
    evaluate_loss so that the two losses are the same quantity."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            x, y = to_device((x, y), device)
            _, loss = model(x, y, reduction="sum")
            total += loss.item()
            count += int((y != -1).sum())
    return total / count


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    common.print_machine("evaluation: evaluation.evaluate_loss (fast dtype, inference mode) vs float32 eager")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.out_dir:
        model, _ = load_model(cfg.out_dir, device=device)
    else:
        torch.manual_seed(cfg.seed)
        vocab = TokenData(cfg.data_dir, "val").vocab_size or 50304
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                              vocab_size=vocab, dropout=0.0)).to(device)
    block = model.config.block_size
    val = TokenData(cfg.data_dir, "val")
    batches = list(eval_batches(val, cfg.batch_size, block, cfg.max_batches, model.config.vocab_size))
    n_tokens = sum(int((y != -1).sum()) for _, y in batches)
    print(f"model: {model.get_num_params():,} parameters, block {block}; {len(batches)} batches of up to "
          f"{cfg.batch_size} x {block} = {n_tokens:,} tokens per pass from {cfg.data_dir} (val)", flush=True)

    losses = {}
    fast_name = f"evaluate_loss {str(dtype).replace('torch.', '')}"

    def fast():
        losses[fast_name] = evaluation.evaluate_loss(model, iter(batches), device, autocast(device, dtype))["loss"]

    def base():
        losses["float32 eager"] = float32_eager_loss(model, batches, device)

    times = common.interleaved({fast_name: fast, "float32 eager": base}, cfg.repeats)
    rates = {name: n_tokens / common.median(t) for name, t in times.items()}
    print(f"loss: {fast_name} {losses[fast_name]:.4f}, float32 eager {losses['float32 eager']:.4f} "
          f"(|diff| {abs(losses[fast_name] - losses['float32 eager']):.4f})")
    common.print_ratio("eval_throughput", fast_name, rates[fast_name], "float32 eager", rates["float32 eager"],
                       "tokens/s", cfg.target)
    return {"rates": rates, "losses": losses}


if __name__ == "__main__":
    from configurator import configure
    main(configure(EvalThroughputConfig))
