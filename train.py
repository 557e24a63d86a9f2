"""
Train or fine-tune a GPT: one process, or many under torchrun (DDP, or FSDP with --fsdp=True).

    python train.py config/train_shakespeare_char_cpu.py
    python train.py config/train_shakespeare_char_cpu.py --n_layer=2 --max_iters=100 --out_dir=out-try
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    python train.py --help                   # every key, its default and what it does

main() reads top to bottom in phases: runtime -> the checkpoint to resume -> data and model ->
optimizer and restored state -> the loop. The loop: learning rate -> evaluate / checkpoint -> stop?
-> micro-steps, clip and step -> log. Checkpoints resume exactly (init_from='resume'); SIGTERM or
Ctrl-C finishes the current step, saves and exits.
"""

import dataclasses
import functools
import gc
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional, Union

import numpy as np
import torch

import configurator
from homegpt import autobatch, evaluation, memory, runs, weights
from homegpt import checkpoint as ckpt_lib
from homegpt.config_checks import check_config, check_resume, resolve_start
from homegpt.dataloader import RandomSampler, SequentialSampler, resolve_data_dir, to_device
from homegpt.errors import UserError
from homegpt.hardware import peak_flops
from homegpt.optimizers import make_optimizer
from homegpt.prepare_text import prepare_shipped
from homegpt.rundata import batches, open_data
from homegpt.runtime import (Dist, StopFlag, autocast, barrier, close_distributed, init_distributed, make_scaler, pick_dtype,
                             print0, seed_everything, setup_backends, shard_model, step_seed, wrap_for_training)
from model import GPT, GPTConfig


