"""
Configuration for every script: a dataclass of defaults, then config files, then --key=value.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Config files are plain Python assignments (`n_layer = 6`), run in a fresh namespace; names that
start with an underscore are helpers for the file's own arithmetic and are not config keys.
Overrides are parsed with ast.literal_eval (falling back to the raw string), split on the first
'='. Every value, from a file or the command line, is checked against the field's type; an unknown
key or a wrong type stops with a message naming the key, the expected type and the closest keys.
All problems are reported at once. --help lists every key with its default and the comment beside
it in the dataclass, under the dataclass's section comments (`# I/O`, `# data`): the source is the
documentation, so there is no second copy of it to fall out of date.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import textwrap
import tokenize
import typing
from pathlib import Path

from homegpt.errors import UserError


def _allowed(tp):
    """The plain types a field accepts: Optional[int] -> (int, NoneType)."""
    if typing.get_origin(tp) is typing.Union:
        return tuple(a for a in typing.get_args(tp))
    return (tp,)


def _coerce(key, value, tp, raw=None):
    """Return value converted to tp, or raise ValueError naming the key and the expected type."""
    allowed = _allowed(tp)
    if value is None and type(None) in allowed:
        return None
    if bool in allowed:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # (1e999 parses as inf): no key of ours means anything by inf or nan
            raise UserError(f"{key}: expected a finite number, got {value!r}")
        return float(value)  # an int is fine for a float (--learning_rate=1 means 1.0)
    if str in allowed and isinstance(value, str):
        return value
    if str in allowed and raw is not None:  # --out_dir=123 means the string '123'
        return raw
    for lit in (a for a in allowed if typing.get_origin(a) is typing.Literal):  # batch_size: int | 'auto'
        if value in typing.get_args(lit):
            return value
    names = " or ".join("None" if a is type(None) else " or ".join(map(repr, typing.get_args(a)))
                        if typing.get_origin(a) is typing.Literal else a.__name__ for a in allowed)
    raise UserError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")


def parse_list(s):
    """A comma-separated knob as a list: 'val, hellaswag,' -> ['val', 'hellaswag']."""
    return [p.strip() for p in str(s).split(",") if p.strip()]


def _unknown(key, valid):
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help to list the keys"
    return f"unknown config key '{key}'{hint}"


def read_config_file(path):
    """The public names a config file assigns."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path} (config files are paths, overrides are --key=value)")
    namespace = {}
    try:
        exec(compile(p.read_text(), str(p), "exec"), namespace)
    except Exception as e:
        raise UserError(f"{path}: could not run the config file: {type(e).__name__}: {e}") from e
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def parse_config(cfg_cls, argv, positional=None):
    """Build cfg_cls from its defaults, the config files in argv, then the --key=value overrides.
    positional: the name of a list field that takes the bare arguments instead (plot.py's run
    directories); config files are then not read."""
    hints = typing.get_type_hints(cfg_cls)
    valid = [f.name for f in dataclasses.fields(cfg_cls)]
    values, errors = {}, []
    from_files = {}  # what the config files set, for before_overrides
    if positional:
        values[positional] = [a for a in argv if not a.startswith("--")]
        argv = [a for a in argv if a.startswith("--")]
    for arg in argv:
        try:
            if not arg.startswith("--"):
                for key, value in read_config_file(arg).items():
                    try:
                        if key not in hints:
                            raise UserError(_unknown(key, valid))
                        values[key] = from_files[key] = _coerce(key, value, hints[key])
                    except ValueError as e:
                        errors.append(f"{arg}: {e}")
                continue
            if "=" not in arg and hints.get(arg[2:]) is bool:
                arg += "=True"  # a bare switch: --chat is --chat=True
            if "=" not in arg:
                raise UserError(f"{arg}: overrides take the form --key=value (a bare --key only turns on a switch)")
            key, raw = arg[2:].split("=", 1)
            if key not in hints:
                raise UserError(_unknown(key, valid))
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word: --device=cpu
            values[key] = _coerce(key, value, hints[key], raw=raw)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))
    cfg = cfg_cls(**values)
    cfg.__dict__["_from_files"] = from_files  # not a field: asdict, printing and checkpoints leave it out
    return cfg


