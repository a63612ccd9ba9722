"""Stopping on a signal without losing work.

Schedulers stop a job with SIGTERM (``scancel``, ``kill <torchrun>``, a whole process group),
SLURM warns with SIGUSR1 before the time limit, and a terminal sends SIGINT (Ctrl-C). The
training process only records the signal; the loop finishes the step in flight, saves it and
exits with :func:`exit_code`. DataLoader workers ignore the three signals (see
:func:`ignore_stop_signals`), so a signal sent to the whole process group reaches them
harmlessly instead of killing them under the main process. Because they ignore SIGTERM, the
way Python stops leftover workers at exit, the main process ends its workers itself
(:func:`end_loader_workers`) before it exits; a worker that died (the out-of-memory killer's
SIGKILL) ends the run with :func:`worker_death` 's one line.
"""
from __future__ import annotations

import multiprocessing
import re
import signal
import time
from typing import Any, Dict, Optional

__all__ = ['STOP_SIGNALS', 'StopRequest', 'ignore_stop_signals', 'exit_code', 'end_loader_workers',
           'worker_death']

STOP_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, name))


def exit_code(signum: Optional[int]) -> int:
    """0 for a scheduler's SIGTERM / SIGUSR1 (requeue-friendly), 128 + 2 for Ctrl-C, as shells do."""
    return 128 + signal.SIGINT if signum == signal.SIGINT else 0


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave stopping to the main process, which still needs its
    workers to finish the step and must not see them die under it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def end_loader_workers() -> None:
    """SIGKILL this process's remaining multiprocessing children (DataLoader workers) and reap them.

    Called when the run is over: the workers ignore SIGTERM, which is how Python's exit handler
    would stop them, so without this a run whose loader broke (a worker killed) never exits."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


# torch: "DataLoader worker (pid 123) is killed by signal: Killed." and "DataLoader worker
# (pid(s) 123, 456) exited unexpectedly".
_WORKER_DEATH = re.compile(r'DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)')


def worker_death(error: BaseException) -> Optional[str]:
    """The one-line report of a DataLoader worker that died under ``error``; None for other errors."""
    match = _WORKER_DEATH.search(str(error)) if isinstance(error, RuntimeError) else None
    if not match:
        return None
    pids, description = match.group(1).strip(), match.group(2)
    how = 'exited unexpectedly'
    if description:
        names = [s.name for s in signal.Signals if signal.strsignal(s) == description.strip()]
        how = f"was killed by {names[0] if names else description.strip()}"
        if names and names[0] == 'SIGKILL':
            how += ' (the out-of-memory killer sends it)'
    return (f"a DataLoader worker (pid {pids}) {how}: lower DATA.NUM_WORKERS or DATA.BATCH_SIZE, or give the "
            f"job more memory, then run the same command again to resume from the last checkpoint")


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
        self._settled = False

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def settle(self) -> None:
        """The run is over: ignore stop signals from now until the process has exited. Schedulers
        and users send a second SIGTERM; restoring the default action here would let it end a
        finished, saved run with -15 instead of its exit code. The signals are ignored outright:
        at exit Python puts its own handlers back to the default action."""
        self._settled = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._settled:
            return
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
