"""
Training and inference throughput of a model shape: tokens/s, MFU, peak memory and the largest batch
that fits, across batch sizes, precisions and torch.compile on/off.

    python bench.py                                              # the baby Shakespeare GPT on this machine
    python bench.py --batch_sizes=auto --dtypes=bfloat16 --max_memory_gb=4
    python bench.py config/train_gpt2.py --device=cuda --batch_sizes=auto --dtypes=bfloat16,float16
    python bench.py config/train_gpt2_chinchilla.py --plan     # size a train.py run: see plan.py

What is timed is what train.py does: the model and optimizer are built the same way
(optimizers.configure_optimizers, runtime.pick_dtype / autocast / make_scaler) and each step is
train.train_step itself (forward, backward, clipping, AdamW). The batches are random tokens already
on the device, so the numbers are compute-bound: data loading is not in them (on a GPU with a slow
disk or a CPU busy tokenising, a real run can be slower). Warm-up steps (which include torch.compile's
compilation) are not timed; the device is synchronised before every clock read. Eval throughput is
model(x, y) in eval mode under torch.inference_mode and the row's precision.

Each configuration (dtype, compile, batch size) is a fresh model and optimizer with the same seed, so
a row's peak memory is that of a training run at that batch size, optimizer states included:
- CUDA: torch.cuda.max_memory_allocated (reset per row): tensors only, not the CUDA context
  (~0.5 GB) nor the allocator's cached blocks.
- CPU on Linux: how far the process's peak RSS (VmHWM, reset per row through /proc/self/clear_refs)
  rose above its RSS before the model was built: weights, gradients, optimizer states, activations,
  allocator slack; the torch libraries themselves (~300 MB) are not in it. peak_rss_bytes in the
  JSON is the raw high-water mark.
- elsewhere (macOS CPU, MPS): not measured (None); the estimate from memory.py is in the JSON.

Out of memory is a row's result, not a crash: CUDA's OutOfMemoryError, a CPU allocation failure, or
exceeding max_memory_gb (memory.py's estimate before the row runs, or the measured peak after its
first step) mark the row "oom" and the benchmark moves on. batch_sizes='auto' doubles the batch
until the first failure, then bisects between the last size that fitted and the first that did not.
On a CPU, 'auto' without max_memory_gb uses 90% of the RAM available at start as the budget, so the
search ends before the machine swaps.

Config files: bench.py reads its own and train.py's. Keys of train.py it has no use for (batch_size,
learning_rate, out_dir, ...) are listed and skipped, because a benchmark sweeps them or they do not
change the speed; a key that neither script knows is an error. The sweep comes from the command line.
Not covered: LoRA / train_1d_only (fewer gradients and optimizer states than the full model timed here),
gradient accumulation (the same step repeated: tokens/s does not change), DDP.
"""

import contextlib
import dataclasses
import gc
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import configurator
from homegpt import memory, plan
from homegpt.weights import build_base
from homegpt.checkpoint import library_versions
from homegpt.errors import UserError
from configurator import parse_list
from homegpt.fileio import JSON_OBJECT, check_file_target, write_json
from homegpt.hf import GPT2_SHAPES
from model import GPT, GPTConfig
from homegpt.optimizers import optimizer_problems
from homegpt.autobatch import find_max_batch
from homegpt.hardware import (OverBudget, free_memory, is_oom, peak_flops, proc_status_bytes, reset_peak_rss,
                              synchronize)
from homegpt.runtime import (Dist, autocast, compile_reason, cpu_model, make_scaler, pick_device, pick_dtype,
                             seed_everything, setup_backends)
from train import TrainConfig, make_optimizer, train_step


