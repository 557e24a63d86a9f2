"""
The one checkpoint format: a directory of safetensors and JSON, no pickle anywhere.

    from homegpt.checkpoint import read_checkpoint
    ckpt_dir, state = read_checkpoint("out-shakespeare-char")  # the latest; weights.load_model gives the model
    python -c "from homegpt.checkpoint import read_checkpoint; d, s = read_checkpoint('out-shakespeare-char'); print(d, s['iter_num'])"

    out_dir/
      latest.json, best.json       pointers: {"checkpoint": "ckpt-0000500", "iter_num": 500}
      ckpt-0000500/
        model.safetensors          weights of the unwrapped, uncompiled module (or only the trained
                                   parameters of a LoRA / 1-D fine-tune, plus a reference to its base)
        optimizer.safetensors      optimizer tensors keyed by parameter name (any world size resumes)
        state.json                 everything else: iteration, tokens, config, model args, data
                                   position, RNG, scaler, optimizer scalars, versions, and the size
                                   and sha256 of each file above, checked on load

A save writes a hidden temporary directory, fsyncs it and renames it into place, then moves the
latest pointer: a crash, kill -9 or full disk mid-save leaves the previous checkpoint loadable.
The out_dir around the checkpoints (its lock, metrics.jsonl, what a new run may delete) is runs.py's.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from homegpt import lora
from homegpt.errors import MissingFile, UserError
from homegpt.fileio import CKPT_PREFIX, file_sha256, fsync_dir, write_json
from homegpt.runs import checkpoint_dirs
from homegpt.runtime import broadcast_object, gather_objects, print0, rng_state, set_rng_state

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- module and state dict hygiene

def unwrap(model):
    """The plain GPT inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_state_dict(sd):
    """Strip the `_orig_mod.` and `module.` prefixes that compiled or DDP-wrapped saves carry.
    The only place that knows about them: every loader goes through here."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def model_tensors(model, trainable_only=False, full_sd=None):
    """Tensors to save: the whole state dict, or just the parameters being trained; a tied lm_head
    is stored once (safetensors refuses shared storage). full_sd: the state dict gathered from a
    sharded model (gather_sharded), used instead of model.state_dict()."""
    model = unwrap(model)
    sd = model.state_dict() if full_sd is None else clean_state_dict(full_sd)
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in names}
    if getattr(model.config, "tie_weights", False):
        sd.pop("transformer.wte.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_tensors(model, optimizer, full_osd=None):
    """(tensors keyed '<param name>/<state key>', JSON part) of an optimizer's state, by parameter name.
    full_osd: a name-keyed optimizer state gathered from a sharded model (gather_sharded) instead."""
    osd = full_osd if full_osd is not None else _name_keyed(model, optimizer)
    tensors, scalars, seen = {}, {}, set()
    for pname, entry in osd["state"].items():
        for key, value in entry.items():
            # bitsandbytes (0.50) nests its 8-bit states one level down: '<name>/<key>/<sub key>'
            items = [(f"{key}/{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
            for k, v in items:
                if torch.is_tensor(v):
                    v = v.detach().contiguous().cpu()
                    if v.untyped_storage().data_ptr() in seen:  # one tensor for several parameters (bitsandbytes'
                        v = v.clone()                            # quantisation maps): safetensors stores each once
                    seen.add(v.untyped_storage().data_ptr())
                    tensors[f"{pname}/{k}"] = v
                else:
                    scalars[f"{pname}/{k}"] = v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _name_keyed(model, optimizer):
    """optimizer.state_dict() with parameter names instead of indices, the form
    torch.distributed.checkpoint gives for sharded models: {"state": {name: {...}}, "param_groups": [...]}."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    assert len(ids) == len(params), "optimizer state and parameter groups disagree"
    state = {names[id(p)]: sd["state"][i] for i, p in zip(ids, params) if i in sd["state"]}
    groups = [g | {"params": [names[id(p)] for p in og["params"]]}
              for g, og in zip(sd["param_groups"], optimizer.param_groups)]
    return {"state": state, "param_groups": groups}


