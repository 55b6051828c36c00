"""``amgi dead-letters`` on SQS (moto): messages the runtime moved to ``<queue>-dlq`` are
listed (and stay), replayed to the queue (sent, then deleted from the dead-letter
queue); a replay killed with SIGKILL half-way loses none."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest

from amgi.servers.sqs import SqsOptions, SqsTransport
from tests.moto_env import ENDPOINT, use_moto_credentials
from tests.ops.helpers import (
    ROOT,
    amgi,
    dead_letter_all,
    kill_replay_when,
    one_line_error,
    replay_beside_a_failing_consumer,
    take,
)

pytestmark = pytest.mark.timeout(120)

SQS = ("--server", "sqs", "--endpoint-url", ENDPOINT)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_moto_credentials(monkeypatch)


def options() -> SqsOptions:
    return SqsOptions(endpoint_url=ENDPOINT, wait_time=1, visibility_timeout=30)


async def dead_letter(
    n: int, headers: list[tuple[bytes, bytes]] | None = None, attempts: int = 1
) -> str:
    """A new queue whose ``n`` messages the runtime dead-lettered to ``<queue>-dlq``
    (headers ``n: i``, or ``headers``) after ``attempts`` deliveries."""
    queue = f"t-{uuid.uuid4().hex[:12]}"
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        await admin.client.create_queue(QueueName=queue)
        await asyncio.gather(
            *(admin.publish(queue, headers or [(b"n", b"%d" % i)], b"%d" % i, {}) for i in range(n))
        )
    finally:
        await admin.close()
    # One receive at a time: moto hands a message to two receives in flight at once now and
    # then (it marks messages received without its lock), which dead-letters it twice.
    # Short polls: a long poll the stop cancels goes on in the broker for up to its wait
    # time, and would take (hide for the visibility timeout) what a test sends next.
    dead_lettering = SqsTransport([queue], replace(options(), receivers=1, wait_time=0))
    await dead_letter_all(dead_lettering, n, max_attempts=attempts, retry_delay=0)
    # The runtime counts a dead letter when it settles the batch, also when moving it
    # failed (it then waits in the queue, hidden): check where every message is.
    assert await depths(queue) == (0, 0), "not every message left the queue"
    assert await depths(queue + "-dlq") == (n, 0), "not every message reached the dead letters"
    return queue


async def depths(queue: str) -> tuple[int, int]:
    """``(visible, in flight)`` messages of ``queue``."""
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        url = (await admin.client.get_queue_url(QueueName=queue))["QueueUrl"]
        found = (
            await admin.client.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
        )["Attributes"]
    finally:
        await admin.close()
    return (
        int(found["ApproximateNumberOfMessages"]),
        int(found["ApproximateNumberOfMessagesNotVisible"]),
    )


async def bodies(queue: str) -> list[str]:
    """Take every message off ``queue`` (deleting them) and return their bodies."""
    transport = SqsTransport([], options())
    await transport.connect()
    found: list[str] = []
    try:
        url = (await transport.client.get_queue_url(QueueName=queue))["QueueUrl"]
        while True:
            got = (
                await transport.client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
            ).get("Messages", [])
            if not got:
                return found
            found += [m["Body"] for m in got]
            await transport.client.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)
                ],
            )
    finally:
        await transport.close()


def aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS")}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return amgi(*args, *SQS, cwd=ROOT, env=aws())


async def test_list_and_replay_from_the_command_line() -> None:
    queue = await dead_letter(4)
    listed = await asyncio.to_thread(run, "dead-letters", "list", queue, "--limit", "10")
    assert listed.returncode == 0, listed.stderr
    assert f"4 dead letter(s) of {queue!r} shown (sqs)" in listed.stdout
    assert listed.stdout.count("reason:  refused") == 4
    assert listed.stdout.count("attempts=1 ") == 4, "the dead letter's last attempt"
    assert "headers: n=" in listed.stdout
    again = await asyncio.to_thread(run, "dead-letters", "list", queue, "--limit", "10")
    assert f"4 dead letter(s) of {queue!r} shown" in again.stdout, "listing must leave them"
    replay = await asyncio.to_thread(run, "dead-letters", "replay", queue, "--limit", "3")
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 3 dead letter(s) to {queue!r}" in replay.stdout
    assert len(await bodies(queue)) == 3
    assert len(await bodies(queue + "-dlq")) == 1


def test_replay_to_a_queue_that_does_not_exist_is_one_line() -> None:
    result = run("dead-letters", "replay", f"gone-{uuid.uuid4().hex[:8]}")
    assert "does not exist" in one_line_error(result)


async def test_replay_killed_half_way_loses_no_dead_letter() -> None:
    n = 60
    queue = await dead_letter(n)
    hold = 2  # seconds the killed replay's last chunk stays hidden in the dead letters
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        url = (await admin.client.get_queue_url(QueueName=queue))["QueueUrl"]

        async def moved_some() -> bool:
            found = await admin.client.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
            )
            return int(found["Attributes"]["ApproximateNumberOfMessages"]) > 0

        await kill_replay_when(
            moved_some, queue, *SQS, "--visibility-timeout", str(hold), env=aws()
        )
    finally:
        await admin.close()
    moved = await bodies(queue)
    assert 0 < len(moved) < n, "killed too late to test anything"
    # What the killed replay held becomes visible again after ``hold`` seconds, counted
    # from when the broker served its last receive, which can lag the kill on a busy
    # machine: wait until the dead-letter queue holds nothing in flight.
    await asyncio.sleep(hold)
    deadline = time.monotonic() + 30
    while (await depths(queue + "-dlq"))[1]:
        assert time.monotonic() < deadline, "the killed replay's chunk never came back"
        await asyncio.sleep(0.2)
    finish = await asyncio.to_thread(run, "dead-letters", "replay", queue)
    assert finish.returncode == 0, finish.stderr
    later = await bodies(queue)
    assert await depths(queue + "-dlq") == (0, 0), "the replay left dead letters behind"
    missing = {str(i) for i in range(n)} - set(moved) - set(later)
    where = f"queue {await depths(queue)}, dead letters {await depths(queue + '-dlq')}"
    assert not missing, f"dead letters lost: {sorted(missing)} (visible, in flight: {where})"
    assert len(moved) + len(later) <= n + 10, "more duplicates than one unconfirmed chunk"
    assert await bodies(queue + "-dlq") == []


@pytest.mark.parametrize(
    "headers",
    [
        [(b"kind", b"order"), (b"count", b"3")],  # one attribute each
        [(b"n", b"1"), (b"n", b"2")],  # a repeated name: packed into one attribute
    ],
)
async def test_a_replayed_dead_letter_is_a_first_attempt_with_only_its_own_headers(
    headers: list[tuple[bytes, bytes]],
) -> None:
    queue = await dead_letter(2, headers, attempts=2)
    listed = await asyncio.to_thread(run, "dead-letters", "list", queue)
    assert listed.stdout.count("attempts=2 ") == 2, listed.stdout
    replay = await asyncio.to_thread(run, "dead-letters", "replay", queue)
    assert replay.returncode == 0, replay.stderr
    messages = await take(SqsTransport([queue], options()), 2)
    assert sorted(m.payload for m in messages) == [b"0", b"1"]
    for m in messages:
        assert m.attempt == 1
        assert m.headers == headers


async def test_a_replay_says_how_many_dead_letters_another_reader_holds() -> None:
    queue = await dead_letter(3)
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        url = (await admin.client.get_queue_url(QueueName=queue + "-dlq"))["QueueUrl"]
        held = await admin.client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=60
        )
        assert len(held.get("Messages", [])) == 1
    finally:
        await admin.close()
    replay = await asyncio.to_thread(run, "dead-letters", "replay", queue)
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 2 dead letter(s) to {queue!r}" in replay.stdout
    assert "about 1 dead letter(s)" in replay.stderr
    assert "held by another reader" in replay.stderr


async def test_a_replay_beside_a_consumer_that_fails_them_again_ends() -> None:
    """The replay moves as many dead letters as were there when it started, and ends,
    though a running consumer dead-letters each replayed message again at once."""
    n = 40
    queue = await dead_letter(n)
    consumer = SqsTransport([queue], replace(options(), receivers=1, wait_time=0))
    moved = await replay_beside_a_failing_consumer(SqsTransport([], options()), consumer, queue, n)
    assert moved == n + 1
    assert await depths(queue + "-dlq") == (n + 1, 0)  # each failed again: for the next


async def test_a_dead_letter_of_another_producer_whose_amgi_headers_do_not_decode() -> None:
    """The queue's own redrive policy moves another producer's message as it arrived;
    the server delivers one whose ``amgi-headers`` is not packed headers as it arrived,
    and so do list and replay. Before, such a dead letter failed both ("unexpected
    ValueError"): nothing was listed or replayed, and what they took stayed hidden."""
    queue = f"t-{uuid.uuid4().hex[:12]}"
    foreign = {"amgi-headers": {"DataType": "Binary", "BinaryValue": b"not packed"}}
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        await admin.client.create_queue(QueueName=queue)
        dlq = (await admin.client.create_queue(QueueName=queue + "-dlq"))["QueueUrl"]
        await admin.client.send_message(
            QueueUrl=dlq, MessageBody="foreign", MessageAttributes=foreign
        )
        await admin.client.send_message(QueueUrl=dlq, MessageBody="plain")
    finally:
        await admin.close()
    listed = await asyncio.to_thread(run, "dead-letters", "list", queue)
    assert listed.returncode == 0, listed.stderr
    assert f"2 dead letter(s) of {queue!r} shown" in listed.stdout
    assert "amgi-headers=" in listed.stdout
    replay = await asyncio.to_thread(run, "dead-letters", "replay", queue)
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 2 dead letter(s) to {queue!r}" in replay.stdout
    assert await depths(queue + "-dlq") == (0, 0)
    reader = SqsTransport([], options())
    await reader.connect()
    try:
        url = (await reader.client.get_queue_url(QueueName=queue))["QueueUrl"]
        got = (
            await reader.client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageAttributeNames=["All"],
            )
        ).get("Messages", [])
    finally:
        await reader.close()
    back = {m["Body"]: m.get("MessageAttributes") for m in got}
    assert back == {"foreign": foreign, "plain": None}, "sent back as it arrived"


