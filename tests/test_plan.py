"""plan.py (bench.py --plan) and train.py --batch_size=auto: the micro-batch search under a simulated
memory cap and a simulated CUDA out-of-memory, the time bound, the plan's arithmetic checked by hand,
a checkpoint's real size against the plan's, the free-disk refusal, and auto keeping tokens per step.

    python -m pytest -q tests/test_plan.py
"""

import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from homegpt import autobatch, memory, plan, runtime
import configurator
from homegpt.errors import UserError
import bench
import train
from helpers import char_dataset, tiny_train_config
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, device="cpu", dtype="float32",
            compile=False, dropout=0.0, eval_iters=4, eval_interval=10, max_iters=40, keep_last_n=2)


def plan_config(tmp_path, **kw):
    return bench.PlanConfig(**(TINY | dict(out_dir=str(tmp_path / "out"), plan_file=str(tmp_path / "plan.json"),
                                          calibration_s=5.0, batch_size=4, gradient_accumulation_steps=3) | kw))


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.0))


def oom_above(limit):
    """train_step that fails as CUDA does when a micro-batch has more than `limit` rows."""
    real = train.train_step

    def step(model, optimizer, scaler, batches, *args):
        if batches[0][0].shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, optimizer, scaler, batches, *args)
    return step


def test_a_simulated_out_of_memory_gives_the_largest_batch_and_an_exact_accumulation(tmp_path):
    # the home run: 6 fit and 7 did not; 6 x 80 sequences per step -> micro-batch 6, accumulation 80
    cfg = plan_config(tmp_path, batch_size=6, gradient_accumulation_steps=80)
    result = autobatch.search(oom_above(6), tiny_model(), cfg, torch.device("cpu"), torch.float32, 480, time_s=60,
                              min_timed_s=0.0)
    tried = [t["batch_size"] for t in result["trials"]]
    assert tried == [1, 2, 4, 8, 6, 7] and result["largest"] == 6
    assert [t["status"] for t in result["trials"]] == ["ok", "ok", "ok", "oom", "ok", "oom"]
    assert "OutOfMemoryError" in result["trials"][3]["note"]


def test_a_memory_cap_stops_at_the_batch_the_estimate_allows(tmp_path, monkeypatch):
    model = tiny_model()
    cfg = plan_config(tmp_path)
    est = [memory.estimate_training_memory(model, b, 32)["total"] for b in range(1, 40)]
    cap = (est[10] + est[11]) / 2  # micro-batch 11 fits, 12 does not
    monkeypatch.setattr(autobatch, "proc_status_bytes", lambda field: None)  # estimates only: no CPU RSS measurement
    result = autobatch.search(train.train_step, model, cfg, torch.device("cpu"), torch.float32, 64, time_s=60,
                              min_timed_s=0.0, max_memory_gb=cap / 2**30)
    assert result["largest"] == 11 and abs(result["budget_bytes"] - cap) <= 1
    over = [t for t in result["trials"] if t["status"] == "oom"]
    assert over and all(t["estimate_bytes"] > cap and "not tried" in t["note"] for t in over)
    # 64 sequences per step: the largest divisor that fits (8) is timed and is a candidate
    assert 8 in [t["batch_size"] for t in result["trials"] if t["status"] == "ok"]


