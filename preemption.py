"""Stopping on a signal without losing work.

Schedulers stop a job with SIGTERM (``scancel``, ``kill <torchrun>``, a whole process group),
SLURM warns with SIGUSR1 before the time limit, and a terminal sends SIGINT (Ctrl-C). The
training process only records the signal; the loop finishes the step in flight, saves it and
exits with :func:`exit_code`. DataLoader workers ignore the three signals (see
:func:`ignore_stop_signals`), so a signal sent to the whole process group reaches them
harmlessly instead of killing them under the main process.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Dict, Optional

__all__ = ['STOP_SIGNALS', 'StopRequest', 'ignore_stop_signals', 'exit_code']

STOP_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, name))


def exit_code(signum: Optional[int]) -> int:
    """0 for a scheduler's SIGTERM / SIGUSR1 (requeue-friendly), 128 + 2 for Ctrl-C, as shells do."""
    return 128 + signal.SIGINT if signum == signal.SIGINT else 0


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave stopping to the main process, which still needs its
    workers to finish the step and must not see them die under it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Remembers the first stop signal; the training loop acts on it between steps. A second
    Ctrl-C does not wait.

    The handler only sets a flag: logging or saving inside a signal handler can deadlock.
    """

    # Ctrl-C under a bare torchrun reaches a rank twice at once: from the terminal and from torchrun.
    REPEAT_S = 1.0

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._since = 0.0
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self._since = time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._since > self.REPEAT_S:
            raise KeyboardInterrupt    # a second Ctrl-C: stop now (checkpoint files are written atomically)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else 'a signal on another rank'