@dataclass
class BenchConfig:
    # model shape (train.py's names, so its config files apply); the baby Shakespeare GPT by default
    init_from: str = "scratch"  # 'scratch', a GPT-2 name or a HF dir / out_dir: its shape, random weights
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256  # tokens per sequence
    vocab_size: int = 65  # 65 = Shakespeare's characters; 50304 for GPT-2's BPE padded to a multiple of 64
    dropout: float = 0.0
    fast_dropout: bool = True  # as train.py: model.py's fast CPU dropout masks and attention; False = torch's kernels
    bias: bool = True
    qkv_bias: Optional[bool] = None  # None = same as bias
    tie_weights: bool = True
    activation: str = "gelu_tanh"
    activation_checkpointing: bool = False  # less memory, more compute per step
    # the training step
    optimizer: str = "adamw"  # 'adamw', 'adamw8bit' (bitsandbytes; CUDA, or a CPU with 0.50+) or 'muon' (blocks' matrices; AdamW for the rest)
    grad_clip: float = 1.0  # as train.py: clipping costs a pass over the gradients
    # the sweep
    batch_sizes: str = "1,2,4,8"  # comma-separated, or 'auto' = the largest that fits (doubling, then bisection)
    max_batch: int = 4096  # 'auto' stops doubling here
    max_memory_gb: float = 0.0  # > 0: a row needing more counts as out of memory; 0 = the device's own limit
    dtypes: str = "float32,bfloat16"  # comma-separated: float32, bfloat16, float16, auto (runtime's choice)
    compile: str = "auto"  # 'False', 'True', 'False,True'; auto = both on CUDA, off elsewhere (compiling a row is slow on a CPU)
    eval: bool = True  # also time forward-only (inference) steps
    # timing
    warmup: int = 1  # untimed steps per row (torch.compile compiles in these)
    steps: int = 3  # timed steps per row; tokens/s is their total tokens over their total time
    # system
    device: str = "auto"  # auto = cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (torch.set_num_threads); 0 = torch's default (one per core)
    seed: int = 1337
    out_file: str = "bench.json"  # every row plus machine, versions and peak FLOP/s


# ----------------------------------------------------------------------------- parsing the knobs

def parse_args(argv):
    """BenchConfig from argv like sys.argv[1:]. Config files may be train.py's: their keys that
    BenchConfig lacks are skipped and listed; a key neither script knows is an error. Command-line
    overrides are checked strictly. Returns (cfg, skipped keys)."""
    if any(a in ("-h", "--help") for a in argv):
        return configurator.configure(BenchConfig, argv), []
    bench_keys = {f.name for f in dataclasses.fields(BenchConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    args, skipped, errors = [], [], []
    for arg in argv:
        if arg.startswith("--"):
            args.append(arg)
            continue
        try:
            values = configurator.read_config_file(arg)
        except ValueError as e:
            errors.append(str(e))
            continue
        for key, value in values.items():
            if key in bench_keys:
                # as an override, so a train.py value such as compile=True meets the same type checks
                args.append(f"--{key}={value!r}")
            elif key in train_keys:
                skipped.append(key)
            else:
                errors.append(f"{arg}: unknown config key '{key}' (neither a bench.py nor a train.py setting)")
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))
    if skipped:
        print(f"config: skipped train.py keys bench.py does not use: {', '.join(sorted(set(skipped)))}")
    return configurator.configure(BenchConfig, args), sorted(set(skipped))


def check_config(cfg):
    """All the problems with the knobs at once."""
    errors = []
    if cfg.batch_sizes != "auto":
        sizes = parse_list(cfg.batch_sizes)
        if not sizes or not all(s.isdigit() and int(s) > 0 for s in sizes):
            errors.append(f"batch_sizes={cfg.batch_sizes!r}: expected positive integers like '1,2,4,8', or 'auto'")
    bad = [d for d in parse_list(cfg.dtypes) if d not in ("float32", "bfloat16", "float16", "auto")]
    if bad or not parse_list(cfg.dtypes):
        errors.append(f"dtypes={cfg.dtypes!r}: expected a comma-separated list of float32, bfloat16, float16, auto")
    if cfg.compile.lower() != "auto" and (not parse_list(cfg.compile) or any(
            c.lower() not in ("true", "false") for c in parse_list(cfg.compile))):
        errors.append(f"compile={cfg.compile!r}: expected 'False', 'True', 'False,True' or 'auto'")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "steps", "max_batch"):
        if getattr(cfg, key) <= 0:
            errors.append(f"{key} must be positive, got {getattr(cfg, key)}"
                          + ("; train.py's 0 means the dataset's, bench needs the number (65 chars, 50304 GPT-2)"
                             if key == "vocab_size" else ""))
    if cfg.warmup < 0 or cfg.max_memory_gb < 0 or cfg.threads < 0:
        errors.append(f"warmup ({cfg.warmup}), max_memory_gb ({cfg.max_memory_gb}) and threads ({cfg.threads}) "
                      f"must be >= 0")
    errors += optimizer_problems(cfg.optimizer, cfg.device)
    if cfg.init_from != "scratch" and cfg.init_from not in GPT2_SHAPES and not Path(cfg.init_from).exists():
        errors.append(f"init_from={cfg.init_from!r}: expected 'scratch', one of {', '.join(GPT2_SHAPES)}, "
                      f"or an existing Hugging Face directory / out_dir")
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))


