"""
Sampling speed: model.generate with the KV cache against recomputing the whole context for every new
token, greedy, on the baby GPT's shape, and whether both produce the same tokens.

    python benchmarks/sampling.py                                   # block 256 and 1024, 500 new tokens
    python benchmarks/sampling.py --out_dir=out-shakespeare-char-cpu --block_sizes=0
    python benchmarks/sampling.py --max_new_tokens=50 --n_layer=2 --n_head=2 --n_embd=64 --block_sizes=32,128

Generation runs the way sample.py runs it: torch.inference_mode and runtime.autocast with the dtype
from runtime.pick_dtype (float32 unless --dtype says otherwise). Two blocks are measured because they answer different questions. With the
baby GPT's block of 256, 500 new tokens outgrow the context: past position 256 the window slides,
every position's embedding shifts, the cache is dropped and each step recomputes the whole window, so
both sides do the same work for the last ~250 tokens. With block 1024 the prompt and all 500 tokens
fit, and the cache does what it promises. The weights are random unless out_dir names a trained run
(weights.load_model); the speed does not depend on them. Measured figures: docs/speed.md.

Under torch.inference_mode autocast keeps no cast cache, so every new token re-casts all the weights
to bfloat16, and on a CPU that copying dominates cached decoding; hence float32 is the default here.
"""

from dataclasses import dataclass

import torch

import common
from homegpt.errors import UserError
from model import GPT, GPTConfig
from homegpt.runtime import autocast, pick_device, pick_dtype
from homegpt.weights import load_model
from homegpt.generate import generate


@dataclass
class SamplingConfig:
    out_dir: str = ""  # a trained run to sample from; '' = random weights of the shape below
    block_sizes: str = "256,1024"  # comma-separated contexts to measure (random weights); '0' = the run's own
    n_layer: int = 6  # the baby GPT (config/train_shakespeare_char.py)
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 65
    prompt_tokens: int = 1  # length of the prompt (token 0 repeated, like sample.py's '\n')
    max_new_tokens: int = 500
    batch_size: int = 1  # samples generated at once
    repeats: int = 3  # timed generations per side (interleaved), after one untimed warm-up each
    device: str = "cpu"
    dtype: str = "float32"  # 'auto' = sample.py's choice (bf16 autocast would re-cast every weight per token, see above)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 1337
    target: float = 5.0  # the promised speed-up of the cache


def build(cfg, block_size, device):
    if cfg.out_dir:
        model, _ = load_model(cfg.out_dir, device=device)
        return model
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=block_size,
                          vocab_size=cfg.vocab_size, dropout=0.0))
    return model.to(device).eval()


def measure(cfg, model, device, dtype):
    """{'cache': tokens/s, 'recompute': tokens/s}, and the index of the first differing token (None if none)."""
    prompt = torch.zeros((cfg.batch_size, cfg.prompt_tokens), dtype=torch.long, device=device)
    out = {}

    def gen(use_cache):
        with torch.inference_mode(), autocast(device, dtype):
            out[use_cache] = generate(model, prompt, cfg.max_new_tokens, temperature=0.0, use_cache=use_cache)

    times = common.interleaved({"cache": lambda: gen(True), "recompute": lambda: gen(False)}, cfg.repeats)
    n_new = cfg.batch_size * cfg.max_new_tokens
    rates = {name: n_new / common.median(t) for name, t in times.items()}
    diff = (out[True] != out[False]).any(0).nonzero()
    first_diff = None if diff.numel() == 0 else int(diff[0]) - cfg.prompt_tokens
    return rates, first_diff


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    common.print_machine("sampling: KV cache vs recomputing the context")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    blocks = [int(b) for b in cfg.block_sizes.split(",") if b.strip()]
    if not blocks or (not cfg.out_dir and 0 in blocks):
        raise UserError(f"block_sizes={cfg.block_sizes!r}: give positive context lengths, or out_dir with '0'")
    if not cfg.out_dir and (cfg.n_head < 1 or cfg.n_embd % cfg.n_head):
        # checked here, before any timing, rather than as model.py's assert deep inside the first build
        raise UserError(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}: each head gets "
                         f"n_embd / n_head channels; set --n_head to a divisor (e.g. --n_head=2)")
    results = {}
    for block in blocks:
        model = build(cfg, block, device)
        block = model.config.block_size
        total = cfg.prompt_tokens + cfg.max_new_tokens
        fits = "fits" if total <= block else f"outgrows it after {block - cfg.prompt_tokens} new tokens"
        print(f"block {block}: {model.get_num_params():,} parameters, {cfg.prompt_tokens} prompt + "
              f"{cfg.max_new_tokens} new tokens = {total} ({fits}); batch {cfg.batch_size}, "
              f"{str(dtype).replace('torch.', '')}, greedy", flush=True)
        rates, first_diff = measure(cfg, model, device, dtype)
        same = "identical tokens" if first_diff is None else f"tokens DIFFER from new token {first_diff} on"
        print(f"block {block}: {same}")
        results[block] = common.print_ratio(f"sampling block {block}", "kv cache", rates["cache"],
                                            "recompute", rates["recompute"], "tokens/s", cfg.target)
        results[block] = (results[block], first_diff)
    return results


if __name__ == "__main__":
    from configurator import run
    run(main, SamplingConfig)  # a bad setting ends with one line "error: ..." and exit status 1
