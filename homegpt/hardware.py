"""
What this machine can do and how much it has left: peak FLOP/s by GPU and dtype (the denominator of
MFU), the matmul clock behind it, and the memory probes of a search for the largest batch (free
memory, resident-set high-water marks, what counts as out of memory).

    from homegpt.hardware import peak_flops
    flops, source = peak_flops(torch.device("cuda"), torch.bfloat16)   # data sheet, or measured
    python -c "import torch; from homegpt.hardware import peak_flops; print(peak_flops(torch.device('cpu'), torch.float32))"

train.py prints MFU against peak_flops; bench.py and autobatch.py free memory between trials and
count an allocation failure of any device (is_oom) as "too big" rather than as a crash. runtime.py
decides where and in what precision the math runs; this file only measures the device it was given.
"""

import contextlib
import gc
import sys
import time
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- peak FLOP/s for MFU

# Dense peak FLOP/s (no 2:4 sparsity) from the vendors' data sheets, keyed by the name
# torch.cuda.get_device_name reports, matched whole (after lower-casing and collapsing spaces): a
# substring match counts an L40S as an L4 and an A100 as an A10, and a MIG slice, whose name differs,
# rightly falls through to a measurement. Each entry is (16-bit tensor rate, float32 rate, source).
# - 16-bit: bf16/fp16 tensor cores with float32 accumulation, which is what autocast runs. GeForce
#   cards do that at half their fp16-accumulate rate, the number usually advertised.
# - float32: the TF32 tensor rate on Ampere and newer, since setup_backends lets float32 matmuls run
#   as TF32 there; the plain float32 rate on older cards.
# Data sheets quote "with sparsity" figures first; the dense rate is half of those.
# Not listed, hence measured: the A10G (AWS's variant of the A10, with no NVIDIA data sheet; figures
# quoted for it disagree), and every card not named here.
_A100 = (312e12, 156e12, "NVIDIA A100 data sheet: BF16/FP16 tensor 312, TF32 156 TFLOPS dense")
_H100_SXM = (989e12, 494.5e12, "NVIDIA H100 data sheet, SXM: BF16/FP16 1,979 and TF32 989 TFLOPS with sparsity, halved")
_H100_PCIE = (756e12, 378e12, "NVIDIA H100 data sheet, PCIe: BF16/FP16 1,513 and TF32 756 TFLOPS with sparsity, halved")
_H100_NVL = (835.5e12, 417.5e12, "NVIDIA H100 data sheet, NVL: BF16/FP16 1,671 and TF32 835 TFLOPS with sparsity, halved")
_V100_SXM = (125e12, 15.7e12, "NVIDIA V100 data sheet, SXM2: tensor (fp16, fp32 accumulate) 125, FP32 15.7 TFLOPS")
_V100_PCIE = (112e12, 14e12, "NVIDIA V100 data sheet, PCIe: tensor (fp16, fp32 accumulate) 112, FP32 14 TFLOPS")
_GPU_TABLE = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _H100_NVL,
    # H800 / A800: the export versions of H100 / A100, with slower NVLink and the same tensor cores
    "NVIDIA H800": _H100_SXM,
    "NVIDIA H800 PCIe": _H100_PCIE,
    "NVIDIA H200": (989e12, 494.5e12, "NVIDIA H200 data sheet, SXM: BF16/FP16 1,979 and TF32 989 TFLOPS with sparsity, halved"),
    "NVIDIA H200 NVL": (835.5e12, 417.5e12, "NVIDIA H200 data sheet, NVL: BF16/FP16 1,671 and TF32 835 TFLOPS with sparsity, halved"),
    "NVIDIA B200": (2.25e15, 1.125e15, "NVIDIA HGX B200 data sheet: BF16/FP16 36 and TF32 18 PFLOPS with sparsity for 8 GPUs, per GPU halved"),
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A800-SXM4-80GB": _A100,
    "NVIDIA A800 80GB PCIe": _A100,
    "NVIDIA A10": (125e12, 62.5e12, "NVIDIA A10 data sheet: BF16/FP16 tensor 125, TF32 62.5 TFLOPS dense"),
    "NVIDIA A40": (149.7e12, 74.8e12, "NVIDIA A40 data sheet: BF16/FP16 (fp32 accumulate) 149.7, TF32 74.8 TFLOPS dense"),
    "NVIDIA L4": (121e12, 60e12, "NVIDIA L4 data sheet: BF16/FP16 242 and TF32 120 TFLOPS with sparsity, halved"),
    "NVIDIA L40": (181e12, 90.5e12, "NVIDIA L40 data sheet: BF16/FP16 181, TF32 90.5 TFLOPS dense"),
    "NVIDIA L40S": (362e12, 183e12, "NVIDIA L40S data sheet: BF16/FP16 362, TF32 183 TFLOPS dense"),
    "NVIDIA RTX A6000": (154.8e12, 77.4e12, "NVIDIA Ampere GA102 whitepaper: RTX A6000 BF16/FP16 (fp32 accumulate) 154.8, TF32 77.4 TFLOPS dense"),
    "NVIDIA RTX 6000 Ada Generation": (364.2e12, 182.1e12, "NVIDIA Ada Lovelace whitepaper: RTX 6000 Ada BF16/FP16 (fp32 accumulate) 364.2, TF32 182.1 TFLOPS dense"),
    "NVIDIA GeForce RTX 3090": (71e12, 35.6e12, "NVIDIA Ampere GA102 whitepaper: RTX 3090 BF16/FP16 with fp32 accumulate 71, TF32 35.6 TFLOPS dense"),
    "NVIDIA GeForce RTX 4090": (165.2e12, 82.6e12, "NVIDIA Ada Lovelace whitepaper: RTX 4090 BF16/FP16 with fp32 accumulate 165.2, TF32 82.6 TFLOPS dense"),
    "NVIDIA GeForce RTX 5090": (209.5e12, 104.8e12, "NVIDIA RTX Blackwell whitepaper: RTX 5090 BF16/FP16 with fp32 accumulate 209.5, TF32 104.8 TFLOPS dense"),
    "Tesla V100-SXM2-16GB": _V100_SXM,
    "Tesla V100-SXM2-32GB": _V100_SXM,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla T4": (65e12, 8.1e12, "NVIDIA T4 data sheet: mixed precision (fp16, fp32 accumulate) 65, FP32 8.1 TFLOPS"),
}


