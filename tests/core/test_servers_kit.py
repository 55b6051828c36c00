"""Unit tests of the servers kit: headers, watermark, backoff, republisher, bindings."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.kit import (
    ATTEMPT_HEADER,
    BINDINGS,
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_ADDRESS_HEADER,
    PACKED_HEADER,
    Backoff,
    DelayedRepublisher,
    Refreshed,
    UnknownBinding,
    Watermark,
    attempt_from_headers,
    dead_letter_headers,
    doubling_delay,
    pack_header,
    retry_headers,
    unpack_header,
)
from amgi.servers.kit.bindings import BadBinding, markdown_table, parse, text_value, whole_number

# -- headers -------------------------------------------------------------------------------


def test_dead_letter_headers_have_one_order_and_replace_earlier_internal_headers() -> None:
    headers = [(b"a", b"1"), (ATTEMPT_HEADER, b"2"), (DEAD_LETTER_REASON_HEADER, b"old")]
    out = dead_letter_headers(headers, attempt=5, address="orders", reason="bad input")
    assert out == [
        (b"a", b"1"),
        (ATTEMPT_HEADER, b"5"),
        (ORIGINAL_ADDRESS_HEADER, b"orders"),
        (DEAD_LETTER_REASON_HEADER, b"bad input"),
    ]


def test_a_reason_that_is_not_encodable_is_replaced_not_an_error() -> None:
    out = dead_letter_headers([], attempt=1, address="q", reason="bad \udcff byte")
    assert dict(out)[DEAD_LETTER_REASON_HEADER] == b"bad ? byte"


def test_retry_headers_set_the_attempt_then_the_extras() -> None:
    out = retry_headers([(ATTEMPT_HEADER, b"1"), (b"k", b"v")], attempt=2, extra=[(b"x", b"y")])
    assert out == [(b"k", b"v"), (ATTEMPT_HEADER, b"2"), (b"x", b"y")]
    assert attempt_from_headers(out) == (2, [(b"k", b"v"), (b"x", b"y")])


@pytest.mark.parametrize("value", [b"x", b"0", b"-3", b""])
def test_a_malformed_attempt_header_means_the_first_attempt(value: bytes) -> None:
    assert attempt_from_headers([(ATTEMPT_HEADER, value)]) == (1, [])


# -- watermark -----------------------------------------------------------------------------


def test_watermark_never_passes_an_unsettled_position() -> None:
    mark = Watermark()
    for position in (10, 20, 30, 40):
        mark.add(position)
    assert mark.settle([20, 30]) is None  # 10 is still out
    assert mark.settle([10]) == 30
    assert mark.outstanding == 1
    assert mark.settle([40]) == 40
    assert mark.outstanding == 0


def test_watermark_forgets_on_clear() -> None:
    mark = Watermark()
    mark.add(1)
    mark.add(2)
    mark.clear()
    assert mark.outstanding == 0
    mark.add(3)
    assert mark.settle([3]) == 3


def test_a_position_handed_out_twice_must_be_settled_twice() -> None:
    mark = Watermark()
    for position in (100, 200, 200):  # the batch ending at 200 was refetched
        mark.add(position)
    assert mark.settle([200]) is None
    assert mark.settle([200]) is None
    assert mark.settle([100]) == 200
    assert mark.outstanding == 0


def test_watermark_of_consecutive_positions_needs_no_add() -> None:
    mark = Watermark(first=1)
    assert mark.settle([2, 3]) is None
    assert mark.outstanding == 2
    assert mark.settle([1]) == 3
    assert mark.settle([5]) is None
    assert mark.settle([4]) == 5
    with pytest.raises(TypeError):
        mark.add(6)


# -- backoff -------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.delay == 0.5


def test_backoff_refuses_a_zero_delay_and_caps_the_first_by_the_maximum() -> None:
    with pytest.raises(ValueError, match="positive"):
        Backoff(0, 1)
    assert Backoff(1.0, 0.25).failed() == 0.25


def test_doubling_delay_per_attempt() -> None:
    assert [doubling_delay(1.0, a, 5.0) for a in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    # 2.0 ** 1029 overflowed: a nack at attempt 1030 (--max-attempts 5000) failed its batch.
    assert [doubling_delay(0.5, a, 30.0) for a in (1030, 10**9)] == [30.0, 30.0]


async def test_backoff_sleep_waits_then_doubles() -> None:
    backoff = Backoff(0.01, 1.0)
    await backoff.sleep()
    assert backoff.delay == 0.02


# -- delayed republisher -------------------------------------------------------------------


async def test_republisher_runs_a_send_after_its_delay() -> None:
    republisher = DelayedRepublisher("test")
    sent = asyncio.Event()

    async def send() -> None:
        sent.set()

    republisher.schedule(0.01, send)
    assert republisher.pending == 1
    await asyncio.wait_for(sent.wait(), 5)
    await republisher.close()
    assert republisher.pending == 0


async def test_close_cancels_waiting_retries_and_waits_for_publishing_ones() -> None:
    republisher = DelayedRepublisher("test")
    started = asyncio.Event()
    release = asyncio.Event()
    finished: list[str] = []

    async def slow_send() -> None:
        started.set()
        await release.wait()
        finished.append("slow")

    async def never() -> None:  # pragma: no cover - must be cancelled before it runs
        finished.append("never")

    republisher.schedule(0, slow_send)
    republisher.schedule(3600, never)
    await asyncio.wait_for(started.wait(), 5)
    closing = asyncio.create_task(republisher.close(timeout=5))
    await asyncio.sleep(0.01)
    assert not closing.done()  # waits for the publishing one
    release.set()
    await asyncio.wait_for(closing, 5)
    assert finished == ["slow"]
    assert republisher.pending == 0
    with pytest.raises(RuntimeError, match="closed"):
        republisher.schedule(0, never)


async def test_close_cancels_a_publish_that_outlives_the_timeout() -> None:
    republisher = DelayedRepublisher("test")
    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        await asyncio.Event().wait()

    republisher.schedule(0, stuck)
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(republisher.close(timeout=0.01), 5)
    assert republisher.pending == 0


async def test_a_failing_send_is_logged_and_does_not_escape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    republisher = DelayedRepublisher("test-server")
    done = asyncio.Event()

    async def broken() -> None:
        done.set()
        raise OSError("gone")

    republisher.schedule(0, broken)
    await asyncio.wait_for(done.wait(), 5)
    await republisher.close(timeout=5)
    assert "test-server: a delayed republish failed" in caplog.text


# -- bindings ------------------------------------------------------------------------------


def test_binding_values_parse_as_json_and_bytes_keys_take_text() -> None:
    assert parse("kafka", "key", "k1") == b"k1"
    assert parse("kafka", "key", '"k1"') == b"k1"
    assert parse("kafka", "partition", "3") == 3
    assert parse("mqtt", "correlationData", "abc") == b"abc"
    assert parse("amqp", "routingKey", "rk") == "rk"


@pytest.mark.parametrize(
    ("protocol", "key", "text", "value"),
    [
        # A text or bytes key takes the text as written: a number, true or {...} is text.
        ("amqp", "messageId", "123", "123"),
        ("amqp", "correlationId", "true", "true"),
        ("nats", "msgId", '{"a": 1}', '{"a": 1}'),
        ("kafka", "key", "123", b"123"),
        ("kafka", "key", "[1, 2]", b"[1, 2]"),
        # ... unless it is a JSON string (its quotes dropped) or null (no value).
        ("amqp", "messageId", '"123"', "123"),
        ("amqp", "messageId", '" padded "', " padded "),
        ("kafka", "key", "null", None),
        # Other keys take JSON when it parses.
        ("amqp", "expiration", "60000", 60000),
        ("mqtt", "retain", "true", True),
        ("sqs", "attribute_types", '{"n": "Number"}', {"n": "Number"}),
        ("redis", "maxlen", "abc", "abc"),
    ],
)
def test_text_and_bytes_keys_take_what_was_written(
    protocol: str, key: str, text: str, value: object
) -> None:
    assert parse(protocol, key, text) == value


def test_a_packed_header_unpacks_to_itself_and_other_values_stay_headers() -> None:
    for name, value in [(b"\xff\xfe", b"v"), (b"", b""), (b"a\nb", b"\x00\x85"), (b"n" * 300, b"")]:
        assert unpack_header(pack_header(name, value)) == (name, value)
        assert unpack_header(pack_header(name, value).encode()) == (name, value)
    for other in ("plain text", "no.base64!", "YQ==", "YQ==.%%%", ""):
        assert unpack_header(other) is None
    assert PACKED_HEADER == "amgi-b64"


def test_a_sent_binding_value_is_checked_with_one_message_naming_key_and_rule() -> None:
    assert whole_number("p", "n", 5, 0, 9) == 5
    for bad in (True, 5.0, "5", -1, 10, None):
        with pytest.raises(BadBinding, match=r"^p\.n must be a whole number from 0 to 9, not "):
            whole_number("p", "n", bad, 0, 9)
    pattern = re.compile("[a-z]+")
    assert text_value("p", "t", "abc", pattern=pattern, rule="lower case") == "abc"
    with pytest.raises(BadBinding, match=r"^p\.t must be lower case, not 'aBc'$"):
        text_value("p", "t", "aBc", pattern=pattern, rule="lower case")
    with pytest.raises(BadBinding, match=r"^p\.t must be lower case, not bytes$"):
        text_value("p", "t", b"abc", pattern=pattern, rule="lower case")
    with pytest.raises(BadBinding, match=r"^p\.t must be lower case, not a text of 61 char"):
        text_value("p", "t", "A" * 61, pattern=pattern, rule="lower case")
    assert issubclass(BadBinding, ValueError)


@pytest.mark.parametrize(
    ("protocol", "key", "message"),
    [
        ("mqtt", "correlation_data", "mqtt has no binding 'correlation_data'"),
        ("nosuch", "key", "unknown binding protocol 'nosuch'"),
        ("kafka", "offset", "set by the server on receive"),
    ],
)
def test_unknown_or_receive_only_binding_keys_are_refused(
    protocol: str, key: str, message: str
) -> None:
    with pytest.raises(UnknownBinding, match=message):
        parse(protocol, key, "1")


def test_the_bindings_table_renders_one_row_per_protocol() -> None:
    table = markdown_table()
    for protocol in BINDINGS:
        assert f"| `{protocol}` |" in table
    assert "`correlationData`" in table


# -- FIFO groups ---------------------------------------------------------------------------


def test_held_behind_holds_the_rest_of_a_group_after_its_first_failure() -> None:
    from amgi.servers.kit.fifo import held_behind

    messages = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5), ("c", 6)]
    failed = {3, 5}
    held = held_behind(messages, lambda m: m[1] in failed, lambda m: m[0])
    assert {m[1]: held[id(m)][1] for m in messages if id(m) in held} == {4: 3}


async def test_move_aside_dead_letters_a_refused_retry_and_backs_off_a_refused_dead_letter() -> (
    None
):
    from amgi.servers.kit import Backoff, move_aside
    from amgi.transport import DeadLetter, Message, Retry, Settlement

    a, b, c = (Message(x, [], b"") for x in "abc")
    settlement = Settlement(retry=[Retry(a, "nope", 1.0), Retry(b, "no", 1.0)])
    settlement.dead.append(DeadLetter(c, "bad"))
    retried: list[str] = []
    dead: list[tuple[str, str]] = []
    refusals = {"c": 2}

    async def retry(r: Retry) -> None:
        if r.message.id == "a":
            raise OSError("too large")
        retried.append(r.message.id)

    async def dead_letter(d: DeadLetter) -> None:
        if refusals.get(d.message.id):
            refusals[d.message.id] -= 1
            raise OSError("refused")
        dead.append((d.message.id, d.reason))

    left = await move_aside(
        settlement, retry=retry, dead=dead_letter, address="q", backoff=Backoff(0.01, 0.02)
    )
    assert left == []
    assert retried == ["b"]  # b copied once, not again while c was tried again
    assert dead == [("a", "nope (its retry could not be published: too large)"), ("c", "bad")]

    refusals["c"] = 100
    tries = 0

    def give_up() -> bool:
        nonlocal tries
        tries += 1
        return tries > 3

    left = await move_aside(
        Settlement(dead=[DeadLetter(c, "bad")]),
        retry=retry,
        dead=dead_letter,
        address="q",
        give_up=give_up,
        backoff=Backoff(0.01, 0.02),
    )
    assert left == [c]


async def test_move_aside_keeps_a_transiently_refused_retry_and_reports_each_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry refused for the moment (``transient``) is not dead-lettered: it stays
    pending and its retry is tried again. Each try records on the settlement what became
    of the copy (the runtime's report reads it), and a later success says so."""
    from amgi.servers.kit import Backoff, move_aside, unmoved
    from amgi.transport import DeadLetter, Fate, Message, Retry, Settlement

    class NotYet(OSError):
        pass

    a, b, c = (Message(x, [], b"") for x in "abc")
    settlement = Settlement(retry=[Retry(a, "slow", 1.0), Retry(b, "big", 1.0)])
    settlement.dead.append(DeadLetter(c, "bad"))
    refusals = {"a": NotYet("no confirm"), "b": OSError("too large"), "c": OSError("full")}
    retried: list[str] = []
    dead: list[str] = []

    async def retry(r: Retry) -> None:
        if r.message.id in refusals:
            raise refusals[r.message.id]
        retried.append(r.message.id)

    async def dead_letter(d: DeadLetter) -> None:
        if d.message.id in refusals and d.message.id != "b":
            raise refusals[d.message.id]
        dead.append(d.message.id)

    def moved(part: Settlement, give_up: bool) -> Any:
        return move_aside(
            part,
            retry=retry,
            dead=dead_letter,
            address="q",
            give_up=lambda: give_up,
            backoff=Backoff(0.01, 0.02),
            transient=lambda exc: isinstance(exc, NotYet),
        )

    assert await moved(settlement, give_up=True) == [a, c]
    assert (retried, dead) == ([], ["b"]), "a transient refusal is no dead letter"
    r_a, r_b = settlement.retry
    assert (r_a.error, r_a.dead) == ("no confirm", None)
    assert r_b.error == "too large"
    assert r_b.dead is not None
    assert r_b.dead.fate is Fate.STORED
    assert r_b.dead.reason == "big (its retry could not be published: too large)"
    (d_c,) = settlement.dead
    assert (d_c.fate, d_c.error) == (Fate.KEPT, "full")

    del refusals["a"], refusals["c"]
    caplog.clear()
    caplog.set_level(logging.WARNING, "amgi.servers.kit")
    assert await moved(unmoved(settlement, [a, c]), give_up=False) == []
    assert (retried, dead) == (["a"], ["b", "c"])
    assert (r_a.error, r_a.dead, d_c.fate) == ("", None, Fate.STORED)
    assert [r.getMessage() for r in caplog.records] == [
        "message a of 'q': its retry is published",
        "message c of 'q': its dead letter is stored",
    ]


