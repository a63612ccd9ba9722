"""Test helper, on PYTHONPATH only for tests that need slow training steps: every optimizer step
of ``main.py`` sleeps for the number of seconds in the file ``$DAT_TEST_STEP_SLEEP_FILE`` (read at
each step, so that a test can speed a run up once it has seen what it waits for; no file: no
sleep). It changes nothing else: the stop logic under test runs unchanged, only at a slower pace."""
import os
import time

_FILE = os.environ.get('DAT_TEST_STEP_SLEEP_FILE')


def _seconds() -> float:
    try:
        with open(_FILE) as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


if _FILE:
    import train_step

    _step = train_step.OptimizerStep.step

    def _slow_step(self, *args, **kwargs):
        time.sleep(_seconds())
        return _step(self, *args, **kwargs)

    train_step.OptimizerStep.step = _slow_step