def before_overrides(cfg, key):
    """The value key had before the command line's --key=value: the config files', else the default.
    (train.py --batch_size=auto keeps the tokens per step of the batch_size it replaces.)"""
    from_files = cfg.__dict__.get("_from_files", {})
    if key in from_files:
        return from_files[key]
    return next(f.default for f in dataclasses.fields(cfg) if f.name == key)


def field_comments(cfg_cls):
    """{field: (comment lines above it, its trailing comment)} from the dataclass's source. The lines
    above a field are the comment-only lines since the previous statement: a section heading such as
    `# I/O`, or a longer note. A class whose source cannot be read (made by exec, or typed at a
    prompt) has no comments: --help then lists keys and defaults only."""
    out = {}
    for klass in reversed(cfg_cls.__mro__):  # base classes first, so a subclass's comments win
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))  # a class defined in a function is indented
            tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
            node = ast.parse(src).body[0]
        except (OSError, TypeError, SyntaxError, tokenize.TokenError):
            continue
        # line number -> (comment text, whether code precedes it on that line); tokenize, not a text
        # search, so a '#' inside a string default is not taken for a comment
        comments = {t.start[0]: (t.string, bool(t.line[:t.start[1]].strip()))
                    for t in tokens if t.type == tokenize.COMMENT}
        previous = node.lineno  # the `class` line (decorators come before it)
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above = [comments[n][0] for n in range(previous + 1, stmt.lineno)
                         if n in comments and not comments[n][1]]
                trailing = next((comments[n][0].lstrip("#").strip() for n in range(stmt.lineno, stmt.end_lineno + 1)
                                 if n in comments and comments[n][1]), "")
                out[stmt.target.id] = (above, trailing)
            previous = stmt.end_lineno
    return out


def help_text(cfg_cls, script):
    """--help: usage, then `--key=default  # comment` per field under the class's section comments."""
    comments = field_comments(cfg_cls)
    rows = []
    for f in dataclasses.fields(cfg_cls):
        if not f.init:  # not settable, so not a key
            continue
        if f.default is not dataclasses.MISSING:
            key = f"--{f.name}={f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            key = f"--{f.name}={f.default_factory()!r}"
        else:
            key = f"--{f.name}=...  (required)"
        above, trailing = comments.get(f.name, ([], ""))
        rows.append((above, key, trailing))
    width = min(max((len(k) for _, k, _ in rows), default=0), 36)  # align the comments, but not behind a long default
    lines = [f"usage: python {script} [config/file.py ...] [--key=value ...]", "keys and defaults:"]
    for i, (above, key, trailing) in enumerate(rows):
        if above and i:
            lines.append("")  # a blank line before each section
        lines += [f"  {c}" for c in above]
        lines.append(f"  {key:<{width}}  # {trailing}" if trailing else f"  {key}")
    return "\n".join(lines)


def configure(cfg_cls, argv=None, positional=None):
    """parse_config for a script: --help lists the keys, errors exit non-zero, the result is printed once."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cfg_cls, Path(sys.argv[0]).name))
        raise SystemExit(0)
    try:
        cfg = parse_config(cfg_cls, argv, positional)
    except UserError as e:
        exit_with(e)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, print once
        print("config: " + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))
    return cfg


def exit_with(error):
    """End the process with status 1 and the one line 'error: ...'. Under torchrun every rank meets the
    same error: rank 0 says it, the others leave quietly."""
    if int(os.environ.get("RANK", "0")) != 0:
        raise SystemExit(1)
    raise SystemExit(f"error: {error}")


def run(main, cfg_cls, parse=None, positional=None):
    """A script's entry point: configure (or parse(argv) for a script with its own reading of the
    command line), then main(cfg). A UserError, wrong input, ends with one line 'error: ...' and exit
    status 1; any other exception is a bug and keeps its traceback."""
    import sys
    try:
        cfg = parse(sys.argv[1:]) if parse else configure(cfg_cls, positional=positional)
        return main(cfg)
    except UserError as e:
        exit_with(e)
