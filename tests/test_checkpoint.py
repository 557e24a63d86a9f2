"""Checkpoints people can trust: round trip, exact resume, crash safety, validation.
(nanoGPT conversion: tests/test_convert_nanogpt.py)"""

import importlib.util
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from homegpt import weights
from homegpt import checkpoint as ckpt_lib
import train
from helpers import ROOT, char_dataset, read_metrics, tiny_train_config
from model import GPT, GPTConfig
from homegpt.optimizers import configure_optimizers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("data"), 100_000)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 65, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_of_every_field(tmp_path):
    model, opt = _model_and_optimizer()
    state = {"iter_num": 7, "tokens_seen": 1234, "best_val_loss": 1.5, "config": {"lr": 1e-3},
             "model_args": vars(model.config).copy(), "sampler": {"kind": "random", "rng": {"a": 2 ** 70}},
             "rng": {"x": [1, 2]}, "scaler": {"scale": 1024.0}, "wandb_run_id": "abc", "data_meta": {"tokenizer": "char"}}
    path = ckpt_lib.save_checkpoint(tmp_path, state, model, opt)
    ckpt_dir, loaded = ckpt_lib.read_checkpoint(tmp_path)
    assert ckpt_dir == path
    for k, v in state.items():
        assert loaded[k] == v, k
    assert loaded["versions"]["torch"] == torch.__version__
    fresh, _ = GPT(model.config), None
    ckpt_lib.restore_model(fresh, ckpt_dir, loaded)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied
    opt2 = configure_optimizers(fresh, 0.1, 1e-3, (0.9, 0.95), "cpu")
    ckpt_lib.restore_optimizer(fresh, opt2, ckpt_dir, loaded)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert not any(n.startswith(("_orig_mod.", "module.")) for n in ckpt_lib.model_tensors(torch.compile(model)))


def test_prefixes_are_stripped_in_one_place():
    sd = {"_orig_mod.transformer.wte.weight": 1, "module._orig_mod.lm_head.weight": 2, "module.x": 3}
    assert ckpt_lib.clean_state_dict(sd) == {"transformer.wte.weight": 1, "lm_head.weight": 2, "x": 3}


def test_best_is_kept_when_val_gets_worse_and_pruning_spares_it(tmp_path):
    model, opt = _model_and_optimizer()
    for it, best in [(10, True), (20, False), (30, False), (40, False)]:
        ckpt_lib.save_checkpoint(tmp_path, {"iter_num": it}, model, opt, is_best=best, keep_last_n=2)
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "ckpt-0000010"
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == "ckpt-0000040"
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000010", "ckpt-0000030", "ckpt-0000040"]
    assert ckpt_lib.read_checkpoint(tmp_path, which="best")[1]["iter_num"] == 10


def test_training_only_marks_improvements_as_best(data, tmp_path, monkeypatch):
    from homegpt import evaluation
    losses = iter([3.0, 2.0, 2.5, 2.6])
    monkeypatch.setattr(evaluation, "evaluate_loss", lambda *a, **k: {"loss": next(losses)})
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=6, eval_interval=2, always_save_checkpoint=True))
    assert json.loads((out / "best.json").read_text())["iter_num"] == 2
    assert json.loads((out / "latest.json").read_text())["iter_num"] == 6


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "version"])
def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path, damage):
    model, opt = _model_and_optimizer()
    path = ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 1, "model_args": vars(model.config).copy()}, model, opt)
    f = path / "model.safetensors"
    if damage == "flip":
        b = bytearray(f.read_bytes())
        b[-3] ^= 0xFF
        f.write_bytes(bytes(b))
        match = "model.safetensors: sha256 mismatch"
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
        match = "model.safetensors: .* bytes, expected"
    elif damage == "delete":
        (path / "optimizer.safetensors").unlink()
        match = "optimizer.safetensors: missing"
    else:
        st = json.loads((path / "state.json").read_text())
        st["format_version"] = 99
        (path / "state.json").write_text(json.dumps(st))
        match = "format version 99.*upgrade"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        weights.load_model(tmp_path)


