"""Test helper, on PYTHONPATH only for tests that need slow training steps: every optimizer step
of ``main.py`` sleeps for the number of seconds in the file ``$DAT_TEST_STEP_SLEEP_FILE`` (read at
each step, so that a test can speed a run up once it has seen what it waits for; no file: no
sleep). It changes nothing else: the stop logic under test runs unchanged, only at a slower pace.
``train_step`` is patched when the program imports it, so that start-up is not slowed either."""
import importlib.abc
import importlib.util
import os
import sys
import time

_FILE = os.environ.get('DAT_TEST_STEP_SLEEP_FILE')


def _seconds() -> float:
    try:
        with open(_FILE) as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def _patch(module) -> None:
    step = module.OptimizerStep.step

    def slow_step(self, *args, **kwargs):
        time.sleep(_seconds())
        return step(self, *args, **kwargs)

    module.OptimizerStep.step = slow_step


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != 'train_step':
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _FILE:
    sys.meta_path.insert(0, _PatchOnImport())
