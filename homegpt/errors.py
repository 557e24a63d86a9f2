"""
The errors that mean "what you gave is wrong", at the bottom of the import graph so that every module
can raise them. Every script's entry point (configurator.run) prints one as a single line
`error: ...` and exits 1; any other exception is a bug and keeps its traceback.

    from homegpt.errors import UserError
    raise UserError("block_size must be positive, got 0")
"""


class UserError(ValueError):
    """Something the user gave is wrong: a config value, a path, a file's contents. A ValueError, so
    that callers of the library can catch it as one."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the user named, or was to prepare first, is not there."""
