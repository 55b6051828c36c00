"""The runtime and Kafka benchmarks on several Python versions, in one run.

For each version (default 3.11 and 3.13) the same contenders of ``bench_runtime.py`` (the
app loop alone, the runtime over the memory server) and of ``bench_kafka.py`` (our server,
the raw confluent-kafka loops, the protocol minimum) run in child processes of that
version's venv, the versions alternating within each round; the table shows the median
over the rounds with the min-max, per version, and the ratio of the medians.

The interpreter running this script serves its own version; any other version runs from
``.venv-X.Y``, made (or brought up to date) with ``scripts/venv X.Y``. Run the Kafka part
after ``scripts/brokers/kafka.sh``:

    .venv/bin/python bench/bench_pythons.py [--versions 3.11 3.13] [--rounds 5] [--only runtime]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import _common
import bench_kafka
import bench_runtime

ROOT = Path(__file__).resolve().parents[1]
THIS_VERSION = "{}.{}".format(*sys.version_info[:2])
RUNTIME_ROWS = {"floor": "floor (app loop only)", "runtime": "runtime + memory server"}
Rows = dict[str, dict[str, list[float]]]  # row label -> version -> one value per round
KAFKA_CONTENDERS = ["amgi-kafka", "raw-confluent", "raw-confluent-async", "protocol-minimum"]


def interpreter(version: str) -> str:
    """The python of ``version``: this one, or ``.venv-X.Y``'s, made up to date first."""
    if version == THIS_VERSION:
        return sys.executable
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "venv"), version], capture_output=True, text=True
    )
    if made.returncode != 0:
        sys.exit(f"bench_pythons: no venv for Python {version}: {made.stderr.strip()}")
    return str(ROOT / made.stdout.strip())


def child(python: str, args: list[str], timeout: float) -> dict[str, float]:
    """Run this script or ``bench_kafka.py`` under ``python``; its last stdout line is JSON.
    Adds ``cpu``: the child's CPU seconds in all (user and system, every thread)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [python, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{python} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def run_runtime_child(messages: int, batch: int) -> None:
    """One round of bench_runtime's two rows in this process, pinned to one core: each
    timed once by the wall clock, as bench_runtime does, and once by this process's CPU
    clock, which time taken by other processes on a busy machine does not inflate."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    result: dict[str, float] = {}
    for clock, suffix in ((time, ""), (SimpleNamespace(perf_counter=time.process_time), "-cpu")):
        # the benches read time.perf_counter() through their module's `time`
        bench_runtime.time = _common.time = clock  # type: ignore[assignment]
        for row in RUNTIME_ROWS:
            seconds = asyncio.run(getattr(bench_runtime, row)(messages, batch))
            result[row + suffix] = messages / seconds
    print(json.dumps(result))


def rounds_in_turn(versions: list[str], rounds: int) -> list[list[str]]:
    """The versions' order in each round: reversed every other round, so neither always
    runs first on a machine whose load drifts."""
    return [versions if r % 2 == 0 else versions[::-1] for r in range(rounds)]


def spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def table(
    title: str,
    rows: Rows,
    versions: list[str],
    unit: str,
    digits: int = 0,
    ratio: bool = True,
) -> None:
    print(f"\n{title}")
    width = 32
    label_width = max(map(len, rows)) + 2
    head = "".join(f"{f'{v} {unit}, median (min-max)':>{width}}" for v in versions)
    ratio_head = f"{versions[-1]} / {versions[0]}" if ratio and len(versions) > 1 else ""
    print(f"{'':<{label_width}}{head}{ratio_head:>14}")
    for label, per_version in rows.items():
        cells = "".join(f"{spread(per_version.get(v, []), digits):>{width}}" for v in versions)
        first, last = per_version.get(versions[0]), per_version.get(versions[-1])
        factor = (
            f"{statistics.median(last) / statistics.median(first):.2f}x"
            if ratio_head and first and last
            else ""
        )
        print(f"{label:<{label_width}}{cells}{factor:>14}")