def test_no_checkpoint_and_nanogpt_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        weights.load_model(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert_nanogpt.py"):
        weights.load_model(tmp_path)


def _losses(out):
    return [(m["iter"], m.get("train_loss"), m.get("val_loss"), m["lr"]) for m in read_metrics(out)]


NO_BNB = importlib.util.find_spec("bitsandbytes") is None


@pytest.mark.parametrize("sampling,optimizer", [
    ("random", "adamw"), ("sequential", "adamw"), ("random", "muon"),
    pytest.param("random", "adamw8bit", marks=pytest.mark.skipif(NO_BNB, reason="needs bitsandbytes (dev extra)"))])
def test_exact_resume_with_dropout_and_accumulation(data, tmp_path, sampling, optimizer):
    # muon: two optimizers (Muon's momentum buffers, AdamW's moments) saved and restored as one;
    # adamw8bit: bitsandbytes' states (uint8 moments, their scales and maps for matrices of 4,096+
    # entries like c_fc here, float32 for the rest), nested in its state dict, on the CPU
    common = dict(dropout=0.1, gradient_accumulation_steps=2, eval_interval=4, sampling=sampling, optimizer=optimizer)
    straight = tmp_path / "straight"
    train.main(tiny_train_config(data, straight, max_iters=12, **common))
    split = tmp_path / "split"
    train.main(tiny_train_config(data, split, max_iters=6, save_interval=3, **common))
    # resume with a longer schedule: run-length knobs may change (printed)
    train.main(tiny_train_config(data, split, max_iters=12, init_from="resume", **common))
    # the same floats, bit for bit; the first half's closing evaluation at iteration 6 is an extra line
    assert _losses(straight) == [m for m in _losses(split) if m[0] != 6 or m[1] is not None]
    a, _ = weights.load_model(straight)
    b, _ = weights.load_model(split)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_resume_refuses_a_different_model_shape_or_optimizer(data, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))
    with pytest.raises(ValueError, match=r"n_layer \(checkpoint 2, now 3\)"):
        train.main(tiny_train_config(data, out, max_iters=4, n_layer=3, init_from="resume"))
    # AdamW's moments cannot seed Muon's momentum: refused, not silently mixed
    with pytest.raises(ValueError, match=r"optimizer \(checkpoint 'adamw', now 'muon'\)"):
        train.main(tiny_train_config(data, out, max_iters=4, optimizer="muon", init_from="resume"))


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from homegpt import checkpoint
import train
from helpers import tiny_train_config
real = checkpoint.save_file
count = {{"n": 0}}
def save_file(tensors, path):
    real(tensors, path)
    if path.endswith("optimizer.safetensors"):
        count["n"] += 1
        if count["n"] == 2:  # the second checkpoint: model and optimizer written, state.json not yet
            os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = save_file
train.main(tiny_train_config({data!r}, {out!r}, max_iters=8, eval_interval=4))
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(data, tmp_path):
    out = tmp_path / "out"
    code = KILL_DURING_SECOND_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), data=str(data), out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert list(out.glob(".ckpt-0000008.tmp-*"))  # the half-written save is there, hidden
    model, info = weights.load_model(out)
    assert info["iter_num"] == 4
    train.main(tiny_train_config(data, out, max_iters=8, eval_interval=4, init_from="resume"))
    assert ckpt_lib.read_checkpoint(out)[1]["iter_num"] == 8
    assert not list(out.glob(".ckpt-*.tmp-*"))  # debris cleaned by the next save


def test_sigterm_saves_and_exits_zero(data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--dtype=float32",
           "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=100000",
           "--eval_interval=100000", "--eval_iters=2", "--log_interval=1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) > 5:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0, stdout
    assert "SIGTERM" in stdout and f"saved checkpoint to {out}" in stdout
    _, state = ckpt_lib.read_checkpoint(out)
    assert state["iter_num"] >= 5
    assert state["iter_num"] == max(m["iter"] for m in read_metrics(out))  # the save is after the last step
    assert state["files"]["model.safetensors"]["sha256"] is None  # no read-back on the way out


def test_resuming_a_full_fine_tune_does_not_need_the_base_again(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    import shutil
    hf_dir = tmp_path / "hf-base"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                         vocab_size=65)).save_pretrained(hf_dir)
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, init_from=str(hf_dir), max_iters=2, eval_interval=2))
    shutil.rmtree(hf_dir)  # gone, like a hub model on a machine that is offline now
    train.main(tiny_train_config(data, out, init_from="resume", max_iters=4, eval_interval=2))
    assert ckpt_lib.read_checkpoint(out)[1]["iter_num"] == 4


