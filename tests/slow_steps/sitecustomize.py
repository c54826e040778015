"""Test helper: with ``IWAE_TEST_STEP_SECONDS`` set, every training step of a single run
(:class:`iwae.steppers.EagerStep`) sleeps that long first, in every Python process started
with this directory on ``PYTHONPATH`` (a CLI child, the spawned workers of ``iwae
reproduce``, Ray's workers). The numbers are unchanged; a signal or a kill then lands
mid-training."""

import importlib.abc
import importlib.util
import os
import sys
import time

SECONDS = float(os.environ.get("IWAE_TEST_STEP_SECONDS", "0"))


class _SlowSteps(importlib.abc.MetaPathFinder):
    """Patches ``iwae.steppers`` right after it is first imported."""

    def find_spec(self, name, path, target=None):
        if name != "iwae.steppers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            step = module.EagerStep.__call__

            def slow(self, batches):
                time.sleep(SECONDS)
                return step(self, batches)

            module.EagerStep.__call__ = slow

        spec.loader.exec_module = exec_module
        return spec


if SECONDS > 0:
    sys.meta_path.insert(0, _SlowSteps())