def bench_runtime_rows(pythons: dict[str, str], rounds: int, messages: int, batch: int) -> Rows:
    rows: Rows = {}
    args = [str(Path(__file__)), "--child-runtime", "--messages", str(messages)]
    args += ["--batch", str(batch)]
    for order in rounds_in_turn(list(pythons), rounds):
        for version in order:
            result = child(pythons[version], args, timeout=300)
            for suffix, clock in (("", "wall clock"), ("-cpu", "CPU clock")):
                for key, label in RUNTIME_ROWS.items():
                    row = rows.setdefault(f"{label}, {clock}", {})
                    row.setdefault(version, []).append(result[key + suffix])
    return rows


def bench_kafka_rows(
    pythons: dict[str, str], rounds: int, bootstrap: str, count: int
) -> tuple[Rows, Rows, Rows]:
    """msgs/s, seconds to the first message and CPU microseconds per record (the child
    process in all: start-up, group join and drain), per contender and version."""
    print(f"pre-filling {count:,} records on {bench_kafka.PARTITIONS} partitions ...", flush=True)
    topic, ends = bench_kafka.prefill(bootstrap, count)
    rates: Rows = {name: {} for name in KAFKA_CONTENDERS}
    firsts: Rows = {name: {} for name in KAFKA_CONTENDERS}
    cpus: Rows = {name: {} for name in KAFKA_CONTENDERS}
    script = str(Path(bench_kafka.__file__).resolve())
    for order in rounds_in_turn(list(pythons), rounds):
        for name in KAFKA_CONTENDERS:
            for version in order:
                args = [script, "--child", name, "--bootstrap", bootstrap, "--topic", topic]
                args += ["--ends", json.dumps(ends), "--count", str(count)]
                result = child(pythons[version], args, timeout=180)
                if result["seen"] < count:
                    raise RuntimeError(f"{name} on {version} saw {result['seen']} of {count}")
                rates[name].setdefault(version, []).append(count / result["drain"])
                firsts[name].setdefault(version, []).append(result["first"])
                cpus[name].setdefault(version, []).append(result["cpu"] / count * 1e6)
    return rates, firsts, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=["3.11", "3.13"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["runtime", "kafka"])
    parser.add_argument("--messages", type=int, default=500_000, help="runtime bench")
    parser.add_argument("--batch", type=int, default=1000, help="runtime bench")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bench")
    parser.add_argument("--count", type=int, default=200_000, help="Kafka bench")
    parser.add_argument("--child-runtime", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_runtime:
        run_runtime_child(args.messages, args.batch)
        return
    pythons = {version: interpreter(version) for version in args.versions}
    for version, python in pythons.items():
        print(f"Python {version}: {python}")
    if args.only in (None, "runtime"):
        rows = bench_runtime_rows(pythons, args.rounds, args.messages, args.batch)
        table(
            f"bench_runtime: {args.messages:,} messages, batches of {args.batch:,}, one core,"
            f" {args.rounds} rounds",
            rows,
            args.versions,
            "msgs/s",
        )
    if args.only in (None, "kafka"):
        rates, firsts, cpus = bench_kafka_rows(pythons, args.rounds, args.bootstrap, args.count)
        table(
            f"bench_kafka: drain {args.count:,} records x 100 B, acked and committed,"
            f" {args.rounds} rounds",
            rates,
            args.versions,
            "msgs/s",
        )
        table(
            "bench_kafka: first message (group join included)",
            firsts,
            args.versions,
            "s",
            digits=2,
            ratio=False,
        )
        table(
            "bench_kafka: CPU time per record, the contender's process in all (user + system,"
            " every thread; start-up and group join included)",
            cpus,
            args.versions,
            "us",
            digits=2,
        )


if __name__ == "__main__":
    main()
