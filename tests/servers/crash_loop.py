"""A crash loop run for real: ``amgi run`` of an app that SIGKILLs itself on one message.

The process is started again each time it dies, as a supervisor would, until every other
message was acked and the killer reached the dead letters; shared by the server tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KILLER_APP = """
import os, signal
async def app(scope, receive, send):
    if scope["type"] != "message":
        return
    more = True
    while more:
        m = await receive()
        more = m.get("more_messages", False)
        if m["payload"] == b"kill":
            os.kill(os.getpid(), signal.SIGKILL)
        await send({"type": "message.ack", "id": m["id"]})
        with open(os.environ["ACKS"], "a") as f:
            f.write(m["payload"].decode() + "\\n")
"""


class CrashLoop:
    """Runs ``amgi run killer:app ARGS`` in ``directory`` again after each SIGKILL."""

    def __init__(self, directory: Path, *args: str, max_attempts: int = 3) -> None:
        self.directory = directory
        self.acks = directory / "acks"
        self.ledger = directory / "ledger"
        self.max_attempts = max_attempts
        (directory / "killer.py").write_text(KILLER_APP)
        self.argv = [
            sys.executable, "-m", "amgi", "run", "killer:app", *args,
            "--lifespan", "off", "--max-attempts", str(max_attempts),
            "--retry-delay", "0.05", "--crash-ledger", str(self.ledger),
        ]  # fmt: skip
        self.kills = 0

    def acked(self) -> list[str]:
        return self.acks.read_text().split() if self.acks.exists() else []

    def run(self, done: Callable[[], bool], *, max_kills: int = 8, timeout: float = 150) -> int:
        """Restart after every SIGKILL until ``done()``; then SIGTERM. Returns the kills."""
        env = {**os.environ, "ACKS": str(self.acks), "PYTHONPATH": f"{self.directory}:{ROOT}"}
        deadline = time.monotonic() + timeout
        while True:
            err = open(self.directory / f"run-{self.kills}.err", "w")  # noqa: SIM115
            proc = subprocess.Popen(self.argv, cwd=self.directory, env=env, stderr=err)
            try:
                while proc.poll() is None and not done():
                    assert time.monotonic() < deadline, f"the crash loop did not end: {self}"
                    time.sleep(0.1)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(30) == 0
                    return self.kills
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                err.close()
            assert proc.returncode == -signal.SIGKILL, self.stderr()
            self.kills += 1
            assert self.kills <= max_kills, f"the killer was not dead-lettered: {self}"

    def stderr(self) -> str:
        return "".join(p.read_text()[-3000:] for p in sorted(self.directory.glob("run-*.err")))

    def __str__(self) -> str:
        return f"{self.kills} kill(s), acked {sorted(self.acked())}\n{self.stderr()[-4000:]}"
