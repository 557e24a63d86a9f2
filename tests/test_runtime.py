"""The precision decision: made from the actual device, with visible fallbacks and clear errors."""

import pytest
import torch

import runtime


def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.pick_dtype("auto", cpu) == torch.bfloat16
    assert runtime.pick_dtype("auto", cpu, decoding=True) == torch.float32  # token-by-token: float32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.pick_dtype("auto", cpu) == torch.float32
    assert runtime.pick_dtype("bfloat16", cpu) == torch.bfloat16  # asked for: autocast works on CPU


def test_gpu_without_bf16_falls_back_to_float16_visibly(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda = torch.device("cuda")  # no CUDA needed: only the capability query is consulted
    assert runtime.pick_dtype("auto", cuda) == torch.float16
    assert runtime.pick_dtype("bfloat16", cuda) == torch.float16
    assert "no bfloat16" in capsys.readouterr().out
    assert runtime.make_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not runtime.make_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()


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
