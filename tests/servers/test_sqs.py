"""The SQS transport against moto's server (scripts/brokers/moto.sh): mapping and semantics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from amgi.errors import BrokerUnavailable, ConfigurationError
from amgi.runtime import Runtime, RuntimeConfig
from amgi.servers.sqs import SqsOptions, SqsSendError, SqsTransport
from amgi.servers.sqs._client import send_each
from amgi.transport import Batch, DeadLetter, Retry, Settlement
from tests.apps import attempts_app
from tests.moto_env import ENDPOINT, enforce_iam, iam_user, private_moto, use_moto_credentials


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_moto_credentials(monkeypatch)


def options(**overrides: Any) -> SqsOptions:
    base: dict[str, Any] = {"endpoint_url": ENDPOINT, "wait_time": 2, "visibility_timeout": 30}
    base.update(overrides)
    return SqsOptions(**base)


@pytest.fixture
async def admin() -> AsyncIterator[SqsTransport]:
    """A sending-only transport whose client also creates and inspects queues."""
    transport = SqsTransport([], options())
    await transport.connect()
    yield transport
    await transport.close()


NewQueue = Callable[..., Awaitable[str]]


@pytest.fixture
def new_queue(admin: SqsTransport) -> NewQueue:
    async def create(fifo: bool = False, **attributes: str) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
        if fifo:
            attributes["FifoQueue"] = "true"
        await admin.client.create_queue(QueueName=name, Attributes=attributes)
        return name

    return create


@pytest.fixture
async def consumer() -> AsyncIterator[Callable[..., Awaitable[SqsTransport]]]:
    made: list[SqsTransport] = []

    async def make(*queues: str, **overrides: Any) -> SqsTransport:
        transport = SqsTransport(list(queues), options(**overrides))
        await transport.connect()
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


async def counts(admin: SqsTransport, name: str) -> tuple[int, int]:
    """(visible, in flight) messages of queue ``name``."""
    url = (await admin.client.get_queue_url(QueueName=name))["QueueUrl"]
    found = (
        await admin.client.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    )["Attributes"]
    return (
        int(found["ApproximateNumberOfMessages"]),
        int(found["ApproximateNumberOfMessagesNotVisible"]),
    )


async def fetch_n(transport: SqsTransport, n: int, timeout: float = 15) -> list[Batch]:
    """Fetch until ``n`` messages arrived (or fail after ``timeout``)."""
    batches: list[Batch] = []
    async with asyncio.timeout(timeout):
        while sum(len(b.messages) for b in batches) < n:
            batches.extend(await transport.fetch())
    return batches


async def receive_raw(admin: SqsTransport, name: str, n: int, timeout: float = 15) -> list[Any]:
    """Receive ``n`` raw messages of queue ``name`` (which may not exist yet)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        try:
            url = (await admin.client.get_queue_url(QueueName=name))["QueueUrl"]
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # poll with a deadline
    while len(got) < n and time.monotonic() < deadline:
        response = await admin.client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        )
        got.extend(response.get("Messages", []))
    return got


# -- the message mapping ---------------------------------------------------------------


