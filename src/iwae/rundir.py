"""The run directory: its file names and every read and write of them.

A run directory (``iwae train --out RUN_DIR``) holds

- ``config.json``       the resolved configuration (``iwae train --config`` takes it back),
- ``model.safetensors`` the weights, saved at the end of every stage (its metadata
  ``passes``: the passes they were trained for),
- ``checkpoint.safetensors`` weights, Adam state, every random-number state and the
  position in the schedule, saved every few minutes and at the end of every stage, with
  a SHA-256 checksum; ``checkpoint.prev.safetensors`` the one before it (``--resume``
  falls back to it when the newest is unreadable); both written and read by
  :mod:`iwae.checkpoint`,
- ``metrics.jsonl``     one JSON object per pass,
- ``tb/``               TensorBoard event files,
- ``summary.json``      written last by training: a run with it is finished,
- ``evaluation.json``   the means of ``iwae evaluate`` and ``evaluation.safetensors`` the
  per-image values behind them,
- ``ais.json`` / ``ais.safetensors`` (``iwae evaluate --method ais``) and ``bdmc.json`` /
  ``bdmc.safetensors`` / ``bdmc.png`` (``iwae bdmc``), here or in their ``--out`` directory,
- ``stages/P/``         the evaluations of a run whose training has not finished: ``iwae
  evaluate`` of the weights of its latest stage end, after P passes (:func:`stage_dir`),
  never in the run's own ``evaluation.json``, which marks a finished run's evaluation.

It also checks and writes the result files that commands put outside a run directory
(``--out``, ``iwae evaluate --per-example``): missing parents are made, an existing result
is replaced only with ``--overwrite``.

Every file is written atomically (temporary file, fsync, rename), so a run killed at any
moment, or a write that fails (a full disk), keeps its previous files; a failed write
raises an ``OSError`` naming the file. ``.lock`` and ``.lock.json`` belong to the directory's
writer (:mod:`iwae.runlock`). Nothing in a run directory is executed when it is
loaded: tensors are safetensors, the rest is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from iwae.data.store import atomic_write
from iwae.errors import IwaeError, RunDirError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: the directory's lock, and who holds it (:mod:`iwae.runlock`): no part of a run
LOCK_FILE = ".lock"
LOCK_INFO_FILE = ".lock.json"
LOCK_FILES = (LOCK_FILE, LOCK_INFO_FILE)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tb"
EVALUATION_FILE = "evaluation.json"
#: the evaluations of an unfinished run's stage-end weights, one directory per budget
STAGES_DIR = "stages"
EVALUATION_IMAGES_FILE = "evaluation.safetensors"
#: ``iwae evaluate --method ais``: the means and the per-image values (in RUN_DIR or --out)
AIS_FILE = "ais.json"
AIS_IMAGES_FILE = "ais.safetensors"
#: ``iwae bdmc``: the bounds per number of steps, the per-image bounds, and the figure
BDMC_FILE = "bdmc.json"
BDMC_IMAGES_FILE = "bdmc.safetensors"
BDMC_FIGURE = "bdmc.png"


# -- JSON and weights --------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_evaluation(
    run_dir: Path, result: dict, per_image: dict[str, torch.Tensor], test_index
) -> None:
    """``evaluation.safetensors`` (per-image ``log_px``, ``iwae64``, ``elbo`` and the
    ``test_index`` of each image in the test set), then ``evaluation.json`` (the means)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in per_image.items()}
    tensors["test_index"] = torch.as_tensor(np.asarray(test_index), dtype=torch.int32)
    atomic_write(
        Path(run_dir) / EVALUATION_IMAGES_FILE, lambda f: f.write(safetensors.torch.save(tensors))
    )
    write_json(Path(run_dir) / EVALUATION_FILE, result)


