"""The benchmark scripts run end to end with tiny settings and print their RATIO lines.

    python -m pytest -q tests/test_benchmarks.py

No speed is asserted here (a shared CI machine is no place for timing); what is checked is what
the figures rest on: both sides of a comparison see the same data and produce the same results.
"""

import dataclasses
import importlib
import json
import math
import re

import pytest

from helpers import ROOT, char_dataset

RATIO = re.compile(r"^RATIO (.+?): (\d+\.\d+)x \(", re.M)


@pytest.fixture
def bench(monkeypatch):
    """Import a script from benchmarks/ the way `python benchmarks/x.py` would see its neighbours."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("data"), n_chars=30_000)


TINY = "--n_layer=2 --n_head=2 --n_embd=32 --block_size=16"


def ratios(out):
    return {name: float(r) for name, r in RATIO.findall(out)}


def test_train_throughput_same_loss_when_both_sides_are_float32(bench, data_dir, capsys):
    # a fast side that is numerically the baseline must log exactly its losses: this pins that the two
    # sides run in lockstep on the same batches, learning rates and dropout masks (dropout 0.2 here,
    # torch's dropout on both sides)
    tt = bench("train_throughput")
    cfg = tt.ThroughputConfig(train_args=f"{TINY} --data_dir={data_dir}", batch_size=4, steps=4, warmup_steps=1,
                              log_interval=2, fast_dtype="float32", fused=False, fast_dropout=False)
    res = tt.main(cfg)
    out = capsys.readouterr().out
    assert "train_throughput" in ratios(out)
    assert [step for step, _ in res["logged"]] == [2, 4]
    assert res["max_loss_diff"] == 0.0
    assert "LOSS max" in out and "tolerance 0.02: met" in out


def test_train_throughput_fast_side_tracks_float32(bench, data_dir, capsys):
    # bfloat16 where the CPU has it, and model.fast_dropout's masks against torch's (dropout 0.2)
    tt = bench("train_throughput")
    res = tt.main(tt.ThroughputConfig(train_args=f"{TINY} --data_dir={data_dir}", batch_size=4, steps=3,
                                      warmup_steps=1, log_interval=1))
    assert "train_throughput" in ratios(capsys.readouterr().out)
    assert res["max_loss_diff"] < 0.02
    losses = [l for _, row in res["logged"] for l in row.values()]
    assert all(math.isfinite(l) and 3.0 < l < 5.0 for l in losses)  # ~ln(65) = 4.17 at the start


def test_train_throughput_rejects_steps_without_timing(bench, data_dir):
    tt = bench("train_throughput")
    with pytest.raises(ValueError, match="warmup_steps"):
        tt.main(tt.ThroughputConfig(train_args=f"{TINY} --data_dir={data_dir}", steps=2, warmup_steps=2))


def test_sampling_cache_matches_recompute_inside_and_past_the_block(bench, capsys):
    sm = bench("sampling")
    # block 16 with 1 + 24 tokens outgrows the context (the cache is dropped past it); block 64 fits
    res = sm.main(sm.SamplingConfig(block_sizes="16,64", n_layer=2, n_head=2, n_embd=32, max_new_tokens=24,
                                    repeats=1, dtype="float32"))
    out = capsys.readouterr().out
    assert set(ratios(out)) == {"sampling block 16", "sampling block 64"}
    assert out.count("identical tokens") == 2
    assert all(first_diff is None for _, first_diff in res.values())
    assert "outgrows it after 15 new tokens" in out and "(fits)" in out


def test_sampling_documented_quick_check_runs(bench, capsys):
    # the docstring's quick-check command, exactly as a reader would paste it (it once crashed:
    # n_embd=64 with the default 6 heads)
    from configurator import parse_config
    sm = bench("sampling")
    lines = [l.split() for l in sm.__doc__.splitlines() if "--block_sizes=32,128" in l]
    assert len(lines) == 1 and lines[0][:2] == ["python", "benchmarks/sampling.py"], lines
    cfg = parse_config(sm.SamplingConfig, lines[0][2:])
    res = sm.main(dataclasses.replace(cfg, repeats=1))  # fewer timed rounds; the same model and tokens
    out = capsys.readouterr().out
    assert set(ratios(out)) == {"sampling block 32", "sampling block 128"}
    assert all(first_diff is None for _, first_diff in res.values())


def test_sampling_rejects_bad_block_list_and_head_split(bench):
    sm = bench("sampling")
    with pytest.raises(ValueError, match="block_sizes"):
        sm.main(sm.SamplingConfig(block_sizes="0"))
    with pytest.raises(ValueError, match=r"^n_embd=64 is not a multiple of n_head=6: .*--n_head="):
        sm.main(sm.SamplingConfig(n_embd=64, n_head=6))


def test_eval_throughput_fast_loss_agrees_with_float32(bench, data_dir, capsys):
    ev = bench("eval_throughput")
    res = ev.main(ev.EvalThroughputConfig(data_dir=str(data_dir), n_layer=2, n_head=2, n_embd=32, block_size=16,
                                          batch_size=4, max_batches=3, repeats=1))
    out = capsys.readouterr().out
    assert "eval_throughput" in ratios(out)
    a, b = res["losses"].values()
    assert abs(a - b) < 0.02 and 3.0 < b < 5.0


@pytest.mark.slow
def test_memory_rss_runs_train_on_both_files(bench, tmp_path, capsys):
    mr = bench("memory_rss")
    res = mr.main(mr.MemoryConfig(big_gb=0.002, small_tokens=50_000, steps=2, batch_size=4,
                                  train_args=TINY, work_dir=str(tmp_path)))
    out = capsys.readouterr().out
    assert "memory_rss" in ratios(out)
    assert 50e6 < res["small"] < 4e9 and 50e6 < res["large"] < 4e9  # a real process's RSS, in bytes
    assert (tmp_path / "large" / "train.bin").stat().st_size == 2_000_000
    meta = json.loads((tmp_path / "large" / "meta.json").read_text())
    assert meta["train_tokens"] == 1_000_000


def test_memory_rss_reports_a_failed_run(bench, tmp_path):
    mr = bench("memory_rss")
    with pytest.raises(RuntimeError, match="exit code"):
        mr.peak_rss_of_run(["python", "-c", "raise SystemExit(3)"], tmp_path / "log.txt")


@pytest.mark.slow
def test_time_to_quality_reads_the_final_val_loss(bench, data_dir, capsys, tmp_path):
    ttq = bench("time_to_quality")
    recipe = "config/train_shakespeare_char_cpu.py"
    res = ttq.main(ttq.TimeToQualityConfig(
        recipes=recipe, targets="1.55", budgets_s="nanogpt", plot=str(tmp_path / "ttq.png"),
        train_args=f"{TINY} --data_dir={data_dir} --batch_size=4 --max_iters=3 --eval_iters=2 --dtype=float32 "
                   f"--log_interval=1"))
    out = capsys.readouterr().out
    assert f"RESULT time_to_quality {recipe}: val loss" in out and "NOT met" in out  # 3 steps: far from 1.55
    assert "time_to_quality vs nanoGPT (documented, on the Xeon)" in ratios(out)
    r = res[recipe]
    assert r["iter"] == 3 and 3.0 < r["loss"] < 5.0 and r["seconds"] > 0 and len(r["curve"]) == 3
    assert (tmp_path / "ttq.png").stat().st_size > 0 or "matplotlib is not installed" in out


def test_time_to_quality_takes_the_last_val_loss(bench, tmp_path):
    ttq = bench("time_to_quality")
    lines = [{"iter": 0, "tokens": 0, "val_loss": 4.2}, {"iter": 10, "tokens": 80, "train_loss": 3.0,
             "tokens_per_sec": 100.0}, {"iter": 20, "tokens": 160, "val_loss": 2.5, "train_loss": 2.6,
             "tokens_per_sec": 300.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    assert ttq.final_metrics(tmp_path) == (2.5, 20, 300.0)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(RuntimeError, match="no val_loss"):
        ttq.final_metrics(tmp_path)
