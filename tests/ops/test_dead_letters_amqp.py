"""``amgi dead-letters`` on RabbitMQ: messages the runtime dead-lettered into
``<queue>.dead-letter`` are listed (and left there), replayed to the queue (confirmed,
then acked off the dead-letter queue); a replay killed with SIGKILL loses none."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

import pytest

from amgi.servers.amqp import AmqpOptions, AmqpTransport
from tests.ops.helpers import (
    ROOT,
    amgi,
    dead_letter_all,
    kill_replay_when,
    one_line_error,
    replay_beside_a_failing_consumer,
)
from tests.servers.test_amqp_support import URL, drain, queue_depth, rabbitmq

__all__ = ["rabbitmq"]

pytestmark = [pytest.mark.usefixtures("rabbitmq"), pytest.mark.timeout(120)]

AMQP = ("--server", "amqp", "--url", URL)


async def dead_letter(queue: str, n: int) -> None:
    """Send ``n`` messages to ``queue`` and let the runtime dead-letter every one."""
    sender = AmqpTransport([queue], AmqpOptions(url=URL))  # declares the queues
    await sender.connect()
    await sender.close()
    sender = AmqpTransport([], AmqpOptions(url=URL))
    await sender.connect()
    await asyncio.gather(
        *(sender.publish(queue, [(b"n", b"%d" % i)], b"%d" % i, {}) for i in range(n))
    )
    await sender.close()
    await dead_letter_all(AmqpTransport([queue], AmqpOptions(url=URL, batch_size=100)), n)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return amgi(*args, *AMQP, cwd=ROOT)


async def test_list_and_replay_from_the_command_line(amqp_queue: Callable[[], str]) -> None:
    queue = amqp_queue()
    await dead_letter(queue, 5)
    listed = await asyncio.to_thread(run, "dead-letters", "list", queue, "--limit", "3")
    assert listed.returncode == 0, listed.stderr
    assert f"3 dead letter(s) of {queue!r} shown (amqp)" in listed.stdout
    assert listed.stdout.count("reason:  refused") == 3
    assert "attempts=1" in listed.stdout
    assert "headers: n=0" in listed.stdout
    assert await queue_depth(queue + ".dead-letter") == 5, "listing must leave them there"
    replay = await asyncio.to_thread(run, "dead-letters", "replay", queue, "--limit", "2")
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 2 dead letter(s) to {queue!r}" in replay.stdout
    assert await queue_depth(queue + ".dead-letter") == 3
    back = await drain(queue, 2, timeout=10)
    assert sorted(m.body for m in back) == [b"0", b"1"]
    for m in back:
        table = m.header.properties.headers or {}
        assert set(table) == {"n"}, table


def test_replay_to_a_queue_that_does_not_exist_is_one_line() -> None:
    result = run("dead-letters", "replay", "amgi-ops-never-declared")
    assert "does not exist" in one_line_error(result)


async def test_replay_killed_half_way_loses_no_dead_letter(
    amqp_queue: Callable[[], str],
) -> None:
    queue = amqp_queue()
    n = 2000
    await dead_letter(queue, n)

    async def moved_some() -> bool:
        return await queue_depth(queue) > 0

    await kill_replay_when(moved_some, queue, *AMQP)
    # the broker requeues what the killed replay held unacked
    deadline = time.monotonic() + 20
    while (await queue_depth(queue)) + (await queue_depth(queue + ".dead-letter")) < n:
        assert time.monotonic() < deadline, "dead letters are missing"
        await asyncio.sleep(0.1)
    moved = await queue_depth(queue)
    assert 0 < moved < n + 100, "killed too late to test anything"
    assert await queue_depth(queue + ".dead-letter") > 0, "killed too late to test anything"
    back = await drain(queue, moved, timeout=20)
    still = await drain(queue + ".dead-letter", n, timeout=5)
    seen = {m.body for m in back} | {m.body for m in still}
    assert seen == {b"%d" % i for i in range(n)}
    assert len(back) + len(still) <= n + 100, "more duplicates than one unconfirmed chunk"


async def test_a_replay_beside_a_consumer_that_fails_them_again_ends(
    amqp_queue: Callable[[], str],
) -> None:
    """The replay moves the dead letters there when it started, once each. It took the
    copies a running consumer dead-lettered again, and never ended (3,000 dead letters:
    67,915 dead-letterings in 60 s)."""
    queue = amqp_queue()
    n = 500
    await dead_letter(queue, n)
    moved = await replay_beside_a_failing_consumer(
        AmqpTransport([], AmqpOptions(url=URL)),
        AmqpTransport([queue], AmqpOptions(url=URL, batch_size=100)),
        queue,
        n,
    )
    assert moved == n + 1
    assert await queue_depth(queue + ".dead-letter") == n + 1  # failed again: for the next
