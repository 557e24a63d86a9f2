"""
Every way a GPT comes to be: from scratch for a run, from OpenAI's or a Hugging Face model (hf.py),
from one of our runs (its checkpoint, LoRA merged or not), with LoRA or 1-D training on top.

    from homegpt.weights import load_model, load_any
    model, info = load_model("out-shakespeare-char")          # a run's latest checkpoint, on the CPU
    model, data_meta, info = load_any("gpt2")                 # whatever a user names as a model

train.py, sample.py, eval.py, export_hf.py and plan.py build their models here; checkpoint.py only
reads and writes the files.
"""

import dataclasses
import json
from pathlib import Path

import torch

from homegpt import hf, hub, lora, quant
from homegpt.checkpoint import read_checkpoint, restore_model
from homegpt.runs import holds_checkpoint
from homegpt.errors import MissingFile, UserError
from homegpt.fileio import file_sha256
from model import SHAPE, GPT, GPTConfig

# GPTConfig fields that older checkpoints may hold, with the one value today's model still computes:
# these options lost or tied in the project's own ablation and were removed (docs/LOG.md, 2026-12-07)
REMOVED_FIELDS = {"norm": "layernorm", "zero_init_proj": False, "logit_softcap": 0.0}


def saved_config(args):
    """The GPTConfig of a checkpoint's model_args. A field newer than the checkpoint takes its default
    (every default is GPT-2's shape), as GPTConfig resolves it (attn_proj_bias None -> bias); a removed
    option is dropped where it was off, and refused where the model used it."""
    used = [f"{k}={args[k]!r}" for k, off in REMOVED_FIELDS.items() if k in args and args[k] != off]
    if args.get("activation") == "relu2":
        used.append("activation='relu2'")
    if used:
        raise UserError(f"this checkpoint's model uses {', '.join(used)}, which homegpt no longer computes (removed "
                        f"after losing in its ablation): load it with the homegpt release it was trained with")
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(args) - names - set(REMOVED_FIELDS))
    if unknown:
        raise UserError(f"this checkpoint's model has fields this homegpt does not know ({', '.join(unknown)}): it was "
                        f"written by a newer release; update homegpt to load it")
    return GPTConfig(**{k: v for k, v in args.items() if k in names})


def scratch_model_args(cfg, data_meta):
    """GPTConfig fields of a model trained from scratch: the config's (every GPTConfig field is a
    TrainConfig key), the data's vocabulary unless the config names one."""
    return dict(GPTConfig.model_args(cfg), vocab_size=cfg.vocab_size or data_meta.get("vocab_size") or 50304)


def build_model(cfg, origin, model_args, base=None):
    """The GPT for a training run: from scratch, or a pretrained base (cropped, with LoRA / 1-D training)."""
    if origin == "scratch":  # a new model, or a checkpoint's (its model_args saved by this or an older release)
        model = GPT(saved_config(model_args))
        partial = False
    else:
        model = build_base(base or origin, cfg.base_quant, cfg.base_dir)
        model.set_dropout(cfg.dropout)  # pretrained weights with this run's dropout
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        partial = apply_finetune(model, dataclasses.asdict(cfg))
        if partial and cfg.base_dtype != "float32":
            lora.freeze_base_dtype(model, {"bfloat16": torch.bfloat16}[cfg.base_dtype])
    model.activation_checkpointing = cfg.activation_checkpointing
    model.use_fast_dropout(cfg.fast_dropout)
    return model, partial


def check_model_args(saved, current):
    """Refuse to load weights into a model of another shape, naming the fields that differ."""
    saved = vars(saved_config(saved))
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in GPTConfig.fields_tagged(SHAPE) if saved.get(k) != current.get(k)]
    if diff:
        raise UserError("the model shape differs from the checkpoint's:\n  " + "\n  ".join(diff) +
                         "\nkeep the checkpoint's values (or start a new out_dir)")


def source_context(init_from):
    """The context length of a model to start from, read from its metadata without loading weights:
    one of our runs, a Hugging Face directory, or a GPT-2 name (None when it cannot be told)."""
    p = Path(init_from)
    if holds_checkpoint(p):
        return read_checkpoint(p, verify=False)[1]["model_args"]["block_size"]
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text())
            return config.get("n_positions", config.get("n_ctx"))
        except (json.JSONDecodeError, AttributeError):
            return None  # the loader explains what is wrong with the file
    return hf.GPT2_CONTEXT if init_from in hub.HF_MODELS else None


def source_data_meta(init_from):
    """How a model to start from reads text: one of our runs' own data meta (characters or GPT-2 BPE),
    or GPT-2 BPE for OpenAI's and Hugging Face GPT-2 models."""
    if holds_checkpoint(init_from):
        return read_checkpoint(init_from, verify=False)[1].get("data_meta")
    return {"tokenizer": "gpt2", "vocab_size": 50257}


