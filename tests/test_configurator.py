"""Config files and --key=value overrides: precedence, types and the errors users see."""

import dataclasses
import importlib.util
import inspect
import io
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from configurator import configure, parse_config
from homegpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Cfg:
    out_dir: str = "out"
    batch_size: int = 12
    learning_rate: float = 6e-4
    compile: bool = True
    qkv_bias: Optional[bool] = None


def test_defaults_then_files_then_overrides(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("batch_size = 32\nlearning_rate = 1e-3\n_helper = 7  # private: not a key\n")
    b = tmp_path / "b.py"
    b.write_text("batch_size = 64\n")
    cfg = parse_config(Cfg, [str(a), str(b), "--learning_rate=3e-4"])
    assert cfg.batch_size == 64  # the later file wins
    assert cfg.learning_rate == 3e-4  # the override wins over files
    assert cfg.out_dir == "out" and cfg.compile is True


def test_value_parsing():
    cfg = parse_config(Cfg, ["--out_dir=123", "--learning_rate=1", "--compile=false", "--qkv_bias=False"])
    assert cfg.out_dir == "123"  # a str field keeps the raw text
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # int is fine for float
    assert cfg.compile is False and cfg.qkv_bias is False
    assert parse_config(Cfg, ["--qkv_bias=None"]).qkv_bias is None
    assert parse_config(Cfg, ["--out_dir=a=b"]).out_dir == "a=b"  # split on the first '='


def test_unknown_key_suggests_close_names():
    with pytest.raises(ValueError, match="unknown config key 'batchsize'.*batch_size"):
        parse_config(Cfg, ["--batchsize=3"])


def test_wrong_types_are_refused():
    with pytest.raises(ValueError, match="batch_size: expected int, got 1.5"):
        parse_config(Cfg, ["--batch_size=1.5"])
    with pytest.raises(ValueError, match="compile: expected bool"):
        parse_config(Cfg, ["--compile=1"])


def test_config_file_values_are_checked_too(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = 'big'\nlearnig_rate = 1.0\n")
    with pytest.raises(ValueError) as e:
        parse_config(Cfg, [str(f)])
    msg = str(e.value)
    assert "batch_size: expected int" in msg and "learnig_rate" in msg and "learning_rate" in msg  # both at once


def test_missing_file_and_bad_syntax(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        parse_config(Cfg, [str(tmp_path / "nope.py")])
    with pytest.raises(ValueError, match="overrides take the form --key=value"):
        parse_config(Cfg, ["--batch_size"])
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = (\n")
    with pytest.raises(ValueError, match="could not run the config file"):
        parse_config(Cfg, [str(bad)])


def test_script_exits_non_zero_with_the_message():
    r = subprocess.run([sys.executable, "train.py", "--n_layr=4", "--batch_size=x"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown config key 'n_layr'" in r.stderr and "n_layer" in r.stderr
    assert "batch_size: expected int" in r.stderr


@dataclass
class Documented:
    # I/O
    out_dir: str = "out"  # where results go
    seed: int = 1337
    name: str = "a # b"  # the comment after the string, not the '#' inside it

    # model
    # a longer note over two lines,
    # kept above its field
    n_layer: int = 12
    sizes: list = field(default_factory=lambda: [1, 2])  # a factory's value
    lr: float = 6e-4  # peak learning rate


def help_of(cfg_cls, capsys):
    with pytest.raises(SystemExit) as e:
        configure(cfg_cls, ["--batch_size=3", "--help"])  # --help wins wherever it is
    assert e.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_help_prints_each_key_with_its_default_comment_and_section(capsys):
    assert help_of(Documented, capsys)[1:] == [
        "keys and defaults:",
        "  # I/O",
        "  --out_dir='out'  # where results go",
        "  --seed=1337",
        "  --name='a # b'   # the comment after the string, not the '#' inside it",
        "",
        "  # model",
        "  # a longer note over two lines,",
        "  # kept above its field",
        "  --n_layer=12",
        "  --sizes=[1, 2]   # a factory's value",
        "  --lr=0.0006      # peak learning rate",
    ]


def test_help_of_a_class_defined_in_a_function(capsys):
    @dataclass
    class Local:  # indented source: dedented before it is parsed
        # knobs
        k: int = 1  # the one knob
    assert help_of(Local, capsys)[2:] == ["  # knobs", "  --k=1  # the one knob"]


def test_help_of_train_py_carries_the_dataclass_comments(capsys):
    from train import TrainConfig
    out = help_of(TrainConfig, capsys)
    assert "  # I/O" in out and out.index("  # I/O") < out.index(next(l for l in out if l.startswith("  --out_dir=")))
    line = {l.split("=")[0].strip(): l for l in out if l.startswith("  --")}
    assert line["--out_dir"].endswith("# checkpoints and metrics.jsonl go here")
    assert line["--learning_rate"].strip() == "--learning_rate=0.0006"  # no comment of its own: still listed
    assert line["--lora_rank"].split("#")[1].strip() == "0 disables LoRA"
    # the two-line note above `optimizer` stays with it
    assert out[out.index(line["--optimizer"]) - 1].startswith("  # muon_lr, AdamW at learning_rate")


SCRIPTS = [("train.py", "TrainConfig"), ("sample.py", "SampleConfig"), ("eval.py", "EvalConfig"),
           ("bench.py", "BenchConfig"), ("export_hf.py", "ExportConfig"), ("convert_nanogpt.py", "ConvertConfig"),
           ("data/fineweb/prepare.py", "PrepareConfig"), ("data/shakespeare/prepare.py", "PrepareConfig"),
           ("data/classify/make_synthetic.py", "SyntheticConfig")]


@pytest.mark.parametrize("script,name", SCRIPTS)
def test_every_scripts_help_lists_every_key_and_every_comment(script, name, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"help_{Path(script).parent.name}_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # where inspect finds the source file
    spec.loader.exec_module(module)  # the scripts do their work under `if __name__ == "__main__"` only
    cfg_cls = getattr(module, name)
    text = "\n".join(help_of(cfg_cls, capsys))
    for f in dataclasses.fields(cfg_cls):
        assert text.count(f"  --{f.name}=") == 1, f.name
    # every comment of the class reaches the help: none is lost
    src = inspect.getsource(cfg_cls)
    comments = [t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT]
    assert comments and all(c in text for c in comments), [c for c in comments if c not in text]


def test_help_from_the_command_line():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: python train.py")
    assert "  # data\n  --dataset='shakespeare_char'" in r.stdout


def test_only_wrong_input_becomes_one_line_and_bugs_keep_their_traceback(monkeypatch):
    from dataclasses import dataclass

    import configurator

    @dataclass
    class C:
        n: int = 1

    monkeypatch.setattr("sys.argv", ["script.py", "--n=2"])

    def wrong_input(cfg):
        raise UserError(f"n={cfg.n} is wrong; use 3")
    with pytest.raises(SystemExit) as e:
        configurator.run(wrong_input, C)
    assert e.value.code == "error: n=2 is wrong; use 3"  # printed as one line, exit status 1

    def bug(cfg):
        int("not a number")  # a ValueError that no user caused
    with pytest.raises(ValueError, match="invalid literal"):
        configurator.run(bug, C)  # not swallowed into 'error: ...': the traceback shows where

    monkeypatch.setenv("RANK", "1")  # under torchrun every rank meets the same error; rank 0 alone says it
    with pytest.raises(SystemExit) as e:
        configurator.run(wrong_input, C)
    assert e.value.code == 1
    monkeypatch.setattr("sys.argv", ["script.py", "--n=x"])
    with pytest.raises(SystemExit) as e:
        configurator.run(wrong_input, C)
    assert e.value.code == 1


def test_a_bare_switch_turns_a_bool_on_and_nothing_else():
    from sample import SampleConfig
    assert parse_config(SampleConfig, ["--chat"]).chat is True
    assert parse_config(SampleConfig, ["--chat", "--chat=False"]).chat is False  # the last word wins
    with pytest.raises(ValueError, match="a bare --key only turns on a switch"):
        parse_config(SampleConfig, ["--max_new_tokens"])
