"""A LoRA (or 1-D) run computes on the very base checkpoint it was fine-tuned on, whatever the base run
does afterwards: trains on, prunes, is retrained into the same out_dir, or is moved.

    python -m pytest -q tests/test_lora_base.py
"""

import json
import shutil

import pytest
import torch

import sample
import train
from homegpt import weights
from homegpt.errors import UserError
from homegpt.fileio import file_sha256
from helpers import all_logits, char_dataset, read_metrics, tiny_train_config

IDX = torch.arange(32).remainder(40)[None]  # (1, T): ids every char model here knows
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)


def train_base(data, base, max_iters, **kw):
    """The base run: trained to max_iters, or on from its checkpoint to max_iters."""
    kw = dict(max_iters=max_iters, eval_interval=2, eval_iters=1, keep_last_n=10) | kw
    if (base / "latest.json").exists() and not kw.get("overwrite"):
        kw["init_from"] = "resume"
    train.main(tiny_train_config(data, base, **kw))


def fine_tune(data, base, out, max_iters=2, **kw):
    """A LoRA run on base (or, with init_from='resume', on from its checkpoint to max_iters)."""
    train.main(tiny_train_config(data, out, max_iters=max_iters, eval_interval=2, eval_iters=1,
                                 **(LORA | dict(init_from=str(base)) | kw)))


def logits(run, **kw):
    model, _ = weights.load_model(run, **kw)
    with torch.no_grad():
        return all_logits(model, IDX)


@pytest.fixture
def runs(tmp_path):
    """(data, base run at iteration 4, LoRA run of 2 iterations on it)."""
    data = char_dataset(tmp_path / "data", n_chars=20_000)
    base, lora = tmp_path / "base", tmp_path / "lora"
    train_base(data, base, 4)
    fine_tune(data, base, lora)
    return data, base, lora


def pinned(run):
    ckpt = json.loads((run / "latest.json").read_text())["checkpoint"]
    return json.loads((run / ckpt / "state.json").read_text())["base"]


def test_the_checkpoint_pins_the_base_checkpoint_and_its_hash(runs):
    _, base, lora = runs
    assert pinned(lora) == {"run": str(base.resolve()), "checkpoint": "ckpt-0000004",
                            "sha256": file_sha256(base / "ckpt-0000004" / "model.safetensors")}


@pytest.mark.parametrize("finetune", [LORA, dict(train_1d_only=True)], ids=["lora", "1d"])
def test_the_base_training_on_changes_nothing(tmp_path, finetune):
    data = char_dataset(tmp_path / "data", n_chars=20_000)
    base, out = tmp_path / "base", tmp_path / "ft"
    train_base(data, base, 4)
    train.main(tiny_train_config(data, out, init_from=str(base), max_iters=2, eval_interval=2, eval_iters=1,
                                 **finetune))
    before = logits(out)
    train_base(data, base, 8)  # the base's latest is now ckpt-0000008
    assert json.loads((base / "latest.json").read_text())["checkpoint"] == "ckpt-0000008"
    torch.testing.assert_close(logits(out), before, rtol=0, atol=0)


def test_a_lora_base_that_is_itself_a_lora_run_pins_its_own_checkpoint(runs):
    data, base, lora = runs
    on_lora = lora.parent / "on-lora"
    fine_tune(data, lora, on_lora)
    assert pinned(on_lora)["run"] == str(lora.resolve()) and pinned(on_lora)["checkpoint"] == "ckpt-0000002"
    before = logits(on_lora)
    train_base(data, base, 8)  # the grand-base trains on: the middle run still computes on ckpt-0000004
    fine_tune(data, base, lora, max_iters=4, init_from="resume")  # and the middle run trains on
    torch.testing.assert_close(logits(on_lora), before, rtol=0, atol=0)


def test_a_pruned_base_checkpoint_is_refused_in_one_line(runs):
    data, base, lora = runs
    train_base(data, base, 12, keep_last_n=1)
    assert not (base / "ckpt-0000004").exists(), "the setup must prune the pinned checkpoint"
    with pytest.raises(UserError, match=r"no longer holds ckpt-0000004.*--base_dir") as e:
        weights.load_model(lora)
    assert str(base.resolve()) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("how", ["retrained", "damaged"])
