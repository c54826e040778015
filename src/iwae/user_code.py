"""Code of your own named on the command line: a bound as ``path/to/file.py:function`` or
``package.module:function`` (``iwae train --objective``).

Loading runs that file's top level, as ``python file.py`` would: name only code you trust.
A run records the spec and the SHA-256 of the file it loaded (``config.json``), so that
``--resume`` and ``evaluate`` load the same code again and refuse a file that has changed
since, naming it (as they refuse changed data).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from iwae.bounds import OBJECTIVES, Bound
from iwae.errors import IwaeError


def is_code_spec(text: str) -> bool:
    """Whether an ``--objective`` value names code (``file.py:function``,
    ``package.module:function``) rather than a built-in objective."""
    return text not in OBJECTIVES and ":" in text


@dataclass(frozen=True)
class LoadedCode:
    """What a spec named: the object, the file it came from (absolute) and that file's SHA-256."""

    obj: object
    path: str | None
    sha256: str | None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _split(spec: str) -> tuple[str, str]:
    source, _, name = spec.rpartition(":")
    if not source or not name.isidentifier():
        raise IwaeError(
            f"--objective {spec!r}: expected path/to/file.py:function or package.module:function"
        )
    return source, name


def _load_file(path: Path):
    if not path.is_file():
        raise IwaeError(f"--objective: {path} does not exist (or is not a file)")
    module_name = f"iwae_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling in the file look it up
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise IwaeError(f"--objective: running {path} failed: {type(e).__name__}: {e}") from e
    return module


def _load_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise IwaeError(f"--objective: cannot import module {name!r}: {e}") from None


def load_code(spec: str, path: str | None = None) -> LoadedCode:
    """The object ``spec`` names. ``path``: the file to load instead of the spec's own
    (a run's recorded absolute path, so that a resumed run finds its file from anywhere;
    where it no longer exists, the spec's own path is tried)."""
    source, name = _split(spec)
    is_file = source.endswith(".py") or "/" in source or "\\" in source
    if path is not None and not Path(path).is_file() and is_file:
        path = None  # moved with its project: the spec's own (relative) path
    if path is not None or is_file:
        file = Path(path or source).expanduser().resolve()
        module = _load_file(file)
    else:
        module = _load_module(source)
        file = Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
    if not hasattr(module, name):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise IwaeError(
            f"--objective {spec!r}: {source} has no {name!r} (it has: {', '.join(found) or 'none'})"
        )
    if file is None:
        return LoadedCode(getattr(module, name), None, None)
    return LoadedCode(getattr(module, name), str(file), file_sha256(file))


def check_unchanged(loaded: LoadedCode, sha256: str | None, spec: str) -> None:
    """Refuse code whose file differs from the one a run recorded (``sha256``)."""
    if sha256 is not None and loaded.sha256 != sha256:
        raise IwaeError(
            f"{loaded.path} (--objective {spec}) has changed since the run was trained: its "
            f"sha256 is {loaded.sha256}, config.json records {sha256}; restore that file"
        )


def as_bound(obj, name: str, params: dict | None = None) -> Bound:
    """A :class:`Bound` from what a spec named: a Bound as it is, or a function of the
    log-weights (with ``params`` as keyword arguments; a ``surrogate`` attribute of the
    function, if it has one, takes them too)."""
    params = params or {}
    if isinstance(obj, Bound):
        if params:
            raise IwaeError(f"{name} is a ready Bound: it takes no --objective-param")
        return obj
    if not callable(obj):
        raise IwaeError(f"--objective: {name} is not a function of the log-weights")
    surrogate = getattr(obj, "surrogate", None)
    label = name if not params else f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})"
    return Bound(
        functools.partial(obj, **params),
        label,
        surrogate=functools.partial(surrogate, **params) if surrogate else None,
    )


def load_bound(
    spec: str, params: dict | None = None, sha256: str | None = None, path: str | None = None
) -> tuple[Bound, LoadedCode]:
    """The bound a spec names (:func:`load_code`, :func:`as_bound`), checked against the
    recorded ``sha256`` where one is given."""
    loaded = load_code(spec, path)
    check_unchanged(loaded, sha256, spec)
    return as_bound(loaded.obj, _split(spec)[1], params), loaded
