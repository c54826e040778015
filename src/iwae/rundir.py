"""The run directory: its file names and every read and write of them.

A run directory (``iwae train --out RUN_DIR``) holds

- ``config.json``       the resolved configuration (``iwae train --config`` takes it back),
- ``model.safetensors`` the weights, saved at the end of every stage,
- ``checkpoint.safetensors`` weights, Adam state, every random-number state and the
  position in the schedule, saved every few minutes and at the end of every stage, with
  a SHA-256 checksum; ``checkpoint.prev.safetensors`` the one before it (``--resume``
  falls back to it when the newest is unreadable: :func:`recover_checkpoint`),
- ``metrics.jsonl``     one JSON object per pass,
- ``tb/``               TensorBoard event files,
- ``summary.json``      written last by training: a run with it is finished,
- ``evaluation.json``   the means of ``iwae evaluate`` and ``evaluation.safetensors`` the
  per-image values behind them,
- ``ais.json`` / ``ais.safetensors`` (``iwae evaluate --method ais``) and ``bdmc.json`` /
  ``bdmc.safetensors`` / ``bdmc.png`` (``iwae bdmc``), here or in their ``--out`` directory.

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

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from iwae.data.store import atomic_write
from iwae.errors import IwaeError, RunDirError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
#: a lockstep group's next checkpoint, before every member has one
#: (see iwae.lockstep.settle_group_checkpoint)
CHECKPOINT_NEXT_FILE = "checkpoint.next.safetensors"
#: the checkpoint before the current one (:func:`promote_checkpoint`)
CHECKPOINT_PREV_FILE = "checkpoint.prev.safetensors"
#: a bad current checkpoint, put aside by :func:`recover_checkpoint`
CHECKPOINT_CORRUPT_FILE = "checkpoint.corrupt.safetensors"
#: the directory's lock, and who holds it (:mod:`iwae.runlock`): no part of a run
LOCK_FILE = ".lock"
LOCK_INFO_FILE = ".lock.json"
LOCK_FILES = (LOCK_FILE, LOCK_INFO_FILE)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tb"
EVALUATION_FILE = "evaluation.json"
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


def save_weights(model, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda f: f.write(safetensors.torch.save(state)))


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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise RunDirError(f"{path} is missing")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
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


# -- checkpoints ------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run is: ``passes`` finished passes, ``step`` steps into the next one."""

    passes: int = 0
    step: int = 0
    bound_sum: float = 0.0
    good_examples: int = 0
    skipped: int = 0
    consecutive_bad: int = 0
    seconds: float = 0.0  # training time of the unfinished pass so far
    total_seconds: float = 0.0


