"""The training loop: schedule, accumulation, a real run that learns, sampling from it, config errors."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from homegpt import weights
import train
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config
from model import GPT, GPTConfig
from homegpt.runtime import Dist, make_scaler


def test_lr_schedule():
    cfg = tiny_train_config("d", "o", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert train.get_lr(0, cfg) == pytest.approx(1e-3 / 11)  # never zero at step 0
    assert train.get_lr(10, cfg) == pytest.approx(1e-3)  # peak right after warmup
    assert train.get_lr(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint
    assert train.get_lr(110, cfg) == pytest.approx(1e-4)
    assert train.get_lr(500, cfg) == pytest.approx(1e-4)  # min_lr after the decay
    cfg.decay_lr = False  # constant, no warmup (nanoGPT's meaning)
    assert train.get_lr(0, cfg) == train.get_lr(500, cfg) == pytest.approx(1e-3)


def _step(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # new params = old - grad: compares gradients
    import contextlib
    step = train.train_step(model, opt, make_scaler(torch.device("cpu"), torch.float32), batches,
                            contextlib.nullcontext(), 0.0, Dist(), torch.device("cpu"))
    assert step.stepped and step.tokens == sum(x.numel() for x, _ in batches)
    return step.loss


@pytest.mark.parametrize("masked", [False, True])
def test_accumulation_equals_one_big_batch(masked):
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    x = torch.randint(0, 65, (8, 16))
    y = torch.randint(0, 65, (8, 16))
    if masked:  # uneven target counts per micro-batch, as in SFT
        for i in range(8):
            y[i, : 2 * i] = -1
    one, four = copy.deepcopy(base), copy.deepcopy(base)
    loss1 = _step(one, [(x, y)])
    loss4 = _step(four, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])
    assert loss1.item() == pytest.approx(loss4.item(), abs=1e-5)  # logged loss: the mean over micro-steps
    for a, b in zip(one.parameters(), four.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(next(one.parameters()), next(base.parameters()))


def test_config_errors_are_reported_together(tmp_path):
    cfg = tiny_train_config(tmp_path, tmp_path / "out", batch_size=0, sampling="shuffled", lora_targets="x",
                            optimizer="muon", muon_lr=0.0, train_1d_only=True)
    with pytest.raises(ValueError) as e:
        train.main(cfg)
    for part in ("batch_size must be positive", "sampling must be", "lora_targets must be", "muon_lr must be positive",
                 "train_1d_only has none"):
        assert part in str(e.value)


@pytest.mark.slow
def test_short_shakespeare_run_learns_and_samples(tmp_path):
    data = char_dataset(tmp_path / "data", n_chars=1_115_394)
    out = tmp_path / "out"
    cfg = tiny_train_config(data, out, n_embd=64, block_size=64, batch_size=32, max_iters=300,
                            eval_interval=300, eval_iters=20, log_interval=50, warmup_iters=20,
                            lr_decay_iters=300, learning_rate=1e-2, min_lr=1e-3, beta2=0.99)
    train.main(cfg)
    vals = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m]
    assert vals[0] == pytest.approx(math.log(65), abs=0.15)
    assert vals[0] - vals[-1] >= 1.0, vals
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=2",
                        "--max_new_tokens=80", "--start=ROMEO:"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("\n", 1)[1]  # after the printed config
    samples = text.split("---------------")
    assert len(samples) == 3 and samples[0].startswith("ROMEO:") and len(samples[0]) > 80
    itos = json.loads((data / "meta.json").read_text())["itos"]
    assert set(samples[0]) <= set(itos)  # decoded with the dataset's characters


def test_metrics_jsonl_fields(tmp_path):
    data = char_dataset(tmp_path / "data", 50_000)
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, log_interval=2))
    rows = read_metrics(out)
    logged = [r for r in rows if "train_loss" in r]
    assert [r["iter"] for r in logged] == [2, 4]
    assert {"iter", "tokens", "train_loss", "lr", "ms_per_iter", "tokens_per_sec", "mfu"} <= set(logged[0])
    assert logged[1]["tokens"] == 4 * 8 * 32
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]


def test_a_timed_run_can_skip_the_evaluation_before_training(tmp_path):
    # initial_eval=False: no val at iteration 0, the later evaluations and the final checkpoint as before
    data = char_dataset(tmp_path / "data", 50_000)
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2, log_interval=2, initial_eval=False))
    assert [r["iter"] for r in read_metrics(out) if "val_loss" in r] == [2, 4]
    assert json.loads((out / "latest.json").read_text())["iter_num"] == 4


def test_non_finite_loss_is_skipped_then_stops_with_a_checkpoint(tmp_path, monkeypatch):
    data = char_dataset(tmp_path / "data", 50_000)
    out = tmp_path / "out"
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] > 6:  # from the 7th training step on, the loss blows up
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        train.main(tiny_train_config(data, out, max_iters=50, eval_interval=100, max_bad_steps=3))
    from homegpt.weights import load_model
    model, info = load_model(out)
    assert info["iter_num"] == 9  # 6 good steps, 3 skipped ones that do not touch the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_muon_matrices_follow_the_schedule_at_muon_lr():
    cfg = train.TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, optimizer="muon",
                            learning_rate=4e-3, muon_lr=0.02, warmup_iters=10, lr_decay_iters=100, min_lr=4e-4)
    model, _ = weights.build_model(cfg, "scratch", dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    opt = train.make_optimizer(model, cfg, torch.device("cpu"))
    for it in (0, 50, 100):
        lr = train.get_lr(it, cfg)
        train.set_lr(opt, lr)
        adamw, muon = opt.optimizers
        assert all(g["lr"] == lr for g in adamw.param_groups)
        assert muon.param_groups[0]["lr"] == pytest.approx(lr * 5)  # 0.02 / 4e-3


def _sft_files(tmp_path, n=24):
    recs = [{"prompt": f"Q{i}: what is {i} plus one?" + " pad" * (i % 5), "completion": f" {i + 1}"} for i in range(n)]
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


@pytest.mark.slow
def test_sft_without_validation_still_ends_with_a_checkpoint_and_counts_real_tokens(tmp_path):
    """always_save_checkpoint=False with nothing to validate used to save nothing at all; and the
    tokens of padded SFT batches are those computed, not batch x block."""
    out = tmp_path / "out"
    cfg = tiny_train_config(tmp_path, out, sft_train_file=str(_sft_files(tmp_path)), block_size=64, batch_size=4,
                            max_iters=3, eval_interval=100, always_save_checkpoint=False)
    train.main(cfg)
    from homegpt import checkpoint
    _, state = checkpoint.read_checkpoint(out)
    assert state["iter_num"] == 3
    logged = [m for m in read_metrics(out) if "train_loss" in m]
    assert 0 < logged[-1]["tokens"] < 3 * 4 * 64  # rows padded to the longest example, not to block_size
    assert state["tokens_seen"] == logged[-1]["tokens"]


def test_logits_of_a_micro_step_are_freed_before_the_next_forward():
    """(B, T, vocab) logits are the largest activation with GPT-2's vocabulary: a micro-step must
    not keep its own alive while the next one runs its forward."""
    import contextlib
    import weakref
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    outputs, alive_at_forward = [], []
    model.lm_head.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    model.register_forward_pre_hook(lambda m, a: alive_at_forward.append([r() is not None for r in outputs]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 65, (4, 16))
    train.train_step(model, opt, make_scaler(torch.device("cpu"), torch.float32), [(x[:2], x[:2]), (x[2:], x[2:])],
                     contextlib.nullcontext(), 1.0, Dist(), torch.device("cpu"))
    assert alive_at_forward == [[], [False]]


def test_a_step_makes_one_host_sync(tmp_path, monkeypatch):
    """The loop's only per-step sync is train_step's; evaluation and logging sync once per call."""
    data = char_dataset(tmp_path / "data", 20_000)
    calls = {"n": 0}
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _real=real: (calls.__setitem__("n", calls["n"] + 1),
                                                                       _real(self))[1])
    train.main(tiny_train_config(data, tmp_path / "a", max_iters=5, eval_interval=100, log_interval=100))
    five = calls["n"]
    calls["n"] = 0
    train.main(tiny_train_config(data, tmp_path / "b", max_iters=25, eval_interval=100, log_interval=100))
    assert calls["n"] - five == 20  # 20 more steps: 20 more syncs


def test_config_mistakes_are_caught_before_any_work(tmp_path, monkeypatch):
    import importlib.util
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find(name, *a))
    cfg = tiny_train_config(tmp_path, tmp_path / "out", n_embd=100, n_head=3, wandb_log=True)
    with pytest.raises(ValueError) as e:
        train.main(cfg)
    assert "n_embd=100 is not divisible by n_head=3" in str(e.value)
    assert "wandb_log=True but wandb is not installed" in str(e.value)
    with pytest.raises(ValueError, match="block_size=2048 exceeds the 1024 positions of gpt2"):
        train.main(tiny_train_config(tmp_path, tmp_path / "out", init_from="gpt2", block_size=2048))
    assert not (tmp_path / "out").exists()


def test_a_gpu_recipe_started_on_a_cpu_says_so_and_names_the_cpu_recipe():
    from homegpt import memory
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=65))
    cpu = torch.device("cpu")
    long = memory.budget_report(model, 5000, 64 * 64, 5000, cpu, 1e9, "measured")
    assert "it was written for a GPU" in long and memory.CPU_RECIPE in long
    assert "written for a GPU" not in memory.budget_report(model, 5000, 64 * 64, 10, cpu, 1e9, "measured")
    assert "written for a GPU" not in memory.budget_report(model, 5000, 64 * 64, 5000, torch.device("cuda"), 1e9, "x")


@pytest.mark.slow
def test_a_fine_tune_from_a_character_checkpoint_directory_reads_text_with_its_characters(tmp_path):
    """init_from=<a ckpt-NNNNNNN directory> of a character-level run: instruction data must be read
    with its characters, not GPT-2 BPE, whose ids would overflow the model's 58-symbol vocabulary."""
    data = char_dataset(tmp_path / "data", 20_000)
    base = tmp_path / "base"
    train.main(tiny_train_config(data, base, max_iters=2, eval_interval=2))
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"First Citizen: speak {w}", "completion": " aye"}) + "\n"
                           for w in ("now", "then", "here", "there")))
    tuned = tmp_path / "tuned"
    train.main(tiny_train_config(data, tuned, init_from=str(base / "ckpt-0000002"), sft_train_file=str(sft),
                                 max_iters=2, eval_interval=2, batch_size=2))
    from homegpt import weights
    model, info = weights.load_model(tuned)
    assert info["data_meta"]["tokenizer"] == "char"
    assert model.config.vocab_size == weights.load_model(base)[0].config.vocab_size == 58


def test_training_puts_the_signal_handlers_back(tmp_path):
    """A process that goes on after train.main (a test, a notebook, a multiprocessing pool forked
    later) must not keep a SIGTERM handler that only sets a flag: pool workers ignored terminate()."""
    import signal
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    data = char_dataset(tmp_path / "data", 20_000)
    train.main(tiny_train_config(data, tmp_path / "out", max_iters=2, eval_interval=2))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sampling_a_run_that_is_not_there_says_where_it_looked(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={tmp_path / 'nothing'}", "--device=cpu"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: --out_dir={tmp_path / 'nothing'} holds no checkpoint (latest.json): train there first" in r.stderr
