"""``amgi run --workers 2`` on Kafka: the workers split a topic's partitions, a worker
killed with SIGKILL is restarted and nothing is lost, SIGTERM drains both and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from amgi.runtime.ledger import CrashLedger
from amgi.runtime.server import SIGNAL_DEBOUNCE
from tests.ops.helpers import until
from tests.servers.kafka_helpers import BOOTSTRAP, ROOT, create_topic, ensure_broker, fresh, produce

pytestmark = pytest.mark.timeout(150)


def processed(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        pid, _, payload = line.partition(" ")
        out.append((int(pid), payload))
    return out


def read_until(supervisor: subprocess.Popen[str], done: Callable[[str], bool]) -> str:
    """The supervisor's stderr lines, read until ``done(what was read)`` is true."""
    assert supervisor.stderr is not None
    err = ""
    for line in supervisor.stderr:
        err += line
        if done(err):
            break
    return err


def test_two_workers_split_partitions_survive_sigkill_and_drain(tmp_path: Path) -> None:
    supervisor_log = tmp_path / "supervisor.err"
    ensure_broker()
    topic = create_topic(fresh("workers"), partitions=2)
    group = fresh("group")
    log = tmp_path / "processed.log"
    env = {**os.environ, "KAFKA_TEST_LOG": str(log), "KAFKA_TEST_DELAY": "0.2"}
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "tests.servers.kafka_app:app", topic,
         "--server", "kafka", "--bootstrap-servers", BOOTSTRAP, "--group-id", group,
         "--session-timeout-ms", "1000", "--heartbeat-interval-ms", "200",
         "--max-batch-size", "10", "--lifespan", "off", "--workers", "2"],
        cwd=ROOT,
        env=env,
        stderr=supervisor_log.open("w"),
    )  # fmt: skip
    try:
        produce(topic, ((b"k%d" % (i % 8), b"%d" % i, []) for i in range(400)))
        until(lambda: len({pid for pid, _ in processed(log)}) >= 2, 60, "both workers to consume")
        assert supervisor.poll() is None
        first_pids = {pid for pid, _ in processed(log)}
        victim = sorted(first_pids)[0]
        os.kill(victim, signal.SIGKILL)
        produce(topic, ((b"k%d" % (i % 8), b"%d" % i, []) for i in range(400, 600)))
        want = {str(i) for i in range(600)}
        until(lambda: {p for _, p in processed(log)} >= want, 90, "every message after the kill")
        pids = {pid for pid, _ in processed(log)}
        assert len(pids - first_pids) >= 1, "no restarted worker consumed anything"
        err = supervisor_log.read_text()
        assert "killed by SIGKILL: restarting it" in err
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0, supervisor_log.read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert {p for _, p in processed(log)} == want
    err = supervisor_log.read_text()
    assert "SIGTERM received: stopping 2 worker(s) gracefully" in err
    assert "Traceback" not in err


STUCK_APP = """
import asyncio, os
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        event = await receive()
        if os.environ.get("FAIL_STARTUP"):
            await send({"type": "lifespan.startup.failed", "message": "no database"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    message = await receive()
    with open(os.environ["SEEN"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if not os.environ.get("SWALLOW"):
                raise
"""


def two_busy_workers(
    folder: Path, module: str, source: str, *args: str
) -> tuple[subprocess.Popen[str], Path]:
    """Two messages on ``q``, and ``amgi run MODULE:app q --workers 2`` (a batch of one
    each) whose app writes its pid to the returned file as it takes one."""
    (folder / f"{module}.py").write_text(source)
    seen = folder / "seen"
    env = {**os.environ, "SEEN": str(seen)}
    for i in range(2):
        subprocess.run(
            [sys.executable, "-m", "amgi", "send", "q", str(i)], cwd=folder, env=env, check=True
        )
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", f"{module}:app", "q", "--workers", "2",
         "--batch-size", "1", "--concurrency", "1", *args],
        cwd=folder, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return supervisor, seen


