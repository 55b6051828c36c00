"""Drain benchmark of the MQTT server against the raw client loop and FastStream.

For each contender: create a persistent session (MQTT 5, QoS 1 subscription), publish N
QoS 1 messages of 100 bytes with 2 user properties while the consumer is offline, then
start the consumer and time the first message and the whole drain. Every contender
acknowledges a message only after handling it, except where the table says otherwise.

    .venv/bin/python bench/bench_mqtt.py [--n 20000] [--port 1883] [--rounds 2]

Run ``scripts/brokers/mosquitto.sh`` first. Peers (FastStream, gmqtt, aiomqtt) run in a
subprocess of a separate virtual environment, ``.venv-bench``, which this script creates
and fills on first use (the upstream packages could clash with this project's ``amgi``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
BENCH_PACKAGES = ["faststream[mqtt]", "gmqtt", "aiomqtt", "paho-mqtt>=2.1"]
HOST = "127.0.0.1"
PAYLOAD = b"x" * 100
USER_PROPERTIES = [("trace", "abc123"), ("kind", "bench")]


# -- shared by both interpreters (keep to the standard library and paho) ----------------------


def report(first: float, total: float, count: int) -> None:
    print(json.dumps({"first": first, "total": total, "count": count}), flush=True)


# -- peers, run in the bench venv --------------------------------------------------------------


async def peer_faststream(port: int, topic: str, client_id: str, n: int) -> None:
    from faststream.mqtt import MQTTBroker, QoS

    broker = MQTTBroker(
        f"mqtt://{HOST}:{port}",
        client_id=client_id,
        clean_session=False,
        session_expiry_interval=3600,
        # The backlog arrives before the subscriber is registered; let zmqtt hold it all.
        session_replay_buffer_size=n + 1000,
        keepalive=600,
        logger=None,
    )
    done = asyncio.Event()
    state = {"count": 0, "first": 0.0}

    @broker.subscriber(topic, qos=QoS.AT_LEAST_ONCE)
    async def handle(body: bytes) -> None:
        if not state["count"]:
            state["first"] = time.perf_counter()
        state["count"] += 1
        if state["count"] >= n:
            done.set()

    start = time.perf_counter()
    await broker.start()
    await asyncio.wait_for(done.wait(), 600)
    end = time.perf_counter()
    await broker.stop()
    report(state["first"] - start, end - start, int(state["count"]))


async def peer_gmqtt(port: int, topic: str, client_id: str, n: int) -> None:
    import gmqtt

    done = asyncio.Event()
    state = {"count": 0, "first": 0.0}

    async def on_message(client: Any, t: str, payload: bytes, qos: int, props: Any) -> int:
        if not state["count"]:
            state["first"] = time.perf_counter()
        state["count"] += 1
        if state["count"] >= n:
            done.set()
        return 0  # PUBACK is sent when this coroutine returns

    client = gmqtt.Client(
        client_id,
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=3600,
    )
    client.on_message = on_message
    start = time.perf_counter()
    await client.connect(HOST, port)
    await asyncio.wait_for(done.wait(), 600)
    end = time.perf_counter()
    await client.disconnect()
    report(state["first"] - start, end - start, int(state["count"]))


async def peer_aiomqtt(port: int, topic: str, client_id: str, n: int) -> None:
    import aiomqtt
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    count = 0
    first = 0.0
    start = time.perf_counter()
    async with aiomqtt.Client(
        HOST,
        port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=props,
    ) as client:
        async for _ in client.messages:
            if not count:
                first = time.perf_counter()
            count += 1
            if count >= n:
                break
        end = time.perf_counter()
    del paho
    report(first - start, end - start, count)


PEERS = {"faststream": peer_faststream, "gmqtt": peer_gmqtt, "aiomqtt": peer_aiomqtt}


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


# -- contenders in this interpreter --------------------------------------------------------------


async def run_amgi(port: int, topic: str, client_id: str, n: int) -> dict[str, float]:
    from amgi.runtime import Runtime, RuntimeConfig
    from amgi.servers.mqtt import MqttOptions, MqttTransport

    state = {"count": 0, "first": 0.0}
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        more = True
        while more:
            event = await receive()
            if not state["count"]:
                state["first"] = time.perf_counter()
            state["count"] += 1
            await send({"type": "message.ack", "id": event["id"]})
            more = event.get("more_messages", False)
        if state["count"] >= n:
            done.set()

    transport = MqttTransport([topic], MqttOptions(port=port, client_id=client_id))
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off"))
    start = time.perf_counter()
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(done.wait(), 600)
    end = time.perf_counter()
    runtime.request_stop()
    await task
    return {"first": state["first"] - start, "total": end - start, "count": state["count"]}


def _acking_paho_handler(
    state: dict[str, Any], n: int, finished: Callable[[], None]
) -> Callable[[Any, Any, Any], None]:
    """A paho on_message that acks after handling, counts, and calls ``finished`` at ``n``."""

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if not state["count"]:
            state["first"] = time.perf_counter()
        state["count"] += 1
        client.ack(msg.mid, msg.qos)
        if state["count"] >= n:
            finished()

    return on_message


async def run_paho_async(port: int, topic: str, client_id: str, n: int) -> dict[str, float]:
    """paho driven by the asyncio loop (as the server does); ack after handling."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    state = {"count": 0, "first": 0.0}

    on_message = _acking_paho_handler(state, n, done.set)

    client = _paho(client_id)
    client.manual_ack_set(True)
    client.on_message = on_message
    client.on_socket_open = lambda c, u, s: loop.add_reader(s, c.loop_read)
    client.on_socket_close = lambda c, u, s: loop.remove_reader(s)
    client.on_socket_register_write = lambda c, u, s: loop.add_writer(s, c.loop_write)
    client.on_socket_unregister_write = lambda c, u, s: loop.remove_writer(s)
    start = time.perf_counter()
    client.connect(HOST, port, clean_start=False, properties=_session_props())
    await asyncio.wait_for(done.wait(), 600)
    end = time.perf_counter()
    client.disconnect()
    client.loop_write()
    return {"first": state["first"] - start, "total": end - start, "count": state["count"]}