def test_changed_base_weights_are_refused_in_one_line(runs, how):
    data, base, lora = runs
    f = base / "ckpt-0000004" / "model.safetensors"
    if how == "retrained":  # a new run into the base's out_dir: the same checkpoint names, other weights
        train_base(data, base, 4, overwrite=True, seed=7)
    else:  # one byte flipped in place: the size, and so the checkpoint's own size check, unchanged
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0xFF
        f.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"the base has changed: .*ckpt-0000004.*fine-tuned on checkpoint "
                                        r"ckpt-0000004 of the base run") as e:
        weights.load_model(lora)
    assert str(base.resolve()) in str(e.value) and "\n" not in str(e.value)


def test_a_moved_base_is_refused_then_loads_with_base_dir(runs, tmp_path):
    data, base, lora = runs
    before = logits(lora)
    cfg = dict(out_dir=str(lora), device="cpu", dtype="float32", num_samples=1, max_new_tokens=20)
    samples = sample.main(sample.SampleConfig(**cfg))
    moved = base.rename(tmp_path / "base-moved")
    with pytest.raises(UserError, match=r"the base this run was fine-tuned on is gone.*--base_dir") as e:
        weights.load_model(lora)
    assert "\n" not in str(e.value)
    torch.testing.assert_close(logits(lora, base_dir=str(moved)), before, rtol=0, atol=0)
    assert sample.main(sample.SampleConfig(**cfg, base_dir=str(moved))) == samples
    # the moved base must still hold the pinned checkpoint, as it was
    train_base(data, moved, 4, overwrite=True, seed=7)
    with pytest.raises(UserError, match="the base has changed"):
        weights.load_model(lora, base_dir=str(moved))


def test_a_resume_after_the_base_moved_records_where_it_is_now(runs, tmp_path):
    data, base, lora = runs
    moved = base.rename(tmp_path / "base-moved")
    with pytest.raises(UserError, match="is gone"):
        fine_tune(data, base, lora, max_iters=4, init_from="resume")
    fine_tune(data, base, lora, max_iters=4, init_from="resume", base_dir=str(moved))
    assert pinned(lora) == {"run": str(moved.resolve()), "checkpoint": "ckpt-0000004",
                            "sha256": file_sha256(moved / "ckpt-0000004" / "model.safetensors")}
    weights.load_model(lora)  # no base_dir needed any more


def test_a_resume_trains_on_the_pinned_base(tmp_path):
    """Fine-tuned for 4 iterations straight, or 2 then resumed after the base trained on: the same losses."""
    data = char_dataset(tmp_path / "data", n_chars=20_000)
    base = tmp_path / "base"
    train_base(data, base, 4)
    fine_tune(data, base, tmp_path / "straight", max_iters=4)
    fine_tune(data, base, tmp_path / "resumed", max_iters=2)
    train_base(data, base, 8)
    fine_tune(data, base, tmp_path / "resumed", max_iters=4, init_from="resume")
    straight, resumed = (read_metrics(tmp_path / name) for name in ("straight", "resumed"))
    for a, b in zip([m for m in straight if m["iter"] > 2], [m for m in resumed if m["iter"] > 2], strict=True):
        assert a["iter"] == b["iter"]
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a, b)
    assert pinned(tmp_path / "resumed") == pinned(tmp_path / "straight")


def test_an_old_checkpoint_naming_its_base_by_path_loads_as_before(runs):
    """Earlier releases recorded the base run's out_dir as a plain path, loaded at its latest."""
    _, base, lora = runs
    before = logits(lora)
    state_file = lora / "ckpt-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["base"] = str(base.resolve())
    state_file.write_text(json.dumps(state))
    torch.testing.assert_close(logits(lora), before, rtol=0, atol=0)
    moved = shutil.move(base, base.parent / "elsewhere")
    torch.testing.assert_close(logits(lora, base_dir=str(moved)), before, rtol=0, atol=0)
