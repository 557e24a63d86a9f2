"""
Size a training run for the machine at hand before starting it: the micro-batch and accumulation,
the validation budget, the disk its checkpoints take, the ETA and the cost.

    python bench.py config/train_gpt2_chinchilla.py --plan
    python bench.py config/train_gpt2_chinchilla.py --plan --price_per_hour=0.40 --budget_hours=48
    python train.py config/train_gpt2_chinchilla.py --batch_size=auto   # the micro-batch search alone, at start-up

The plan reads the training config as train.py does and builds the run's model the way train.py
does (from scratch, or the pretrained base with its LoRA / 1-D training). Then, within calibration_s:
- it times train.train_step on random tokens at micro-batch 1, 2, 4, ... until one does not fit, then
  bisects to the largest that does, printing memory.py's estimate beside each measured peak. The
  optimizer steps at learning rate 0, so the weights are never changed by the search;
- the micro-batches that divide the config's sequences per optimizer step (per rank) and came within
  20% of the best tokens/s (3 at most) are timed again as whole iterations, in turns, for 15% of
  calibration_s; the fastest (within 10%, the larger) is chosen, and gradient accumulation keeps the
  tokens per step as configured. Its iterations are then timed one after another, as the training
  loop runs them, for another 15%: their median is the ETA's;
- it times forward passes of an evaluation batch and proposes eval_iters (and, if needed, a longer
  eval_interval) so validation stays under eval_share of the run's time.
Then the arithmetic: the checkpoint's bytes in their real dtypes times the number on disk at once,
against the free space of out_dir's filesystem (a shortfall is an error); the ETA, tokens per
parameter and cost; with budget_hours, the tokens and the Chinchilla-ratio model that fit.

What the ETA leaves out: torch.compile (the search runs eager: a compiled run is faster, so with
compile=True the ETA is an upper bound), data loading, checkpoint writes, DDP's gradient all-reduce
(with ranks > 1 each rank is assumed to step as fast as this device alone).
"""

import dataclasses
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import configurator
import memory
from errors import UserError
from runtime import (Dist, OverBudget, autocast, free_memory, is_oom, make_scaler, proc_status_bytes,
                     reset_peak_rss, synchronize)
from train import TrainConfig, make_optimizer, train_step

CONFIRM = 0.15  # then time whole iterations of the best candidates for this share of calibration_s
CHINCHILLA = 20  # tokens per parameter of a compute-optimal run (Hoffmann et al. 2022)


@dataclass
class PlanConfig(TrainConfig):
    # planning (bench.py --plan); every train.py key above is read as train.py reads it
    plan: bool = True  # plan a train.py run instead of benchmarking (bench.py --plan)
    calibration_s: float = 60.0  # time for the micro-batch search; no new micro-batch is tried after it
    eval_share: float = 0.05  # the most of the run's time validation may take
    ranks: int = 0  # processes of the run under torchrun (one GPU each); 0 = $WORLD_SIZE, else 1
    max_memory_gb: float = 0.0  # a micro-batch needing more counts as out of memory; 0 = 90% of the device
    price_per_hour: float = 0.0  # what the machine costs per hour: the plan prices the run
    budget_hours: float = 0.0  # > 0: the tokens, and the Chinchilla-ratio model, that fit in this many hours
    plan_file: str = "plan.json"  # the plan as JSON


# ----------------------------------------------------------------------------- the micro-batch search

def find_max_batch(try_batch, max_batch):
    """Largest batch size <= max_batch whose trial is "ok": 1, 2, 4, ... until the first failure, then a
    binary search between the last size that fitted and the first that did not. A failure other than
    out-of-memory (an error, or "time": the search's time is up) ends the search there.
    try_batch(b) returns a dict with "status". Returns (largest fitting size or 0, trials)."""
    trials = []

    def attempt(b):
        trials.append(try_batch(b))
        return trials[-1]["status"]

    good, bad, b = 0, None, 1
    while True:
        status = attempt(b)
        if status != "ok":
            bad = b
            break
        good = b
        if b >= max_batch:
            return good, trials  # everything up to the cap fitted
        b = min(2 * b, max_batch)
    if status != "oom":
        return good, trials
    while bad - good > 1:
        mid = (good + bad) // 2
        status = attempt(mid)
        if status == "ok":
            good = mid
        elif status == "oom":
            bad = mid
        else:
            break
    return good, trials


