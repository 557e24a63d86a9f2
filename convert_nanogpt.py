"""
Bring a nanoGPT run along: convert its pickled ckpt.pt into our safetensors checkpoint format.

    python convert_nanogpt.py --ckpt=out-shakespeare-char/ckpt.pt --out_dir=out-converted
    python sample.py --out_dir=out-converted

nanoGPT's checkpoint is a pickle: {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss',
'config'}. It is read with torch.load(weights_only=True), which refuses arbitrary Python objects;
only with --trust_pickle=True does it fall back to a full unpickle, which can execute code: do that
only for files you made yourself. Weights lose their `_orig_mod.` prefixes, the attention mask
buffers are dropped, and the model keeps nanoGPT's exact (erf) GELU so logits stay the same. The
optimizer state is converted too, so `--init_from=resume` continues the run.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint as ckpt_lib
from configurator import run
from model import GPT, GPTConfig


@dataclass
class ConvertConfig:
    ckpt: str = "out/ckpt.pt"  # nanoGPT's checkpoint file
    out_dir: str = "out-converted"  # where our checkpoint is written
    trust_pickle: bool = False  # allow a full unpickle if weights_only loading fails (can run code!)
    dataset_meta: str = ""  # meta.json of the dataset for decoding; '' = data/<dataset>/meta.json or GPT-2 BPE


def read_nanogpt(path, trust_pickle=False):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such nanoGPT checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others on foreign objects
        if not trust_pickle:
            raise ValueError(f"{path}: cannot be read safely (weights_only): {str(e).splitlines()[0]}. If you made "
                             f"this file yourself, rerun with --trust_pickle=True (unpickling can execute code)") from e
        print(f"warning: unpickling {path} with weights_only=False: this can execute code in the file")
        return torch.load(path, map_location="cpu", weights_only=False)


def convert(cfg):
    old = read_nanogpt(cfg.ckpt, cfg.trust_pickle)
    missing = [k for k in ("model", "model_args") if k not in old]
    if missing:
        raise ValueError(f"{cfg.ckpt}: not a nanoGPT checkpoint (no {', '.join(missing)})")
    margs = old["model_args"]
    gcfg = GPTConfig(n_layer=margs["n_layer"], n_head=margs["n_head"], n_embd=margs["n_embd"],
                     block_size=margs["block_size"], vocab_size=margs["vocab_size"], bias=margs["bias"],
                     dropout=margs.get("dropout", 0.0), tie_weights=True, activation="gelu")
    model = GPT(gcfg)
    sd = {k: v for k, v in ckpt_lib.clean_state_dict(old["model"]).items() if not k.endswith(".attn.bias")
          or k in dict(model.named_parameters())}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{cfg.ckpt}: weights do not match the model args (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    ncfg = old.get("config", {})
    train_cfg = {k: v for k, v in ncfg.items() if isinstance(v, (int, float, str, bool, type(None)))}
    train_cfg.update(init_from="scratch", activation="gelu", tie_weights=True, qkv_bias=gcfg.qkv_bias,
                     vocab_size=gcfg.vocab_size)
    optimizer = None
    if "optimizer" in old:
        optimizer = model.configure_optimizers(ncfg.get("weight_decay", 0.1), ncfg.get("learning_rate", 6e-4),
                                               (ncfg.get("beta1", 0.9), ncfg.get("beta2", 0.95)), "cpu")
        try:
            optimizer.load_state_dict(old["optimizer"])  # nanoGPT groups parameters the same way
        except (ValueError, KeyError) as e:
            print(f"note: optimizer state not converted ({e}); resuming will restart the optimizer")
            optimizer = None
    best = old.get("best_val_loss")
    state = {"iter_num": int(old.get("iter_num", 0)), "tokens_seen": 0,
             "best_val_loss": float(best) if best is not None else None,
             "config": train_cfg, "model_args": vars(gcfg).copy(), "data_meta": dataset_meta(cfg, ncfg, gcfg),
             "converted_from": str(Path(cfg.ckpt).resolve())}
    path = ckpt_lib.save_checkpoint(cfg.out_dir, state, model, optimizer, keep_last_n=0)
    print(f"converted {cfg.ckpt} -> {path}")
    return path


def dataset_meta(cfg, ncfg, gcfg):
    """How to decode the model's tokens: a given meta.json, the dataset's, or GPT-2 BPE."""
    if cfg.dataset_meta:
        return json.loads(Path(cfg.dataset_meta).read_text())
    ours = Path("data") / str(ncfg.get("dataset", "")) / "meta.json"
    if ncfg.get("dataset") and ours.exists():
        return json.loads(ours.read_text())
    if gcfg.vocab_size >= 50257:
        return {"tokenizer": "gpt2", "vocab_size": 50257}
    print("note: no meta.json found for a non-GPT-2 vocabulary: pass --dataset_meta=... to sample text")
    return None


if __name__ == "__main__":
    run(convert, ConvertConfig)
