"""
What train.py refuses before any work: every problem of a training config at once, as one UserError
(one line per problem), before a process group starts, a model is built or a file is written; and
what a command means for out_dir's run (auto_resume, a resume's changes).

    from homegpt.config_checks import check_config
    check_config(cfg, Dist(world_size=2))   # raises UserError("invalid configuration:\n  ...")

The model's own options are checked by GPTConfig.problems (model.py); the optimizer's name and its
library by optimizers.optimizer_problems; the rest is here, a function per concern.
"""

import dataclasses
import importlib.util
import math
import os
from pathlib import Path

from homegpt import runs, weights
from homegpt.errors import UserError
from model import COMPUTE, SHAPE, GPTConfig
from homegpt.optimizers import optimizer_problems
from homegpt.runtime import print0

# what a resume may not change: the weights' shapes, the data, the optimizer's kind
RESUME_FIXED = GPTConfig.fields_tagged(SHAPE) + GPTConfig.fields_tagged(COMPUTE) + (
    "lora_rank", "lora_targets", "train_1d_only", "base_quant", "sft_train_file", "dataset", "data_dir", "optimizer")


def check_config(cfg, dist_info):
    """All problems of a config at once, as a UserError, before any work (and before torchrun's
    process group starts, so that a wrong value is one line, not a hang)."""
    errors = (batch_problems(cfg, dist_info) + schedule_problems(cfg) + finetune_problems(cfg, dist_info)
              + optimizer_problems(cfg.optimizer, cfg.device) + check_sources(cfg))
    # the model's own checks of its options; its shape only matters for a model built here
    errors += cfg.problems(shape=cfg.init_from == "scratch")
    choices = {"sampling": ("random", "sequential"), "lora_targets": ("attn", "all"),
               "base_dtype": ("float32", "bfloat16"), "backend": ("auto", "nccl", "gloo"),
               "lr_schedule": ("cosine", "wsd")}
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            names = [repr(a) for a in allowed]
            errors.append(f"{k} must be {', '.join(names[:-1])} or {names[-1]}, got {getattr(cfg, k)!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        errors.append(f"dropout must be at least 0 and below 1, got {cfg.dropout}")
    if cfg.early_stop_patience > 0 and cfg.sft_train_file and not cfg.sft_val_file:
        errors.append("early_stop_patience needs validation data: set sft_val_file")
    if cfg.resume_from and cfg.init_from != "resume":
        errors.append(f"resume_from={cfg.resume_from!r} needs init_from='resume'")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        errors.append("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False")
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))


def batch_problems(cfg, dist_info):
    """The batch, its accumulation over ranks, and the intervals counted in steps."""
    errors = []
    if cfg.gradient_accumulation_steps % dist_info.world_size:
        errors.append(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                      f"{dist_info.world_size} ranks; use a multiple of {dist_info.world_size} (it is the total "
                      f"over all ranks, so the tokens per step stay what the config says)")
    if cfg.batch_size != "auto" and not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        errors.append(f"batch_size must be positive or 'auto', got {cfg.batch_size!r}")
    for k in ("block_size", "gradient_accumulation_steps", "eval_interval", "log_interval"):
        if getattr(cfg, k) <= 0:
            errors.append(f"{k} must be positive, got {getattr(cfg, k)}")
    if cfg.batch_size == "auto" and cfg.sft_train_file:
        errors.append("batch_size='auto' times token-file batches; an SFT run's padded examples need a number")
    if cfg.batch_size == "auto" and cfg.fsdp and dist_info.enabled:
        errors.append("batch_size='auto' times the whole model on each GPU, which FSDP exists to avoid: set a number "
                      "(python bench.py <config> --plan on one GPU gives an upper bound)")
    return errors