async def test_headers_payload_and_bindings_round_trip(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue()
    sent: list[tuple[list[tuple[bytes, bytes]], bytes | None]] = [
        ([(b"text", b"hello"), (b"count", b"42"), (b"raw", b"\xff\x00\x01")], b"plain text"),
        ([], b"\x00\x01\xfe binary"),
        ([(b"k", b"v")], b""),
        ([], None),
    ]
    for headers, payload in sent:
        await admin.publish(
            name, headers, payload, {"sqs": {"attribute_types": {"count": "Number"}}}
        )
    transport = await consumer(name)
    batches = await fetch_n(transport, len(sent))
    received = {m.payload: m for b in batches for m in b.messages}
    assert set(received) == {p for _, p in sent}
    first = received[b"plain text"]
    assert sorted(first.headers) == sorted(sent[0][0])
    assert first.attempt == 1
    sqs = first.bindings["sqs"]
    assert sqs["attribute_types"] == {"text": "String", "count": "Number", "raw": "Binary"}
    assert sqs["message_id"] == first.id
    assert sqs["attributes"]["ApproximateReceiveCount"] == "1"
    assert received[b""].headers == [(b"k", b"v")]
    assert received[None].headers == []
    for b in batches:
        assert b.key is None  # standard queue: no ordering key
        await transport.settle(b, Settlement(acked=list(b.messages)))


async def test_headers_sqs_cannot_carry_one_by_one_travel_packed(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue()
    cases = [
        [(b"trace", b"1"), (b"trace", b"2"), (b"bin", b"\x00\x01")],
        [(b"bad name!", b"1"), (b"\xff", b"x")],
        [(f"h{i}".encode(), b"v") for i in range(11)],
    ]
    for i, headers in enumerate(cases):
        await admin.publish(name, headers, b"%d" % i, {})
    transport = await consumer(name)
    batches = await fetch_n(transport, len(cases))
    got = {m.payload: m.headers for b in batches for m in b.messages}
    assert got == {b"%d" % i: headers for i, headers in enumerate(cases)}


def empty_attributes(raw: dict[str, Any]) -> list[str]:
    """The message attributes of a raw SQS message that have an empty value."""
    return [
        name
        for name, a in (raw.get("MessageAttributes") or {}).items()
        if not a.get("StringValue", a.get("BinaryValue"))
    ]


async def test_an_empty_header_value_travels_packed(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """SQS refuses an attribute whose value is empty ("Message (user) attribute 'e' must
    contain a non-empty value of type 'String'"); moto takes it, so what moto stored is
    checked. Before, such a header (or an empty nack reason on a dead letter) was sent
    as an empty attribute: every send of it failed, and the dead letter was never sent."""
    name = await new_queue()
    headers = [(b"empty", b""), (b"k", b"v")]
    await admin.publish(name, headers, b"x", {})
    await admin.publish(
        name, [(b"bin", b"")], b"y", {"sqs": {"attribute_types": {"bin": "Binary"}}}
    )
    raw = await receive_raw(admin, name, 2)
    assert [empty_attributes(r) for r in raw] == [[], []]
    await admin._change_visibility(
        await admin._queue(name, create=False), [(r["ReceiptHandle"], 0) for r in raw]
    )
    transport = await consumer(name)
    batches = await fetch_n(transport, 2)
    got = {m.payload: m.headers for b in batches for m in b.messages}
    assert got == {b"x": headers, b"y": [(b"bin", b"")]}
    (first,) = [m for b in batches for m in b.messages if m.payload == b"x"]
    (batch,) = [b for b in batches if first in b.messages]
    rest = [m for m in batch.messages if m is not first]
    await transport.settle(batch, Settlement(acked=rest, dead=[DeadLetter(first, "")]))
    (dead,) = await receive_raw(admin, f"{name}-dlq", 1)
    assert empty_attributes(dead) == []


@pytest.mark.parametrize("name", [b"aws.trace", b"amazon.id", b"Aws.x", b"AMAZON.y"])
async def test_a_header_named_with_a_reserved_prefix_in_any_case_travels_packed(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any, name: bytes
) -> None:
    """SQS refuses attribute names that start with AWS. or Amazon. in any casing; moto
    takes them, so the names moto stored are checked. Before, only the exact casings
    were packed: a header aws.trace failed every send on SQS."""
    queue = await new_queue()
    headers = [(name, b"1"), (b"k", b"v")]
    await admin.publish(queue, headers, b"x", {})
    (raw,) = await receive_raw(admin, queue, 1)
    stored = [n.lower() for n in raw.get("MessageAttributes") or {}]
    assert not [n for n in stored if n.startswith(("aws.", "amazon."))]
    await admin._change_visibility(
        await admin._queue(queue, create=False), [(raw["ReceiptHandle"], 0)]
    )
    transport = await consumer(queue)
    (batch,) = await fetch_n(transport, 1)
    assert batch.messages[0].headers == headers


async def test_send_errors_are_send_errors(admin: SqsTransport, new_queue: NewQueue) -> None:
    name = await new_queue()
    with pytest.raises(SqsSendError, match="not valid SQS text"):
        await admin.publish(
            name, [(b"n", b"\xff")], b"x", {"sqs": {"attribute_types": {"n": "Number"}}}
        )
    with pytest.raises(SqsSendError, match="does not exist"):
        await admin.publish(f"missing-{uuid.uuid4().hex[:8]}", [], b"x", {})
    with pytest.raises(SqsSendError, match="could not send"):
        # Over the largest message SQS takes (1 MiB): the broker's own error.
        await admin.publish(name, [], b"x" * 1_100_000, {})
    assert await counts(admin, name) == (0, 0)


@pytest.mark.parametrize(
    ("sqs", "error"),
    [
        ({"delay_seconds": 9999}, "delay_seconds must be a whole number from 0 to 900, not 9999"),
        ({"delay_seconds": 1.5}, "delay_seconds must be a whole number from 0 to 900, not 1.5"),
        ({"delay_seconds": -1}, "delay_seconds must be a whole number from 0 to 900, not -1"),
        ({"delay_seconds": "5"}, "delay_seconds must be a whole number"),
        ({"message_group_id": {"a": 1}}, "message_group_id must be 1 to 128 ASCII .* not dict"),
        ({"message_group_id": 42}, "message_group_id must be 1 to 128 ASCII .* not int"),
        ({"message_group_id": "a b"}, "message_group_id must be 1 to 128 ASCII .* not 'a b'"),
        ({"message_group_id": "g" * 129}, "message_group_id must be .* not a text of 129 char"),
        ({"message_deduplication_id": ""}, "message_deduplication_id must be 1 to 128"),
        ({"message_deduplication_id": "é"}, "message_deduplication_id must be 1 to 128"),
        ({"attribute_types": "Number"}, "attribute_types must be a dict of header name"),
        ({"attribute_types": {"a": 5}}, r"attribute_types\['a'\] must be String, Number or"),
        ({"attribute_types": {"a": "Nope"}}, r"attribute_types\['a'\] must be String, Number"),
        ({"attribute_types": {1: "Number"}}, "attribute_types names must be str, not 1"),
    ],
)
async def test_a_send_binding_sqs_would_refuse_or_we_would_coerce_fails_before_sending(
    admin: SqsTransport, new_queue: NewQueue, sqs: dict[str, Any], error: str
) -> None:
    """Each was once rounded, str()-ed, passed to SQS as is, or raised a bare error."""
    name = await new_queue()
    with pytest.raises(SqsSendError, match=f"cannot send to {name!r}: sqs.{error}"):
        await admin.publish(name, [(b"a", b"1")], b"x", {"sqs": sqs})
    assert await counts(admin, name) == (0, 0)


async def test_a_fifo_queue_takes_no_delay_per_message(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue(fifo=True)
    with pytest.raises(SqsSendError, match="delay_seconds cannot be set per message on a FIFO"):
        await admin.publish(name, [], b"x", {"sqs": {"delay_seconds": 5}})
    await admin.publish(name, [], b"no delay", {"sqs": {"delay_seconds": 0}})
    transport = await consumer(name)
    (batch,) = await fetch_n(transport, 1)
    assert [m.payload for m in batch.messages] == [b"no delay"]


async def test_send_bindings_delay_and_fifo_ids(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue(fifo=True)
    await admin.publish(
        name,
        [],
        b"one",
        {"sqs": {"message_group_id": "g1", "message_deduplication_id": "d1"}},
    )
    # Same deduplication id: SQS drops it.
    await admin.publish(
        name, [], b"dup", {"sqs": {"message_group_id": "g1", "message_deduplication_id": "d1"}}
    )
    await admin.publish(name, [], b"no ids given", {})
    transport = await consumer(name)
    batches = await fetch_n(transport, 2)
    by_payload = {m.payload: (b, m) for b in batches for m in b.messages}
    assert set(by_payload) == {b"one", b"no ids given"}
    batch, m = by_payload[b"one"]
    assert m.bindings["sqs"]["message_group_id"] == "g1"
    assert m.bindings["sqs"]["message_deduplication_id"] == "d1"
    assert "sequence_number" in m.bindings["sqs"]
    assert batch.key == (name, "g1")
    for b in batches:
        await transport.settle(b, Settlement(acked=list(b.messages)))

    plain = await new_queue()
    started = time.monotonic()
    await admin.publish(plain, [], b"later", {"sqs": {"delay_seconds": 2}})
    reader = await consumer(plain)
    (delayed,) = await fetch_n(reader, 1)
    assert time.monotonic() - started >= 1.5
    await reader.settle(delayed, Settlement(acked=list(delayed.messages)))


# -- settlement ------------------------------------------------------------------------


async def test_ack_deletes_and_retry_comes_back_with_the_next_attempt(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue()
    for i in range(25):
        await admin.publish(name, [], b"%d" % i, {})
    transport = await consumer(name)
    batches = await fetch_n(transport, 25)
    assert all(len(b.messages) <= 10 for b in batches)
    retried = None
    for b in batches:
        if retried is None:
            retried = b.messages[0]
            await transport.settle(
                b, Settlement(acked=b.messages[1:], retry=[Retry(retried, "try again", 1.0)])
            )
        else:
            await transport.settle(b, Settlement(acked=list(b.messages)))
    assert retried is not None
    (again,) = await fetch_n(transport, 1)
    assert [m.payload for m in again.messages] == [retried.payload]
    assert again.messages[0].attempt == 2
    await transport.settle(again, Settlement(acked=list(again.messages)))
    assert await counts(admin, name) == (0, 0)


async def test_a_delete_sqs_fails_for_its_own_reasons_is_sent_again(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """DeleteMessageBatch may fail an entry on SQS's side (``SenderFault`` false:
    InternalError, ServiceUnavailable). Before, that acked message was left in the queue
    with a warning and delivered again; the entry is now sent once more."""
    name = await new_queue()
    for i in range(3):
        await admin.publish(name, [], b"%d" % i, {})
    transport = await consumer(name)
    batches = await fetch_n(transport, 3)
    client = transport.client
    real = client.delete_message_batch

    async def first_entry_fails_once(**kwargs: Any) -> Any:
        client.delete_message_batch = real  # the next calls go straight through
        first, *rest = kwargs["Entries"]
        answer = await real(**{**kwargs, "Entries": rest})
        failed = {"Id": first["Id"], "SenderFault": False, "Code": "InternalError"}
        return {**answer, "Failed": [*answer.get("Failed", []), failed]}

    client.delete_message_batch = first_entry_fails_once
    batch = Batch(name, [m for b in batches for m in b.messages], None, batches[0].context)
    await transport.settle(batch, Settlement(acked=list(batch.messages)))
    assert await counts(admin, name) == (0, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


@pytest.mark.parametrize("how", ["call fails", "entry refused"])
async def test_an_ack_sqs_did_not_delete_uses_up_no_attempt(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any, how: str
) -> None:
    """An acked message SQS did not delete comes back; the receive that brings it is no
    attempt of its own. Before, it counted: an ack the app gave could so lead the message
    to the dead letters (an endpoint failing deletes for a while)."""
    name = await new_queue()
    await admin.publish(name, [], b"a", {})
    transport = await consumer(name, visibility_timeout=2)
    (batch,) = await fetch_n(transport, 1)
    client = transport.client
    real = client.delete_message_batch

    async def fails_once(**kwargs: Any) -> Any:
        client.delete_message_batch = real  # the next calls go straight through
        if how == "call fails":
            raise BrokerUnavailable("the endpoint is down")
        (entry,) = kwargs["Entries"]
        return {"Failed": [{"Id": entry["Id"], "SenderFault": True, "Code": "AccessDenied"}]}

    client.delete_message_batch = fails_once
    with contextlib.suppress(BrokerUnavailable):
        await transport.settle(batch, Settlement(acked=list(batch.messages)))
    (again,) = await fetch_n(transport, 1, timeout=15)  # after the visibility timeout
    assert [(m.payload, m.attempt) for m in again.messages] == [(b"a", 1)]
    await transport.settle(again, Settlement(acked=list(again.messages)))
    assert await counts(admin, name) == (0, 0)


async def test_dead_letter_without_redrive_goes_to_the_dlq_with_reason(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue()
    await admin.publish(
        name,
        [(b"h", b"1"), (b"n", b"7")],
        b"\xff bad",
        {"sqs": {"attribute_types": {"n": "Number"}}},
    )
    transport = await consumer(name)
    (batch,) = await fetch_n(transport, 1)
    await transport.settle(batch, Settlement(dead=[DeadLetter(batch.messages[0], "it broke")]))
    assert await counts(admin, name) == (0, 0)
    # The dead letter reads back as the original message, plus the reason and source.
    reader = await consumer(f"{name}-dlq")
    (again,) = await fetch_n(reader, 1)
    dead = again.messages[0]
    assert dead.payload == b"\xff bad"
    assert sorted(dead.headers) == [
        (b"amgi-dead-letter-reason", b"it broke"),
        (b"amgi-original-address", name.encode()),
        (b"h", b"1"),
        (b"n", b"7"),
    ]
    assert dead.bindings["sqs"]["attribute_types"]["n"] == "Number"


async def test_dead_letter_uses_the_queues_redrive_target(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    target = await new_queue()
    target_url = (await admin.client.get_queue_url(QueueName=target))["QueueUrl"]
    arn = (
        await admin.client.get_queue_attributes(QueueUrl=target_url, AttributeNames=["QueueArn"])
    )["Attributes"]["QueueArn"]
    name = await new_queue(
        RedrivePolicy=json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "10"})
    )
    await admin.publish(name, [], b"doomed", {})
    transport = await consumer(name)
    (batch,) = await fetch_n(transport, 1)
    await transport.settle(batch, Settlement(dead=[DeadLetter(batch.messages[0], "no way")]))
    (dead,) = await receive_raw(admin, target, 1)
    assert dead["Body"] == "doomed"
    assert dead["MessageAttributes"]["amgi-dead-letter-reason"]["StringValue"] == "no way"


async def test_a_dead_letter_queue_deleted_while_consuming_is_made_again(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """The ``-dlq`` queue the server made is deleted (a cleanup, a purge by hand) while it
    consumes. Before, its URL stayed cached: every dead letter after that failed (it does
    not exist) until a restart, each message coming back to fail again."""
    name = await new_queue()
    for payload in (b"one", b"two"):
        await admin.publish(name, [], payload, {})
    transport = await consumer(name, max_messages=1)
    # Two receives are in flight at once: either message may come first.
    first, second = await fetch_n(transport, 2)
    await transport.settle(first, Settlement(dead=[DeadLetter(first.messages[0], "x")]))
    dlq = (await admin.client.get_queue_url(QueueName=f"{name}-dlq"))["QueueUrl"]
    await admin.client.delete_queue(QueueUrl=dlq)
    dead = DeadLetter(second.messages[0], "y")
    await transport.settle(second, Settlement(dead=[dead]))
    assert dead.error == ""
    after = (second.messages[0].payload or b"").decode()
    assert {first.messages[0].payload, second.messages[0].payload} == {b"one", b"two"}
    assert [m["Body"] for m in await receive_raw(admin, f"{name}-dlq", 1)] == [after]
    assert await counts(admin, name) == (0, 0)


async def test_fifo_keeps_group_order_and_stops_a_group_at_its_first_failure(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue(fifo=True)
    for i in range(4):
        for group in ("a", "b"):
            await admin.publish(
                name, [], f"{group}{i}".encode(), {"sqs": {"message_group_id": group}}
            )
    transport = await consumer(name)
    batches = await fetch_n(transport, 8)
    by_group: dict[str, list[bytes | None]] = {}
    for b in batches:
        assert isinstance(b.key, tuple)
        by_group.setdefault(b.key[1], []).extend(m.payload for m in b.messages)
    assert by_group == {"a": [b"a0", b"a1", b"a2", b"a3"], "b": [b"b0", b"b1", b"b2", b"b3"]}
    for b in batches:
        if b.key == (name, "a"):
            # a1 fails; a2 and a3 were acked by the app but must wait behind it.
            ms = b.messages
            await transport.settle(
                b, Settlement(acked=[ms[0], *ms[2:]], retry=[Retry(ms[1], "a1 failed", 0.0)])
            )
        else:
            await transport.settle(b, Settlement(acked=list(b.messages)))
    again = await fetch_n(transport, 3)
    assert [m.payload for b in again for m in b.messages] == [b"a1", b"a2", b"a3"]
    assert again[0].messages[0].attempt == 2
    for b in again:
        await transport.settle(b, Settlement(acked=list(b.messages)))
    assert await counts(admin, name) == (0, 0)


async def test_messages_held_behind_a_fifo_failure_or_released_use_up_no_attempt(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """SQS counts every receive. A message held behind its group's failure (acked by the
    app) or handed back unseen came back one attempt further each time, and at
    --max-attempts was delivered alone and dead-lettered at its first failure, or with
    the crash ledger off dead-lettered unseen: for another message's failure. Its
    releases are taken off the count now."""
    name = await new_queue(fifo=True)
    for payload in (b"bad", b"held", b"unseen"):
        await admin.publish(name, [], payload, {"sqs": {"message_group_id": "g"}})
    transport = await consumer(name)
    seen: list[tuple[bytes | None, int]] = []
    for _ in range(3):
        (batch,) = await fetch_n(transport, 3)
        bad, held, unseen = batch.messages
        seen += [(m.payload, m.attempt) for m in batch.messages]
        retry = [Retry(bad, "bad", 0.0), Retry(unseen, "stopped", 0.0, uncounted=True)]
        await transport.settle(batch, Settlement(acked=[held], retry=retry))
    assert [a for p, a in seen if p == b"bad"] == [1, 2, 3]
    assert [a for p, a in seen if p != b"bad"] == [1, 1, 1, 1, 1, 1], seen


async def test_dead_letters_of_a_fifo_group_keep_its_order(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """SQS orders a FIFO group by when each SendMessage lands: before, the dead letters
    of one settlement were sent all at once and reached the dead-letter queue in any
    order (e.g. 0 1 3 2 ...)."""
    name = await new_queue(fifo=True)
    sent = [b"%d" % i for i in range(10)]
    for payload in sent:
        await admin.publish(name, [], payload, {"sqs": {"message_group_id": "g"}})
    transport = await consumer(name)
    for b in await fetch_n(transport, len(sent)):
        await transport.settle(b, Settlement(dead=[DeadLetter(m, "no") for m in b.messages]))
    dlq = name.removesuffix(".fifo") + "-dlq.fifo"
    reader = await consumer(dlq)
    dead = [m.payload for b in await fetch_n(reader, len(sent)) for m in b.messages]
    assert dead == sent


@pytest.mark.parametrize("fifo", [True, False])
async def test_send_each_sends_a_fifo_queue_in_order_and_stops_at_its_first_failure(
    fifo: bool,
) -> None:
    """The one rule of dead letters and replays: to a FIFO queue one send at a time and
    none after a failure; to a standard queue all at once, each outcome kept."""
    started: list[int] = []
    gate = asyncio.Event()

    async def send(i: int) -> int:
        started.append(i)
        if not fifo:
            await gate.wait()  # all at once: every send starts before any ends
        if i == 1:
            raise SqsSendError("refused")
        return i

    sending = asyncio.ensure_future(send_each(fifo, send, [0, 1, 2]))
    await asyncio.sleep(0)
    gate.set()
    outcomes = await sending
    assert started == ([0, 1] if fifo else [0, 1, 2])
    assert [o if isinstance(o, int) else "failed" for o in outcomes] == (
        [0, "failed"] if fifo else [0, "failed", 2]
    )


async def test_content_deduplication_takes_no_distinct_payloads_for_duplicates(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """Content-based deduplication hashes the body alone. Before, payloads whose bodies
    are alike were dropped as duplicates: b"", None and b"-" (all "-"), b"\\x00\\x01\\x02"
    and the text b"AAEC" (its base64). A payload sent twice is still dropped."""
    name = await new_queue(fifo=True, ContentBasedDeduplication="true")
    sent = [b"", None, b"-", b"AAEC", b"\x00\x01\x02"]
    for payload in [*sent, b"AAEC", b"", b"\x00\x01\x02"]:
        await admin.publish(name, [], payload, {})
    assert await counts(admin, name) == (len(sent), 0), "one of each payload, no repeat"
    transport = await consumer(name)
    got = [m.payload for b in await fetch_n(transport, len(sent)) for m in b.messages]
    assert got == sent


async def test_short_polls_of_an_idle_queue_pause(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """``--wait-time 0`` (short polling): SQS answers at once when it has nothing. Before,
    the server polled again at once, as fast as the endpoint answered, for as long as the
    queue stayed idle (277 receives in 2 s against moto, each billed on SQS)."""
    name = await new_queue()
    transport = await consumer(name, wait_time=0)
    client = transport.client
    real = client.receive_message
    calls = 0

    async def counted(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real(**kwargs)

    client.receive_message = counted
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            await transport.fetch()
    assert 1 <= calls <= 8  # 2 receivers, a receive a second each
    await admin.publish(name, [], b"m", {})
    (batch,) = await fetch_n(transport, 1)
    await transport.settle(batch, Settlement(acked=list(batch.messages)))


async def test_extend_keeps_a_long_batch_invisible(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    name = await new_queue()
    url = (await admin.client.get_queue_url(QueueName=name))["QueueUrl"]
    await admin.publish(name, [], b"slow", {})
    transport = await consumer(name, visibility_timeout=2)
    assert transport.lease_interval == 2 / 3
    (batch,) = await fetch_n(transport, 1)
    for _ in range(4):  # 4 s in all: twice the visibility timeout
        await asyncio.sleep(1)  # time passing is what is under test
        await transport.extend([batch])
        stolen = await admin.client.receive_message(QueueUrl=url, WaitTimeSeconds=0)
        assert stolen.get("Messages", []) == []
    await transport.settle(batch, Settlement(acked=list(batch.messages)))
    assert await counts(admin, name) == (0, 0)


def hold_the_lease(transport: SqsTransport) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold back the transport's next visibility change (that one only) on its way to
    moto; returns ``sent`` (set once the call is made) and ``release`` (lets it go on)."""
    client = transport.client
    real = client.change_message_visibility_batch
    sent, release = asyncio.Event(), asyncio.Event()

    async def held(**kwargs: Any) -> Any:
        client.change_message_visibility_batch = real  # the next calls go straight through
        sent.set()
        await release.wait()
        return await real(**kwargs)

    client.change_message_visibility_batch = held
    return sent, release


async def test_a_lease_that_meets_an_ack_reports_nothing(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An extension on its way when the batch is acked lands after the delete: SQS refuses
    it (the handles are gone), which is expected and not a warning."""
    name = await new_queue()
    await admin.publish(name, [], b"a", {})
    transport = await consumer(name)
    (batch,) = await fetch_n(transport, 1)
    sent, release = hold_the_lease(transport)
    lease = asyncio.create_task(transport.extend([batch]))
    await sent.wait()
    await transport.settle(batch, Settlement(acked=list(batch.messages)))
    release.set()
    await lease
    assert await counts(admin, name) == (0, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


@pytest.mark.parametrize("settled", [False, True])
async def test_a_close_ends_a_lease_extension_that_hangs_at_once(
    admin: SqsTransport, new_queue: NewQueue, settled: bool
) -> None:
    """The stop cancels the runtime's lease loop while an extension hangs on its way (a
    half-open connection). Before, the close waited a lease interval for it (200 s at a
    600 s visibility timeout: the runtime cut the close off, exit 1, the message left
    hidden) before making the messages visible again, and with nothing left to release
    it left the extension running, owned by no one, past the client's close."""
    name = await new_queue()
    await admin.publish(name, [], b"a", {})
    transport = SqsTransport([name], options(visibility_timeout=600))
    await transport.connect()
    (batch,) = await fetch_n(transport, 1)
    sent, _ = hold_the_lease(transport)  # never let go
    lease = asyncio.create_task(transport.extend([batch]))
    await sent.wait()
    lease.cancel()  # as the stop cancels the runtime's lease loop
    await asyncio.gather(lease, return_exceptions=True)
    if settled:
        await transport.settle(batch, Settlement(acked=list(batch.messages)))
    async with asyncio.timeout(15):  # 200 s before, with a message to release
        await transport.close()
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert left == []
    assert await counts(admin, name) == ((0, 0) if settled else (1, 0))


async def test_a_retry_settled_while_a_lease_is_on_its_way_keeps_its_delay(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """The retry's 1 s delay is sent after the extension (30 s) lands, not undone by it."""
    name = await new_queue()
    await admin.publish(name, [], b"r", {})
    transport = await consumer(name, visibility_timeout=30)
    (batch,) = await fetch_n(transport, 1)
    sent, release = hold_the_lease(transport)
    lease = asyncio.create_task(transport.extend([batch]))
    await sent.wait()
    retry = Retry(batch.messages[0], "later", 1.0)
    settling = asyncio.create_task(transport.settle(batch, Settlement(retry=[retry])))
    await asyncio.sleep(0.2)  # the settle is waiting for the extension, not sending yet
    assert not settling.done()
    release.set()
    await asyncio.gather(lease, settling)
    (again,) = await fetch_n(transport, 1, timeout=10)  # 30 s had the order been wrong
    assert [m.payload for m in again.messages] == [b"r"]
    assert again.messages[0].attempt == 2
    await transport.settle(again, Settlement(acked=list(again.messages)))


async def test_a_retry_delay_past_sqss_twelve_hours_is_cut_to_the_time_left(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SQS hides a message at most 12 hours from its receive and refuses a visibility
    past that. Before, a longer delay was cut to 43200 s, always past it: the call was
    refused (moto: all of it, so the other retry of the batch lost its 1 s delay too) and
    both came back after the visibility timeout, their delays ignored."""
    name = await new_queue()
    for payload in (b"later", b"soon"):
        await admin.publish(name, [], payload, {})
    transport = await consumer(name, visibility_timeout=30)
    batches = await fetch_n(transport, 2)  # one receive or two: settled as one batch
    batch = Batch(name, [m for b in batches for m in b.messages], None, batches[0].context)
    by_payload = {m.payload: m for m in batch.messages}
    retries = [Retry(by_payload[b"later"], "a day", 86400.0), Retry(by_payload[b"soon"], "x", 1.0)]
    await transport.settle(batch, Settlement(retry=retries))
    (again,) = await fetch_n(transport, 1, timeout=10)  # 30 s had the delay been lost
    assert [m.payload for m in again.messages] == [b"soon"]
    await transport.settle(again, Settlement(acked=list(again.messages)))
    assert await counts(admin, name) == (0, 1)  # "later" stays hidden
    assert [r.error for r in retries] == ["", ""]
    assert "12 hours" in caplog.text


async def test_a_retry_sqs_refuses_is_reported_as_not_scheduled(
    admin: SqsTransport, new_queue: NewQueue, consumer: Any
) -> None:
    """A retry delay SQS refuses for one message (its receipt handle went stale: another
    consumer received or deleted it) is not scheduled, and the runtime's report says so.
    Before, it was only a warning of the transport's, and the report said "retrying in
    5s"; the other retry of the call is scheduled."""
    name = await new_queue()
    for payload in (b"gone", b"kept"):
        await admin.publish(name, [], payload, {})
    transport = await consumer(name)
    batches = await fetch_n(transport, 2)  # one receive or two: settled as one batch
    batch = Batch(name, [m for b in batches for m in b.messages], None, batches[0].context)
    by_payload = {m.payload: m for m in batch.messages}
    url = (await admin.client.get_queue_url(QueueName=name))["QueueUrl"]
    await admin.client.delete_message(QueueUrl=url, ReceiptHandle=by_payload[b"gone"].token)
    retries = [Retry(by_payload[p], "later", 5.0) for p in (b"gone", b"kept")]
    await transport.settle(batch, Settlement(retry=retries))
    assert "ReceiptHandleIsInvalid" in retries[0].error
    assert retries[1].error == ""
    assert await counts(admin, name) == (0, 1)  # "kept" waits for its delay


# -- bad input -------------------------------------------------------------------------


async def test_unknown_queue_is_one_clear_error() -> None:
    transport = SqsTransport([f"missing-{uuid.uuid4().hex[:8]}"], options())
    with pytest.raises(ConfigurationError, match=r"queue 'missing-\w+' does not exist"):
        await transport.connect()


async def test_unreachable_endpoint_is_one_clear_error() -> None:
    transport = SqsTransport(
        ["orders"], options(endpoint_url="http://127.0.0.1:9", connect_timeout=0.5)
    )
    with pytest.raises(BrokerUnavailable, match="cannot reach the SQS endpoint"):
        await transport.connect()


async def test_missing_credentials_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    transport = SqsTransport(["orders"], options())
    with pytest.raises(BrokerUnavailable, match="no usable AWS credentials"):
        await transport.connect()


@pytest.fixture
def checking_moto() -> Iterator[str]:
    """A second moto server, on its own port, that checks every request's credentials."""
    with private_moto(check_credentials=True) as url:
        yield url


async def test_rejected_credentials_are_one_clear_error(checking_moto: str) -> None:
    transport = SqsTransport(["orders"], options(endpoint_url=checking_moto))
    with pytest.raises(
        BrokerUnavailable, match=r"rejected the AWS credentials \(InvalidClientTokenId\)"
    ):
        await transport.connect()


async def test_unknown_profile_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    transport = SqsTransport(["orders"], options(profile="nobody"))
    with pytest.raises(ConfigurationError, match="profile 'nobody' not found"):
        await transport.connect()


@pytest.mark.parametrize(
    ("field", "value"),
    [("wait_time", 21), ("max_messages", 11), ("receivers", 0), ("visibility_timeout", 0)],
)
async def test_bad_options_are_rejected(field: str, value: int) -> None:
    """A visibility timeout of 0 hid nothing: every long poll took the messages in the
    app's hands again, so a message the app held for 3 s was delivered 9 times in 6 s,
    its attempt (SQS's receive count) rising past max_attempts."""
    transport = SqsTransport(["orders"], options(**{field: value}))
    with pytest.raises(ConfigurationError, match=field):
        await transport.connect()


@pytest.mark.parametrize("suffix", ["", ".dlq", "-dlq.fifo", "/dlq"])
async def test_a_dead_letter_suffix_that_names_no_other_queue_is_rejected(suffix: str) -> None:
    """An empty suffix named the queue itself: each dead letter went back to the queue it
    came from and was dead-lettered again at once, for ever (470 deliveries of one
    message in 5 s). Characters SQS refuses in a queue name failed only at the first
    dead letter, and again at every one after."""
    transport = SqsTransport(["orders"], options(dead_letter_suffix=suffix))
    with pytest.raises(ConfigurationError, match="--dead-letter-suffix must be 1 to 80 letters"):
        await transport.connect()


# -- with the runtime ------------------------------------------------------------------


async def test_runtime_acks_retries_and_dead_letters(
    admin: SqsTransport, new_queue: NewQueue
) -> None:
    name = await new_queue()
    for i in range(20):
        await admin.publish(name, [], b"bad" if i == 7 else b"ok %d" % i, {})
    seen: list[tuple[bytes, int]] = []

    transport = SqsTransport([name], options())
    config = RuntimeConfig(max_attempts=3, retry_delay=0.2, retry_delay_max=1.0)
    runtime = Runtime(attempts_app(seen, nack=b"bad"), transport, config)
    task = asyncio.create_task(runtime.serve())
    try:
        async with asyncio.timeout(30):
            while len(seen) < 22:
                await asyncio.sleep(0.05)
        dead = await receive_raw(admin, f"{name}-dlq", 1)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert [a for p, a in seen if p == b"bad"] == [1, 2, 3]
    assert len({p for p, _ in seen}) == 20
    assert dead[0]["MessageAttributes"]["amgi-dead-letter-reason"]["StringValue"] == "bad payload"
    assert await counts(admin, name) == (0, 0)


@pytest.fixture(scope="module")
def iam_moto() -> Iterator[tuple[str, dict[str, tuple[str, str]]]]:
    """A private moto enforcing IAM (its URL) and the keys of its users: ``admin`` may
    make every SQS call, ``no-delete``, ``no-receive``, ``no-create`` and ``no-send``
    all but those."""
    with private_moto() as url:
        users = {
            "admin": iam_user(url, "admin", []),
            "no-delete": iam_user(url, "no-delete", ["sqs:DeleteMessage*"]),
            "no-receive": iam_user(url, "no-receive", ["sqs:ReceiveMessage"]),
            "no-create": iam_user(url, "no-create", ["sqs:CreateQueue"]),
            "no-send": iam_user(url, "no-send", ["sqs:SendMessage"]),
        }
        enforce_iam(url)
        yield url, users


async def denied(
    monkeypatch: pytest.MonkeyPatch,
    iam_moto: tuple[str, dict[str, tuple[str, str]]],
    user: str,
    *,
    dead_letter_queue: bool = False,
) -> str:
    """A new queue of ``iam_moto`` holding one message ``b"a"`` (its name), and its
    ``-dlq`` if ``dead_letter_queue``; the environment's credentials are from now on
    those of ``user``."""
    url, users = iam_moto

    def as_user(name: str) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", users[name][0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", users[name][1])

    as_user("admin")
    name = f"t-{uuid.uuid4().hex[:12]}"
    setup = SqsTransport([], options(endpoint_url=url))
    await setup.connect()
    await setup.client.create_queue(QueueName=name)
    if dead_letter_queue:
        await setup.client.create_queue(QueueName=f"{name}-dlq")
    await setup.publish(name, [], b"a", {})
    await setup.close()
    as_user(user)
    return name


async def run_until_it_ends(runtime: Runtime, timeout: float = 30) -> int:
    """The exit code of ``runtime.serve()``, which must end by itself within ``timeout``."""
    task = asyncio.create_task(runtime.serve())
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(task)
    finally:
        runtime.request_stop()
        await asyncio.wait_for(task, 30)


async def test_deletes_the_caller_may_not_make_end_the_run_with_one_error(
    monkeypatch: pytest.MonkeyPatch, iam_moto: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Credentials that may receive but not delete (an IAM deny on sqs:DeleteMessage):
    every ack fails, for good. Before, the run went on, and each acked message came back
    after every visibility timeout, was processed again and failed to delete again, for
    ever; now the first refusal ends the run with one error naming the permission, and
    the acked message is visible again at once (for credentials that may delete it)."""
    url = iam_moto[0]
    name = await denied(monkeypatch, iam_moto, "no-delete")
    seen: list[tuple[bytes, int]] = []
    transport = SqsTransport([name], options(endpoint_url=url, visibility_timeout=30))
    runtime = Runtime(attempts_app(seen), transport, RuntimeConfig(lifespan="off"))
    assert await run_until_it_ends(runtime) == 1
    assert seen == [(b"a", 1)]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("allow sqs:DeleteMessage" in e for e in errors), errors
    checker = SqsTransport([], options(endpoint_url=url))
    await checker.connect()
    try:
        assert await counts(checker, name) == (1, 0)  # not hidden for 30 s
    finally:
        await checker.close()


@pytest.mark.parametrize(
    ("user", "allow"), [("no-create", "sqs:CreateQueue"), ("no-send", "sqs:SendMessage")]
)
async def test_dead_letters_the_caller_may_not_store_end_the_run_with_one_error(
    monkeypatch: pytest.MonkeyPatch,
    iam_moto: Any,
    caplog: pytest.LogCaptureFixture,
    user: str,
    allow: str,
) -> None:
    """Credentials that may consume but not create the dead-letter queue (no redrive
    policy), or not send to it. Before, every dead letter failed, and its message came
    back after every visibility timeout and was delivered again, past --max-attempts,
    for ever (14 deliveries in 15 s at a 1 s visibility timeout); now the first refusal
    ends the run with one error naming the permission, the message visible again."""
    url = iam_moto[0]
    name = await denied(monkeypatch, iam_moto, user, dead_letter_queue=user == "no-send")
    seen: list[tuple[bytes, int]] = []
    transport = SqsTransport([name], options(endpoint_url=url, visibility_timeout=30))
    config = RuntimeConfig(lifespan="off", max_attempts=1)
    runtime = Runtime(attempts_app(seen, nack=b"a"), transport, config)
    assert await run_until_it_ends(runtime) == 1
    assert seen == [(b"a", 1)]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(allow in e and "dead" in e for e in errors), errors
    checker = SqsTransport([], options(endpoint_url=url))
    await checker.connect()
    try:
        assert await counts(checker, name) == (1, 0)  # not hidden for 30 s
    finally:
        await checker.close()


async def test_receives_the_caller_may_not_make_end_the_run_with_one_error(
    monkeypatch: pytest.MonkeyPatch, iam_moto: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Credentials that may look the queue up but not receive from it (an IAM deny on
    sqs:ReceiveMessage). Before, the run went
    on for ever with one "fetch failed (retrying)" line, consuming nothing; now it ends
    with one error naming the permission."""
    name = await denied(monkeypatch, iam_moto, "no-receive")
    seen: list[tuple[bytes, int]] = []
    transport = SqsTransport([name], options(endpoint_url=iam_moto[0]))
    runtime = Runtime(attempts_app(seen), transport, RuntimeConfig(lifespan="off"))
    assert await run_until_it_ends(runtime) == 1
    assert seen == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("allow sqs:ReceiveMessage" in e for e in errors), errors


async def test_a_slow_app_gets_no_message_twice(
    admin: SqsTransport, new_queue: NewQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages a background long poll took, waiting for the app, stay invisible too.

    6 s per batch, visibility timeout 4 s, one call at a time: before, the messages the
    second long poll held while the first batch ran came back and were delivered twice.
    (The extensions, every 4/3 s, keep 2.7 s of margin: moto, shared by the suites of
    three Python versions at once, has answered one over 1.3 s late.)
    """
    name = await new_queue()
    for i in range(20):
        await admin.publish(name, [], b"m%02d" % i, {})
    seen: list[tuple[bytes, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "message":
            return
        events = []
        more = True
        while more:
            event = await receive()
            events.append(event)
            more = event.get("more_messages", False)
        await asyncio.sleep(6)
        for event in events:
            seen.append((event["payload"], event["bindings"]["amgi"]["attempt"]))
            await send({"type": "message.ack", "id": event["id"]})

    transport = SqsTransport([name], options(visibility_timeout=4, wait_time=1))
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off", concurrency=1))
    task = asyncio.create_task(runtime.serve())
    try:
        deadline = time.monotonic() + 40
        while len({p for p, _ in seen}) < 20:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)
        await asyncio.sleep(4.5)  # a message that came back would be delivered by now
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert sorted(seen) == [(b"m%02d" % i, 1) for i in range(20)]
    assert not [r for r in caplog.records if "ReceiptHandle" in r.getMessage()]
    assert await counts(admin, name) == (0, 0)


async def test_a_one_second_visibility_timeout_keeps_a_message_from_others(
    admin: SqsTransport, new_queue: NewQueue
) -> None:
    """--visibility-timeout 1: the lease was renewed every second (a floor of 1 s), as the
    message became visible again, and another consumer took it while the app had it."""
    name = await new_queue()
    url = (await admin.client.get_queue_url(QueueName=name))["QueueUrl"]
    await admin.publish(name, [], b"slow", {})
    had = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message":
            event = await receive()
            had.set()
            await asyncio.sleep(3)
            await send({"type": "message.ack", "id": event["id"]})

    transport = SqsTransport([name], options(visibility_timeout=1, wait_time=1))
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off"))
    task = asyncio.create_task(runtime.serve())
    stolen: list[Any] = []
    try:
        await asyncio.wait_for(had.wait(), 15)
        for _ in range(50):  # the 3 s the app has it
            got = await admin.client.receive_message(QueueUrl=url, WaitTimeSeconds=0)
            stolen += got.get("Messages", [])
            await asyncio.sleep(0.05)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert stolen == []


async def test_a_lease_extension_that_hangs_does_not_let_the_lease_lapse(
    admin: SqsTransport, new_queue: NewQueue
) -> None:
    """An extension whose answer does not come (a half-open connection: botocore waits
    out its read timeout, wait time + 15 s) is given up after a lease interval, and the
    next one goes out on time. Before, the lease loop waited for it, the visibility
    timeout ran out and another consumer received the message while the app had it."""
    name = await new_queue()
    url = (await admin.client.get_queue_url(QueueName=name))["QueueUrl"]
    had = asyncio.Event()
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        if scope["type"] == "message":
            calls += 1
            event = await receive()
            had.set()
            await asyncio.sleep(5)
            await send({"type": "message.ack", "id": event["id"]})

    transport = SqsTransport([name], options(visibility_timeout=3, wait_time=1))
    runtime = Runtime(app, transport, RuntimeConfig(lifespan="off"))
    task = asyncio.create_task(runtime.serve())
    stolen: list[Any] = []
    try:
        await asyncio.wait_for(runtime.started.wait(), 15)
        _, release = hold_the_lease(transport)  # the first extension hangs
        await admin.publish(name, [], b"slow", {})
        await asyncio.wait_for(had.wait(), 15)
        deadline = time.monotonic() + 5  # the app has it for 5 s
        while time.monotonic() < deadline:
            got = await admin.client.receive_message(QueueUrl=url, WaitTimeSeconds=0)
            stolen += got.get("Messages", [])
            await asyncio.sleep(0.1)
    finally:
        release.set()
        runtime.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert (stolen, calls) == ([], 1)
    assert await counts(admin, name) == (0, 0)


async def stop_while_polling(
    admin: SqsTransport, name: str, runtime: Runtime, seen: list[tuple[bytes, int]]
) -> float:
    """Serve until a first message went through (the polls are in flight again), then
    stop and send ``late`` at once: a poll in flight takes it. Seconds the stop took."""
    task = asyncio.create_task(runtime.serve())
    try:
        await admin.publish(name, [], b"first", {})
        async with asyncio.timeout(15):
            while not seen:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the poll that brought it is out again
    finally:
        started = time.monotonic()
        runtime.request_stop()
    await admin.publish(name, [], b"late", {})
    assert await asyncio.wait_for(task, 30) == 0
    return time.monotonic() - started


async def test_a_stop_processes_what_the_long_polls_in_flight_bring(
    admin: SqsTransport, new_queue: NewQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """SQS cannot call a long poll off: cut off at the client, it still took messages
    (hidden for the visibility timeout, a receive counted each). The stop waits for the
    polls in flight and processes what they bring, on its first attempt."""
    caplog.set_level(logging.INFO, "amgi")
    name = await new_queue()
    seen: list[tuple[bytes, int]] = []
    transport = SqsTransport([name], options(wait_time=3))
    runtime = Runtime(attempts_app(seen), transport, RuntimeConfig(lifespan="off"))
    took = await stop_while_polling(admin, name, runtime, seen)
    assert seen == [(b"first", 1), (b"late", 1)]
    assert await counts(admin, name) == (0, 0)
    assert took < 10
    assert "long poll(s) in flight" in caplog.text


async def test_a_stop_waits_no_longer_than_the_wait_time_for_a_poll_that_never_answers(
    admin: SqsTransport, new_queue: NewQueue
) -> None:
    """SQS answers a long poll within its wait time: one still open after that (an
    endpoint gone, its retries) is cut off, and the stop does not wait out the whole
    shutdown timeout for it."""
    name = await new_queue()
    transport = SqsTransport([name], options(wait_time=1))
    runtime = Runtime(attempts_app([]), transport, RuntimeConfig(lifespan="off"))
    serving = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)

        async def silent(**_: Any) -> Any:
            await asyncio.Event().wait()

        transport.client.receive_message = silent  # type: ignore[method-assign]
        await asyncio.sleep(1.5)  # the polls in flight before have ended: only silent ones
    finally:
        started = time.monotonic()
        runtime.request_stop()
    assert await asyncio.wait_for(serving, 30) == 0
    assert time.monotonic() - started < 8  # 1 s and a little, not the 30 s shutdown timeout


async def test_a_stop_whose_timeout_ends_first_cuts_the_polls_off_and_loses_nothing(
    admin: SqsTransport, new_queue: NewQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """The shutdown timeout bounds the wait: the stop ends in time with one warning and a
    message a cut-off poll took comes back after the visibility timeout."""
    name = await new_queue()
    seen: list[tuple[bytes, int]] = []
    transport = SqsTransport([name], options(wait_time=10, visibility_timeout=2))
    config = RuntimeConfig(lifespan="off", shutdown_timeout=0.5)
    runtime = Runtime(attempts_app(seen), transport, config)
    took = await stop_while_polling(admin, name, runtime, seen)
    assert took < 5
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "the shutdown timeout ended before every delivered message was processed: "
        "the rest goes back to the broker"
    ]
    later: list[tuple[bytes, int]] = []
    again = Runtime(
        attempts_app(later),
        SqsTransport([name], options(wait_time=1, visibility_timeout=2)),
        RuntimeConfig(lifespan="off"),
    )
    task = asyncio.create_task(again.serve())
    try:
        async with asyncio.timeout(20):
            while not later:
                await asyncio.sleep(0.05)
    finally:
        again.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert [p for p, _ in later] == [b"late"]
    assert await counts(admin, name) == (0, 0)


async def test_a_close_with_polls_in_flight_gives_back_what_it_holds_for_good(
    admin: SqsTransport, new_queue: NewQueue
) -> None:
    """A close without a hand-over (a run a refusal ended) cancelled the long polls in
    flight, then made the messages it held visible: a poll cut off at the client goes on
    at the service, took them, and hid them for the visibility timeout (seen in a full
    run of the refusal tests). With messages to give back, the polls end first."""
    name = await new_queue()
    await admin.publish(name, [], b"held", {})
    transport = SqsTransport([name], options(wait_time=2, visibility_timeout=60))
    await transport.connect()
    try:
        async with asyncio.timeout(10):
            (batch,) = await transport.fetch()
            assert [m.payload for m in batch.messages] == [b"held"]
            fetching = asyncio.ensure_future(transport.fetch())  # a poll goes out
            while not [r for r in transport._receives if not r.task.done()]:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # at the service, waiting
            fetching.cancel()
    finally:
        await transport.close()
    await asyncio.sleep(2.5)  # a poll cut off would have taken it by now (its wait time)
    assert await counts(admin, name) == (1, 0)


async def test_batches_a_stop_leaves_unstarted_are_visible_again_at_once(
    admin: SqsTransport, new_queue: NewQueue
) -> None:
    """Batches the shutdown timeout leaves unstarted go back to the queue at close. Before,
    they stayed hidden for the rest of the visibility timeout (60 s here, up to 12 h)."""
    name = await new_queue()
    for i in range(2):
        await admin.publish(name, [], b"m%d" % i, {})
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "message":
            started.set()
            await asyncio.Event().wait()  # holds the one slot until the stop cancels it

    transport = SqsTransport([name], options(wait_time=1, max_messages=1, visibility_timeout=60))
    config = RuntimeConfig(lifespan="off", concurrency=1, shutdown_timeout=0.5, retry_delay=0)
    runtime = Runtime(app, transport, config)
    task = asyncio.create_task(runtime.serve())
    try:
        await asyncio.wait_for(started.wait(), 15)
        deadline = time.monotonic() + 15
        while await counts(admin, name) != (0, 2):  # the second taken, waiting for the slot
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    deadline = time.monotonic() + 10
    while (found := await counts(admin, name)) != (2, 0):
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.2)


def test_a_message_that_kills_the_process_is_the_only_dead_letter(tmp_path: Path) -> None:
    """The receive count rises for every message of the killed batch: the crash ledger
    (stable MessageIds) makes sure only the killer reaches the dead letters."""
    from tests.servers.crash_loop import CrashLoop

    async def prepare() -> str:
        admin = SqsTransport([], options())
        await admin.connect()
        name = f"t-{uuid.uuid4().hex[:12]}"
        await admin.client.create_queue(QueueName=name)
        for i in range(20):
            await admin.publish(name, [], b"kill" if i == 4 else b"m%02d" % i, {})
        await admin.close()
        return name

    name = asyncio.run(prepare())

    async def dead_letters() -> list[Any]:
        admin = SqsTransport([], options())
        await admin.connect()
        try:
            url = (await admin.client.get_queue_url(QueueName=f"{name}-dlq"))["QueueUrl"]
            got = await admin.client.receive_message(QueueUrl=url, MaxNumberOfMessages=10)
            return list(got.get("Messages", []))
        except Exception:
            return []
        finally:
            await admin.close()

    loop = CrashLoop(
        tmp_path, name, "--server", "sqs", "--endpoint-url", ENDPOINT,
        "--visibility-timeout", "1", "--wait-time", "1",
    )  # fmt: skip
    innocent = {f"m{i:02d}" for i in range(20) if i != 4}
    dead: list[Any] = []

    def done() -> bool:
        if set(loop.acked()) != innocent:
            return False
        dead.extend(asyncio.run(dead_letters()))
        return bool(dead)

    kills = loop.run(done)
    assert kills == loop.max_attempts, loop
    assert [d["Body"] for d in dead] == ["kill"]
