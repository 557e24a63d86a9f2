"""Nothing a command writes loses a run: every writer checks its target before any slow work, never
writes into a run, and replaces only what it wrote itself (an earlier export, a GGUF file, a PNG, a
JSON report), naming what it deletes. Refusals are one line `error: ...` and a non-zero exit.

    python -m pytest -q tests/test_writers.py
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export_gguf
import export_hf
from homegpt.errors import UserError
from helpers import ROOT, tiny_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("writers"), max_iters=2, eval_interval=2, eval_iters=1)


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the tiny run for one test to point commands at: a bug that deletes it spoils no other test."""
    return Path(shutil.copytree(trained, tmp_path / "runs" / "out"))


@pytest.fixture
def read_only(tmp_path):
    """A directory this process cannot create files in: mode 555, or, for root (whom modes do not stop),
    /sys, which the kernel keeps read-only."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    try:
        if _can_write(d):
            if _can_write(Path("/sys")):
                pytest.skip("no directory here refuses this process's writes")
            d = Path("/sys")
        yield d
    finally:
        (tmp_path / "read-only").chmod(0o755)


def _can_write(d):
    try:
        (d / "probe").touch()
    except OSError:
        return False
    (d / "probe").unlink()
    return True


def files(path):
    """Every file beneath path with its bytes, and every directory: to show a run untouched."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(Path(path).rglob("*"))}


def cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


def refused(r, *words):
    """The command failed with one line `error: ...` holding words, and no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stdout[-1000:] + r.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


# ----------------------------------------------------------------------------- export_hf.py

def test_export_hf_overwrite_never_replaces_a_run_or_a_folder_holding_one(run):
    before = files(run.parent)
    refused(cli("export_hf.py", f"--out_dir={run}", f"--hf_dir={run}", "--overwrite=True"), "holds a run")
    refused(cli("export_hf.py", f"--out_dir={run}", f"--hf_dir={run.parent}", "--overwrite=True"), "out/")
    assert files(run.parent) == before


def test_export_hf_overwrite_replaces_its_own_export_and_names_what_goes(run, tmp_path):
    hf_dir = tmp_path / "hf"
    assert cli("export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}").returncode == 0
    refused(cli("export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}"), "earlier export", "--overwrite=True")
    r = cli("export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}", "--overwrite=True")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"overwrite: {hf_dir} holds an earlier export; deleting config.json, model.safetensors" in r.stdout
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "runs"]  # no copy aside left behind
    (hf_dir / "notes.txt").write_text("mine")  # an export with the user's file in it is no longer only ours
    before = files(hf_dir)
    refused(cli("export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}", "--overwrite=True"), "notes.txt")
    assert files(hf_dir) == before


def test_the_default_export_of_one_checkpoint_goes_beside_the_run(run):
    ckpt = next(run.glob("ckpt-*"))
    assert export_hf.default_hf_dir(ckpt) == run.parent / f"out-{ckpt.name}-hf"
    assert export_hf.default_hf_dir(run) == Path(f"{run}-hf")
    with pytest.raises(UserError, match="taken for one of its checkpoints"):  # train.py would prune it
        export_hf.check_export_dir(run / f"{ckpt.name}-hf", "--hf_dir")


# ----------------------------------------------------------------------------- unwritable targets

def _never_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the target was checked")


@pytest.mark.parametrize("where", ["read-only", "beneath-a-file"])
def test_an_export_that_cannot_be_written_is_refused_before_the_model_loads(run, tmp_path, read_only, where,
                                                                            monkeypatch):
    base = read_only if where == "read-only" else tmp_path / "a-file"
    if where == "beneath-a-file":
        base.write_text("a file, not a directory")
    monkeypatch.setattr(export_hf, "load_model", _never_load)
    monkeypatch.setattr(export_gguf.weights, "load_model", _never_load)
    with pytest.raises(UserError, match="--hf_dir"):
        export_hf.main(export_hf.ExportConfig(out_dir=str(run), hf_dir=str(base / "hf")))
    with pytest.raises(UserError, match="--gguf"):
        export_gguf.main(export_gguf.GGUFConfig(out_dir=str(run), gguf=str(base / "m.gguf")))
    # as a user sees it: one line, no traceback
    refused(cli("export_gguf.py", f"--out_dir={run}", f"--gguf={base / 'm.gguf'}"), "--gguf")


# ----------------------------------------------------------------------------- export_gguf.py

def test_export_gguf_overwrite_replaces_only_a_gguf_file_and_never_writes_into_a_checkpoint(run, tmp_path):
    pytest.importorskip("gguf", reason="the GGUF writer (pip install -e '.[gguf]')")
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes, under an unlucky name")
    refused(cli("export_gguf.py", f"--out_dir={run}", f"--gguf={notes}", "--overwrite=True"), "not a GGUF file")
    assert notes.read_text() == "my notes, under an unlucky name"
    ckpt = next(run.glob("ckpt-*"))
    before = files(run)
    refused(cli("export_gguf.py", f"--out_dir={run}", f"--gguf={ckpt / 'model.gguf'}"), "run's own files")
    assert files(run) == before
    target = tmp_path / "m.gguf"
    export_gguf.main(export_gguf.GGUFConfig(out_dir=str(run), gguf=str(target)))
    export_gguf.main(export_gguf.GGUFConfig(out_dir=str(run), gguf=str(target), overwrite=True))  # its own: replaced
    assert target.read_bytes()[:4] == b"GGUF"


# ----------------------------------------------------------------------------- the other writers

def test_plot_replaces_a_picture_and_nothing_else(run, tmp_path):
    pytest.importorskip("matplotlib")
    before = files(run)
    refused(cli("plot.py", run, f"--out={run / 'metrics.jsonl'}"), "run's own files")
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    refused(cli("plot.py", run, f"--out={notes}"), "not a PNG picture")
    assert notes.read_text() == "not a picture" and files(run) == before
    picture = tmp_path / "loss.png"
    for _ in range(2):  # the second replaces the first
        assert cli("plot.py", run, f"--out={picture}").returncode == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_convert_nanogpt_never_writes_into_a_run(run):
    from model import GPT, GPTConfig
    args = dict(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=65, bias=False)
    ckpt = run.parent / "ckpt.pt"
    torch.save({"model": GPT(GPTConfig(**args, activation="gelu")).state_dict(), "model_args": args, "iter_num": 5},
               ckpt)
    before = files(run)
    refused(cli("convert_nanogpt.py", f"--ckpt={ckpt}", f"--out_dir={run}"), "holds a run")
    assert files(run) == before


def test_a_prepare_script_never_writes_into_a_run(run, read_only):
    before = files(run)
    refused(cli("data/shakespeare_char/prepare.py", f"--out_dir={run}"), "holds a run")
    refused(cli("data/shakespeare_char/prepare.py", f"--out_dir={read_only / 'chars'}"), "cannot write")
    assert files(run) == before


def test_a_report_replaces_a_report_and_never_a_runs_file(run, tmp_path):
    before = files(run)
    bench = ("--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--vocab_size=16", "--batch_sizes=1",
             "--dtypes=float32", "--compile=False", "--eval=False", "--warmup=0", "--steps=1", "--device=cpu")
    refused(cli("bench.py", *bench, f"--out_file={run / 'latest.json'}"), "run's own files")
    script = tmp_path / "notes.json"
    script.write_text("[1, 2, 3]\n")
    refused(cli("bench.py", *bench, f"--out_file={script}"), "not a JSON report")
    assert files(run) == before and script.read_text() == "[1, 2, 3]\n"
