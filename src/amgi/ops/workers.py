"""``amgi run --workers N``: a supervisor process and N worker processes.

Each worker is the same ``amgi run`` command run as ``python -m amgi`` with
``AMGI_WORKER_INDEX`` set (0 .. N-1); the workers consume together as the broker allows
(one consumer group, competing consumers on a queue, leases on the SQLite file). The
supervisor:

* restarts a worker that exits while it is not shutting down; a worker that keeps dying
  within a few seconds of its start is restarted after a doubling delay and, after
  :data:`MAX_QUICK_FAILURES` such deaths in a row, the supervisor gives up (stops the
  others and exits 1) instead of restarting forever;
* forwards SIGINT and SIGTERM to every worker and waits for all of them to drain; it
  exits 0 when every worker exited 0;
* on a second SIGINT or SIGTERM kills every worker at once (SIGKILL) and exits 1; one
  arriving within :data:`~amgi.runtime.server.SIGNAL_DEBOUNCE` of the first is the same
  signal sent to the supervisor and to its group, and is ignored, as a single process
  does. A worker that the forwarded signal killed before it could handle one (while it
  imported the app) served nothing, and stopped cleanly.

Workers run in their own process groups (a terminal's Ctrl-C reaches only the supervisor,
which forwards it once) and are sent SIGTERM by the kernel if the supervisor dies
(:func:`follow_supervisor`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from amgi.runtime.server import SIGNAL_DEBOUNCE

__all__ = [
    "MAX_QUICK_FAILURES",
    "WORKER_INDEX_ENV",
    "Supervisor",
    "follow_supervisor",
    "worker_index",
]

logger = logging.getLogger("amgi.workers")

WORKER_INDEX_ENV = "AMGI_WORKER_INDEX"
SUPERVISOR_PID_ENV = "AMGI_SUPERVISOR_PID"
MAX_QUICK_FAILURES = 5
_QUICK = 5.0
"""A worker that dies sooner than this after its start counts as failing at startup."""
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 10.0
_POLL = 0.05
_PR_SET_PDEATHSIG = 1


def worker_index() -> int | None:
    """This process's worker index when it runs under a supervisor, else ``None``."""
    raw = os.environ.get(WORKER_INDEX_ENV)
    if raw is None:
        return None
    try:
        return max(0, int(raw))
    except ValueError:
        return None


def follow_supervisor() -> None:
    """In a worker: get SIGTERM (a graceful drain) when the supervisor dies (Linux).

    Called early in the worker; a supervisor already gone by then is noticed through the
    parent process id it passed down.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if expected is not None and expected != str(os.getppid()):
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass(slots=True)
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    exit_code: int | None = None


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Runs ``amgi ARGV`` in ``workers`` processes; see the module docstring."""

    def __init__(self, argv: Sequence[str], workers: int) -> None:
        self.argv = list(argv)
        self.workers = [_Worker(i) for i in range(workers)]
        self._signals: list[signal.Signals] = []
        self._first_signal = 0.0
        self._stopping: signal.Signals | None = None
        self._failed = False

    def _spawn(self, worker: _Worker) -> None:
        env = {
            **os.environ,
            WORKER_INDEX_ENV: str(worker.index),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "amgi", *self.argv], env=env, process_group=0
        )
        worker.started = time.monotonic()
        worker.restart_at = None
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._signals and now - self._first_signal < SIGNAL_DEBOUNCE:
            return  # the same signal, delivered to the supervisor and to its group
        if not self._signals:
            self._first_signal = now
        self._signals.append(signal.Signals(signum))

    def run(self) -> int:
        """Start the workers and supervise them until they have all exited; the exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            for worker in self.workers:
                self._spawn(worker)
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in self.workers:  # nothing outlives the supervisor
                if worker.process is not None and worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait()

    def _loop(self) -> int:
        handled = 0
        while True:
            while handled < len(self._signals):
                sig = self._signals[handled]
                handled += 1
                if self._stopping is None:
                    logger.info(
                        "%s received: stopping %d worker(s) gracefully (again to kill them)",
                        sig.name,
                        len(self.workers),
                    )
                    self._stop(sig)
                else:
                    logger.warning("%s received again: killing every worker now", sig.name)
                    self._kill()
                    return 1
            now = time.monotonic()
            alive = 0
            for worker in self.workers:
                if worker.process is None:
                    due = worker.restart_at
                    if self._stopping is None and due is not None and now >= due:
                        self._spawn(worker)
                        alive += 1
                    continue
                code = worker.process.poll()
                if code is None:
                    alive += 1
                    continue
                worker.process = None
                worker.exit_code = code
                if self._stopping is not None:
                    if code in (-self._stopping, 128 + self._stopping):
                        # Killed by the signal it was forwarded: it had not set up its
                        # handlers yet (still importing), so it served nothing.
                        logger.info("worker %d stopped before it started serving", worker.index)
                        worker.exit_code = 0
                    elif code != 0:
                        logger.warning("worker %d %s while stopping", worker.index, _describe(code))
                    continue
                self._restart_later(worker, code, now)
            if self._stopping is not None and alive == 0:
                if self._failed:
                    return 1
                return 0 if all(w.exit_code == 0 for w in self.workers) else 1
            time.sleep(_POLL)

    def _restart_later(self, worker: _Worker, code: int, now: float) -> None:
        if now - worker.started < _QUICK:
            worker.quick_failures += 1
        else:
            worker.quick_failures = 0
        if worker.quick_failures >= MAX_QUICK_FAILURES:
            logger.error(
                "worker %d %s %d times within %.0fs of starting: giving up, stopping the others",
                worker.index,
                _describe(code),
                worker.quick_failures,
                _QUICK,
            )
            self._failed = True
            self._stop(signal.SIGTERM)
            return
        delay = (
            min(_BACKOFF_FIRST * 2 ** (worker.quick_failures - 1), _BACKOFF_MAX)
            if worker.quick_failures
            else 0.0
        )
        logger.warning("worker %d %s: restarting it in %.1fs", worker.index, _describe(code), delay)
        worker.restart_at = now + delay

    def _stop(self, sig: signal.Signals) -> None:
        self._stopping = sig
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    def _kill(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
        for worker in self.workers:
            if worker.process is not None:
                worker.process.wait()
