"""The prepared parts of benchmarks/gpu_check.py (fp16, gptj, memory24, nanogpt, levers) on a CPU:
each part's dry run fills the JSON fields the GPU run will fill, and the logs of nanoGPT and of our
train.py are read as they are printed.

    python -m pytest -q tests/test_gpu_check_prep.py
    python benchmarks/gpu_check.py --device=cpu --dry_run=True --nanogpt_dir=/path/to/nanoGPT   # the same, by hand

A GPU comes to this project rarely and for minutes: a part that breaks on arrival costs the whole
measurement. Here the same functions run at tiny shapes (gpu_rows.DRY_SHAPE), with the CUDA-only
calls (memory caps, reserved peaks) monkeypatched. nanoGPT itself is stood in for by a fake checkout
whose scripts print nanoGPT's log lines, so nothing outside the checkout is needed.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch

from helpers import ROOT

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# log lines exactly as each script prints them (nanoGPT's train.py and bench.py, our train.py)
NANOGPT_LOG = """\
tokens per iteration will be: 16,384
step 0: train loss 4.2874, val loss 4.2823
iter 0: loss 4.2649, time 29524.57ms, mfu -100.00%
iter 10: loss 3.2418, time 19.50ms, mfu 19.13%
step 250: train loss 1.9693, val loss 2.0695
step 500: train loss 1.5325, val loss 1.7218
step 1500: train loss 1.2456, val loss 1.4689
saving checkpoint to out-shakespeare-char
step 1750: train loss 1.1876, val loss 1.4712
"""
OURS_LOG = """\
iter 0: val loss 4.1523 (best)
iter 10: loss 3.9229, lr 7.04e-04, 2.8 ms, 46,115 tok/s, mfu 8.8%, eta 0.0 min
iter 250: val loss 1.9876 (best)
iter 500: val loss 1.4650 (best)
iter 750: val loss 1.4802
"""


@pytest.fixture
def gc(monkeypatch):
    """benchmarks/ as `python benchmarks/gpu_check.py` sees it, one CPU thread (several stall on a busy machine)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield types.SimpleNamespace(**{m: importlib.import_module(m) for m in
                                   ("gpu_check", "gpu_rows", "gpu_levers", "gpu_memory", "gpu_sidebyside")})
    torch.set_num_threads(threads)


def dry(gc, tmp_path, **kw):
    return gc.gpu_check.GpuCheckConfig(device="cpu", dry_run=True, out_file=str(tmp_path / "gpu_check.json"), **kw)


def stamped(text, step=1.0):
    """(seconds, line) pairs as stamped_run returns them: one line per `step` seconds."""
    return [(step * (i + 1), line) for i, line in enumerate(text.splitlines())]


# ----------------------------------------------------------------------------- reading the logs

def test_val_lines_of_both_scripts_are_read_with_their_times(gc):
    s = gc.gpu_sidebyside
    theirs = s.val_points(stamped(NANOGPT_LOG), s.NANOGPT_VAL)
    assert theirs == [(2.0, 0, 4.2823), (5.0, 250, 2.0695), (6.0, 500, 1.7218), (7.0, 1500, 1.4689),
                      (9.0, 1750, 1.4712)]  # train loss and iteration lines are not val points
    ours = s.val_points(stamped(OURS_LOG), s.OURS_VAL)
    assert ours == [(1.0, 0, 4.1523), (3.0, 250, 1.9876), (4.0, 500, 1.4650), (5.0, 750, 1.4802)]
    q = s.quality(theirs, 1.47, wall_s=8.0)
    assert (q["time_to_target_s"], q["iter_at_target"], q["val_at_target"]) == (7.0, 1500, 1.4689)
    assert (q["last_val"], q["last_val_iter"], q["best_val"], q["evals"]) == (1.4689, 1500, 1.4689, 4)  # 9.0 > wall
    q = s.quality(ours, 1.40, wall_s=100.0)
    assert q["time_to_target_s"] is None and q["last_val"] == 1.4802 and q["best_val"] == 1.4650