def schedule_problems(cfg):
    """Learning rates, the schedule's lengths and the optimizer's numbers."""
    errors = [f"{k} must be positive, got {getattr(cfg, k)}" for k in ("learning_rate",) if getattr(cfg, k) <= 0]
    errors += [f"{k} must be >= 0, got {getattr(cfg, k)}" for k in (
        "min_lr", "weight_decay", "grad_clip", "max_iters", "warmup_iters", "lr_decay_iters", "early_stop_patience",
        "save_interval", "keep_last_n") if getattr(cfg, k) < 0]
    if cfg.max_iters == 0 and not cfg.eval_only:
        errors.append("max_iters=0 trains nothing and saves nothing: give it a number of iterations, or evaluate with "
                      "--eval_only=True")
    if cfg.dist_timeout_s <= 0:
        errors.append(f"dist_timeout_s must be positive (seconds), got {cfg.dist_timeout_s}")
    errors += [f"{k} must be in [0, 1), got {getattr(cfg, k)}" for k in ("beta1", "beta2")
               if not 0.0 <= getattr(cfg, k) < 1.0]
    if not 0.0 < cfg.cooldown_frac <= 1.0:
        errors.append(f"cooldown_frac must be in (0, 1], got {cfg.cooldown_frac}")
    if cfg.optimizer == "muon" and cfg.muon_lr <= 0:
        errors.append(f"muon_lr must be positive with optimizer='muon', got {cfg.muon_lr}")
    return errors + range_problems(cfg)


# the other numeric keys' ranges (floats are finite already: configurator refuses inf and nan; the
# schedule's numbers and the model's are checked above)
RANGES = {"seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"), "eval_iters": (lambda v: v >= 0, ">= 0"),
          "max_bad_steps": (lambda v: v >= 1, ">= 1"), "vocab_size": (lambda v: v >= 0, ">= 0"),
          "lora_rank": (lambda v: v >= 0, ">= 0"), "lora_alpha": (lambda v: v > 0, "positive"),
          "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "muon_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
          "muon_weight_decay": (lambda v: v >= 0, ">= 0")}


def range_problems(cfg):
    """Numeric keys outside the values they can take (a negative seed, a dropout of 1 or more, inf or nan
    in a config built in Python rather than parsed, ...)."""
    errors = [f"{k} must be a finite number, got {v}" for k, v in dataclasses.asdict(cfg).items()
              if isinstance(v, float) and not math.isfinite(v)]
    return errors + [f"{k} must be {text}, got {getattr(cfg, k)}" for k, (ok, text) in RANGES.items()
                     if math.isfinite(getattr(cfg, k)) and not ok(getattr(cfg, k))]


def finetune_problems(cfg, dist_info):
    """LoRA, 1-D training, a quantised or bfloat16 base, and what FSDP can shard."""
    errors = []
    partial = cfg.lora_rank > 0 or cfg.train_1d_only
    if cfg.train_1d_only and cfg.base_dtype != "float32":
        errors.append("train_1d_only trains the biases inside the base's layers, which must then stay float32: "
                      "use base_dtype='float32'")
    if cfg.optimizer == "muon" and cfg.train_1d_only:
        errors.append("optimizer='muon' trains weight matrices, and train_1d_only has none: use optimizer='adamw'")
    if partial and cfg.init_from == "scratch":
        errors.append("LoRA / train_1d_only fine-tune a pretrained model: set init_from")
    if cfg.base_quant not in ("", "int8", "nf4"):
        errors.append(f"base_quant must be '' (a float base), 'int8' or 'nf4', got {cfg.base_quant!r}")
    elif cfg.base_quant:
        if not partial:
            errors.append(f"base_quant={cfg.base_quant!r} quantises a frozen base: train it with lora_rank > 0 or "
                          f"train_1d_only=True (a quantised weight cannot be trained itself)")
        if cfg.fsdp and dist_info.enabled:
            errors.append("base_quant with fsdp=True: FSDP cannot shard bitsandbytes' quantised weights; use DDP")
        if importlib.util.find_spec("bitsandbytes") is None:
            errors.append(f"base_quant={cfg.base_quant!r} needs bitsandbytes (0.50+ for a CPU): "
                          f"pip install 'bitsandbytes>=0.50'")
    if cfg.fsdp and dist_info.enabled:
        if cfg.optimizer != "adamw":
            errors.append("fsdp=True works with optimizer='adamw' only (bitsandbytes' 8-bit AdamW does not take sharded "
                          "parameters, and Muon orthogonalises whole matrices)")
        if cfg.base_dtype != "float32":
            errors.append("fsdp=True needs base_dtype='float32': FSDP shards a block's parameters together and "
                          "wants one dtype (sharding already divides the base's memory by the ranks)")
    return errors


