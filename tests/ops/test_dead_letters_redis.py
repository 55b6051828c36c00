"""``amgi dead-letters`` on Redis: entries the runtime moved to ``{stream}.dlq`` are listed
(and stay), replayed to the stream (``XADD``, then ``XDEL``); a replay killed with SIGKILL
between the two loses none."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from amgi.servers.redis import RedisOptions, RedisTransport
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
from tests.servers.redis_helpers import PORT, URL, client, ensure_broker, entries, fresh

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    ensure_broker()


def options() -> RedisOptions:
    return RedisOptions(url=URL, block=0.1)


async def dead_letter(
    n: int, headers: list[tuple[bytes, bytes]] | None = None, attempts: int = 1
) -> str:
    """A new stream whose ``n`` entries (headers ``n: i``, or ``headers``; payload ``i``)
    the runtime dead-lettered to ``{stream}.dlq`` after ``attempts`` deliveries."""
    stream = fresh("dl")
    admin = RedisTransport([], options())
    await admin.connect()
    try:
        for i in range(n):
            await admin.publish(stream, headers or [(b"n", b"%d" % i)], b"%d" % i, {})
    finally:
        await admin.close()
    await dead_letter_all(
        RedisTransport([stream], options()), n, max_attempts=attempts, retry_delay=0
    )
    assert len(await entries(stream + ".dlq")) == n
    return stream


def run(*args: str, url: str = URL) -> subprocess.CompletedProcess[str]:
    return amgi(*args, "--server", "redis", "--url", url, cwd=ROOT)


async def payloads(stream: str, skip: int = 0) -> list[bytes | None]:
    return [p for _, _, p in (await entries(stream))[skip:]]


async def test_list_and_replay_from_the_command_line() -> None:
    stream = await dead_letter(4)
    listed = await asyncio.to_thread(run, "dead-letters", "list", stream, "--limit", "10")
    assert listed.returncode == 0, listed.stderr
    assert f"4 dead letter(s) of {stream!r} shown (redis)" in listed.stdout
    assert listed.stdout.count("reason:  refused") == 4
    assert listed.stdout.count("attempts=1 ") == 4, "the dead letter's last attempt"
    assert "headers: n=0\n" in listed.stdout, "only the message's own headers"
    assert "dead-lettered=unknown" not in listed.stdout, "the entry id tells when"
    again = await asyncio.to_thread(run, "dead-letters", "list", stream, "--limit", "2")
    assert f"2 dead letter(s) of {stream!r} shown" in again.stdout, "listing must leave them"
    replay = await asyncio.to_thread(run, "dead-letters", "replay", stream, "--limit", "3")
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 3 dead letter(s) to {stream!r}" in replay.stdout
    assert await payloads(stream, skip=4) == [b"0", b"1", b"2"], "oldest first, after the 4"
    assert await payloads(stream + ".dlq") == [b"3"]


def test_replay_to_a_stream_that_does_not_exist_is_one_line() -> None:
    result = run("dead-letters", "replay", fresh("gone"))
    assert "does not exist" in one_line_error(result)


def test_an_unreachable_server_is_one_line() -> None:
    from tests.net import free_port

    result = run("dead-letters", "list", "s", url=f"redis://127.0.0.1:{free_port()}/0")
    assert "cannot connect" in one_line_error(result)


async def test_replay_killed_half_way_loses_no_dead_letter() -> None:
    n = 250  # three chunks of at most 100
    stream = await dead_letter(n)
    # The broker never sees the second chunk's XDEL: its entries are back in the stream
    # and still in the dead letters when the replay is killed.
    async with HoldingFront(PORT, b"XDEL", 1) as front:

        async def held() -> bool:
            return front.held.is_set()

        await kill_replay_when(
            held, stream, "--server", "redis", "--url", f"redis://127.0.0.1:{front.port}/0"
        )
    moved = await payloads(stream, skip=n)
    still = await payloads(stream + ".dlq")
    assert (len(moved), len(still)) == (200, n - 100), "one chunk done, one sent only"
    assert set(moved) | set(still) == {b"%d" % i for i in range(n)}, "a dead letter was lost"
    finish = await asyncio.to_thread(run, "dead-letters", "replay", stream)
    assert finish.returncode == 0, finish.stderr
    assert f"replayed {n - 100} dead letter(s)" in finish.stdout
    assert await payloads(stream + ".dlq") == []
    back = await payloads(stream, skip=n)
    assert len(back) == n + 100, "duplicates: exactly the chunk sent but not deleted"
    assert set(back) == {b"%d" % i for i in range(n)}


@pytest.mark.parametrize(
    "headers",
    [
        [(b"kind", b"order"), (b"count", b"3")],
        [(b"n", b"1"), (b"n", b"2"), (b"payload", b"a header named payload")],
    ],
)
async def test_a_replayed_dead_letter_is_a_first_attempt_with_only_its_own_headers(
    headers: list[tuple[bytes, bytes]],
) -> None:
    stream = await dead_letter(2, headers, attempts=2)
    listed = await asyncio.to_thread(run, "dead-letters", "list", stream)
    assert listed.stdout.count("attempts=2 ") == 2, listed.stdout
    replay = await asyncio.to_thread(run, "dead-letters", "replay", stream)
    assert replay.returncode == 0, replay.stderr
    messages = await take(RedisTransport([stream], options()), 2)  # the group that gave up
    assert sorted(m.payload or b"" for m in messages) == [b"0", b"1"]
    for m in messages:
        assert m.attempt == 1
        assert m.headers == headers


def test_bad_addresses_are_one_line() -> None:
    stream = fresh("dl")
    assert "cannot be replayed to a Pub/Sub channel" in one_line_error(
        run("dead-letters", "replay", stream, "--mode", "pubsub")
    )
    assert "is its own dead-letter stream" in one_line_error(
        run("dead-letters", "list", stream, "--dead-letter-stream", "{address}")
    )


async def test_a_key_that_is_not_a_stream_is_one_line() -> None:
    key = fresh("text")
    redis = await client()
    try:
        await redis.set(key, "x")
        result = await asyncio.to_thread(run, "dead-letters", "list", key)
        assert f"key {key!r} is a string, not a stream" in one_line_error(result)
    finally:
        await redis.delete(key)
        await redis.aclose()


async def test_a_refused_replay_stops_with_one_line_and_keeps_every_dead_letter() -> None:
    stream = await dead_letter(2)
    user, password = fresh("user"), uuid.uuid4().hex
    redis = await client()
    # A user who may read and delete but not XADD: Redis refuses every send back.
    await redis.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "-xadd"
    )
    try:
        url = f"redis://{user}:{password}@127.0.0.1:{PORT}/0"
        result = await asyncio.to_thread(run, "dead-letters", "replay", stream, url=url)
    finally:
        await redis.execute_command("ACL", "DELUSER", user)
        await redis.aclose()
    line = one_line_error(result)
    assert "stopped after 0 dead letter(s)" in line
    assert "no permissions to run the 'xadd' command" in line
    assert password not in result.stderr
    assert await payloads(stream + ".dlq") == [b"0", b"1"], "every dead letter stays"
    assert len(await entries(stream)) == 2, "nothing was sent back"


async def test_a_server_that_stops_answering_is_one_line() -> None:
    stream = await dead_letter(1)
    # The broker never sees the first XRANGE, nor anything after it.
    async with HoldingFront(PORT, b"XRANGE", 0) as front:
        result = await asyncio.to_thread(
            run, "dead-letters", "list", stream, "--connect-timeout", "1",
            url=f"redis://127.0.0.1:{front.port}/0",
        )  # fmt: skip
    line = one_line_error(result)
    assert f"cannot read {stream + '.dlq'!r}: no answer within 1 s" in line


async def test_a_replay_beside_a_consumer_that_fails_them_again_ends() -> None:
    """The replay moves the entries there when it started, once each, and ends, though a
    running consumer dead-letters each replayed entry again at once."""
    n = 300
    stream = await dead_letter(n)
    moved = await replay_beside_a_failing_consumer(
        RedisTransport([], options()), RedisTransport([stream], options()), stream, n
    )
    assert moved == n + 1
    assert len(await entries(stream + ".dlq")) == n + 1  # each failed again: for the next


async def test_a_dead_letter_whose_time_is_out_of_range_is_still_listed() -> None:
    """An entry id is any number a client gives ``XADD``: one whose time no date can hold
    made ``list`` fail as a whole ('unexpected ValueError: year ... is out of range')."""
    stream = await dead_letter(1)
    c = await client()
    try:
        rows = await c.execute_command("XRANGE", stream + ".dlq", "-", "+")
        fields = rows[0][1]
        await c.execute_command("XADD", stream + ".dlq", "999999999999999-0", *fields)
    finally:
        await c.aclose()
    listed = await asyncio.to_thread(run, "dead-letters", "list", stream)
    assert listed.returncode == 0, listed.stderr
    assert f"2 dead letter(s) of {stream!r} shown (redis)" in listed.stdout
    assert "dead-lettered=999999999999.999 s since the epoch" in listed.stdout, listed.stdout