def test_nanogpts_timing_lines_are_read(gc):
    s = gc.gpu_sidebyside
    lines = stamped("".join(f"iter {i}: loss 3.0, time {ms}ms, mfu 30.00%\n" for i, ms in
                            enumerate([29524.57, 900.0, 80.0, 11.0, 10.0, 10.5, 9.5, 12.0])))
    ms, own = s.nanogpt_iter_ms(lines, skip=3)  # the compiling first iterations are not counted
    assert ms == 10.5 and own == pytest.approx(0.30)
    with pytest.raises(RuntimeError, match="none from iteration 20 on"):
        s.nanogpt_iter_ms(lines, skip=20)
    bench_out = stamped("Compiling model...\n19/20 loss: 10.8193\ntime per iteration: 135.6512ms, MFU: 37.81%\n")
    assert s.nanogpt_bench_ms(bench_out) == (135.6512, pytest.approx(0.3781))
    with pytest.raises(RuntimeError, match="no 'time per iteration' line"):
        s.nanogpt_bench_ms(stamped("Traceback ...\n"))


def test_a_run_is_stopped_at_its_wall_time_with_its_children(gc, tmp_path):
    child = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(child)!r}, 'w').write(str(p.pid))\n"
            "print('step 0: train loss 4.0, val loss 4.1', flush=True)\ntime.sleep(60)\n")
    run = gc.gpu_sidebyside.stamped_run([sys.executable, "-c", code], tmp_path, 3.0, tmp_path / "x.log")
    assert run["stopped_at_wall"] and run["returncode"] != 0  # killed (its own end would have been exit 0)
    assert [line for _, line in run["lines"]] == ["step 0: train loss 4.0, val loss 4.1"]
    assert 0 < run["lines"][0][0] < 3.0 and "val loss 4.1" in (tmp_path / "x.log").read_text()
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:  # SIGKILL is delivered at once; reaping may lag
        time.sleep(0.1)
    assert not alive(pid), "the run's own child outlived it: the process group was not stopped"


def alive(pid):
    """True while pid runs (a zombie, killed and not yet reaped, is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- nanoGPT stood in for

FAKE_TRAIN = '''\
import sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
if args.get("dataset") == "homegpt_random":  # the throughput fallback: nanoGPT's iteration lines
    for i in range(21):
        print(f"iter {i}: loss 10.0, time {900.0 if i < 5 else 40.0 + int(args['batch_size'])}ms, mfu 12.00%")
else:
    for step, val in ((0, 4.2), (10, 2.0), (20, 1.4)):
        print(f"step {step}: train loss {val}, val loss {val}")
'''
FAKE_PREPARE = '''\
import os, requests
assert os.path.getsize("input.txt") > 1_000_000, "our Tiny Shakespeare was not copied in"
open("train.bin", "wb").write(b"x")
'''


def fake_nanogpt(root, bench=None):
    """A read-only checkout with nanoGPT's files, whose scripts print nanoGPT's log lines."""
    files = {"train.py": FAKE_TRAIN, "model.py": "", "configurator.py": "", "config/train_shakespeare_char.py": "",
             "data/shakespeare_char/prepare.py": FAKE_PREPARE, "COMMIT": "3adf61e fake\n"}
    if bench:
        files["bench.py"] = bench
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for p in sorted(root.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    root.chmod(0o555)
    return root


@pytest.mark.slow
def test_the_nanogpt_part_runs_both_projects_and_fills_its_json(gc, tmp_path):
    src = fake_nanogpt(tmp_path / "nanoGPT")
    cfg = dry(gc, tmp_path, parts="nanogpt", nanogpt_dir=str(src), nanogpt_target=4.1)
    res = gc.gpu_sidebyside.run_nanogpt(cfg, torch.device("cpu"), torch.float32, 1e11)
    assert res["status"] == "ok", res["note"]
    assert res["nanogpt_commit"] == "3adf61e" and not list(src.glob("data/shakespeare_char/*.bin"))  # the copy ran
    q = res["quality"]
    assert [p[1:] for p in q["nanoGPT"]["points"]] == [(0, 4.2), (10, 2.0), (20, 1.4)]
    assert q["nanoGPT"]["iter_at_target"] == 10 and q["nanoGPT"]["last_val"] == 1.4
    ours = q["homegpt"]
    assert ours["returncode"] == 0 and not ours["stopped_at_wall"] and ours["evals"] == 3  # iterations 0, 10, 20
    assert ours["time_to_target_s"] > 0 and ours["val_at_target"] <= 4.1 and q["time_ratio"] > 0
    t = res["throughput"]
    assert [r["batch_size"] for r in t["nanoGPT"]] == [2, 4] == [r["batch_size"] for r in t["homegpt"]]
    best = t["best_nanoGPT"]  # the fake takes 40 + batch ms after its first 5 iterations: batch 4's 44 ms
    assert (best["method"], best["batch_size"], best["ms_per_step"]) == ("train.py", 4, 44.0)
    assert best["tokens_per_sec"] == pytest.approx(4 * 32 * 1000 / 44.0) and best["mfu"] > 0
    assert all(r["status"] == "ok" and r["tokens_per_sec"] > 0 for r in t["homegpt"])
    assert t["ratio"] == pytest.approx(t["best_homegpt"]["tokens_per_sec"] / t["best_nanoGPT"]["tokens_per_sec"])
    log = (tmp_path / "gpu_check-nanogpt.log").read_text()
    assert "===== nanoGPT-quality.log" in log and "===== homegpt-quality.log" in log and "val loss" in log
    rows = {w: r for _, w, r in gc.gpu_sidebyside.nanogpt_table(res)}
    when = f"{q['nanoGPT']['time_to_target_s']:.1f} s (iter 10) / {ours['time_to_target_s']:.1f} s (iter "
    assert rows["baby GPT: time to val <= 4.1 (nanoGPT / homegpt)"].startswith(when)
    assert rows["baby GPT: val by 90 s (nanoGPT / homegpt)"].startswith("1.4000 (iter 20) / ")
    assert "via train.py" in rows["GPT-2 124M, best micro-batch: nanoGPT"]


def test_nanogpts_bench_py_is_run_on_cuda(gc, tmp_path):
    """On a GPU, nanoGPT's own bench.py: its arguments, and tokens/s from its printed ms per iteration."""
    argv_file = tmp_path / "argv.json"
    bench = (f"import json, sys\njson.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))\n"
             "print('time per iteration: 100.0000ms, MFU: 30.00%')\n")
    work = gc.gpu_sidebyside.copy_checkout(fake_nanogpt(tmp_path / "src", bench), tmp_path / "work")
    cfg = gc.gpu_check.GpuCheckConfig()
    r = gc.gpu_sidebyside.nanogpt_throughput(cfg, work, torch.device("cuda", 0), "bfloat16", 16, 1024, tmp_path)
    assert json.loads(argv_file.read_text()) == ["--batch_size=16", "--block_size=1024", "--real_data=False",
                                                 "--bias=True", "--dtype=bfloat16", "--device=cuda:0", "--compile=True"]
    assert r["method"] == "bench.py" and r["tokens_per_sec"] == pytest.approx(16 * 1024 * 10)
    assert r["own_mfu_vs_a100"] == pytest.approx(0.30)


