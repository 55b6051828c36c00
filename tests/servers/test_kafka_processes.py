"""``amgi run --server kafka`` processes: SIGKILL and restart, two processes in one group."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    ROOT,
    create_topic,
    ensure_broker,
    fresh,
    produce,
    wait_committed,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


class Server:
    """One ``python -m amgi run`` process of the logging app."""

    def __init__(
        self, topic: str, group: str, log: Path, delay: float, batch: int = 40, spin: bool = False
    ) -> None:
        env = {**os.environ, "KAFKA_TEST_LOG": str(log), "KAFKA_TEST_DELAY": str(delay)}
        if spin:  # the delay keeps the CPU busy: the event loop drives the consumer
            env["KAFKA_TEST_SPIN"] = "1"
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "amgi", "run", "tests.servers.kafka_app:app", topic,
                "--server", "kafka", "--bootstrap-servers", BOOTSTRAP, "--group-id", group,
                "--session-timeout-ms", "1000", "--heartbeat-interval-ms", "200",
                "--max-batch-size", str(batch), "--lifespan", "off",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(log.with_suffix(f".{time.monotonic_ns()}.err"), "w"),  # noqa: SIM115
        )  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


def lines(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        pid, _, payload = line.partition(" ")
        out.append((int(pid), payload))
    return out


def until(condition: Callable[[], bool], timeout: float, what: str, *procs: Server) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for s in procs:
            if s.proc.poll() is not None:
                pytest.fail(f"server exited ({s.proc.returncode})")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# An application awaiting I/O (the consumer thread fetches while its batches run) and a
# CPU-bound one (the event loop fetches, between batches).
KINDS = pytest.mark.parametrize("spin", [False, True], ids=["awaiting", "cpu-bound"])


@KINDS
def test_sigkill_mid_stream_then_restart_loses_nothing(
    tmp_path: Path, servers: list[Server], spin: bool
) -> None:
    topic = create_topic(fresh("crash"), partitions=4)
    group = fresh("group")
    log = tmp_path / "processed.log"
    n = 400
    produce(topic, ((b"k%d" % (i % 16), b"%d" % i, []) for i in range(n)))
    first = Server(topic, group, log, delay=0.02, spin=spin)
    servers.append(first)
    until(lambda: len(lines(log)) >= 60, 30, "the first messages", first)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert len({p for _, p in lines(log)}) < n, "killed too late to test anything"
    second = Server(topic, group, log, delay=0)
    servers.append(second)
    until(lambda: len({p for _, p in lines(log)}) >= n, 60, "every message", second)
    wait_committed(group, topic)
    assert second.stop() == 0
    assert {p for _, p in lines(log)} == {str(i) for i in range(n)}


@KINDS
def test_two_processes_rebalance_without_loss_or_duplicates(
    tmp_path: Path, servers: list[Server], spin: bool
) -> None:
    topic = create_topic(fresh("shared"), partitions=4)
    group = fresh("group")
    log = tmp_path / "processed.log"
    produce(topic, ((b"k%d" % (i % 16), b"%d" % i, []) for i in range(300)))
    a = Server(topic, group, log, delay=0.2, batch=20, spin=spin)
    servers.append(a)
    until(lambda: len(lines(log)) >= 40, 30, "the first process to consume", a)
    b = Server(topic, group, log, delay=0.2, batch=20, spin=spin)
    servers.append(b)
    # Keep the topic fed until the second process has taken part (however long its start
    # and the rebalance take on a loaded machine), then let both drain.
    n = 300
    deadline = time.monotonic() + 60
    while b.proc.pid not in {pid for pid, _ in lines(log)}:
        assert time.monotonic() < deadline, "the second process never consumed"
        assert a.proc.poll() is None, "the first server exited"
        assert b.proc.poll() is None, "the second server exited"
        produce(topic, ((b"k%d" % (i % 16), b"%d" % i, []) for i in range(n, n + 20)))
        n += 20
        time.sleep(0.2)
    until(lambda: len({p for _, p in lines(log)}) >= n, 60, "every message", a, b)
    wait_committed(group, topic)
    assert a.stop() == 0
    assert b.stop() == 0
    seen = lines(log)
    counts = collections.Counter(p for _, p in seen)
    assert set(counts) == {str(i) for i in range(n)}
    assert [p for p, c in counts.items() if c > 1] == []
    # Both processes took part after the rebalance.
    assert len({pid for pid, _ in seen}) == 2