class MemoryGauge:
    """Peak memory of the training process: CUDA's allocator peak (every tensor, the model's included),
    or on a Linux CPU the resident high-water mark, counted from the RSS before the search plus the
    model already resident then. budget: the bytes a micro-batch may take in all."""

    def __init__(self, model, device, max_memory_gb):
        self.device = device
        tensors = list(model.parameters()) + list(model.buffers())  # a tied weight once
        self.held = sum(t.numel() * t.element_size() for t in tensors)  # resident already
        self.rss0 = proc_status_bytes("VmRSS") if device.type == "cpu" else None
        available = memory.device_memory(device)
        if max_memory_gb:
            self.budget = int(max_memory_gb * 2**30)
        elif available is None:
            self.budget = None
        else:  # a CPU's MemAvailable excludes the model already built; a GPU's total includes it
            self.budget = int(memory.FIT_MARGIN * (available + (self.held if device.type == "cpu" else 0)))

    def reset(self):
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.rss0 is not None and not reset_peak_rss():
            self.rss0 = None

    def peak(self):
        """Bytes at most since reset(), or None where that cannot be measured (macOS, MPS)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return None if self.rss0 is None else self.held + max(0, proc_status_bytes("VmHWM") - self.rss0)


def still_optimizer(model, cfg, device):
    """The run's optimizer (its kind and states: AdamW, 8-bit AdamW, or Muon + AdamW) at learning rate 0,
    so that timed steps cost what the run's cost and change no weight. (muon_lr=0 would build no Muon.)"""
    optimizer = make_optimizer(model, cfg, device)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return optimizer


def timed_step(model, optimizer, scaler, batches, ctx, grad_clip, device):
    """Seconds of one train.train_step over batches, the device synchronised before each clock read
    (CUDA work is asynchronous: PITFALLS 20)."""
    synchronize(device)
    t0 = time.perf_counter()
    train_step(model, optimizer, scaler, batches, ctx, grad_clip, Dist(), device)
    synchronize(device)
    return time.perf_counter() - t0


def random_batches(model, batch_size, block, n, device):
    """n (x, y) micro-batches of random tokens, already on the device: a step's time does not depend on them."""
    g = torch.Generator(device=device).manual_seed(batch_size)
    return [tuple(torch.randint(0, model.config.vocab_size, (batch_size, block), device=device, generator=g)
                  for _ in range(2)) for _ in range(n)]


def search(model, cfg, device, dtype, sequences_per_rank, time_s, min_timed_s=1.0, max_memory_gb=0.0, log=print):
    """Time train.train_step of model at growing micro-batches up to sequences_per_rank (find_max_batch),
    starting no new size after time_s seconds; then, when the largest divisor of sequences_per_rank that
    fits was not among the sizes tried (powers of two, then bisection), time it too. cfg: the
    TrainConfig (optimizer, grad_clip, activation checkpointing). Returns a dict: "trials"
    [{batch_size, status, ms_per_step, tokens_per_sec, peak_bytes, estimate_bytes, note}], "largest"
    (the largest micro-batch that fitted), "seconds" and "budget_bytes". The
    weights are unchanged: the optimizer steps at learning rate 0 and is thrown away."""
    block = min(cfg.block_size, model.config.block_size)
    gauge = MemoryGauge(model, device, max_memory_gb)
    optimizer = still_optimizer(model, cfg, device)
    scaler, ctx = make_scaler(device, dtype), autocast(device, dtype)
    compute_bytes = 4 if dtype == torch.float32 else 2
    t_start = time.perf_counter()

    def try_batch(b, timed=True):
        trial = {"batch_size": b, "status": "ok", "ms_per_step": None, "tokens_per_sec": None, "peak_bytes": None,
                 "estimate_bytes": memory.estimate_training_memory(
                     model, b, block, compute_dtype_bytes=compute_bytes, optimizer=cfg.optimizer,
                     activation_checkpointing=cfg.activation_checkpointing)["total"], "note": ""}
        if timed and b > 1 and time.perf_counter() - t_start > time_s:
            trial.update(status="time", note=f"the search's {time_s:.0f} s were up")
        elif gauge.budget and trial["estimate_bytes"] > gauge.budget:  # not tried: it could swap or kill the machine
            trial.update(status="oom", note=f"estimate over the {gauge.budget / 2**30:.2f} GB budget, not tried")
        else:
            _time_trial(trial, model, optimizer, scaler, ctx, device, block, gauge, min_timed_s, cfg.grad_clip)
        log(format_trial(trial))
        return trial

    log(f"search: train_step at growing micro-batches x {block} tokens, up to {sequences_per_rank} (the sequences "
        f"per step of one rank), about {time_s:.0f} s; memory budget "
        + (f"{gauge.budget / 2**30:.2f} GB" if gauge.budget else "unknown (the device's own limit)"))
    log(TRIAL_HEADER)
    largest, trials = find_max_batch(try_batch, sequences_per_rank)
    if largest == 0:
        raise UserError(f"micro-batch 1 does not fit ({trials[0]['status']}: {trials[0]['note']}); see memory.py's "
                        f"advice in train.py's start-up lines (lora_rank, base_dtype, activation_checkpointing, "
                        f"block_size)")
    d = largest_divisor(sequences_per_rank, largest)
    if d not in [t["batch_size"] for t in trials if t["status"] == "ok"]:
        log("  (the largest micro-batch that divides the sequences per step:)")
        trials.append(try_batch(d, timed=False))
    del optimizer
    free_memory(device)
    return {"trials": trials, "largest": largest, "seconds": time.perf_counter() - t_start,
            "budget_bytes": gauge.budget, "block_size": block}


