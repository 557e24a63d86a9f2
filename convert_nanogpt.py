"""
Bring a nanoGPT run along: convert its pickled ckpt.pt (and its dataset's meta.pkl) into our
safetensors checkpoint format, then sample from it or go on training it.

    python convert_nanogpt.py --ckpt=../nanoGPT/out-shakespeare-char/ckpt.pt --out_dir=out-converted
    python sample.py --out_dir=out-converted
    python data/shakespeare_char/prepare.py   # the same characters get the same ids as nanoGPT's prepare.py
    python train.py --init_from=resume --out_dir=out-converted --dataset=shakespeare_char \
        --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --bias=False   # + the rest the converter prints

nanoGPT's checkpoint is a pickle: {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss',
'config'}. It is read with torch.load(weights_only=True), which refuses arbitrary Python objects;
only with --trust_pickle=True does it fall back to a full unpickle, which can execute code: do that
only for files you made yourself. Weights lose their `_orig_mod.` prefixes, the attention mask
buffers are dropped, and the model keeps nanoGPT's exact (erf) GELU so logits stay the same. The
optimizer state is converted too, so `--init_from=resume` continues the run.

Decoding: a character-level run needs its vocabulary. nanoGPT's data/<dataset>/prepare.py writes it
to meta.pkl ({'vocab_size', 'itos': {id: char}, 'stoi'}); it is read with an unpickler that refuses
every global (any class or function, os.system included), so nothing but plain dicts, lists,
tuples, strings, numbers, booleans and None can come out of it and loading it cannot run code. It
becomes our meta.json form {"tokenizer": "char", "vocab_size": n, "itos": [...]}. Without
--dataset_meta it is looked for as data/<dataset>/meta.json or meta.pkl, first in the nanoGPT
checkout that holds the checkpoint (the directory above its out_dir), then in the current directory.

Resuming: train.py refuses to resume when the command line changes the model's shape, the data or
the optimizer, and it takes every other knob from the command line, as for any of our runs. The
converted config holds nanoGPT's values for the keys nanoGPT has (the same names with the same
meaning; the model's shape from model_args) and our TrainConfig defaults for the rest, so what has
to be given again is only what differs from our defaults: the shape (n_layer, n_head, n_embd,
block_size; bias=False, nanoGPT's default and not ours) and a dataset other than shakespeare_char.
The converter prints the exact command, which also carries the run's schedule (learning_rate,
max_iters, warmup_iters, ...: not checked by train.py, but left out they become our defaults).
Device, dtype, compile and backend are left to the new machine. With --data_dir=DIR given here
too, the resumed run reads DIR instead of data/<dataset>; point it at a directory with a meta.json
(ours), or the resumed run's checkpoints lose the vocabulary.
"""

import dataclasses
import json
import pickle
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from homegpt import checkpoint as ckpt_lib
from homegpt.errors import MissingFile, UserError
from homegpt.fileio import check_dir_target
from configurator import run
from model import GPT, GPTConfig
from train import TrainConfig
from homegpt.optimizers import configure_optimizers


@dataclass
class ConvertConfig:
    ckpt: str = "out/ckpt.pt"  # nanoGPT's checkpoint file
    out_dir: str = "out-converted"  # where our checkpoint is written: a new directory, or one holding no run
    trust_pickle: bool = False  # allow a full unpickle if weights_only loading fails (can run code!)
    dataset_meta: str = ""  # meta.json or nanoGPT's meta.pkl for decoding; '' = looked for beside the dataset
    data_dir: str = ""  # the token files a resumed run reads, recorded so --data_dir=... matches; '' = data/<dataset>


# nanoGPT's knobs that describe the machine it ran on, not the run: the resume command leaves them out
MACHINE_KEYS = ("device", "dtype", "compile", "backend")


def read_nanogpt(path, trust_pickle=False):
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such nanoGPT checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others on foreign objects
        if not trust_pickle:
            raise UserError(f"{path}: cannot be read safely (weights_only): {str(e).splitlines()[0]}. If you made "
                             f"this file yourself, rerun with --trust_pickle=True (unpickling can execute code)") from e
        print(f"warning: unpickling {path} with weights_only=False: this can execute code in the file")
        return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- the dataset's vocabulary