def save_checkpoint(
    path: Path,
    model,
    optimizer,
    generator,
    pass_start_rng,
    progress: Progress,
    group: list[str] | None = None,
) -> None:
    """Weights, Adam state, RNG states and progress in one safetensors file, with their
    checksum (:func:`checkpoint_checksum`), atomically (``group``: the run directories of a
    lockstep group, recorded in the metadata). Written as ``checkpoint.safetensors``, it
    becomes the current checkpoint and the current one the previous
    (:func:`promote_checkpoint`); a write that fails leaves both as they were."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.pass_start"] = pass_start_rng
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "progress": asdict(progress),
        "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_rng": random.getstate(),
        "format": 1,
    }
    if group is not None:
        meta["group"] = group
    state = json.dumps(meta)
    metadata = {"state": state, "sha256": checkpoint_checksum(tensors, state)}
    data = safetensors.torch.save(tensors, metadata=metadata)
    path = Path(path)
    if path.name != CHECKPOINT_FILE:  # a lockstep group's next checkpoint
        atomic_write(path, lambda f: f.write(data))
        return
    staged = path.with_name(f".{CHECKPOINT_FILE}.new")
    try:
        atomic_write(staged, lambda f: f.write(data))
    except OSError as e:  # named as the checkpoint it was to become
        raise OSError(e.errno, e.strerror, str(path)) from e
    promote_checkpoint(staged)


def checkpoint_checksum(tensors: dict[str, torch.Tensor], state: str) -> str:
    """SHA-256 of a checkpoint's content: its ``state`` metadata, then each tensor's name,
    dtype, shape and bytes, in the order of the names."""
    h = hashlib.sha256(state.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def promote_checkpoint(source: Path) -> None:
    """Make the complete checkpoint ``source`` (a file in the run directory) the current
    ``checkpoint.safetensors``: the current one, if it is valid, first becomes
    ``checkpoint.prev.safetensors`` (a hard link renamed over it; a copy where the file
    system has no hard links), then ``source`` is renamed over it. At every moment the
    directory holds a current checkpoint and a previous one that were each complete; an
    invalid current one (:func:`read_checkpoint_file`) never replaces a valid previous one."""
    directory = Path(source).parent
    current, previous = directory / CHECKPOINT_FILE, directory / CHECKPOINT_PREV_FILE
    if current.exists() and _valid_checkpoint(current):
        link = directory / f".{CHECKPOINT_PREV_FILE}.link"
        link.unlink(missing_ok=True)
        try:
            os.link(current, link)
        except OSError:  # no hard links on this file system
            atomic_write(previous, lambda f: f.write(current.read_bytes()))
        else:
            os.replace(link, previous)
    os.replace(source, current)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the platform allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _valid_checkpoint(path: Path) -> bool:
    try:
        read_checkpoint_file(path)
    except RunDirError:
        return False
    return True


def read_checkpoint_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the checkpoint ``path``, checked: a readable safetensors
    file whose state metadata is JSON and whose checksum, where it has one (checkpoints
    written before checksums have none), matches; else a :class:`RunDirError` saying why."""
    tensors, metadata = read_safetensors(path)
    try:
        json.loads(metadata["state"])["progress"]
    except Exception as e:  # missing, not JSON, or not ours
        raise RunDirError(
            f"{path} is not a valid iwae checkpoint ({type(e).__name__}: {e})"
        ) from None
    stored = metadata.get("sha256")
    if stored is not None and stored != checkpoint_checksum(tensors, metadata["state"]):
        raise RunDirError(f"{path} is corrupt: its content does not match its SHA-256 checksum")
    return tensors, metadata


def usable_checkpoint(run_dir: str | Path):
    """(path, content, why the current one is not used or None) of the checkpoint to resume
    ``run_dir`` from: the current one, or where it is damaged the previous one. Damaged: an
    iwae checkpoint by its header (:func:`_checkpoint_header`) whose tensors fail their
    checksum or are cut short. A current file that is missing or no checkpoint at all
    (empty, its header unreadable) is the current one's error, as is a damaged one without
    a valid previous one (then naming both). Reads only."""
    run_dir = Path(run_dir)
    current, previous = run_dir / CHECKPOINT_FILE, run_dir / CHECKPOINT_PREV_FILE
    try:
        return current, read_checkpoint_file(current), None
    except RunDirError as e:
        if not previous.exists() or _checkpoint_header(current) is None:
            raise
        problem = str(e)
    try:
        return previous, read_checkpoint_file(previous), problem
    except RunDirError as e:
        raise RunDirError(
            f"no valid checkpoint in {run_dir}: {problem}; and {e} (nothing was changed)"
        ) from None


