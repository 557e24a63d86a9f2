"""Config files and --key=value overrides: precedence, types and the errors users see."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from configurator import parse_config

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
