"""The driver's view of a contender's process: its CPU time from ``/proc``, and its stop.

Standard library only: bench scripts that start peers from other virtual environments
(without ``amgi``) import it at the top.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["cpu_seconds", "stat_seconds", "stop", "system_seconds"]


def _ticks(stat: str) -> tuple[int, int]:
    """User and system clock ticks in the text of a ``/proc/.../stat`` file (the fields
    after the command name, which may itself hold spaces and parentheses)."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def stat_seconds(stat: str) -> float:
    """User + system CPU seconds in the text of a ``/proc/.../stat`` file."""
    return sum(_ticks(stat)) / os.sysconf("SC_CLK_TCK")


def system_seconds(stat: str) -> float:
    """System (kernel) CPU seconds in the text of a ``/proc/.../stat`` file."""
    return _ticks(stat)[1] / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and all its threads so far."""
    return stat_seconds(Path(f"/proc/{pid}/stat").read_text())


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a contender's process and reap it; SIGKILL it after 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
