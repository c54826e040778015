"""Write ``train_share_s_by_device`` into the ``runner.json`` of runs trained before the
runner recorded it (2026-11-27): GPU seconds of a lockstep group of N runs are shared N
ways, CPU seconds (trained one run per process) are the run's own.

    python results/backfill_train_share.py RUNNER_JSON:N [RUNNER_JSON:N ...]

Used for `variants-s4/runs/*` (N = 8: two groups of 8 on the H100), the 2-layer k=50
pairs of `table1-mnist-s5/` and `table1-omniglot-s5/` (N = 2) and DReG k=50 of `dreg-s5/`
(N = 1).
"""

import json
import sys
from pathlib import Path


def backfill(path: Path, gpu_group: int) -> dict:
    timing = json.loads(path.read_text())
    timing["train_share_s_by_device"] = {
        key: seconds / gpu_group if key.startswith("cuda") else seconds
        for key, seconds in timing["train_wall_s_by_device"].items()
    }
    path.write_text(json.dumps(timing, indent=2) + "\n")
    return timing["train_share_s_by_device"]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        name, _, n = arg.rpartition(":")
        print(name, backfill(Path(name), int(n)))
