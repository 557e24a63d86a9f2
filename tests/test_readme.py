"""README's and docs/'s commands name scripts, config files and keys that exist: every `python ...` and
`torchrun ...` command of README.md and of each docs/*.md page is parsed here by its script's own
configurator, as the script would parse it.

    python -m pytest -q tests/test_readme.py

This catches a renamed or removed key, a config file or script that moved, a wrong type in an
override: the mistakes that make a newcomer's first command fail. It does not run the commands (some
train for hours or download); running them in order on a fresh machine is the release check.
"""

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import configurator

ROOT = Path(__file__).resolve().parents[1]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_argv(text):
    """argv from the script on (script.py and its arguments) of one command line, or None when it is not a
    `python script.py` / `torchrun ... script.py` command (python -m / -c, a placeholder in prose)."""
    text = " ".join(text.split("  #")[0].split())  # a comment after two spaces; a span broken over lines
    argv = shlex.split(text)
    while argv and "=" in argv[0] and not argv[0].startswith("-"):  # OMP_NUM_THREADS=1 ...
        argv = argv[1:]
    if not argv or argv[0] not in ("python", "torchrun") or argv[1:2] in (["-m"], ["-c"]) or "..." in argv:
        return None
    script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    return None if script is None else argv[script:]


def page_commands(path):
    """(line number, argv after the interpreter) of every python / torchrun command of a markdown page:
    the indented code lines, and the `inline` commands of the text and tables (an inline span may
    run over a line break: it counts from the line it starts on)."""
    found, paragraph = [], []

    def inline(paragraph):
        text = "\n".join(line for _, line in paragraph)
        starts = [n for n, line in paragraph for _ in range(len(line) + 1)]  # line number of each character
        for m in re.finditer(r"`((?:python|torchrun) [^`]+)`", text):
            argv = command_argv(m.group(1))
            if argv:
                found.append((starts[m.start()], argv))

    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("    ") or not line.strip():  # a code line, or the blank line that ends a paragraph
            inline(paragraph)
            paragraph = []
            argv = command_argv(line.strip()) if line.strip() else None
            if argv:
                found.append((lineno, argv))
        else:
            paragraph.append((lineno, line))
    inline(paragraph)
    return found


def readme_commands():
    """(line number, argv) of README's commands."""
    return page_commands(ROOT / "README.md")


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


COMMANDS = [(page.relative_to(ROOT).as_posix(), n, argv) for page in PAGES for n, argv in page_commands(page)]


def test_readme_has_the_commands_a_newcomer_runs():
    scripts = {argv[0] for _, argv in readme_commands()}
    assert {"train.py", "sample.py", "eval.py", "export_hf.py", "export_gguf.py", "data/shakespeare/prepare.py",
            "benchmarks/gpu_check.py", "bench.py"} <= scripts, scripts


def test_every_docs_page_is_read():
    """Each docs page with a command contributes some: a change in the markdown that hides every command
    of a page from the parser (say, code fenced instead of indented) fails here, not silently."""
    pages = {page for page, _, _ in COMMANDS}
    for page in ["README.md", "docs/cpu_recipe.md", "docs/finetune.md", "docs/speed.md", "docs/LOG.md"]:
        assert page in pages, f"no command found in {page}"


def test_a_command_over_a_line_break_is_one_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text `python train.py config/train_shakespeare_char_cpu.py\n--max_iters=5` and more.\n\n"
                    "    python sample.py --out_dir=out-x  # a comment\n\n`python -m pytest -q` is no script.\n")
    assert page_commands(page) == [(1, ["train.py", "config/train_shakespeare_char_cpu.py", "--max_iters=5"]),
                                   (4, ["sample.py", "--out_dir=out-x"])]


@pytest.mark.parametrize("page,lineno,argv", COMMANDS, ids=[f"{page}:{n}" for page, n, _ in COMMANDS])
def test_readme_command_parses(page, lineno, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands run from the checkout
    where = f"{page} line {lineno}"
    script = ROOT / argv[0]
    assert script.is_file(), f"{where}: {argv[0]} does not exist"
    args = [a for a in argv[1:] if a not in ("-h", "--help")]
    for a in args:
        if not a.startswith("--") and a.endswith(".py"):
            assert (ROOT / a).is_file(), f"{where}: config file {a} does not exist"
    monkeypatch.syspath_prepend(str(script.parent))  # as `python <script>` puts its folder first
    module = load_script(script)
    if script.name == "bench.py" and module.wants_plan(args):
        configurator.parse_config(module.PlanConfig, [a for a in args if a != "--plan"])
    elif script.name == "bench.py":
        module.parse_args(args)
    elif script.name == "plot.py":
        configurator.parse_config(module.PlotConfig, args, positional="run_dirs")
    else:
        configurator.parse_config(config_class(module), args)
