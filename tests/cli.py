"""Running the ``amgi`` command line in a subprocess, as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["ROOT", "amgi"]

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the working directory of the processes, unless told otherwise)."""


def amgi(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m amgi ARGS...``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "amgi", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
