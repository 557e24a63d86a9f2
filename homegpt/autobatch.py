"""
The micro-batch search: time a training step at growing micro-batches until one does not fit, then
choose the fastest whole iteration. train.py --batch_size=auto runs it at start-up; plan.py (bench.py
--plan) runs it to size a whole run.

    python train.py config/train_gpt2_chinchilla.py --batch_size=auto
    from homegpt.autobatch import search
    result = search(train.train_step, model, cfg, device, dtype, sequences_per_rank=64, time_s=20)

The step to time is passed in (train.train_step, as the loop calls it) so that this module sits below
train.py. The optimizer steps at learning rate 0: the weights are never changed by the search.
"""

import dataclasses
import statistics
import time

import torch

from homegpt import memory
from homegpt.errors import UserError
from homegpt.optimizers import make_optimizer
from homegpt.hardware import OverBudget, free_memory, is_oom, proc_status_bytes, reset_peak_rss, synchronize
from homegpt.runtime import Dist, autocast, gather_objects, make_scaler, print0

CONFIRM = 0.15  # after the search, time whole iterations of the best candidates for this share of its time


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


def timed_step(step, model, optimizer, scaler, batches, ctx, grad_clip, device):
    """Seconds of one step(...) (train.train_step) over batches, the device synchronised before each clock
    read: CUDA work is asynchronous, and a clock read after a launch measures the launch."""
    synchronize(device)
    t0 = time.perf_counter()
    step(model, optimizer, scaler, batches, ctx, grad_clip, Dist(), device)
    synchronize(device)
    return time.perf_counter() - t0


def random_batches(model, batch_size, block, n, device):
    """n (x, y) micro-batches of random tokens, already on the device: a step's time does not depend on them."""
    g = torch.Generator(device=device).manual_seed(batch_size)
    return [tuple(torch.randint(0, model.config.vocab_size, (batch_size, block), device=device, generator=g)
                  for _ in range(2)) for _ in range(n)]


def search(step, model, cfg, device, dtype, sequences_per_rank, time_s, min_timed_s=1.0, max_memory_gb=0.0, log=print):
    """Time step (train.train_step) of model at growing micro-batches up to sequences_per_rank (find_max_batch),
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
            _time_trial(step, trial, model, optimizer, scaler, ctx, device, block, gauge, min_timed_s, cfg.grad_clip)
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


def _time_trial(step, trial, model, optimizer, scaler, ctx, device, block, gauge, min_timed_s, grad_clip):
    """One warm-up step, then timed steps until min_timed_s has passed (at least 2, at most 20).
    Out of memory, and over the budget, are the trial's result."""
    b = trial["batch_size"]
    batches = random_batches(model, b, block, 1, device)
    gauge.reset()
    times = []
    try:
        while len(times) < 21 and (len(times) < 3 or sum(times[1:]) < min_timed_s):
            times.append(timed_step(step, model, optimizer, scaler, batches, ctx, grad_clip, device))
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


def compare_iterations(step, model, cfg, device, dtype, trials, sequences_per_rank, time_s):
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
                seconds = timed_step(step, model, optimizer, scaler, batches, ctx, cfg.grad_clip, device)
                if i:
                    times.append(seconds * scale)
    del optimizer
    free_memory(device)
    per_iter = {b: statistics.median(times) for b, (_, _, times) in runs.items()}
    fastest = min(per_iter.values())
    chosen = max(b for b, s in per_iter.items() if s <= (1 + TIE) * fastest)  # a tie goes to fewer micro-steps
    return chosen, per_iter


def time_iterations(step, model, cfg, device, dtype, batch_size, sequences_per_rank, ms_per_step, time_s):
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
        times.append(timed_step(step, model, optimizer, scaler, batches, ctx, cfg.grad_clip, device) * micro_steps / per_step)
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


def resolve_auto_batch(step, cfg, configured, model, device, dtype, dist_info, time_s=20.0):
    """train.py --batch_size=auto: the micro-batch search at start-up, every rank on its own device;
    the smallest choice of any rank wins. The tokens per step stay those of the config's batch_size
    (configured: its value before the override, from configurator.before_overrides; the dataclass
    default when none) times its accumulation. Returns the config with batch_size and
    gradient_accumulation_steps set."""
    if not isinstance(configured, int) or configured <= 0:
        configured = 12  # (TrainConfig's default)
    per_rank = sequences_per_rank(cfg, configured, dist_info.world_size)
    log = print0 if dist_info.is_master else (lambda s: None)
    log(f"batch_size=auto: keeping {cfg.gradient_accumulation_steps} accum x {configured} batch = "
        f"{cfg.gradient_accumulation_steps * configured} sequences per step ({per_rank} per rank)")
    result = search(step, model, cfg, device, dtype, per_rank, time_s, min_timed_s=0.3, log=log)
    chosen, _ = compare_iterations(step, model, cfg, device, dtype, result["trials"], per_rank, CONFIRM * time_s)
    b = min(gather_objects(chosen, dist_info))
    accum = per_rank // b * dist_info.world_size
    print0(f"batch_size=auto: micro-batch {b} (largest that fits: {result['largest']}), gradient_accumulation_steps "
           f"{accum}: {accum * b * cfg.block_size:,} tokens per step as configured; searched in {result['seconds']:.1f} s")
    return dataclasses.replace(cfg, batch_size=b, gradient_accumulation_steps=accum)