def test_a_copy_of_a_read_only_checkout_is_writable_and_a_wrong_dir_is_named(gc, tmp_path):
    work = gc.gpu_sidebyside.copy_checkout(fake_nanogpt(tmp_path / "src"), tmp_path / "work")
    (work / "data" / "shakespeare_char" / "train.bin").write_bytes(b"ok")  # prepare.py writes here
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a nanoGPT checkout: no train.py, model.py"):
        gc.gpu_sidebyside.copy_checkout(tmp_path / "empty", tmp_path / "w2")


def test_without_a_nanogpt_dir_the_part_is_skipped_with_a_note(gc, tmp_path):
    res = gc.gpu_sidebyside.run_nanogpt(dry(gc, tmp_path), torch.device("cpu"), torch.float32, 1e11)
    assert res["status"] == "skipped" and "--nanogpt_dir" in res["note"]
    report = {"parts": {"nanogpt": res}}
    assert gc.gpu_check.problems(report) == []  # not a failure of the check
    assert gc.gpu_check.prepared_rows(report["parts"]) == [("nanogpt", "skipped", res["note"])]


# ----------------------------------------------------------------------------- levers, fp16

def test_the_levers_part_times_each_lever_against_the_baseline(gc, tmp_path):
    cfg = dry(gc, tmp_path, lever_batches="4", lever_modes="reduce-overhead")
    res = gc.gpu_levers.run_levers(cfg, torch.device("cpu"), torch.float32, 1e11)
    rows = res["rows"]
    assert [(r["label"], r["batch_size"], r["compile_mode"], r["fused"]) for r in rows] == [
        ("baseline: compile 'default', fused AdamW", 16, "default", True), ("micro-batch 4", 4, "default", True),
        ("AdamW for-each (fused=False)", 16, "default", False), ("no torch.compile (eager)", 16, None, True),
        ("compile mode 'reduce-overhead'", 16, "reduce-overhead", True)]
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert r["ms_per_step"] > 0 and r["tokens_per_sec"] > 0 and 0 < r["mfu"] and r["estimated_bytes"] > 0
        assert r["block_size"] == 32 and r["dtype"] == "float32" and r["speedup"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[0]["mfu_points"] == 0.0
    assert res["logits_bytes_at_baseline"] == 16 * 32 * 512 * 12  # the dry run's vocabulary of 512
    table = gc.gpu_levers.levers_table(res)
    assert table[1][1] == "micro-batch 4" and table[2][1] == "AdamW for-each (fused=False), batch 16"
    assert "x the baseline's tok/s" in table[2][2] and "x the baseline" not in table[0][2]
    assert table[-1][1] == "logits at the baseline (chunked CE's target)"


def test_a_time_limit_skips_rows_and_parts_and_keeps_what_was_measured(gc, tmp_path):
    saved = []
    res = gc.gpu_levers.run_levers(dry(gc, tmp_path, lever_batches="", lever_modes=""), torch.device("cpu"),
                                   torch.float32, 1e11, deadline=time.monotonic() - 1, save=saved.append)
    assert [r["status"] for r in res["rows"]] == ["skipped"] * 3 and res["rows"][0]["speedup"] is None
    assert len(saved) == 3 and gc.gpu_check.problems({"parts": {"levers": res}}) == []
    report = gc.gpu_check.main(dry(gc, tmp_path, parts="fp16,levers", time_limit_s=1e-9))
    assert [p["status"] for p in report["parts"].values()] == ["skipped", "skipped"]
    assert report["parts"]["fp16"]["note"] == "time_limit_s=1e-09 reached before it started"


def test_window_means_and_the_scalers_calibration(gc):
    lv = gc.gpu_levers
    assert lv.calibration_skips([True, True, False, False, True, False]) == (2, 1)
    assert lv.calibration_skips([False] * 4) == (0, 0) and lv.calibration_skips([True] * 3) == (3, 0)
    ref = [4.0, 3.0, 2.0, 1.0]
    close = lv.compare_curves(ref, [4.5, 3.5, 2.02, 1.02], window=2, tolerance=0.05)
    assert close["reference_means"] == [3.5, 1.5] and close["within_tolerance"]  # the first window is not judged
    far = lv.compare_curves(ref, [4.0, 3.0, 2.2, 1.0], window=2, tolerance=0.05)
    assert not far["within_tolerance"] and far["max_diff"] == pytest.approx(0.1)


def test_the_fp16_part_compares_two_curves_from_one_seed(gc, tmp_path):
    res = gc.gpu_levers.run_fp16(dry(gc, tmp_path), torch.device("cpu"))
    assert res["status"] == "ok" and res["steps"] == 20 and res["reference_dtype"] == "bfloat16"
    assert len(res["losses"]["bfloat16"]) == len(res["losses"]["float16"]) == 20
    assert res["losses"]["bfloat16"][0] == pytest.approx(res["losses"]["float16"][0], abs=0.01)  # same weights, batch
    assert res["window"] == 2 and len(res["window_diffs"]) == 10 and res["within_tolerance"]
    assert res["skips_after_calibration"] == 0
    # the reported skips are the scaler's: each one halved its initial 65,536 (it grows only after 2,000 clean steps)
    assert res["final_scale"] == 2.0 ** 16 * 0.5 ** res["calibration_skips"]
    assert res["model_args"]["vocab_size"] == 65  # Tiny Shakespeare's characters
    (_, what, result), _ = gc.gpu_levers.fp16_table(res)
    assert what == "20 steps, bfloat16 vs float16 + GradScaler" and "within" in result


# ----------------------------------------------------------------------------- memory

@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install -e .[dev])")
def test_the_gptj_part_builds_an_int8_lora_model_and_steps(gc, tmp_path):
    res = gc.gpu_memory.run_gptj(dry(gc, tmp_path), torch.device("cpu"), torch.float32)
    r = res["row"]
    assert res["status"] == "ok" and r["status"] == "ok", r["note"]
    assert (r["batch_size"], r["block_size"], r["optimizer"], r["lora_rank"]) == (4, 32, "adamw8bit", 8)
    assert r["base_quant"] == "int8"
    assert r["activation_checkpointing"] and r["ms_per_step"] > 0 and r["peak_allocated_bytes"] is not None
    assert res["estimate"]["total"] == r["estimated_bytes"] > 0 and res["planner_fits"] is True
    assert res["budget_bytes"] == 11 * 2**30 and res["fits_budget"] in (True, False)
    assert res["model_args"] == {"n_layer": 2, "n_head": 4, "n_embd": 64, "rotary_dim": 8, "vocab_size": 512}
    rows = gc.gpu_memory.gptj_table(res)
    assert rows[1][1] == "an 11 GiB card" and "memory.py: fits" in rows[1][2]


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install -e .[dev])")
def test_the_random_gptj_base_is_int8_in_its_block_matmuls_only(gc):
    m = gc.gpu_memory
    model = m.random_quantized(m.gptj_config(m.GPTJMemoryConfig(**m.DRY_GPTJ)), torch.device("cpu"), "int8", 0)
    blocks = {n: mod for n, mod in model.named_modules() if n.startswith("transformer.h.") and n.endswith(
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))}
    assert len(blocks) == 2 * 4 and all(mod.weight.dtype == torch.int8 for mod in blocks.values())
    assert blocks["transformer.h.0.mlp.c_fc"].bias.dtype == torch.float32  # GPT-J's MLP biases stay float
    floats = [n for n, p in model.named_parameters() if p.dtype == torch.float32]
    assert "transformer.wte.weight" in floats and "lm_head.weight" in floats
    assert not [n for n, p in model.named_parameters() if p.is_meta]  # every tensor was placed


