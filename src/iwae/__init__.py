"""iwae: variational autoencoders trained and evaluated with importance-weighted bounds."""

from iwae.errors import DataError, IwaeError, RunDirError

__version__ = "0.1.0"

__all__ = ["DataError", "IwaeError", "RunDirError", "__version__"]
