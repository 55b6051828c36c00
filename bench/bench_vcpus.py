"""What running both CPUs at once costs one CPU-bound Python process (a machine check).

``.venv/bin/python bench/bench_vcpus.py``: a pure-Python loop (a dict and small strings,
about a second of CPU) pinned to CPU 0 alone, then at the same time as a copy of itself
pinned to CPU 1, alternating over ``--rounds`` rounds. Each copy reports its own thread
CPU time, so the table shows how much more CPU the same work needs while the other CPU
is busy too: on a machine whose CPUs are hyperthreads of one core, or share a host core
with other guests, that is well above 1. ``docs/servers/kafka.md`` uses it to judge
whether the Kafka server's two Python threads slow each other down that way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

LOOPS = 9_000_000


def work() -> float:
    """The CPU seconds the loop took on this thread."""
    started = time.thread_time()
    table: dict[int, tuple[int, str]] = {}
    for i in range(LOOPS):
        table[i & 1023] = (i, str(i & 255))
    return time.thread_time() - started


def _run(cpus: list[int]) -> list[float]:
    """Start one pinned copy per CPU at once; their CPU seconds."""
    procs = [
        subprocess.Popen(
            ["taskset", "-c", str(cpu), sys.executable, __file__, "--child"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for cpu in cpus
    ]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(work())
        return
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench_vcpus: needs two CPUs")
    alone: list[float] = []
    together: list[float] = []
    for round_ in range(args.rounds):
        first = _run([0])
        both = _run([0, 1])
        alone += first
        together += both
        print(
            f"round {round_ + 1}: alone {first[0]:.3f} s, together {both[0]:.3f} / {both[1]:.3f} s"
        )
    base = statistics.median(alone)
    print(f"\n{'':<34}{'CPU s median':>14}{'min-max':>16}{'vs alone':>10}")
    for name, values in (("alone on CPU 0", alone), ("beside a copy on CPU 1", together)):
        median = statistics.median(values)
        span = f"{min(values):.3f}-{max(values):.3f}"
        print(f"{name:<34}{median:>14.3f}{span:>16}{median / base:>10.2f}")
    worst = max(together)
    print(f"{'the slower copy at worst':<34}{worst:>14.3f}{'':>16}{worst / base:>10.2f}")


if __name__ == "__main__":
    main()
