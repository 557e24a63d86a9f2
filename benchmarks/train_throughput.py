"""
Training throughput: the fast path (bf16 autocast where native, torch.compile, fused AdamW) against
plain float32 eager (nanoGPT's CPU path), on the same model, data and dropout masks, step by step.

    python benchmarks/train_throughput.py                                  # baby GPT, 100 steps (long on a CPU)
    python benchmarks/train_throughput.py --steps=10 --batch_size=8        # a quick check
    python benchmarks/train_throughput.py --train_args="--n_layer=2 --n_embd=64" --steps=20
    python benchmarks/train_throughput.py --compile=True --steps=20 --batch_size=8

Both sides are built and stepped by train.py's own code (rundata.open_data and batches, weights.build_model,
optimizers.make_optimizer, runtime.autocast, train.train_step, train.get_lr), from one training
config file, so this measures what `python train.py <config_file>` does. They run in lockstep in one
process: the same batch, learning rate and dropout seed for both at each step, the order of the two
alternating, so a machine whose load drifts slows both alike. The first `warmup_steps` are not
timed (torch.compile compiles then). Prints the mean loss of each side per log interval (as
train.py logs it) and the largest difference, then the RATIO line of tokens/s (medians). The two sides
draw different dropout masks, so their losses agree closely but not exactly. Measured figures: docs/speed.md.
"""

import dataclasses
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from homegpt import runtime, weights
import common
import train
from homegpt.errors import UserError
from configurator import parse_config
from homegpt.dataloader import to_device
from homegpt.optimizers import make_optimizer
from homegpt.runtime import Dist, autocast, make_scaler, pick_device, pick_dtype, seed_everything, step_seed
from homegpt.rundata import batches, open_data

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ThroughputConfig:
    config_file: str = "config/train_shakespeare_char.py"  # the recipe whose training step is timed
    train_args: str = ""  # more TrainConfig overrides for both sides, e.g. "--n_layer=2 --data_dir=data/my_dataset"
    batch_size: int = 0  # sequences per step; 0 = the config file's (64 for the baby GPT)
    steps: int = 100  # optimizer steps per side, warm-up included
    warmup_steps: int = 2  # first steps left out of the timing (compilation, allocator warm-up)
    log_interval: int = 10  # steps per logged mean loss; 0 = the config file's log_interval
    fast_dtype: str = "auto"  # precision of the fast side: auto = bfloat16 where the CPU/GPU has it natively
    # torch.compile the fast side (skipped, with the reason, where it cannot run). Off by default: on a
    # small CPU inductor's code ran slower than eager, after a long compilation (docs/speed.md)
    compile: bool = False
    fused: bool = True  # the fast side's AdamW uses the fused kernel (the baseline uses the foreach one)
    fast_dropout: bool = True  # the fast side's CPU dropout is model.fast_dropout (the baseline uses torch's)
    threads: int = 0  # torch CPU threads for both sides; 0 = torch's default (one per core)
    device: str = "cpu"
    loss_tolerance: float = 0.02  # largest allowed |fast - float32| logged loss
    target: float = 2.0  # the promised speed-up


