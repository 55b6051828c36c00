"""``amgi dead-letters`` on NATS JetStream: messages the runtime dead-lettered to
``{subject}.dlq`` are read from the stream capturing it (and stay), replayed to their
subject (JetStream publish, ack awaited, then deleted from the stream); a replay killed
with SIGKILL between the two loses none."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace

import pytest

from amgi.errors import ConfigurationError
from amgi.servers.nats import NatsOptions, NatsTransport
from amgi.servers.nats._dead_letters import subject_matches
from tests.ops.helpers import (
    ROOT,
    HoldingFront,
    amgi,
    dead_letter_all,
    kill_replay_when,
    one_line_error,
    replay_beside_a_failing_consumer,
    take,
)
from tests.servers.nats_helpers import (
    PORT,
    PREFIX,
    STREAM,
    URL,
    ensure_broker,
    ensure_stream,
    fresh,
    retention_stream,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


def options(durable: str = "amgi") -> NatsOptions:
    return NatsOptions(servers=URL, durable=durable, fetch_expiry=0.2)


async def dead_letter(
    n: int, headers: list[tuple[bytes, bytes]] | None = None, attempts: int = 1
) -> tuple[str, str]:
    """A new subject whose ``n`` messages (headers ``n: i``, or ``headers``; payload ``i``)
    the runtime dead-lettered to ``{subject}.dlq`` after ``attempts`` deliveries; and the
    durable consumer that did it."""
    await ensure_stream()
    subject, durable = f"{PREFIX}.{fresh('dl')}", fresh("d")
    admin = NatsTransport([], options())
    await admin.connect()
    try:
        for i in range(n):
            await admin.publish(subject, headers or [(b"n", b"%d" % i)], b"%d" % i, {})
    finally:
        await admin.close()
    await dead_letter_all(
        NatsTransport([subject], options(durable)), n, max_attempts=attempts, retry_delay=0
    )
    assert await count(subject + ".dlq") == n
    return subject, durable


async def count(subject: str) -> int:
    """Messages stored on ``subject`` in the test stream."""
    import nats

    nc = await nats.connect(URL)
    try:
        info = await nc.jsm().stream_info(STREAM, subjects_filter=subject)
    finally:
        await nc.close()
    return int((info.state.subjects or {}).get(subject, 0))


async def payloads(subject: str) -> list[bytes]:
    """The payloads stored on ``subject``, in order (read without changing anything)."""
    import nats
    from nats.js import api

    nc = await nats.connect(URL)
    found: list[bytes] = []
    try:
        total = await count(subject)
        if not total:
            return []
        sub = await nc.jetstream().pull_subscribe(
            subject, stream=STREAM, config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE)
        )
        while len(found) < total:
            found += [m.data for m in await sub.fetch(total - len(found), timeout=5)]
    finally:
        await nc.close()
    return found


def run(*args: str, url: str = URL) -> subprocess.CompletedProcess[str]:
    return amgi(*args, "--server", "nats", "--servers", url, cwd=ROOT)


async def test_list_and_replay_from_the_command_line() -> None:
    subject, _ = await dead_letter(4)
    listed = await asyncio.to_thread(run, "dead-letters", "list", subject, "--limit", "10")
    assert listed.returncode == 0, listed.stderr
    assert f"4 dead letter(s) of {subject!r} shown (nats)" in listed.stdout
    assert listed.stdout.count("reason:  refused") == 4
    assert listed.stdout.count("attempts=1 ") == 4, "the dead letter's last attempt"
    assert "headers: n=0\n" in listed.stdout, "only the message's own headers"
    assert "dead-lettered=unknown" not in listed.stdout
    again = await asyncio.to_thread(run, "dead-letters", "list", subject, "--limit", "2")
    assert f"2 dead letter(s) of {subject!r} shown" in again.stdout, "listing must leave them"
    replay = await asyncio.to_thread(run, "dead-letters", "replay", subject, "--limit", "3")
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 3 dead letter(s) to {subject!r}" in replay.stdout
    assert (await payloads(subject))[4:] == [b"0", b"1", b"2"], "oldest first, after the 4"
    assert await payloads(subject + ".dlq") == [b"3"]


def test_replay_to_a_subject_no_stream_captures_is_one_line() -> None:
    result = run("dead-letters", "replay", f"nowhere.{fresh('gone')}")
    assert "does not exist" in one_line_error(result)


async def test_dead_letters_no_stream_captures_are_one_line() -> None:
    await ensure_stream()
    subject = f"{PREFIX}.{fresh('nodlq')}"
    result = await asyncio.to_thread(
        run, "dead-letters", "list", subject, "--dead-letter-subject", "nowhere.{subject}"
    )
    line = one_line_error(result)
    assert f"no JetStream stream captures the dead-letter subject 'nowhere.{subject}'" in line


async def test_dead_letters_in_a_work_queue_stream_are_listed_and_replayed() -> None:
    """A work-queue stream keeps a dead letter no consumer reads, and takes only consumers
    with explicit acks: ``list`` failed there (its consumer acked nothing). It now reads
    it with explicit acks it never sends, so the dead letters stay until replayed."""
    import nats

    await ensure_stream()
    subject = f"{PREFIX}.{fresh('wq')}"
    async with retention_stream("workqueue") as (name, dead_subject):
        opts = replace(options(fresh("d")), dead_letter_subject=dead_subject)
        admin = NatsTransport([], opts)
        await admin.connect()
        nc = await nats.connect(URL)
        try:
            for i in range(2):
                await admin.publish(subject, [], b"%d" % i, {})
            await dead_letter_all(NatsTransport([subject], opts), 2, retry_delay=0)
            for _ in range(2):  # listing leaves them
                listed = await admin.list_dead_letters(subject, 10)
                assert [d.payload for d in listed] == [b"0", b"1"]
            assert await admin.replay_dead_letters(subject, 10) == 2
            assert (await nc.jsm().stream_info(name)).state.messages == 0
        finally:
            await admin.close()
            await nc.close()


async def test_dead_letters_in_an_interest_stream_are_one_line() -> None:
    """A stream with interest retention keeps no dead letter no consumer wants, so the
    server stores none there: ``list`` showed none without a word."""
    await ensure_stream()
    subject = f"{PREFIX}.{fresh('interest')}"
    async with retention_stream("interest") as (_, dead_subject):
        result = await asyncio.to_thread(
            run, "dead-letters", "list", subject, "--dead-letter-subject", dead_subject
        )
        line = one_line_error(result)
        assert "has interest retention" in line
        assert "limits or workqueue retention" in line
        replayer = NatsTransport([], replace(options(), dead_letter_subject=dead_subject))
        await replayer.connect()
        try:
            with pytest.raises(ConfigurationError, match="has interest retention"):
                await replayer.replay_dead_letters(subject, 10)
        finally:
            await replayer.close()


def test_subject_patterns() -> None:
    assert subject_matches("a.b", "a.*")
    assert subject_matches("a.b.c", "a.>")
    assert not subject_matches("a", "a.>")
    assert not subject_matches("a.b.c", "a.*")
    assert not subject_matches("a.c", "a.b")


async def test_replay_killed_half_way_loses_no_dead_letter() -> None:
    n = 250  # three chunks of at most 100
    subject, _ = await dead_letter(n)
    # The broker never sees the second chunk's deletes: its messages are back on the
    # subject and still in the dead letters when the replay is killed.
    async with HoldingFront(PORT, b"MSG.DELETE", 100) as front:

        async def held() -> bool:
            return front.held.is_set()

        await kill_replay_when(
            held, subject, "--server", "nats", "--servers", f"nats://127.0.0.1:{front.port}"
        )
    moved = (await payloads(subject))[n:]
    still = await payloads(subject + ".dlq")
    assert (len(moved), len(still)) == (200, n - 100), "one chunk done, one sent only"
    assert set(moved) | set(still) == {b"%d" % i for i in range(n)}, "a dead letter was lost"
    finish = await asyncio.to_thread(run, "dead-letters", "replay", subject)
    assert finish.returncode == 0, finish.stderr
    assert f"replayed {n - 100} dead letter(s)" in finish.stdout
    assert await count(subject + ".dlq") == 0
    back = (await payloads(subject))[n:]
    assert len(back) == n + 100, "duplicates: exactly the chunk sent but not deleted"
    assert set(back) == {b"%d" % i for i in range(n)}


@pytest.mark.parametrize(
    "headers",
    [
        [(b"kind", b"order"), (b"count", b"3")],
        [(b"n", b"1"), (b"n", b"2"), (b"bin", b"\x00\xff")],
    ],
)
async def test_a_replayed_dead_letter_is_a_first_attempt_with_only_its_own_headers(
    headers: list[tuple[bytes, bytes]],
) -> None:
    subject, durable = await dead_letter(2, headers, attempts=2)
    listed = await asyncio.to_thread(run, "dead-letters", "list", subject)
    assert listed.stdout.count("attempts=2 ") == 2, listed.stdout
    replay = await asyncio.to_thread(run, "dead-letters", "replay", subject)
    assert replay.returncode == 0, replay.stderr
    messages = await take(NatsTransport([subject], options(durable)), 2)  # the one that gave up
    assert sorted(m.payload or b"" for m in messages) == [b"0", b"1"]
    for m in messages:
        assert m.attempt == 1
        assert m.headers == headers


async def test_a_replay_does_not_repeat_the_jetstream_checks_of_the_first_publish() -> None:
    """A message sent with ``Nats-Expected-Last-Subject-Sequence: 0`` (its subject was new)
    is replayed with that header encoded: sent as it is, the stream refused the replay
    (the subject holds the message by then) and the dead letter could never go back."""
    expected = [(b"Nats-Expected-Last-Subject-Sequence", b"0")]
    subject, durable = await dead_letter(1, expected)
    replay = await asyncio.to_thread(run, "dead-letters", "replay", subject)
    assert replay.returncode == 0, replay.stderr
    (message,) = await take(NatsTransport([subject], options(durable)), 1)
    assert (message.payload, message.headers) == (b"0", expected)
    assert await count(subject + ".dlq") == 0


async def test_a_dead_letter_without_its_address_header_goes_back_to_its_own_subject() -> None:
    """A dead letter stored by another producer has no amgi-original-address: under a
    wildcard address it was replayed to the pattern itself ('orders.*', a literal subject
    no consumer of orders.a sees). Its subject less the dead-letter suffix names it."""
    import nats

    await ensure_stream()
    base = f"{PREFIX}.{fresh('foreign')}"
    nc = await nats.connect(URL)
    try:
        await nc.jetstream().publish(f"{base}.a.dlq", b"foreign", headers={"k": "v"})
    finally:
        await nc.close()
    replayer = NatsTransport([], options())
    await replayer.connect()
    try:
        (listed,) = await replayer.list_dead_letters(f"{base}.*", 10)
        assert listed.address == f"{base}.a"
        assert await replayer.replay_dead_letters(f"{base}.*", 10) == 1
    finally:
        await replayer.close()
    assert await count(f"{base}.*") == 0, "published to the pattern"
    (message,) = await take(NatsTransport([f"{base}.a"], options(fresh("d"))), 1)
    assert (message.payload, message.headers) == (b"foreign", [(b"k", b"v")])


def test_a_replay_in_core_mode_is_one_line() -> None:
    result = run("dead-letters", "replay", f"{PREFIX}.{fresh('core')}", "--mode", "core")
    assert "cannot be replayed in core mode" in one_line_error(result)


async def test_a_refused_replay_stops_with_one_line_and_keeps_every_dead_letter() -> None:
    import nats
    from nats.js import api

    from amgi.servers.kit import dead_letter_headers
    from amgi.servers.nats._headers import encode

    # A stream that is full and discards new messages: it refuses every send back.
    name, prefix = fresh("FULL").replace("-", "_"), fresh("full")
    subject = f"{prefix}.orders"
    nc = await nats.connect(URL)
    try:
        await nc.jsm().add_stream(
            api.StreamConfig(
                name=name, subjects=[f"{prefix}.>"], storage=api.StorageType.MEMORY,
                max_msgs=2, discard=api.DiscardPolicy.NEW,
            )
        )  # fmt: skip
        for i in range(2):
            headers = dead_letter_headers([], attempt=3, address=subject, reason="refused")
            await nc.jetstream().publish(subject + ".dlq", b"%d" % i, headers=encode(headers))
        result = await asyncio.to_thread(run, "dead-letters", "replay", subject)
        line = one_line_error(result)
        assert "stopped after 0 dead letter(s)" in line
        assert "maximum messages exceeded" in line
        assert (await nc.jsm().stream_info(name)).state.messages == 2, "every one stays"
    finally:
        await nc.jsm().delete_stream(name)
        await nc.close()


async def test_a_server_that_stops_answering_is_one_line() -> None:
    subject, _ = await dead_letter(1)
    # The broker never sees the first pull request, nor anything after it.
    async with HoldingFront(PORT, b"MSG.NEXT", 0) as front:
        result = await asyncio.to_thread(
            run, "dead-letters", "list", subject, "--publish-timeout", "1",
            "--connect-timeout", "1", url=f"nats://127.0.0.1:{front.port}",
        )  # fmt: skip
    assert f"reading stream {STREAM!r} failed: nats: timeout" in one_line_error(result)


async def test_a_wildcard_address_lists_and_replays_the_dead_letters_of_each_subject() -> None:
    import nats
    from nats.js import api

    from amgi.servers.kit import dead_letter_headers
    from amgi.servers.nats._headers import encode

    prefix = fresh("wild")
    name = prefix.replace("-", "_").upper()
    nc = await nats.connect(URL)
    transport = NatsTransport([], options())
    try:
        await nc.jsm().add_stream(
            api.StreamConfig(name=name, subjects=[f"{prefix}.>"], storage=api.StorageType.MEMORY)
        )
        for token in ("eu", "us"):
            subject = f"{prefix}.{token}"
            headers = dead_letter_headers([], attempt=2, address=subject, reason="refused")
            await nc.jetstream().publish(subject + ".dlq", token.encode(), headers=encode(headers))
        await transport.connect()
        listed = await transport.list_dead_letters(f"{prefix}.*", 10)
        assert [(d.address, d.payload) for d in listed] == [
            (f"{prefix}.eu", b"eu"),
            (f"{prefix}.us", b"us"),
        ]
        assert await transport.replay_dead_letters(f"{prefix}.*", 10) == 2
        state = (await nc.jsm().stream_info(name, subjects_filter=">")).state
        assert state.subjects == {f"{prefix}.eu": 1, f"{prefix}.us": 1}, "each to its subject"
    finally:
        await transport.close()
        await nc.jsm().delete_stream(name)
        await nc.close()


async def test_a_replay_beside_a_consumer_that_fails_them_again_ends() -> None:
    """The replay moves the messages stored when it started, once each, and ends, though
    a running consumer dead-letters each replayed message again at once."""
    n = 300
    subject, durable = await dead_letter(n)
    moved = await replay_beside_a_failing_consumer(
        NatsTransport([], options()), NatsTransport([subject], options(durable)), subject, n
    )
    assert moved == n + 1
    assert await count(subject + ".dlq") == n + 1  # each failed again: for the next
