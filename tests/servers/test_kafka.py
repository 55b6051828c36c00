"""The Kafka server against the real test broker, driven through the runtime."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.kafka import KafkaOptions, KafkaSendError, KafkaTransport
from amgi.servers.kafka._client import _BatchContext
from amgi.servers.kafka.records import message_from_record, messages_from_records
from amgi.servers.kit import DEAD_LETTER_REASON_HEADER
from tests.cli import amgi as amgi_cli
from tests.net import free_port
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    App,
    committed,
    create_topic,
    end_offsets,
    ensure_broker,
    fresh,
    options,
    produce,
    read_all,
    run_until,
    transport,
    wait_committed,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


def test_message_from_record_maps_key_headers_and_attempt() -> None:
    m = message_from_record(
        "t", 2, 41, 1700, b"k", b"v", [("a", b"1"), ("amgi-attempt", b"3"), (b"b", None)]
    )
    assert (m.id, m.token, m.payload, m.attempt) == ("t/2/41", 41, b"v", 3)
    assert m.headers == [(b"a", b"1"), (b"b", b"")]
    assert m.bindings == {"kafka": {"key": b"k", "partition": 2, "offset": 41, "timestamp": 1700}}


async def test_batches_per_partition_in_order_and_committed() -> None:
    topic = create_topic(fresh("orders"), partitions=3)
    n = 90
    produce(topic, ((b"k%d" % (i % 6), b"%d" % i, [("h", b"%d" % i)]) for i in range(n)))
    seen: list[tuple[int, int, bytes]] = []
    batch_sizes: list[int] = []
    addresses: set[str] = set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        addresses.add(scope["address"])
        count = 0
        while True:
            event = await receive()
            k = event["bindings"]["kafka"]
            assert event["headers"] == [(b"h", event["payload"])]
            assert k["key"].startswith(b"k")
            assert k["timestamp"] > 0
            assert event["bindings"]["amgi"]["attempt"] == 1
            seen.append((k["partition"], k["offset"], event["payload"]))
            await send({"type": "message.ack", "id": event["id"]})
            count += 1
            if not event.get("more_messages"):
                break
        batch_sizes.append(count)

    kafka = transport([topic])
    await run_until(app, kafka, lambda: len(seen) >= n)
    assert addresses == {topic}
    assert sorted(int(p) for _, _, p in seen) == list(range(n))  # each exactly once
    by_partition = collections.defaultdict(list)
    for partition, offset, _ in seen:
        by_partition[partition].append(offset)
    assert len(by_partition) == 3
    for offsets in by_partition.values():
        assert offsets == sorted(offsets) == list(range(len(offsets)))
    # Batches, not one call per message, and one commit at the end of every partition.
    assert len(batch_sizes) < n
    assert committed(kafka.config.group_id, topic) == end_offsets(topic) == {0: 30, 1: 30, 2: 30}


async def test_nack_is_retried_with_attempts_then_dead_lettered() -> None:
    topic = create_topic(fresh("pay"), partitions=2)
    produce(
        topic, [(b"a", b"good-1", []), (b"a", b"bad", [("trace", b"t1")]), (b"a", b"good-2", [])]
    )
    attempts: list[int] = []
    good: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["address"] == topic
        more = True
        while more:
            event = await receive()
            more = event.get("more_messages", False)
            if event["payload"] == b"bad":
                attempts.append(event["bindings"]["amgi"]["attempt"])
                assert event["headers"] == [(b"trace", b"t1")]
                await send({"type": "message.nack", "id": event["id"], "message": "no funds"})
            else:
                good.append(event["payload"])
                await send({"type": "message.ack", "id": event["id"]})

    kafka = transport([topic])
    await run_until(
        app, kafka, lambda: len(attempts) >= 3, max_attempts=3, retry_delay=0.2, retry_delay_max=1
    )
    assert attempts == [1, 2, 3]
    assert sorted(good) == [b"good-1", b"good-2"]
    dead = read_all(f"{topic}.dlq", 1)
    assert len(dead) == 1
    assert dead[0].value() == b"bad"
    assert dead[0].key() == b"a"
    headers = dict(dead[0].headers())
    assert headers[DEAD_LETTER_REASON_HEADER.decode()] == b"no funds"
    assert headers["trace"] == b"t1"
    # Nothing left behind: source and retry topics are committed to their ends.
    wait_committed(kafka.config.group_id, topic)
    wait_committed(kafka.config.group_id, f"{topic}.retry")


async def test_unsettled_is_never_committed_past() -> None:
    topic = create_topic(fresh("gap"), partitions=1)
    produce(topic, [(None, b"%d" % i, []) for i in range(10)])
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        more = True
        while more:
            event = await receive()
            more = event.get("more_messages", False)
            if event["payload"] != b"4":
                await send({"type": "message.ack", "id": event["id"]})
        # offset 4 is left unsettled: nacked by the runtime and retried via the retry topic

    kafka = transport([topic])
    retry = f"{topic}.retry"
    await run_until(app, kafka, lambda: calls >= 2, max_attempts=2, retry_delay=0.1)
    wait_committed(kafka.config.group_id, topic)
    assert len(read_all(retry, 1)) == 1


async def test_send_with_key_partition_and_headers() -> None:
    source = create_topic(fresh("in"), partitions=1)
    target = create_topic(fresh("out"), partitions=3)
    produce(source, [(None, b"go", [])])
    sent = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        await send(
            {
                "type": "message.send",
                "address": target,
                "headers": [(b"x", b"1")],
                "payload": b"hello",
                "bindings": {"kafka": {"key": "user-1", "partition": 2}, "amqp": {"x": 1}},
            }
        )
        await send({"type": "message.ack", "id": event["id"]})
        sent.set()

    await run_until(app, transport([source]), sent.is_set)
    [record] = read_all(target, 1)
    assert (record.partition(), record.key(), record.value()) == (2, b"user-1", b"hello")
    assert record.headers() == [("x", b"1")]


async def test_send_failure_raises_kafka_send_error() -> None:
    kafka = transport([], delivery_timeout_ms=2000)
    await kafka.connect()
    try:
        topic = create_topic(fresh("one"), partitions=1)
        for bad in ("two", True, 1.0, -1, 2**31):
            with pytest.raises(
                KafkaSendError,
                match=f"cannot send to {topic!r}: kafka.partition must be a whole number "
                f"from 0 to 2147483647, not {bad!r}",
            ):
                await kafka.publish(topic, [], b"x", {"kafka": {"partition": bad}})
        with pytest.raises(KafkaSendError, match=r"kafka\.key must be bytes or str, not int"):
            await kafka.publish(topic, [], b"x", {"kafka": {"key": 7}})
        with pytest.raises(KafkaSendError, match=f"{topic!r}: .*Unknown partition$") as info:
            await kafka.publish(topic, [], b"x", {"kafka": {"partition": 7}})
        assert isinstance(info.value, OSError)
        await kafka.publish(topic, [], b"good", {"kafka": {"partition": 0, "key": "k"}})
        [record] = read_all(topic, 1)
        assert (record.key(), record.value()) == (b"k", b"good")
    finally:
        await kafka.close()


async def test_unreachable_broker_is_one_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    kafka = transport(["t"], bootstrap_servers="127.0.0.1:1", connect_timeout=1.0)
    with pytest.raises(BrokerUnavailable, match=r"cannot reach Kafka at 127\.0\.0\.1:1"):
        await kafka.connect()
    await kafka.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def _client_thread_ids() -> set[str]:
    """librdkafka's threads in this process (each client runs a few)."""
    found = set()
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            if comm.read_text().startswith("rdk:"):
                found.add(comm.parent.name)
        except OSError:  # the thread ended meanwhile
            continue
    return found