@dataclass
class TrainConfig(GPTConfig):
    # (the model's keys come first: every GPTConfig field of model.py, e.g. --n_layer=6 --qk_norm=True;
    # ignored when starting from pretrained weights, and a resume refuses a change of shape)
    vocab_size: int = 0  # 0 = the dataset's (meta.json), else e.g. 50304 (GPT-2's padded to a multiple of 64)
    # I/O
    out_dir: str = "out"  # checkpoints and metrics.jsonl go here
    eval_interval: int = 2000  # evaluate (and maybe checkpoint) every this many iterations
    log_interval: int = 1  # print and append to metrics.jsonl every this many iterations
    eval_iters: int = 200  # batches of the fixed validation set per evaluation; 0 = the whole split
    eval_only: bool = False  # evaluate once and exit
    initial_eval: bool = True  # evaluate at iteration 0, before training (False: a timed run skips it)
    always_save_checkpoint: bool = True  # save at each evaluation; False = only when val improved (and at the end)
    early_stop_patience: int = 0  # stop once val has not improved for this many evaluations in a row; 0 = off
    save_interval: int = 0  # also save every this many iterations, independent of evaluation; 0 = off
    keep_last_n: int = 3  # checkpoints kept besides latest and best
    init_from: str = "scratch"  # 'scratch' | 'resume' | 'gpt2[-medium|-large|-xl]' | HF dir | one of our runs
    # True: when out_dir holds a checkpoint, resume it (as init_from='resume'), else start as init_from says;
    # the same command then continues a crashed run (a shell loop, torchrun --max-restarts, SLURM --requeue)
    auto_resume: bool = False
    resume_from: str = ""  # with init_from='resume': a checkpoint (ckpt-NNNNNNN in out_dir, or a path) instead of latest
    base_dir: str = ""  # a LoRA / 1-D run whose base run moved: where it is now (it must hold the checkpoint trained on)
    overwrite: bool = False  # a new run into an out_dir holding one deletes its checkpoints and metrics
    seed: int = 1337
    max_bad_steps: int = 10  # stop (with a checkpoint) after this many non-finite steps in a row
    # wandb (optional, imported only when on)
    wandb_log: bool = False
    wandb_project: str = "homegpt"
    wandb_run_name: str = "run"
    # data
    dataset: str = "shakespeare_char"  # a folder under data/
    data_dir: str = ""  # '' = data/<dataset>; else any prepared directory (e.g. FineWeb shards)
    sampling: str = "random"  # 'random' windows (nanoGPT) or 'sequential' (every window once per epoch)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, summed over all ranks
    # sequences per micro-step per rank; 'auto' = the fastest micro-batch that fits (plan.py's search at
    # start-up), the accumulation adapting so the tokens per step stay those of the config's batch_size
    batch_size: Union[int, Literal["auto"]] = 12
    # supervised fine-tuning on JSONL (instead of token files)
    sft_train_file: str = ""  # Alpaca or prompt/completion JSONL; '' = pretraining on token files
    sft_val_file: str = ""  # JSONL for validation loss (on completions only)
    sft_template: str = ""  # prompt template with {instruction} and {input}; '' = Alpaca's
    sft_packing: bool = False  # pack several examples per row instead of padding
    # memory and speed of the model's computation
    fast_dropout: bool = True  # on a CPU, model.py's fast dropout masks and written-out attention; False = torch's kernels
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # fine-tuning a part of the model
    lora_rank: int = 0  # 0 disables LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "attn"  # 'attn' (c_attn, attention c_proj) or 'all' linear layers of the blocks
    train_1d_only: bool = False  # train only biases and LayerNorm gains
    base_dtype: str = "float32"  # storage of the frozen base under LoRA: 'float32' or 'bfloat16'
    # the frozen base's block matmuls quantised by bitsandbytes (quant.py), under LoRA or train_1d_only:
    # '' = float, 'int8' (LLM.int8, 1 byte per weight), 'nf4' (QLoRA's 4-bit NormalFloat)
    base_quant: str = ""
    # optimizer
    # 'adamw', 'adamw8bit' (bitsandbytes; on a CPU 0.50+) or 'muon': torch.optim.Muon for the blocks' matrices at
    # muon_lr, AdamW at learning_rate for embeddings, lm_head, biases and gains (both on the schedule)
    optimizer: str = "adamw"
    learning_rate: float = 6e-4
    muon_lr: float = 0.02  # optimizer='muon' only: the peak learning rate of the matrices
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # decoupled, per step: lr * muon_weight_decay
    max_iters: int = 600000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # learning rate schedule: linear warmup, then cosine decay to min_lr ('cosine'), or warmup-stable-decay
    # ('wsd': constant learning_rate, then linear to min_lr over the last cooldown_frac of lr_decay_iters)
    decay_lr: bool = True  # False = constant learning_rate from the first step, no warmup (as nanoGPT)
    lr_schedule: str = "cosine"  # 'cosine' or 'wsd'
    cooldown_frac: float = 0.2  # 'wsd': the share of lr_decay_iters spent cooling down linearly to min_lr
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000  # ~ max_iters (Chinchilla)
    min_lr: float = 6e-5  # ~ learning_rate / 10 (Chinchilla)
    # system
    backend: str = "auto"  # torchrun process group: auto = nccl on CUDA, gloo on CPU; or 'nccl' / 'gloo'
    # under torchrun, a rank that does not answer a collective for this long (hung, stopped, cut off) ends the
    # job, so torchrun --max-restarts can restart it; long enough for rank 0's evaluations and saves
    dist_timeout_s: float = 600.0
    fsdp: bool = False  # under torchrun, shard weights, gradients and optimizer states across ranks (FSDP) instead of DDP
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = bfloat16 where native, float16 (+GradScaler) on older GPUs, else float32
    ignore_memory_estimate: bool = False  # start even where the printed memory estimate says it does NOT fit
    compile: bool = False  # torch.compile the model (turned off, with the reason printed, where it cannot work)

    def __post_init__(self):
        """Not GPTConfig's check: check_config reports every problem of every key at once, as one error."""


# ----------------------------------------------------------------------------- pure functions

