"""
Size a training run for the machine at hand before starting it: the micro-batch and accumulation,
the validation budget, the disk its checkpoints take, the ETA and the cost.

    python bench.py config/train_gpt2_chinchilla.py --plan
    python bench.py config/train_gpt2_chinchilla.py --plan --price_per_hour=0.40 --budget_hours=48
    python train.py config/train_gpt2_chinchilla.py --batch_size=auto   # the micro-batch search alone, at start-up

The plan reads the training config as train.py does and builds the run's model the way train.py
does (from scratch, or the pretrained base with its LoRA / 1-D training). Then, within calibration_s:
- it times train.py's train_step (passed in by bench.py) on random tokens at micro-batch 1, 2, 4, ... until one does not fit, then
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

The ETA counts reading the real data (a micro-batch read and copied to the device, per micro-step and
validation batch). It leaves out torch.compile (the search runs eager: a compiled run is faster, so
with compile=True the ETA is an upper bound), checkpoint writes, and DDP's gradient all-reduce (with
ranks > 1 each rank is assumed to step as fast as this device alone).
"""

import dataclasses
import math
import os
import shutil
import statistics
import time
from pathlib import Path

from homegpt import evaluation, memory, weights
from homegpt.config_checks import check_config
from homegpt.autobatch import CONFIRM, compare_iterations, random_batches, search, sequences_per_rank, time_iterations
from homegpt.checkpoint import model_tensors, read_for_resume
from homegpt.dataloader import TokenData, make_sampler, prepare_command, resolve_data_dir, to_device
from homegpt.prepare_text import prepare_shipped
from homegpt.errors import UserError
from homegpt.fileio import JSON_OBJECT, check_file_target, write_json
from homegpt.hardware import synchronize
from homegpt.runtime import Dist, autocast, pick_device, pick_dtype, seed_everything, setup_backends

CHINCHILLA = 20  # tokens per parameter of a compute-optimal run (Hoffmann et al. 2022)


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
    if cfg.init_from == "resume":
        _, state = read_for_resume(cfg.out_dir, cfg.resume_from, Dist())
        if not state.get("trainable_only"):
            return weights.build_model(cfg, "scratch", dict(state["model_args"], dropout=cfg.dropout))
        return weights.build_model(cfg, state["config"]["init_from"], None, base=state.get("base"))
    if cfg.init_from == "scratch":
        meta = data_meta(cfg)
        return weights.build_model(cfg, "scratch", weights.scratch_model_args(cfg, meta))
    return weights.build_model(cfg, cfg.init_from, None, base=weights.base_reference(cfg.init_from))


def data_meta(cfg):
    """The prepared data's meta.json (its vocabulary), or {} before the data is prepared. Tiny
    Shakespeare is prepared first, as train.py does: planning its 65-character model with GPT-2's
    vocabulary would size a model three times too large."""
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


def calibrate(step, cfg, model, device, dtype, per_rank, ranks, block, windows):
    """The timings a plan rests on, within about calibration_s: the micro-batch search, whole iterations of
    its best candidates in turns, the chosen one's iterations one after another, reading the data, and
    validation. Returns (search result, micro-batch, seconds per iteration by micro-batch, seconds per
    iteration, data seconds per micro-batch, the validation plan, seconds it all took)."""
    t_calibration = time.perf_counter()
    result = search(step, model, cfg, device, dtype, per_rank, cfg.calibration_s, max_memory_gb=cfg.max_memory_gb)
    b, per_iter = compare_iterations(step, model, cfg, device, dtype, result["trials"], per_rank,
                                        CONFIRM * cfg.calibration_s)
    accum, tokens_per_step = per_rank // b * ranks, per_rank * ranks * block
    print("iterations, timed in turns (median): " + ", ".join(
        f"{per_rank // c} x {c}: {s:.3f} s" for c, s in sorted(per_iter.items())))
    ms = next(t["ms_per_step"] for t in result["trials"] if t["batch_size"] == b and t["status"] == "ok")
    iter_s, n_timed = time_iterations(step, model, cfg, device, dtype, b, per_rank, ms, CONFIRM * cfg.calibration_s)
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
    return result, b, per_iter, iter_s, data_s, evals, calibrated_s


def main(cfg, step, configured_batch):
    """Plan the train.py run cfg describes (bench.py's PlanConfig: train.py's keys and the plan's). step:
    train.py's train_step, the step to time; configured_batch: the config's batch_size before a
    --batch_size=auto override (the tokens per step the plan keeps). Returns the plan, also written to
    cfg.plan_file."""
    check_plan_config(cfg)
    check_file_target(cfg.plan_file, "--plan_file", JSON_OBJECT, "JSON plan")  # a plan replaces a plan only
    ranks = cfg.ranks or int(os.environ.get("WORLD_SIZE", "1"))
    configured = cfg.batch_size if isinstance(cfg.batch_size, int) else configured_batch
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

    result, b, per_iter, iter_s, data_s, evals, calibrated_s = calibrate(step, cfg, model, device, dtype, per_rank,
                                                                        ranks, block, windows)
    accum, tokens_per_step = per_rank // b * ranks, per_rank * ranks * block

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
    write_json(cfg.plan_file, plan)
    print(f"wrote {cfg.plan_file}")
    return plan