def base_reference(init_from):
    """What a fine-tune's checkpoints record of the base they build on (state["base"]); None from scratch.

    One of our runs, or one of its checkpoint directories (a LoRA run too): a pin, the exact weights
    the fine-tune starts from, whatever the base run does next (trains on, prunes, is retrained):
        {"run": "/abs/out-base", "checkpoint": "ckpt-0000500", "sha256": "<of its model.safetensors>"}
    The hash is the one the base checkpoint's state.json records, so pinning reads no weights (a save
    cut short by SIGTERM recorded sizes only: that file is hashed here). Every load of the fine-tune
    loads this checkpoint, not the base run's latest, and refuses when it is gone or hashes otherwise.

    A GPT-2 name or hub repository stays its name, a Hugging Face directory its absolute path: not
    pinned (the hub serves what it serves; hashing a local GPT-J directory would read 24 GB per load).
    Checkpoints of earlier releases hold a plain path to the base run (loaded at its latest): they
    load as they always did."""
    if init_from == "scratch":
        return None
    if holds_checkpoint(init_from):
        ckpt, state = read_checkpoint(init_from, verify=False)  # its state.json only
        ckpt = ckpt.resolve()
        sha = (state.get("files", {}).get("model.safetensors") or {}).get("sha256")
        return {"run": str(ckpt.parent), "checkpoint": ckpt.name,
                "sha256": sha or file_sha256(ckpt / "model.safetensors")}
    return str(Path(init_from).resolve()) if Path(init_from).exists() else init_from


def repoint_base(base, base_dir):
    """A checkpoint's base reference moved to base_dir (the config key of every command that loads a
    fine-tune): where the base run is now, or one copied checkpoint directory of it. A pin keeps its
    checkpoint and hash, which the load checks; an old plain reference becomes base_dir."""
    if not base_dir:
        return base
    if base is None:
        raise UserError(f"base_dir={base_dir!r} re-points the base of a LoRA or train_1d_only run, and this model "
                        f"has none (it holds every weight): drop --base_dir")
    where = str(Path(base_dir).resolve())
    return dict(base, run=where) if isinstance(base, dict) else where


def pinned_checkpoint(base):
    """The checkpoint directory a pin names (base_reference), after checking that its model.safetensors
    hashes as pinned; one line naming the base, the checkpoint and what changed when it does not."""
    run, name, sha = Path(base["run"]), base["checkpoint"], base["sha256"]
    ckpt = run if (run / "state.json").is_file() else run / name  # (base_dir may name the checkpoint itself)
    pinned = f"checkpoint {name} of the base run {run} (sha256 {sha[:12]})"
    if not run.is_dir():
        raise UserError(f"the base this run was fine-tuned on is gone: {run} does not exist (moved or deleted); it "
                        f"trained on {pinned}: pass --base_dir=<where the base run is now>")
    if not (ckpt / "model.safetensors").is_file() or not (ckpt / "state.json").is_file():
        raise UserError(f"the base run {run} no longer holds {name}, the checkpoint this run was fine-tuned on "
                        f"(pruned by the base run's keep_last_n, or deleted); its other checkpoints hold other weights, "
                        f"which would change what this run computes: restore {ckpt}, or pass --base_dir=<a copy of "
                        f"the base run holding {name}>, or fine-tune afresh from the base as it is now")
    now = file_sha256(ckpt / "model.safetensors")
    if now != sha:
        raise UserError(f"the base has changed: {ckpt}/model.safetensors hashes {now[:12]}, but this run was fine-tuned "
                        f"on {pinned} (retrained or overwritten into the same out_dir, or damaged): restore the "
                        f"original, or pass --base_dir=<a copy of the base run holding it>, or fine-tune afresh")
    return ckpt