def run_paho_thread(port: int, topic: str, client_id: str, n: int) -> dict[str, float]:
    """paho with its network thread (loop_start); ack after handling."""
    done = threading.Event()
    state = {"count": 0, "first": 0.0}

    on_message = _acking_paho_handler(state, n, done.set)

    client = _paho(client_id)
    client.manual_ack_set(True)
    client.on_message = on_message
    start = time.perf_counter()
    client.connect(HOST, port, clean_start=False, properties=_session_props())
    client.loop_start()
    done.wait(600)
    end = time.perf_counter()
    client.disconnect()
    client.loop_stop()
    return {"first": state["first"] - start, "total": end - start, "count": state["count"]}


# -- driver ----------------------------------------------------------------------------------------


def ensure_bench_venv() -> Path:
    python = BENCH_VENV / "bin" / "python"
    marker = BENCH_VENV / ".amgi-bench-mqtt"
    if not marker.exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *BENCH_PACKAGES], check=True)
        marker.write_text("ok\n")
    return python


def run_peer(
    python: Path, name: str, port: int, topic: str, client_id: str, n: int
) -> dict[str, Any] | None:
    """Run peer ``name`` in the bench venv; ``None`` when it made no progress in time."""
    argv = [str(python), __file__, "--peer", name, "--port", str(port), "--topic", topic]
    argv += ["--client-id", client_id, "--n", str(n)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=PEER_TIMEOUT, env=env, cwd="/"
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


PEER_TIMEOUT = 60.0
FALLBACK_N = 1000
"""FastStream's MQTT subscriber stalls (no CPU, no progress) when it resumes a session with a
backlog of 2,000 or more messages; it is then measured on a backlog it can drain."""

LABELS = {
    "amgi": "amgi mqtt server (Runtime, raw app acking all)",
    "paho-async": "raw paho-mqtt 2, asyncio-driven, manual ack",
    "paho-thread": "raw paho-mqtt 2, loop_start thread, manual ack",
    "faststream": "FastStream MQTT subscriber (zmqtt), ack after handler",
    "gmqtt": "raw gmqtt, ack when the async callback returns",
    "aiomqtt": "raw aiomqtt (acks on receipt: not at-least-once)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--only", default="", help="comma-separated contenders")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        asyncio.run(PEERS[args.peer](args.port, args.topic, args.client_id, args.n))
        return

    python = ensure_bench_venv()
    names = [x for x in args.only.split(",") if x] or list(LABELS)
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for name in names:
            result = measure(python, name, args.port, args.n)
            if result is None:
                print(
                    f"  {name}: stalled on {args.n:,}; retrying on {FALLBACK_N:,}", file=sys.stderr
                )
                result = measure(python, name, args.port, FALLBACK_N)
                if result is None:
                    continue
            if result["count"] < result["n"]:
                raise SystemExit(f"bench: {name} handled {result['count']} of {result['n']}")
            result["rate"] = result["n"] / result["total"]
            if name not in best or result["rate"] > best[name]["rate"]:
                best[name] = result
            print(f"  {name}: {result['rate']:,.0f} msgs/s", file=sys.stderr)

    raw = best.get("paho-async")
    print(
        f"\nDrain of {args.n:,} QoS 1 messages (100 B, 2 user properties) queued for a "
        f"persistent session, Mosquitto on {HOST}:{args.port}, best of {args.rounds}\n"
    )
    head = ("contender", "backlog", "msgs/s", "first msg", "vs raw paho")
    print(f"| {head[0]:<56} | {head[1]:>7} | {head[2]:>9} | {head[3]:>9} | {head[4]:>11} |")
    print(f"|{'-' * 58}|{'-' * 9}|{'-' * 11}|{'-' * 11}|{'-' * 13}|")
    for name in names:
        r = best.get(name)
        if r is None:
            print(f"| {LABELS[name]:<56} | {'-':>7} | {'stalled':>9} | {'-':>9} | {'-':>11} |")
            continue
        ratio = f"{r['rate'] / raw['rate']:.2f}x" if raw else "-"
        print(
            f"| {LABELS[name]:<56} | {r['n']:>7,} | {r['rate']:>9,.0f} | "
            f"{r['first'] * 1000:>7.1f}ms | {ratio:>11} |"
        )


def measure(python: Path, name: str, port: int, n: int) -> dict[str, Any] | None:
    """Queue ``n`` messages for a fresh session and time contender ``name`` draining them."""
    topic = f"bench/{uuid.uuid4().hex}"
    client_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    prime(port, topic, client_id, n)
    result: dict[str, Any] | None
    if name == "amgi":
        result = asyncio.run(run_amgi(port, topic, client_id, n))
    elif name == "paho-async":
        result = asyncio.run(run_paho_async(port, topic, client_id, n))
    elif name == "paho-thread":
        result = run_paho_thread(port, topic, client_id, n)
    else:
        result = run_peer(python, name, port, topic, client_id, n)
    if result is not None:
        result["n"] = n
    return result


if __name__ == "__main__":
    main()