def test_second_signal_kills_every_worker_at_once(tmp_path: Path) -> None:
    """Nothing is acked, and the calls the second signal cut off count as no crash in the
    workers' crash ledger (SIGKILL left them open: each message became a suspect)."""
    ledger = tmp_path / "ledger"
    supervisor, seen = two_busy_workers(
        tmp_path, "stuck", STUCK_APP, "--shutdown-timeout", "60", "--crash-ledger", str(ledger)
    )
    try:
        until(lambda: seen.exists() and len(seen.read_text().split()) == 2, 30, "both batches")
        workers = [int(p) for p in seen.read_text().split()]
        supervisor.send_signal(signal.SIGTERM)
        err = read_until(supervisor, lambda e: "SIGTERM received: stopping 2 worker(s)" in e)
        # the workers now drain batches that never end; a second signal ends them all
        time.sleep(SIGNAL_DEBOUNCE + 0.1)  # sooner, it is the same signal sent twice
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 1
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    for pid in workers:
        assert not _alive(pid)
    err += supervisor.stderr.read()
    assert "SIGTERM received again: killing every worker now" in err
    # nothing was acked: both messages are still in the queue
    from amgi.servers.sqlite import SqliteQueue

    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    assert queue.count("q") == 2
    queue.close()
    assert len(os.listdir(ledger)) == 2, "each worker's calls were not in its ledger"
    heir = CrashLedger(str(ledger), f"sqlite:{tmp_path / 'amgi.db'}")
    heir.open()
    try:
        assert heir.suspects == {}, "the second signal was counted as a crash"
    finally:
        heir.close()


SLOW_APP = """
import asyncio, os
async def app(scope, receive, send):
    if scope["type"] != "message":
        return
    message = await receive()
    with open(os.environ["SEEN"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    await asyncio.sleep(1.5)
    await send({"type": "message.ack", "id": message["id"]})
"""


def test_a_signal_delivered_twice_at_once_is_one_graceful_stop(tmp_path: Path) -> None:
    """What a launcher does that signals both the supervisor and its group (GNU
    ``timeout``): the two arrive together and count as one, as in a single process. They
    made the supervisor kill every worker mid-batch and exit 1."""
    supervisor, seen = two_busy_workers(tmp_path, "slow", SLOW_APP)
    try:
        until(lambda: seen.exists() and len(seen.read_text().split()) == 2, 30, "both batches")
        supervisor.send_signal(signal.SIGTERM)
        time.sleep(0.02)  # apart enough that the kernel does not merge them into one
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert supervisor.stderr is not None
    assert "received again" not in supervisor.stderr.read()
    from amgi.servers.sqlite import SqliteQueue

    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    assert queue.count("q") == 0  # both batches finished and were acked
    queue.close()


SLOW_IMPORT_APP = """
import os, time
if os.environ.get("AMGI_WORKER_INDEX"):
    time.sleep(5)
async def app(scope, receive, send):
    pass
"""


