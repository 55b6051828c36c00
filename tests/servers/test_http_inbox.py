"""The HTTP server's inbox (pure queue logic on one event loop): batches per address, the
batch size, a multi-message request never split, answers when the last message settles."""

from __future__ import annotations

import asyncio

from amgi.servers.http._inbox import Inbox
from amgi.transport import DeadLetter, Retry, Settlement


async def test_waiting_messages_become_one_batch_per_address_in_arrival_order() -> None:
    inbox = Inbox()
    for i, address in enumerate(["a", "b", "a", "a"]):
        inbox.submit_one(address, [], str(i).encode())
    batches = await asyncio.wait_for(inbox.take(100), 1)
    assert {b.address: [m.payload for m in b.messages] for b in batches} == {
        "a": [b"0", b"2", b"3"],
        "b": [b"1"],
    }
    assert inbox.waiting == 0


async def test_the_batch_size_holds_except_inside_one_request() -> None:
    inbox = Inbox()
    inbox.submit_one("a", [], b"single")
    inbox.submit([("a", [], str(i).encode(), {}, 1) for i in range(3)])
    inbox.submit_one("a", [], b"after")
    (first,) = await inbox.take(2)
    assert [m.payload for m in first.messages] == [b"single", b"0", b"1", b"2"]
    (second,) = await inbox.take(2)
    assert [m.payload for m in second.messages] == [b"after"]


async def test_a_request_is_answered_when_its_last_message_settles() -> None:
    inbox = Inbox()
    many = inbox.submit([("a", [], b"1", {}, 1), ("b", [], b"2", {}, 1)])
    one = inbox.submit_one("a", [], b"3")
    batches = {b.address: b for b in await inbox.take(10)}
    a1, a3 = batches["a"].messages
    (b2,) = batches["b"].messages
    inbox.settle(Settlement(acked=[a1, a3]))
    assert one.result() == []
    assert not many.done()
    inbox.settle(Settlement(dead=[DeadLetter(b2, "bad")]))
    assert many.result() == ["bad"]


async def test_a_nack_is_the_reason_and_close_answers_what_waits() -> None:
    inbox = Inbox()
    nacked = inbox.submit_one("a", [], b"1")
    (batch,) = await inbox.take(10)
    inbox.settle(Settlement(retry=[Retry(batch.messages[0], "try later", 1.0)]))
    assert nacked.result() == ["try later"]
    queued = inbox.submit_one("a", [], b"2")
    inbox.close()
    assert queued.result() is None
    assert inbox.submit_one("a", [], b"3").result() is None
    assert inbox.waiting == 0