def read_evaluation_images(run_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The per-image values of a run's evaluation, or None where it has none."""
    path = Path(run_dir) / EVALUATION_IMAGES_FILE
    return read_safetensors(path)[0] if path.exists() else None


def write_ais(out_dir: Path, result: dict, per_image: dict[str, torch.Tensor], test_index) -> None:
    """``ais.safetensors`` (per-image ``log_px_ais``, ``acceptance``, ``log_px_iwae`` and each
    image's ``test_index``), then ``ais.json`` (the means)."""
    _write_tensors(
        Path(out_dir) / AIS_IMAGES_FILE,
        {**per_image, "test_index": torch.as_tensor(np.asarray(test_index), dtype=torch.int32)},
    )
    write_json(Path(out_dir) / AIS_FILE, result)


def write_bdmc(out_dir: Path, result: dict, per_image: dict[str, torch.Tensor]) -> None:
    """``bdmc.safetensors`` (per-image ``lower`` and ``upper`` bounds, [len(steps), n]), then
    ``bdmc.json`` (the means per number of steps)."""
    _write_tensors(Path(out_dir) / BDMC_IMAGES_FILE, per_image)
    write_json(Path(out_dir) / BDMC_FILE, result)


def read_evaluation_log_px(run_dir: str | Path, test_index) -> tuple[torch.Tensor, int] | None:
    """The per-image L_k of a run's evaluation on the test images ``test_index`` (in that
    order) and its k, or None where the run has no per-image values for all of them."""
    images = read_evaluation_images(run_dir)
    evaluation = read_json(Path(run_dir) / EVALUATION_FILE, required=False)
    if images is None or not isinstance(evaluation, dict) or "k" not in evaluation:
        return None
    position = {int(i): p for p, i in enumerate(images["test_index"].tolist())}
    wanted = [int(i) for i in np.asarray(test_index)]
    if any(i not in position for i in wanted):
        return None
    return images["log_px"][[position[i] for i in wanted]], int(evaluation["k"])


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors)))


