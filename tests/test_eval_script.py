"""eval.py end to end: a tiny run trained by train.py, a random Hugging Face GPT-2 directory, local
benchmark JSONL, the side-by-side table, the JSON report and the errors a user sees.

    python -m pytest -q tests/test_eval_script.py
"""

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import eval as eval_script
from homegpt.dataloader import TokenData, eval_batches, write_raw_tokens
from homegpt.evaluation import evaluate_loss
from helpers import Terminal

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the cat sat on the mat. a dog ran to the log. " * 60
HELLASWAG = [{"ctx": "the cat sat on the", "endings": ["log.", "mat.", "dog."], "label": "1"},
             {"ctx": "a dog ran to the", "endings": ["log.", "mat.", "cat."], "label": 0},
             {"ctx": "the dog sat on", "endings": ["the mat.", "a log."], "label": 0}]
LAMBADA = [{"text": "the cat sat on the mat"}, {"text": "a dog ran to the log"}]


def run(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread is fastest on a busy machine
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A char dataset and a 30-iteration run on it (float32, validation on the whole split)."""
    d = tmp_path_factory.mktemp("evalrun")
    chars = sorted(set(TEXT))
    ids = [chars.index(c) for c in TEXT]
    split = int(len(ids) * 0.9) // 2 * 2
    (d / "data").mkdir()
    write_raw_tokens(d / "data" / "train.bin", ids[:split])
    write_raw_tokens(d / "data" / "val.bin", ids[split:])
    (d / "data" / "meta.json").write_text(json.dumps({"vocab_size": len(chars), "tokenizer": "char", "itos": chars,
                                                      "train_tokens": split, "val_tokens": len(ids) - split}))
    r = run("train.py", f"--data_dir={d / 'data'}", "--out_dir=run", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=8", "--max_iters=30", "--eval_interval=10", "--eval_iters=0",
            "--log_interval=10", "--warmup_iters=5", "--lr_decay_iters=30", "--learning_rate=1e-2",
            "--device=cpu", "--dtype=float32", cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    for name, rows in (("hs.jsonl", HELLASWAG), ("lambada.jsonl", LAMBADA)):
        (d / name).write_text("".join(json.dumps(x) + "\n" for x in rows))
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def cfg_for(workdir, **kw):
    kw = {"out_dir": str(workdir / "run"), "device": "cpu", "dtype": "float32", "progress": False,
          "out_file": str(workdir / "results.json"), **kw}
    return eval_script.EvalConfig(**kw)


def test_cli_val_and_hellaswag_match_the_training_run(workdir):
    r = run("eval.py", "--out_dir=run", "--tasks=val,hellaswag", "--data_file=hs.jsonl", "--device=cpu",
            "--dtype=float32", "--out_file=cli.json", "--progress=False", cwd=workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((workdir / "cli.json").read_text())["results"]["run"]
    # the same fixed validation tokens train.py evaluated at its last iteration, so the same number
    last_val = [json.loads(l) for l in (workdir / "run" / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in l][-1]
    assert last_val["iter"] == 30
    assert res["val"]["loss"] == pytest.approx(last_val["val_loss"], rel=1e-5)
    assert res["val"]["tokens"] == 16 * ((276 - 1) // 16)  # 276 val tokens -> 17 windows of 16
    assert res["hellaswag"]["n"] == 3 and 0 <= res["hellaswag"]["correct"] <= 3
    assert res["hellaswag"]["acc_ci95"][0] <= res["hellaswag"]["acc"] <= res["hellaswag"]["acc_ci95"][1]
    header = next(l for l in r.stdout.splitlines() if l.startswith("task"))
    assert header.split() == ["task", "metric", "run"]
    assert any(l.split()[:2] == ["val", "loss"] for l in r.stdout.splitlines())


def test_in_process_val_equals_evaluate_loss_on_the_checkpoint(workdir):
    from homegpt import weights
    results = eval_script.main(cfg_for(workdir, tasks="val", batch_size=5))
    model, _ = weights.load_model(workdir / "run")
    direct = evaluate_loss(model, eval_batches(TokenData(workdir / "data", "val"), 3, 16), torch.device("cpu"),
                           contextlib.nullcontext())
    assert results[str(workdir / "run")]["val"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_side_by_side_models_with_lambada_deterministic(workdir, hf_dir, capsys):
    cfg = cfg_for(workdir, models=f"{workdir / 'run'},{hf_dir}", tasks="lambada",
                  data_file=str(workdir / "lambada.jsonl"), batch_size=1)
    first = eval_script.main(cfg)
    out = capsys.readouterr().out
    assert list(first) == [str(workdir / "run"), str(hf_dir)]
    for res in first.values():
        assert res["lambada"]["n"] == 2 and res["lambada"]["perplexity"] > 1
    # char model: ' mat' and ' log' are 4 tokens each; the GPT-2 BPE gives 1 token per word
    assert first[str(workdir / "run")]["lambada"]["tokens"] == 8
    assert first[str(hf_dir)]["lambada"]["tokens"] == 2
    header = next(l for l in out.splitlines() if l.startswith("task"))
    assert header.split() == ["task", "metric", str(workdir / "run"), str(hf_dir)]
    saved = json.loads(Path(cfg.out_file).read_text())
    assert saved["results"][str(hf_dir)]["lambada"]["acc"] == first[str(hf_dir)]["lambada"]["acc"]
    assert saved["interval"].startswith("95% Wilson")
    assert eval_script.main(cfg) == first  # deterministic


def test_limit_and_block_size(workdir):
    res = eval_script.main(cfg_for(workdir, tasks="hellaswag", data_file=str(workdir / "hs.jsonl"), limit=2))
    assert res[str(workdir / "run")]["hellaswag"]["n"] == 2
    res = eval_script.main(cfg_for(workdir, tasks="val", block_size=8))
    assert res[str(workdir / "run")]["val"]["tokens"] == 8 * ((276 - 1) // 8)
    with pytest.raises(ValueError, match="block_size=32 exceeds"):
        eval_script.main(cfg_for(workdir, tasks="val", block_size=32))


def test_val_refuses_data_in_another_tokenizer(workdir, hf_dir):
    with pytest.raises(ValueError, match="'char' tokenizer"):
        eval_script.main(cfg_for(workdir, models=str(hf_dir), tasks="val", data_dir=str(workdir / "data")))


def test_config_errors_are_reported_together():
    cfg = eval_script.EvalConfig(tasks="val,mmlu,piqa,hellaswag,generate", data_file="x.jsonl", k_shot=2,
                                 batch_size=0)
    with pytest.raises(ValueError) as e:
        eval_script.check_config(cfg)
    msg = str(e.value)
    for part in ("unknown task(s) mmlu", "piqa, hellaswag, generate each need their own",
                 "k_shot=2 needs --shots_file", "batch_size=0 must be positive"):
        assert part in msg


def test_cli_bad_model_exits_nonzero_without_a_results_file(workdir):
    r = run("eval.py", "--models=no-such-run", "--tasks=val", "--device=cpu", "--out_file=bad.json", cwd=workdir)
    assert r.returncode != 0
    assert "no-such-run" in r.stderr and "out_dir" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (workdir / "bad.json").exists()


@pytest.mark.parametrize("kw, option", [({"models": "gpt2"}, "--models"), ({"init_from": "gpt2"}, "--init_from")])
def test_offline_hint_names_the_option_the_user_used(workdir, monkeypatch, kw, option):
    # the hub unreachable and the cache cold: the way out is a local copy, passed where 'gpt2' was
    transformers = pytest.importorskip("transformers")
    from homegpt import hub
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "HF_HUB_OFFLINE=1 is set")

    def cold_cache(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.")
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", cold_cache)
    with pytest.raises(ValueError) as e:
        eval_script.main(cfg_for(workdir, tasks="val", dataset="shakespeare", **kw))
    msg = str(e.value)
    assert msg.startswith(f"{option}: could not load 'gpt2'") and "in place of 'gpt2'" in msg
    other = "--init_from" if option == "--models" else "--models"
    assert other not in msg


def test_missing_run_names_out_dir(workdir):
    with pytest.raises(ValueError, match=r"^--out_dir='.*no-run' holds no checkpoint \(latest.json\)"):
        eval_script.main(cfg_for(workdir, out_dir=str(workdir / "no-run"), tasks="val"))


def test_generate_task_calls_sft(workdir, monkeypatch):
    calls = {}

    def evaluate_generation(model, tokenizer, examples, device, ctx, max_new_tokens=16, k_shot=0, shots=None,
                            template=None, seed=0, progress=True):
        calls.update(n=len(examples), k_shot=k_shot, shots=shots, max_new_tokens=max_new_tokens, seed=seed,
                     progress=progress)
        return {"exact_match": 0.5, "n": len(examples), "samples": []}
    fake = types.SimpleNamespace(load_examples=lambda path, template=None: [{"file": Path(path).name}] * 3,
                                 evaluate_generation=evaluate_generation,
                                 format_generation_report=lambda r: f"exact match {r['exact_match']}")
    monkeypatch.setattr(eval_script, "sft", fake)
    res = eval_script.main(cfg_for(workdir, tasks="generate", data_file="test.jsonl", k_shot=2,
                                   shots_file="train.jsonl", limit=2, max_new_tokens=5))
    assert calls == {"n": 2, "k_shot": 2, "shots": [{"file": "train.jsonl"}] * 3, "max_new_tokens": 5, "seed": 1337,
                     "progress": False}
    assert res[str(workdir / "run")]["generate"]["exact_match"] == 0.5


def test_generate_task_with_the_real_sft(workdir):
    rows = [{"prompt": "the cat sat on the", "completion": " mat."}, {"prompt": "a dog ran to the", "completion": " log."}]
    (workdir / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = eval_script.main(cfg_for(workdir, tasks="generate", data_file=str(workdir / "gen.jsonl"), max_new_tokens=5))
    gen = res[str(workdir / "run")]["generate"]
    assert gen["n"] == 2 and 0 <= gen["accuracy"] <= 1
    assert json.loads((workdir / "results.json").read_text())["results"][str(workdir / "run")]["generate"] == gen


# ----------------------------------------------------------------------------- progress bars

def test_a_log_gets_no_progress_bars(workdir):
    """--progress is on by default; with stderr a pipe (a log, nohup, CI) nothing of a bar is written."""
    (workdir / "gen.jsonl").write_text(json.dumps({"prompt": "the cat sat on the", "completion": " mat."}) + "\n")
    runs = [run("eval.py", "--out_dir=run", "--tasks=val,lambada", "--data_file=lambada.jsonl", "--device=cpu",
                "--dtype=float32", "--out_file=bars.json", cwd=workdir),
            run("eval.py", "--out_dir=run", "--tasks=generate", "--data_file=gen.jsonl", "--device=cpu",
                "--dtype=float32", "--out_file=bars.json", cwd=workdir)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
        for out in (r.stdout, r.stderr):
            assert "\r" not in out and "it/s" not in out and "%|" not in out, out[-2000:]


def test_a_terminal_sees_a_bar_per_task_unless_progress_is_off(workdir, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    (workdir / "gen.jsonl").write_text(json.dumps({"prompt": "the cat sat on the", "completion": " mat."}) + "\n")
    eval_script.main(cfg_for(workdir, tasks="val", progress=True))
    eval_script.main(cfg_for(workdir, tasks="hellaswag", data_file=str(workdir / "hs.jsonl"), progress=True))
    eval_script.main(cfg_for(workdir, tasks="generate", data_file=str(workdir / "gen.jsonl"), progress=True))
    drawn = terminal.getvalue()
    run_dir = str(workdir / "run")
    assert f"{run_dir} val:" in drawn and "/3" in drawn  # 17 windows of 16 tokens in batches of 8: 3 batches
    assert f"{run_dir} hellaswag:" in drawn and "generating:" in drawn
    terminal.seek(0)
    terminal.truncate()
    eval_script.main(cfg_for(workdir, tasks="val", progress=False))
    assert terminal.getvalue() == ""