def get_lr(it, cfg):
    """Linear warmup (non-zero at step 0), then cosine decay from learning_rate to min_lr at
    lr_decay_iters; or, with lr_schedule='wsd' (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hägele
    et al. 2024), learning_rate held until the cool-down, which falls linearly to min_lr over the last
    cooldown_frac of lr_decay_iters. decay_lr=False is a constant learning_rate with no warmup (nanoGPT)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown = max(1, round(cfg.cooldown_frac * cfg.lr_decay_iters))
        start = max(cfg.warmup_iters, cfg.lr_decay_iters - cooldown)
        if it < start:
            return cfg.learning_rate
        return cfg.learning_rate + (it - start) / max(1, cfg.lr_decay_iters - start) * (cfg.min_lr - cfg.learning_rate)
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- one optimizer step

class Step(NamedTuple):
    loss: torch.Tensor  # mean loss over every target token of the step on all ranks (on the device)
    norm: torch.Tensor  # gradient norm before clipping
    stepped: bool  # False: skipped (non-finite loss or gradient; under fp16 the scaler may skip too)
    finite: bool  # the loss was finite
    tokens: int  # tokens computed in the step on all ranks (an SFT batch's padding included)
    stop: bool  # some rank was asked to stop (SIGTERM, Ctrl-C) during the step


def train_step(model, optimizer, scaler, batches, ctx, grad_clip, dist_info, device, stop=None):
    """One optimizer step over micro-batches [(x, y), ...] of this rank; returns a Step. stop: a
    function saying whether this rank was asked to stop, read once the micro-steps are done.

    The loss is the sum of token losses over every micro-batch of every rank divided by the global
    number of target tokens, so uneven masks (SFT) weigh every token alike however the batch is
    split. One host sync, at the end; under torchrun, two all-reduces: the target and
    token counts before the micro-steps, the loss and the stop requests after them, so every rank
    takes the same skip and stop decisions.
    """
    n_targets = torch.stack([(y != -1).sum() for _, y in batches]).sum()  # int64: exact at any size
    tokens = torch.tensor(sum(x.numel() for x, _ in batches), device=device)
    if dist_info.enabled:
        import torch.distributed as dist
        counts = torch.stack([n_targets, tokens])
        dist.all_reduce(counts)
        n_targets, tokens = counts[0], counts[1]
    scale = dist_info.world_size / n_targets.to(torch.float32)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(batches):
        if ddp:  # sync gradients on the last micro-step only; set before the forward
            model.require_backward_grad_sync = micro == len(batches) - 1
        # (FSDP reduce-scatters after every micro-step: skipping it would keep whole unsharded
        # gradients between micro-steps, the memory FSDP is there to save)
        with ctx:
            loss = model(x, y, reduction="sum")[1]  # the (B, T, V) logits are not kept: freed here
        # DDP and FSDP average gradients over ranks: scale by world_size so the result is the global sum / n
        loss = loss * scale
        scaler.scale(loss).backward()
        loss_sum += loss.detach() / dist_info.world_size  # this rank's share of the global mean
        del loss
    stops = torch.tensor(float(bool(stop and stop())), device=device)
    if dist_info.enabled:
        # the global mean loss on every rank (a NaN on any rank makes it non-finite on all of them),
        # and how many ranks were asked to stop
        flags = torch.stack([loss_sum, stops])
        dist.all_reduce(flags)
        loss_sum, stops = flags[0], flags[1]
    scaler.unscale_(optimizer)  # clip real gradients, not scaled ones; a no-op without fp16
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor, the same global norm on every rank
        norm = norm.full_tensor()
    wide = torch.float32 if device.type == "mps" else torch.float64  # token counts stay exact in float64
    no_targets, finite_loss, finite_norm, stop_all, n_tokens = torch.stack([t.to(wide) for t in (
        n_targets == 0, torch.isfinite(loss_sum), torch.isfinite(norm.to(loss_sum.device)), stops > 0, tokens)]).tolist()
    if no_targets:
        optimizer.zero_grad(set_to_none=True)
        raise UserError("an optimizer step has no target tokens: every example is masked out")
    stepped = bool(finite_loss and (scaler.is_enabled() or finite_norm))
    if stepped:
        scaler.step(optimizer)  # with fp16 the scaler itself skips a step whose gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return Step(loss_sum, norm, stepped, bool(finite_loss), int(n_tokens), bool(stop_all))


def set_lr(optimizer, lr):
    """Every group at lr times its lr_scale (Muon's matrices: muon_lr on the same schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ----------------------------------------------------------------------------- the run's state (saved and restored by checkpoint.save_run / restore_run)

@dataclass
class Run:
    """What the loop and its helpers share: the pieces of the run and the counters a checkpoint records."""
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    ctx: object  # the autocast context of the forward passes
    model: GPT  # the plain module: saved and evaluated
    optimizer: object
    scaler: object
    sampler: object
    val_batches: object  # () -> validation batches, or None
    data_meta: dict
    origin: str  # where the weights came from: 'scratch', a GPT-2 name, a path
    base: Optional[str]  # the frozen base a partial checkpoint refers to
    partial: bool  # LoRA / 1-D: checkpoints hold the trained parameters only
    fsdp: bool
    iter_num: int = 0
    tokens_seen: int = 0
    best_val: float = float("inf")
    best_iter: Optional[int] = None  # the iteration of best_val
    evals_since_best: int = 0  # evaluations in a row without a better val loss (early_stop_patience)
    wandb_id: Optional[str] = None
    saved_at: Optional[int] = None  # the iteration of the last checkpoint written or resumed from


# ----------------------------------------------------------------------------- evaluation, metrics, signals

# ----------------------------------------------------------------------------- main, in phases

def open_runtime(cfg):
    """Phase 1: config checks (before any process group: a wrong value is one line, not a hang),
    the process group, device and precision. Returns (dist, device, dtype, fsdp)."""
    resolve_start(cfg)  # auto_resume: does this command resume out_dir's run?
    check_config(cfg, Dist(world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    dist_info, device = init_distributed(cfg.device, cfg.backend, cfg.dist_timeout_s)
    setup_backends(device)
    dtype = pick_dtype(cfg.dtype, device)
    fsdp = cfg.fsdp and dist_info.enabled
    if cfg.fsdp and not fsdp:
        print0("fsdp: off (one process: nothing to shard across; launch with torchrun --nproc_per_node=N)")
    if fsdp and dtype == torch.float16:
        raise UserError("fsdp=True with float16 is not supported (the GradScaler would check only this rank's "
                         "shard for overflow): use --dtype=bfloat16 (Ampere or newer) or float32, or fsdp=False")
    parallel = f" ({'FSDP' if fsdp else 'DDP'} over {torch.distributed.get_backend()})" if dist_info.enabled else ""
    print0(f"runtime: device={device}, dtype={str(dtype).replace('torch.', '')}, world_size={dist_info.world_size}"
           f"{parallel}, torch {torch.__version__}, numpy {np.__version__}")
    if cfg.batch_size != "auto":  # (else printed once the search has chosen)
        print_tokens_per_iter(cfg, dist_info, device)
    return dist_info, device, dtype, fsdp


def print_tokens_per_iter(cfg, dist_info, device):
    accum = cfg.gradient_accumulation_steps // dist_info.world_size
    print0(f"tokens per iteration: {cfg.gradient_accumulation_steps} accum x {cfg.batch_size} batch x "
           f"{cfg.block_size} block = {cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size:,} "
           f"({accum} micro-steps on each of {dist_info.world_size} rank(s))")
    if device.type == "cpu" and accum > 1:
        print0("note: gradient accumulation gives no speed-up on a CPU; a larger batch_size does the same math")


def resume_point(cfg, dist_info, device):
    """Phase 2: (checkpoint dir, state) to resume from, or (None, None) for a new run (whose out_dir
    is cleared first with overwrite=True)."""
    state, ckpt_dir = None, None
    if cfg.init_from == "resume":
        ckpt_dir, state = ckpt_lib.read_for_resume(cfg.out_dir, cfg.resume_from, dist_info)
        for k, (a, b) in check_resume(state["config"], cfg, ckpt_dir).items():
            if k == "activation":  # the model is rebuilt from the checkpoint's own arguments
                print0(f"resume: {k} stays the checkpoint's {a!r} (the config says {b!r})")
            else:
                print0(f"resume: {k} changed from {a!r} to {b!r}")
        print0(f"resuming from {ckpt_dir} at iteration {state['iter_num']}")
    elif cfg.overwrite and dist_info.is_master and not cfg.eval_only:
        doomed = runs.run_files(cfg.out_dir)
        if doomed:  # named before they go
            print0(f"overwrite: deleting the earlier run's {', '.join(p.name for p in doomed)} in {cfg.out_dir}")
            runs.delete_run_files(doomed)
    barrier(dist_info, device)
    return ckpt_dir, state


def build_run(cfg, dist_info, device, dtype, fsdp, ckpt_dir, state):
    """Phase 3: model (from scratch, a pretrained base or the checkpoint), its micro-batch, data,
    optimizer, and the checkpoint's state restored: the Run the loop trains."""
    seed_everything(cfg.seed)  # the same initial weights on every rank and every run
    origin = state["config"]["init_from"] if state else cfg.init_from
    meta_hint = state.get("data_meta") if state else None
    if origin != "scratch" and not meta_hint:
        meta_hint = weights.source_data_meta(origin)  # a fine-tune reads text with its base's tokenizer
    if not cfg.sft_train_file and dist_info.is_master:
        prepare_shipped(resolve_data_dir(cfg.data_dir, cfg.dataset))  # Tiny Shakespeare: one command to a model
    barrier(dist_info, device)
    data = open_data(cfg, meta_hint)  # every file checked before a model is built
    build_from, model_args = origin, None
    if state and not state.get("trainable_only"):  # the checkpoint holds every weight: no base to fetch
        build_from, model_args = "scratch", dict(state["model_args"], dropout=cfg.dropout)
    elif origin == "scratch":
        model_args = weights.scratch_model_args(cfg, data.meta)
    base = weights.repoint_base(state.get("base") if state else weights.base_reference(origin), cfg.base_dir)
    model, partial = weights.build_model(cfg, build_from, model_args, base=base)
    if cfg.batch_size == "auto":  # the search needs the model; the data then comes in the chosen batches
        model.to(device)
        cfg = autobatch.resolve_auto_batch(train_step, cfg, configurator.before_overrides(cfg, "batch_size"), model,
                                           device, dtype, dist_info)
        print_tokens_per_iter(cfg, dist_info, device)
    sampler, val_batches = batches(cfg, data, dist_info)
    if isinstance(sampler, (RandomSampler, SequentialSampler)):  # token files: their ids must fit the model
        sampler.data.check_vocab(model.config.vocab_size)
        sampler.vocab_size = model.config.vocab_size
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    print0(memory.budget_report(model, cfg.max_iters, tokens_per_iter, cfg.max_iters - (state or {}).get("iter_num", 0),
                                device, *peak_flops(device, dtype), dist_info.world_size))
    memory.check_training_memory(model, cfg, dtype, device, dist_info.world_size, fsdp, log=print0)
    model.to(device)
    if state:  # whole weights on every rank, before FSDP splits them
        ckpt_lib.restore_model(model, ckpt_dir, state)
    if fsdp:  # in place, before the optimizer, which must see the sharded parameters
        shard_model(model)
        print0(f"fsdp: {model.config.n_layer} blocks + root sharded over {dist_info.world_size} ranks")
    run = Run(cfg, dist_info, device, autocast(device, dtype), model, make_optimizer(model, cfg, device),
              make_scaler(device, dtype), sampler, val_batches, data.meta, origin, base, partial, fsdp)
    if state:
        ckpt_lib.restore_run(run, ckpt_dir, state)
    return run


def evaluate_and_save(run, metrics, lr, last_step, stop):
    """Validation loss (when there is validation data), then a checkpoint: at each evaluation with
    always_save_checkpoint, else when val improved; always at the last step, so a run ends with its
    last weights saved. best.json moves only on improvement. Returns True when a stop request
    (SIGTERM, Ctrl-C) cut the evaluation short: the loop then saves and leaves."""
    val, stopped = evaluation.validate(run, stop=lambda: stop.signum is not None)
    if stopped:
        print0(f"iter {run.iter_num}: evaluation cut short by the stop request")
        return True
    if val is not None and not math.isfinite(val):
        diverged(run, f"val loss {val} at iteration {run.iter_num}")
    improved = val is not None and val < run.best_val
    if val is not None:
        if improved:
            run.best_val, run.best_iter, run.evals_since_best = val, run.iter_num, 0
        elif run.iter_num > 0:  # (the evaluation before any training is no missed chance)
            run.evals_since_best += 1
        print0(f"iter {run.iter_num}: val loss {val:.4f}{' (best)' if improved else ''}")
        metrics.log({"iter": run.iter_num, "tokens": run.tokens_seen, "val_loss": val, "lr": lr})
    if run.iter_num > 0 and not run.cfg.eval_only and (improved or run.cfg.always_save_checkpoint or last_step
                                                      or early_stop(run)):
        ckpt_lib.save_run(run, is_best=improved)
    return False


def evaluate_and_checkpoint(run, metrics, lr, last_step, resumed_at, stop):
    """The loop's once-in-a-while phase: evaluate (and maybe save) every eval_interval, at the last step
    and with eval_only, but not again where the run resumed; save every save_interval too. Returns (the
    seconds spent evaluating, whether a stop request cut the evaluation short)."""
    cfg, t0, stopped = run.cfg, time.perf_counter(), False
    skip_initial = run.iter_num == 0 and not cfg.initial_eval and not last_step
    if cfg.eval_only or ((run.iter_num % cfg.eval_interval == 0 or last_step) and run.iter_num != resumed_at
                         and not skip_initial):
        stopped = evaluate_and_save(run, metrics, lr, last_step, stop)
    seconds = time.perf_counter() - t0
    if cfg.save_interval and run.iter_num % cfg.save_interval == 0 and 0 < run.iter_num != run.saved_at and not stopped:
        ckpt_lib.save_run(run)
    return seconds, stopped


def early_stop(run):
    """True once val has not improved for early_stop_patience evaluations in a row. Fine-tuning on
    small data overfits: val bottoms out and climbs while the train loss keeps falling."""
    return 0 < run.cfg.early_stop_patience <= run.evals_since_best


def report_early_stop(run, metrics):
    """Say why the run stops early and which weights to use: best.json's, or the ones it started from."""
    if run.best_iter:
        best = (f"the best, val {run.best_val:.4f} at iteration {run.best_iter}, is what best.json names and "
                f"what sample.py, eval.py and export_hf.py read; the last weights are in latest.json")
    else:  # iteration 0 is never saved: its weights are the ones the run started from
        best = (f"no iteration beat the weights the run started from (val {run.best_val:.4f} at iteration 0, "
                f"init_from={run.origin}): training made them worse, so keep using those, or lower "
                f"learning_rate; latest.json holds the last weights")
    print0(f"early stop at iteration {run.iter_num}: val has not improved for {run.evals_since_best} "
           f"evaluations (early_stop_patience={run.cfg.early_stop_patience}); {best} (a resume stops here "
           f"again unless the patience grows)")
    metrics.log({"iter": run.iter_num, "early_stop": True, "best_iter": run.best_iter, "best_val_loss": run.best_val})


def skipped_step(run, step, bad_steps, skipped):
    """A step with a non-finite loss or gradient was skipped: say so, and after max_bad_steps in a row
    save the last good weights and stop."""
    print0(f"iter {run.iter_num - 1}: non-finite loss or gradient ({step.loss.item():.4g}, norm "
           f"{step.norm.item():.4g}), step skipped ({bad_steps} in a row, {skipped} in all)")
    if bad_steps >= run.cfg.max_bad_steps:
        # skipped steps leave the weights alone: bad batches, and the weights are worth a checkpoint, unless
        # they compute non-finite numbers on validation data too (they diverged in the last step taken)
        val, _ = evaluation.validate(run)
        if val is not None and not math.isfinite(val):
            diverged(run, f"{bad_steps} non-finite steps in a row and val loss {val} at iteration {run.iter_num}")
        ckpt_lib.save_run(run)
        barrier(run.dist, run.device)
        raise SystemExit(f"stopping: {bad_steps} non-finite steps in a row at iteration {run.iter_num}. The "
                         f"last good weights are saved in {run.cfg.out_dir}; lower learning_rate, use bfloat16 or "
                         f"float32, or check the data")


def diverged(run, what):
    """Stop a run whose weights compute non-finite numbers, without saving them: latest.json keeps naming
    the last finite checkpoint, and keep_last_n prunes nothing for the diverged weights."""
    last = ckpt_lib.latest_name(run.cfg.out_dir)
    raise UserError(f"stopping: {what}: the run diverged, and its weights are not saved. The last finite "
                    f"checkpoint ({last or 'none yet'}) is untouched; resume from it with a lower learning_rate, "
                    f"bfloat16 or float32, or check the data")


def train_loop(run, runner, metrics, peak, stop):
    """Phase 4, the loop: learning rate -> evaluate / checkpoint -> stop? -> micro-steps, clip and
    step -> log. stop: the runtime.StopFlag that SIGTERM and Ctrl-C set."""
    cfg, dist_info, device = run.cfg, run.dist, run.device
    accum = cfg.gradient_accumulation_steps // dist_info.world_size  # micro-steps per rank
    resumed_at = run.saved_at  # evaluated and saved before the run stopped: not again
    step_flops = functools.lru_cache(maxsize=None)(run.model.flops_per_token)  # per token, by sequence length
    bad_steps, skipped, stopping = 0, 0, False
    log_loss, log_steps, log_tokens, log_flops = torch.zeros((), device=device), 0, 0, 0
    t_log = time.perf_counter()
    while True:
        # --- learning rate
        lr = get_lr(run.iter_num, cfg)
        set_lr(run.optimizer, lr)
        last_step = run.iter_num >= cfg.max_iters

        # --- evaluate and checkpoint (the log's ms/iter, tokens/s and MFU leave the evaluation's time out)
        seconds, interrupted = evaluate_and_checkpoint(run, metrics, lr, last_step, resumed_at, stop)
        t_log, stopping = t_log + seconds, stopping or interrupted

        # --- stop: end of schedule, eval_only, a signal (every rank learnt of it in the last step), or
        # early stopping (every rank holds the same val numbers)
        if early_stop(run) and not last_step and not cfg.eval_only:
            report_early_stop(run, metrics)
            return
        if last_step or cfg.eval_only or stopping:
            if stopping and run.saved_at != run.iter_num and run.iter_num > 0:  # (iteration 0 is the start's weights)
                ckpt_lib.save_run(run, hash_files=False)  # on the way out: sizes only, no read-back (torchrun waits 30 s)
            return

        # --- micro-steps, clip, step
        torch.manual_seed(step_seed(cfg.seed, dist_info.rank, run.iter_num))  # dropout masks resume exactly
        batches = [to_device(run.sampler.next_batch(), device) for _ in range(accum)]
        step = train_step(runner, run.optimizer, run.scaler, batches, run.ctx, cfg.grad_clip, dist_info, device,
                          stop=lambda: stop.signum is not None)
        run.iter_num += 1  # a skipped step still consumed its batches: the schedule and data move on
        run.tokens_seen += step.tokens
        stopping = step.stop
        log_tokens += step.tokens
        log_flops += sum(step_flops(x.size(1)) * x.numel() for x, _ in batches)  # this rank's
        if step.stepped or (run.scaler.is_enabled() and step.finite):  # (an fp16 overflow is no bad step)
            bad_steps = 0
            log_loss += step.loss
            log_steps += 1
        else:
            bad_steps, skipped = bad_steps + 1, skipped + 1
            skipped_step(run, step, bad_steps, skipped)

        # --- log: the mean loss over the interval (its one host sync), the tokens really computed
        if run.iter_num % cfg.log_interval == 0 and log_steps > 0:
            elapsed = time.perf_counter() - t_log
            dt, tps, mfu = elapsed / cfg.log_interval, log_tokens / elapsed, log_flops / elapsed / peak
            mean_loss = log_loss.item() / log_steps
            print0(f"iter {run.iter_num}: loss {mean_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, {tps:,.0f} tok/s, "
                   f"mfu {mfu * 100:.1f}%, eta {(cfg.max_iters - run.iter_num) * dt / 60:.1f} min")
            metrics.log({"iter": run.iter_num, "tokens": run.tokens_seen, "train_loss": mean_loss, "lr": lr,
                         "ms_per_iter": dt * 1000, "tokens_per_sec": tps, "mfu": mfu, "skipped_steps": skipped})
            log_loss.zero_()
            log_steps, log_tokens, log_flops, t_log = 0, 0, 0, time.perf_counter()


def main(cfg):
    dist_info, device, dtype, fsdp = open_runtime(cfg)
    owner = dist_info.is_master and not cfg.eval_only  # one training per out_dir: its lock, taken before any read
    new_dir = owner and not Path(cfg.out_dir).exists()
    if not cfg.eval_only:
        runs.claim_out_dir(cfg.out_dir, dist_info)
    try:
        return train_run(cfg, dist_info, device, dtype, fsdp)
    finally:
        if owner:  # given back, and an out_dir this run made but never wrote to removed (refused: nothing left)
            runs.release_out_dir(cfg.out_dir, remove_empty=new_dir)


def train_run(cfg, dist_info, device, dtype, fsdp):
    """Phases 2 to 4 of main: the resume point, the run, the loop; then the run's result."""
    ckpt_dir, state = resume_point(cfg, dist_info, device)
    if state and state["iter_num"] >= cfg.max_iters and not cfg.eval_only:
        print0(f"resume: {ckpt_dir} is at iteration {state['iter_num']}, max_iters={cfg.max_iters}: the run is "
               f"finished and nothing was trained; raise --max_iters to train on")
        close_distributed(dist_info)
        return {"iter_num": state["iter_num"], "best_val_loss": state["best_val_loss"]}
    run = build_run(cfg, dist_info, device, dtype, fsdp, ckpt_dir, state)
    runner = wrap_for_training(run.model, device, dist_info, fsdp, cfg.compile)
    wandb_run = None
    # eval_only holds no lock and may run beside the training that does: it never rewrites the run's files,
    # appending one line to metrics.jsonl when it evaluates this run's own checkpoint and writing nothing else
    log_metrics = dist_info.is_master and (not cfg.eval_only or state is not None)
    if dist_info.is_master and not cfg.eval_only:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if state:
            runs.trim_metrics(Path(cfg.out_dir) / "metrics.jsonl", run.iter_num)  # lines a crash left past it
        if cfg.wandb_log:
            import wandb
            wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg),
                                   id=run.wandb_id, resume="allow")
            run.wandb_id = wandb_run.id
    metrics = runs.MetricsFile(cfg.out_dir, log_metrics, wandb_run)
    stop = StopFlag()
    try:
        train_loop(run, runner, metrics, peak_flops(device, dtype)[0], stop)
    except RuntimeError as e:  # a collective that waited dist_timeout_s: one line, not a traceback per rank
        if dist_info.enabled and "timed out" in str(e).lower():
            raise SystemExit(f"error: rank {dist_info.rank} waited {cfg.dist_timeout_s:g} s for another rank that "
                             f"stopped answering (hung, stopped or cut off): {str(e).strip().splitlines()[0][-160:]}. "
                             f"The job stops; torchrun --max-restarts restarts it, and auto_resume=True continues "
                             f"from the last checkpoint") from e
        raise
    finally:
        stop.close()  # the signal handlers the process had before (it may go on: a test, a notebook)
        metrics.close()
    barrier(dist_info, device)  # no rank leaves while rank 0 still writes the final checkpoint
    result = {"iter_num": run.iter_num, "best_val_loss": run.best_val, "best_iter": run.best_iter,
              "early_stopped": early_stop(run)}
    if dist_info.enabled:
        # FSDP and DDP keep gloo work objects (holding tensors) alive in their hooks; freed after the
        # process group is gone they abort the interpreter at exit ("terminate called without an
        # active exception"), so they go first
        del runner, run
        gc.collect()
    close_distributed(dist_info)
    if stop.signum == signal.SIGINT:
        raise SystemExit(130)
    return result


if __name__ == "__main__":
    configurator.run(main, TrainConfig)
