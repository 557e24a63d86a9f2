"""
The errors that mean "what you gave is wrong", at the bottom of the import graph so that every module
can raise them. Every script's entry point (configurator.run) prints one as a single line
`error: ...` and exits 1; any other exception is a bug and keeps its traceback.

    from homegpt.errors import UserError
    raise UserError("block_size must be positive, got 0")

A reader of many records (a JSONL file, a dataset's rows) collects every bad one and raises once, so
that the user fixes them all in one pass instead of one per run:

    errors = [f"line {n}: ..." for n, r in rows if bad(r)]
    if errors:
        raise many_errors(f"{path}: {len(errors)} bad row(s)", errors)
"""

MAX_ERRORS = 10  # problems listed in one message; the rest are counted, so a file of 20,000 bad rows stays readable


class UserError(ValueError):
    """Something the user gave is wrong: a config value, a path, a file's contents. A ValueError, so
    that callers of the library can catch it as one."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the user named, or was to prepare first, is not there."""


def many_errors(head, errors):
    """One UserError for a list of problems: `head`, then the first MAX_ERRORS problems a line each and
    the count of the rest. Returned, not raised, so that the caller's `raise` shows where it stops."""
    assert errors, "many_errors needs at least one problem"
    more = f"\n  ... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
    return UserError(f"{head}:\n  " + "\n  ".join(errors[:MAX_ERRORS]) + more)
