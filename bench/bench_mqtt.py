"""Drain benchmark of the MQTT server against the raw client loops and the peers.

For each run: create a persistent session (MQTT 5, QoS 1 subscription) under a fresh client
id and topic, publish N QoS 1 messages of 100 bytes with 2 user properties while it is
offline, then start the contender in its own process, resuming that session, and stop it
(SIGTERM) once it has handled all N. Contenders alternate over ``--rounds`` rounds (the
order rotates each round); the table gives the median and the range over the rounds.

    .venv/bin/python bench/bench_mqtt.py [--n 20000] [--port 1883] [--rounds 3]
        [--only amgi-run,paho-async,...] [--child-timeout 60]

Every contender is timed the same way. Each calls :func:`handled` once a message is
handled and acknowledged (the ack handed to its client library or runtime); that writes
the wall time and the process's CPU time of the first message to ``$BENCH_FIRST`` and of
the N-th to ``$BENCH_DONE``. The driver starts the process, polls for ``$BENCH_DONE`` and
then stops it. Time to first message counts from the process start (interpreter start,
imports and connect included); msgs/s is the N-1 messages after the first over the time
from the first to the N-th; CPU per message is the process's CPU time (all threads) over
the same span. Every contender acknowledges a message only after handling it, except
where its label says otherwise.

Contenders:

- ``amgi-run``: our server as a user starts it, ``amgi run bench_mqtt:app TOPIC --server
  mqtt --host H --port P --client-id ID`` (defaults otherwise: logging at INFO, GC tuning,
  lifespan auto, QoS 1); the app (:func:`app`) acks each message;
- ``amgi-inprocess``: the same app and transport embedded in a script (``Runtime(...)``
  in-process, lifespan off, no logging set up, no GC tuning): this benchmark's former setup;
- ``paho-async`` / ``paho-thread``: raw paho-mqtt 2 with manual acks, driven by the asyncio
  loop (as the server drives it) or by paho's own network thread;
- from a separate virtual environment, ``.venv-bench``, created and filled here on first
  use (the upstream packages could clash with this project's ``amgi``): ``gmqtt``,
  ``aiomqtt`` and ``faststream``. FastStream's MQTT subscriber stalls (no CPU, no
  progress) when it resumes a session with a backlog of 2,000 or more; a run that does
  not finish within ``--child-timeout`` counts as stalled, and the contender is then
  measured on a backlog of 1,000 (marked in the table).

Run ``scripts/brokers/mosquitto.sh`` first.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import inspect
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _proc import stop

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
BENCH_PACKAGES = ["faststream[mqtt]", "gmqtt", "aiomqtt", "paho-mqtt>=2.1"]
HOST = "127.0.0.1"
PAYLOAD = b"x" * 100
USER_PROPERTIES = [("trace", "abc123"), ("kind", "bench")]
WATCH_EVERY = 0.005
FALLBACK_N = 1000


# -- what every contender reports (standard library only: the peers' venv imports it too) ---

_handled = 0
_target = 0


def _stamp(variable: str) -> None:
    path = Path(os.environ[variable])
    part = path.with_suffix(".part")
    part.write_text(f"{time.time()!r} {time.process_time()!r}")
    part.replace(path)


def handled() -> None:
    """Count one handled and acked message; stamp the first and the ``$BENCH_N``-th."""
    global _handled, _target
    _handled += 1
    if _handled == 1:
        _target = int(os.environ["BENCH_N"])
        _stamp("BENCH_FIRST")
    if _handled == _target:
        _stamp("BENCH_DONE")


async def app(scope: Any, receive: Any, send: Any) -> None:
    """The app ``amgi run`` serves: read until ``more_messages`` is false, ack each id."""
    if scope["type"] != "message":
        return
    more = True
    while more:
        event = await receive()
        await send({"type": "message.ack", "id": event["id"]})
        handled()
        more = event.get("more_messages", False)


def _forever() -> None:
    """Block until the driver's SIGTERM ends the process."""
    while True:
        time.sleep(1)


# -- peers, run in the bench venv -------------------------------------------------------------


async def peer_faststream(port: int, topic: str, client_id: str) -> None:
    from faststream.mqtt import MQTTBroker, QoS

    broker = MQTTBroker(
        f"mqtt://{HOST}:{port}",
        client_id=client_id,
        clean_session=False,
        session_expiry_interval=3600,
        # The backlog arrives before the subscriber is registered; let zmqtt hold it all.
        session_replay_buffer_size=int(os.environ["BENCH_N"]) + 1000,
        keepalive=600,
        logger=None,
    )

    @broker.subscriber(topic, qos=QoS.AT_LEAST_ONCE)
    async def handle(body: bytes) -> None:
        handled()  # FastStream acks after the handler returns

    await broker.start()
    await asyncio.Event().wait()


