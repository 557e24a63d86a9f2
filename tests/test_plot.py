"""plot.py: loss and learning-rate curves from metrics.jsonl, several runs, a run still being written.

    python -m pytest -q tests/test_plot.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
import plot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, n_train=10, val_every=5, tail=""):
    """A metrics.jsonl as train.py writes it: train lines every iteration, val lines (also with lr)
    every val_every iterations, and optionally a half-written last line."""
    path.mkdir(parents=True)
    lines = []
    for it in range(n_train + 1):
        if it % val_every == 0:
            lines.append({"iter": it, "tokens": it * 1024, "val_loss": 4.0 - 0.1 * it, "lr": 1e-3})
        if it > 0:
            lines.append({"iter": it, "tokens": it * 1024, "train_loss": 4.2 - 0.1 * it, "lr": 1e-3 * it / n_train,
                          "ms_per_iter": 10.0, "tokens_per_sec": 1e5, "mfu": 0.1})
    (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + tail)
    return path


def test_two_runs_overlaid_with_legend_and_lr_panel(tmp_path):
    a = write_run(tmp_path / "run-a")
    b = write_run(tmp_path / "run-b", n_train=6, val_every=3, tail='{"iter": 7, "tokens": 71')  # still writing
    out = tmp_path / "loss.png"
    fig = plot.plot_runs([a, b], out, x="tokens")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert not list(tmp_path.glob("*.tmp*"))
    ax_loss, ax_lr = fig.axes
    labels = [l.get_label() for l in ax_loss.get_lines()]
    assert labels == ["run-a train", "run-a val", "run-b train", "run-b val"]
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == labels
    assert [l.get_label() for l in ax_lr.get_lines()] == ["run-a", "run-b"]
    train_b, val_b = ax_loss.get_lines()[2:]
    assert list(train_b.get_xdata()) == [i * 1024 for i in range(1, 7)]  # the truncated line is skipped
    assert list(val_b.get_xdata()) == [0, 3072, 6144]
    assert list(val_b.get_ydata()) == pytest.approx([4.0, 3.7, 3.4])
    assert ax_lr.get_xlabel() == "tokens seen"


def test_x_iter(tmp_path):
    fig = plot.plot_runs([write_run(tmp_path / "r")], tmp_path / "p.png", x="iter")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == list(range(1, 11))
    assert fig.axes[1].get_xlabel() == "iteration"


def test_same_folder_names_keep_runs_apart(tmp_path):
    a, b = write_run(tmp_path / "x" / "out"), write_run(tmp_path / "y" / "out")
    fig = plot.plot_runs([a, b], tmp_path / "p.png")
    assert [l.get_label() for l in fig.axes[1].get_lines()] == [str(a), str(b)]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"nothing-here.metrics\.jsonl: no metrics file"):
        plot.plot_runs([tmp_path / "nothing-here"], tmp_path / "p.png")
    bad = write_run(tmp_path / "bad")
    text = (bad / "metrics.jsonl").read_text().splitlines(keepends=True)
    (bad / "metrics.jsonl").write_text("".join(text[:3] + ['{"iter": 3, "tok\n'] + text[3:]))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:4: not valid JSON"):
        plot.plot_runs([bad], tmp_path / "p.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no train_loss or val_loss"):
        plot.plot_runs([empty], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_cli(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    r = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(a), str(b), "--out=cmp.png", "--x=iter"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cmp.png").read_bytes()[:8] == PNG_SIGNATURE
    r = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(tmp_path / "missing")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "missing/metrics.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "loss.png").exists()


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(SystemExit, match=r"pip install -e \.\[plot\]"):
        plot.plot_runs([write_run(tmp_path / "r")], tmp_path / "p.png")
