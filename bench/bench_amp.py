"""AMP benchmark: amgi.amp against Twisted's AMP, side by side, in one run.

    python bench/bench_amp.py [--seconds 2]

Every server and client runs in its own subprocess on 127.0.0.1. Prints calls
per second for a small command (sequential, and with 100 calls in flight) for
each client/server pair, and the encode/parse time of one 4-key box.
"""

from __future__ import annotations

import argparse
import asyncio
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
        start = time.perf_counter()
        await asyncio.gather(*(worker(rounds // in_flight) for _ in range(in_flight)))
        elapsed = time.perf_counter() - start
        print(f"RATE {rounds / elapsed:.0f}", flush=True)
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
        start = time.perf_counter()
        await defer.gatherResults(
            [defer.ensureDeferred(worker(rounds // in_flight)) for _ in range(in_flight)]
        )
        elapsed = time.perf_counter() - start
        print(f"RATE {rounds / elapsed:.0f}", flush=True)
        proto.transport.loseConnection()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# ----------------------------------------------------------------------- box timing


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


def start_server(kind: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, f"serve-{kind}"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"{kind} server failed to start")
    return proc, int(line.split()[1])


def run_client(kind: str, port: int, rounds: int, in_flight: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, f"client-{kind}", str(port), str(rounds), str(in_flight)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return float(out.split("RATE")[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per cell")
    args = parser.parse_args()
    servers = {kind: start_server(kind) for kind in ("ours", "twisted")}
    rows = []
    try:
        for client in ("ours", "twisted"):
            for server in ("ours", "twisted"):
                port = servers[server][1]
                seq = max(run_client(client, port, ROUNDS_SEQ, 1) for _ in range(args.repeat))
                par = max(
                    run_client(client, port, ROUNDS_PAR, IN_FLIGHT) for _ in range(args.repeat)
                )
                rows.append((client, server, seq, par))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    names = {"ours": "amgi.amp", "twisted": "Twisted"}
    print(f"{'client':<10} {'server':<10} {'sequential calls/s':>20} {'100 in flight calls/s':>23}")
    for client, server, seq, par in rows:
        print(f"{names[client]:<10} {names[server]:<10} {seq:>20,.0f} {par:>23,.0f}")
    print()
    print(f"{'4-key box':<10} {'encode µs':>10} {'parse µs':>10}")
    for name, enc, parse in box_timings():
        print(f"{name:<10} {enc:>10.2f} {parse:>10.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith(("serve-", "client-")):
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