async def peer_gmqtt(port: int, topic: str, client_id: str) -> None:
    import gmqtt

    async def on_message(client: Any, t: str, payload: bytes, qos: int, props: Any) -> int:
        handled()
        return 0  # PUBACK is sent when this coroutine returns

    client = gmqtt.Client(
        client_id,
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=3600,
    )
    client.on_message = on_message
    await client.connect(HOST, port)
    await asyncio.Event().wait()


async def peer_aiomqtt(port: int, topic: str, client_id: str) -> None:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    async with aiomqtt.Client(
        HOST,
        port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=props,
    ) as client:
        async for _ in client.messages:
            handled()  # acked on receipt by paho underneath


# -- the broker side: sessions and the backlog ---------------------------------------------------


def _paho(client_id: str = "") -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    return paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)


def _session_props() -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return props


def prime(port: int, topic: str, client_id: str, n: int) -> None:
    """Create the session of ``client_id`` subscribed to ``topic``; queue ``n`` messages."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    subscribed = threading.Event()
    session = _paho(client_id)
    session.on_subscribe = lambda *a: subscribed.set()
    session.connect(HOST, port, clean_start=False, properties=_session_props())
    session.loop_start()
    session.subscribe(topic, qos=1)
    if not subscribed.wait(10):
        raise SystemExit("bench: the broker did not confirm the subscription")
    session.disconnect()
    session.loop_stop()

    publisher = _paho()
    publisher.max_inflight_messages_set(1000)
    publisher.connect(HOST, port)
    publisher.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = USER_PROPERTIES
    infos = [publisher.publish(topic, PAYLOAD, qos=1, properties=props) for _ in range(n)]
    for info in infos:
        info.wait_for_publish(60)
    publisher.disconnect()
    publisher.loop_stop()


# -- contenders in this project's venv ----------------------------------------------------------


def run_amgi_inprocess(port: int, topic: str, client_id: str) -> None:
    """The server embedded in a script: Runtime in-process, lifespan off, no logging."""
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.servers.mqtt import MqttOptions, MqttTransport

    options = MqttOptions(host=HOST, port=port, client_id=client_id)
    transport = MqttTransport([topic], options)
    asyncio.run(Runtime(app, transport, RuntimeConfig(lifespan="off")).serve())


def _on_message(client: Any, userdata: Any, msg: Any) -> None:
    """paho's on_message of the raw loops: ack after handling."""
    client.ack(msg.mid, msg.qos)
    handled()


def _raw_paho(client_id: str) -> Any:
    client = _paho(client_id)
    client.manual_ack_set(True)
    client.on_message = _on_message
    return client


async def run_paho_async(port: int, topic: str, client_id: str) -> None:
    """paho driven by the asyncio loop (as the server drives it); ack after handling."""
    loop = asyncio.get_running_loop()
    client = _raw_paho(client_id)
    client.on_socket_open = lambda c, u, s: loop.add_reader(s, c.loop_read)
    client.on_socket_close = lambda c, u, s: loop.remove_reader(s)
    client.on_socket_register_write = lambda c, u, s: loop.add_writer(s, c.loop_write)
    client.on_socket_unregister_write = lambda c, u, s: loop.remove_writer(s)
    client.connect(HOST, port, clean_start=False, properties=_session_props())
    await asyncio.Event().wait()


def run_paho_thread(port: int, topic: str, client_id: str) -> None:
    """paho with its network thread (loop_start); ack after handling."""
    client = _raw_paho(client_id)
    client.connect(HOST, port, clean_start=False, properties=_session_props())
    client.loop_start()
    _forever()


AMGI_RUN = "amgi-run"
"""Not a function: the driver starts the ``amgi`` command itself."""

CONTENDERS: dict[str, tuple[Callable[[int, str, str], Any] | None, bool]] = {
    AMGI_RUN: (None, False),
    "amgi-inprocess": (run_amgi_inprocess, False),
    "paho-async": (run_paho_async, False),
    "paho-thread": (run_paho_thread, False),
    "gmqtt": (peer_gmqtt, True),
    "aiomqtt": (peer_aiomqtt, True),
    "faststream": (peer_faststream, True),
}
"""name: (what its process runs, whether it runs in the bench venv)."""

