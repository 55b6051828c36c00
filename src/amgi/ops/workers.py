"""``amgi run --workers N``: a supervisor process and N worker processes.

Each worker is the same ``amgi run`` command run as ``python -m amgi`` with
``AMGI_WORKER_INDEX`` set (0 .. N-1); the workers consume together as the broker allows
(one consumer group, competing consumers on a queue, leases on the SQLite file). The
supervisor:

* restarts a worker that exits while it is not shutting down. A death counts as a failure
  to start when the worker never reported that it serves (connected, lifespan started: a
  byte on a pipe, :func:`report_serving`) or died within a few seconds of its start; a
  worker that keeps failing so is restarted after a doubling delay and, after
  :data:`MAX_QUICK_FAILURES` such deaths in a row, the supervisor gives up (stops the
  others and exits 1) instead of restarting forever. A worker that exits with code 2 (a
  usage or configuration error) is not restarted: the supervisor stops the others and
  exits 2;
* forwards SIGINT and SIGTERM to every worker and waits for all of them to drain; it
  exits 0 when every worker exited 0 (a worker waiting out its restart delay is not
  restarted, and stopped cleanly);
* on a second SIGINT or SIGTERM passes it on, so that every worker exits at once (a
  second signal to it), SIGKILLs one still alive :data:`KILL_GRACE` later, and exits 1 (a
  first one while it gives up lets the workers drain, as that stop does); one
  arriving within :data:`~amgi.runtime.server.SIGNAL_DEBOUNCE` of the first is the same
  signal sent to the supervisor and to its group, and is ignored, as a single process
  does. A worker that the forwarded signal killed before it could handle one (while it
  imported the app) served nothing, and stopped cleanly.

Workers run in their own process groups (a terminal's Ctrl-C reaches only the supervisor,
which forwards it once) and are sent SIGTERM by the kernel if the supervisor dies
(:func:`follow_supervisor`).
"""

from __future__ import annotations

import asyncio
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
    "report_serving",
    "worker_index",
]

logger = logging.getLogger("amgi.workers")

WORKER_INDEX_ENV = "AMGI_WORKER_INDEX"
SUPERVISOR_PID_ENV = "AMGI_SUPERVISOR_PID"
SERVING_FD_ENV = "AMGI_SERVING_FD"
MAX_QUICK_FAILURES = 5
_QUICK = 5.0
"""A worker that dies sooner than this after its start counts as failing at startup,
even if it reported that it serves."""
_USAGE_ERROR = 2
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 10.0
_POLL = 0.05
KILL_GRACE = 2.0
"""Seconds a worker has to exit on the second signal before it is killed (SIGKILL)."""
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


async def report_serving(started: asyncio.Event) -> None:
    """In a worker: once ``started`` is set, write a byte on the pipe the supervisor
    passed down, so that it no longer counts this worker's death as a failure to start."""
    raw = os.environ.pop(SERVING_FD_ENV, None)
    if raw is None:
        return
    fd = int(raw)
    try:
        os.set_inheritable(fd, False)  # not for the application's own subprocesses
        await started.wait()
        os.write(fd, b"1")
    except OSError:
        pass  # the supervisor is gone: follow_supervisor stops this worker
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    serving: bool = False
    ready: int | None = None
    """The read end of the pipe the worker reports serving on, until it did or exited."""
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
        self._failed = 0
        """The exit code when the supervisor gave up on a worker (0: it did not)."""

    def _spawn(self, worker: _Worker) -> None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        env = {
            **os.environ,
            WORKER_INDEX_ENV: str(worker.index),
            SUPERVISOR_PID_ENV: str(os.getpid()),
            SERVING_FD_ENV: str(write),
        }
        try:
            worker.process = subprocess.Popen(
                [sys.executable, "-m", "amgi", *self.argv],
                env=env,
                process_group=0,
                pass_fds=(write,),
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        worker.ready = read
        worker.serving = False
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
                self._close_pipe(worker)

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
                elif handled == 1:
                    # The supervisor gave up and stops them already: only a second
                    # signal from outside means that draining is not wanted.
                    logger.info(
                        "%s received: already stopping the workers gracefully (again to kill them)",
                        sig.name,
                    )
                else:
                    logger.warning("%s received again: killing every worker now", sig.name)
                    self._kill(sig)
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
                self._check_serving(worker)
                if code is None:
                    alive += 1
                    continue
                self._close_pipe(worker)
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
                    return self._failed
                return 0 if all(w.exit_code == 0 for w in self.workers) else 1
            time.sleep(_POLL)

    def _check_serving(self, worker: _Worker) -> None:
        """Read whether the worker reported that it serves (polled, never waits)."""
        if worker.ready is None:
            return
        try:
            said = os.read(worker.ready, 1)
        except BlockingIOError:
            return  # not yet
        self._close_pipe(worker)  # it said so, or closed the pipe without saying it
        if said:
            worker.serving = True
            logger.debug("worker %d serving", worker.index)

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.ready is not None:
            os.close(worker.ready)
            worker.ready = None

    def _restart_later(self, worker: _Worker, code: int, now: float) -> None:
        if code == _USAGE_ERROR:
            logger.error(
                "worker %d %s (a usage or configuration error): not restarting it, "
                "stopping the others",
                worker.index,
                _describe(code),
            )
            self._give_up(_USAGE_ERROR)
            return
        if worker.serving and now - worker.started >= _QUICK:
            worker.quick_failures = 0
        else:
            worker.quick_failures += 1
        if worker.quick_failures >= MAX_QUICK_FAILURES:
            logger.error(
                "worker %d %s %d times in a row before serving (or within %.0fs of its "
                "start): giving up, stopping the others",
                worker.index,
                _describe(code),
                worker.quick_failures,
                _QUICK,
            )
            self._give_up(1)
            return
        delay = (
            min(_BACKOFF_FIRST * 2 ** (worker.quick_failures - 1), _BACKOFF_MAX)
            if worker.quick_failures
            else 0.0
        )
        logger.warning("worker %d %s: restarting it in %.1fs", worker.index, _describe(code), delay)
        worker.restart_at = now + delay

    def _give_up(self, code: int) -> None:
        self._failed = code
        self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        self._stopping = sig
        for worker in self.workers:
            if worker.process is None:
                if worker.restart_at is not None:
                    # Its death was dealt with (a restart was due); it has nothing to
                    # drain, so the stop is clean for it.
                    logger.info("worker %d not restarted: stopping", worker.index)
                    worker.restart_at = None
                    worker.exit_code = 0
            elif worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    def _kill(self, sig: signal.Signals) -> None:
        """The second signal: each worker gets it too, and exits at once, having written in
        its crash ledger that the stop (not a crash) cut its calls off (SIGKILL would have
        counted a crash against their messages); one still alive after
        :data:`KILL_GRACE` seconds is killed."""
        alive = [
            w.process for w in self.workers if w.process is not None and w.process.poll() is None
        ]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        deadline = time.monotonic() + KILL_GRACE
        for process in alive:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        for worker in self.workers:
            if worker.process is not None:
                worker.process.wait()