def test_the_gptj_part_says_how_to_bring_bitsandbytes(gc, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    res = gc.gpu_memory.run_gptj(dry(gc, tmp_path), torch.device("cpu"), torch.float32)
    assert res["status"] == "error" and "docs/gpu_check.md" in res["note"]
    assert gc.gpu_check.prepared_rows({"gptj": res}) == [("gptj", "error", res["note"])]


@pytest.mark.skipif(not HAS_BNB, reason="the adamw8bit rows need bitsandbytes (pip install -e .[dev])")
def test_the_memory24_part_runs_each_recipe_beside_the_planner(gc, tmp_path):
    res = gc.gpu_memory.run_memory24(dry(gc, tmp_path), torch.device("cpu"), torch.float32, 1e11)
    assert res["cap_fraction"] is None and res["note"].startswith("not capped")  # no CUDA in a dry run
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["163M Chinchilla, batch 6", "config/finetune_shakespeare.py as it is",
                      "config/finetune_shakespeare.py --optimizer=adamw8bit",
                      "config/finetune_shakespeare.py --optimizer=adamw8bit --activation_checkpointing=True",
                      "config/finetune_shakespeare.py --lora_rank=8",
                      "config/finetune_shakespeare.py --init_from=gpt2-large"]
    chinchilla, as_is, eight, ckpt, lora, large = res["rows"]
    assert chinchilla["compile_mode"] == "default" and chinchilla["batch_size"] == 6  # as the config: compile=True
    assert (eight["optimizer"], ckpt["activation_checkpointing"], lora["lora_rank"]) == ("adamw8bit", True, 8)
    for r in res["rows"]:
        assert r["status"] == "ok" and r["fits"] is True and r["planner_fits"] is True and r["estimated_bytes"] > 0
    table = gc.gpu_memory.memory24_table(res)
    assert table[0][1] == "163M Chinchilla, batch 6 (24.00 GiB cap)"
    assert table[0][2].startswith("fits; memory.py fits (agree)")


def test_the_memory24_table_flags_a_wrong_prediction_and_a_thin_margin(gc):
    row = dict(gc.gpu_rows.new_row("x", gc.gpu_rows.recipe("config/train_gpt2.py"), torch.bfloat16, 6, None, None))
    oom = row | {"status": "oom", "note": "OutOfMemoryError: CUDA out of memory", "fits": False, "planner_fits": True,
                 "marginal": False, "peak_allocated_bytes": 23 * 2**30}
    thin = row | {"status": "ok", "ms_per_step": 1.0, "tokens_per_sec": 1.0, "fits": True, "planner_fits": True,
                  "marginal": True, "peak_allocated_bytes": 2**30, "peak_reserved_bytes": 2**30}
    (_, _, a), (_, _, b) = gc.gpu_memory.memory24_table({"cap_bytes": 24 * 2**30, "rows": [oom, thin]})
    assert a.startswith("does NOT fit; memory.py fits (DISAGREE); oom: OutOfMemoryError") and "23.00 GiB" in a
    assert b.startswith("fits (marginal: < 0.5 GiB left for the context); memory.py fits (agree)")


def test_the_cuda_only_calls_cap_and_read_the_allocator(gc, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, str(d))))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 5 * 2**30)
    cuda = torch.device("cuda", 0)
    assert gc.gpu_rows.cap_memory(cuda, 24.0) == pytest.approx(0.3) and calls == [(pytest.approx(0.3), "cuda:0")]
    gc.gpu_rows.uncap_memory(cuda)
    assert calls[-1] == (1.0, "cuda:0") and gc.gpu_rows.reserved_peak(cuda) == 5 * 2**30
    with pytest.raises(ValueError, match="only 80.0 GiB, nothing to cap"):
        gc.gpu_rows.cap_memory(cuda, 96.0)
    cpu = torch.device("cpu")
    assert gc.gpu_rows.cap_memory(cpu, 24.0) is None and gc.gpu_rows.reserved_peak(cpu) is None and len(calls) == 2


