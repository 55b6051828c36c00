"""``amgi run`` processes of the recorder app (amgi.testing.apps), each with its own record."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


class AmgiProcess:
    """``python -m amgi run amgi.testing.apps:recorder ADDRESS FLAGS...``."""

    def __init__(self, address: str, flags: list[str], folder: Path, delay: float = 0.0) -> None:
        self.record = folder / f"record-{time.monotonic_ns()}.jsonl"
        self.log = self.record.with_suffix(".log")
        env = {**os.environ, "AMGI_TEST_RECORD": str(self.record), "AMGI_TEST_DELAY": str(delay)}
        argv = [sys.executable, "-m", "amgi", "run", "amgi.testing.apps:recorder", address, *flags]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        lines = self.record.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def acked(self) -> list[str]:
        return [r["payload"] for r in self.records() if r["event"] == "ack"]

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"amgi run did not stop within 30s:\n{self.output()}")


async def share_without_duplicates(
    address: str,
    args: list[str],
    tmp_path: Path,
    processes: list[AmgiProcess],
    produce: Callable[[list[str]], Awaitable[None]],
) -> None:
    """Two ``amgi run`` processes with the same ``args`` (one group / durable) drain 200
    messages, half produced before they start: each takes part, none is processed twice."""
    expected = [f"m{i}" for i in range(200)]
    await produce(expected[:100])
    a = AmgiProcess(address, args, tmp_path, delay=0.01)
    b = AmgiProcess(address, args, tmp_path, delay=0.01)
    processes += [a, b]
    await produce(expected[100:])
    await asyncio.to_thread(
        until, lambda: len(a.acked()) + len(b.acked()) >= 200, 60, "every message", a, b
    )
    assert a.stop() == 0
    assert b.stop() == 0
    counts = collections.Counter(a.acked() + b.acked())
    assert sorted(counts) == sorted(expected)
    assert [p for p, c in counts.items() if c > 1] == [], "a message was processed twice"
    assert a.acked(), "the second process took everything"
    assert b.acked(), "the first process took everything"


def until(condition: Callable[[], bool], timeout: float, what: str, *procs: AmgiProcess) -> None:
    """Wait for ``condition`` (polling), failing early if a process exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.proc.poll() is not None:
                pytest.fail(
                    f"amgi run exited ({p.proc.returncode}) waiting for {what}:\n{p.output()}"
                )
        if time.monotonic() > deadline:
            outputs = "\n".join(p.output() for p in procs)
            pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{outputs}")
        time.sleep(0.05)


@pytest.fixture
def processes() -> Iterator[list[AmgiProcess]]:
    """Processes a test starts; any still running at its end are killed."""
    started: list[AmgiProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


# A lifespan-aware app that writes the file named by STARTED when its startup runs.
STARTUP_APP = """
import os
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        open(os.environ["STARTED"], "w").close()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    m = await receive()
    await send({"type": "message.ack", "id": m["id"]})
"""