def _saved_by_name(ckpt_dir, state, current):
    """optimizer.safetensors + state.json's scalars as {param name: {key: value}} and the saved
    param groups (betas as tuples), after checking they cover exactly the parameter names `current`."""
    tensors = _load_tensors(Path(ckpt_dir) / "optimizer.safetensors")
    saved = state["optimizer"]
    saved_names = [n for g in saved["param_groups"] for n in g["params"]]
    if sorted(current) != sorted(saved_names):
        raise UserError(f"{ckpt_dir}: the optimizer was saved for other parameters "
                         f"(not saved: {sorted(set(current) - set(saved_names))[:5]}, "
                         f"not in this model: {sorted(set(saved_names) - set(current))[:5]})")
    by_name = {}
    for key, value in list(tensors.items()) + list(saved["scalars"].items()):
        pname, skey = key.split("/", 1)  # (parameter names have dots, never slashes)
        entry = by_name.setdefault(pname, {})
        if "/" in skey:  # a nested state (bitsandbytes'): back one level down
            skey, sub = skey.split("/", 1)
            entry = entry.setdefault(skey, {})
            skey = sub
        entry[skey] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved["param_groups"]]
    return by_name, groups


def gather_sharded(model, optimizer=None):
    """The full model and optimizer state of an FSDP-sharded model, on the CPU of rank 0, for
    save_checkpoint(..., gathered=...): checkpoints of sharded runs are the same single directory as
    any other, so they resume on any world size, sharded or not.

    A collective: every rank must call it (the others get None back). The optimizer state comes
    keyed by parameter name, as optimizer.safetensors stores it.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # one rank's RAM, not one GPU's
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return (msd, osd) if dist.get_rank() == 0 else None


def restore_optimizer_sharded(model, optimizer, ckpt_dir, state):
    """Load optimizer.safetensors into the optimizer of an FSDP-sharded model (any saved world size).

    A collective: every rank calls it. Rank 0 reads the file and broadcasts, so a node holds one copy
    of the full optimizer state in RAM rather than one per rank.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    osd = {}
    if dist.get_rank() == 0:
        current = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]
        by_name, groups = _saved_by_name(ckpt_dir, state, current)
        # the saved groups say which names go together; the hyperparameters are the config's, as above
        groups = [sg | {k: v for k, v in g.items() if k != "params"} for sg, g in zip(groups, optimizer.param_groups)]
        osd = {"state": by_name, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def restore_optimizer(model, optimizer, ckpt_dir, state):
    """Load optimizer.safetensors into an optimizer built over the same parameters (any world size).

    Only the per-parameter state (moments, step counts, momentum buffers) comes back. The groups'
    hyperparameters (learning rates and their scales, weight decay, betas, Muon's momentum) stay
    those the optimizer was built with from the current config: torch's load_state_dict would bring
    back the saved ones, silently undoing a change the resume printed."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    current = [names[id(p)] for p in params]
    by_name, groups = _saved_by_name(ckpt_dir, state, current)
    sd = optimizer.state_dict()  # its param_groups hold the config's hyperparameters: they stay
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    sd["state"] = {i: by_name[n] for i, n in zip(ids, current) if n in by_name}
    optimizer.load_state_dict(sd)


# ----------------------------------------------------------------------------- saving

def _file_record(path, hash_files=True):
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path) if hash_files else None}


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, a lost mount): the previous one is untouched."""


def save_checkpoint(out_dir, state, model, optimizer=None, trainable_only=False, is_best=False, keep_last_n=3,
                    gathered=None, hash_files=True):
    """Write ckpt-<iter> atomically, point latest (and best when is_best) at it, prune old ones.

    state: the JSON-able rest (must hold iter_num). gathered: gather_sharded's result for an
    FSDP-sharded model (then only rank 0 calls this). hash_files=False records sizes only, no
    sha256: reading every file back costs seconds per GB, which a save on the way out of a
    SIGTERM'd run may not have (torchrun kills its workers 30 s after forwarding the signal).
    Returns the checkpoint's path.
    """
    full_sd, full_osd = gathered if gathered is not None else (None, None)
    out_dir = Path(out_dir)
    tensors = model_tensors(model, trainable_only, full_sd)
    check_finite(tensors, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{CKPT_PREFIX}*.tmp-*"):  # debris of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{CKPT_PREFIX}{state['iter_num']:07d}"
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    final = out_dir / name
    try:
        tmp.mkdir()
        files = {}
        save_file(tensors, str(tmp / "model.safetensors"))
        files["model.safetensors"] = _file_record(tmp / "model.safetensors", hash_files)
        state = dict(state, format_version=FORMAT_VERSION, trainable_only=trainable_only,
                     versions=library_versions())
        if optimizer is not None:
            tensors, rest = optimizer_tensors(model, optimizer, full_osd)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            files["optimizer.safetensors"] = _file_record(tmp / "optimizer.safetensors", hash_files)
            state["optimizer"] = rest
        state["files"] = files
        write_json(tmp / "state.json", state)
        fsync_dir(tmp)
        if final.exists():  # the same iteration saved again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(out_dir)
        pointer = {"checkpoint": name, "iter_num": state["iter_num"]}
        write_json(out_dir / "latest.json", pointer)
        if is_best:
            write_json(out_dir / "best.json", pointer | {"val_loss": state.get("best_val_loss")})
    except (OSError, SafetensorError) as e:
        # a full disk surfaces as OSError from our own writes, but as SafetensorError ("IoError ...
        # StorageFull") from inside safetensors' writer
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(f"saving checkpoint {final} failed: {e}. The previous checkpoint (latest.json) is "
                         f"untouched; free disk space (then the same command with --init_from=resume, or "
                         f"auto_resume, continues) or pick another out_dir") from e
    prune(out_dir, keep_last_n, name)
    return final


def check_finite(tensors, out_dir):
    """Refuse to save weights holding inf or NaN: a diverged run must not put them behind latest.json,
    nor let keep_last_n prune the last finite checkpoints to make room for them."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        last = _pointer_or_none(Path(out_dir) / "latest.json")
        raise SaveFailed(f"not saving a checkpoint: {len(bad)} weight tensor(s) hold inf or NaN ({', '.join(bad[:3])}): "
                         f"the run diverged. The last finite checkpoint ({last or 'none yet'}) is untouched; resume from "
                         f"it with a lower learning_rate, bfloat16 or float32, or check the data")


def prune(out_dir, keep_last_n, saved):
    """Delete all but the newest keep_last_n checkpoints up to the one just saved; never the ones latest
    or best point to, nor any newer than `saved` (left by a run resumed from an older one: a user's to
    keep or remove)."""
    if keep_last_n <= 0:
        return
    keep = {_pointer_or_none(out_dir / p) for p in ("latest.json", "best.json")}
    older = [p.name for p in checkpoint_dirs(out_dir) if p.name <= saved][::-1]  # oldest first
    for name in older[:-keep_last_n]:
        if name not in keep:
            shutil.rmtree(Path(out_dir) / name)


def library_versions():
    import numpy
    import safetensors
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__}


# ----------------------------------------------------------------------------- loading

def _read_pointer(path):
    """The checkpoint name a pointer file holds, or None when there is none. A damaged pointer is
    a UserError that lists the intact checkpoints beside it."""
    if not path.exists():
        return None
    try:
        name = json.loads(path.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged pointer file ({type(e).__name__}: {e}); a resume finds the newest "
                         f"intact checkpoint without it{_intact_hint(path.parent, None)}") from e
    if not isinstance(name, str) or not name.startswith(CKPT_PREFIX) or "/" in name:
        raise UserError(f"{path}: damaged pointer file (checkpoint {name!r} is no {CKPT_PREFIX}NNNNNNN name); a resume "
                         f"finds the newest intact checkpoint without it{_intact_hint(path.parent, None)}")
    return name


def resolve(path, which="latest"):
    """A checkpoint directory from a run's out_dir (its latest or best; best falls back to latest in a
    run that never evaluated) or a checkpoint directory itself."""
    if which not in ("latest", "best"):
        raise UserError(f"which={which!r}: a run's checkpoint is 'latest' or 'best'")
    path = Path(path)
    if (path / "state.json").exists():
        return path
    if which == "best" and not (path / "best.json").exists():
        which = "latest"
    name = _read_pointer(path / f"{which}.json")
    if name is None:
        if checkpoint_dirs(path):  # a crash between a checkpoint's rename and its pointer, or a deleted pointer
            return newest_intact(path, verify=False)[0]
        hint = ""
        if (path / "ckpt.pt").exists():
            hint = f"; {path / 'ckpt.pt'} is a nanoGPT checkpoint: python convert_nanogpt.py --ckpt={path / 'ckpt.pt'}"
        raise MissingFile(f"no checkpoint in {path}: expected {which}.json or state.json{hint}")
    return path / name


def newest_intact(out_dir, verify=True):
    """(checkpoint dir, state, skipped) of the newest checkpoint in out_dir whose files check out
    (sizes, and with verify their sha256), found by scanning the ckpt-* directories rather than
    trusting latest.json; skipped lists (name, why) of the newer ones passed over. A UserError
    naming every one when none is intact."""
    skipped = []
    for ckpt in checkpoint_dirs(out_dir):
        try:
            return ckpt, _validated_state(ckpt, verify), skipped
        except (ValueError, FileNotFoundError) as e:
            skipped.append((ckpt.name, str(e)))
    if not skipped:
        raise MissingFile(f"no checkpoint in {out_dir}: no {CKPT_PREFIX}* directory")
    raise UserError(f"no intact checkpoint in {out_dir}: " + "; ".join(f"{n}: {why}" for n, why in skipped)
                    + ". Nothing was changed; restore them from a copy, or train into another --out_dir")


def read_checkpoint(path, which="latest", verify=True):
    """(checkpoint dir, state dict) after checking the format version and every file's size and hash.
    When the checkpoint a pointer names is damaged or gone, the error lists the intact ones beside it."""
    ckpt = resolve(path, which)
    try:
        return ckpt, _validated_state(ckpt, verify)
    except (ValueError, FileNotFoundError) as e:
        if ckpt == Path(path):
            raise  # a directory named directly
        raise type(e)(f"{e}{_intact_hint(Path(path), ckpt)}") from e


def _validated_state(ckpt, verify):
    state_file = ckpt / "state.json"
    if not state_file.exists():
        raise MissingFile(f"{state_file}: missing; the checkpoint is incomplete")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{state_file}: corrupted JSON ({e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("files", {}), dict):
        raise UserError(f"{state_file}: not a checkpoint's state (damaged)")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{ckpt}: checkpoint format version {version!r}; this homegpt reads up to "
                         f"{FORMAT_VERSION}: upgrade homegpt to load it")
    for fname, rec in state.get("files", {}).items():
        f = ckpt / fname
        if not f.exists():
            raise MissingFile(f"{f}: missing from the checkpoint")
        size = f.stat().st_size
        if not isinstance(rec, dict) or size != rec.get("bytes"):
            raise UserError(f"{f}: {size:,} bytes, expected {rec.get('bytes') if isinstance(rec, dict) else rec}: "
                             f"truncated or corrupted")
        if verify and rec.get("sha256") is not None:  # None: saved in a hurry (SIGTERM), sizes only
            if file_sha256(f) != rec["sha256"]:
                raise UserError(f"{f}: sha256 mismatch: the file is corrupted")
    return state


def _intact_hint(out_dir, damaged):
    """Where to go from a damaged checkpoint: the others in out_dir whose files have their recorded
    sizes (hashes are checked when one is loaded), newest first."""
    intact = []
    for ckpt in (p for p in checkpoint_dirs(out_dir) if p != damaged):
        try:
            state = _validated_state(ckpt, verify=False)
        except (ValueError, FileNotFoundError):
            continue
        intact.append(f"{ckpt.name} (iteration {state.get('iter_num')})")
    if not intact:
        return f"\nno other checkpoint in {out_dir} is intact"
    first = intact[0].split()[0]
    return (f"\nintact beside it: {', '.join(intact)}. Resume from one with --init_from=resume "
            f"--resume_from={first} (train.py), or read it with --out_dir={out_dir / first} (sample.py, eval.py, "
            f"export_hf.py)")


def _load_tensors(path):
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise  # gone, not damaged: a live run pruned it (load_model reads the pointer again)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read safetensors ({e})") from e


def restore_model(model, ckpt_dir, state):
    """Load model.safetensors into model (whole, or the trained parameters of a fine-tune)."""
    sd = clean_state_dict(_load_tensors(Path(ckpt_dir) / "model.safetensors"))
    model = unwrap(model)
    if state.get("trainable_only"):
        lora.load_trainable_state_dict(model, sd)
        return
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if model.config.tie_weights:
        missing = [k for k in missing if k != "transformer.wte.weight"]
    if missing or unexpected:
        raise UserError(f"{ckpt_dir}/model.safetensors does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------- resuming

def save_run(run, is_best=False, hash_files=True):
    """A checkpoint of a training run (train.Run): what state.json records of it is defined here.
    Every rank calls this (gathering data positions and FSDP shards are collectives); rank 0 writes."""
    gathered = gather_sharded(run.model, run.optimizer) if run.fsdp else None
    sampler_ranks = gather_objects(run.sampler.state_dict(), run.dist)
    run.saved_at = run.iter_num
    error = _write_run(run, is_best, hash_files, gathered, sampler_ranks) if run.dist.is_master else None
    # every rank learns whether rank 0's write failed, and stops with it, instead of waiting on it
    error = broadcast_object(error, run.dist)
    if error:
        raise SaveFailed(error)


def _write_run(run, is_best, hash_files, gathered, sampler_ranks):
    """Rank 0's half of save_run: the state and the files. Returns None, or why the write failed."""
    state = {"iter_num": run.iter_num, "tokens_seen": run.tokens_seen,
             "best_val_loss": run.best_val if math.isfinite(run.best_val) else None,
             "best_iter": run.best_iter, "evals_since_best": run.evals_since_best,
             "config": dataclasses.asdict(run.cfg) | {"init_from": run.origin, "resume_from": ""},
             "model_args": dataclasses.asdict(run.model.config), "sampler": sampler_ranks[0],
             "sampler_ranks": sampler_ranks, "rng": rng_state(),
             "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
             "wandb_run_id": run.wandb_id, "data_meta": run.data_meta, "base": run.base}
    try:
        path = save_checkpoint(run.cfg.out_dir, state, run.model, run.optimizer, trainable_only=run.partial,
                               is_best=is_best, keep_last_n=run.cfg.keep_last_n, gathered=gathered,
                               hash_files=hash_files)
    except SaveFailed as e:
        return str(e)
    print0(f"saved checkpoint to {path}")
    return None


def restore_run(run, ckpt_dir, state):
    """Bring back into a training run everything that shapes its next step: optimizer
    state, scaler, each rank's data position, RNG states and counters. The optimizer's
    hyperparameters stay the config's."""
    if run.fsdp:
        restore_optimizer_sharded(run.model, run.optimizer, ckpt_dir, state)
    else:
        restore_optimizer(run.model, run.optimizer, ckpt_dir, state)
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if state.get("sampler") and state.get("rng"):
        sampler_state = rank_sampler_state(state, run.dist.rank)
        if sampler_state is not None:
            run.sampler.load_state_dict(sampler_state)
        else:
            print(f"resume: rank {run.dist.rank} has no saved data position (the run had fewer ranks); "
                  f"it starts its own random stream afresh", flush=True)
        set_rng_state(state["rng"])
    else:  # e.g. converted from nanoGPT, which does not record them
        print0("resume: the checkpoint has no data position or RNG state; sampling starts afresh")
    run.iter_num, run.tokens_seen = state["iter_num"], state["tokens_seen"]
    run.best_val = state["best_val_loss"] if state["best_val_loss"] is not None else float("inf")
    run.best_iter, run.evals_since_best = state.get("best_iter"), state.get("evals_since_best", 0)
    run.wandb_id = state.get("wandb_run_id")
    run.saved_at = run.iter_num


def read_for_resume(out_dir, resume_from, dist_info):
    """(checkpoint dir, state) a run resumes from: out_dir's newest intact checkpoint (resume_choice),
    or resume_from (a ckpt-NNNNNNN name inside out_dir, or a path). Every rank calls this. Rank 0 alone reads every file back to
    check its hash; the others take its verdict and the checkpoint it chose, read that checkpoint's
    state.json, and all ranks confirm they see it: on several nodes out_dir must be a shared filesystem."""
    where = Path(out_dir)
    if resume_from:
        named = Path(resume_from)
        where = named if named.is_absolute() or named.parent != Path(".") else where / named
    chosen, state = None, None
    if dist_info.is_master:
        try:
            ckpt_dir, state = read_checkpoint(where) if resume_from else resume_choice(where)
            chosen = str(ckpt_dir)
        except (ValueError, FileNotFoundError) as e:
            broadcast_object(f"error: {e}", dist_info)  # the others stop with rank 0, instead of waiting
            raise
    chosen = broadcast_object(chosen, dist_info)
    if chosen.startswith("error: "):
        raise UserError(chosen[len("error: "):])
    if not dist_info.is_master:
        try:
            ckpt_dir, state = read_checkpoint(chosen, verify=False)  # rank 0 checked the hashes
        except (ValueError, FileNotFoundError):
            ckpt_dir = None
    blind = [r for r, ok in enumerate(gather_objects(state is not None, dist_info)) if not ok]
    if blind:
        raise UserError(f"rank(s) {blind} cannot read {chosen}, which rank 0 resumes from: on several nodes, "
                         f"out_dir must be on a filesystem every node shares (NFS, Lustre, ...), or the checkpoint "
                         f"copied to the same path on each node")
    return ckpt_dir, state


def resume_choice(out_dir):
    """The checkpoint a resume continues from: the newest one in out_dir whose every file has its
    recorded size and sha256, found by scanning ckpt-* (latest.json may be missing after a crash between
    a checkpoint's rename and its pointer, or damaged). Newer ones that fail the check are skipped, each
    named with the reason, and left where they are: nothing is deleted."""
    ckpt_dir, state, skipped = newest_intact(out_dir)
    for name, why in skipped:
        print(f"resume: skipping {name}, which is damaged ({why.splitlines()[0]})", flush=True)
    pointer = Path(out_dir) / "latest.json"
    pointed = _pointer_or_none(pointer)
    if pointer.exists() and pointed is None:
        print(f"resume: {pointer} is damaged; the newest intact checkpoint is {ckpt_dir.name}", flush=True)
    elif pointed not in (None, ckpt_dir.name) and not skipped:
        print(f"resume: latest.json names {pointed}, but {ckpt_dir.name} is newer and intact: resuming from it",
              flush=True)
    return ckpt_dir, state


def latest_name(out_dir):
    """The checkpoint latest.json names, or None (no pointer, or a damaged one)."""
    return _pointer_or_none(Path(out_dir) / "latest.json")


def _pointer_or_none(path):
    """A pointer's checkpoint name, or None when it is missing or damaged (resume_choice does not need it)."""
    try:
        return _read_pointer(path)
    except UserError:
        return None


def rank_sampler_state(state, rank):
    """The data position this rank resumes from: its own when the checkpoint has one. A run saved
    with fewer ranks has none for the extra ranks: they share the sequential sampler's global cursor,
    or start a random stream afresh (None), since a rank that copied rank 0's stream would read
    exactly rank 0's windows."""
    ranks = state["sampler_ranks"]
    if rank < len(ranks):
        return ranks[rank]
    return None if state["sampler"].get("kind") == "random" else state["sampler"]