def test_a_row_that_fails_is_recorded_not_raised(gc):
    tcfg = gc.gpu_rows.recipe("config/train_gpt2.py", dry_run=True)

    def build():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    row = gc.gpu_rows.train_row("x", build, tcfg, torch.device("cpu"), torch.float32, 2, (1, 1))
    assert row["status"] == "oom" and row["note"].startswith("RuntimeError: CUDA out of memory")
    def no_bnb():
        raise ValueError("no bnb")
    row = gc.gpu_rows.train_row("y", no_bnb, tcfg, torch.device("cpu"), torch.float32, 2, (1, 1))
    assert row["status"] == "error" and row["note"] == "ValueError: no bnb"


# ----------------------------------------------------------------------------- gpu_check itself

def test_a_dry_run_takes_the_prepared_parts_and_a_cpu_only_with_dry_run(gc):
    Cfg, check = gc.gpu_check.GpuCheckConfig, gc.gpu_check.check_config
    assert check(Cfg(device="cpu", dry_run=True)) == ["fp16", "gptj", "memory24", "nanogpt", "levers"]
    assert check(Cfg()) == list(gc.gpu_check.PARTS)  # one command runs everything
    with pytest.raises(ValueError) as e:
        check(Cfg(device="cpu", dry_run=True, parts="tests,levers", lever_modes="turbo", lever_batches="8,x",
                  nanogpt_dir="/no/such/dir", fp16_steps=5, cap_gib=0))
    for expected in ("dry_run=True runs only", "drop tests", "lever_modes='turbo'", "lever_batches='8,x'",
                     "nanogpt_dir='/no/such/dir' is not a directory", "fp16_steps=5", "cap_gib must be positive"):
        assert expected in str(e.value)
    with pytest.raises(ValueError, match="cpu only with --dry_run=True"):
        check(Cfg(device="cpu", parts="levers"))