def test_resume_takes_the_optimizer_hyperparameters_from_the_config(data, tmp_path):
    """A resume that prints 'weight_decay changed' must train with the new value: restoring the optimizer's
    saved state would silently bring back the old hyperparameters, and the printed change would be a lie."""
    import shutil
    base = tmp_path / "base"
    train.main(tiny_train_config(data, base, max_iters=2, eval_interval=2))
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(base, same)
    shutil.copytree(base, other)
    train.main(tiny_train_config(data, same, max_iters=4, eval_interval=2, init_from="resume"))
    train.main(tiny_train_config(data, other, max_iters=4, eval_interval=2, init_from="resume",
                                 weight_decay=0.5, beta1=0.5, beta2=0.9))
    a, b = ckpt_lib.read_checkpoint(same)[1], ckpt_lib.read_checkpoint(other)[1]
    assert [g["weight_decay"] for g in a["optimizer"]["param_groups"]] == [0.1, 0.0]
    assert [g["weight_decay"] for g in b["optimizer"]["param_groups"]] == [0.5, 0.0]
    assert {tuple(g["betas"]) for g in b["optimizer"]["param_groups"]} == {(0.5, 0.9)}
    losses = lambda out: [m["train_loss"] for m in read_metrics(out) if "train_loss" in m and m["iter"] > 2]
    assert losses(same) != losses(other)  # the new values shaped steps 3 and 4
    # and directly: the restored optimizer keeps the values it was built with
    model, opt = _model_and_optimizer()
    path = ckpt_lib.save_checkpoint(tmp_path / "direct", {"iter_num": 1}, model, opt)
    opt2 = configure_optimizers(model, 0.7, 5e-4, (0.8, 0.9), "cpu")
    ckpt_lib.restore_optimizer(model, opt2, path, ckpt_lib.read_checkpoint(path)[1])
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.7, 0.0]
    assert {g["betas"] for g in opt2.param_groups} == {(0.8, 0.9)} and {g["lr"] for g in opt2.param_groups} == {5e-4}
    assert all(torch.equal(opt.state[p]["exp_avg"], opt2.state[p]["exp_avg"]) for p in model.parameters())


def test_a_full_disk_inside_safetensors_gets_the_clear_message(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    model, opt = _model_and_optimizer()
    ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 1}, model, opt)

    def full(tensors, path, *a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    monkeypatch.setattr(ckpt_lib, "save_file", full)
    with pytest.raises(ckpt_lib.SaveFailed, match="previous checkpoint .* is untouched; free disk space"):
        ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 2}, model, opt)
    assert ckpt_lib.read_checkpoint(tmp_path)[1]["iter_num"] == 1
    assert not list(tmp_path.glob(".ckpt-*"))  # no debris


def test_a_save_without_hashes_loads_with_its_sizes_checked(tmp_path):
    model, opt = _model_and_optimizer()
    path = ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 3, "model_args": vars(model.config).copy()}, model, opt,
                                    hash_files=False)
    _, state = ckpt_lib.read_checkpoint(tmp_path)
    assert {r["sha256"] for r in state["files"].values()} == {None}
    weights.load_model(tmp_path)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(ValueError, match="bytes, expected"):
        ckpt_lib.read_checkpoint(tmp_path)


def test_a_reader_of_a_live_run_follows_latest_when_its_checkpoint_is_pruned(tmp_path, monkeypatch):
    """sample.py / eval.py on a run still training: the trainer may prune the checkpoint latest.json
    named between the reader's look at the pointer and its read of the files."""
    model, opt = _model_and_optimizer()
    args = {"model_args": vars(model.config).copy()}
    ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 1} | args, model, opt, keep_last_n=1)
    real = ckpt_lib._validated_state
    calls = {"n": 0}

    def trainer_saves_meanwhile(ckpt, verify):
        calls["n"] += 1
        if calls["n"] == 1:  # the reader resolved ckpt-0000001; the trainer saves 2 and prunes 1
            ckpt_lib.save_checkpoint(tmp_path, {"iter_num": 2} | args, model, opt, keep_last_n=1)
        return real(ckpt, verify)
    monkeypatch.setattr(ckpt_lib, "_validated_state", trainer_saves_meanwhile)
    _, info = weights.load_model(tmp_path)
    assert info["iter_num"] == 2 and calls["n"] >= 2