def check_sources(cfg):
    """Problems with out_dir and init_from that the filesystem shows before anything runs."""
    errors, out = [], Path(cfg.out_dir)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)  # the part of the path already there
    if existing is not None and not existing.is_dir():
        errors.append(f"out_dir={cfg.out_dir}: {existing} is a file, not a directory: name another --out_dir")
    elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        errors.append(f"out_dir={cfg.out_dir}: {existing} cannot be written by this user (or is on a read-only "
                      f"filesystem): name another --out_dir")
    if (out / "state.json").exists():
        errors.append(f"out_dir={cfg.out_dir} is a checkpoint directory, not a run's out_dir: new checkpoints would "
                      f"nest inside it; use --out_dir={out.parent} --init_from=resume --resume_from={out.name}")
    elif cfg.init_from != "resume" and not cfg.overwrite and not cfg.eval_only and runs.holds_run(out):
        errors.append(f"out_dir={cfg.out_dir} already holds a run: continue it with --init_from=resume (or let the same "
                      f"command continue it: --auto_resume=True), start this one in another --out_dir, or pass "
                      f"--overwrite=True to delete its checkpoints and metrics")
    if cfg.init_from not in ("scratch", "resume"):
        context = weights.source_context(cfg.init_from)
        if context is not None and cfg.block_size > context:
            errors.append(f"block_size={cfg.block_size} exceeds the {context} positions of {cfg.init_from}: a pretrained "
                          f"model's context can only be cropped; use --block_size={context} or less")
    return errors


def check_resume(saved, cfg, ckpt_dir):
    """What a resume changes, {key: (checkpoint value, now)}, to be printed and then used; a UserError
    naming them when it changes what it may not (RESUME_FIXED: the model's shape, the data, the
    optimizer's kind)."""
    changed = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
               if k not in ("init_from", "resume_from", "overwrite") and k in saved and saved[k] != v}
    refused = {k: c for k, c in changed.items() if k in RESUME_FIXED}
    if refused:
        raise UserError(f"cannot resume {ckpt_dir} with a different model, data or optimizer: " + ", ".join(
            f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in refused.items()) + "; keep them as they were")
    return changed


def resolve_start(cfg):
    """auto_resume=True: when out_dir holds a checkpoint, this command resumes it (init_from='resume');
    where a run died before its first checkpoint, it starts afresh (overwrite). Under torchrun with
    --max-restarts and without auto_resume, a warning: the restarted command would be refused."""
    if cfg.auto_resume and cfg.init_from != "resume" and not cfg.eval_only:
        if runs.holds_checkpoint(cfg.out_dir):  # any ckpt-* directory: never deleted, resumed (or refused)
            print0(f"auto_resume: {cfg.out_dir} holds a run: resuming it (it started from init_from={cfg.init_from!r})")
            cfg.init_from = "resume"
        elif runs.holds_run(cfg.out_dir):  # metrics of a run that died before its first checkpoint
            print0(f"auto_resume: {cfg.out_dir} holds no checkpoint, only the metrics of a run that died before its "
                   f"first one: starting afresh")
            cfg.overwrite = True
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and not cfg.auto_resume and cfg.init_from != "resume":
        print0("warning: torchrun may restart this job (--max-restarts), but a restart of this command would be "
               "refused once out_dir holds a checkpoint: add --auto_resume=True so that it resumes")