def test_the_search_starts_nothing_after_its_time(tmp_path, monkeypatch):
    """A clock the test owns (no wall clock: a loaded machine would make it flaky): each step takes 0.2 s
    of it, and nothing else moves it."""
    clock = {"now": 0.0}
    monkeypatch.setattr(autobatch, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    real = train.train_step

    def slow(*args):
        clock["now"] += 0.2
        return real(*args)
    cfg = plan_config(tmp_path)
    result = autobatch.search(slow, tiny_model(), cfg, torch.device("cpu"), torch.float32, 64, time_s=0.5, min_timed_s=0.0)
    statuses = [t["status"] for t in result["trials"]]
    assert statuses[0] == "ok" and "time" in statuses
    assert all(s == "time" for s in statuses[statuses.index("time"):])  # nothing tried once the time was up
    # each trial is 3 steps of 0.2 s: the time bound plus the one trial under way when it ran out
    assert clock["now"] <= 0.5 + 3 * 0.2 + 1e-9, clock["now"]


def test_evaluation_and_checkpoint_counts_follow_the_training_loop():
    assert plan.count_evaluations(470, 100000) == 2  # iteration 0 and the last
    assert plan.count_evaluations(100, 25) == 5 and plan.count_evaluations(101, 25) == 6
    cfg = train.TrainConfig(max_iters=100, eval_interval=25, keep_last_n=3)
    assert plan.count_saves(cfg, 5) == 4  # not at iteration 0
    assert plan.checkpoints_on_disk(cfg, 4) == 4 and plan.checkpoints_on_disk(cfg, 40) == 5
    assert plan.checkpoints_on_disk(train.TrainConfig(keep_last_n=0), 40) == 40


def test_the_validation_budget_keeps_its_share():
    # 1000 iterations of 1 s, evaluations every 100 (11 of them), a batch costs 0.1 s: 5% allows
    # 0.05 / 0.95 * 1000 / (11 * 0.1) = 47.8 -> 47 batches per evaluation
    cfg = train.TrainConfig(max_iters=1000, eval_interval=100, eval_iters=200)
    assert plan.eval_budget(cfg, 1.0, 0.1, None, 0.05) == (47, 100)
    assert plan.eval_budget(train.TrainConfig(max_iters=1000, eval_interval=100, eval_iters=20), 1.0, 0.1, None,
                            0.05) == (20, 100)  # already within its share
    # the whole split (eval_iters=0) is kept when it fits, else becomes a count
    whole = train.TrainConfig(max_iters=1000, eval_interval=100, eval_iters=0)
    assert plan.eval_budget(whole, 1.0, 0.1, 30, 0.05) == (0, 100)
    assert plan.eval_budget(whole, 1.0, 0.1, 300, 0.05) == (47, 100)
    # too slow for 10 batches every 100 iterations: evaluations get rarer instead. 5% of the run allows
    # 52.6 s of validation; 10 batches of 2 s = 20 s per evaluation, so 2 evaluations: 0 and the end
    assert plan.eval_budget(cfg, 1.0, 2.0, None, 0.05) == (10, 1000)
    eval_iters, interval = plan.eval_budget(train.TrainConfig(max_iters=1000, eval_interval=100, eval_iters=200),
                                            1.0, 1.0, None, 0.05)  # 10 s per evaluation: 5 fit
    assert (eval_iters, interval) == (10, 250) and plan.count_evaluations(1000, 250) == 5
    # even 2 evaluations of 10 batches are over: fewer batches, at 0 and the end only
    assert plan.eval_budget(cfg, 1.0, 5.0, None, 0.05) == (5, 1000)


def test_the_chinchilla_model_spends_the_budget():
    n = plan.chinchilla_params(1e12, 1.2e5)
    assert 6 * n * 20 * n == pytest.approx(1e12 * 1.2e5)


def test_the_plan_adds_up_and_its_checkpoint_size_is_what_train_writes(tmp_path, monkeypatch):
    data = char_dataset(tmp_path / "data", 60_000)
    cfg = plan_config(tmp_path, data_dir=str(data), vocab_size=0, price_per_hour=2.0, budget_hours=1.0)
    p = bench.run_plan(cfg)
    assert json.loads(Path(cfg.plan_file).read_text())["overrides"] == p["overrides"]
    b, accum = p["batch_size"], p["gradient_accumulation_steps"]
    assert b * accum == 4 * 3 and 12 % b == 0  # tokens per step as configured
    assert p["tokens_per_step"] == 12 * 32 and p["tokens"] == 40 * 12 * 32
    assert p["tokens_per_param"] == pytest.approx(40 * 12 * 32 / p["n_params"])
    assert p["evaluations"] == plan.count_evaluations(40, p["eval_interval"])
    assert p["eval_seconds"] == pytest.approx(p["evaluations"] * p["eval_batches"] * p["eval_batch_seconds"])
    assert p["eta_seconds"] == pytest.approx(p["startup_seconds"] + 40 * p["seconds_per_iter"] + p["eval_seconds"])
    assert p["eval_seconds"] <= 0.05 * p["eta_seconds"]
    assert p["cost"] == pytest.approx(p["eta_seconds"] / 3600 * 2.0)
    assert p["budget"]["max_iters"] == int(3600 * (1 - p["eval_seconds"] / p["eta_seconds"]) // p["seconds_per_iter"])
    assert p["disk_bytes"] == p["checkpoint_bytes"] * p["checkpoints_on_disk"]
    assert p["calibration_seconds"] >= p["search_seconds"] > 0
    assert p["overrides"] == (f"--batch_size={b} --gradient_accumulation_steps={accum} --eval_iters={p['eval_iters']} "
                              f"--eval_interval={p['eval_interval']}")
    # the checkpoint train.py writes for this config holds what the plan counted (safetensors adds headers)
    train.main(tiny_train_config(data, tmp_path / "run", max_iters=2, eval_interval=2, batch_size=4,
                                 gradient_accumulation_steps=3, block_size=32))
    ckpt = tmp_path / "run" / "ckpt-0000002"
    written = sum((ckpt / f).stat().st_size for f in ("model.safetensors", "optimizer.safetensors"))
    assert p["checkpoint_bytes"] <= written <= p["checkpoint_bytes"] + 20_000


def test_planning_shipped_shakespeare_prepares_it_and_sizes_its_65_character_model(tmp_path, monkeypatch, capsys):
    """In a fresh checkout the plan of config/train_shakespeare_char.py sized a 30M-parameter model
    (GPT-2's 50,304-token vocabulary) for a 10.7M one: the plan prepares the shipped text as train.py
    does (here in a copy of the data folder), and says so when it cannot learn the vocabulary."""
    import shutil

    from homegpt import dataloader
    fake = tmp_path / "checkout"
    shutil.copytree(ROOT / "data" / "shakespeare_char", fake / "data" / "shakespeare_char",
                    ignore=shutil.ignore_patterns("*.bin", "meta.json"))
    monkeypatch.setattr(dataloader, "CHECKOUT", fake)
    monkeypatch.chdir(tmp_path)
    cfg = plan_config(tmp_path, dataset="shakespeare_char", vocab_size=0)
    model = plan.build_model_for(cfg, torch.device("cpu"))[0]
    assert model.config.vocab_size == 65 and (fake / "data" / "shakespeare_char" / "train.bin").exists()
    # a dataset that is not shipped and not prepared: GPT-2's vocabulary, and a line that says why
    cfg = plan_config(tmp_path, dataset="", data_dir=str(tmp_path / "nothing_here"), vocab_size=0)
    assert plan.build_model_for(cfg, torch.device("cpu"))[0].config.vocab_size == 50304
    assert "is not prepared, so its vocabulary is unknown" in capsys.readouterr().out


def test_the_eta_counts_reading_the_data_for_every_micro_step_and_validation_batch(tmp_path, monkeypatch):
    """The steps are timed on batches already on the device; the run also reads each micro-batch from
    disk and copies it over, which on a GPU is a visible share of a small model's step."""
    data = char_dataset(tmp_path / "data", 60_000)
    cfg = plan_config(tmp_path, data_dir=str(data), vocab_size=0, calibration_s=1.0)
    read = plan.time_data(cfg, 4, 32, torch.device("cpu"))
    assert 0 < read < 1  # the real reader, on the prepared data
    assert plan.time_data(plan_config(tmp_path, data_dir=str(tmp_path / "none")), 4, 32, torch.device("cpu")) == 0.0
    monkeypatch.setattr(plan, "time_iterations", lambda *a: (0.1, 5))
    monkeypatch.setattr(plan, "time_eval_batch", lambda *a: 0.02)
    monkeypatch.setattr(plan, "time_data", lambda *a: 0.05)
    p = bench.run_plan(cfg)
    accum = p["gradient_accumulation_steps"]
    assert p["seconds_per_iter"] == pytest.approx(0.1 + accum * 0.05)
    assert p["eval_batch_seconds"] == pytest.approx(0.02 + 0.05)
    assert p["data_seconds_per_micro_batch"] == 0.05


def test_too_little_disk_is_refused_before_any_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    timed = []
    monkeypatch.setattr(plan, "search", lambda *a, **k: timed.append(1))
    with pytest.raises(UserError, match="checkpoints need .* MB and out_dir=.* has 0.0 MB free.*keep_last_n"):
        bench.run_plan(plan_config(tmp_path))
    assert not timed and not Path(tmp_path / "plan.json").exists()


def test_auto_batch_keeps_the_tokens_per_step_and_trains_like_the_numbers_it_chose(tmp_path, capsys):
    data = char_dataset(tmp_path / "data", 60_000)
    # batch_size 'auto' replaces the config file's 6 (x accumulation 2 = 12 sequences per step)
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 6\ngradient_accumulation_steps = 2\n")
    argv = [str(cfg_file), "--batch_size=auto"] + [f"--{k}={v!r}" for k, v in vars(
        tiny_train_config(data, tmp_path / "auto", max_iters=6, eval_interval=3)).items()
        if k not in ("batch_size", "gradient_accumulation_steps")]
    cfg = configurator.parse_config(train.TrainConfig, argv)
    assert cfg.batch_size == "auto" and configurator.before_overrides(cfg, "batch_size") == 6
    auto = train.main(cfg)
    out = capsys.readouterr().out
    state = json.loads((tmp_path / "auto" / "ckpt-0000006" / "state.json").read_text())["config"]
    b, accum = state["batch_size"], state["gradient_accumulation_steps"]
    assert b * accum == 12 and f"batch_size=auto: micro-batch {b}" in out and "tokens per step as configured" in out
    # the search leaves the weights and the data untouched: the same run with those numbers typed in
    same = train.main(tiny_train_config(data, tmp_path / "typed", max_iters=6, eval_interval=3, batch_size=b,
                                        gradient_accumulation_steps=accum))
    assert auto["best_val_loss"] == same["best_val_loss"]


def test_batch_size_parses_as_a_number_or_auto():
    assert configurator.parse_config(train.TrainConfig, ["--batch_size=6"]).batch_size == 6
    assert configurator.parse_config(train.TrainConfig, ["--batch_size=auto"]).batch_size == "auto"
    with pytest.raises(UserError, match="batch_size: expected int or 'auto', got 'big'"):
        configurator.parse_config(train.TrainConfig, ["--batch_size=big"])
    with pytest.raises(UserError, match="batch_size must be positive or 'auto'"):
        train.check_config(train.TrainConfig(batch_size="big"), train.Dist())
    assert configurator.before_overrides(train.TrainConfig(), "batch_size") == 12  # no file: the default
    with pytest.raises(UserError, match="batch_size='auto' times the whole model on each GPU"):
        train.check_config(train.TrainConfig(batch_size="auto", fsdp=True), train.Dist(world_size=2))


@pytest.mark.slow
def test_bench_plan_command_prints_the_overrides_and_writes_json(tmp_path):
    args = [sys.executable, str(ROOT / "bench.py"), str(ROOT / "config" / "train_shakespeare_char_cpu.py"), "--plan",
            "--n_layer=2", "--n_embd=32", "--n_head=2", "--max_iters=50", "--eval_iters=5", "--calibration_s=5",
            f"--out_dir={tmp_path / 'out'}", f"--plan_file={tmp_path / 'p.json'}"]
    p = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "overrides: --batch_size=" in p.stdout and "eta:" in p.stdout and "micro-batch" in p.stdout
    assert json.loads((tmp_path / "p.json").read_text())["gradient_accumulation_steps"] >= 1
    bad = subprocess.run(args[:-1] + ["--eval_share=2", f"--plan_file={tmp_path / 'no.json'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "eval_share must be between 0 and 1" in bad.stderr
    assert not (tmp_path / "no.json").exists()


def test_on_cuda_the_gauge_reads_the_allocator_and_budgets_90_percent_of_the_card(monkeypatch):
    # no GPU here: the torch.cuda queries the gauge reads are patched, as a 10 GiB card would answer
    calls = []
    monkeypatch.setattr(memory, "device_memory", lambda device: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    gauge = autobatch.MemoryGauge(tiny_model(), torch.device("cuda"), 0.0)
    assert gauge.budget == int(0.9 * 10 * 2**30)  # the card's total already holds the model
    gauge.reset()
    assert calls == ["empty", "reset"] and gauge.peak() == 3 * 2**30
    assert autobatch.MemoryGauge(tiny_model(), torch.device("cuda"), 2.0).budget == 2 * 2**30


def test_candidates_are_compared_as_whole_iterations_in_turns():
    # per micro-step: 16 ms at 2, 20 ms at 4, 70 ms at 8; 8 sequences per step -> iterations of
    # 4 x 16 = 64 ms, 2 x 20 = 40 ms, 1 x 70 = 70 ms: micro-batch 4 wins although 8's trial looked best
    cost = {2: 0.016, 4: 0.020, 8: 0.070}
    order = []

    def fake_step(model, optimizer, scaler, batches, *args):
        order.append(batches[0][0].shape[0])
        time.sleep(cost[batches[0][0].shape[0]] * len(batches))
    trials = [{"batch_size": b, "status": "ok", "tokens_per_sec": tps, "ms_per_step": 1000 * cost[b]}
              for b, tps in [(2, 900.0), (4, 950.0), (8, 1000.0)]]
    trials.append({"batch_size": 1, "status": "ok", "tokens_per_sec": 100.0, "ms_per_step": 5.0})  # far behind
    chosen, per_iter = autobatch.compare_iterations(fake_step, tiny_model(), plan_config(Path("/tmp")),
                                                    torch.device("cpu"), torch.float32, trials, 8, time_s=0.8)
    assert chosen == 4 and set(per_iter) == {2, 4, 8}  # 1 is not within 20% of the best trial
    assert per_iter[2] == pytest.approx(0.064, rel=0.3) and per_iter[8] == pytest.approx(0.070, rel=0.3)
    assert order[:9] == [8] * 3 + [4] * 3 + [2] * 3 and order[9] == 8  # in turns of 3 steps


def test_timed_steps_use_the_runs_optimizer_and_change_no_weight(tmp_path):
    # the CPU recipe trains with Muon, which costs ~10% more per step than AdamW alone: a plan timing
    # AdamW instead (what muon_lr=0 builds) gave ETAs 15-20% short
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = plan_config(tmp_path, optimizer="muon", muon_lr=0.02)
    optimizer = autobatch.still_optimizer(model, cfg, torch.device("cpu"))
    assert {type(o).__name__ for o in optimizer.optimizers} >= {"Muon"}
    x = torch.randint(0, 65, (4, 32))
    for _ in range(3):
        train.train_step(model, optimizer, runtime.make_scaler(torch.device("cpu"), torch.float32), [(x, x)],
                         runtime.autocast(torch.device("cpu"), torch.float32), 1.0, train.Dist(), torch.device("cpu"))
    assert optimizer.state and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
