"""AMP benchmark: amgi.amp against Twisted's AMP, side by side, in one run.

    python bench/bench_amp.py [--rounds 3] [--baseline DIR]

Every server and client runs in its own subprocess on 127.0.0.1. Prints calls
per second for a small command (sequential, and with 100 calls in flight) for
each client/server pair, median and min-max over the rounds (the pairs alternate
within each round), and the encode/parse time of one 4-key box.

``--baseline DIR`` adds "before" contenders: amgi.amp imported from ``DIR/src``
(e.g. an older checkout: ``git archive REV src | tar -x -C DIR``), to compare a
change with its base in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import timeit
from typing import Any, ClassVar

ROUNDS_SEQ = 4000
ROUNDS_PAR = 30000
IN_FLIGHT = 100


# ----------------------------------------------------------------------------- ours


def ours_command() -> Any:
    from amgi import amp

    class Sum(amp.Command):
        arguments: ClassVar[Any] = [(b"a", amp.Integer()), (b"b", amp.Integer())]
        response: ClassVar[Any] = [(b"total", amp.Integer())]

    return Sum


def serve_ours() -> None:
    from amgi import amp

    Sum = ours_command()

    class Server(amp.AMP):
        @Sum.responder
        def sum(self, a: int, b: int) -> dict[str, int]:
            return {"total": a + b}

    async def main() -> None:
        server = await amp.serve(Server, "127.0.0.1", 0)
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


def client_ours(port: int, rounds: int, in_flight: int) -> None:
    from amgi import amp

    Sum = ours_command()

    async def main() -> None:
        conn = await amp.connect("127.0.0.1", port)
        call = conn.call_remote

        async def worker(n: int) -> None:
            for i in range(n):
                await call(Sum, a=i, b=1)

        await worker(200)  # warm up
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(rounds // in_flight) for _ in range(in_flight)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"RATE {rounds / elapsed:.0f} CPU {cpu / rounds * 1e6:.2f}", flush=True)
        conn.close()
        await conn.wait_closed()

    asyncio.run(main())


# -------------------------------------------------------------------------- Twisted


def twisted_command() -> Any:
    from twisted.protocols import amp

    class Sum(amp.Command):
        arguments: ClassVar[Any] = [(b"a", amp.Integer()), (b"b", amp.Integer())]
        response: ClassVar[Any] = [(b"total", amp.Integer())]

    return Sum


def serve_twisted() -> None:
    from twisted.internet import protocol, reactor
    from twisted.protocols import amp

    Sum = twisted_command()

    class Server(amp.AMP):
        @Sum.responder
        def sum(self, a: int, b: int) -> dict[str, int]:
            return {"total": a + b}

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Server), interface="127.0.0.1")
    print("PORT", port.getHost().port, flush=True)
    reactor.run()


def client_twisted(port: int, rounds: int, in_flight: int) -> None:
    from twisted.internet import defer, endpoints, task
    from twisted.protocols import amp

    Sum = twisted_command()

    async def main(reactor: Any) -> None:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        proto = await endpoints.connectProtocol(endpoint, amp.AMP())

        async def worker(n: int) -> None:
            for i in range(n):
                await proto.callRemote(Sum, a=i, b=1)

        await worker(200)
        start, cpu = time.perf_counter(), time.process_time()
        await defer.gatherResults(
            [defer.ensureDeferred(worker(rounds // in_flight)) for _ in range(in_flight)]
        )
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"RATE {rounds / elapsed:.0f} CPU {cpu / rounds * 1e6:.2f}", flush=True)
        proto.transport.loseConnection()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# ----------------------------------------------------------------------- box timing


def box_timing_of(contender: Contender) -> tuple[float, float]:
    """Encode/parse µs of amgi.amp in a subprocess (so a baseline can be imported)."""
    out = subprocess.run(
        [sys.executable, __file__, "boxes"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=environment(contender[2]),
    ).stdout.split()
    return float(out[0]), float(out[1])


def box_timings(number: int = 100_000) -> list[tuple[str, float, float]]:
    from twisted.protocols import amp as tamp

    from amgi import amp

    box = {b"_command": b"Sum", b"_ask": b"1f", b"a": b"12345", b"b": b"67890"}
    wire = amp.encode_box(box)
    tbox = tamp.AmpBox(box)
    assert tbox.serialize() == wire

    def best(stmt: Any) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6

    parser = amp.BoxParser()
    ours_enc = best(lambda: amp.encode_box(box))
    ours_parse = best(lambda: parser.feed(wire))
    theirs_enc = best(tbox.serialize)
    theirs_parse = best(lambda: tamp.parseString(wire))
    return [("amgi.amp", ours_enc, ours_parse), ("Twisted", theirs_enc, theirs_parse)]


# ---------------------------------------------------------------------------- driver


# A contender: (label, implementation, PYTHONPATH prefix or None).
Contender = tuple[str, str, str | None]


def environment(path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    return env


def start_server(contender: Contender) -> tuple[subprocess.Popen[str], int]:
    label, kind, path = contender
    proc = subprocess.Popen(
        [sys.executable, __file__, f"serve-{kind}"],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(path),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"{label} server failed to start")
    return proc, int(line.split()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_client(
    contender: Contender, server: subprocess.Popen[str], port: int, rounds: int, in_flight: int
) -> tuple[float, float, float]:
    """Calls/s, client CPU µs per call, server CPU µs per call (the whole client run)."""
    _, kind, path = contender
    server_cpu = cpu_seconds(server.pid)
    out = subprocess.run(
        [sys.executable, __file__, f"client-{kind}", str(port), str(rounds), str(in_flight)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=environment(path),
    ).stdout.split()
    server_us = (cpu_seconds(server.pid) - server_cpu) / rounds * 1e6
    return float(out[out.index("RATE") + 1]), float(out[out.index("CPU") + 1]), server_us


def summary(values: list[float], digits: int = 0) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="rounds (pairs alternate)")
    parser.add_argument("--baseline", help="a checkout whose src/ is the 'before' amgi.amp")
    args = parser.parse_args()
    ours: Contender = ("amgi.amp", "ours", None)
    twisted: Contender = ("Twisted", "twisted", None)
    contenders = [ours, twisted]
    pairs = [(ours, ours), (ours, twisted), (twisted, ours), (twisted, twisted)]
    if args.baseline:
        before: Contender = ("before", "ours", os.path.join(args.baseline, "src"))
        contenders.append(before)
        pairs[1:1] = [(before, before)]
        pairs[4:4] = [(twisted, before)]
    servers = {c[0]: start_server(c) for c in contenders}
    # Per pair: sequential calls/s, in-flight calls/s, client and server CPU µs per call.
    results: dict[tuple[str, str], tuple[list[float], ...]] = {
        (c[0], s[0]): ([], [], [], []) for c, s in pairs
    }
    try:
        for round_ in range(args.rounds):
            order = pairs if round_ % 2 == 0 else pairs[::-1]
            for client, server in order:
                proc, port = servers[server[0]]
                seq, par, client_cpu, server_cpu = results[client[0], server[0]]
                seq.append(run_client(client, proc, port, ROUNDS_SEQ, 1)[0])
                rate, client_us, server_us = run_client(client, proc, port, ROUNDS_PAR, IN_FLIGHT)
                par.append(rate)
                client_cpu.append(client_us)
                server_cpu.append(server_us)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    print(f"median (min-max) of {args.rounds} rounds; CPU µs per call with 100 in flight")
    print(
        f"{'client':<9} {'server':<9} {'sequential calls/s':>24} {'100 in flight calls/s':>26}"
        f" {'client CPU µs':>21} {'server CPU µs':>21}"
    )
    for (client_label, server_label), (seq, par, c_cpu, s_cpu) in results.items():
        print(
            f"{client_label:<9} {server_label:<9} {summary(seq):>24} {summary(par):>26}"
            f" {summary(c_cpu, 1):>21} {summary(s_cpu, 1):>21}"
        )
    print()
    print(f"{'4-key box':<10} {'encode µs':>10} {'parse µs':>10}  (best of {args.rounds} runs)")
    rows = box_timings()
    if args.baseline:
        mine: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        for _ in range(args.rounds):  # alternating processes
            mine.append(box_timing_of(ours))
            theirs.append(box_timing_of(before))
        rows[0] = ("amgi.amp", min(t[0] for t in mine), min(t[1] for t in mine))
        rows.insert(1, ("before", min(t[0] for t in theirs), min(t[1] for t in theirs)))
    for name, enc, parse in rows:
        print(f"{name:<10} {enc:>10.2f} {parse:>10.2f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["boxes"]:
        _, encode_us, parse_us = box_timings()[0]
        print(encode_us, parse_us)
    elif len(sys.argv) > 1 and sys.argv[1].startswith(("serve-", "client-")):
        mode = sys.argv[1]
        if mode == "serve-ours":
            serve_ours()
        elif mode == "serve-twisted":
            serve_twisted()
        else:
            port, rounds, in_flight = (int(x) for x in sys.argv[2:5])
            (client_ours if mode == "client-ours" else client_twisted)(port, rounds, in_flight)
    else:
        main()
