"""The library's own exceptions: bad input that the user can fix (:class:`IwaeError`), and
training stopped on purpose (:class:`TrainingStopped`: a time limit or a signal).

The CLI prints an :class:`IwaeError` as one line (``iwae: error: ...``) and exits with
code 2, a :class:`TrainingStopped` as one line with its own exit code; anything else is a
bug and keeps its traceback.
"""


class IwaeError(Exception):
    """Bad user input: a data file, a run directory, an argument or a config."""


class DataError(IwaeError):
    """A data file is missing, truncated, corrupted or of the wrong shape."""


class RunDirError(IwaeError):
    """A run directory is missing, incomplete or inconsistent."""


class TrainingStopped(Exception):
    """Training stopped before its end after checkpointing every run it was training: the
    same command (or ``iwae train --resume``) continues them. Not an error: the CLI prints
    the message and exits with :attr:`exit_code`."""

    exit_code = 1


class TimeLimitReached(TrainingStopped):
    """Training stopped at its time limit (``--time-limit``) after checkpointing every run it
    was training: the same command (or ``iwae train --resume``) continues them. Not an
    error: the CLI says so and exits with code 3."""

    exit_code = 3


class Interrupted(TrainingStopped):
    """Training (or ``iwae reproduce``) stopped on SIGINT or SIGTERM (``signum``) after
    checkpointing every run it was training at the step in progress. The CLI exits with
    128 + ``signum``, the shell's code for a process ended by that signal: 130 for SIGINT,
    143 for SIGTERM."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
