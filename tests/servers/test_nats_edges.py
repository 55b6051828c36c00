"""The NATS server's unhappy paths against a real nats-server: stops, deleted streams,
slow apps in core mode, the dead-letter stream look-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.nats import NatsOptions, NatsSendError, NatsTransport
from amgi.transport import Batch, DeadLetter, Fate, Message, Retry, Settlement
from tests.apps import attempts_app
from tests.servers.nats_helpers import (
    PREFIX,
    STREAM,
    URL,
    consumer_state,
    ensure_broker,
    ensure_stream,
    fetch_all,
    fresh,
    read_subject,
    retention_stream,
)
from tests.servers.private_brokers import private_nats


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


@pytest.fixture
async def subject() -> str:
    await ensure_stream()
    return f"{PREFIX}.{fresh('subject')}"


async def until(condition: object, timeout: float, what: str) -> None:
    """Poll ``condition()`` until it holds, at most ``timeout`` seconds."""
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)
    assert condition(), what


async def core_publish(subject: str, payloads: list[bytes], url: str = URL) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        for payload in payloads:
            await nc.publish(subject, payload)
        await nc.flush()
    finally:
        await nc.close()


# -- core NATS: at most once, and no more lost than that ------------------------------------


async def test_core_mode_a_stop_processes_the_messages_received_and_not_yet_fetched(
    subject: str,
) -> None:
    """Core NATS delivers once, into the process's memory: a stop dropped what had
    arrived while the app was busy (measured: 4 of 5 messages gone without a word, exit
    0). Now the stop unsubscribes and the runtime processes what arrived."""
    options = NatsOptions(servers=URL, mode="core", queue=fresh("q"))
    transport = NatsTransport([subject], options)
    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    app = attempts_app(seen, called=called, linger=0.5)
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off", concurrency=1))
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        await core_publish(subject, [b"0"])
        await asyncio.wait_for(called.wait(), 10)
        await core_publish(subject, [b"1", b"2", b"3", b"4"])
        subscriptions = transport._subscriptions
        assert subscriptions is not None
        await until(lambda: len(subscriptions._buffer) == 4, 5, "the four in memory")
    finally:
        runtime.request_stop()
    assert await asyncio.wait_for(serving, 20) == 0
    assert sorted(seen) == [(b"%d" % i, 1) for i in range(5)]


async def test_core_mode_retries_a_stop_drops_are_said_lost(
    subject: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A nacked message waits in memory for its retry; a stop dropped it without a word."""
    options = NatsOptions(servers=URL, mode="core", queue=fresh("q"))
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        await core_publish(subject, [b"later"])
        async with asyncio.timeout(5):
            (batch,) = await t.fetch()
        (message,) = batch.messages
        await t.settle(batch, Settlement(retry=[Retry(message, "not now", 60)]))
    finally:
        await t.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(
        "1 message(s) received or waiting in memory for a retry are lost" in x for x in lines
    ), lines


# -- the pull loop when what it reads is deleted --------------------------------------------


async def delete_stream(name: str) -> None:
    import nats

    nc = await nats.connect(URL)
    try:
        await nc.jsm().delete_stream(name)
    finally:
        await nc.close()


async def test_a_stream_deleted_while_running_ends_the_run_with_one_line_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stream deleted under a running server: each fetch failed on "stream not
    found" (the consumer could not be created again), retried for ever with a line that
    named neither the stream nor the subject. Now the run ends with one line saying so."""
    async with retention_stream("limits") as (stream, subjects):
        subject = subjects.replace("{subject}", "a")
        options = NatsOptions(servers=URL, durable=fresh("d"), fetch_expiry=0.2)
        runtime = Runtime(
            attempts_app([]), NatsTransport([subject], options), RuntimeConfig(lifespan="off")
        )
        serving = asyncio.create_task(runtime.serve())
        try:
            await asyncio.wait_for(runtime.started.wait(), 10)
            await delete_stream(stream)
            code = await asyncio.wait_for(asyncio.shield(serving), 10)
        finally:
            runtime.request_stop()
            await asyncio.wait_for(serving, 10)
    assert code != 0
    lines = [r.getMessage() for r in caplog.records if "was deleted" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert f"stream {stream!r}" in lines[0]
    assert repr(subject) in lines[0]
    assert "\n" not in lines[0]


async def test_core_mode_holds_a_bounded_number_of_messages_for_a_slow_app(
    subject: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core mode took every message the server sent into memory, however far behind the
    app was: an app slower than the publishers grew the process without bound (until
    killed, with everything it held). Now it holds a bounded number (shortened here to
    5) and drops the rest as NATS drops a slow consumer's, with one line counting them."""
    from amgi.servers.nats import _core

    monkeypatch.setattr(_core, "_MAX_BUFFERED", 5, raising=False)
    options = NatsOptions(servers=URL, mode="core", queue=fresh("q"))
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        await core_publish(subject, [b"%d" % i for i in range(20)])
        held = t._subscriptions
        assert held is not None
        await until(lambda: len(held._buffer) + getattr(held, "_dropped", 0) == 20, 5, "20")
        async with asyncio.timeout(5):
            batches = await t.fetch()
        await core_publish(subject, [b"after"])
        async with asyncio.timeout(5):
            (after,) = await t.fetch()
    finally:
        await t.close()
    assert [m.payload for b in batches for m in b.messages] == [b"%d" % i for i in range(5)]
    assert [m.payload for m in after.messages] == [b"after"]
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "15 message(s) dropped" in lines[0]
    assert "at most once" in lines[0]