def model_config(cfg):
    """The GPTConfig timed. A pretrained init_from only lends its shape: the speed of a step does not
    depend on the weights' values, so GPT-2 names need no download."""
    args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                bias=cfg.bias, qkv_bias=cfg.qkv_bias, tie_weights=cfg.tie_weights, activation=cfg.activation)
    if cfg.init_from in GPT2_SHAPES:
        n_layer, n_head, n_embd = GPT2_SHAPES[cfg.init_from]
        args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, bias=True, qkv_bias=None,
                    tie_weights=True, activation="gelu_tanh", max_block=1024)
    elif cfg.init_from != "scratch":
        base = build_base(cfg.init_from).config
        args = {k: getattr(base, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "qkv_bias",
                                              "tie_weights", "activation")} | {"max_block": base.block_size}
    max_block = args.pop("max_block", None)
    if max_block is not None and cfg.block_size > max_block:
        raise UserError(f"block_size={cfg.block_size} exceeds {cfg.init_from}'s context of {max_block}")
    return GPTConfig(block_size=cfg.block_size, dropout=cfg.dropout, **args)


def compile_settings(cfg, device):
    """[False], [True] or [False, True]; 'auto' -> both on CUDA, off elsewhere (printed)."""
    if cfg.compile.lower() == "auto":
        settings = [False, True] if device.type == "cuda" else [False]
        if device.type != "cuda":
            print(f"compile: auto -> False on {device.type} (compiling forward and backward takes about a "
                  f"minute per row here; --compile=False,True to include it)")
        return settings
    return [c.lower() == "true" for c in parse_list(cfg.compile)]


# ----------------------------------------------------------------------------- device memory and clock

class PeakMemory:
    """Peak memory of one row (see the file's docstring for what each device's number means)."""

    def __init__(self, device):
        self.device, self.baseline, self.rss_ok = device, 0, False
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = 0  # max_memory_allocated counts tensors only: nothing of ours is alive now
        elif device.type == "cpu" and reset_peak_rss():
            self.baseline, self.rss_ok = proc_status_bytes("VmRSS"), True

    def peak(self):
        """Bytes this row has needed at most so far, or None where it cannot be measured."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(0, proc_status_bytes("VmHWM") - self.baseline) if self.rss_ok else None

    def peak_rss(self):
        """The process's resident high-water mark: this row's when reset worked, else the lifetime's."""
        if self.device.type != "cpu":
            return None
        if self.rss_ok:
            return proc_status_bytes("VmHWM")
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


MEMORY_MEASURES = {
    "cuda": "torch.cuda.max_memory_allocated during the row (tensors; not the CUDA context or allocator cache)",
    "cpu": "rise of the process's peak RSS (VmHWM, reset per row) above its RSS before the row's model was built",
}


# ----------------------------------------------------------------------------- one row

def new_row(dtype_name, use_compile, batch_size, block_size):
    return {"dtype": dtype_name, "compile": use_compile, "batch_size": batch_size, "block_size": block_size,
            "tokens_per_step": batch_size * block_size if batch_size else None, "status": "ok", "note": "",
            "ms_per_step": None, "ms_per_step_min": None, "tokens_per_sec": None, "mfu": None,
            "flops_per_token": None, "peak_flops": None, "warmup_s": None, "loss": None,
            "peak_memory_bytes": None, "peak_rss_bytes": None, "estimated_memory_bytes": None,
            "eval_ms_per_step": None, "eval_tokens_per_sec": None}


