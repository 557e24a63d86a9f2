"""export_hf.py as a user runs it: the messages on stdout, and a progress bar naming the step under way
(loading, writing) on a terminal only.

    python -m pytest -q tests/test_export_hf.py
"""

import pytest

import export_hf
from helpers import Terminal, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("export"), max_iters=2, eval_interval=2, eval_iters=1)


def test_export_says_what_it_wrote_and_draws_no_bar_in_a_log(run, tmp_path, capfd):
    hf_dir = export_hf.main(export_hf.ExportConfig(out_dir=str(run), hf_dir=str(tmp_path / "hf")))
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "config.json").is_file()
    out, err = capfd.readouterr()
    assert f"parameters -> {hf_dir}" in out and "no tokenizer files" in out and "from_pretrained" in out
    assert "export" not in err and "\r" not in out + err  # captured: not a terminal, so no bar


def test_a_terminal_sees_which_step_is_under_way(run, tmp_path, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    hf_dir = export_hf.main(export_hf.ExportConfig(out_dir=str(run), hf_dir=str(tmp_path / "hf")))
    drawn = terminal.getvalue()
    assert "export:" in drawn and f"loading {run}" in drawn and f"writing {hf_dir}" in drawn
    assert f"parameters -> {hf_dir}" in capsys.readouterr().out  # the messages stay on stdout