def save_weights(model, path: Path, passes: int | None = None) -> None:
    """The weights of ``model`` in ``path``, with the ``passes`` they were trained for in
    the file's metadata (:func:`weights_passes`)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = None if passes is None else {"passes": str(int(passes))}
    atomic_write(Path(path), lambda f: f.write(safetensors.torch.save(state, metadata)))


def weights_passes(path: Path) -> int | None:
    """The passes the weights in ``path`` were trained for, from the file's metadata (None
    for weights saved without it, before it was recorded)."""
    passes = read_safetensors(path, metadata_only=True)[1].get("passes")
    return int(passes) if passes is not None and passes.isdigit() else None


def training_finished(run_dir: str | Path) -> bool:
    """Whether a run's training has finished: the last thing it writes, ``summary.json``,
    is there."""
    return (Path(run_dir) / SUMMARY_FILE).exists()


def stage_dir(run_dir: str | Path, passes: int) -> Path:
    """Where the evaluations of a run's weights after ``passes`` passes go while its
    training is unfinished: ``RUN_DIR/stages/PASSES``."""
    return Path(run_dir) / STAGES_DIR / str(int(passes))


def read_stage_evaluations(run_dir: str | Path) -> dict[int, dict]:
    """The ``evaluation.json`` of each stage evaluation of a run (:func:`stage_dir`), by
    passes; unreadable ones are left out."""
    found = {}
    for d in sorted((Path(run_dir) / STAGES_DIR).glob("*")):
        if d.name.isdigit():
            evaluation = read_json(d / EVALUATION_FILE, required=False)
            if isinstance(evaluation, dict) and "nll" in evaluation:
                found[int(d.name)] = evaluation
    return found


def read_json(path: str | Path, required: bool = True):
    """The JSON value in ``path``. A missing or invalid file is a :class:`RunDirError`
    naming it, or with ``required=False`` gives None (a run not finished yet, say)."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if not required:
            return None
        raise RunDirError(
            f"{path} is missing: is {path.parent} a run directory made by `iwae train`?"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        if not required:
            return None
        raise RunDirError(f"{path} is not valid JSON ({e})") from None


def read_safetensors(
    path: Path, metadata_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file (no tensors with
    ``metadata_only``); a :class:`RunDirError` for a missing or unreadable file."""
    if not path.exists():
        raise RunDirError(f"{path} is missing")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {} if metadata_only else {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad files
        raise RunDirError(
            f"{path} is not a readable safetensors file (truncated or tampered?): {e}"
        ) from None
    return tensors, metadata


def load_state(model, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise RunDirError(
            f"{path} does not match the model in config.json: {' '.join(lines[:3])}"
        ) from None


# -- result files outside a run directory (--out, --per-example) ------------------------------

#: the columns of ``iwae evaluate --per-example FILE``, in order
PER_EXAMPLE_COLUMNS = ("index", "log_px", "iwae64", "elbo")
PER_EXAMPLE_FORMATS = (".npy", ".csv")


def check_output_file(
    path: str | Path, overwrite: bool, flag: str = "--out", suffixes: tuple[str, ...] = ()
) -> Path:
    """Check, before any work, that ``path`` can receive a result file: its suffix is one of
    ``suffixes`` (any if empty), it is no directory, it does not exist unless ``overwrite``,
    and its missing parent directories can be made (by :func:`make_parents`). Creates nothing."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise IwaeError(f"{flag} must name a {' or '.join(suffixes)} file, got {path}")
    if path.is_dir():
        raise IwaeError(f"{flag} {path} is a directory, not a file")
    if path.exists() and not overwrite:
        raise IwaeError(
            f"{flag} {path} exists: choose another path or pass --overwrite to replace it"
        )
    _check_parents(path, flag)
    return path


def check_output_dir(
    path: str | Path, names: tuple[str, ...], overwrite: bool, flag: str = "--out"
) -> Path:
    """Check, before any work, that directory ``path`` can receive the result files ``names``:
    it is no file, none of them exists unless ``overwrite``, and it can be made. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IwaeError(f"{flag} {path} exists and is not a directory")
    existing = [name for name in names if (path / name).exists()]
    if existing and not overwrite:
        raise IwaeError(
            f"{flag} {path} already holds {', '.join(existing)}: choose another directory or pass "
            f"--overwrite to replace them"
        )
    _check_parents(path / names[0], flag)
    return path


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise IwaeError(f"{flag} {path}: {parent} is not a directory")
            return


def make_parents(path: str | Path) -> Path:
    """Create the missing parent directories of the file ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_per_example(path: str | Path, per_image: dict[str, torch.Tensor], test_index) -> None:
    """The per-image values of an evaluation (:func:`iwae.evaluate.evaluate_images`), one
    row per test image in test-set order, atomically (missing parent directories are made):

    - ``.csv``: a header ``index,log_px,iwae64,elbo``, then one row per image;
    - ``.npy``: a structured array [N] with the fields ``index`` (int64), ``log_px``,
      ``iwae64`` and ``elbo`` (float32), e.g. ``np.load(path)["log_px"]``.

    ``index`` is the image's index in the test set (with ``--n-test``, the random subset's,
    :func:`iwae.data.test_subset_indices`); ``log_px`` is log p-hat(x) = L_k(x), ``iwae64`` the
    IWAE bound with 64 samples, ``elbo`` the mean log-weight over the k samples."""
    path = check_output_file(
        path, overwrite=True, flag="--per-example", suffixes=PER_EXAMPLE_FORMATS
    )
    index = np.asarray(test_index, dtype=np.int64)
    columns = {
        name: per_image[name].detach().cpu().numpy().astype(np.float32)
        for name in PER_EXAMPLE_COLUMNS[1:]
    }
    if any(len(c) != len(index) for c in columns.values()):
        raise ValueError(
            f"per-image values of {[len(c) for c in columns.values()]} images "
            f"for {len(index)} indices"
        )
    table = np.empty(
        len(index), dtype=[("index", np.int64)] + [(name, np.float32) for name in columns]
    )
    table["index"] = index
    for name, values in columns.items():
        table[name] = values
    make_parents(path)
    if path.suffix.lower() == ".npy":
        atomic_write(path, lambda f: np.save(f, table, allow_pickle=False))
        return
    rows = [",".join(PER_EXAMPLE_COLUMNS)]
    rows += [",".join([str(int(row[0]))] + [str(v) for v in row.tolist()[1:]]) for row in table]
    atomic_write(path, lambda f: f.write(("\n".join(rows) + "\n").encode()))


# -- metrics and the directory itself --------------------------------------------------------


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The lines of ``metrics.jsonl``; a last line cut short (an append that failed: a full
    disk, a kill) is left out."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        return records + [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        return records


def write_metrics(run_dir: str | Path, records: list[dict]) -> None:
    """Replace ``metrics.jsonl`` with ``records`` (a resumed run drops the passes after its
    checkpoint)."""
    atomic_write(
        Path(run_dir) / METRICS_FILE,
        lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()),
    )


def prepare_run_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Check that ``out`` can hold a new run (without creating it; training makes it and its
    missing parents)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    _check_parents(out, "--out")
    if out.is_dir() and any(p.name not in LOCK_FILES for p in out.iterdir()) and not overwrite:
        raise RunDirError(
            f"{out} is not empty: choose another --out, continue it with --resume, or pass "
            "--overwrite to replace it"
        )
    return out