def run_row(cfg, shape_model, device, dtype, use_compile, batch_size, peak, budget_bytes):
    """Build, warm up and time one configuration. Failures are recorded in the row, never raised,
    except for errors that are not about this configuration (bugs, KeyboardInterrupt).
    shape_model: the GPT on the meta device, for memory.py's estimate (built once: meta init is slow)."""
    mcfg = shape_model.config
    dtype_name = str(dtype).replace("torch.", "")
    row = new_row(dtype_name, use_compile, batch_size, mcfg.block_size)
    row["peak_flops"] = peak
    mem, started = PeakMemory(device), False
    try:
        est = memory.estimate_training_memory(shape_model, batch_size, mcfg.block_size,
                                              compute_dtype_bytes=4 if dtype == torch.float32 else 2,
                                              optimizer=cfg.optimizer, activation_checkpointing=cfg.activation_checkpointing)
        row["estimated_memory_bytes"] = est["total"]
        if budget_bytes and est["total"] > budget_bytes:  # don't even try: it could swap or kill the machine
            raise OverBudget(f"estimated {est['total'] / 2**30:.2f} GB > max_memory_gb {budget_bytes / 2**30:.2f}")
        started = True
        _measure(row, cfg, mcfg, device, dtype, use_compile, batch_size, mem, budget_bytes)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError and compile failures are RuntimeErrors
        row["status"] = "oom" if is_oom(e) else "error"
        row["note"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    if started and row["peak_memory_bytes"] is None:  # how far a failed row got
        row["peak_memory_bytes"] = mem.peak()
        row["peak_rss_bytes"] = mem.peak_rss()
    if use_compile:
        # every row compiles its own model, as a fresh run would; dynamo's caches would otherwise pile
        # up across rows until its recompile limit silently sends the rest to eager mode
        torch._dynamo.reset()
    free_memory(device)
    return row


def _measure(row, cfg, mcfg, device, dtype, use_compile, batch_size, mem, budget_bytes):
    seed_everything(cfg.seed)  # the same weights and batch for every row
    model = GPT(mcfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.use_fast_dropout(cfg.fast_dropout)
    model.to(device)
    # train.py's optimizer at its default hyperparameters (a step's speed does not depend on their values)
    optimizer = make_optimizer(model, TrainConfig(optimizer=cfg.optimizer), device)
    scaler, ctx = make_scaler(device, dtype), autocast(device, dtype)
    runner = torch.compile(model) if use_compile else model
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.randint(0, mcfg.vocab_size, (batch_size, mcfg.block_size), device=device, generator=g)
    y = torch.randint(0, mcfg.vocab_size, (batch_size, mcfg.block_size), device=device, generator=g)
    dist_info = Dist()

    # --- training steps: warm-up untimed, then timed one by one
    times = []
    t_start = time.perf_counter()
    for i in range(cfg.warmup + cfg.steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = train_step(runner, optimizer, scaler, [(x, y)], ctx, cfg.grad_clip, dist_info, device).loss
        synchronize(device)
        dt = time.perf_counter() - t0
        if budget_bytes and (mem.peak() or 0) > budget_bytes:  # every step: the second one can peak higher
            raise OverBudget(f"measured {mem.peak() / 2**30:.2f} GB > max_memory_gb {budget_bytes / 2**30:.2f}")
        if i == cfg.warmup - 1:
            row["warmup_s"] = time.perf_counter() - t_start
        if i >= cfg.warmup:
            times.append(dt)
    row["peak_memory_bytes"], row["peak_rss_bytes"] = mem.peak(), mem.peak_rss()  # training's, not eval's
    row["loss"] = float(loss)
    total = sum(times)
    row["ms_per_step"] = 1000 * total / len(times)
    row["ms_per_step_min"] = 1000 * min(times)
    row["tokens_per_sec"] = row["tokens_per_step"] * len(times) / total
    row["flops_per_token"] = model.flops_per_token(mcfg.block_size)
    row["mfu"] = row["flops_per_token"] * row["tokens_per_sec"] / row["peak_flops"]

    # --- forward-only steps, as evaluation and inference run them
    if cfg.eval:
        runner.eval()
        times = []
        with torch.inference_mode(), ctx:
            for i in range(cfg.warmup + cfg.steps):
                synchronize(device)
                t0 = time.perf_counter()
                runner(x, y)
                synchronize(device)
                if i >= cfg.warmup:
                    times.append(time.perf_counter() - t0)
        runner.train()
        row["eval_ms_per_step"] = 1000 * sum(times) / len(times)
        row["eval_tokens_per_sec"] = row["tokens_per_step"] * len(times) / sum(times)


# ----------------------------------------------------------------------------- reporting

def machine_info(device):
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "device": str(device), "gpu": None,
            # other processes on the cores skew CPU numbers badly (a busy core stalls torch's thread pool)
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
    return info


def versions():
    v = library_versions()
    v["cuda"] = torch.version.cuda
    with contextlib.suppress(ImportError):
        import triton
        v["triton"] = triton.__version__
    return v


COLUMNS = ("dtype", "compile", "batch", "ms/step", "tokens/s", "MFU %", "peak MB", "eval tok/s", "status")
WIDTHS = (9, 7, 6, 9, 10, 6, 8, 10, 0)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_row(r):
    cells = (r["dtype"], str(r["compile"]), _fmt(r["batch_size"], "d"), _fmt(r["ms_per_step"], ".1f"),
             _fmt(r["tokens_per_sec"], ",.0f"), _fmt(None if r["mfu"] is None else 100 * r["mfu"], ".2f"),
             _fmt(None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20, ",.0f"),
             _fmt(r["eval_tokens_per_sec"], ",.0f"), r["status"] + (f" ({r['note']})" if r["note"] else ""))
    return "  ".join(c.rjust(w) if w else c for c, w in zip(cells, WIDTHS))


def header():
    return "  ".join(c.rjust(w) if w else c for c, w in zip(COLUMNS, WIDTHS))


# ----------------------------------------------------------------------------- main

def memory_budget(cfg, device):
    """Bytes a row may need (0: no limit but the device's): max_memory_gb, else, when batch_sizes='auto'
    searches on a CPU, 90% of the RAM available at start, so the search ends before the machine swaps."""
    if cfg.max_memory_gb or cfg.batch_sizes != "auto" or device.type != "cpu":
        return int(cfg.max_memory_gb * 2**30)
    avail = memory.device_memory(device)
    budget = int(memory.FIT_MARGIN * avail) if avail else 0
    print(f"memory: batch_sizes=auto on cpu: budget {budget / 2**30:.1f} GB (90% of the available RAM); "
          f"set --max_memory_gb to change it")
    return budget


def run(cfg):
    """The whole benchmark; returns the report (also written to cfg.out_file)."""
    check_config(cfg)
    check_file_target(cfg.out_file, "--out_file", JSON_OBJECT, "JSON report")  # a report replaces a report only
    device = pick_device(cfg.device)
    setup_backends(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mcfg = model_config(cfg)
    budget = memory_budget(cfg, device)
    with torch.device("meta"):  # shapes and counts without allocating a big model
        shape_model = GPT(mcfg)
    report = _new_report(cfg, shape_model, device)
    settings = compile_settings(cfg, device)
    if True in settings and cfg.warmup == 0:
        raise UserError("warmup=0 with compile would time the compilation itself; use --warmup=1 or more")
    sizes = None if cfg.batch_sizes == "auto" else [int(s) for s in parse_list(cfg.batch_sizes)]
    reason = compile_reason(device) if hasattr(torch, "compile") else "this PyTorch has no torch.compile"
    rows = report["rows"]
    for name in dict.fromkeys(parse_list(cfg.dtypes)):
        try:
            dtype = pick_dtype(name, device)
        except ValueError as e:  # e.g. bfloat16 on a T4: a row that says so, the others still run
            _skip(rows, name, settings, sizes, mcfg.block_size, str(e))
            continue
        real = str(dtype).replace("torch.", "")
        peak = _peak_flops_once(report, device, dtype)
        for use_compile in settings:
            if use_compile and reason:
                _skip(rows, real, [True], sizes, mcfg.block_size, reason)
            else:
                _time_batches(cfg, report, shape_model, device, dtype, use_compile, sizes, peak, budget)
    write_json(cfg.out_file, report)
    print(f"wrote {cfg.out_file}")
    return report


def _new_report(cfg, shape_model, device):
    """The report's header (config, model, machine, versions, how things are measured), printed in
    short; its rows, peak FLOP/s and largest batches are filled in as they are measured."""
    mcfg = shape_model.config
    n_params = shape_model.get_num_params()
    flops_per_token = shape_model.flops_per_token(mcfg.block_size)
    print(f"model: {n_params:,} parameters, {flops_per_token / 1e6:,.1f} MFLOPs per token (training, 6N + 12LTC), "
          f"block {mcfg.block_size}, device {device}")
    print("timing: train.train_step on random tokens already on the device (compute-bound: no data "
          f"loading); {cfg.warmup} warm-up + {cfg.steps} timed steps per row")
    return {"config": dataclasses.asdict(cfg), "model_args": dataclasses.asdict(mcfg), "n_params": n_params,
            "flops_per_token": flops_per_token, "machine": machine_info(device), "versions": versions(),
            "memory_measure": MEMORY_MEASURES.get(device.type, "not measured on this device (None)"),
            "timing": "train.train_step on random tokens already on the device (no data loading); warm-up "
                      "steps excluded; device synchronised before each clock read; tokens_per_sec = timed "
                      "tokens / timed seconds; mfu = flops_per_token * tokens_per_sec / peak_flops",
            "peak_flops": {}, "max_batch": {}, "rows": []}


def _emit(rows, row):
    """Add a row to the report and print it, under the table's header the first time."""
    if not rows:
        print(header())
    rows.append(row)
    print(format_row(row), flush=True)


def _skip(rows, name, compile_settings, sizes, block_size, note):
    """A 'skipped' row, saying why, for each configuration that cannot run here."""
    for use_compile in compile_settings:
        for b in sizes or [None]:
            _emit(rows, new_row(name, use_compile, b, block_size) | {"status": "skipped", "note": note})


def _peak_flops_once(report, device, dtype):
    """The device's peak FLOP/s in dtype (hardware.peak_flops), looked up or measured once per dtype."""
    real = str(dtype).replace("torch.", "")
    if real not in report["peak_flops"]:
        pf, source = peak_flops(device, dtype)
        report["peak_flops"][real] = {"flops": pf, "source": source}
        print(f"peak {real}: {pf / 1e12:.3f} TFLOP/s ({source})")
    return report["peak_flops"][real]["flops"]


def _time_batches(cfg, report, shape_model, device, dtype, use_compile, sizes, peak, budget):
    """A row per batch size in sizes; with sizes None, the search for the largest batch that fits."""
    def try_batch(b):
        row = run_row(cfg, shape_model, device, dtype, use_compile, b, peak, budget)
        _emit(report["rows"], row)
        return row

    if sizes is None:
        real = str(dtype).replace("torch.", "")
        best, _ = find_max_batch(try_batch, cfg.max_batch)
        report["max_batch"][f"{real}/compile={use_compile}"] = best
        print(f"largest batch that fits ({real}, compile={use_compile}): {best}")
    else:
        for b in sizes:
            try_batch(b)


def main(cfg):
    report = run(cfg)
    if not any(r["status"] == "ok" for r in report["rows"]):
        raise UserError("no configuration ran; see the status column")
    return report


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


def run_plan(cfg):
    """bench.py --plan: size the train.py run cfg describes (homegpt/plan.py), timing train.py's own step."""
    return plan.main(cfg, train_step, configurator.before_overrides(cfg, "batch_size"))


def wants_plan(argv):
    """--plan (or --plan=True) on the command line: plan a train.py run (homegpt/plan.py) instead."""
    return any(a == "--plan" or (a.startswith("--plan=") and a[7:].lower() == "true") for a in argv)


if __name__ == "__main__":
    if wants_plan(sys.argv[1:]):
        argv = [a for a in sys.argv[1:] if a != "--plan"]
        configurator.run(run_plan, PlanConfig, parse=lambda _: configurator.configure(PlanConfig, argv))
    else:
        configurator.run(main, BenchConfig, parse=lambda argv: parse_args(argv)[0])