def _checkpoint_header(path: Path) -> dict | None:
    """The safetensors header of ``path`` where it is readable and an iwae checkpoint's (its
    metadata holds the state with the progress), else None. Reads the header only."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
        json.loads(header["__metadata__"]["state"])["progress"]
    except Exception:  # missing, empty, cut inside the header, foreign
        return None
    return header


def recover_checkpoint(run_dir: str | Path) -> str | None:
    """Put the previous checkpoint of ``run_dir`` back in place where the current one is
    damaged (:func:`usable_checkpoint`): the bad one is kept as
    ``checkpoint.corrupt.safetensors``, the previous one becomes the current one (the
    previous file stays). Returns one line saying so, or None where the current one is
    good (or there is no previous one: loading the current one then says what is wrong).
    Both bad: a :class:`RunDirError`, and nothing is changed."""
    run_dir = Path(run_dir)
    current, previous = run_dir / CHECKPOINT_FILE, run_dir / CHECKPOINT_PREV_FILE
    if not previous.exists():
        return None
    path, (_, metadata), problem = usable_checkpoint(run_dir)
    if problem is None:
        return None
    if current.exists():
        os.replace(current, run_dir / CHECKPOINT_CORRUPT_FILE)
    atomic_write(current, lambda f: f.write(previous.read_bytes()))
    p = json.loads(metadata["state"])["progress"]
    at = (
        f"pass {p['passes'] + 1}, step {p['step']}"
        if p["step"]
        else f"the end of pass {p['passes']}"
    )
    return (
        f"iwae: {problem}; resuming from the previous checkpoint ({at}; the bad file is kept "
        f"as {run_dir / CHECKPOINT_CORRUPT_FILE})"
    )


def load_checkpoint(
    path: Path, model, optimizer, generator, content=None
) -> tuple[Progress, torch.Tensor]:
    """Restore what :func:`save_checkpoint` saved (``content``: the file already read by
    :func:`read_checkpoint_file`); returns the progress and the RNG state at the start of
    the unfinished pass."""
    tensors, metadata = content or read_checkpoint_file(path)
    try:
        meta = json.loads(metadata["state"])
        progress = Progress(**meta["progress"])
        load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
        optim_state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                device = next(model.parameters()).device
                optim_state["state"].setdefault(int(i), {})[name] = value.to(device)
        optimizer.load_state_dict(optim_state)
        generator.set_state(generator_state(generator, tensors["rng.generator"]))
        torch.set_rng_state(tensors["rng.torch"])
        kind, pos, has_gauss, cached = meta["numpy_rng"]
        np.random.set_state(
            (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)
        )
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        return progress, generator_state(generator, tensors["rng.pass_start"])
    except RunDirError:
        raise
    except Exception as e:  # a tampered file can break it anywhere
        raise RunDirError(
            f"{path} is not a valid iwae checkpoint ({type(e).__name__}: {e})"
        ) from None


def generator_state(generator: torch.Generator, state: torch.Tensor) -> torch.Tensor:
    """``state`` as a state of ``generator``. A state saved by a generator of another device
    kind (a CPU run continued on a GPU, or back) cannot be set: it is replaced by the state of
    a fresh generator of ``generator``'s device seeded from a hash of the saved state, so the
    run continues, deterministically, with another random stream (the same weights, Adam
    state and schedule; a CPU and a GPU never give the same numbers bit for bit anyway)."""
    if state.numel() == generator.get_state().numel():
        return state
    seed = int.from_bytes(hashlib.sha256(state.cpu().numpy().tobytes()).digest()[:8], "little") >> 1
    return torch.Generator(device=generator.device).manual_seed(seed).get_state()


def checkpoint_exists(run_dir: str | Path) -> bool:
    """Whether the run in ``run_dir`` has a checkpoint to resume from (the current one, or
    the previous one)."""
    run_dir = Path(run_dir)
    return (run_dir / CHECKPOINT_FILE).exists() or (run_dir / CHECKPOINT_PREV_FILE).exists()


def resume_position(run_dir: str | Path) -> tuple[int, int] | None:
    """(finished passes, step) of the checkpoint ``run_dir`` resumes from where the
    previous one may stand in for a bad current one (:func:`usable_checkpoint`), or None
    where it has no valid one."""
    try:
        _, (_, metadata), _ = usable_checkpoint(run_dir)
    except RunDirError:
        return None
    progress = json.loads(metadata["state"])["progress"]
    return progress["passes"], progress["step"]


def checkpoint_meta(path: Path) -> dict | None:
    """The JSON metadata of a checkpoint (``progress``, ``group``, ...), or None where there
    is no readable checkpoint."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return json.loads((f.metadata() or {})["state"])
    except Exception:  # missing, truncated or foreign: no position to compare
        return None