def _client_threads() -> int:
    return len(_client_thread_ids())


async def test_unknown_topic_is_a_configuration_error() -> None:
    before = _client_threads()
    missing = fresh("missing")
    kafka = transport([missing])
    with pytest.raises(ConfigurationError, match=f"{missing}.*does not exist") as info:
        await kafka.connect()
    await kafka.close()
    # The consumer made before the metadata check is closed with the producer: no
    # client thread is left behind.
    deadline = time.monotonic() + 10
    while _client_threads() > before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _client_threads() <= before
    assert info.value.__traceback__ is not None  # kept alive, with connect's locals


@pytest.mark.parametrize("refused", ["sasl", "unreachable"])
async def test_failed_connect_leaves_no_client_running(
    refused: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connect that fails (refused SASL credentials, no broker) closes every client it
    made by itself: no thread of ours or of the client library is left, and nothing is
    logged afterwards (a client left running reconnects and logs every attempt)."""
    caplog.set_level(logging.DEBUG, logger="amgi")
    before = _client_thread_ids()
    chatty = ["debug=broker", "reconnect.backoff.ms=50", "reconnect.backoff.max.ms=100"]
    if refused == "sasl":  # the test broker refuses the SASL handshake
        kafka = transport(
            [fresh("sasl")],
            security_protocol="sasl_plaintext",
            sasl_mechanism="PLAIN",
            sasl_username="amgi",
            sasl_password="wrong",
            connect_timeout=5.0,
            config=chatty,
        )
    else:
        kafka = transport(
            [], bootstrap_servers=f"127.0.0.1:{free_port()}", connect_timeout=1.0, config=chatty
        )
    with pytest.raises(BrokerUnavailable) as info:
        await kafka.connect()
    # kept: its traceback holds connect's locals, the clients among them
    assert info.value.__traceback__ is not None
    logged = len(caplog.records)
    assert logged > 0  # the client's own lines do reach logging
    assert [t.name for t in threading.enumerate() if t.name.startswith("amgi-kafka")] == []
    # librdkafka's threads end as its clients are destroyed, on a loaded machine a moment
    # after connect raised: they must all be gone within seconds
    deadline = time.monotonic() + 10
    while _client_thread_ids() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _client_thread_ids() - before == set()
    logged = len(caplog.records)
    await asyncio.sleep(1.0)  # ten reconnect attempts of a client left running
    assert [r.getMessage() for r in caplog.records[logged:]] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"auto_offset_reset": "sideways"}, "--auto-offset-reset"),
        ({"config": ["no-equals-sign"]}, "NAME=VALUE"),
        ({"config": ["no.such.setting=1"]}, "invalid Kafka producer option"),
        ({"compression_type": "rar"}, "invalid Kafka producer option"),
        ({"dead_letter_topic": "dead"}, "must contain"),
        # The client takes at most 1M records per consume: every fetch failed, for ever.
        ({"max_batch_size": 1_000_001}, "--max-batch-size must be 1 to 1000000"),
        ({"commit_interval_ms": -1}, "--commit-interval-ms must be 0 to 60000"),
    ],
)
async def test_bad_option_is_a_configuration_error(overrides: dict[str, Any], message: str) -> None:
    kafka = transport(["t"], **overrides)
    with pytest.raises(ConfigurationError, match=message):
        await kafka.connect()
    await kafka.close()


def test_cli_send_produces_with_headers_and_key() -> None:
    topic = create_topic(fresh("cli"), partitions=2)
    out = amgi_cli(
        "send", topic, '{"id": 1}', "--server", "kafka", "--bootstrap-servers", BOOTSTRAP,
        "--header", "trace=t-9", "--binding", 'kafka.key="order-1"',
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    [record] = read_all(topic, 1)
    assert (record.value(), record.key()) == (b'{"id": 1}', b"order-1")
    assert record.headers() == [("trace", b"t-9")]


def test_config_settings_keep_their_commas() -> None:
    """Each ``--config`` (each line of ``AMGI_CONFIG``) is one setting, split at its first
    ``=`` only: a librdkafka list or a password with commas arrives whole."""
    from amgi.cli import _SERVER_PREFIX, _parser
    from amgi.ops.env import apply_environment
    from amgi.options import build

    def options(args: Any) -> KafkaOptions:
        built: KafkaOptions = build(KafkaOptions, vars(args), dest_prefix=_SERVER_PREFIX)
        return built

    parser, _ = _parser("kafka")
    argv = ["send", "t", "x", "--server", "kafka", "--config", "sasl.password=p,w=x "]
    argv += ["--config", "debug=broker,topic"]
    given = options(parser.parse_args(argv))
    assert given.config == ["sasl.password=p,w=x ", "debug=broker,topic"]
    conf = KafkaTransport([], given)._common_config()
    assert (conf["sasl.password"], conf["debug"]) == ("p,w=x ", "broker,topic")
    env = {"AMGI_CONFIG": "sasl.password=p,w\ndebug=broker,topic\n"}
    from_env = parser.parse_args(apply_environment(parser, argv[:5], env))
    assert options(from_env).config == ["sasl.password=p,w", "debug=broker,topic"]
    flag_wins = parser.parse_args(apply_environment(parser, argv, env))
    assert options(flag_wins).config == given.config


@pytest.mark.parametrize("given_by", ["flags", "environment"])
def test_cli_config_value_with_commas_reaches_the_client(given_by: str) -> None:
    """A librdkafka list setting (``debug``) and a value with a comma (``client.id``) given
    to ``amgi send`` reach the client whole: it logs them back and the record is sent."""
    topic = create_topic(fresh("cli-config"), partitions=1)
    argv = ["send", topic, "x", "--server", "kafka", "--bootstrap-servers", BOOTSTRAP]
    argv += ["--log-level", "debug"]
    settings = ["debug=broker,conf", f"client.id=amgi,{given_by}"]
    if given_by == "flags":
        out = amgi_cli(*argv, "--config", settings[0], "--config", settings[1])
    else:
        out = amgi_cli(*argv, env={"AMGI_CONFIG": "\n".join(settings)})
    assert out.returncode == 0, out.stderr
    assert f"client.id = amgi,{given_by}" in out.stderr
    [record] = read_all(topic, 1)
    assert record.value() == b"x"


def test_cli_run_against_unreachable_broker_is_one_clear_line() -> None:
    out = amgi_cli(
        "run", "tests.servers.kafka_app:app", "orders", "--server", "kafka",
        "--bootstrap-servers", "127.0.0.1:1", "--connect-timeout", "1",
    )  # fmt: skip
    assert out.returncode != 0
    assert "cannot reach Kafka at 127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr


async def test_topic_pattern_address_consumes_matching_topics() -> None:
    stem = fresh("pat")
    first = create_topic(f"{stem}-a", partitions=1)
    second = create_topic(f"{stem}-b", partitions=1)
    produce(first, [(None, b"a", [])])
    produce(second, [(None, b"b", [])])
    seen: dict[str, bytes] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        seen[scope["address"]] = event["payload"]
        await send({"type": "message.ack", "id": event["id"]})

    await run_until(app, transport([f"^{stem}-.*"]), lambda: len(seen) >= 2)
    assert seen == {first: b"a", second: b"b"}


class _FakeRecord:
    """The accessors of a confluent-kafka record."""

    def __init__(self, offset: int, headers: Any, key: bytes | None, value: bytes | None) -> None:
        self._offset, self._headers, self._key, self._value = offset, headers, key, value

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset)

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> Any:
        return self._headers


def test_the_consumer_loop_maps_records_like_message_from_record() -> None:
    records = [
        _FakeRecord(7, [("trace", b"t1"), ("dup", None), ("dup", b"2")], b"k", b"v"),
        _FakeRecord(8, None, None, None),
        _FakeRecord(9, [("amgi-attempt", b"3"), ("x", b"y")], b"k2", b"\x00"),
        _FakeRecord(10, [("x", b"z")], b"k3", b"w"),
    ]
    fast = messages_from_records("t", 2, records)
    slow = [
        message_from_record("t", 2, r.offset(), r.timestamp()[1], r.key(), r.value(), r.headers())
        for r in records
    ]
    assert [(m.id, m.headers, m.payload, m.bindings, m.attempt, m.token) for m in fast] == [
        (m.id, m.headers, m.payload, m.bindings, m.attempt, m.token) for m in slow
    ]
    assert fast[2].attempt == 3
    assert fast[2].headers == [(b"x", b"y")]


def test_repeated_header_values_share_one_pair_and_new_values_get_their_own() -> None:
    values = [b"json", b"json", b"json", b"xml", None, b"json"]
    records = [
        _FakeRecord(i, [("ctype", v), ("n", b"%d" % i)], None, b"") for i, v in enumerate(values)
    ]
    fast = messages_from_records("t", 0, records)
    expected = [[(b"ctype", v or b""), (b"n", b"%d" % i)] for i, v in enumerate(values)]
    assert [m.headers for m in fast] == expected
    assert fast[1].headers[0] is fast[2].headers[0]  # the same value again: one tuple
    single = message_from_record("t", 0, 9, None, None, b"", [("ctype", b"json")])
    assert single.headers == [(b"ctype", b"json")]


@pytest.mark.parametrize(
    ("addresses", "overrides", "message"),
    [
        (["^orders-("], {}, r"'\^orders-\(' is not a valid topic pattern: missing \)"),
        (["t"], {"topics": ["^[a-"]}, r"'\^\[a-' is not a valid topic pattern"),
        (["^orders-.*"], {"retry_topic": "retry:{topic}"}, "--retry-topic .* a-z A-Z 0-9"),
        (["^orders-.*"], {"dead_letter_topic": "{topic} dlq"}, "--dead-letter-topic .* a-z"),
        (["t"], {"dead_letter_topic": "{topic}"}, "--dead-letter-topic must name another topic"),
        (["t"], {"retry_topic": "{topic}"}, "--retry-topic must name another topic"),
        (
            ["t"],
            {"retry_topic": "{topic}.x", "dead_letter_topic": "{topic}.x"},
            "--dead-letter-topic must differ from --retry-topic",
        ),
        (["t"], {"session_timeout_ms": 1000, "heartbeat_interval_ms": 1000}, "lower than"),
    ],
)
async def test_bad_address_or_topic_template_is_refused_before_connecting(
    addresses: list[str], overrides: dict[str, Any], message: str
) -> None:
    """Refused by ``check`` (before the lifespan), not left to fail later: a bad pattern
    raised the regex module's bare error; a retry or dead-letter template a pattern's
    topics cannot take dead-lettered each nack at once (its retry copy refused) or kept
    it for ever; a template equal to ``{topic}`` or to the other paused the topic or
    its retries for good; a heartbeat not under the session timeout lost the group again
    and again and consumed nothing."""
    kafka = KafkaTransport(addresses, KafkaOptions(**options(**overrides)))
    with pytest.raises(ConfigurationError, match=message):
        kafka.check()
    with pytest.raises(ConfigurationError, match=message):
        await kafka.connect()
    await kafka.close()


@pytest.mark.parametrize("group", ["", " "])
def test_cli_run_with_a_blank_group_id_is_one_clear_line(group: str) -> None:
    """The client library aborted the whole process (an assertion in its C code, exit
    134, no message) on a consumer group id that is empty or blank."""
    out = amgi_cli(
        "run", "tests.servers.kafka_app:app", "orders", "--server", "kafka",
        "--bootstrap-servers", BOOTSTRAP, "--group-id", group,
    )  # fmt: skip
    assert out.returncode == 2, out  # a bad option, as argparse reports one
    assert "--group-id is empty" in out.stderr
    assert "Traceback" not in out.stderr


async def test_cooperative_rebalancing_consumes_and_hands_partitions_over() -> None:
    """With librdkafka's cooperative assignor partitions come and go incrementally: the
    assign callback's full ``assign()`` was refused ('must be made using
    incremental_assign()'), which killed the consumer thread: nothing was consumed and
    the stop waited 30 s for a transport that never closed."""
    topic = create_topic(fresh("coop"), partitions=2)
    produce(topic, [(b"k%d" % i, b"a%d" % i, []) for i in range(20)])
    group = options(config=["partition.assignment.strategy=cooperative-sticky"])
    seen: dict[str, list[bytes]] = {"first": [], "second": []}

    def app_of(name: str) -> App:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            more = True
            while more:
                event = await receive()
                more = event.get("more_messages", False)
                seen[name].append(event["payload"])
                await send({"type": "message.ack", "id": event["id"]})

        return app

    def everything() -> set[bytes]:
        return set(seen["first"]) | set(seen["second"])

    first = KafkaTransport([topic], KafkaOptions(**group))
    runtimes = [Runtime(app_of("first"), first, RuntimeConfig(lifespan="off"))]
    servers = [asyncio.create_task(runtimes[0].serve())]
    try:
        deadline = time.monotonic() + 20
        while len(everything()) < 20:
            assert not servers[0].done(), servers[0].result()
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
        second = KafkaTransport([topic], KafkaOptions(**group))
        runtimes.append(Runtime(app_of("second"), second, RuntimeConfig(lifespan="off")))
        servers.append(asyncio.create_task(runtimes[1].serve()))
        # The second member gets partitions the first gives up, without a full revoke.
        while not any(key[0] == topic for key in second._partitions):
            assert not any(s.done() for s in servers), [s.result() for s in servers if s.done()]
            assert time.monotonic() < deadline, "the second member got no partition"
            await asyncio.sleep(0.02)
        produce(topic, [(b"k%d" % i, b"b%d" % i, []) for i in range(20)])
        while len(everything()) < 40:
            assert not any(s.done() for s in servers), [s.result() for s in servers if s.done()]
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
    finally:
        for runtime in runtimes:
            runtime.request_stop()
        stopped = time.monotonic()
        assert await asyncio.wait_for(asyncio.gather(*servers), 30) == [0] * len(servers)
    assert time.monotonic() - stopped < 10
    assert seen["second"], "the second member consumed nothing"
    assert everything() == {b"%s%d" % (w, i) for w in (b"a", b"b") for i in range(20)}
    # 40 records in all: committed to the end of both partitions (nothing past it).
    assert sum(committed(group["group_id"], topic).values()) == 40


def _busy_app(seen: list[str], after_batch: Callable[[], None] = lambda: None) -> App:
    """An app busy 2 ms per batch (each pass of the loop runs real work, so the next
    records are fetched on the event loop) that acks each message and notes its id."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
        event = {"more_messages": True}
        while event["more_messages"]:
            event = await receive()
            seen.append(event["id"])  # topic/partition/offset
            await send({"type": "message.ack", "id": event["id"]})
        after_batch()

    return app


def _recorded_polls(kafka: KafkaTransport) -> list[tuple[bool, bool, int]]:
    """Record each ``consume`` round: on the event loop?, a batch unsettled then?, batches."""
    calls: list[tuple[bool, bool, int]] = []
    poll = kafka._poll
    loop_thread = threading.get_ident()

    def recorded(wait: bool = True) -> Any:
        on_loop = threading.get_ident() == loop_thread
        unsettled = kafka._unsettled()
        batches = poll(wait)
        calls.append((on_loop, unsettled, len(batches)))
        return batches

    kafka._poll = recorded  # type: ignore[method-assign]
    return calls


async def test_records_on_hand_are_fetched_on_the_event_loop_only_when_all_is_settled() -> None:
    """A busy application's next records are taken on the event loop, between its batches
    (one Python thread: up to twice the throughput on some machines), never while a batch
    is unsettled (a rebalance callback run there could not wait for it)."""
    topic = create_topic(fresh("inline"), partitions=3)
    n = 300
    produce(topic, ((b"k%d" % (i % 6), b"%d" % i, []) for i in range(n)))
    seen: list[str] = []
    app = _busy_app(seen)
    kafka = transport([topic], max_batch_size=10)
    polls = _recorded_polls(kafka)
    await run_until(app, kafka, lambda: len(seen) >= n)
    assert len(set(seen)) == len(seen) == n  # each once
    assert [c for c in polls if c[0] and c[1]] == [], "fetched on the loop with batches unsettled"
    assert any(on_loop and batches for on_loop, _, batches in polls), polls
    assert committed(kafka.config.group_id, topic) == end_offsets(topic)


async def test_a_due_start_lookup_moves_the_next_fetch_to_the_consumer_thread() -> None:
    """A retry partition whose start is unknown waits for a lookup on the consumer thread
    (the event loop never waits on the broker). A busy application with records on hand
    keeps the fetching on the event loop: a due lookup sends the next fetch to the
    consumer thread anyway, instead of leaving the retries held until the backlog ends."""
    topic = create_topic(fresh("held"), partitions=1)
    n = 300
    produce(topic, ((b"k", b"%d" % i, []) for i in range(n)))
    seen: list[str] = []
    resolved: list[tuple[bool, int]] = []  # (on the event loop?, messages seen by then)
    kafka = transport([topic], max_batch_size=10)
    retry = (f"{topic}.retry", 0)
    resolve = kafka._resolve_starts
    loop_thread = threading.get_ident()

    def recorded(consumer: Any, keys: list[Any]) -> None:
        resolved.append((threading.get_ident() == loop_thread, len(seen)))
        resolve(consumer, keys)

    kafka._resolve_starts = recorded  # type: ignore[method-assign]

    def leave_start_open() -> None:  # as if a rebalance on the loop had left it open
        if len(seen) == 50:
            with kafka._lock:
                kafka._partitions[retry].start_unknown = True
                kafka._starts_unknown = True

    await run_until(_busy_app(seen, leave_start_open), kafka, lambda: len(seen) >= n)
    assert len(set(seen)) == n
    assert resolved, "the start was never looked up"
    on_loop, by = resolved[0]
    assert not on_loop
    assert by < n - 100, f"looked up only after {by} of {n} messages"
    assert not kafka._starts_unknown


async def test_an_application_awaiting_io_gets_its_next_records_from_the_consumer_thread() -> None:
    """While the batches handed out wait on I/O, the consumer thread fetches the next ones."""
    topic = create_topic(fresh("awaiting"), partitions=2)
    n = 80
    produce(topic, ((b"k%d" % (i % 4), b"%d" % i, []) for i in range(n)))
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.05)  # the application's I/O
        more = True
        while more:
            event = await receive()
            more = event["more_messages"]
            seen.append(event["payload"])
            await send({"type": "message.ack", "id": event["id"]})

    kafka = transport([topic], max_batch_size=10)
    polls = _recorded_polls(kafka)
    await run_until(app, kafka, lambda: len(seen) >= n)
    assert sorted(seen) == sorted(b"%d" % i for i in range(n))
    assert [c for c in polls if c[0] and c[1]] == [], "fetched on the loop with batches unsettled"
    assert any(not on_loop and unsettled and b for on_loop, unsettled, b in polls), polls


