"""The library's own exception: bad input that the user can fix.

The CLI prints these as one line (``iwae: error: ...``) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class IwaeError(Exception):
    """Bad user input: a data file, a run directory, an argument or a config."""


class DataError(IwaeError):
    """A data file is missing, truncated, corrupted or of the wrong shape."""


class RunDirError(IwaeError):
    """A run directory is missing, incomplete or inconsistent."""


class TimeLimitReached(Exception):
    """Training stopped at its time limit (``--time-limit``) after checkpointing every run it
    was training: the same command (or ``iwae train --resume``) continues them. Not an
    error: the CLI says so and exits with code 3."""
