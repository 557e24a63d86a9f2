"""README's commands name scripts, config files and keys that exist: every `python ...` and `torchrun ...`
command of README is parsed here by its script's own configurator, as the script would parse it.

    python -m pytest -q tests/test_readme.py

This catches a renamed key, a config file or script that moved, a wrong type in an override: the
mistakes that make a newcomer's first command fail. It does not run the commands (some train for
hours or download); running them in order on a fresh machine is the release check.
"""

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import configurator

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    """(line number, argv after the interpreter) of every python / torchrun command in README: the
    indented code lines and the `inline` commands of the text and tables."""
    found = []
    for lineno, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        candidates = [line.strip()] if line.startswith("    ") else re.findall(r"`((?:python|torchrun) [^`]+)`", line)
        for text in candidates:
            text = text.split("  #")[0].strip()
            argv = shlex.split(text)
            while argv and "=" in argv[0] and not argv[0].startswith("-"):  # OMP_NUM_THREADS=1 ...
                argv = argv[1:]
            if not argv or argv[0] not in ("python", "torchrun") or argv[1:2] in (["-m"], ["-c"]) or "..." in argv:
                continue  # not a script, or a placeholder in prose
            script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
            if script is not None:
                found.append((lineno, argv[script:]))
    return found


def config_class(module):
    classes = [v for v in vars(module).values() if dataclasses.is_dataclass(v) and isinstance(v, type)
               and v.__module__ == module.__name__ and v.__name__.endswith("Config")]
    assert len(classes) == 1, f"{module.__name__}: expected one *Config dataclass, found {classes}"
    return classes[0]


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = readme_commands()


def test_readme_has_the_commands_a_newcomer_runs():
    scripts = {argv[0] for _, argv in COMMANDS}
    assert {"train.py", "sample.py", "eval.py", "export_hf.py", "data/shakespeare/prepare.py",
            "benchmarks/gpu_check.py", "bench.py"} <= scripts, scripts


@pytest.mark.parametrize("lineno,argv", COMMANDS, ids=[f"README:{n}" for n, _ in COMMANDS])
def test_readme_command_parses(lineno, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # README's commands run from the checkout
    script = ROOT / argv[0]
    assert script.is_file(), f"README line {lineno}: {argv[0]} does not exist"
    args = [a for a in argv[1:] if a not in ("-h", "--help")]
    for a in args:
        if not a.startswith("--") and a.endswith(".py"):
            assert (ROOT / a).is_file(), f"README line {lineno}: config file {a} does not exist"
    monkeypatch.syspath_prepend(str(script.parent))  # as `python <script>` puts its folder first
    module = load_script(script)
    if script.name == "bench.py" and module.wants_plan(args):
        import plan
        configurator.parse_config(plan.PlanConfig, [a for a in args if a != "--plan"])
    elif script.name == "bench.py":
        module.parse_args(args)
    elif script.name == "plot.py":
        configurator.parse_config(module.PlotConfig, args, positional="run_dirs")
    else:
        configurator.parse_config(config_class(module), args)