def test_the_dry_run_command_writes_the_json_and_the_table(gc, tmp_path, capsys):
    cfg = dry(gc, tmp_path, parts="fp16,nanogpt")
    report = gc.gpu_check.main(cfg)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["parts"]["fp16"]["status"] == "ok" and saved["parts"]["nanogpt"]["status"] == "skipped"
    assert saved["problems"] == [] and set(saved["elapsed_s"]) == {"fp16", "nanogpt", "total"}
    assert saved["gpu"]["name"].endswith("(dry run)") and report["config"]["dry_run"] is True
    out = capsys.readouterr().out
    for row in (r"fp16 +steps the scaler skipped +\d+ while calibrating", r"nanogpt +skipped +no --nanogpt_dir",
                r"time +fp16 +\d+ s"):
        assert re.search(row, out, re.M), row


@pytest.mark.slow
def test_the_dry_run_command_line_exits_0(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device=cpu", "--dry_run=True",
                        "--parts=fp16", f"--out_file={tmp_path / 'g.json'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fp16: " in r.stdout and json.loads((tmp_path / "g.json").read_text())["parts"]["fp16"]["steps"] == 20


def test_the_docs_name_the_prepared_command():
    text = (ROOT / "docs" / "gpu_check.md").read_text()
    assert "## Prepared, not yet run" in text
    section = text.split("## Prepared, not yet run", 1)[1]
    assert "--nanogpt_dir=" in section and "bitsandbytes" in section and "carry" in section


def test_the_nanogpt_commit_is_its_own_never_the_surrounding_repositorys(gc, tmp_path):
    """A checkout copied into ours without its .git (as carried to a lent machine) must not report our
    commit, which git would find in the repository around it."""
    s = gc.gpu_sidebyside
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "outer"], check=True)
    inner = tmp_path / "nanogpt"
    inner.mkdir()
    assert s.checkout_version(tmp_path) and s.checkout_version(inner) is None
    (inner / "COMMIT").write_text("3adf61e154c3 Wed Nov 12\n")
    assert s.checkout_version(inner) == "3adf61e154c3"
