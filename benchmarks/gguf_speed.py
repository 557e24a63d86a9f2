"""
What an exported GGUF file weighs and how fast llama.cpp runs it, beside sample.py's own generation,
on this machine: GPT-2 124M's shape (random weights: the speed does not depend on them), batch 1,
greedy, a 16-token prompt and new_tokens more, llama.cpp through llama-cpp-python.

    python benchmarks/gguf_speed.py
    python benchmarks/gguf_speed.py --n_layer=6 --n_embd=384 --n_head=6 --new_tokens=256

Each round times ours (model.generate with the KV cache, float32, as sample.py decodes on a CPU),
then llama.cpp with the f16 file, then with the q8_0 file; the rounds alternate and the medians are
reported, with the files' sizes.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import common
import torch

import export_gguf
from configurator import configure
from model import GPT, GPTConfig
from homegpt.generate import generate


@dataclass
class GGUFSpeedConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    new_tokens: int = 128
    repeats: int = 3
    threads: int = 0  # llama.cpp's and torch's threads; 0 = every usable core


def main(cfg):
    import llama_cpp
    common.print_machine("GGUF file size and llama.cpp generation speed")
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size)).eval()
    prompt = list(range(1000, 1016))
    meta = {"tokenizer": "gpt2", "vocab_size": 50257}
    with tempfile.TemporaryDirectory() as tmp:
        files, llms = {}, {}
        for dtype in ("f16", "q8_0"):
            files[dtype] = Path(tmp) / f"model-{dtype}.gguf"
            export_gguf.write_gguf(model, meta, files[dtype], dtype)
            llms[dtype] = llama_cpp.Llama(model_path=str(files[dtype]), n_ctx=len(prompt) + cfg.new_tokens,
                                          n_threads=threads, verbose=False)

        def ours():
            with torch.inference_mode():
                generate(model, torch.tensor([prompt]), cfg.new_tokens, temperature=0)

        def llama(dtype):
            def run():
                llms[dtype].reset()
                for i, _ in enumerate(llms[dtype].generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)):
                    if i + 1 == cfg.new_tokens:
                        break
            return run
        times = common.interleaved({"ours": ours, "f16": llama("f16"), "q8_0": llama("q8_0")}, cfg.repeats)
        rates = {k: cfg.new_tokens / common.median(v) for k, v in times.items()}
        n = model.get_num_params()
        print(f"model: {n / 1e6:.1f}M parameters; files: f16 {files['f16'].stat().st_size / 2**20:,.1f} MiB, "
              f"q8_0 {files['q8_0'].stat().st_size / 2**20:,.1f} MiB")
        print(f"tokens/s (median of {cfg.repeats}, {threads} threads): ours float32 {rates['ours']:,.1f}, "
              f"llama.cpp f16 {rates['f16']:,.1f}, llama.cpp q8_0 {rates['q8_0']:,.1f}")
        common.print_ratio("llama.cpp q8_0 over sample.py", "q8_0", rates["q8_0"], "ours", rates["ours"], "tok/s")


if __name__ == "__main__":
    main(configure(GGUFSpeedConfig))
