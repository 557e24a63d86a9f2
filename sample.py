"""
Sample text from a trained model or from OpenAI's GPT-2.

    python sample.py --out_dir=out-shakespeare-char --device=cpu
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --top_p=0.9

Decodes with the dataset's tokenizer recorded in the checkpoint (characters or GPT-2 BPE).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import holds_checkpoint, load_any
from configurator import MissingFile, UserError, run
from dataloader import Tokenizer
from runtime import autocast, pick_device, pick_dtype, setup_backends


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' (the checkpoint in out_dir) or 'gpt2', 'gpt2-xl', an HF dir, ...
    out_dir: str = "out"  # the run to sample from when init_from='resume'
    which: str = "best"  # the run's 'best' checkpoint (lowest validation loss; its latest if it never evaluated) or 'latest'
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
    top_k: int = 200  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling: keep the smallest set reaching p; 1.0 = off
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    use_cache: bool = True  # KV cache: each new token costs one position instead of the whole context


def main(cfg):
    device = pick_device(cfg.device)
    setup_backends(device)  # as train.py: TF32 float32 matmuls on CUDA
    dtype = pick_dtype(cfg.dtype, device, decoding=True)
    if cfg.init_from == "resume" and not holds_checkpoint(cfg.out_dir):
        raise MissingFile(f"--out_dir={cfg.out_dir} holds no checkpoint (latest.json): train there first, or sample "
                          f"a pretrained model with --init_from=gpt2 (or another GPT-2 name or HF directory)")
    model, data_meta, _ = load_any(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from, device, cfg.which)
    tok = Tokenizer(data_meta)
    prompt = cfg.start
    if prompt.startswith("FILE:"):
        path = Path(prompt[5:])
        if not path.exists():
            raise MissingFile(f"prompt file {path} not found (--start=FILE:path reads the prompt from a file)")
        prompt = path.read_text(encoding="utf-8")
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give --start some text")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :].repeat(cfg.num_samples, 1)  # (B, T)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.inference_mode(), autocast(device, dtype):
        y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                           top_p=cfg.top_p if cfg.top_p < 1.0 else None, generator=gen, use_cache=cfg.use_cache)
    samples = [tok.decode(row.tolist()) for row in y]
    for s in samples:
        print(s)
        print("---------------")
    return samples


if __name__ == "__main__":
    run(main, SampleConfig)