RAW = "paho-async"
LABELS = {
    AMGI_RUN: "amgi run (mqtt server, defaults, app acking all)",
    "amgi-inprocess": "amgi Runtime in-process (lifespan off, no logging)",
    "paho-async": "raw paho-mqtt 2, asyncio-driven, manual ack",
    "paho-thread": "raw paho-mqtt 2, loop_start thread, manual ack",
    "gmqtt": "raw gmqtt, ack when the async callback returns",
    "aiomqtt": "raw aiomqtt (acks on receipt: not at-least-once)",
    "faststream": "FastStream MQTT subscriber (zmqtt), ack after handler",
}


def run_child(name: str, port: int, topic: str, client_id: str) -> None:
    fn, _ = CONTENDERS[name]
    assert fn is not None
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the driver is done with it
    result = fn(port, topic, client_id)
    if inspect.iscoroutine(result):
        asyncio.run(result)


# -- the driver ---------------------------------------------------------------------------------


def ensure_bench_venv() -> Path:
    python = BENCH_VENV / "bin" / "python"
    marker = BENCH_VENV / ".amgi-bench-mqtt"
    if not marker.exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *BENCH_PACKAGES], check=True)
        marker.write_text("ok\n")
    return python


def forget_session(port: int, client_id: str) -> None:
    """Discard the broker's session of ``client_id`` (and what it still holds)."""
    connected = threading.Event()
    client = _paho(client_id)
    client.on_connect = lambda *a: connected.set()
    client.connect(HOST, port, clean_start=True)  # no expiry property: gone on disconnect
    client.loop_start()
    connected.wait(10)
    client.disconnect()
    client.loop_stop()


def _command(
    name: str, peer_python: Path | None, port: int, topic: str, client_id: str
) -> list[str]:
    if name == AMGI_RUN:
        amgi = str(Path(sys.executable).with_name("amgi"))
        where = ["--host", HOST, "--port", str(port), "--client-id", client_id]
        return [amgi, "run", "bench_mqtt:app", topic, "--server", "mqtt", *where]
    python = peer_python if CONTENDERS[name][1] else Path(sys.executable)
    assert python is not None
    argv = [str(python), __file__, "--child", name, "--port", str(port), "--topic", topic]
    return [*argv, "--client-id", client_id]


def _environment(name: str, n: int, first: Path, done: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(BENCH_N=str(n), BENCH_FIRST=str(first), BENCH_DONE=str(done))
    if not CONTENDERS[name][1]:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])
    return env


def _read_stamp(path: Path) -> tuple[float, float]:
    wall, cpu = path.read_text().split()
    return float(wall), float(cpu)


def measure(
    name: str, peer_python: Path | None, port: int, n: int, timeout: float, tmp: Path
) -> dict[str, float] | str:
    """Queue ``n`` messages for a fresh session and time contender ``name`` draining them;
    the reason instead when it did not (``"stalled"`` when it ran out of time)."""
    topic = f"bench/{uuid.uuid4().hex}"
    client_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    prime(port, topic, client_id, n)
    first_file, done_file, log = (tmp / f"{client_id}.{x}" for x in ("first", "done", "log"))
    cmd = _command(name, peer_python, port, topic, client_id)
    env = _environment(name, n, first_file, done_file)
    cwd = "/" if CONTENDERS[name][1] else str(ROOT)
    try:
        with log.open("w") as out:
            started = time.time()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            deadline = time.monotonic() + timeout
            try:
                while not done_file.exists() and proc.poll() is None:
                    if time.monotonic() > deadline:
                        return "stalled"
                    time.sleep(WATCH_EVERY)
            finally:
                stop(proc)
        if not done_file.exists():
            return f"exited with {proc.returncode}:\n{log.read_text()[-1500:]}"
    finally:
        forget_session(port, client_id)
        if name.startswith("amgi"):  # and the session our server keeps dead letters in
            from amgi.servers.mqtt import MqttOptions
            from amgi.servers.mqtt._dead_letters import dead_letter_client_id

            forget_session(port, dead_letter_client_id(MqttOptions().dead_letter_prefix, topic))
    first_wall, first_cpu = _read_stamp(first_file)
    done_wall, done_cpu = _read_stamp(done_file)
    return {
        "n": n,
        "first": first_wall - started,
        "rate": (n - 1) / (done_wall - first_wall),
        "cpu": (done_cpu - first_cpu) / (n - 1),
    }


