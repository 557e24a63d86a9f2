"""
Where and how the math runs: device, precision, distributed setup, signals, seeding, RNG state.

    from homegpt.runtime import pick_device, pick_dtype, autocast
    device = pick_device("auto"); dtype = pick_dtype("auto", device)
    with autocast(device, dtype):
        logits, loss = model(x, y)
    python -c "from homegpt.runtime import pick_device, pick_dtype; d = pick_device('auto'); print(d, pick_dtype('auto', d))"

train, sample, eval and bench all take their precision from here, so the dtype decision lives in
exactly one place: a copy pasted into each script drifts, and a script then runs in another precision
than the one its printed config claims. It is made after the config is resolved, from the actual
device, and never calls a CUDA query on a machine without CUDA. Progress bars for long work
(progress) live here too, beside print0: both speak on rank 0 only. What the device can do, its peak
FLOP/s and how much memory it has left, is measured in hardware.py.
"""

import base64
import contextlib
import os
import platform
import random
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from homegpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def print0(*args, **kwargs):
    """print on the first rank only (or always, outside torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def progress(iterable=None, desc="", total=None, unit="it"):
    """A tqdm bar over iterable (or, with iterable None, one to .update(n) by hand) for work that takes
    minutes: drawn on stderr when stderr is a terminal, nothing at all when it goes to a log file or a
    pipe (tqdm's disable=None), and under torchrun on rank 0 only, so N ranks do not draw N bars.
    leave=False: the bar is erased when done, so what stays on the screen is the results."""
    quiet = int(os.environ.get("RANK", "0")) != 0
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                disable=True if quiet else None)


def pick_device(name):
    """'auto' -> cuda, then mps, then cpu. An explicit device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but this PyTorch has no usable CUDA; use --device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name!r} but MPS is not available; use --device=cpu or auto")
    return device


def cpu_has_bf16():
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def cuda_has_bf16(device):
    """(True if the GPU computes bfloat16 natively, the reason in words) for a CUDA device.

    Decided from the compute capability, not torch.cuda.is_bf16_supported(): on recent PyTorch that
    counts emulated bfloat16 as support (its including_emulation defaults to True), so a T4 (7.5) or
    V100 (7.0) would get bf16 matmuls several times slower than float16. Tensor cores
    with bfloat16 arrived with Ampere, compute capability 8.0. ROCm reports AMD's own version
    numbers here, so there torch's answer stands (every AMD GPU it supports has bfloat16)."""
    name = torch.cuda.get_device_name(device)
    if torch.version.hip:
        return True, f"{name}, ROCm: AMD GPUs compute bfloat16"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return True, f"{name}, compute capability {major}.{minor} >= 8.0 computes bfloat16 natively"
    return False, f"{name}, compute capability {major}.{minor} < 8.0 has no native bfloat16"


_said = set()


def print_once(message):
    """print0 a message the first time only: pick_dtype runs in several places of one process."""
    if message not in _said:
        _said.add(message)
        print0(message)


def pick_dtype(name, device, decoding=False):
    """'auto': bfloat16 where the device computes it natively, else float16 on CUDA (with a GradScaler),
    else float32. On CUDA the choice and its reason are printed once. An explicit bfloat16 on a GPU
    without it falls back to float16, visibly; any other choice the device cannot run is an error.

    decoding: one token at a time on a CPU is bound by reading the weights, and autocast re-casts
    every weight for every token: 'auto' is float32 there (benchmarks/sampling.py compares them)."""
    if name == "auto":
        if device.type == "cuda":
            native, why = cuda_has_bf16(device)
            print_once(f"dtype: auto -> {'bfloat16' if native else 'float16 + GradScaler'} ({why})")
            return torch.bfloat16 if native else torch.float16
        if device.type == "cpu" and cpu_has_bf16() and not decoding:
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("dtype=float16 on a CPU: CPUs have no fast float16 matmuls (tens of times slower than "
                        "float32) and it saves nothing else; use float32, or bfloat16 (fast on CPUs with AVX512-BF16 "
                        "or AMX)")
    if dtype == torch.bfloat16 and device.type == "cuda":
        native, why = cuda_has_bf16(device)
        if not native:
            # configs written for Ampere+ should still run on a T4/V100: fall back, visibly
            print_once(f"dtype: bfloat16 -> float16 + GradScaler ({why})")
            return torch.float16
    return dtype


