"""bench.py: the report's fields, the largest-batch search under (simulated) out-of-memory, rows that
are skipped or fail without stopping the run, MFU arithmetic, per-row peak memory, config files.

    python -m pytest -q tests/test_bench.py
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import train
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PEAK = 1e11  # a fixed peak FLOP/s: no matmul measurement in the tests, exact MFU arithmetic
ROW_FIELDS = {"dtype", "compile", "batch_size", "block_size", "tokens_per_step", "status", "note", "ms_per_step",
              "ms_per_step_min", "tokens_per_sec", "mfu", "flops_per_token", "peak_flops", "warmup_s", "loss",
              "peak_memory_bytes", "peak_rss_bytes", "estimated_memory_bytes", "eval_ms_per_step",
              "eval_tokens_per_sec"}
# one thread: on a shared, busy machine torch's two-thread pool stalls a tiny step for ~0.3 s
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, device="cpu", threads=1)


def tiny(tmp_path, **kw):
    return bench.BenchConfig(**(TINY | dict(batch_sizes="1,2", dtypes="float32", compile="False", warmup=1, steps=1,
                                            out_file=str(tmp_path / "bench.json")) | kw))


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # bench.run(threads=1) must not slow the rest of the session


@pytest.fixture
def fixed_peak(monkeypatch):
    monkeypatch.setattr(bench, "peak_flops", lambda device, dtype: (PEAK, "test: fixed"))


def oom_above(limit, calls=None):
    """train_step that fails like the CPU allocator when the batch has more than `limit` rows."""
    real = bench.train_step

    def step(model, optimizer, scaler, batches, *args):
        b = batches[0][0].shape[0]
        if calls is not None:
            calls.append(b)
        if b > limit:
            raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               f"you tried to allocate {b * 10**12} bytes.")
        return real(model, optimizer, scaler, batches, *args)
    return step


def test_report_has_every_field_per_row_and_the_machine(tmp_path, fixed_peak, monkeypatch):
    # the load average beside the numbers tells a reader whether other work slowed them down
    monkeypatch.setattr(os, "getloadavg", lambda: (1.25, 0.5, 0.25))
    report = bench.run(tiny(tmp_path, dtypes="float32,bfloat16"))
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    rows = on_disk["rows"]
    assert [(r["dtype"], r["batch_size"]) for r in rows] == [("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    for r in rows:
        assert set(r) == ROW_FIELDS, set(r) ^ ROW_FIELDS
        assert r["status"] == "ok", r["note"]
        assert r["tokens_per_step"] == r["batch_size"] * 16
        assert r["tokens_per_sec"] > 0 and r["eval_tokens_per_sec"] > 0 and r["ms_per_step"] >= r["ms_per_step_min"] > 0
        assert r["estimated_memory_bytes"] > 0
        if sys.platform.startswith("linux"):
            assert isinstance(r["peak_memory_bytes"], int) and r["peak_rss_bytes"] >= r["peak_memory_bytes"]
    m = on_disk["machine"]
    assert m["cpu"] and m["cores"] == os.cpu_count() and m["device"] == "cpu" and m["gpu"] is None
    assert m["torch_threads"] == 1 and m["load_average_1min"] == 1.25
    assert on_disk["versions"]["torch"] == torch.__version__ and on_disk["versions"]["python"]
    assert on_disk["peak_flops"] == {"float32": {"flops": PEAK, "source": "test: fixed"},
                                     "bfloat16": {"flops": PEAK, "source": "test: fixed"}}
    assert on_disk["n_params"] == GPT(GPTConfig(**{k: v for k, v in TINY.items() if k not in ("device", "threads")})).get_num_params()
    assert "no data loading" in on_disk["timing"] and on_disk["memory_measure"]


def test_mfu_is_flops_per_token_times_tokens_per_second_over_peak(tmp_path, fixed_peak):
    row = bench.run(tiny(tmp_path, batch_sizes="2"))["rows"][0]
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # 6N for the matmul weights' forward and backward, plus 12 * L * T * C for attention (PaLM, appendix B)
    assert row["flops_per_token"] == 6 * n_matmul + 12 * 2 * 16 * 32
    assert row["peak_flops"] == PEAK
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_sec"] / PEAK, rel=1e-12)
    assert row["tokens_per_sec"] == pytest.approx(row["tokens_per_step"] / (row["ms_per_step"] / 1000), rel=1e-9)


def test_warmup_steps_are_not_timed(tmp_path, fixed_peak, monkeypatch):
    n = []

    def slow_first(*args):
        n.append(1)
        time.sleep(0.6 if len(n) == 1 else 0.0)  # a first step that compiles / allocates
        return train.Step(torch.tensor(1.0), torch.tensor(1.0), True, True, 16, False)
    monkeypatch.setattr(bench, "train_step", slow_first)
    row = bench.run(tiny(tmp_path, batch_sizes="1", warmup=1, steps=3, eval=False))["rows"][0]
    assert len(n) == 4  # 1 warm-up + 3 timed
    assert row["warmup_s"] >= 0.6 and row["ms_per_step"] < 300


def test_largest_batch_search_stops_at_out_of_memory(tmp_path, fixed_peak, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train_step", oom_above(12, calls))
    report = bench.run(tiny(tmp_path, batch_sizes="auto", max_batch=64, warmup=0, steps=1, eval=False))
    assert report["max_batch"] == {"float32/compile=False": 12}
    rows = report["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2, 4, 8, 16, 12, 14, 13]  # doubling, then bisection
    assert {r["batch_size"]: r["status"] for r in rows if r["status"] != "ok"} == {16: "oom", 14: "oom", 13: "oom"}
    assert all("can't allocate memory" in r["note"] for r in rows if r["status"] == "oom")
    assert set(calls) == {1, 2, 4, 8, 16, 12, 14, 13}
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["max_batch"] == {"float32/compile=False": 12} and len(saved["rows"]) == 8


def test_find_max_batch_edges():
    def search(fits, cap, fail="oom"):
        tried = []

        def attempt(b):
            tried.append(b)
            return {"status": "ok" if fits(b) else fail}
        return bench.find_max_batch(attempt, cap)[0], tried

    assert search(lambda b: True, 20) == (20, [1, 2, 4, 8, 16, 20])  # the cap fits: stop there
    assert search(lambda b: False, 64) == (0, [1])  # not even one sequence
    assert search(lambda b: b <= 5, 64) == (5, [1, 2, 4, 8, 6, 5])
    assert search(lambda b: b < 4, 64, fail="error") == (2, [1, 2, 4])  # an error is no memory limit: stop


def test_memory_budget_rejects_rows_without_running_them(tmp_path, fixed_peak, monkeypatch):
    def never(*args):
        raise AssertionError("a row over the budget must not run")
    monkeypatch.setattr(bench, "train_step", never)
    cfg = tiny(tmp_path, batch_sizes="auto", max_memory_gb=1e-6)  # ~1 KB: below any estimate
    report = bench.run(cfg)
    assert report["max_batch"] == {"float32/compile=False": 0}
    (row,) = report["rows"]
    assert row["status"] == "oom" and "estimated" in row["note"] and "max_memory_gb" in row["note"]
    assert row["peak_memory_bytes"] is None  # never ran: no measurement to show
    with pytest.raises(ValueError, match="no configuration ran"):
        bench.main(cfg)


def test_measured_peak_over_budget_on_a_later_step_is_oom(tmp_path, fixed_peak, monkeypatch):
    reads = []

    def peak(self):
        reads.append(1)
        return 0 if len(reads) == 1 else 2 * 2**30  # the first step fits, the second one does not
    monkeypatch.setattr(bench.PeakMemory, "peak", peak)
    row = bench.run(tiny(tmp_path, batch_sizes="1", max_memory_gb=1.0, warmup=1, steps=2))["rows"][0]
    assert row["status"] == "oom" and "measured 2.00 GB > max_memory_gb 1.00" in row["note"], row["note"]
    assert row["tokens_per_sec"] is None


def test_a_failing_row_is_recorded_and_the_others_still_run(tmp_path, fixed_peak, monkeypatch):
    real = bench.train_step

    def step(model, optimizer, scaler, batches, *args):
        if batches[0][0].shape[0] == 1:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return real(model, optimizer, scaler, batches, *args)
    monkeypatch.setattr(bench, "train_step", step)
    rows = bench.run(tiny(tmp_path, batch_sizes="1,2"))["rows"]
    assert [(r["batch_size"], r["status"]) for r in rows] == [(1, "error"), (2, "ok")]
    assert "not implemented for 'Half'" in rows[0]["note"] and rows[0]["tokens_per_sec"] is None


def test_compile_unavailable_gives_skipped_rows(tmp_path, fixed_peak, monkeypatch):
    monkeypatch.setattr(bench, "compile_reason", lambda device: "no C++ compiler found for torch.compile's CPU backend")
    rows = bench.run(tiny(tmp_path, compile="False,True", eval=False))["rows"]
    assert [(r["compile"], r["batch_size"], r["status"]) for r in rows] == [
        (False, 1, "ok"), (False, 2, "ok"), (True, 1, "skipped"), (True, 2, "skipped")]
    assert all("no C++ compiler" in r["note"] for r in rows if r["compile"])


def test_unsupported_dtype_gives_skipped_rows(tmp_path, fixed_peak, monkeypatch):
    real = bench.pick_dtype

    def pick(name, device):
        if name == "bfloat16":  # as runtime.pick_dtype says on a T4
            raise ValueError("this GPU has no bfloat16 (pre-Ampere, e.g. T4/V100): use --dtype=float16 or auto")
        return real(name, device)
    monkeypatch.setattr(bench, "pick_dtype", pick)
    report = bench.run(tiny(tmp_path, dtypes="bfloat16,float32", batch_sizes="1", eval=False))
    assert [(r["dtype"], r["status"]) for r in report["rows"]] == [("bfloat16", "skipped"), ("float32", "ok")]
    assert "no bfloat16" in report["rows"][0]["note"] and list(report["peak_flops"]) == ["float32"]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="per-row peak RSS needs Linux /proc")
def test_cpu_peak_memory_is_per_row():
    first = bench.PeakMemory(torch.device("cpu"))
    a = torch.ones(50 * 2**20)  # 200 MB, touched
    del a
    assert first.peak() >= 190 * 2**20
    second = bench.PeakMemory(torch.device("cpu"))  # the next row must not inherit the first one's peak
    assert second.peak() < 50 * 2**20


def test_is_oom_recognises_each_device_s_failure():
    assert bench.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert bench.is_oom(MemoryError()) and bench.is_oom(bench.OverBudget("measured 3 GB > max_memory_gb 2"))
    assert not bench.is_oom(RuntimeError("\"addmm\" not implemented for 'Half'"))


def test_train_config_files_are_read_and_their_other_keys_skipped(capsys):
    cfg, skipped = bench.parse_args([str(ROOT / "config" / "train_shakespeare_char.py"), "--n_layer=2"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout) == (2, 6, 384, 256, 0.2)
    assert {"batch_size", "max_iters", "out_dir", "learning_rate"} <= set(skipped)
    assert "batch_size" in capsys.readouterr().out  # the user sees what was skipped
    cfg, _ = bench.parse_args([str(ROOT / "config" / "train_gpt2.py")])
    assert (cfg.vocab_size, cfg.block_size, cfg.compile) == (50304, 1024, "True")  # compile=True -> compile rows only


def test_unknown_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = 2\nn_layr = 3\n")
    with pytest.raises(ValueError, match=r"bad.py: unknown config key 'n_layr'"):
        bench.parse_args([str(bad)])
    with pytest.raises(SystemExit, match="n_layr"):
        bench.parse_args(["--n_layr=2"])  # overrides stay strict
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        bench.check_config(bench.BenchConfig(vocab_size=0))


def test_compile_without_warmup_is_refused(tmp_path):
    with pytest.raises(ValueError, match="warmup=0 with compile"):  # it would time the compilation
        bench.run(tiny(tmp_path, compile="True", warmup=0))
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.slow
def test_script_writes_the_table_and_json(tmp_path):
    out = tmp_path / "b.json"
    args = [sys.executable, str(ROOT / "bench.py"), "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--threads=1", "--batch_sizes=1,2", "--dtypes=float32", "--compile=False", "--steps=1",
            f"--out_file={out}"]
    p = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "tokens/s" in p.stdout and "peak float32" in p.stdout
    report = json.loads(out.read_text())
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"] and report["peak_flops"]["float32"]["flops"] > 0

    bad = subprocess.run(args[:-1] + ["--batch_sizes=two", f"--out_file={tmp_path / 'no.json'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "batch_sizes='two'" in bad.stderr and not (tmp_path / "no.json").exists()
