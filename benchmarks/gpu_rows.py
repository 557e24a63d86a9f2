"""
One timed training configuration of a recipe, for the prepared parts of benchmarks/gpu_check.py
(levers, memory24, gptj, the homegpt side of nanogpt): the recipe's TrainConfig, a model with random
weights made on the device itself, train.py's optimizer, torch.compile in a chosen mode, warm-up
steps then timed train.train_step calls, the peak memory, and memory.py's estimate beside it.

    python benchmarks/gpu_check.py --parts=levers,memory24                 # on a CUDA GPU
    python benchmarks/gpu_check.py --device=cpu --dry_run=True --parts=levers,memory24,gptj

bench.run_row (behind the gpt2 and chinchilla parts) times the same way: random tokens already on the
device, the device synchronised before every clock read, warm-up steps (compilation) untimed. It
builds the model on the CPU and moves it, which takes a minute of CPU initialisation for GPT-2 XL,
and it has none of the things these parts vary: the compile mode, fused or for-each AdamW, LoRA, a
quantised base, a memory cap. A dry run (--dry_run=True) shrinks every recipe to DRY_SHAPE and
compiles with dynamo's 'eager' backend, so a CPU runs the same calls in seconds.
"""

import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules sit at the root: run from a plain clone too
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import configurator  # noqa: E402
from homegpt import lora  # noqa: E402
from homegpt import memory  # noqa: E402
from bench import PeakMemory, model_config  # noqa: E402
from homegpt.weights import apply_finetune  # noqa: E402
from model import GPT  # noqa: E402
from homegpt.optimizers import make_optimizer  # noqa: E402
from homegpt.hardware import free_memory, is_oom, synchronize  # noqa: E402
from homegpt.runtime import Dist, autocast, make_scaler  # noqa: E402
from train import TrainConfig, train_step  # noqa: E402

GIB = 2 ** 30
# a dry run's model: every recipe at this shape (GPT-2's vocabulary shrunk too), a few steps, on a CPU
DRY_SHAPE = ("--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--dropout=0.0")
DRY_SCRATCH = ("--init_from=scratch", "--vocab_size=512")  # a pretrained shape (gpt2-xl) becomes this
DRY_COUNTS = (1, 2)  # (warm-up, timed) steps per row in a dry run


def recipe(config_file, overrides=(), dry_run=False, scratch=True):
    """The TrainConfig of config_file (relative to the checkout) with --key=value overrides; a dry run
    puts DRY_SHAPE on top (and DRY_SCRATCH with scratch=True, for the rows built in this process)."""
    extra = list(overrides) + (list(DRY_SHAPE) + (list(DRY_SCRATCH) if scratch else []) if dry_run else [])
    return configurator.parse_config(TrainConfig, [str(ROOT / config_file), *extra])


def step_counts(cfg):
    """(warm-up, timed) steps per row: gpu_check's knobs, a handful in a dry run."""
    return DRY_COUNTS if cfg.dry_run else (cfg.warmup, cfg.steps)


def finish(model, tcfg):
    """What train.py does to a built model: LoRA or 1-D training (weights.apply_finetune), a bfloat16
    frozen base, activation checkpointing, the dropout kernels."""
    if apply_finetune(model, dataclasses.asdict(tcfg)) and tcfg.base_dtype != "float32":
        lora.freeze_base_dtype(model, tcfg.base_dtype)
    model.activation_checkpointing = tcfg.activation_checkpointing
    model.use_fast_dropout(tcfg.fast_dropout)
    return model


def builder(tcfg, device, seed):
    """A function making tcfg's model with random weights on the device itself: GPT-2 XL's 1.6B
    parameters are initialised by the GPU in a second instead of by the CPU in a minute. A
    pretrained init_from lends only its shape (bench.model_config): speed and memory do not depend
    on the weights' values."""
    mcfg = model_config(tcfg)

    def build():
        torch.manual_seed(seed)
        with torch.device(device):
            model = GPT(mcfg)
        return finish(model, tcfg)
    return build


def shape_of(tcfg, mcfg=None):
    """tcfg's model on the meta device (nothing allocated), fine-tuned as it will be: memory.py's input."""
    with torch.device("meta"):
        model = GPT(mcfg or model_config(tcfg))
    return finish(model, tcfg)


def estimate(shape, tcfg, dtype, batch_size):
    """memory.py's estimate of one training step, as train.py prints it before a run (bytes, a dict)."""
    return memory.estimate_training_memory(shape, batch_size, tcfg.block_size,
                                           compute_dtype_bytes=4 if dtype == torch.float32 else 2,
                                           optimizer=tcfg.optimizer,
                                           activation_checkpointing=tcfg.activation_checkpointing,
                                           base_quant=tcfg.base_quant)


# ----------------------------------------------------------------------------- the device's memory

