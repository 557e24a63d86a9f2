"""The precision decision: made from the actual device, with visible fallbacks and clear errors; the
TF32 switch; the KV cache's dtype under autocast; RNG state; progress bars.

    python -m pytest -q tests/test_runtime.py

CUDA behaviour is tested on the CPU by monkeypatching the torch.cuda queries runtime reads
(get_device_capability, get_device_name); tests/test_cuda.py runs the same paths on a real GPU.
"""

import io
import warnings

import pytest
import torch

from homegpt import runtime
from helpers import Terminal, fake_gpu


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch):
    """pick_dtype prints each decision once per process: every test starts with none printed."""
    monkeypatch.setattr(runtime, "_said", set(), raising=False)


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


# ----------------------------------------------------------------------------- TF32

@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_setup_backends_lets_cuda_run_float32_matmuls_as_tf32(restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    runtime.setup_backends(torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == "highest"  # nothing changes off CUDA
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from the switch
        runtime.setup_backends(torch.device("cuda"))
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    # both views stay readable: torch.compile's autotuning reads get_float32_matmul_precision, which
    # raises after a mix of the per-backend fp32_precision and the legacy switches
    assert torch.backends.cuda.matmul.allow_tf32


class LegacySwitches:
    """Stands in for torch.backends.cuda.matmul / torch.backends.cudnn and records what is written."""

    def __init__(self, written):
        object.__setattr__(self, "written", written)

    def __setattr__(self, key, value):
        self.written.append(key)


def test_setup_backends_does_not_use_the_deprecated_allow_tf32(monkeypatch, restore_matmul_precision):
    written = []
    monkeypatch.setattr(torch.backends.cuda, "matmul", LegacySwitches(written))
    monkeypatch.setattr(torch.backends, "cudnn", LegacySwitches(written))
    runtime.setup_backends(torch.device("cuda"))
    assert written == []


class BackendsSetUp(Exception):
    pass


def test_sample_and_eval_set_up_the_backends_like_train(monkeypatch):
    import eval as eval_script
    import sample
    seen = []

    def setup_backends(device):
        seen.append(device)
        raise BackendsSetUp  # enough: the script got this far, with its device
    monkeypatch.setattr(sample, "setup_backends", setup_backends)
    with pytest.raises(BackendsSetUp):
        sample.main(sample.SampleConfig(device="cpu"))
    monkeypatch.setattr(eval_script, "setup_backends", setup_backends)
    with pytest.raises(BackendsSetUp):
        eval_script.main(eval_script.EvalConfig(device="cpu", out_dir="no-such-run"))
    assert seen == [torch.device("cpu")] * 2


# ----------------------------------------------------------------------------- the KV cache's dtype

def test_kv_cache_is_kept_in_the_autocast_dtype(monkeypatch, tiny_config):
    from homegpt import generate as generation
    import model as model_lib
    made = []
    real = generation.KVCache
    monkeypatch.setattr(generation, "KVCache", lambda *a: made.append(real(*a)) or made[-1])
    torch.manual_seed(0)
    model = model_lib.GPT(tiny_config)
    prompt = torch.randint(0, 65, (2, 5))
    with torch.inference_mode():
        plain = generation.generate(model, prompt, 8, temperature=0)
        with torch.autocast("cpu", torch.bfloat16):
            cached = generation.generate(model, prompt, 8, temperature=0)
            full = generation.generate(model, prompt, 8, temperature=0, use_cache=False)
    assert [m.k.dtype for m in made] == [torch.float32, torch.bfloat16]  # the weights' dtype, then autocast's
    assert made[1].v.dtype == torch.bfloat16
    assert torch.equal(cached, full)
    assert plain.shape == cached.shape


# ----------------------------------------------------------------------------- progress bars

def test_progress_draws_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("RANK", raising=False)
    assert list(runtime.progress(range(3), "scoring")) == [0, 1, 2]
    assert "scoring:" in terminal.getvalue() and "0/3" in terminal.getvalue()
    with runtime.progress(None, "writing", total=4, unit="step") as bar:
        bar.update(4)
    assert "writing:" in terminal.getvalue()


def test_progress_is_silent_in_a_log_and_off_rank_0(monkeypatch, capfd):
    log = io.StringIO()  # a file or a pipe: isatty() is False
    monkeypatch.setattr("sys.stderr", log)
    assert list(runtime.progress(range(3), "scoring")) == [0, 1, 2]
    assert log.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setenv("RANK", "1")  # torchrun's second process: rank 0 alone draws
    assert list(runtime.progress(range(3), "scoring")) == [0, 1, 2]
    assert terminal.getvalue() == ""
    assert capfd.readouterr() == ("", "")
