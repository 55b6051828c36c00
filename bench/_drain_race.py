"""Drain races: contenders in their own processes, timed from the broker's side.

Every contender is a command line started on a freshly filled address; a probe polls
the broker until it reports the first message delivered and, later, every message
acknowledged. Contenders alternate within each round; the table shows the median and
the range over the rounds of messages per second (after the first message) and the
time from process start to the first message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"

Progress = tuple[bool, bool]
"""``(first message delivered, every message acknowledged)`` as the broker reports them."""


@dataclass
class Contender:
    name: str
    argv: Callable[[str], list[str]]
    """The command line for one address (prepared by the bench)."""
    tag: str = ""
    """What the bench's ``fill`` needs to know about this contender (e.g. its consumer)."""


@dataclass
class Score:
    rates: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    failure: str = ""


def bench_python(packages: list[str], check: str) -> Path | None:
    """The bench venv's interpreter, created and filled with ``packages`` when missing."""
    python = BENCH_VENV / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        if subprocess.run([str(python), "-c", check], capture_output=True).returncode != 0:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"peers unavailable: could not prepare {BENCH_VENV.name}: {exc}", file=sys.stderr)
        return None
    return python


async def race(
    contender: Contender,
    address: str,
    count: int,
    progress: Callable[[str], Awaitable[Progress]],
    timeout: float,
) -> tuple[float, float]:
    """Run one contender on ``address``; return ``(msgs/s after the first, first seconds)``."""
    slug = "".join(c if c.isalnum() else "-" for c in contender.name.lower())[:40]
    log_path = ROOT / ".brokers" / f"bench-{slug}.log"
    log = open(log_path, "wb")  # noqa: ASYNC230, SIM115 - one log per contender, last round
    started = time.perf_counter()
    proc = subprocess.Popen(  # noqa: ASYNC220 - polled below, never waited on in the loop
        contender.argv(address), cwd=ROOT, stdout=log, stderr=log, start_new_session=True
    )
    first: float | None = None
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} (see {log_path})")
            now = time.perf_counter()
            if now - started > timeout:
                raise RuntimeError(f"not drained within {timeout:.0f}s")
            delivered, drained = await progress(address)
            now = time.perf_counter()
            if delivered and first is None:
                first = now
            if drained:
                assert first is not None
                return count / max(now - first, 1e-9), first - started
            await asyncio.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


async def run_rounds(
    contenders: list[Contender],
    rounds: int,
    count: int,
    fill: Callable[[Contender], Awaitable[str]],
    progress: Callable[[str], Awaitable[Progress]],
    cleanup: Callable[[str], Awaitable[None]],
    timeout: float,
) -> dict[str, Score]:
    """``rounds`` rounds; each round runs every contender once, the order rotated per round."""
    scores = {c.name: Score() for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for contender in order:
            score = scores[contender.name]
            if score.failure:
                continue
            address = await fill(contender)
            try:
                rate, first = await race(contender, address, count, progress, timeout)
            except Exception as exc:
                score.failure = f"failed: {exc}"
                continue
            finally:
                await cleanup(address)
            score.rates.append(rate)
            score.firsts.append(first)
            print(f"  round {r + 1}: {contender.name}: {rate:,.0f} msgs/s, first {first:.3f}s")
    return scores


def table(scores: dict[str, Score], reference: str) -> str:
    """A Markdown table: median and range of msgs/s, first message, share of ``reference``."""
    ref = scores.get(reference)
    ref_rate = statistics.median(ref.rates) if ref and ref.rates else None
    lines = [
        "| contender | msgs/s (median) | min-max | first message (median) | vs raw loop |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, score in scores.items():
        if not score.rates:
            lines.append(f"| {name} | {score.failure or 'no result'} | | | |")
            continue
        rate = statistics.median(score.rates)
        low, high = min(score.rates), max(score.rates)
        first = statistics.median(score.firsts)
        share = f"{rate / ref_rate:.0%}" if ref_rate else "-"
        lines.append(
            f"| {name} | {rate:,.0f} | {low:,.0f}-{high:,.0f} | {first * 1000:.0f} ms | {share} |"
        )
    return "\n".join(lines)