def _time_trial(trial, model, optimizer, scaler, ctx, device, block, gauge, min_timed_s, grad_clip):
    """One warm-up step, then timed steps until min_timed_s has passed (at least 2, at most 20).
    Out of memory, and over the budget, are the trial's result."""
    b = trial["batch_size"]
    batches = random_batches(model, b, block, 1, device)
    gauge.reset()
    times = []
    try:
        while len(times) < 21 and (len(times) < 3 or sum(times[1:]) < min_timed_s):
            times.append(timed_step(model, optimizer, scaler, batches, ctx, grad_clip, device))
            peak = gauge.peak()
            if gauge.budget and peak and peak > gauge.budget:
                raise OverBudget(f"measured {peak / 2**30:.2f} GB over the {gauge.budget / 2**30:.2f} GB budget")
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        optimizer.zero_grad(set_to_none=True)
        trial["status"] = "oom" if is_oom(e) else "error"
        trial["note"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]
    trial["peak_bytes"] = gauge.peak()
    if trial["status"] == "ok":
        timed = times[1:]  # the first step allocates the optimizer's states and warms the kernels
        trial["ms_per_step"] = 1000 * sum(timed) / len(timed)
        trial["tokens_per_sec"] = b * block * len(timed) / sum(timed)


TRIAL_HEADER = f"  {'micro-batch':>11}  {'ms/step':>9}  {'tokens/s':>10}  {'peak GB':>8}  {'estimate GB':>11}  status"


def format_trial(t):
    def gb(n):
        return "-" if n is None else f"{n / 2**30:.2f}"
    ms = "-" if t["ms_per_step"] is None else f"{t['ms_per_step']:.1f}"
    tps = "-" if t["tokens_per_sec"] is None else f"{t['tokens_per_sec']:,.0f}"
    return (f"  {t['batch_size']:>11}  {ms:>9}  {tps:>10}  {gb(t['peak_bytes']):>8}  {gb(t['estimate_bytes']):>11}  "
            f"{t['status']}" + (f" ({t['note']})" if t["note"] else ""))


# A smaller micro-batch must be this much faster to win: a larger one does the same math in fewer steps,
# and short timings on a shared machine vary by about this much (on the 2-core EPYC, whole runs of the
# CPU recipe took 0.76 s per iteration at 8 x 4 and 0.68 s at 32 x 1, after short timings had put 8 x 4
# ahead by 7%)
TIE = 0.10