def test_a_damaged_latest_names_the_intact_checkpoints_and_resume_from_uses_one(data, tmp_path):
    """Readers refuse a damaged latest, naming the intact ones; a resume naming it (resume_from) is refused
    the same way, and one that names none skips it (tests/test_nothing_lost.py)."""
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=4, eval_interval=2))
    f = out / "ckpt-0000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="bytes, expected"):  # named: refused, not skipped
        train.main(tiny_train_config(data, out, max_iters=6, eval_interval=2, init_from="resume",
                                     resume_from="ckpt-0000004"))
    with pytest.raises(ValueError) as e:
        weights.load_model(out)
    msg = str(e.value)
    assert "intact beside it: ckpt-0000002 (iteration 2)" in msg
    assert "--resume_from=ckpt-0000002" in msg and f"--out_dir={out / 'ckpt-0000002'}" in msg
    train.main(tiny_train_config(data, out, max_iters=6, eval_interval=2, init_from="resume",
                                 resume_from="ckpt-0000002"))
    assert ckpt_lib.read_checkpoint(out)[1]["iter_num"] == 6
    assert not (out / "ckpt-0000002" / "ckpt-0000004").exists()  # nothing nested in the old checkpoint
    # pointing out_dir at a checkpoint directory is refused with the way to do it
    with pytest.raises(ValueError, match=r"is a checkpoint directory.*--resume_from=ckpt-0000006"):
        train.main(tiny_train_config(data, out / "ckpt-0000006", max_iters=8, init_from="resume"))


def test_a_new_run_into_an_out_dir_holding_one_is_refused_unless_overwrite(data, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))
    with pytest.raises(ValueError, match=r"already holds a run: continue it with --init_from=resume.*--overwrite=True"):
        train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))
    (out / "notes.txt").write_text("mine")
    train.main(tiny_train_config(data, out, max_iters=3, eval_interval=3, overwrite=True))
    assert ("overwrite: deleting the earlier run's ckpt-0000002, latest.json, best.json, metrics.jsonl"
            in capsys.readouterr().out)
    assert [m["iter"] for m in read_metrics(out)] == [0, 1, 2, 3, 3]  # one run's lines, not two interleaved
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000003"] and (out / "notes.txt").exists()


def test_resuming_a_finished_run_says_so_and_eval_only_evaluates_it(data, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=2, eval_interval=2))
    lines = len(read_metrics(out))
    capsys.readouterr()
    assert train.main(tiny_train_config(data, out, max_iters=2, init_from="resume"))["iter_num"] == 2
    assert "the run is finished and nothing was trained; raise --max_iters" in capsys.readouterr().out
    assert len(read_metrics(out)) == lines
    train.main(tiny_train_config(data, out, max_iters=2, init_from="resume", eval_only=True))
    assert "iter 2: val loss" in capsys.readouterr().out


def test_a_run_ends_with_its_last_weights_and_readers_take_the_best(data, tmp_path, monkeypatch):
    """always_save_checkpoint=False keeps the best; the run still ends with a checkpoint of its last
    weights (latest), and sample.py / eval.py / export_hf.py read the best unless told otherwise."""
    from homegpt import evaluation
    import eval as eval_script
    import export_hf
    import sample
    losses = iter([3.0, 2.0, 2.5, 2.6])
    monkeypatch.setattr(evaluation, "evaluate_loss", lambda *a, **k: {"loss": next(losses)})
    out = tmp_path / "out"
    train.main(tiny_train_config(data, out, max_iters=6, eval_interval=2, always_save_checkpoint=False))
    assert json.loads((out / "best.json").read_text())["iter_num"] == 2
    assert json.loads((out / "latest.json").read_text())["iter_num"] == 6  # the last weights, saved
    assert weights.load_any(str(out), which="best")[2]["iter_num"] == 2
    assert weights.load_any(str(out), which="latest")[2]["iter_num"] == 6
    assert sample.SampleConfig.which == eval_script.EvalConfig.which == export_hf.ExportConfig.which == "best"