async def fifo_with_dead_letters(admin: SqsTransport) -> tuple[str, str, str]:
    """A new FIFO queue and its dead-letter queue (``<name>-dlq.fifo``): their names, and
    the dead-letter queue's URL."""
    queue = f"t-{uuid.uuid4().hex[:12]}.fifo"
    fifo = {"FifoQueue": "true"}
    await admin.client.create_queue(QueueName=queue, Attributes=fifo)
    dlq = queue.removesuffix(".fifo") + "-dlq.fifo"
    url = (await admin.client.create_queue(QueueName=dlq, Attributes=fifo))["QueueUrl"]
    return queue, dlq, url


async def test_a_replay_keeps_the_order_of_a_fifo_group() -> None:
    """SQS orders a FIFO group by when each SendMessage lands: before, a replay sent the
    dead letters it took (up to 10) all at once, and the group came back in any order."""
    sent = [str(i) for i in range(10)]
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        queue, _, url = await fifo_with_dead_letters(admin)
        for body in sent:
            await admin.client.send_message(
                QueueUrl=url, MessageBody=body, MessageGroupId="g", MessageDeduplicationId=body
            )
    finally:
        await admin.close()
    replay = await asyncio.to_thread(run, "dead-letters", "replay", queue)
    assert replay.returncode == 0, replay.stderr
    assert await bodies(queue) == sent