async def test_waiting_for_settled_batches_gives_up_when_the_loop_idles() -> None:
    from amgi.servers.kafka._client import _Partition

    kafka = transport(["t"])  # not opened: only its partition state is used
    state = _Partition(1)
    state.settled.add(10)
    kafka._partitions[("t", 0)] = state
    io = asyncio.create_task(asyncio.sleep(0.5))  # the application awaits its I/O
    started = time.monotonic()
    assert await kafka._settled_while_busy() is False  # the loop idles: the thread fetches
    assert time.monotonic() - started < 0.1  # at once, not when the I/O is done
    io.cancel()

    async def busy_then_settle() -> None:
        for _ in range(10):  # the application's work, yielding now and then
            end = time.perf_counter() + 0.005
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0)
        kafka._commit(_BatchContext(("t", 0), state, 1, 10, 0))

    task = asyncio.create_task(busy_then_settle())
    assert await kafka._settled_while_busy() is True
    await task
    assert state.commit_to == 10
    assert await kafka._settled_while_busy() is True  # nothing unsettled: at once
    state.settled.add(20)
    state.moving = 1  # its copies are tried again in the background: a revoke would not wait
    assert await kafka._settled_while_busy() is True
    state.moving = 0
    kafka._closing = True
    assert await kafka._settled_while_busy() is False


