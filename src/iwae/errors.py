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
