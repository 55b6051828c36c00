"""Helpers of the operations tests: the ``amgi`` command in a subprocess, test apps."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

APP = """
import os
from pathlib import Path

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                Path(os.environ["STARTED"]).write_text("started")
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        m = await receive()
        if m["payload"].startswith(b"bad"):
            await send({"type": "message.nack", "id": m["id"], "message": "bad payload"})
        else:
            await send({"type": "message.ack", "id": m["id"]})
        more = m.get("more_messages")
"""


def write_app(folder: Path) -> Path:
    """``opsapp.py`` in ``folder``: acks, nacks payloads starting with ``bad``."""
    (folder / "opsapp.py").write_text(APP)
    return folder


def amgi(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AMGI_")}
    return subprocess.run(
        [sys.executable, "-m", "amgi", *args],
        cwd=cwd,
        env={**environ, "STARTED": str(cwd / "started"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("amgi: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """HTTP GET: ``(status, body)``, also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
