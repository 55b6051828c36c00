"""Private Redis and NATS brokers on spare ports, for tests that restart or configure them.

The shared brokers (scripts/brokers/) are never restarted; these are started by the test
that needs them, from the binaries the broker scripts installed, and stopped at its end.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import free_port, port_open


class PrivateBroker:
    """One broker process on 127.0.0.1:``port``; :meth:`restart` keeps its data folder."""

    def __init__(self, argv: list[str], port: int, folder: Path) -> None:
        self.argv = argv
        self.port = port
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.folder / "broker.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(self.argv, cwd=self.folder, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.folder / "broker.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"private broker did not start on {self.port}:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: Redis and NATS write their data out first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def private_redis(folder: Path, *, password: str = "") -> Iterator[PrivateBroker]:
    """A redis-server with an append-only file (nothing lost over a restart)."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always",
    ]  # fmt: skip
    if password:
        argv += ["--requirepass", password]
    broker = PrivateBroker(argv, port, folder)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def private_nats(folder: Path, *, user: str = "", password: str = "") -> Iterator[PrivateBroker]:
    """A nats-server with JetStream, its store in ``folder``."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        "nats-server", "--addr", "127.0.0.1", "--port", str(port),
        "--jetstream", "--store_dir", str(folder / "store"),
    ]  # fmt: skip
    if user:
        argv += ["--user", user, "--pass", password]
    broker = PrivateBroker(argv, port, folder)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