class _CommitSpy:
    """A consumer whose ``commit`` calls are recorded: (time, offsets, asynchronous)."""

    def __init__(self, consumer: Any, calls: list[tuple[float, dict[int, int], bool]]) -> None:
        self._consumer = consumer
        self._calls = calls

    def commit(self, *, offsets: list[Any], asynchronous: bool) -> Any:
        parts = {tp.partition: tp.offset for tp in offsets}
        self._calls.append((time.monotonic(), parts, asynchronous))
        return self._consumer.commit(offsets=offsets, asynchronous=asynchronous)


def _spy_commits(kafka: KafkaTransport) -> list[tuple[float, dict[int, int], bool]]:
    calls: list[tuple[float, dict[int, int], bool]] = []
    send = kafka._send_commits

    def spied(consumer: Any, *, final: bool = False) -> None:
        send(_CommitSpy(consumer, calls), final=final)  # type: ignore[arg-type]

    kafka._send_commits = spied  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("interval_ms", [0, 300])
async def test_commits_go_out_at_most_every_commit_interval_and_soon_once_idle(
    interval_ms: int,
) -> None:
    """A backlog drained in small fetches commits once per ``commit_interval_ms`` (0: once
    per fetch), and the last settled offset is committed while the server idles, not
    only at close."""
    topic = create_topic(fresh("interval"), partitions=1)
    n = 40
    produce(topic, ((None, b"%d" % i, []) for i in range(n)))
    acked: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.03)  # each batch of 2 takes a while: the drain takes > 0.6 s
        more = True
        while more:
            event = await receive()
            more = event["more_messages"]
            await send({"type": "message.ack", "id": event["id"]})
        acked.append(time.monotonic())

    kafka = transport([topic], max_batch_size=2, commit_interval_ms=interval_ms)
    calls = _spy_commits(kafka)
    await run_until(app, kafka, lambda: any(c[1] == {0: n} and c[2] for c in calls))
    running = [c for c in calls if c[2]]  # asynchronous: sent while consuming
    last_ack = acked[-1]
    done_at = next(t for t, parts, _ in running if parts == {0: n})
    # Committed while idle, soon after the last ack (without the idle commit, only the
    # close would commit it and run_until would time out); the slack is for a busy machine.
    assert done_at - last_ack < interval_ms / 1000 + 1.0
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(running)]
    offsets = [c[1][0] for c in running]
    assert offsets == sorted(offsets)  # contiguous settled offsets only move forward
    if interval_ms:
        assert min(gaps) >= interval_ms / 1000 - 0.01, gaps
        assert 2 <= len(running) <= (running[-1][0] - running[0][0]) / 0.3 + 1
    else:
        assert len(running) >= n // 2 - 2  # about one per batch of 2
    assert committed(kafka.config.group_id, topic) == {0: n}


async def test_a_long_busy_batch_lets_the_consumer_thread_fetch_after_a_second() -> None:
    """librdkafka leaves the group when ``consume`` is not called for
    ``max.poll.interval.ms``: a long CPU-bound batch must not stop the fetching."""
    from amgi.servers.kafka._client import _Partition

    kafka = transport(["t"])  # not opened: only its partition state is used
    state = _Partition(1)
    state.settled.add(10)
    kafka._partitions[("t", 0)] = state

    async def busy() -> None:
        for _ in range(300):  # 1.5 s of work, yielding now and then
            end = time.perf_counter() + 0.005
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0)

    task = asyncio.create_task(busy())
    started = time.monotonic()
    assert await kafka._settled_while_busy() is False
    assert 0.9 < time.monotonic() - started < 3
    task.cancel()