class _Refused(pickle.UnpicklingError):
    pass


class PlainUnpickler(pickle.Unpickler):
    """An unpickler for plain data only. Code runs from a pickle only through a global it names (a
    callable for REDUCE, a class for BUILD/NEWOBJ), and every global comes through find_class, which
    refuses them all: dicts, lists, tuples, str, bytes, int, float, bool and None are built by
    opcodes of their own and are all that can come out."""

    def find_class(self, module, name):
        raise _Refused(f"{module}.{name}")


def read_meta_pkl(path):
    """nanoGPT's meta.pkl as plain Python data, refusing any pickle that names a class or function."""
    try:
        with open(path, "rb") as f:
            return PlainUnpickler(f).load()
    except _Refused as e:
        raise UserError(f"{path}: refused: the pickle references {e}, and loading it could run code; a "
                         f"nanoGPT meta.pkl holds only dicts, strings and numbers. Recreate it with nanoGPT's "
                         f"prepare.py or pass our meta.json (--dataset_meta=...)") from None
    except Exception as e:  # a damaged pickle raises EOFError, UnpicklingError, ValueError, KeyError, ...
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); "
                         f"recreate it with nanoGPT's prepare.py") from None


def char_meta(meta, path):
    """nanoGPT's {'vocab_size', 'itos': {id: char}, 'stoi': {char: id}} as our data_meta, what
    data/shakespeare_char/prepare.py writes: {"tokenizer": "char", "vocab_size": n, "itos": [char of id 0, ...]}."""
    if not isinstance(meta, dict) or not isinstance(meta.get("itos"), (dict, list)):
        raise UserError(f"{path}: expected nanoGPT's character vocabulary {{'vocab_size', 'itos', 'stoi'}}, "
                         f"got {type(meta).__name__} with keys {sorted(map(str, meta))[:5] if isinstance(meta, dict) else '-'}")
    itos = meta["itos"]
    if isinstance(itos, dict):  # {id: char}: the ids must be exactly 0..n-1 to become list positions
        if not all(type(i) is int for i in itos) or sorted(itos) != list(range(len(itos))):
            raise UserError(f"{path}: itos's ids are not 0..{len(itos) - 1}; the vocabulary is damaged")
        itos = [itos[i] for i in range(len(itos))]
    bad = [t for t in itos if not (isinstance(t, str) and len(t) == 1)]
    if bad:
        raise UserError(f"{path}: tokens {bad[:3]} are not single characters; our 'char' tokenizer reads "
                         f"one character per token, so this vocabulary cannot be used")
    if len(set(itos)) != len(itos):
        raise UserError(f"{path}: itos maps two ids to the same character; the vocabulary is damaged")
    if meta.get("vocab_size", len(itos)) != len(itos):
        raise UserError(f"{path}: vocab_size {meta['vocab_size']} but itos has {len(itos)} characters")
    stoi = meta.get("stoi")
    if stoi is not None and stoi != {c: i for i, c in enumerate(itos)}:
        raise UserError(f"{path}: stoi and itos disagree; the vocabulary is damaged")
    return {"tokenizer": "char", "vocab_size": len(itos), "itos": itos}


def read_meta(path):
    """Our data_meta from a meta.json (ours) or a meta.pkl (nanoGPT's)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such meta.json / meta.pkl")
    with open(path, "rb") as f:
        pickled = path.suffix in (".pkl", ".pickle") or f.read(1) == b"\x80"  # protocol 2+ opens with 0x80
    if pickled:
        return char_meta(read_meta_pkl(path), path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: neither JSON nor a pickle ({e}); pass a meta.json or nanoGPT's meta.pkl") from None
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("char", "gpt2"):
        raise UserError(f"{path}: not a dataset meta.json (expected \"tokenizer\": \"char\" or \"gpt2\")")
    if meta["tokenizer"] == "char":
        return char_meta(meta, path)
    return meta


def nanogpt_root(ckpt, out_dir):
    """The nanoGPT checkout a checkpoint was written in: its directory minus nanoGPT's out_dir
    (relative to the checkout); the directory above the checkpoint's when out_dir does not match."""
    run_dir = Path(ckpt).resolve().parent
    parts = Path(out_dir).parts if out_dir and not Path(out_dir).is_absolute() else ()
    parts = tuple(p for p in parts if p != ".")
    if parts and ".." not in parts and run_dir.parts[-len(parts):] == parts:
        return Path(*run_dir.parts[:-len(parts)])
    return run_dir.parent