def load_any(spec, device="cpu", which="latest", base_quant="", base_dir=""):
    """(model in eval mode, its data meta, info) for whatever a user names as a model: one of our runs
    or checkpoint directories (its latest or best checkpoint), a Hugging Face GPT-2 / GPT-J directory
    or hub repository, or an OpenAI GPT-2 name. The one loader behind sample.py and eval.py.

    A run trained on a quantised base loads as it trained, its adapters unmerged on the quantised
    weights (merged, a 6B base would be a 24 GB float model); base_quant quantises a pretrained
    model's matmuls as it loads (e.g. GPT-J-6B for a few-shot evaluation on an 11 GB card).
    base_dir: where a fine-tune's base is now, when it moved (repoint_base)."""
    if holds_checkpoint(spec):
        model, info = load_model(spec, device=device, which=which, merge_lora=None, base_dir=base_dir)
        return model, info.get("data_meta") or {"tokenizer": "gpt2", "vocab_size": 50257}, info
    if spec in hub.HF_MODELS or (Path(spec) / "config.json").is_file() or (hub.HUB_REPO.fullmatch(spec) and not Path(spec).exists()):
        repoint_base(None, base_dir)  # (refuses a base_dir: a pretrained model has no base)
        gpt2 = {"tokenizer": "gpt2", "vocab_size": 50257}  # (GPT-J's tokenizer is GPT-2's BPE too)
        model = hf.from_pretrained(spec, base_quant=base_quant).to(device).eval()
        return model, gpt2, {"config": {}, "data_meta": gpt2, "checkpoint": spec}
    if Path(spec).is_dir():
        raise MissingFile(f"{spec} holds no checkpoint (latest.json or state.json): train there first, or check the path")
    raise MissingFile(f"model {spec!r} is not a GPT-2 name ({', '.join(hub.HF_MODELS)}), a Hugging Face directory "
                      f"(config.json) or one of our runs (an out_dir with latest.json); check the name or the path")


def build_base(base, base_quant="", base_dir=""):
    """The model a fine-tune starts from: OpenAI GPT-2 by name, a Hugging Face directory or hub
    repository, or one of our runs (a pin from base_reference: that checkpoint, its hash checked);
    base_dir: where that base is now (repoint_base); with base_quant ('int8' / 'nf4') its block
    matmuls quantised."""
    base = repoint_base(base, base_dir)
    if isinstance(base, dict) or holds_checkpoint(base):
        if isinstance(base, dict):  # hashed by pinned_checkpoint: not again by the load
            model, _ = _load_model(pinned_checkpoint(base), "cpu", True, "latest", verify=False)
        else:  # a plain path, as earlier releases recorded: the base run's latest
            model, _ = load_model(base, merge_lora=True)
        if base_quant:  # in memory already: quantised after loading
            quant.quantize_model(model, base_quant)
        return model
    return hf.from_pretrained(base, base_quant=base_quant)


def apply_finetune(model, cfg):
    """Freeze and wrap a model for LoRA or 1-D-only training as the config says; returns True when
    only part of the model trains (so checkpoints hold only that part)."""
    if cfg.get("lora_rank", 0) > 0:
        lora.apply_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
        return True
    if cfg.get("train_1d_only", False):
        lora.train_only_1d(model)
        return True
    return False


def load_model(path, device="cpu", merge_lora=True, which="latest", base_dir=""):
    """A GPT in eval mode from a run's out_dir or a checkpoint directory, LoRA merged; plus its info.
    merge_lora=None: as it trained, merged unless its base is quantised (load_any).

    which: 'latest' or 'best' (the latest when the run never evaluated). A run that is still
    training may prune the checkpoint its pointer named while we read it: then the pointer is read
    again, once, and the newer checkpoint loads instead. A LoRA or 1-D run loads on the very base
    checkpoint it trained on (base_reference), found in base_dir when the base run moved."""
    try:
        return _load_model(path, device, merge_lora, which, base_dir=base_dir)
    except FileNotFoundError:
        if (Path(path) / "state.json").exists():
            raise  # a checkpoint directory named directly: there is nothing newer to find
        return _load_model(path, device, merge_lora, which, base_dir=base_dir)


def _load_model(path, device, merge_lora, which, base_dir="", verify=True):
    ckpt, state = read_checkpoint(path, which, verify=verify)
    args = state["model_args"]
    cfg = state.get("config", {})
    if state.get("trainable_only"):
        base_quant = cfg.get("base_quant", "")
        merge_lora = not base_quant if merge_lora is None else merge_lora
        model = build_base(state["base"], base_quant, base_dir)
        if model.config.block_size > args["block_size"]:
            model.crop_block_size(args["block_size"])
        check_model_args(args, vars(model.config))
        apply_finetune(model, cfg)
        restore_model(model, ckpt, state)
        if merge_lora and cfg.get("lora_rank", 0) > 0:
            lora.merge_lora(model)
        if merge_lora and base_quant:  # a float model, as trained (the quantised weights dequantised)
            quant.dequantize_model(model)
    else:
        repoint_base(None, base_dir)  # (refuses a base_dir: this checkpoint holds every weight)
        model = GPT(saved_config(args))
        restore_model(model, ckpt, state)
    model.to(device).eval()
    info = {k: state.get(k) for k in ("config", "model_args", "iter_num", "tokens_seen", "best_val_loss", "data_meta")}
    info["checkpoint"] = str(ckpt)
    return model, info