def autocast(device, dtype):
    """Mixed precision context: weights stay float32, matmuls run in dtype. A no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device, dtype):
    """A GradScaler, enabled only for float16 (bfloat16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))


def setup_backends(device):
    """Process-wide math settings for the device; train, sample, eval and bench call it once.

    CUDA: float32 matmuls may run as TF32 on tensor cores (Ampere and newer; ~8x the plain float32
    rate, 10 mantissa bits in, float32 accumulation). torch.set_float32_matmul_precision('high') is
    the switch: it sets torch.backends.cuda.matmul.fp32_precision = 'tf32' and keeps the legacy
    view consistent. Two alternatives are deliberately not used: `matmul.allow_tf32 = True`, the
    deprecated spelling, and setting only the per-backend `fp32_precision`, after which torch 2.13
    raises a RuntimeError from torch.get_float32_matmul_precision() ("mix of the legacy and new
    APIs"), which torch.compile's autotuning calls. cuDNN (convolutions, none here) already defaults
    to TF32. Elsewhere nothing is changed."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def compile_reason(device):
    """None when torch.compile can run here, else why not."""
    if device.type == "mps":
        return "torch.compile does not support MPS"
    if sys.platform == "win32":
        return "torch.compile's default backend needs Triton/a C++ toolchain that Windows installs lack"
    if device.type == "cpu":
        import shutil
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return "no C++ compiler found for torch.compile's CPU backend"
    return None


def cpu_model():
    """The CPU's marketing name (Linux /proc/cpuinfo, macOS sysctl), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


# Rank 0 alone evaluates and writes checkpoints (with optimizer state, gpt2-xl's is ~20 GB) while the
# other ranks wait at the next collective. NCCL's default of 10 minutes would kill a healthy run
# there; a genuinely hung rank still fails, after this long.
def init_distributed(device_name, backend="auto", timeout_s=600.0):
    """Read torchrun's environment; start the process group. backend 'auto' = nccl on CUDA, gloo on
    CPU (and MPS). Returns (Dist, device). Outside torchrun: one process, device from pick_device.
    timeout_s: how long a collective waits for a rank that does not answer (a hung or stopped
    process, a dead link) before it fails, ending the job, which torchrun may then restart; the
    process group's own default is 30 minutes of silence."""
    if backend not in ("auto", "nccl", "gloo"):
        raise UserError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), pick_device(device_name)
    import datetime
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                             f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"backend='nccl' needs CUDA devices, but device is {device.type}: use backend='gloo' or 'auto'")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    # torchrun keeps its store across the restarts of a job (--max-restarts): the ranks of a restarted
    # group would read the addresses the dead group's ranks published there, and fail to connect
    store = dist.PrefixStore(f"homegpt/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if backend == "nccl" else None)
    return Dist(rank, local_rank, world_size), device


def gather_objects(obj, dist_info):
    """[obj of rank 0, obj of rank 1, ...] on every rank (JSON-able objects; [obj] in one process)."""
    if not dist_info.enabled:
        return [obj]
    import torch.distributed as dist
    out = [None] * dist_info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, dist_info):
    """Rank 0's obj on every rank (JSON-able objects; obj itself in one process). Every rank calls it."""
    if not dist_info.enabled:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist_info, device):
    """Wait for every rank (a no-op in one process)."""
    if not dist_info.enabled:
        return
    import torch.distributed as dist
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index])  # names the GPU, or NCCL guesses and may hang
    else:
        dist.barrier()


def close_distributed(dist_info):
    if dist_info.enabled:
        import torch.distributed as dist
        dist.destroy_process_group()