def normalize_gpu_name(name):
    """The key GPU_PEAK_FLOPS is looked up by: lower case, single spaces."""
    return " ".join(name.lower().split())


_NO_BF16 = {"Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB", "Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB",
            "Tesla T4"}  # pre-Ampere: fp16 tensor cores only

# normalised device name -> ({dtype: FLOP/s}, source)
GPU_PEAK_FLOPS = {
    normalize_gpu_name(name): ({torch.float16: half, torch.float32: fp32}
                               | ({} if name in _NO_BF16 else {torch.bfloat16: half}), source)
    for name, (half, fp32, source) in _GPU_TABLE.items()}
_measured = {}


def synchronize(device):
    """Wait for the device's queued kernels, so a clock read measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_size(device):
    """Side of the square matmul measured: big enough to be compute-bound (8192 on a GPU, ~1 TFLOP)."""
    return {"cuda": 8192, "mps": 4096}.get(device.type, 1024)


def measure_matmul_flops(device, dtype, n=None, repeats=10):
    """Best FLOP/s of an n x n matmul in dtype on this device: the practical peak where no data sheet
    applies. CUDA and MPS run asynchronously: a kernel launch returns before the work is done, so the
    device is synchronised before each clock read; without that a GPU's "peak" is the launch latency."""
    n = n or matmul_size(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b  # warm-up: thread pools, kernel selection (cuBLAS heuristics, the first launch)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device, dtype):
    """(peak FLOP/s, where the number came from) for MFU: the data sheet of a GPU in GPU_PEAK_FLOPS,
    a measured matmul elsewhere (cached per device and dtype for the life of the process)."""
    dname = str(dtype).replace("torch.", "")
    where = device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops, source = GPU_PEAK_FLOPS.get(normalize_gpu_name(name), ({}, None))
        if dtype in flops:
            return flops[dtype], f"data sheet: {name} {dname}; {source}"
        where = f"{name} (not in hardware.GPU_PEAK_FLOPS)"
    key = (str(device), dtype)
    if key not in _measured:
        _measured[key] = measure_matmul_flops(device, dtype)
    n = matmul_size(device)
    return _measured[key], f"measured: synchronised {n}x{n} {dname} matmul on {where}"


# ----------------------------------------------------------------------------- out of memory

# messages of allocation failures that PyTorch raises as a plain RuntimeError
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


class OverBudget(RuntimeError):
    """A trial needs more memory than its budget (bench's and plan's max_memory_gb): out of memory too."""


def free_memory(device):
    """Give back what a finished or failed trial left behind, so the next one starts from the same memory."""
    gc.collect()  # an OOM traceback holds the failed step's tensors in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next row's RSS starts low


def proc_status_bytes(field):
    """A memory field of /proc/self/status ('VmRSS', 'VmHWM') in bytes, or None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset the process's resident high-water mark (VmHWM) to its current RSS: True where that worked
    (Linux >= 4.0, writing '5' to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status_bytes("VmRSS") is not None


def is_oom(err):
    """Out-of-memory errors of every device: CUDA's class, MemoryError, a CPU allocator message, the budget."""
    if isinstance(err, (MemoryError, OverBudget)) or isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MESSAGES)
