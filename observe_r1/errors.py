"""The project's one base class for user errors.

A `UserError` is a problem with what the user gave: a file, a flag, a config value, a data row. The
command line prints its message and exits 2, without a traceback. Anything else that escapes is a bug
and surfaces as one, traceback and all.
"""


class UserError(Exception):
    """Something the user gave is wrong; the message says what and where."""


class InvalidValue(UserError, ValueError):
    """A value the user gave is out of its range or of the wrong kind."""


class MissingFile(UserError, FileNotFoundError):
    """A file the user pointed at is not there, or is incomplete."""
