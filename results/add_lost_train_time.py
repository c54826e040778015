"""Add to ``runner.json`` the training time of a lent-GPU call that was killed while it
evaluated (2026-11-27, before the runner wrote training time ahead of evaluation): the runs
finished training there, but the time was to be written with their evaluation.

    python results/add_lost_train_time.py "DEVICE" SECONDS GROUP_SIZE RUN_DIR [RUN_DIR ...] [--lockstep NAME ...]

SECONDS is the group's wall time where another member's runner.json recorded it, else the
growth of ``train_seconds`` in ``summary.json`` (the training loop alone, some 10 s less).
"""

import argparse
from pathlib import Path

from iwae.experiments import _add_train_time
from iwae.rundir import read_json, write_json


def add(run: Path, device: str, seconds: float, group: int, lockstep: list[str] | None) -> dict:
    """The runner's own bookkeeping (:func:`iwae.experiments._add_train_time`), for ``device``."""
    timing = _add_train_time(read_json(run / "runner.json"), seconds, group, device=device)
    if lockstep:
        timing["lockstep"] = lockstep
    write_json(run / "runner.json", timing)
    return timing


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("device")
    p.add_argument("seconds", type=float)
    p.add_argument("group", type=int)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--lockstep", nargs="+")
    a = p.parse_args()
    for run in a.runs:
        print(run, add(run, a.device, a.seconds, a.group, a.lockstep)["train_share_s_by_device"])