def make_side(tcfg, device, dtype, compile_model, fused, fast_dropout, model_args):
    """(runner, model, optimizer, scaler, autocast context) built the way train.main builds them."""
    seed_everything(tcfg.seed)  # identical initial weights on both sides
    model, _ = weights.build_model(dataclasses.replace(tcfg, fast_dropout=fast_dropout), "scratch", model_args)
    model.to(device)
    optimizer = make_optimizer(model, tcfg, device, fused=fused)
    runner = model
    if compile_model:
        reason = runtime.compile_reason(device)
        if reason:
            print(f"compile: off for the fast side ({reason})")
        else:
            runner = torch.compile(model)
    return runner, model, optimizer, make_scaler(device, dtype), autocast(device, dtype)


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    common.print_machine("training throughput: fast path vs float32 eager")
    tcfg = training_config(cfg)
    device = pick_device(cfg.device)
    fast_dtype = pick_dtype(cfg.fast_dtype, device)
    data = open_data(tcfg)
    sampler, _ = batches(tcfg, data, Dist())
    model_args = weights.scratch_model_args(tcfg, data.meta)  # as train.py builds a model from scratch
    tokens_per_step = tcfg.batch_size * tcfg.block_size
    base = "float32 eager"
    fast = f"{str(fast_dtype).replace('torch.', '')}{' compiled' if cfg.compile else ' eager'}" \
           f"{' fused' if cfg.fused else ''}{' fast-dropout' if cfg.fast_dropout and tcfg.dropout else ''}"
    sides = {base: make_side(tcfg, device, torch.float32, False, False, False, model_args),
             fast: make_side(tcfg, device, fast_dtype, cfg.compile, cfg.fused, cfg.fast_dropout, model_args)}
    n_params = sides[fast][1].get_num_params()
    print(f"model: {tcfg.n_layer} layers x {tcfg.n_head} heads x {tcfg.n_embd} wide, {n_params:,} parameters, "
          f"dropout {tcfg.dropout}; {tcfg.batch_size} batch x {tcfg.block_size} block = {tokens_per_step:,} tokens/step; "
          f"{cfg.steps} steps ({cfg.warmup_steps} untimed)")

    times, logged = run_lockstep(cfg, tcfg, sides, sampler, device)
    worst = max(abs(l[fast] - l[base]) for _, l in logged)
    print(f"LOSS max |{fast} - {base}| over {len(logged)} logged steps: {worst:.4f} "
          f"(tolerance {cfg.loss_tolerance}: {'met' if worst <= cfg.loss_tolerance else 'NOT met'})")
    rates = {name: tokens_per_step / common.median(t) for name, t in times.items()}
    common.print_ratio("train_throughput", fast, rates[fast], base, rates[base], "tokens/s", cfg.target)
    return {"rates": rates, "max_loss_diff": worst, "logged": logged}


def training_config(cfg):
    """The TrainConfig both sides train with: the config file, then train_args, then batch_size."""
    config_file = Path(cfg.config_file)
    if not config_file.exists() and (ROOT / config_file).exists():
        config_file = ROOT / config_file  # run from outside the repository
    tcfg = parse_config(train.TrainConfig, [str(config_file)] + shlex.split(cfg.train_args))
    if cfg.batch_size:
        tcfg.batch_size = cfg.batch_size
    if cfg.steps <= cfg.warmup_steps:
        raise UserError(f"steps ({cfg.steps}) must exceed warmup_steps ({cfg.warmup_steps}) to time anything")
    return tcfg


def run_lockstep(cfg, tcfg, sides, sampler, device):
    """Step every side on the same batch, learning rate and dropout seed, alternating which goes first.
    Returns ({side: seconds of each timed step}, [(step, {side: mean loss over the log interval})])."""
    log_every = cfg.log_interval or tcfg.log_interval
    dist = Dist()
    times = {name: [] for name in sides}
    interval_loss = {name: 0.0 for name in sides}
    logged = []
    for it in range(cfg.steps):
        lr = train.get_lr(it, tcfg)
        x, y = to_device(sampler.next_batch(), device)
        order = list(sides) if it % 2 == 0 else list(sides)[::-1]  # neither side always runs first
        for name in order:
            runner, model, optimizer, scaler, ctx = sides[name]
            train.set_lr(optimizer, lr)
            torch.manual_seed(step_seed(tcfg.seed, 0, it))  # the same dropout seed as train.py's step `it`
            t0 = time.perf_counter()
            loss = train.train_step(runner, optimizer, scaler, [(x, y)], ctx, tcfg.grad_clip, dist, device).loss
            value = loss.item()  # the sync train.py makes once per log interval; a no-op wait on a CPU
            dt = time.perf_counter() - t0
            if it >= cfg.warmup_steps:
                times[name].append(dt)
            interval_loss[name] += value
        if (it + 1) % log_every == 0 or it == cfg.steps - 1:
            n = (it % log_every) + 1
            logged.append((it + 1, {k: v / n for k, v in interval_loss.items()}))
            interval_loss = {name: 0.0 for name in sides}
            row = ", ".join(f"{k} {v:.4f}" for k, v in logged[-1][1].items())
            print(f"step {it + 1}: mean loss {row}; last step " +
                  ", ".join(f"{k} {t[-1] * 1000:,.0f} ms" for k, t in times.items() if t), flush=True)
    return times, logged


if __name__ == "__main__":
    from configurator import configure
    main(configure(ThroughputConfig))