def dataset_meta(cfg, ncfg, gcfg):
    """How to decode the model's tokens: --dataset_meta, the dataset's meta.json / meta.pkl, or GPT-2 BPE."""
    if cfg.dataset_meta:
        found = Path(cfg.dataset_meta)
    else:
        places = [Path(cfg.data_dir)] if cfg.data_dir else []
        if ncfg.get("dataset"):
            roots = dict.fromkeys([nanogpt_root(cfg.ckpt, ncfg.get("out_dir")), Path.cwd().resolve()])
            places += [root / "data" / str(ncfg["dataset"]) for root in roots]
        found = next((p / name for p in places for name in ("meta.json", "meta.pkl") if (p / name).is_file()), None)
    if found is None:
        if gcfg.vocab_size >= 50257:
            print("data_meta: GPT-2 BPE (no meta.json / meta.pkl found, and the vocabulary is GPT-2's size)")
            return {"tokenizer": "gpt2", "vocab_size": 50257}
        print("note: no meta.json or meta.pkl found for a non-GPT-2 vocabulary: pass --dataset_meta=... to sample text")
        return None
    meta = read_meta(found)
    n = meta.get("vocab_size") or (50257 if meta["tokenizer"] == "gpt2" else len(meta["itos"]))
    if n > gcfg.vocab_size:
        raise UserError(f"{found}: {n} tokens, more than the model's vocab_size {gcfg.vocab_size}: "
                         f"it belongs to another dataset; pass the right one with --dataset_meta=...")
    print(f"data_meta: {found} ({meta['tokenizer']}, {n} tokens)")
    return meta


# ----------------------------------------------------------------------------- the run's config

def train_config(cfg, ncfg, gcfg, margs):
    """The nanoGPT run's config under our TrainConfig's keys, every key present (see the docstring)."""
    out = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
           for f in dataclasses.fields(TrainConfig)}
    dropped = []
    for k, v in ncfg.items():
        default = out.get(k, dataclasses.MISSING)
        if type(v) is type(default) or (type(default) is float and type(v) is int):
            out[k] = type(default)(v)
        else:  # a key of a modified nanoGPT, or a value of another type than ours
            dropped.append(f"{k}={v!r}")
    if dropped:
        print(f"note: not carried over (not TrainConfig keys, or of another type): {', '.join(dropped)}")
    out.update(
        # the model as it is: a nanoGPT run that started from gpt2* keeps n_layer=12 etc. in its config
        n_layer=gcfg.n_layer, n_head=gcfg.n_head, n_embd=gcfg.n_embd, block_size=gcfg.block_size, bias=gcfg.bias,
        dropout=float(ncfg.get("dropout", margs.get("dropout", 0.0))),
        qkv_bias=None, tie_weights=True, activation="gelu",  # what nanoGPT's model always is
        # nanoGPT has no vocab knob: meta.pkl's vocab_size or 50304, the rule of our 0; the model's own is in model_args
        vocab_size=0,
        init_from="scratch",  # every weight is in the checkpoint: no base model to fetch when resuming
        out_dir=str(cfg.out_dir), data_dir=cfg.data_dir)
    return out


