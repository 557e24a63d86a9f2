"""
Sample text from a trained model or from OpenAI's GPT-2.

    python sample.py --out_dir=out-shakespeare-char --device=cpu
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --top_p=0.9
    python sample.py --out_dir=out-instruct --chat             # type an instruction, get the answer
    python sample.py --out_dir=out-instruct --chat --start="Name three primary colours." --temperature=0

Decodes with the dataset's tokenizer recorded in the checkpoint (characters or GPT-2 BPE).
Chat: each instruction is wrapped in the prompt template the run was fine-tuned with (recorded in its
checkpoint; --chat_template for a model without one), the answer streams as it is generated and ends
at <|endoftext|>. Instructions come from --start, or one per line from standard input until a blank
line or end of input, so a pipe works as well as a terminal. Each instruction is answered on its own:
the instruction formats are single-turn, so earlier turns are not fed back.
Without --chat the samples are printed once all are done (they are generated as one batch); meanwhile
a progress bar counts their tokens on stderr when that is a terminal, and stays out of logs and pipes.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from homegpt.weights import load_any
from homegpt.runs import holds_checkpoint
from homegpt.errors import MissingFile, UserError
from configurator import run
from homegpt.dataloader import Tokenizer
from homegpt.runtime import autocast, pick_device, pick_dtype, progress, setup_backends
from homegpt import sft
from homegpt.generate import stream


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' (the checkpoint in out_dir) or 'gpt2', 'gpt2-xl', an HF dir, ...
    out_dir: str = "out"  # the run to sample from when init_from='resume'
    which: str = "best"  # the run's 'best' checkpoint (lowest validation loss; its latest if it never evaluated) or 'latest'
    base_dir: str = ""  # a LoRA / 1-D run whose base run moved: where it is now (it must hold the checkpoint trained on)
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
    chat: bool = False  # answer instructions (--start, or lines of stdin) in the run's prompt template
    chat_template: str = ""  # with chat: '' = the run's own (in its checkpoint); else a template with {instruction}


def main(cfg):
    device = pick_device(cfg.device)
    setup_backends(device)  # as train.py: TF32 float32 matmuls on CUDA
    dtype = pick_dtype(cfg.dtype, device, decoding=True)
    if cfg.chat and cfg.chat_template:  # a wrong template stops before the model loads
        sft.check_template(cfg.chat_template)
    if cfg.init_from == "resume" and not holds_checkpoint(cfg.out_dir):
        raise MissingFile(f"--out_dir={cfg.out_dir} holds no checkpoint (latest.json): train there first, or sample "
                          f"a pretrained model with --init_from=gpt2 (or another GPT-2 name or HF directory)")
    model, data_meta, _ = load_any(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from, device, cfg.which,
                                  base_dir=cfg.base_dir)
    tok = Tokenizer(data_meta)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.chat:
        return chat(cfg, model, tok, data_meta, device, dtype, gen)
    ids = tok.encode(read_prompt(cfg.start))
    if not ids:
        raise UserError("the prompt encodes to no tokens; give --start some text")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :].repeat(cfg.num_samples, 1)  # (B, T)
    with torch.inference_mode(), autocast(device, dtype):
        # homegpt.generate.generate, a column at a time, so that the bar can count the tokens
        steps = stream(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             top_p=cfg.top_p if cfg.top_p < 1.0 else None, generator=gen, use_cache=cfg.use_cache)
        new = list(progress(steps, f"sampling {cfg.num_samples} x", total=cfg.max_new_tokens, unit="tok"))
        y = torch.cat([x] + new, dim=1)  # (B, T + max_new_tokens)
    samples = [tok.decode(row.tolist()) for row in y]
    for s in samples:
        print(s)
        print("---------------")
    return samples


def read_prompt(start):
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.exists():
            raise MissingFile(f"prompt file {path} not found (--start=FILE:path reads the prompt from a file)")
        return path.read_text(encoding="utf-8")
    return start


def chat_template(cfg, data_meta):
    """The format an instruction is wrapped in: --chat_template, else the one the run was tuned with."""
    if cfg.chat_template:  # (checked by main before the model loaded)
        return cfg.chat_template
    recorded = (data_meta or {}).get("prompt_template")
    if not recorded:
        raise UserError("this model was not fine-tuned on instruction records, so its checkpoint holds no prompt "
                        "template: fine-tune it first (python train.py config/finetune_instruct.py), or give one, "
                        "as a Python string so that \\n is a newline: --chat_template='\"### Instruction:\\n{instruction}\\n\\n"
                        "### Response:\\n\"'")
    return recorded["no_input"]


def instructions(cfg):
    """--start as one instruction, else lines of standard input until a blank line or its end."""
    if cfg.start != SampleConfig.start:
        yield read_prompt(cfg.start)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print("type an instruction and press Enter; a blank line ends")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not line.strip():
            return
        yield line.strip()


def chat(cfg, model, tok, data_meta, device, dtype, gen):
    """Answer each instruction, printing the answer as it is generated; returns the answers."""
    template = chat_template(cfg, data_meta)
    answers = []
    for instruction in instructions(cfg):
        ids = tok.encode(template.format(instruction=instruction, input=""))
        x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)
        new, shown = [], 0
        with torch.inference_mode(), autocast(device, dtype):
            for next_id in stream(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                        top_p=cfg.top_p if cfg.top_p < 1.0 else None, generator=gen,
                                        use_cache=cfg.use_cache, stop_id=tok.eot):
                if next_id.item() == tok.eot:
                    break
                new.append(next_id.item())
                text = tok.decode(new)
                if not text.endswith("\ufffd"):  # a character's bytes may span tokens: wait for the rest
                    print(text[shown:], end="", flush=True)
                    shown = len(text)
        text = tok.decode(new)
        print(text[shown:] + "\n", flush=True)
        answers.append(text)
    return answers


if __name__ == "__main__":
    run(main, SampleConfig)