def reserved_peak(device):
    """The CUDA caching allocator's peak reservation (what a card must really hold, less the CUDA
    context); None elsewhere."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def cap_memory(device, gib):
    """Let this process's CUDA allocator reserve at most gib GiB, as on a card of that size, and
    return the fraction of this card that is; None off CUDA (a dry run), where nothing is capped.
    The CUDA context (~0.5 GiB) is outside the cap: a real card of that size has that much less."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if gib * GIB >= total:
        raise ValueError(f"cap_gib={gib:g}: this card has only {total / GIB:.1f} GiB, nothing to cap")
    fraction = gib * GIB / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def uncap_memory(device):
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def compiled(model, mode, dry_run):
    """model under torch.compile in mode ('default', 'reduce-overhead', 'max-autotune-no-cudagraphs'),
    or model itself for mode None. A dry run traces with dynamo's 'eager' backend whatever the mode:
    the same graphs are captured, nothing is code-generated (inductor takes minutes on a small CPU)."""
    if mode is None:
        return model
    if dry_run:
        return torch.compile(model, backend="eager")
    return torch.compile(model) if mode == "default" else torch.compile(model, mode=mode)


# ----------------------------------------------------------------------------- one row

def new_row(label, tcfg, dtype, batch_size, compile_mode, fused):
    return {"label": label, "batch_size": batch_size, "block_size": tcfg.block_size,
            "tokens_per_step": batch_size * tcfg.block_size, "dtype": str(dtype).replace("torch.", ""),
            "compile_mode": compile_mode, "fused": fused, "optimizer": tcfg.optimizer,
            "activation_checkpointing": tcfg.activation_checkpointing, "lora_rank": tcfg.lora_rank,
            "base_quant": tcfg.base_quant, "status": "ok", "note": "", "ms_per_step": None,
            "tokens_per_sec": None, "mfu": None, "warmup_s": None, "loss": None, "peak_allocated_bytes": None,
            "peak_reserved_bytes": None, "estimated_bytes": None}


def train_row(label, build, tcfg, device, dtype, batch_size, counts, compile_mode=None, fused=None, peak_flops=None,
              estimated_bytes=None, dry_run=False):
    """Build with build(), then warm up and time train_step at batch_size x tcfg.block_size; a dict.
    Out of memory, a failed compilation or a missing bitsandbytes is the row's status ('oom',
    'error') with the first line of the message, never raised: the other rows still run."""
    row = new_row(label, tcfg, dtype, batch_size, compile_mode, fused) | {"estimated_bytes": estimated_bytes}
    mem = PeakMemory(device)  # resets the peak: this row's build and steps alone
    try:
        _measure(row, build, tcfg, device, dtype, counts, peak_flops, dry_run)
    except (RuntimeError, MemoryError, ValueError) as e:  # OutOfMemoryError and dynamo's errors are RuntimeErrors
        row["status"] = "oom" if is_oom(e) else "error"
        row["note"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
    row["peak_allocated_bytes"], row["peak_reserved_bytes"] = mem.peak(), reserved_peak(device)
    if compile_mode:
        torch._dynamo.reset()  # a fresh compilation per row, as a fresh run would have
    free_memory(device)
    return row


def _measure(row, build, tcfg, device, dtype, counts, peak_flops, dry_run):
    warmup, steps = counts
    model = build()
    optimizer = make_optimizer(model, tcfg, device, fused=row["fused"])
    scaler, ctx = make_scaler(device, dtype), autocast(device, dtype)
    runner = compiled(model, row["compile_mode"], dry_run)
    graphs = row["compile_mode"] == "reduce-overhead" and not dry_run  # CUDA graphs: one replay per step
    g = torch.Generator(device=device).manual_seed(1337)
    shape = (row["batch_size"], tcfg.block_size)
    x, y = (torch.randint(0, model.config.vocab_size, shape, device=device, generator=g) for _ in range(2))
    times, t_start = [], time.perf_counter()
    for i in range(warmup + steps):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        synchronize(device)
        t0 = time.perf_counter()
        loss = train_step(runner, optimizer, scaler, [(x, y)], ctx, tcfg.grad_clip, Dist(), device).loss
        synchronize(device)
        if i == warmup - 1:
            row["warmup_s"] = time.perf_counter() - t_start
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    row["loss"] = float(loss)
    row["ms_per_step"] = 1000 * sum(times) / len(times)
    row["tokens_per_sec"] = row["tokens_per_step"] * len(times) / sum(times)
    if peak_flops:
        row["mfu"] = model.flops_per_token(tcfg.block_size) * row["tokens_per_sec"] / peak_flops


def past(deadline):
    """True once time.monotonic() has passed deadline (None: never)."""
    return deadline is not None and time.monotonic() > deadline


def gib(n):
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def row_text(r):
    """A row in words for the table."""
    if r["status"] != "ok":
        return f"{r['status']}: {r['note']}" + (f" (peak {gib(r['peak_allocated_bytes'])})"
                                                if r["peak_allocated_bytes"] else "")
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
    return (f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_sec']:,.0f} tok/s{mfu}, peak "
            f"{gib(r['peak_allocated_bytes'])} allocated / {gib(r['peak_reserved_bytes'])} reserved "
            f"(memory.py: {gib(r['estimated_bytes'])})")