def _span(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def report(
    results: dict[str, list[dict[str, float]]],
    failures: dict[str, str],
    n: int,
    rounds: int,
    port: int,
    loads: list[float],
) -> None:
    medians = {k: statistics.median(r["rate"] for r in rs) for k, rs in results.items() if rs}
    raw = medians.get(RAW)
    print(
        f"\nDrain of {n:,} QoS 1 messages (100 B, 2 user properties) queued for a persistent"
        f" session, Mosquitto on {HOST}:{port}; contenders alternating, rounds: {rounds}"
    )
    print(f"load average (1 min) during the runs: {_span(loads, '.1f')}\n")
    print(
        f"| {'contender':<55} | {'backlog':>7} | {'msgs/s median':>13} | {'min-max':>15} |"
        f" {'max/min':>7} | {'first msg':>9} | {'vs raw paho':>11} | {'CPU µs/msg':>10} |"
        f" {'runs':>4} |"
    )
    numeric = "|".join("-" * (w - 1) + ":" for w in (9, 15, 17, 9, 11, 13, 12, 6))
    print(f"|{'-' * 57}|{numeric}|")
    for name, rs in results.items():
        if not rs:
            why = failures.get(name, "no result").splitlines()[0]
            print(f"| {LABELS[name]:<55} | {'-':>7} | {why:>13} |" + " - |" * 6)
            continue
        rates = [r["rate"] for r in rs]
        backlog = f"{int(rs[0]['n']):,}" + ("*" if rs[0]["n"] != n else "")
        first = statistics.median(r["first"] for r in rs) * 1000
        ratio = f"{medians[name] / raw:.2f}x" if raw else "-"
        cpu = statistics.median(r["cpu"] for r in rs) * 1e6
        print(
            f"| {LABELS[name]:<55} | {backlog:>7} | {medians[name]:>13,.0f} |"
            f" {_span(rates, ',.0f'):>15} | {max(rates) / min(rates):>7.2f} |"
            f" {first:>7.0f}ms | {ratio:>11} | {cpu:>10.1f} | {len(rs):>4} |"
        )
    if any(r["n"] != n for rs in results.values() for r in rs):
        print(
            f"\n* stalled on {n:,} (no progress within --child-timeout), measured on {FALLBACK_N:,}"
        )
    print("\nfirst msg: median time from process start to the first handled message")
    print("\nmsgs/s per round:")
    for name, rs in results.items():
        print(f"  {name:<16}" + "".join(f"{r['rate']:>10,.0f}" for r in rs))
    for name, why in failures.items():
        print(f"\n{name}: {why}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="messages queued per run")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--rounds", type=int, default=3, help="runs per contender, alternating")
    parser.add_argument("--only", default="", help="comma-separated contenders")
    parser.add_argument(
        "--child-timeout", type=float, default=60, help="seconds before a run counts as stalled"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.port, args.topic, args.client_id)
        return

    names = [x for x in args.only.split(",") if x] or list(CONTENDERS)
    unknown = [x for x in names if x not in CONTENDERS]
    if unknown:
        parser.error(
            f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}"
        )
    if args.n < 2:
        parser.error("--n must be at least 2")
    peer_python = ensure_bench_venv() if any(CONTENDERS[x][1] for x in names) else None
    # pip compiles an installed package's modules; a source tree started with
    # PYTHONDONTWRITEBYTECODE set would compile them at each start instead.
    compileall.compile_dir(str(ROOT / "src" / "amgi"), quiet=1)
    compileall.compile_file(__file__, quiet=1)
    results: dict[str, list[dict[str, float]]] = {x: [] for x in names}
    failures: dict[str, str] = {}
    stalled: set[str] = set()
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                if name in failures:
                    continue
                n = FALLBACK_N if name in stalled else args.n
                result = measure(name, peer_python, args.port, n, args.child_timeout, Path(tmp))
                if result == "stalled" and n != FALLBACK_N:
                    print(f"  {name}: stalled on {n:,}; measuring it on {FALLBACK_N:,}", flush=True)
                    stalled.add(name)
                    n = FALLBACK_N
                    result = measure(name, peer_python, args.port, n, args.child_timeout, Path(tmp))
                if isinstance(result, str):
                    failures[name] = result
                    print(f"  {name}: {result.splitlines()[0]}", flush=True)
                    continue
                results[name].append(result)
                print(
                    f"  round {round_ + 1} {name}: {result['rate']:,.0f} msgs/s on {n:,},"
                    f" first message {result['first']:.3f} s,"
                    f" CPU {result['cpu'] * 1e6:.1f} µs/msg",
                    flush=True,
                )
                loads.append(os.getloadavg()[0])
    report(results, failures, args.n, args.rounds, args.port, loads)


if __name__ == "__main__":
    main()
