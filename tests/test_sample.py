"""sample.py without --chat: the samples are model.generate's tokens for the seed, and the progress bar
over them appears on a terminal only, never in captured output or a log.

    python -m pytest -q tests/test_sample.py
"""

import pytest
import torch

import sample
from homegpt.dataloader import Tokenizer
from helpers import Terminal, tiny_run
from homegpt.generate import generate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("sample"), max_iters=4, eval_interval=4, eval_iters=1)


def sample_cfg(run, **kw):
    return sample.SampleConfig(**{"out_dir": str(run), "device": "cpu", "dtype": "float32", "num_samples": 2,
                                  "max_new_tokens": 40, "start": "ROMEO:", **kw})


def test_samples_are_generates_tokens_for_the_seed(run, capsys):
    samples = sample.main(sample_cfg(run))
    model, data_meta, _ = sample.load_any(str(run), torch.device("cpu"), "best")
    tok = Tokenizer(data_meta)
    x = torch.tensor(tok.encode("ROMEO:"))[None, :].repeat(2, 1)
    gen = torch.Generator().manual_seed(sample.SampleConfig.seed)
    y = generate(model, x, 40, temperature=0.8, top_k=200, generator=gen)
    assert samples == [tok.decode(row.tolist()) for row in y]
    assert capsys.readouterr().out == "".join(s + "\n---------------\n" for s in samples)


def test_no_progress_bar_when_stderr_is_not_a_terminal(run, capfd):
    sample.main(sample_cfg(run))
    out, err = capfd.readouterr()
    assert "sampling" not in out + err and "\r" not in out + err and "tok/s" not in out + err


def test_a_terminal_sees_a_bar_over_the_tokens_and_the_same_samples(run, monkeypatch, capsys):
    quiet = sample.main(sample_cfg(run))
    capsys.readouterr()
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert sample.main(sample_cfg(run)) == quiet
    assert "sampling 2 x" in terminal.getvalue() and "/40" in terminal.getvalue()
    assert "sampling" not in capsys.readouterr().out  # the text on stdout stays clean for a pipe