async def test_core_mode_counts_retries_waiting_towards_what_it_holds(
    subject: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries waiting in memory were not counted: an app nacking every message with a
    long delay held arrivals x delay messages, without bound. Now they count towards the
    limit (shortened here to 5): what arrives beyond it is dropped, with its line."""
    from amgi.servers.nats import _core

    monkeypatch.setattr(_core, "_MAX_BUFFERED", 5, raising=False)
    options = NatsOptions(servers=URL, mode="core", queue=fresh("q"))
    t = NatsTransport([subject], options)
    await t.connect()
    try:
        await core_publish(subject, [b"%d" % i for i in range(4)])
        batches: list[Batch] = []
        async with asyncio.timeout(5):
            while sum(len(b.messages) for b in batches) < 4:
                batches += await t.fetch()
        for b in batches:
            await t.settle(b, Settlement(retry=[Retry(m, "later", 60) for m in b.messages]))
        held = t._subscriptions
        assert held is not None
        await core_publish(subject, [b"%d" % i for i in range(4, 10)])
        await until(lambda: len(held._buffer) + held._dropped == 6, 5, "the six")
        assert len(held._buffer) == 1  # 4 retries waiting and 1 new: the limit
        retry_bytes = held._retry_bytes
    finally:
        await t.close()
    assert sum(len(b.messages) for b in batches) == 4
    assert retry_bytes == 4
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "5 message(s) dropped" in lines[0]


# -- the dead-letter stream is looked up when something may have changed -------------------


@contextlib.asynccontextmanager
async def stream_lookups(url: str, stream: str) -> AsyncIterator[list[str]]:
    """The JetStream API requests that look a stream up (by subject, or ``stream`` by
    name) made while inside, as they come."""
    import nats

    watcher = await nats.connect(url)
    seen: list[str] = []

    async def count(msg: Any) -> None:
        seen.append(msg.subject)

    try:
        await watcher.subscribe("$JS.API.STREAM.NAMES", cb=count)
        await watcher.subscribe(f"$JS.API.STREAM.INFO.{stream}", cb=count)
        await watcher.flush()
        yield seen
    finally:
        await watcher.close()


async def recreate(url: str, old: str, new: str, subjects: list[str], retention: str) -> None:
    """Delete stream ``old``, then make ``new`` capturing ``subjects`` with ``retention``."""
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    try:
        await nc.jsm().delete_stream(old)
        await nc.jsm().add_stream(
            api.StreamConfig(
                name=new, subjects=subjects, storage=api.StorageType.MEMORY,
                retention=api.RetentionPolicy(retention),
            )
        )  # fmt: skip
    finally:
        await nc.close()


async def dead_letter(t: NatsTransport, message: Message) -> DeadLetter:
    dead = DeadLetter(message, "no")
    await t.settle(Batch("work.a", [message]), Settlement(dead=[dead]))
    return dead


@pytest.mark.parametrize("change", ["interest", "another stream"])
async def test_a_dead_letter_stream_found_is_asked_for_alone_and_its_changes_are_seen(
    tmp_path: Path, change: str
) -> None:
    """Each settle with dead letters looked their stream up by subject, then asked for
    its retention: two API requests per subject, to refuse one with interest retention.
    Now the stream found is remembered and asked for alone (one request), which sees it
    deleted and made again with interest retention (the message kept), or deleted with
    another stream capturing the subject (looked up whole again: stored there)."""
    with private_nats(tmp_path / "nats") as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        await ensure_stream(url, "WORK", ["work.>"])
        await ensure_stream(url, "DEAD", ["dead.>"])
        options = NatsOptions(
            servers=url, durable="d", fetch_expiry=0.2, ack_wait=2,
            dead_letter_subject="dead.{subject}",
        )  # fmt: skip
        t = NatsTransport(["work.a"], options)
        await t.connect()
        try:
            for i in range(3):
                await t.publish("work.a", [], b"%d" % i, {})
            messages = await fetch_all(t, 3, timeout=10)
            async with stream_lookups(url, "DEAD") as looked:
                stored = [(await dead_letter(t, m)).fate for m in messages[:2]]
                await t._client.flush()
                # Each subject watched has its own callback task: they come in any order.
                await until(lambda: len(looked) >= 3, 10, "the three look-ups seen")
                lookups = list(looked)
            if change == "interest":
                await recreate(url, "DEAD", "DEAD", ["dead.>"], "interest")
            else:
                await recreate(url, "DEAD", "MOVED", ["dead.>"], "limits")
            last = await dead_letter(t, messages[2])
            state = await consumer_state("WORK", "d", url)
            moved = await read_subject("dead.work.a", 1, 5, url) if change != "interest" else []
        finally:
            await t.close()
    assert stored == [None, None]
    assert sorted(lookups) == sorted(["$JS.API.STREAM.NAMES", *["$JS.API.STREAM.INFO.DEAD"] * 2])
    if change == "interest":
        assert last.fate is Fate.KEPT
        assert "has interest retention" in last.error
        assert state.num_ack_pending == 1
    else:
        assert last.fate is None
        assert [payload for _, payload, _ in moved] == [b"2"]
        assert state.num_ack_pending == 0


# -- an existing consumer the server cannot pull from ----------------------------------------


async def test_an_existing_push_consumer_is_refused_at_the_start(subject: str) -> None:
    """A durable found is used as it is: a push consumer (one with a deliver subject)
    answered every pull request with 409 "Consumer is push based", so the run consumed
    nothing, for ever, with a warning every --fetch-expiry, while JetStream pushed the
    messages to its deliver subject, to whoever listens there. Now the start stops with
    one line."""
    import nats
    from nats.js import api

    durable = fresh("d")
    admin = await nats.connect(URL)
    try:
        await admin.jsm().add_consumer(
            STREAM,
            api.ConsumerConfig(
                durable_name=durable, filter_subject=subject, deliver_subject=f"to.{durable}",
                ack_policy=api.AckPolicy.EXPLICIT,
            ),
        )  # fmt: skip
    finally:
        await admin.close()
    t = NatsTransport([subject], NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2))
    with pytest.raises(ConfigurationError, match="is a push consumer") as caught:
        await t.connect()
    assert "\n" not in str(caught.value)
    assert f"to.{durable}" in str(caught.value)
    assert "pick another --durable" in str(caught.value)
    assert t._client is None, "closed again"


# -- permissions the server refuses -----------------------------------------------------------

_PERMISSIONS = """
authorization {
  users = [
    {user: admin, password: a}
    {user: nonext, password: a, permissions: {publish: {deny: "$JS.API.CONSUMER.MSG.NEXT.>"}}}
    {user: noack, password: a, permissions: {publish: {deny: "$JS.ACK.>"}}}
    {user: nosub, password: a, permissions: {subscribe: {deny: "work.>"}}}
    {user: noinbox, password: a, permissions: {subscribe: {deny: "_INBOX.>"}}}
    {user: nojs, password: a, permissions: {publish: {deny: "$JS.API.>"}}}
  ]
}
"""


async def serve_refused(url: str, user: str, mode: str, caplog: Any) -> tuple[int, list[str]]:
    """Serve ``work.a`` as ``user`` until the run ends by itself: its exit code and the
    error lines."""
    options = NatsOptions(
        servers=url, user=user, password="a", mode=mode,  # type: ignore[arg-type]
        fetch_expiry=0.3, publish_timeout=2,
    )  # fmt: skip
    seen: list[tuple[bytes, int]] = []
    runtime = Runtime(
        attempts_app(seen), NatsTransport(["work.a"], options), RuntimeConfig(lifespan="off")
    )
    caplog.clear()
    code = await asyncio.wait_for(runtime.serve(), 30)
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def core_mode_needs_no_jetstream(url: str, admin: str) -> None:
    """Core mode as a user JetStream's API is denied to: dead letters fail, the run goes on."""
    options = NatsOptions(
        servers=url, user="nojs", password="a", mode="core", queue="q", publish_timeout=0.5
    )
    seen: list[tuple[bytes, int]] = []
    called = asyncio.Event()
    app = attempts_app(seen, called=called)
    runtime = Runtime(app, NatsTransport(["work.a"], options), RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        await core_publish("work.a", [b"core"], admin)
        await asyncio.wait_for(called.wait(), 10)
    finally:
        runtime.request_stop()
    assert await asyncio.wait_for(serving, 20) == 0
    assert seen == [(b"core", 1)]


async def test_a_permission_consuming_needs_refused_ends_the_run_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server drops a publish or a subscription the user may not make with an -ERR
    line and keeps the connection: pull requests refused made a warning every
    --fetch-expiry for ever, consuming nothing; acks refused made every message come
    again after the ack wait, for ever; a refused subscription (core mode) received
    nothing, without an end. Now each ends the run with one line naming what was
    refused (or stops the start), and what was not acked stays in the stream. What
    consuming does without (JetStream's API in core mode) refused, the run goes on."""
    with private_nats(tmp_path / "nats", config=_PERMISSIONS) as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        admin = f"nats://admin:a@127.0.0.1:{broker.port}"
        await ensure_stream(admin, "WORK", ["work.>"])
        sender = NatsTransport([], NatsOptions(servers=admin))
        await sender.connect()
        try:
            await sender.publish("work.a", [], b"m", {})
        finally:
            await sender.close()
        for user, mode, refused in [
            ("nonext", "jetstream", '"$js.api.consumer.msg.next.work.amgi"'),
            ("noack", "jetstream", '"$js.ack.work.amgi.'),
            ("nosub", "core", '"work.a"'),
        ]:
            code, lines = await serve_refused(url, user, mode, caplog)
            assert code == 1, (user, lines)
            assert len(lines) == 1, (user, lines)
            assert "permissions violation" in lines[0], lines
            assert refused in lines[0], lines
            assert "\n" not in lines[0]
        state = await consumer_state("WORK", "amgi", admin)
        assert state.ack_floor.stream_seq == 0, "the ack never reached it"
        await core_mode_needs_no_jetstream(url, admin)
        options = NatsOptions(servers=url, user="noinbox", password="a", publish_timeout=1)
        t = NatsTransport(["work.a"], options)
        with pytest.raises(ConfigurationError, match="permissions violation") as caught:
            await t.connect()
        assert '"_inbox.' in str(caught.value)
        assert t._client is None, "closed again"


async def test_jetstream_api_denied_makes_a_fast_start_or_one_clear_line(tmp_path: Path) -> None:
    """JetStream's API denied to the user, each look-up at the start (the dead-letter
    stream of every address, then the consumers) waited out --publish-timeout: a core
    mode start took that long per address, and a JetStream one as long again before its
    error. Now the refusal the server sends at once ends the looking."""
    with private_nats(tmp_path / "nats", config=_PERMISSIONS) as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        loop = asyncio.get_running_loop()
        for mode in ("core", "jetstream"):
            options = NatsOptions(
                servers=url, user="nojs", password="a", mode=mode, queue="q", publish_timeout=4
            )
            t = NatsTransport([f"work.{n}" for n in "abc"], options)
            began = loop.time()
            try:
                if mode == "core":
                    await t.connect()
                else:
                    with pytest.raises(ConfigurationError, match="permissions violation"):
                        await t.connect()
            finally:
                await t.close()
            # Under the timeout of one look-up: none was waited out.
            assert loop.time() - began < 4, mode


async def test_a_jetstream_api_that_never_answers_fails_the_start_by_the_publish_timeout(
    tmp_path: Path,
) -> None:
    """JetStream's API taken but never answered (as by a server without its meta leader):
    the consumers' look-ups at the start waited nats-py's own 5 s each and ended with its
    bare 'nats: timeout'. Now --publish-timeout bounds each, and one line says what."""
    import nats

    from amgi.errors import BrokerUnavailable
    from tests.net import free_port
    from tests.servers.private_brokers import PrivateBroker

    port = free_port()
    (tmp_path / "nats").mkdir()
    argv = ["nats-server", "--addr", "127.0.0.1", "--port", str(port)]  # no JetStream
    broker = PrivateBroker(argv, port, tmp_path / "nats")
    broker.start()
    try:
        url = f"nats://127.0.0.1:{port}"
        silent = await nats.connect(url)
        await silent.subscribe("$JS.API.>")  # takes every request, answers none
        await silent.flush()
        loop = asyncio.get_running_loop()
        for stream in ("", "WORK"):
            options = NatsOptions(servers=url, stream=stream, publish_timeout=0.5)
            t = NatsTransport(["work.a"], options)
            began = loop.time()
            with pytest.raises(BrokerUnavailable, match="--publish-timeout") as caught:
                await t.connect()
            assert loop.time() - began < 4, "bounded by --publish-timeout, not 5 s"
            assert "work.a" in str(caught.value)
            assert t._client is None, "closed again"
        await silent.close()
    finally:
        broker.stop()


async def test_core_mode_a_stop_with_the_server_hung_hands_over_what_arrived_at_once(
    tmp_path: Path,
) -> None:
    """Each subscription was drained in turn, each drain's flush waiting nats-py's 10 s
    for a server that had stopped answering: the stop's deadline ran out first and what
    had already arrived in memory was lost. Now the drains share one bounded wait."""
    import signal

    with private_nats(tmp_path / "nats") as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        subjects = [f"work.{n}" for n in "abc"]
        options = NatsOptions(servers=url, mode="core", queue="q", connect_timeout=1)
        t = NatsTransport(subjects, options)
        await t.connect()
        assert broker.proc is not None
        try:
            for subject in subjects:
                await core_publish(subject, [subject.encode()], url)
            subscriptions = t._subscriptions
            assert subscriptions is not None
            await until(lambda: len(subscriptions._buffer) == 3, 5, "three in memory")
            broker.proc.send_signal(signal.SIGSTOP)  # connected, and silent
            async with asyncio.timeout(8):
                batches = await t.hand_over()
            assert sorted(m.payload or b"" for b in batches for m in b.messages) == [
                s.encode() for s in subjects
            ]
        finally:
            broker.proc.send_signal(signal.SIGCONT)
            await t.close()


async def test_a_flush_that_times_out_on_a_hung_server_leaves_the_connection_reading(
    tmp_path: Path,
) -> None:
    """A settle's flush waits at most the ack wait; nats-py cancelled its wait then, and
    the server's late answer (once it woke) broke nats-py's reading: the connection
    stayed up but nothing was read any more, no message consumed, until its pings ran out
    minutes later. Now a late answer finds its wait still there."""
    import signal

    with private_nats(tmp_path / "nats") as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        await ensure_stream(url, "WORK", ["work.>"])
        options = NatsOptions(servers=url, fetch_expiry=0.2, ack_wait=1, publish_timeout=2)
        t = NatsTransport(["work.a"], options)
        await t.connect()
        assert broker.proc is not None
        try:
            await t.publish("work.a", [], b"first", {})
            (first,) = await fetch_all(t, 1, timeout=10)
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                with contextlib.suppress(Exception):  # the flush times out
                    await t.settle(Batch("work.a", [first]), Settlement(acked=[first]))
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            await t.publish("work.a", [], b"second", {})
            got = await fetch_all(t, 2, timeout=10)
            assert b"second" in [m.payload for m in got]
        finally:
            await t.close()


_NO_DEAD_LETTERS = """
authorization {
  users = [
    {user: admin, password: a}
    {user: nodl, password: a, permissions: {publish: {deny: ["work.a.dlq", "work.b"]}}}
  ]
}
"""


async def test_a_publish_the_server_refuses_fails_at_once_naming_the_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server drops a publish the user may not make and answers nothing: a send
    failed after --publish-timeout with 'nats: timeout', and a dead letter waited as long
    and came back after the ack wait to be refused again, for ever. Now both fail as the
    refusal comes, naming it; the dead letter stays unacknowledged for long."""
    with private_nats(tmp_path / "nats", config=_NO_DEAD_LETTERS) as broker:
        url = f"nats://127.0.0.1:{broker.port}"
        admin = f"nats://admin:a@127.0.0.1:{broker.port}"
        await ensure_stream(admin, "WORK", ["work.>"])
        options = NatsOptions(
            servers=url, user="nodl", password="a", fetch_expiry=0.2, publish_timeout=5
        )
        t = NatsTransport(["work.a"], options)
        await t.connect()
        loop = asyncio.get_running_loop()
        try:
            began = loop.time()
            with pytest.raises(NatsSendError, match="permissions violation"):
                await t.publish("work.b", [], b"refused", {})
            assert loop.time() - began < 5, "not waited out"
            await t.publish("work.a", [], b"poison", {})
            (poison,) = await fetch_all(t, 1)
            caplog.clear()
            began = loop.time()
            await t.settle(Batch("work.a", [poison]), Settlement(dead=[DeadLetter(poison, "x")]))
            assert loop.time() - began < 5, "not waited out"
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(lines) == 1, lines
            assert "permissions violation" in lines[0], lines
            assert "tried again in 3600s" in lines[0], lines
        finally:
            await t.close()
        state = await consumer_state("WORK", "amgi", admin)
        assert state.num_ack_pending == 1, "unacknowledged, not lost"