def largest_divisor(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def compare_iterations(model, cfg, device, dtype, trials, sequences_per_rank, time_s):
    """Whole optimizer iterations (sequences_per_rank / b micro-steps of b, train_step as the loop calls
    it) of the best candidates of the search, timed in turns so that a slower minute of a shared
    machine weighs on each alike: the fitting divisors within 20% of the best trial's tokens/s, at most
    3. A trial's few steps are too noisy to choose by (the same micro-batch varied by 15% from one
    plan to the next on a 2-core CPU) and too few to carry a two-day ETA. When an iteration is longer
    than a ninth of time_s, a timed step holds fewer micro-batches and its time is scaled up. A turn is
    3 steps of one candidate, the first untimed: the first step after a change of shape pays for it
    (on a CPU, alternating shapes step by step made the largest about 40% slower than in a training
    loop). Turns go on until time_s has passed, one each at least. Learning rate 0, as in search().
    Returns (the chosen micro-batch, {micro-batch: median seconds per iteration})."""
    fits = [t for t in trials if t["status"] == "ok" and sequences_per_rank % t["batch_size"] == 0]
    best = max(t["tokens_per_sec"] for t in fits)
    candidates = sorted(fits, key=lambda t: -t["tokens_per_sec"])[:3]
    candidates = [t for t in candidates if t["tokens_per_sec"] >= 0.8 * best]
    block = min(cfg.block_size, model.config.block_size)
    optimizer = still_optimizer(model, cfg, device)
    scaler, ctx = make_scaler(device, dtype), autocast(device, dtype)
    runs = {}
    for t in candidates:
        b, micro_steps = t["batch_size"], sequences_per_rank // t["batch_size"]
        per_step = max(1, min(micro_steps, int(time_s / 9 / (t["ms_per_step"] / 1000))))
        # (batches, what a step's time is multiplied by to make an iteration's, the times)
        runs[b] = (random_batches(model, b, block, per_step, device), micro_steps / per_step, [])
    t_start = time.perf_counter()
    while not runs[candidates[0]["batch_size"]][2] or time.perf_counter() - t_start < time_s:
        for batches, scale, times in runs.values():  # a turn: 3 steps, the first one untimed
            for i in range(3):
                seconds = timed_step(model, optimizer, scaler, batches, ctx, cfg.grad_clip, device)
                if i:
                    times.append(seconds * scale)
    del optimizer
    free_memory(device)
    per_iter = {b: statistics.median(times) for b, (_, _, times) in runs.items()}
    fastest = min(per_iter.values())
    chosen = max(b for b, s in per_iter.items() if s <= (1 + TIE) * fastest)  # a tie goes to fewer micro-steps
    return chosen, per_iter


def time_iterations(model, cfg, device, dtype, batch_size, sequences_per_rank, ms_per_step, time_s):
    """Seconds per optimizer iteration of the chosen micro-batch, timed step after step as the training
    loop runs them (compare_iterations' turns change shapes, which costs some of their steps): the
    median of the steps after a warm-up one, for about time_s (at least 3 timed). A step longer than
    a ninth of time_s holds fewer micro-batches and is scaled, as in compare_iterations."""
    block, micro_steps = min(cfg.block_size, model.config.block_size), sequences_per_rank // batch_size
    per_step = max(1, min(micro_steps, int(time_s / 9 / (ms_per_step / 1000))))
    optimizer = still_optimizer(model, cfg, device)
    scaler, ctx = make_scaler(device, dtype), autocast(device, dtype)
    batches = random_batches(model, batch_size, block, per_step, device)
    times, t_start = [], time.perf_counter()
    while len(times) < 4 or time.perf_counter() - t_start < time_s:
        times.append(timed_step(model, optimizer, scaler, batches, ctx, cfg.grad_clip, device) * micro_steps / per_step)
    del optimizer
    free_memory(device)
    return statistics.median(times[1:]), len(times) - 1


def sequences_per_rank(cfg, batch_size, ranks):
    """Sequences each rank computes per optimizer step: gradient_accumulation_steps x batch_size / ranks."""
    total = cfg.gradient_accumulation_steps * batch_size
    if total % ranks:
        raise UserError(f"gradient_accumulation_steps x batch_size = {total} sequences per step cannot be split over "
                        f"{ranks} ranks; make it a multiple of {ranks}")
    return total // ranks


def resolve_auto_batch(cfg, model, device, dtype, dist_info, time_s=20.0):
    """train.py --batch_size=auto: the micro-batch search at start-up, every rank on its own device;
    the smallest choice of any rank wins. The tokens per step stay those of the config's batch_size
    (the value before the override; the dataclass default when none) times its accumulation.
    Returns the config with batch_size and gradient_accumulation_steps set."""
    from runtime import gather_objects, print0
    configured = configurator.before_overrides(cfg, "batch_size")
    if not isinstance(configured, int) or configured <= 0:
        configured = TrainConfig.batch_size
    per_rank = sequences_per_rank(cfg, configured, dist_info.world_size)
    log = print0 if dist_info.is_master else (lambda s: None)
    log(f"batch_size=auto: keeping {cfg.gradient_accumulation_steps} accum x {configured} batch = "
        f"{cfg.gradient_accumulation_steps * configured} sequences per step ({per_rank} per rank)")
    result = search(model, cfg, device, dtype, per_rank, time_s, min_timed_s=0.3, log=log)
    chosen, _ = compare_iterations(model, cfg, device, dtype, result["trials"], per_rank, CONFIRM * time_s)
    b = min(gather_objects(chosen, dist_info))
    accum = per_rank // b * dist_info.world_size
    print0(f"batch_size=auto: micro-batch {b} (largest that fits: {result['largest']}), gradient_accumulation_steps "
           f"{accum}: {accum * b * cfg.block_size:,} tokens per step as configured; searched in {result['seconds']:.1f} s")
    return dataclasses.replace(cfg, batch_size=b, gradient_accumulation_steps=accum)


# ----------------------------------------------------------------------------- the plan's arithmetic

def count_evaluations(max_iters, eval_interval):
    """How many times train.py evaluates: at every multiple of eval_interval from 0, and at the last step."""
    return max_iters // eval_interval + 1 + (1 if max_iters % eval_interval else 0)


def count_saves(cfg, n_evals):
    """Checkpoints a run writes: at each evaluation but the one at iteration 0 (with always_save_checkpoint;
    else at most that many, on improvement), plus every save_interval."""
    extra = cfg.max_iters // cfg.save_interval if cfg.save_interval else 0
    return n_evals - 1 + extra


def checkpoints_on_disk(cfg, n_saves):
    """The most checkpoints on disk at once: keep_last_n, the best one when it is older, and the one being
    written before pruning (keep_last_n <= 0 keeps every one)."""
    if cfg.keep_last_n <= 0:
        return n_saves
    return min(n_saves, cfg.keep_last_n + 2)


def eval_budget(cfg, iter_s, eval_batch_s, val_batches, share):
    """(eval_iters, eval_interval) keeping validation under share of the run's time, counting every
    evaluation train.py makes (count_evaluations). eval_iters=0 (the whole split, val_batches batches)
    becomes a count when the whole split would cost too much; eval_interval grows only when fewer
    than 10 batches per evaluation would be left (too noisy to compare one evaluation with the next)."""
    budget = share / (1 - share) * cfg.max_iters * iter_s  # seconds validation may take in all

    def allowed(interval):  # batches per evaluation within the budget
        return math.floor(budget / (count_evaluations(cfg.max_iters, interval) * eval_batch_s))

    interval = min(cfg.eval_interval, cfg.max_iters)
    wanted = val_batches if cfg.eval_iters <= 0 else cfg.eval_iters
    if wanted is not None and wanted <= allowed(interval):
        return cfg.eval_iters, interval
    fewest = min(10, wanted or 10)
    if allowed(interval) >= fewest:
        return allowed(interval), interval
    # rarer evaluations: the first interval (from the estimate of the evaluations' number) that fits
    start = max(interval + 1, math.ceil(fewest * eval_batch_s * (1 - share) / (share * iter_s)))
    for interval in range(min(start, cfg.max_iters), cfg.max_iters + 1):
        if allowed(interval) >= fewest:
            return fewest, interval
    return max(1, allowed(cfg.max_iters)), cfg.max_iters  # at iteration 0 and the end only


def val_windows(cfg, block_size):
    """Windows of the whole validation split (eval_iters=0) as dataloader.eval_batches cuts them, or None
    when the data is not prepared yet."""
    val = prepared_split(cfg, "val")
    return None if val is None else sum(len(range(0, n - block_size, block_size)) for n in val.lengths)


def prepared_split(cfg, split):
    """The run's token data of split ('train' or 'val'), or None before the data is prepared."""
    from dataloader import TokenData, resolve_data_dir
    try:
        return TokenData(resolve_data_dir(cfg.data_dir, cfg.dataset), split)
    except (OSError, ValueError):
        return None


def time_data(cfg, batch_size, block_size, device, n=20):
    """Seconds to read one micro-batch of the run's training data and copy it to the device, as the
    training loop does before each micro-step (median of n after a warm-up), or 0.0 before the data is
    prepared. The step timings use batches already on the device, and on a GPU a small model's step is
    short enough for this host time to show in the ETA. Instruction data (sft_train_file) is read by
    sft.py's loader, which is not timed here (0.0)."""
    from dataloader import make_sampler, to_device
    data = None if cfg.sft_train_file else prepared_split(cfg, "train")
    if data is None:
        return 0.0
    try:
        sampler = make_sampler(cfg.sampling, data, batch_size, block_size, cfg.seed)
    except ValueError:  # files shorter than a window: train.py's own check reports it
        return 0.0
    times = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        to_device(sampler.next_batch(), device)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_eval_batch(model, device, dtype, batch_size, block_size, n=3):
    """Seconds of one validation batch through evaluation.evaluate_loss, median of n after a warm-up."""
    import evaluation
    batch = random_batches(model, batch_size, block_size, 1, device)
    ctx, times = autocast(device, dtype), []
    for i in range(n + 1):
        synchronize(device)
        t0 = time.perf_counter()
        evaluation.evaluate_loss(model, batch, device, ctx)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[n // 2]


def checkpoint_bytes(model, partial, cfg):
    """Bytes of one checkpoint: the weights saved (all, or the trained ones under LoRA / 1-D) at their
    stored dtypes, and the optimizer's states as memory.py counts them (their real dtypes)."""
    from checkpoint import model_tensors
    weights = sum(t.numel() * t.element_size() for t in model_tensors(model, partial).values())
    est = memory.estimate_training_memory(model, 1, 1, optimizer=cfg.optimizer)
    return weights, est["optimizer"]


def size(n):
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def free_disk(path):
    """Free bytes of the filesystem that holds path (or would: its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def chinchilla_params(achieved_flops, seconds):
    """The largest model trained on CHINCHILLA tokens per parameter in `seconds` at achieved_flops
    (6 FLOPs per parameter per token; attention's share left out): 6 N x 20 N = F t."""
    return math.sqrt(achieved_flops * seconds / (6 * CHINCHILLA))


# ----------------------------------------------------------------------------- main

def build_model_for(cfg, device):
    """The run's model as train.py builds it (random weights for a new model; the base for a fine-tune)."""
    from checkpoint import base_reference, read_for_resume
    from train import build_model, scratch_model_args
    if cfg.init_from == "resume":
        _, state = read_for_resume(cfg.out_dir, cfg.resume_from, Dist())
        if not state.get("trainable_only"):
            return build_model(cfg, "scratch", dict(state["model_args"], dropout=cfg.dropout))
        return build_model(cfg, state["config"]["init_from"], None, base=state.get("base"))
    if cfg.init_from == "scratch":
        meta = data_meta(cfg)
        return build_model(cfg, "scratch", scratch_model_args(cfg, meta))
    return build_model(cfg, cfg.init_from, None, base=base_reference(cfg.init_from))


def data_meta(cfg):
    """The prepared data's meta.json (its vocabulary), or {} before the data is prepared. Tiny
    Shakespeare is prepared first, as train.py does: planning its 65-character model with GPT-2's
    vocabulary would size a model three times too large."""
    from dataloader import prepare_command, prepare_shipped, resolve_data_dir
    data_dir = resolve_data_dir(cfg.data_dir, cfg.dataset)
    prepare_shipped(data_dir)
    train = prepared_split(cfg, "train")
    if train is None and not cfg.vocab_size:
        print(f"data: {data_dir} is not prepared, so its vocabulary is unknown: planning with vocab_size "
              f"50304 (GPT-2's); prepare it first ({prepare_command(data_dir)}) or set --vocab_size")
    return {} if train is None else train.meta


def check_plan_config(cfg):
    errors = []
    if not 0 < cfg.eval_share < 1:
        errors.append(f"eval_share must be between 0 and 1, got {cfg.eval_share}")
    for k in ("calibration_s", "price_per_hour", "budget_hours", "max_memory_gb", "ranks"):
        if getattr(cfg, k) < 0:
            errors.append(f"{k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.max_iters <= 0:
        errors.append(f"max_iters must be positive to plan a run, got {cfg.max_iters}")
    if cfg.sft_train_file:
        errors.append("plans are for token-file runs; an SFT run's batches are padded examples (time it with train.py)")
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))


def check_disk(cfg, model, partial):
    """The checkpoints' bytes on disk at most, against the free space of out_dir's filesystem (a
    shortfall is an error, before any timing). Returns the plan's disk fields."""
    weights_b, optim_b = checkpoint_bytes(model, partial, cfg)
    n_evals = count_evaluations(cfg.max_iters, min(cfg.eval_interval, cfg.max_iters))
    on_disk = checkpoints_on_disk(cfg, count_saves(cfg, n_evals))
    need, free = (weights_b + optim_b) * on_disk, free_disk(cfg.out_dir)
    print(f"disk: a checkpoint is {size(weights_b + optim_b)} (weights {size(weights_b)}, optimizer {size(optim_b)}); "
          f"at most {on_disk} on disk at once (keep_last_n={cfg.keep_last_n} + best + the one being written) = "
          f"{size(need)}; {size(free)} free for out_dir={cfg.out_dir}")
    if need > free:
        raise UserError(f"the run's checkpoints need {size(need)} and out_dir={cfg.out_dir}'s filesystem has "
                        f"{size(free)} free: free some space, lower --keep_last_n, or choose another --out_dir")
    return {"checkpoint_bytes": weights_b + optim_b, "checkpoints_on_disk": on_disk, "disk_bytes": need,
            "free_disk_bytes": free}


def plan_validation(cfg, model, device, dtype, b, block, iter_s, windows, data_s=0.0):
    """Time a validation batch of b and fit eval_iters / eval_interval to eval_share (eval_budget).
    windows: val_windows' count, or None. data_s: time_data's seconds, which each batch also takes."""
    eval_batch_s = time_eval_batch(model, device, dtype, b, block) + data_s
    whole = None if windows is None else math.ceil(windows / b)  # batches of the whole split
    eval_iters, eval_interval = eval_budget(cfg, iter_s, eval_batch_s, whole, cfg.eval_share)
    n_batches = eval_iters if eval_iters > 0 else whole
    n_evals = count_evaluations(cfg.max_iters, eval_interval)
    total = n_evals * n_batches * eval_batch_s
    print(f"validation: {eval_batch_s * 1000:.1f} ms per batch of {b}; eval_iters={eval_iters} ({n_batches} batches"
          f"{', the whole split' if eval_iters == 0 else ''}) every {eval_interval} iterations (every "
          f"{eval_interval * iter_s / 60:.1f} min), {n_evals} evaluations = {total / 60:.1f} min, "
          f"{total / (total + cfg.max_iters * iter_s):.1%} of the training time (at most {cfg.eval_share:.0%})")
    return {"eval_batch_seconds": eval_batch_s, "eval_iters": eval_iters, "eval_interval": eval_interval,
            "eval_batches": n_batches, "evaluations": n_evals, "eval_seconds": total}


def price(cfg, plan):
    """ETA, tokens per parameter, cost, and with budget_hours what fits in them: printed and added to plan."""
    eta, n_params, iter_s = plan["eta_seconds"], plan["n_params"], plan["seconds_per_iter"]
    tokens = cfg.max_iters * plan["tokens_per_step"]
    plan.update(tokens=tokens, tokens_per_param=tokens / n_params, cost=None, budget=None)
    print(f"eta: {cfg.max_iters:,} iterations x {iter_s:.3f} s + validation + {plan['startup_seconds']:.1f} s to build "
          f"the model = {eta / 3600:.2f} h ({eta:,.0f} s); {tokens:,} tokens = {tokens / n_params:.1f} tokens per "
          f"parameter (Chinchilla-optimal ~{CHINCHILLA})")
    if cfg.price_per_hour:
        plan["cost"] = eta / 3600 * cfg.price_per_hour
        print(f"cost: {eta / 3600:.2f} h x {cfg.price_per_hour:g} per hour = {plan['cost']:.2f}")
    if cfg.budget_hours:
        seconds = cfg.budget_hours * 3600 * (1 - plan["eval_seconds"] / eta)  # validation keeps its share
        fit_iters = int(seconds // iter_s)
        fit_tokens = fit_iters * plan["tokens_per_step"]
        n_chin = chinchilla_params(plan["achieved_flops"], seconds)
        plan["budget"] = {"hours": cfg.budget_hours, "max_iters": fit_iters, "tokens": fit_tokens,
                          "chinchilla_params": n_chin, "chinchilla_tokens": CHINCHILLA * n_chin}
        print(f"budget {cfg.budget_hours:g} h: {fit_iters:,} iterations = {fit_tokens:,} tokens of this model "
              f"({fit_tokens / n_params:.1f} per parameter); at the {plan['achieved_flops'] / 1e12:.3g} TFLOP/s "
              f"measured, the largest Chinchilla-ratio model is ~{n_chin / 1e6:,.0f}M parameters on "
              f"{CHINCHILLA * n_chin / 1e9:,.2f}B tokens")


def main(cfg):
    from runtime import pick_device, pick_dtype, seed_everything, setup_backends
    from train import check_config
    check_plan_config(cfg)
    ranks = cfg.ranks or int(os.environ.get("WORLD_SIZE", "1"))
    configured = cfg.batch_size if isinstance(cfg.batch_size, int) else configurator.before_overrides(cfg, "batch_size")
    # the out_dir may hold a run (a plan writes nothing there); the rest as train.py checks it
    check_config(dataclasses.replace(cfg, overwrite=True, batch_size=configured), Dist(world_size=ranks))
    per_rank = sequences_per_rank(cfg, configured, ranks)
    device = pick_device(cfg.device)
    setup_backends(device)
    dtype = pick_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    t_build = time.perf_counter()
    model, partial = build_model_for(cfg, device)
    model.to(device)
    startup_s = time.perf_counter() - t_build  # a run builds (or loads) its model once too
    block = min(cfg.block_size, model.config.block_size)
    print(f"plan: {model.get_num_params():,} parameters ({sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
          f" trained) on {device}, {str(dtype).replace('torch.', '')}; {cfg.gradient_accumulation_steps} accum x "
          f"{configured} batch = {per_rank * ranks} sequences x {block} tokens per step over {ranks} rank(s)")
    disk = check_disk(cfg, model, partial)  # first: it needs no timing
    windows = val_windows(cfg, block)
    if cfg.eval_iters <= 0 and windows is None:
        raise UserError(f"eval_iters=0 evaluates the whole validation split, which is not prepared yet "
                        f"({cfg.data_dir or 'data/' + cfg.dataset}): prepare the data first, or set --eval_iters")
    if cfg.compile:
        print("note: compile=True: the search times eager steps (compiling every micro-batch would take minutes); "
              "a compiled run is usually faster, so the ETA below is an upper bound")

    t_calibration = time.perf_counter()
    result = search(model, cfg, device, dtype, per_rank, cfg.calibration_s, max_memory_gb=cfg.max_memory_gb)
    b, per_iter = compare_iterations(model, cfg, device, dtype, result["trials"], per_rank,
                                        CONFIRM * cfg.calibration_s)
    accum, tokens_per_step = per_rank // b * ranks, per_rank * ranks * block
    print("iterations, timed in turns (median): " + ", ".join(
        f"{per_rank // c} x {c}: {s:.3f} s" for c, s in sorted(per_iter.items())))
    ms = next(t["ms_per_step"] for t in result["trials"] if t["batch_size"] == b and t["status"] == "ok")
    iter_s, n_timed = time_iterations(model, cfg, device, dtype, b, per_rank, ms, CONFIRM * cfg.calibration_s)
    print(f"micro-batch: {b} (largest that fits: {result['largest']}; searched in {result['seconds']:.1f} s) -> "
          f"gradient_accumulation_steps={accum}, {tokens_per_step:,} tokens per step as configured; "
          f"{iter_s:.3f} s per iteration (the median of {n_timed} timed one after another)")
    data_s = time_data(cfg, b, block, device)
    if data_s:
        iter_s += per_rank // b * data_s
        print(f"data: {data_s * 1000:.1f} ms to read a micro-batch of {b} and copy it to {device} (the median of 20), "
              f"{per_rank // b} per iteration: {iter_s:.3f} s per iteration with them")
    evals = plan_validation(cfg, model, device, dtype, b, block, iter_s, windows, data_s)
    calibrated_s = time.perf_counter() - t_calibration
    print(f"calibration: {calibrated_s:.0f} s in all (the search, the comparison, the iterations and validation "
          f"timed; each takes a few steps at least, so a slow device runs past calibration_s={cfg.calibration_s:g})")

    plan = {"config": dataclasses.asdict(cfg), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "ranks": ranks, "n_params": model.get_num_params(), "trials": result["trials"],
            "largest_micro_batch": result["largest"], "search_seconds": result["seconds"],
            "calibration_seconds": calibrated_s,
            "iteration_seconds_by_micro_batch": per_iter,
            "memory_budget_bytes": result["budget_bytes"], "batch_size": b, "gradient_accumulation_steps": accum,
            "tokens_per_step": tokens_per_step, "seconds_per_iter": iter_s, "data_seconds_per_micro_batch": data_s,
            "tokens_per_sec": tokens_per_step / iter_s,
            "achieved_flops": model.flops_per_token(block) * tokens_per_step / iter_s,  # all ranks together
            "startup_seconds": startup_s, "train_seconds": cfg.max_iters * iter_s, **evals, **disk}
    plan["eta_seconds"] = startup_s + plan["train_seconds"] + evals["eval_seconds"]
    price(cfg, plan)
    plan["overrides"] = (f"--batch_size={b} --gradient_accumulation_steps={accum} --eval_iters={evals['eval_iters']} "
                         f"--eval_interval={evals['eval_interval']}")
    print(f"overrides: {plan['overrides']}")
    from fileio import write_json
    write_json(cfg.plan_file, plan)
    print(f"wrote {cfg.plan_file}")
    return plan


if __name__ == "__main__":
    configurator.run(main, PlanConfig)