async def shared_redrive_target(*sources: str) -> tuple[str, dict[str, str]]:
    """A new dead-letter queue and new queues (one per name in ``sources``) whose redrive
    policy names it: its name, and each source's queue name and ARN."""
    tag = uuid.uuid4().hex[:12]
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        url = (await admin.client.create_queue(QueueName=f"t-{tag}-shared"))["QueueUrl"]
        arn = await admin.client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        policy = {"deadLetterTargetArn": arn["Attributes"]["QueueArn"], "maxReceiveCount": "10"}
        queues = {}
        for source in sources:
            name = f"t-{tag}-{source}"
            made = await admin.client.create_queue(
                QueueName=name, Attributes={"RedrivePolicy": json.dumps(policy)}
            )
            found = await admin.client.get_queue_attributes(
                QueueUrl=made["QueueUrl"], AttributeNames=["QueueArn"]
            )
            queues[name] = found["Attributes"]["QueueArn"]
    finally:
        await admin.close()
    return f"t-{tag}-shared", queues


async def test_a_shared_redrive_target_lists_and_replays_only_the_queues_own() -> None:
    """Queues ``a`` and ``b`` redrive to one dead-letter queue. Before, ``list a`` showed
    b's dead letters (labelled ``b``) and ``replay a`` sent them into ``a``, where a's app
    consumed them and ``b`` never saw them again. Now a's list and replay skip them
    (saying so), and leave them visible at once."""
    dlq, queues = await shared_redrive_target("b", "a")
    b, a = queues
    for queue, n in ((b, 3), (a, 2)):  # b's first: a's scan must get past them
        admin = SqsTransport([], options())
        await admin.connect()
        try:
            for i in range(n):
                await admin.publish(queue, [], f"{queue[-1]}{i}".encode(), {})
        finally:
            await admin.close()
        dead_lettering = SqsTransport([queue], replace(options(), receivers=1, wait_time=0))
        await dead_letter_all(dead_lettering, n, max_attempts=1, retry_delay=0)
    assert await depths(dlq) == (5, 0)
    listed = await asyncio.to_thread(run, "dead-letters", "list", a)
    assert listed.returncode == 0, listed.stderr
    assert f"2 dead letter(s) of {a!r} shown" in listed.stdout
    assert "payload: b'a" in listed.stdout
    assert "payload: b'b" not in listed.stdout
    assert f"skipped 3 message(s) in {dlq!r} that came from other queues" in listed.stderr
    assert await depths(dlq) == (5, 0), "visible again at once"
    replay = await asyncio.to_thread(run, "dead-letters", "replay", a)
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 2 dead letter(s) to {a!r}" in replay.stdout
    assert "skipped 3 message(s)" in replay.stderr
    assert sorted(await bodies(a)) == ["a0", "a1"]
    assert await depths(dlq) == (3, 0), "b's stay, visible at once"
    replay_b = await asyncio.to_thread(run, "dead-letters", "replay", b)
    assert f"replayed 3 dead letter(s) to {b!r}" in replay_b.stdout
    assert sorted(await bodies(b)) == ["b0", "b1", "b2"]


