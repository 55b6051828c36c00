"""The HTTP server's inbox (pure queue logic on one event loop): batches per address, the
batch size, a multi-message request never split, answers when the last message settles."""

from __future__ import annotations

import asyncio
import logging

import pytest

from amgi.servers.http._inbox import Inbox
from amgi.transport import DeadLetter, Retry, Settlement


async def test_one_batch_a_take_the_address_waiting_longest_first() -> None:
    """One batch a take (the runtime takes one only with a free slot, so what is not
    taken stays here, where a client that goes away can withdraw it); the address
    waiting longest goes first, and what one over the batch size left waits behind the
    others."""
    inbox = Inbox()
    for i, address in enumerate(["a", "b", "a", "a", "c"]):
        inbox.submit_one(address, [], str(i).encode())
    taken = []
    for _ in range(4):
        (batch,) = await asyncio.wait_for(inbox.take(2), 1)
        taken.append((batch.address, [m.payload for m in batch.messages]))
    assert taken == [("a", [b"0", b"2"]), ("b", [b"1"]), ("c", [b"4"]), ("a", [b"3"])]
    assert inbox.waiting == 0


async def test_withdrawn_requests_are_never_taken_and_a_multi_message_one_still_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = Inbox()
    many = inbox.submit([("a", [], b"1", {}, 1), ("b", [], b"2", {}, 1)])
    one = inbox.submit_one("b", [], b"3")
    kept = inbox.submit_one("b", [], b"4")
    (a,) = await inbox.take(10)
    with caplog.at_level(logging.WARNING, "amgi.servers.http"):
        assert inbox.withdraw([many, one]) == 2  # the client of both went away
    for future in (many, one):
        future.cancel()  # as its listener does: nobody to answer
    (b,) = await inbox.take(10)
    assert [m.payload for m in b.messages] == [b"4"]
    with caplog.at_level(logging.WARNING, "amgi.servers.http"):
        inbox.settle(Settlement(acked=[*a.messages, *b.messages]), "a")
    assert kept.result() == []
    assert inbox.waiting == 0
    dropped, settled = [r.getMessage() for r in caplog.records]
    assert dropped.startswith("http: 2 message(s) dropped before the app took them")
    assert "1 request(s) of 'a' settled after their client went away" in settled  # "many"


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
    batches = {b.address: b for _ in range(2) for b in await inbox.take(10)}
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