async def test_move_aside_dead_letters_a_retry_refused_for_now_longer_than_transient_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry refused for now, try after try (a retry queue that never takes a copy),
    stays unacknowledged only until ``transient_for`` seconds after ``since``: then it
    is dead-lettered once, with a reason that says for how long; a dead letter refused
    then is kept and tried again as usual. Not before the bound."""
    import functools
    import time

    from amgi.servers.kit import Backoff, move_aside
    from amgi.transport import DeadLetter, Fate, Message, Retry, Settlement

    class NotYet(OSError):
        pass

    a = Message("a", [], b"")
    tries: list[float] = []
    dead: list[tuple[float, str]] = []
    dead_refusals = 1

    async def retry(r: Retry) -> None:
        tries.append(time.monotonic())
        raise NotYet("queue full")

    async def dead_letter(d: DeadLetter) -> None:
        nonlocal dead_refusals
        if dead_refusals:
            dead_refusals -= 1
            raise OSError("dead letters full")
        dead.append((time.monotonic(), d.reason))

    moved = functools.partial(
        move_aside,
        retry=retry,
        dead=dead_letter,
        address="q",
        backoff=Backoff(0.01, 0.02),
        transient=lambda exc: isinstance(exc, NotYet),
        transient_for=0.2,
    )

    caplog.set_level(logging.ERROR, "amgi.servers.kit")
    settlement = Settlement(retry=[Retry(a, "slow", 1.0)])
    started = time.monotonic()
    assert await moved(settlement, since=started) == []
    assert len(tries) > 3, "refused for now: tried again, not dead-lettered at once"
    ((when, reason),) = dead
    assert when - started >= 0.2
    assert re.fullmatch(r"slow \(its retry was refused for 0\.\ds: queue full\)", reason)
    (r,) = settlement.retry
    assert r.dead is not None
    assert r.dead.fate is Fate.STORED
    lines = [r.getMessage() for r in caplog.records]
    pattern = r"message a of 'q': its retry was refused for 0\.\ds \(queue full\); dead-"
    assert any(re.fullmatch(pattern + "lettering it", line) for line in lines)
    assert "message a of 'q' could not be dead-lettered: dead letters full" in lines
    assert lines[0].endswith("it stays unacknowledged (dead-lettered if still refused after 0.2s)")

    # A try in the background after the bound dead-letters at its first try.
    tries.clear()
    dead.clear()
    assert await moved(Settlement(retry=[Retry(a, "slow", 1.0)]), since=time.monotonic() - 1) == []
    assert len(tries) == 1
    assert [reason for _, reason in dead] == ["slow (its retry was refused for 1.0s: queue full)"]


async def test_refreshed_reads_only_once_asked_keeps_the_last_value_and_stops_on_close() -> None:
    current: int | Exception = 1
    count = 0

    async def read() -> int:
        nonlocal count
        count += 1
        if isinstance(current, Exception):
            raise current
        return current

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.001)

    figure = Refreshed("test figure", 0.001, read)
    await asyncio.sleep(0.01)
    assert count == 0, "nothing is read before anyone asks"
    assert figure.get() is None, "nothing read yet"
    await until(lambda: figure.get() == 1)
    current = RuntimeError("broker gone")
    failing_from = count
    await until(lambda: count > failing_from + 1)
    assert figure.get() == 1, "a failed read keeps the last value"
    current = 3
    await until(lambda: figure.get() == 3)
    await figure.close()
    stopped_at = count
    await asyncio.sleep(0.01)
    assert figure.get() == 3
    await asyncio.sleep(0.01)
    assert count == stopped_at, "no read after close, and get() starts none"


def test_an_untrusted_certificate_is_found_in_the_chain_of_causes() -> None:
    import ssl

    from amgi.servers.kit import untrusted_certificate

    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate"
    outer = ConnectionError("Error 1 connecting")
    outer.__cause__ = ConnectionError("wrapped")
    outer.__cause__.__context__ = refused
    assert untrusted_certificate(outer) == "self-signed certificate"
    assert untrusted_certificate(refused) == "self-signed certificate"
    assert untrusted_certificate(ConnectionError("refused")) is None
    assert untrusted_certificate("no server answered") is None


def test_a_dead_letters_reason_is_bounded() -> None:
    """An exception's text may hold a whole payload: a reason of 300,000 characters made
    a dead letter SQS refuses (256 KiB with its attributes), which then came back for
    ever. The start is kept, and how long it was."""
    reason = "the application raised ValueError: bad " + "x" * 300_000
    out = dict(dead_letter_headers([], attempt=3, address="q", reason=reason))
    kept = out[DEAD_LETTER_REASON_HEADER].decode()
    assert kept.startswith("the application raised ValueError: bad xxx")
    assert kept.endswith(f"... (cut: {len(reason)} characters in all)")
    assert len(kept) == 1000
    assert (
        dict(dead_letter_headers([], attempt=3, address="q", reason=kept))[
            DEAD_LETTER_REASON_HEADER
        ]
        == kept.encode()
    ), "a reason cut once is kept as it is"
    short = dict(dead_letter_headers([], attempt=3, address="q", reason="bad input"))
    assert short[DEAD_LETTER_REASON_HEADER] == b"bad input"


def test_tls_files_that_do_not_load_are_one_error_naming_the_option_and_the_file(
    tmp_path: Path,
) -> None:
    """Each server built its TLS context its own way: MQTT named the option and file, AMP
    said only "cannot load the TLS files", NATS and HTTP passed on ssl's ``[SSL] PEM lib``.
    One kit function per side now, the same words for every server."""
    from amgi.errors import ConfigurationError
    from amgi.servers.kit import client_context, server_context
    from tests.net import self_signed

    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    missing = str(tmp_path / "missing.pem")
    no = ("--key", None)

    def refused(build: Callable[[], object]) -> str:
        with pytest.raises(ConfigurationError) as info:
            build()
        return str(info.value)

    assert refused(lambda: client_context("x", ("--ca", missing), ("--cert", None), no)) == (
        f"x: cannot load --ca {missing!r}: No such file or directory"
    )
    assert refused(
        lambda: client_context("x", ("--ca", str(not_pem)), ("--cert", None), no)
    ).startswith(f"x: cannot load --ca {str(not_pem)!r}: ")
    wrong_key = refused(
        lambda: client_context("x", ("--ca", ""), ("--cert", str(cert)), ("--key", str(other_key)))
    )
    assert wrong_key.startswith(
        f"x: cannot load --cert {str(cert)!r} with --key {str(other_key)!r}: not a PEM certificate"
    ), wrong_key
    assert refused(lambda: server_context("y", ("--c", missing), ("--k", None), ("--a", None))) == (
        f"y: cannot load --c {missing!r}: No such file or directory"
    )
    assert refused(
        lambda: server_context("y", ("--c", str(cert)), ("--k", str(key)), ("--a", missing))
    ) == (f"y: cannot load --a {missing!r}: No such file or directory")

    client = client_context(
        "x", ("--ca", str(cert)), ("--cert", str(other_cert)), ("--key", str(other_key))
    )
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname
    assert not client_context(
        "x", ("--ca", None), ("--cert", None), no, check_hostname=False
    ).check_hostname
    listener = server_context("y", ("--c", str(cert)), ("--k", str(key)), ("--a", None))
    assert listener.verify_mode == ssl.CERT_NONE
    listener = server_context("y", ("--c", str(cert)), ("--k", str(key)), ("--a", str(other_cert)))
    assert listener.verify_mode == ssl.CERT_REQUIRED