def resume_command(train_cfg):
    """`python train.py --init_from=resume ...` with every key whose value is not our default, so the
    run goes on as nanoGPT had it configured; the old machine's device, dtype, compile, backend aside."""
    defaults = dataclasses.asdict(TrainConfig())
    args = ["--init_from=resume", f"--out_dir={train_cfg['out_dir']}"]
    args.append(f"--data_dir={train_cfg['data_dir']}" if train_cfg["data_dir"] else f"--dataset={train_cfg['dataset']}")
    skip = ("init_from", "out_dir", "data_dir", "dataset") + MACHINE_KEYS
    args += [f"--{k}={v}" for k, v in train_cfg.items() if k not in skip and k in defaults and v != defaults[k]]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


# ----------------------------------------------------------------------------- conversion

def convert(cfg):
    # a run already there would have its latest.json moved to the converted checkpoint: two runs in one
    check_dir_target(cfg.out_dir, "--out_dir")
    old = read_nanogpt(cfg.ckpt, cfg.trust_pickle)
    missing = [k for k in ("model", "model_args") if k not in old]
    if missing:
        raise UserError(f"{cfg.ckpt}: not a nanoGPT checkpoint (no {', '.join(missing)})")
    margs = old["model_args"]
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias") if k not in margs]
    if missing:
        raise UserError(f"{cfg.ckpt}: model_args lack {', '.join(missing)}; not a nanoGPT checkpoint this converter knows")
    gcfg = GPTConfig(n_layer=margs["n_layer"], n_head=margs["n_head"], n_embd=margs["n_embd"],
                     block_size=margs["block_size"], vocab_size=margs["vocab_size"], bias=margs["bias"],
                     dropout=margs.get("dropout", 0.0), tie_weights=True, activation="gelu")
    model = GPT(gcfg)
    sd = {k: v for k, v in ckpt_lib.clean_state_dict(old["model"]).items() if not k.endswith(".attn.bias")
          or k in dict(model.named_parameters())}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{cfg.ckpt}: weights do not match the model args (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    ncfg = old.get("config") or {}
    optimizer = None
    if "optimizer" in old:
        optimizer = configure_optimizers(model, ncfg.get("weight_decay", 0.1), ncfg.get("learning_rate", 6e-4),
                                               (ncfg.get("beta1", 0.9), ncfg.get("beta2", 0.95)), "cpu")
        try:
            # nanoGPT groups the parameters as we do (>=2-D decayed, the rest not, in parameter order);
            # torch checks only the group sizes, so the shapes are checked here, per parameter
            optimizer.load_state_dict(old["optimizer"])
            for p in (p for g in optimizer.param_groups for p in g["params"]):
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                        raise UserError(f"state {key} of shape {tuple(value.shape)} for a parameter of {tuple(p.shape)}")
        except (ValueError, KeyError) as e:
            print(f"note: optimizer state not converted ({e}); resuming will restart the optimizer")
            optimizer = None
    train_cfg = train_config(cfg, ncfg, gcfg, margs)
    iter_num = int(old.get("iter_num", 0))
    # nanoGPT does not count tokens; its iterations were all of one size (its gradient_accumulation_steps
    # in the config is the global count, before the split over DDP ranks, as ours)
    per_iter = [ncfg.get(k) for k in ("gradient_accumulation_steps", "batch_size", "block_size")]
    tokens_seen = iter_num * per_iter[0] * per_iter[1] * per_iter[2] if all(isinstance(n, int) for n in per_iter) else 0
    best = old.get("best_val_loss")
    state = {"iter_num": iter_num, "tokens_seen": tokens_seen,
             "best_val_loss": float(best) if best is not None else None,
             "config": train_cfg, "model_args": vars(gcfg).copy(), "data_meta": dataset_meta(cfg, ncfg, gcfg),
             "converted_from": str(Path(cfg.ckpt).resolve())}
    path = ckpt_lib.save_checkpoint(cfg.out_dir, state, model, optimizer, keep_last_n=0)
    print(f"converted {cfg.ckpt} -> {path}")
    print(f"resume it with (the model's shape must be given again; the rest continues nanoGPT's settings; "
          f"add --device/--dtype for this machine and raise --max_iters to train on):\n  {resume_command(train_cfg)}")
    return path


if __name__ == "__main__":
    run(convert, ConvertConfig)