def test_a_stop_while_the_workers_still_import_the_app_exits_0(tmp_path: Path) -> None:
    """A worker killed by the SIGTERM it was forwarded before it could handle one served
    nothing: the stop is clean (it made the supervisor exit 1, 'killed by SIGTERM')."""
    (tmp_path / "slowimport.py").write_text(SLOW_IMPORT_APP)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "slowimport:app", "q", "--workers", "2"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        err = read_until(supervisor, lambda e: "worker 1 started" in e)
        time.sleep(0.5)  # the workers are importing the app now
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    err += supervisor.stderr.read()
    assert err.count("stopped before it started serving") == 2
    assert "killed by SIGTERM" not in err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: it has exited but its parent has not reaped it
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_that_keeps_failing_at_startup_is_given_up_on(tmp_path: Path) -> None:
    (tmp_path / "stuck.py").write_text(STUCK_APP)
    env = {**os.environ, "SEEN": str(tmp_path / "seen"), "FAIL_STARTUP": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "amgi", "run", "stuck:app", "q", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "exited with code 1 5 times in a row before serving" in result.stderr
    assert result.stderr.count("application startup failed: no database") >= 5


QUICK_SUPERVISOR = """
import sys
import amgi.ops.workers as workers
workers._QUICK = 0.2
workers._BACKOFF_FIRST = 0.1
workers.MAX_QUICK_FAILURES = 3
from amgi.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""``amgi`` whose supervisor counts a death 0.2s after a start as late and gives up
after 3 failures, backing off from 0.1s: the cases below without waiting 5s each."""

LATE_FAILURE_APP = """
import asyncio
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await asyncio.sleep(0.5)  # longer than the supervisor's _QUICK
        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
"""


def test_a_worker_that_fails_at_startup_after_a_while_is_given_up_on(tmp_path: Path) -> None:
    """Failing late (an unreachable broker's connect timeout) is still failing at startup:
    the worker never served. Such a worker was restarted at once, forever."""
    (tmp_path / "late.py").write_text(LATE_FAILURE_APP)
    result = subprocess.run(
        [sys.executable, "-c", QUICK_SUPERVISOR, "run", "late:app", "q", "--workers", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "exited with code 1 3 times in a row before serving" in result.stderr
    assert "exited with code 1: restarting it in 0.2s" in result.stderr, "backing off"
    assert "restarting it in 0.0s" not in result.stderr


def test_a_worker_that_served_is_restarted_at_once(tmp_path: Path) -> None:
    """A worker reports when it serves: its death later is no failure to start."""
    (tmp_path / "stuck.py").write_text(STUCK_APP)
    supervisor = subprocess.Popen(
        [sys.executable, "-c", QUICK_SUPERVISOR, "run", "stuck:app", "q", "--workers", "2",
         "--log-level", "debug"],
        cwd=tmp_path, env={**os.environ, "SEEN": str(tmp_path / "seen")},
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        err = read_until(supervisor, lambda e: "amgi.workers: worker 0 serving" in e)
        victim = int(err.split("worker 0 started (pid ")[1].split(")")[0])
        time.sleep(0.3)  # a death no longer within the (patched) 0.2s of its start
        os.kill(victim, signal.SIGKILL)
        err += read_until(  # restarted
            supervisor, lambda e: (err + e).count("amgi.workers: worker 0 serving") == 2
        )
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    err += supervisor.stderr.read()
    assert "worker 0 killed by SIGKILL: restarting it in 0.0s" in err, err


def test_an_option_each_worker_would_refuse_is_one_error_before_any_starts(
    tmp_path: Path,
) -> None:
    """``--tracing on`` without OpenTelemetry: the supervisor's check finds it, as a single
    process does, instead of each worker failing and being restarted."""
    shim = tmp_path / "nootel" / "opentelemetry"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")]))
    (tmp_path / "stuck.py").write_text(STUCK_APP)
    result = subprocess.run(
        [sys.executable, "-m", "amgi", "run", "stuck:app", "q", "--workers", "2",
         "--tracing", "on"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": path},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("amgi: error: --tracing on needs the OpenTelemetry API") == 1
    assert "started (pid" not in result.stderr, result.stderr


USAGE_ERROR_APP = """
import os, sys
if os.environ.get("AMGI_WORKER_INDEX") == "0":
    sys.exit(2)  # as a worker that finds its command line wrong does
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
"""


def test_a_worker_usage_error_is_not_restarted(tmp_path: Path) -> None:
    (tmp_path / "usage.py").write_text(USAGE_ERROR_APP)
    result = subprocess.run(
        [sys.executable, "-m", "amgi", "run", "usage:app", "q", "--workers", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "worker 0 exited with code 2 (a usage or configuration error): not restarting" in (
        result.stderr
    )
    assert result.stderr.count("worker 0 started") == 1


def test_workers_drain_and_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    (tmp_path / "stuck.py").write_text(STUCK_APP)
    seen = tmp_path / "seen"
    env = {**os.environ, "SEEN": str(seen)}
    for i in range(2):
        subprocess.run(
            [sys.executable, "-m", "amgi", "send", "q", str(i)], cwd=tmp_path, env=env, check=True
        )
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "stuck:app", "q", "--workers", "2",
         "--batch-size", "1", "--concurrency", "1", "--shutdown-timeout", "0.5"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        until(lambda: seen.exists() and len(seen.read_text().split()) == 2, 30, "both batches")
        workers = [int(p) for p in seen.read_text().split()]
        supervisor.kill()
        supervisor.wait(10)
        until(lambda: not any(_alive(pid) for pid in workers), 30, "the workers to exit")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    from amgi.servers.sqlite import SqliteQueue

    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    assert queue.count("q") == 2, "the cancelled batches were not acked"
    queue.close()


def test_each_worker_serves_probes_on_its_own_port(tmp_path: Path) -> None:
    from tests.net import free_port, port_open
    from tests.ops.helpers import get

    (tmp_path / "stuck.py").write_text(STUCK_APP)
    port = free_port()
    while port_open(port + 1):
        port = free_port()
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "stuck:app", "q", "--workers", "2",
         "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
        cwd=tmp_path,
        env={**os.environ, "SEEN": str(tmp_path / "seen")},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for p in (port, port + 1):
            until(lambda p=p: port_open(p) and get(f"http://127.0.0.1:{p}/readyz")[0] == 200,
                  30, f"worker on port {p} to be ready")  # fmt: skip
            status, text = get(f"http://127.0.0.1:{p}/metrics")
            assert status == 200
            assert "amgi_batches_in_flight" in text
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_workers_whose_app_ignores_cancellation_still_exit(tmp_path: Path) -> None:
    # Each worker's runtime gives up on the stubborn call after --cancel-grace and ends
    # its process itself (Runtime.run), also with the probe listener beside it; the
    # supervisor then reports the workers' failure instead of waiting forever.
    from tests.net import free_port, port_open

    (tmp_path / "stuck.py").write_text(STUCK_APP)
    seen = tmp_path / "seen"
    env = {**os.environ, "SEEN": str(seen), "SWALLOW": "1"}
    for i in range(2):
        subprocess.run(
            [sys.executable, "-m", "amgi", "send", "q", str(i)], cwd=tmp_path, env=env, check=True
        )
    port = free_port()
    while port_open(port + 1):
        port = free_port()
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "stuck:app", "q", "--workers", "2",
         "--batch-size", "1", "--concurrency", "1", "--shutdown-timeout", "0.5",
         "--cancel-grace", "0.5", "--metrics-port", str(port)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        until(lambda: seen.exists() and len(seen.read_text().split()) == 2, 30, "both batches")
        workers = [int(p) for p in seen.read_text().split()]
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 1
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert supervisor.stderr is not None
    err = supervisor.stderr.read()
    for pid in workers:
        assert not _alive(pid)
    assert err.count("exiting without waiting for application code") == 2, err
    assert "exited with code 1 while stopping" in err
    assert "Traceback" not in err
    from amgi.servers.sqlite import SqliteQueue

    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    assert queue.count("q") == 2, "the abandoned batches were not acked"
    queue.close()


CRASHING_WORKER_APP = """
import os, sys
if os.environ.get("AMGI_WORKER_INDEX") == "0":
    sys.exit(1)  # worker 0 fails at startup; worker 1 serves
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
"""

LONG_BACKOFF_SUPERVISOR = QUICK_SUPERVISOR.replace("0.1", "60.0")
"""``amgi`` whose supervisor waits long (its 10s cap) to restart a worker that failed."""


def test_a_stop_while_a_worker_waits_to_be_restarted_exits_0(tmp_path: Path) -> None:
    """A worker that died earlier and waits out its restart delay has nothing to drain:
    a stop then is clean (it made the supervisor exit 1)."""
    (tmp_path / "crash.py").write_text(CRASHING_WORKER_APP)
    supervisor = subprocess.Popen(
        [sys.executable, "-c", LONG_BACKOFF_SUPERVISOR, "run", "crash:app", "q", "--workers",
         "2", "--log-level", "debug"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        err = read_until(
            supervisor,
            lambda e: "worker 1 serving" in e and "worker 0 exited with code 1: restarting" in e,
        )
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    err += supervisor.stderr.read()
    assert "restarting it in 10.0s" in err, err
    assert err.count("worker 0 started") == 1, "restarted while stopping"


GIVE_UP_APP = """
import asyncio, os, sys, time
from pathlib import Path
if os.environ.get("AMGI_WORKER_INDEX") == "0":
    deadline = time.monotonic() + 30
    while not Path(os.environ["SEEN"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(2)  # a usage error, once worker 1 is busy with a batch
async def app(scope, receive, send):
    if scope["type"] != "message":
        return
    message = await receive()
    Path(os.environ["SEEN"]).write_text(str(os.getpid()))
    await asyncio.sleep(3)
    await send({"type": "message.ack", "id": message["id"]})
"""


def test_a_first_signal_while_the_supervisor_gives_up_lets_the_workers_drain(
    tmp_path: Path,
) -> None:
    """The supervisor stops the others gracefully when it gives up on a worker; a first
    SIGTERM then (a rollout, ``kubectl delete``) counted as a second one and killed them
    mid-batch."""
    (tmp_path / "giveup.py").write_text(GIVE_UP_APP)
    env = {**os.environ, "SEEN": str(tmp_path / "seen")}
    subprocess.run(
        [sys.executable, "-m", "amgi", "send", "q", "x"], cwd=tmp_path, env=env, check=True
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "amgi", "run", "giveup:app", "q", "--workers", "2"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        err = read_until(supervisor, lambda e: "stopping the others" in e)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 2
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    err += supervisor.stderr.read()
    assert "killing every worker now" not in err, err
    assert "SIGTERM received: already stopping" in err, err
    from amgi.servers.sqlite import SqliteQueue

    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    assert queue.count("q") == 0, "the batch in progress was not acked"
    queue.close()
