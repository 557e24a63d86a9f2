"""Checkpoints written by an earlier homegpt still load and resume exactly.

Each fixture is a run saved by older code: a tiny char model with rotary positions, QK-norm, the four
previous-position options and Muon, saved at iteration 4 of 6. Beside it, expected.json holds what that
code computed (the saved model's logits on a fixed input, and the metrics of the same command run to
iteration 6 without a stop) and recipe.json the options it was trained with and the commit.
    run_format1          checkpoint format 1 as it stood before the model options were trimmed (bc596e2)
    run_before_package   the code just before the library moved into homegpt/ (0e44551), 16 wide
tests/fixtures/make_run.py writes another from any commit; run before a change that may touch the format.

    python -m pytest -q tests/test_old_checkpoints.py
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from homegpt import weights
import train
from homegpt.errors import UserError
from helpers import char_dataset, tiny_train_config

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = ["run_format1", "run_before_package"]
FIXTURE = FIXTURES / "run_format1"


def expected(run):
    return json.loads((FIXTURES / run / "expected.json").read_text())


def recipe(run):
    """The train.py options the fixture was trained with (make_run.py's recipe and that run's overrides)."""
    return json.loads((FIXTURES / run / "recipe.json").read_text())["options"]


@pytest.mark.parametrize("run", RUNS)
def test_an_old_checkpoint_computes_what_it_computed(run):
    model, info = weights.load_model(FIXTURES / run)
    assert info["iter_num"] == 4
    idx = torch.arange(16).remainder(65)[None]
    with torch.no_grad():
        logits = model(idx, targets=torch.full_like(idx, -1))[0]
    want = expected(run)
    torch.testing.assert_close(logits[0, :3, :5], torch.tensor(want["logits_first"]), rtol=0, atol=1e-5)
    assert abs(logits.double().abs().sum().item() - want["logits_abs_sum"]) < 1e-3


@pytest.mark.parametrize("run", RUNS)
def test_an_old_run_resumes_exactly(tmp_path, monkeypatch, run):
    """Resumed at iteration 4 by today's code, the run ends as the old code's uninterrupted run did."""
    monkeypatch.chdir(tmp_path)  # the run recorded its data and out_dir as relative paths
    shutil.copytree(FIXTURES / run, "v1_run")
    char_dataset(Path("fixture-data"), n_chars=20000)
    result = train.main(tiny_train_config("fixture-data", "v1_run", max_iters=6, init_from="resume", **recipe(run)))
    assert result["iter_num"] == 6
    lines = [json.loads(line) for line in Path("v1_run/metrics.jsonl").read_text().splitlines()]
    resumed = [line for line in lines if line["iter"] > 4]
    want = expected(run)["uninterrupted"]
    assert [sorted(line) for line in resumed] == [sorted(line) for line in want]
    for got, old in zip(resumed, want):
        for key in ("train_loss", "val_loss", "lr", "tokens"):
            if key in old:
                assert abs(got[key] - old[key]) <= 1e-6 * max(1.0, abs(old[key])), (key, got, old)


def test_a_checkpoint_that_used_a_removed_option_is_refused_in_one_line(tmp_path):
    """norm='rmsnorm' (and relu2, zero_init_proj, logit_softcap) are gone: a model trained with one cannot be
    rebuilt, and loading it must say so instead of computing another model with its weights."""
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    state_file = next(run.glob("ckpt-*")) / "state.json"
    state = json.loads(state_file.read_text())
    state["model_args"]["norm"] = "rmsnorm"
    state_file.write_text(json.dumps(state))
    with pytest.raises(UserError, match="norm='rmsnorm'.*no longer computes"):
        weights.load_model(run)
