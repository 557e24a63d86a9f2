"""Peak FLOP/s for MFU: data-sheet rows matched by whole GPU name, a synchronised matmul clock for the rest.

    python -m pytest -q tests/test_hardware.py

CUDA is stood in for on the CPU by monkeypatching the torch.cuda queries hardware.py reads
(get_device_name); tests/test_cuda.py runs the same paths on a real GPU.
"""

import time

import pytest
import torch

from homegpt import hardware
from helpers import fake_gpu


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA L40S", 362e12, 183e12),  # contains "L4"
    ("NVIDIA L4", 121e12, 60e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),  # contains "A10"
    ("NVIDIA A10", 125e12, 62.5e12),
    ("NVIDIA H100 PCIe", 756e12, 378e12),  # not the SXM figure
    ("NVIDIA H100 80GB HBM3", 989e12, 494.5e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 82.6e12),  # fp32 accumulate: half the advertised fp16 rate
    ("nvidia  geforce rtx 3090 ", 71e12, 35.6e12),  # case and spacing do not matter
])
def test_gpu_names_match_whole_not_by_substring(monkeypatch, name, bf16, fp32):
    cuda = fake_gpu(monkeypatch, name, (8, 0))
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda *a, **k: pytest.fail("a listed GPU was measured"))
    flops, source = hardware.peak_flops(cuda, torch.bfloat16)
    assert flops == bf16 and source.startswith(f"data sheet: {name} bfloat16; NVIDIA")
    assert hardware.peak_flops(cuda, torch.float16)[0] == bf16
    assert hardware.peak_flops(cuda, torch.float32)[0] == fp32  # TF32, which setup_backends enables


def test_every_card_of_the_issue_is_listed_and_the_a10g_is_measured():
    listed = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
              "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA L4", "NVIDIA L40S",
              "NVIDIA A10", "NVIDIA A40", "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090",
              "NVIDIA GeForce RTX 5090", "NVIDIA RTX 6000 Ada Generation", "NVIDIA RTX A6000", "NVIDIA A800-SXM4-80GB",
              "NVIDIA H800", "NVIDIA B200", "Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB", "Tesla V100-PCIE-16GB",
              "Tesla T4"]
    missing = [n for n in listed if hardware.normalize_gpu_name(n) not in hardware.GPU_PEAK_FLOPS]
    assert not missing
    assert hardware.normalize_gpu_name("NVIDIA A10G") not in hardware.GPU_PEAK_FLOPS  # no data sheet: measured
    for name, (flops, source) in hardware.GPU_PEAK_FLOPS.items():
        assert flops[torch.float16] > flops[torch.float32] > 0, name
        assert "data sheet" in source or "whitepaper" in source, name
        assert (torch.bfloat16 in flops) == (not name.startswith("tesla")), name  # V100 and T4: no bfloat16


def test_a_card_not_in_the_table_is_measured_and_says_so(monkeypatch):
    cuda = fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4080", (8, 9))
    calls = []
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda device, dtype: calls.append((device, dtype)) or 1e14)
    monkeypatch.setattr(hardware, "_measured", {})
    flops, source = hardware.peak_flops(cuda, torch.bfloat16)
    assert flops == 1e14 and calls == [(cuda, torch.bfloat16)]
    assert source == ("measured: synchronised 8192x8192 bfloat16 matmul on NVIDIA GeForce RTX 4080 "
                      "(not in hardware.GPU_PEAK_FLOPS)")
    hardware.peak_flops(cuda, torch.bfloat16)
    assert len(calls) == 1  # measured once per process
    # a T4 asked for bfloat16 (which pick_dtype never gives it) has no data-sheet row: measured too
    cuda = fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert hardware.peak_flops(cuda, torch.float16)[0] == 65e12
    assert hardware.peak_flops(cuda, torch.bfloat16)[1].startswith("measured")


def test_the_matmul_clock_waits_for_the_device(monkeypatch):
    """A stand-in for an asynchronous GPU: synchronize() is where the queued work finishes (10 ms).
    A timer read before it would see only the launch and report an absurd peak."""
    waits = []

    def synchronize(device):
        waits.append(device)
        time.sleep(0.01)
    monkeypatch.setattr(hardware, "synchronize", synchronize)
    n, repeats = 32, 3
    flops = hardware.measure_matmul_flops(torch.device("cpu"), torch.float32, n=n, repeats=repeats)
    assert flops <= 2 * n ** 3 / 0.01  # every timed interval contains a wait for the device
    assert len(waits) == 2 * repeats  # before starting the clock and before reading it
