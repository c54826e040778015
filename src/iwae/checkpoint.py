"""Checkpoints: a run's whole state in one file, written atomically, checked on reading.

``checkpoint.safetensors`` in a run directory holds the weights, Adam's state, every
random-number state and the position in the schedule (:class:`Progress`), with a SHA-256
checksum of it all (:func:`save_checkpoint`, :func:`load_checkpoint`).
``checkpoint.prev.safetensors`` is the one before it (:func:`promote_checkpoint`): where
the newest is damaged, ``--resume`` falls back to it (:func:`recover_checkpoint`). A
lockstep group writes ``checkpoint.next.safetensors`` first (see
:func:`iwae.lockstep.settle_group_checkpoint`). The other files of a run directory are
:mod:`iwae.rundir`'s.
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

from iwae.data.store import atomic_write, fsync_dir
from iwae.errors import RunDirError
from iwae.rundir import load_state, read_safetensors

CHECKPOINT_FILE = "checkpoint.safetensors"
#: a lockstep group's next checkpoint, before every member has one
#: (see iwae.lockstep.settle_group_checkpoint)
CHECKPOINT_NEXT_FILE = "checkpoint.next.safetensors"
#: the checkpoint before the current one (:func:`promote_checkpoint`)
CHECKPOINT_PREV_FILE = "checkpoint.prev.safetensors"
#: a bad current checkpoint, put aside by :func:`recover_checkpoint`
CHECKPOINT_CORRUPT_FILE = "checkpoint.corrupt.safetensors"


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
    fsync_dir(directory)


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