def shard_model(model):
    """FSDP (fully_shard, PyTorch >= 2.6), in place: each transformer block is one unit and the root
    holds the rest. Parameters, gradients and optimizer states are split across ranks; a block's
    weights are gathered just for its forward and backward.

    wte and lm_head stay in the root unit so the tied weight remains one parameter (a test checks
    that the tie survives). Precision is left to autocast, exactly as without FSDP: the parameters,
    the gradient reduce-scatter and the optimizer stay float32 while matmuls run in bf16, so the loss
    matches DDP's. (MixedPrecisionPolicy(param_dtype=bf16) would halve the all-gather traffic but
    also run LayerNorm, softmax and the loss in bf16.)
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise UserError(f"fsdp=True needs PyTorch >= 2.6 (torch.distributed.fsdp.fully_shard); this is "
                         f"{torch.__version__} ({e}). Upgrade PyTorch or use DDP (fsdp=False)") from e
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    if model.config.tie_weights:
        assert model.lm_head.weight is model.transformer.wte.weight, "FSDP broke the wte/lm_head tie"
    return model


def wrap_for_training(model, device, dist_info, fsdp, compile_model):
    """What trains: the model, compiled where torch.compile can run (else the reason is printed),
    inside DDP under torchrun unless FSDP already sharded it in place."""
    runner = model
    if compile_model:
        reason = compile_reason(device)
        if reason:
            print0(f"compile: off ({reason})")
        else:
            print0("compile: compiling the model (the first iterations are slow)")
            runner = torch.compile(model)
    if dist_info.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # gradient_as_bucket_view: the gradients live in DDP's communication buckets instead of
        # beside them, one copy of the gradients fewer
        runner = DDP(runner, device_ids=[dist_info.local_rank] if device.type == "cuda" else None,
                     gradient_as_bucket_view=True)
    return runner


class StopFlag:
    """SIGTERM / Ctrl-C ask the training loop to finish its step (or leave its evaluation), save and
    exit; a second Ctrl-C aborts. Under torchrun every rank gets the signal; train_step makes them agree."""

    def __init__(self):
        self.signum = None
        # the handlers to put back when training ends: a process that goes on (a test, a notebook, a
        # multiprocessing pool forked later) must not inherit one that only sets a flag
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print0(f"\n{signal.Signals(signum).name}: finishing this step (an evaluation stops at its next batch), then "
               f"saving a checkpoint (Ctrl-C again aborts without saving)")


class NoInferenceMode(torch.nn.Module):
    """Runs a sharded model's forward under no_grad even when the caller is in torch.inference_mode.

    FSDP gathers a block's weights into buffers it allocates once and reuses; allocated inside
    inference_mode they become inference tensors, and the next training step's gather into them
    fails ("Inplace update to inference tensor outside InferenceMode"). evaluate_loss uses
    inference_mode, so under FSDP train.py hands it this wrapper.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.model(*args, **kwargs)


def all_reduce_sum(value, device, dist_info):
    """Sum a float across ranks (a no-op in one process)."""
    if not dist_info.enabled:
        return value
    import torch.distributed as dist
    t = torch.tensor([float(value)], device=device, dtype=torch.float64 if device.type != "mps" else torch.float32)
    dist.all_reduce(t)
    return t.item()


# ----------------------------------------------------------------------------- seeding and RNG state

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed, rank, step):
    """The torch seed for one optimizer step of one rank. Re-seeding every step makes dropout a pure
    function of (seed, rank, step), so a resumed run draws the same masks as an uninterrupted one,
    on any world size."""
    return hash((seed, rank, step)) & 0x7FFF_FFFF_FFFF_FFFF  # int tuples hash the same in every process


def rng_state():
    """Python, numpy, torch CPU and CUDA RNG states as JSON-able values."""
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()
    py = random.getstate()
    npk = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npk[0], npk[1].tolist(), int(npk[2]), int(npk[3]), float(npk[4])],
             "torch": b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    unb64 = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npk = state["numpy"]
    np.random.set_state((npk[0], np.array(npk[1], dtype=np.uint32), npk[2], npk[3], npk[4]))
    torch.set_rng_state(unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])
