"""The precision decision: made from the actual device, with visible fallbacks and clear errors; the
peak FLOP/s behind MFU; the TF32 switch; the KV cache's dtype under autocast.

    python -m pytest -q tests/test_runtime.py

CUDA behaviour is tested on the CPU by monkeypatching the torch.cuda queries runtime reads
(get_device_capability, get_device_name); tests/test_cuda.py runs the same paths on a real GPU.
"""

import time
import warnings

import pytest
import torch

import runtime


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch):
    """pick_dtype prints each decision once per process: every test starts with none printed."""
    monkeypatch.setattr(runtime, "_said", set(), raising=False)


def fake_gpu(monkeypatch, name, capability):
    """torch.cuda answering as the named card would, on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # what recent torch says on a T4: emulated bfloat16 counts as support (PITFALLS 19)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return torch.device("cuda")  # no CUDA needed: only the queries above are consulted


def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.pick_dtype("auto", cpu) == torch.bfloat16
    assert runtime.pick_dtype("auto", cpu, decoding=True) == torch.float32  # token-by-token: float32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.pick_dtype("auto", cpu) == torch.float32
    assert runtime.pick_dtype("bfloat16", cpu) == torch.bfloat16  # asked for: autocast works on CPU


@pytest.mark.parametrize("name, capability", [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0)),
                                              ("NVIDIA GeForce RTX 2080 Ti", (7, 5))])
def test_gpu_without_native_bf16_gets_float16_from_its_compute_capability(monkeypatch, capsys, name, capability):
    cuda = fake_gpu(monkeypatch, name, capability)
    assert runtime.pick_dtype("auto", cuda) == torch.float16
    assert runtime.pick_dtype("auto", cuda) == torch.float16
    major, minor = capability
    reason = f"{name}, compute capability {major}.{minor} < 8.0 has no native bfloat16"
    out = capsys.readouterr().out
    assert out.count(f"dtype: auto -> float16 + GradScaler ({reason})") == 1  # said once, with its reason
    # a config written for Ampere+ asking for bfloat16 still runs, visibly in float16
    assert runtime.pick_dtype("bfloat16", cuda) == torch.float16
    assert f"dtype: bfloat16 -> float16 + GradScaler ({reason})" in capsys.readouterr().out
    assert runtime.pick_dtype("float32", cuda) == torch.float32
    assert runtime.make_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not runtime.make_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()


@pytest.mark.parametrize("name, capability", [("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA GeForce RTX 3090", (8, 6)),
                                              ("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA GeForce RTX 5090", (12, 0))])
def test_ampere_and_newer_get_bfloat16(monkeypatch, capsys, name, capability):
    cuda = fake_gpu(monkeypatch, name, capability)
    assert runtime.pick_dtype("auto", cuda) == torch.bfloat16
    assert runtime.pick_dtype("bfloat16", cuda) == torch.bfloat16
    major, minor = capability
    assert capsys.readouterr().out == (f"dtype: auto -> bfloat16 ({name}, compute capability {major}.{minor} "
                                       f">= 8.0 computes bfloat16 natively)\n")


def test_rocm_keeps_torchs_answer(monkeypatch):
    cuda = fake_gpu(monkeypatch, "AMD Instinct MI250X", (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert runtime.pick_dtype("auto", cuda) == torch.bfloat16


def test_bad_dtype_and_missing_device_are_errors():
    with pytest.raises(ValueError, match="dtype must be"):
        runtime.pick_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            runtime.pick_device("cuda")


def test_rng_state_round_trips_through_json():
    import json
    state = json.loads(json.dumps(runtime.rng_state()))
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    runtime.set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