async def test_a_dead_letter_sqs_redrove_belongs_to_its_source_queue() -> None:
    """SQS's own redrive policy marks what it moves with ``DeadLetterQueueSourceArn``
    (moto 5 does not: the test adds it to what the transport receives, as AWS would)."""
    dlq, queues = await shared_redrive_target("a", "b")
    a, b = queues
    transport = SqsTransport([], options())
    await transport.connect()
    try:
        url = (await transport.client.get_queue_url(QueueName=dlq))["QueueUrl"]
        for body in ("from-b", "from-a"):
            await transport.client.send_message(QueueUrl=url, MessageBody=body)
        receive = transport.client.receive_message
        source = {"from-a": queues[a], "from-b": queues[b]}

        async def as_aws(**params: Any) -> dict[str, Any]:
            response: dict[str, Any] = await receive(**params)
            for m in response.get("Messages", []):
                m["Attributes"]["DeadLetterQueueSourceArn"] = source[m["Body"]]
            return response

        transport.client.receive_message = as_aws
        listed = await transport.list_dead_letters(a, 10)
        assert [(d.payload, d.address) for d in listed] == [(b"from-a", a)]
        listed = await transport.list_dead_letters(b, 10)
        assert [(d.payload, d.address) for d in listed] == [(b"from-b", b)]
        assert await transport.replay_dead_letters(a, 10) == 1
    finally:
        await transport.close()
    assert await bodies(a) == ["from-a"]
    assert await bodies(dlq) == ["from-b"]


async def test_a_listing_of_a_fifo_dead_letter_queue_says_it_is_partial() -> None:
    """SQS hands out no more of a FIFO group while some of it is received, and a listing
    deletes nothing: it can show only the first 10 of a group. Before, it said "10 dead
    letter(s) shown" of 28 without a word; now it says how many it did not reach, and
    why. Each is shown once, and all are visible again at once."""
    admin = SqsTransport([], options())
    await admin.connect()
    try:
        queue, dlq, url = await fifo_with_dead_letters(admin)
        for group, n in (("g", 25), ("h", 3)):
            for i in range(n):
                await admin.client.send_message(
                    QueueUrl=url,
                    MessageBody=f"{group}{i}",
                    MessageGroupId=group,
                    MessageDeduplicationId=f"{group}{i}",
                )
    finally:
        await admin.close()
    listed = await asyncio.to_thread(run, "dead-letters", "list", queue, "--limit", "20")
    assert listed.returncode == 0, listed.stderr
    assert f"13 dead letter(s) of {queue!r} shown" in listed.stdout
    shown = [line.split()[0] for line in listed.stdout.splitlines() if "attempts=" in line]
    assert len(set(shown)) == 13
    assert "the listing is partial: about 15 message(s)" in listed.stderr
    assert "a listing deletes nothing" in listed.stderr
    assert await depths(dlq) == (28, 0)
