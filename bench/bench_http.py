"""HTTP push: binary-mode CloudEvents requests per second, ours beside upstream and the limit.

Each contender is a server process pinned to CPU 0; the load comes from ``wrk`` (Debian's
package, installed here with apt-get when missing) pinned to CPU 1, on loopback: POSTs of
one binary-mode CloudEvent (four ``ce-`` headers, a 100-byte JSON body) over ``--connections``
keep-alive connections. Contenders:

* ``amgi http``: ``amgi run bench._http_apps:ack --server http`` with its defaults (as a
  user starts it, logging on), an app that acks every message; our own HTTP/1.1
  listener (asyncio and httptools, no uvicorn);
* ``amgi.http PushApp (uvicorn)``: the same app as an ASGI application
  (``amgi.http.PushApp``), served by uvicorn with the bare app's settings: what a user
  mounting it in an ASGI stack gets;
* ``upstream amgi-cloudevents 0.51``: upstream's ``Server`` (a Starlette app) around an
  app that acks, served by uvicorn (same version, httptools, no access log), from a
  separate venv (``.venv-bench-http``, created here). Upstream 0.51 pins
  ``amgi-types``/``amgi-common`` 0.51, which the package index does not have: it is
  installed with ``--no-deps`` beside their newest published release (0.49);
* ``bare uvicorn (204)``: an ASGI app answering 204 without reading anything, same uvicorn
  settings (the limit of any app served this way).

Every round runs each contender once, in alternating order, for ``--seconds`` after a
one-second warm-up; any non-2xx answer invalidates the run. Besides each contender's
median and range, the table shows the ratios within each round (ours to bare, ours to
upstream), which a machine shared with other work disturbs less than the absolute rates,
and the server process's CPU time per request (from /proc, over the measured run). Run
``.venv/bin/python bench/bench_http.py`` (``--rounds``, ``--seconds``, ``--connections``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _proc import cpu_seconds, stop

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench-http"
UVICORN_PINS = ["uvicorn==0.54.0", "httptools==0.9.0"]
UPSTREAM = [
    "amgi-types==0.49.0",
    "amgi-common==0.49.0",
    "cloudevents>=2.1.0",
    "httpx>=0.28.1",
    "starlette>=1.2.1",
]
SERVER_CPU, LOAD_CPU = "0", "1"
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"order": 1, "pad": "%s"}'
wrk.headers["content-type"] = "application/json"
wrk.headers["ce-specversion"] = "1.0"
wrk.headers["ce-id"] = "a234-1234-1234"
wrk.headers["ce-source"] = "/bench"
wrk.headers["ce-type"] = "orders"
""" % ("x" * 75)


def ensure_wrk() -> str:
    """The wrk binary; installed from Debian when missing (needs root)."""
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench_http: wrk is not installed and apt-get could not install it")
    return found


def ensure_bench_venv() -> Path:
    """``.venv-bench-http`` with upstream amgi-cloudevents 0.51 and the same uvicorn."""
    python = BENCH_VENV / "bin" / "python"
    check = [str(python), "-c", "import amgi_cloudevents, uvicorn, httptools"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *UPSTREAM, *UVICORN_PINS], check=True)
    subprocess.run([*pip, "--no-deps", "amgi-cloudevents==0.51.0"], check=True)
    return python


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _uvicorn(python: str, target: str, *extra: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [
            python, "-m", "uvicorn", target, *extra, "--port", str(port),
            "--no-access-log", "--http", "httptools", "--loop", "asyncio",
        ]  # fmt: skip

    return argv


def contenders(peer_python: Path) -> dict[str, Callable[[int], list[str]]]:
    ours = str(ROOT / ".venv" / "bin" / "amgi")
    return {
        "amgi http": lambda port: [
            *(ours, "run", "bench._http_apps:ack", "--server", "http", "--port", str(port))
        ],
        "amgi.http PushApp (uvicorn)": _uvicorn(
            str(ROOT / ".venv" / "bin" / "python"), "bench._http_apps:push", "--factory"
        ),
        "upstream amgi-cloudevents 0.51": _uvicorn(
            str(peer_python), "bench._http_upstream:upstream", "--factory"
        ),
        "bare uvicorn (204)": _uvicorn(
            str(ROOT / ".venv" / "bin" / "python"), "bench._http_apps:bare"
        ),
    }


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_http: the server did not start ({proc.args})") from None
            time.sleep(0.05)


def measure(
    wrk: str, argv: list[str], port: int, seconds: float, connections: int
) -> tuple[float, float]:
    """Requests per second of one server process under wrk, and its CPU µs per request."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT)
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *argv], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            _wait_listening(port, server)
            url = f"http://127.0.0.1:{port}/"
            load = ["taskset", "-c", LOAD_CPU, wrk, "-t1", f"-c{connections}", "-s", str(script)]
            subprocess.run([*load, "-d1s", url], check=True, capture_output=True)
            cpu = cpu_seconds(server.pid)
            done = subprocess.run(
                [*load, f"-d{seconds:g}s", url], check=True, capture_output=True, text=True
            )
            cpu = cpu_seconds(server.pid) - cpu
        finally:
            stop(server)
            log.close()
        if "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
            raise SystemExit(f"bench_http: errors under load ({argv[0]}):\n{done.stdout}")
        found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
        count = re.search(r"(\d+) requests in", done.stdout)
        if found is None or count is None:
            raise SystemExit(f"bench_http: no rate in wrk's output:\n{done.stdout}")
        return float(found.group(1)), cpu / int(count.group(1)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    wrk = ensure_wrk()
    runs = contenders(ensure_bench_venv())
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    load_before = f"{os.getloadavg()[0]:.1f}"
    names = list(runs)
    for round_ in range(args.rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            port = _free_port()
            rate, cpu = measure(wrk, runs[name](port), port, args.seconds, args.connections)
            rates[name].append(rate)
            cpus[name].append(cpu)
            print(
                f"round {round_ + 1}: {name}: {rate:,.0f} requests/s, {cpu:.1f} µs CPU/request",
                file=sys.stderr,
            )
    bare = rates["bare uvicorn (204)"]
    upstream = rates["upstream amgi-cloudevents 0.51"]
    print(
        f"\nbinary-mode CloudEvents, {args.connections} connections, {args.seconds:g}s x "
        f"{args.rounds} rounds (server on CPU {SERVER_CPU}, wrk on CPU {LOAD_CPU}); "
        f"load average {load_before} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(
        "| contender | requests/s (median) | min - max | vs bare, same round "
        "(median, min - max) | vs upstream, same round | server CPU µs/request | "
        "bare's CPU / this CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    bare_cpu = statistics.median(cpus["bare uvicorn (204)"])
    for name in names:
        own = rates[name]
        to_bare = [r / b for r, b in zip(own, bare, strict=True)]
        to_upstream = [r / u for r, u in zip(own, upstream, strict=True)]
        cpu = statistics.median(cpus[name])
        print(
            f"| {name} | {statistics.median(own):,.0f} | {min(own):,.0f} - {max(own):,.0f} | "
            f"{statistics.median(to_bare):.0%} ({min(to_bare):.0%} - {max(to_bare):.0%}) | "
            f"{statistics.median(to_upstream):.2f}x | {cpu:.1f} | {bare_cpu / cpu:.0%} |"
        )


if __name__ == "__main__":
    main()
