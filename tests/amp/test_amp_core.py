"""The sans-IO core: framing, commands, bookkeeping and every bad-input outcome."""

from __future__ import annotations

from typing import Any

import pytest
from amp_commands import (
    Ask,
    Big,
    DeclaredError,
    Fail,
    Hand,
    ListCall,
    Notify,
    Ping,
    SwitchToEcho,
)

from amgi import amp


def box(**items: bytes) -> bytes:
    return amp.encode_box({k.encode(): v for k, v in items.items()})


class Typed(amp.Command):
    arguments = [(b"n", amp.Integer()), (b"flag", amp.Boolean()), (b"u", amp.Unicode())]
    response = [(b"ok", amp.Boolean())]


def test_parser_byte_by_byte_equals_whole() -> None:
    data = b"".join(
        amp.encode_box({b"k%d" % i: b"v" * i, b"_command": b"X"}) for i in range(0, 300, 37)
    )
    whole = amp.BoxParser().feed(data)
    parser = amp.BoxParser()
    pieces: list[amp.Box] = []
    for i in range(len(data)):
        pieces.extend(parser.feed(data[i : i + 1]))
    assert pieces == whole
    assert len(whole) == 9
    assert parser.buffered == 0


def test_duplicate_keys_last_wins_and_empty_box() -> None:
    data = b"\x00\x01a\x00\x011\x00\x01a\x00\x012\x00\x00\x00\x00"
    assert amp.parse_boxes(data) == [{b"a": b"2"}, {}]


def test_truncated_box_waits_then_parse_boxes_refuses() -> None:
    parser = amp.BoxParser()
    assert parser.feed(b"\x00\x01a\x00\x05abc") == []
    assert parser.buffered > 0
    with pytest.raises(amp.ProtocolError):
        amp.parse_boxes(b"\x00\x01a\x00\x05abc")
    with pytest.raises(amp.ProtocolError):
        amp.parse_boxes(b"\x00\x01a\x00\x01b")  # pairs but no terminator


def test_oversized_key_is_a_protocol_violation_and_stops_input() -> None:
    conn = amp.Connection({b"Ping": Ping})
    events = conn.receive_data(b"\x01\x00" + b"k" * 256)
    assert events == [amp.ProtocolViolation("key length 256 is longer than 255")]
    assert conn.failed
    assert conn.receive_data(box(_command=b"Ping", _ask=b"1", text=b"x")) == []


def test_box_without_special_key_is_a_protocol_violation() -> None:
    conn = amp.Connection()
    events = conn.receive_data(box(hello=b"world") + box(_command=b"Ping", _ask=b"1"))
    assert len(events) == 1
    assert isinstance(events[0], amp.ProtocolViolation)


def test_unknown_command_answers_unhandled() -> None:
    conn = amp.Connection()
    events = conn.receive_data(box(_command=b"Nope", _ask=b"7"))
    assert events == [amp.CallRejected(b"7", b"Nope", b"UNHANDLED", "Unhandled Command: b'Nope'")]
    assert amp.parse_boxes(conn.data_to_send()) == [
        {
            b"_error": b"7",
            b"_error_code": b"UNHANDLED",
            b"_error_description": b"Unhandled Command: b'Nope'",
        }
    ]
    # Without _ask nothing is answered.
    conn.receive_data(box(_command=b"Nope"))
    assert conn.data_to_send() == b""


def test_a_long_unknown_command_name_is_quoted_clipped() -> None:
    # The refusal quotes 64 bytes of the name: a long name does not make it larger.
    conn = amp.Connection()
    (event,) = conn.receive_data(box(_command=b"N" * 20_000, _ask=b"7"))
    assert isinstance(event, amp.CallRejected)
    assert event.description == f"Unhandled Command: {b'N' * 64!r}..."
    assert len(conn.data_to_send()) < 200


@pytest.mark.parametrize(
    ("items", "reason"),
    [
        ({"flag": b"True", "u": b"x"}, "missing argument 'n'"),
        ({"n": b"12x", "flag": b"True", "u": b"x"}, "cannot decode 'n'"),
        ({"n": b"1", "flag": b"yes", "u": b"x"}, "cannot decode 'flag'"),
        ({"n": b"1", "flag": b"True", "u": b"\xff"}, "cannot decode 'u'"),
    ],
)
def test_bad_arguments_answer_unknown_with_reason(items: dict[str, bytes], reason: str) -> None:
    conn = amp.Connection({b"Typed": Typed})
    events = conn.receive_data(box(_command=b"Typed", _ask=b"3", **items))
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, amp.CallRejected)
    assert event.code == b"UNKNOWN"
    assert reason in event.description
    (answer,) = amp.parse_boxes(conn.data_to_send())
    assert answer[b"_error"] == b"3"
    assert answer[b"_error_code"] == b"UNKNOWN"
    assert reason in answer[b"_error_description"].decode()


def test_call_received_with_arguments() -> None:
    conn = amp.Connection({b"Typed": Typed})
    (event,) = conn.receive_data(
        box(_command=b"Typed", _ask=b"z9", n=b"-4", flag=b"False", u=b"ok")
    )
    assert event == amp.CallReceived(b"z9", Typed, {"n": -4, "flag": False, "u": "ok"})


def test_answers_errors_and_late_answers() -> None:
    conn = amp.Connection()
    t1 = conn.send_call(Typed, {"n": 1, "flag": True, "u": "a"})
    t2 = conn.send_call(Fail, {"mode": "m"})
    t3 = conn.send_call(Typed, {"n": 2, "flag": False, "u": "b"})
    assert (t1, t2, t3) == (b"1", b"2", b"3")
    assert conn.pending_tags == [b"1", b"2", b"3"]
    conn.abandon(b"3")
    events = conn.receive_data(
        box(_answer=b"1", ok=b"True")
        + box(_error=b"2", _error_code=b"DECLARED", _error_description=b"why")
        + box(_answer=b"3", ok=b"True")
    )
    assert events[0] == amp.AnswerReceived(b"1", Typed, {"ok": True})
    assert isinstance(events[1], amp.ErrorReceived)
    assert isinstance(events[1].error, DeclaredError)
    assert events[2:] == [amp.AnswerDropped(b"3")]
    assert conn.pending_tags == []
    assert not conn.failed


@pytest.mark.parametrize(
    "bogus",
    [
        box(_answer=b"99", ok=b"True"),  # never asked
        box(_error=b"1", _error_code=b"X", _error_description=b"again"),  # answered twice
        box(_answer=b"3", ok=b"True") + box(_answer=b"3", ok=b"True"),  # late, then again
    ],
)
def test_answer_for_a_tag_no_call_waits_for_closes(bogus: bytes) -> None:
    # Like Twisted (a KeyError there drops the connection): one violation, no more input.
    conn = amp.Connection()
    for _ in range(3):
        conn.send_call(Typed, {"n": 1, "flag": True, "u": "a"})
    conn.abandon(b"3")
    conn.receive_data(box(_answer=b"1", ok=b"True"))
    events = conn.receive_data(bogus + box(_answer=b"2", ok=b"True") * 1000)
    assert isinstance(events[-1], amp.ProtocolViolation)
    assert "no call waits for" in events[-1].reason
    assert [e for e in events if isinstance(e, amp.ProtocolViolation)] == [events[-1]]
    assert conn.failed
    assert conn.receive_data(box(_answer=b"2", ok=b"True")) == []


def test_box_size_limit_closes_before_the_value_arrives() -> None:
    conn = amp.Connection({b"Ping": Ping}, max_box_size=1000)
    ok = box(_command=b"Ping", _ask=b"1", text=b"x" * 900)
    assert len(ok) < 1000
    assert conn.receive_data(ok) == [amp.CallReceived(b"1", Ping, {"text": "x" * 900})]
    # Only the length prefix of the value is needed to refuse the box.
    header = b"\x00\x04text\xff\xff"
    events = conn.receive_data(box(_command=b"Ping")[:-2] + header)
    assert events == [amp.ProtocolViolation("box larger than 1000 bytes (max_box_size)")]
    assert conn.failed


def test_box_size_limit_counts_across_feeds_and_repeated_keys() -> None:
    parser = amp.BoxParser(max_box_size=100)
    pair = b"\x00\x01k\x00\x05vvvvv"  # 10 bytes on the wire
    for _ in range(10):
        assert parser.feed(pair) == []
    assert parser.error is None
    assert parser.buffered == 100
    assert parser.feed(pair[:3]) == []
    assert parser.feed(pair[3:]) == []
    assert str(parser.error) == "box larger than 100 bytes (max_box_size)"
    with pytest.raises(amp.ProtocolError):
        parser.feed(b"\x00\x00")
    # A box exactly at the limit passes, and the count restarts with each box.
    parser = amp.BoxParser(max_box_size=100)
    assert parser.feed((pair * 10 + b"\x00\x00") * 3) == [{b"k": b"vvvvv"}] * 3


def test_keys_per_box_limit() -> None:
    parser = amp.BoxParser(max_keys_per_box=3)
    three = b"".join(b"\x00\x01%c\x00\x00" % c for c in b"abc")
    assert parser.feed(three + b"\x00\x00") == [{b"a": b"", b"b": b"", b"c": b""}]
    assert parser.feed(three + b"\x00\x01d\x00\x00" + b"\x00\x00") == []
    assert str(parser.error) == "box with more than 3 keys (max_keys_per_box)"


def test_default_limits_stop_a_flood_of_tiny_keys() -> None:
    # 4-byte keys with empty values: without a limit every pair is a dict entry.
    conn = amp.Connection()
    flood = b"".join(b"\x00\x04%04x\x00\x00" % (i & 0xFFFF) for i in range(20_000))
    events = conn.receive_data(flood)
    assert events == [
        amp.ProtocolViolation(
            f"box with more than {amp.DEFAULT_MAX_KEYS_PER_BOX} keys (max_keys_per_box)"
        )
    ]
    assert conn._parser.buffered == 0
    with pytest.raises(ValueError, match="at least 1"):
        amp.BoxParser(max_box_size=0)


def test_tag_numbering_after_refused_calls_follows_twisted() -> None:
    # Twisted takes the tag, then frames the box: a value over 65,535 bytes (TooLong
    # from the framing) uses up a tag; a bad argument (refused while encoding) does not.
    conn = amp.Connection()
    with pytest.raises(amp.TooLong):
        conn.send_call(Ping, {"text": "x" * 70000})
    assert conn.send_call(Ping, {"text": "a"}) == b"2"
    with pytest.raises(amp.ArgumentError):
        conn.send_call(Ping, {})
    with pytest.raises(amp.TooLong):
        conn.send_call(ListCall, {"items": ["y" * 70000]})
    assert conn.send_call(Ping, {"text": "b"}) == b"3"
    assert conn.send_call(Notify, {"text": "n"}) is None
    assert conn.send_call(Ping, {"text": "c"}) == b"5"


def test_error_codes_map_to_library_exceptions() -> None:
    conn = amp.Connection()
    for _ in range(3):
        conn.send_call(Ping, {"text": "x"})
    events = conn.receive_data(
        box(_error=b"1", _error_code=b"UNHANDLED", _error_description=b"Unhandled Command: b'Ping'")
        + box(_error=b"2", _error_code=b"UNKNOWN", _error_description=b"Unknown Error")
        + box(_error=b"3", _error_code=b"WEIRD", _error_description=b"\xff")
    )
    errors = [e.error for e in events if isinstance(e, amp.ErrorReceived)]
    assert isinstance(errors[0], amp.UnhandledCommand)
    assert isinstance(errors[1], amp.UnknownRemoteError)
    assert errors[1].description == "Unknown Error"
    assert isinstance(errors[2], amp.UnknownRemoteError)
    assert errors[2].code == b"WEIRD"
    assert errors[2].description == "\ufffd"


def test_invalid_answer_fails_the_call() -> None:
    conn = amp.Connection()
    conn.send_call(Typed, {"n": 1, "flag": True, "u": "a"})
    (event,) = conn.receive_data(box(_answer=b"1", ok=b"maybe"))
    assert isinstance(event, amp.ErrorReceived)
    assert isinstance(event.error, amp.ArgumentError)


def test_connection_lost_reports_pending() -> None:
    conn = amp.Connection()
    conn.send_call(Ping, {"text": "a"})
    conn.send_call(Notify, {"text": "b"})
    conn.send_call(Ping, {"text": "c"})
    assert conn.connection_lost() == [b"1", b"3"]
    assert conn.receive_data(box(_answer=b"1", text=b"x")) == []


def test_start_tls_followed_by_data_is_a_violation() -> None:
    conn = amp.Connection()
    for trailing in (b"\x16\x03\x01", b"\x00", box(_command=b"Ping")):
        conn = amp.Connection({b"StartTLS": amp.StartTLS})
        events = conn.receive_data(box(_command=b"StartTLS", _ask=b"1") + trailing)
        assert isinstance(events[0], amp.CallReceived)
        assert events[0].command is amp.StartTLS
        assert isinstance(events[-1], amp.ProtocolViolation)
        assert conn.failed


def test_start_tls_without_ask_followed_by_data_is_fine() -> None:
    """No answer, so no TLS follows (nor in Twisted): it was a violation, but only when
    the next box came in the same read, so the outcome hung on TCP segmentation."""
    conn = amp.Connection({b"StartTLS": amp.StartTLS, b"Ping": Ping})
    events = conn.receive_data(
        box(_command=b"StartTLS") + box(_command=b"Ping", _ask=b"1", text=b"x")
    )
    assert events == [
        amp.CallReceived(None, amp.StartTLS, {}),
        amp.CallReceived(b"1", Ping, {"text": "x"}),
    ]
    assert not conn.failed


def test_start_tls_refusal_followed_by_data_is_fine() -> None:
    conn = amp.Connection()
    conn.send_call(amp.StartTLS, {})
    conn.send_call(Ping, {"text": "x"})
    events = conn.receive_data(
        box(_error=b"1", _error_code=b"TLS_ERROR", _error_description=b"TLS not available")
        + box(_answer=b"2", text=b"y")
    )
    assert isinstance(events[0], amp.ErrorReceived)
    assert isinstance(events[0].error, amp.TLSNotAvailable)
    assert events[1] == amp.AnswerReceived(b"2", Ping, {"text": "y"})
    assert not conn.failed


def test_boxes_before_a_framing_error_are_delivered() -> None:
    conn = amp.Connection({b"Ping": Ping})
    events = conn.receive_data(box(_command=b"Ping", _ask=b"1", text=b"a") + b"\x01\x00")
    assert events == [
        amp.CallReceived(b"1", Ping, {"text": "a"}),
        amp.ProtocolViolation("key length 256 is longer than 255"),
    ]


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65535 * 3, 300_001])
def test_big_bytes_chunks(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    encoded = Big.encode_arguments({"data": data})
    chunks = -(-size // 65535) or 1
    assert len(encoded) == chunks
    assert encoded[b"data"] == data[:65535]
    if chunks > 1:
        assert encoded[b"data.%d" % chunks] == data[(chunks - 1) * 65535 :]
    assert all(len(v) <= 65535 for v in encoded.values())
    assert Big.decode_arguments(encoded) == {"data": data}


def test_command_declarations() -> None:
    class Named(amp.Command):
        command_name = "other-name"
        arguments = [(b"dashed-key", amp.Integer()), (b"from", amp.Integer(optional=True))]

    assert Named.name == b"other-name"
    assert Ping.name == b"Ping"
    box_ = Named.encode_arguments({"dashed_key": 1, "From": None})
    assert box_ == {b"dashed-key": b"1"}
    assert Named.decode_arguments({b"dashed-key": b"2", b"from": b"3"}) == {
        "dashed_key": 2,
        "From": 3,
    }
    with pytest.raises(amp.ArgumentError, match="missing argument 'dashed_key'"):
        Named.encode_arguments({})
    with pytest.raises(amp.ArgumentError, match="unexpected argument"):
        Named.encode_arguments({"dashed_key": 1, "bogus": 2})
    with pytest.raises(amp.ArgumentError, match="cannot encode"):
        Named.encode_arguments({"dashed_key": "not an int"})
    assert Fail.code_for(DeclaredError()) == (b"DECLARED", False)

    class SubError(DeclaredError):
        pass

    assert Fail.code_for(SubError()) == (b"DECLARED", False)
    assert Fail.code_for(ValueError()) is None
    assert repr(Ping(text="x")) == "Ping(**{'text': 'x'})"


def test_send_call_rejects_oversized_values_without_queueing() -> None:
    conn = amp.Connection()
    with pytest.raises(amp.TooLong):
        conn.send_call(Ping, {"text": "x" * 70000})
    assert conn.data_to_send() == b""
    assert conn.pending_tags == []


def test_naive_datetime_and_bad_types_refused() -> None:
    import datetime

    with pytest.raises(ValueError, match="naive"):
        amp.DateTime().to_bytes(datetime.datetime(2020, 1, 1))
    with pytest.raises(ValueError, match="32"):
        amp.DateTime().from_bytes(b"2020")
    bad: list[tuple[amp.Argument[Any], Any]] = [
        (amp.Float(), 1),
        (amp.Decimal(), 1.5),
        (amp.String(), "text"),
    ]
    for argument, value in bad:
        with pytest.raises(TypeError):
            argument.to_bytes(value)
    with pytest.raises(ValueError, match="truncated"):
        amp.ListOf(amp.Integer()).from_bytes(b"\x00\x05ab")


def test_protocol_switch_caller_side() -> None:
    conn = amp.Connection({b"Ping": Ping})
    tag = conn.send_call(SwitchToEcho, {"greeting": "hi"})
    assert tag == b"1"
    assert amp.parse_boxes(conn.data_to_send()) == [
        {b"_command": b"SwitchToEcho", b"_ask": b"1", b"greeting": b"hi"}
    ]
    # Locked until answered, as in Twisted: no calls, answers dropped.
    with pytest.raises(amp.ProtocolSwitched):
        conn.send_call(Ping, {"text": "x"})
    (ping,) = conn.receive_data(box(_command=b"Ping", _ask=b"9", text=b"t"))
    assert ping == amp.CallReceived(b"9", Ping, {"text": "t"})
    conn.send_answer(b"9", Ping, {"text": "dropped"})
    assert conn.data_to_send() == b""
    # The answer, then the new protocol's first bytes in the same read.
    events = conn.receive_data(box(_answer=b"1") + b"hi\n" + b"\x00\x00more")
    assert events == [amp.AnswerReceived(b"1", SwitchToEcho, {}), amp.Switched(b"hi\n\x00\x00more")]
    assert conn.switched
    assert conn.receive_data(b"anything") == []


def test_protocol_switch_refused_keeps_speaking_amp() -> None:
    conn = amp.Connection({b"Ping": Ping})
    conn.send_call(SwitchToEcho, {"greeting": "hi"})
    events = conn.receive_data(
        box(_error=b"1", _error_code=b"DECLARED", _error_description=b"no")
        + box(_command=b"Ping", _ask=b"5", text=b"t")
    )
    assert isinstance(events[0], amp.ErrorReceived)
    assert isinstance(events[0].error, DeclaredError)
    assert events[1] == amp.CallReceived(b"5", Ping, {"text": "t"})
    assert conn.send_call(Ping, {"text": "again"}) == b"2"
    assert not conn.switched


def test_protocol_switch_responder_side_holds_input() -> None:
    def received(tail: bytes) -> amp.Connection:
        conn = amp.Connection({b"SwitchToEcho": SwitchToEcho, b"Ping": Ping})
        events = conn.receive_data(box(_command=b"SwitchToEcho", _ask=b"3", greeting=b"g") + tail)
        assert events == [amp.CallReceived(b"3", SwitchToEcho, {"greeting": "g"})]
        assert conn.switch_pending
        assert conn.receive_data(box(_command=b"Ping", _ask=b"4", text=b"t")) == []
        return conn

    ping = box(_command=b"Ping", _ask=b"4", text=b"t")
    conn = received(b"raw")
    conn.send_answer(b"3", SwitchToEcho, {})
    assert conn.switch_accepted() == b"raw" + ping
    assert conn.receive_data(b"late") == []
    conn = received(ping)
    conn.send_error(b"3", b"DECLARED", "no")
    assert conn.switch_refused() == [amp.CallReceived(b"4", Ping, {"text": "t"})] * 2
    assert not conn.switch_pending


def test_protocol_switch_declarations() -> None:
    with pytest.raises(TypeError, match="no response"):

        class WithResponse(amp.ProtocolSwitchCommand):
            response = [(b"x", amp.Integer())]

    with pytest.raises(TypeError, match="needs an answer"):

        class NoAnswer(amp.ProtocolSwitchCommand):
            requires_answer = False


def test_descriptors_travel_as_ordinals() -> None:
    sender = amp.Connection()
    sender.send_call(Hand, {"fd": 7, "text": "a"})
    with pytest.raises(amp.TooLong):  # refused: neither the descriptor nor an ordinal used
        sender.send_call(Hand, {"fd": 8, "text": "x" * 70000})
    with pytest.raises(amp.ArgumentError, match="file descriptor"):
        sender.send_call(Hand, {"fd": "9", "text": "a"})
    sender.send_call(Hand, {"fd": 9, "text": "b"})
    assert sender.fds_to_send() == [7, 9]
    assert sender.fds_to_send() == []
    calls = amp.parse_boxes(sender.data_to_send())
    assert [(c[b"_ask"], c[b"fd"]) for c in calls] == [(b"1", b"0"), (b"3", b"1")]

    receiver = amp.Connection({b"Hand": Hand})
    receiver.receive_fds([30, 31, 32])
    events = receiver.receive_data(b"".join(amp.encode_box(c) for c in calls))
    assert events == [
        amp.CallReceived(b"1", Hand, {"fd": 30, "text": "a"}),
        amp.CallReceived(b"3", Hand, {"fd": 31, "text": "b"}),
    ]
    # A box naming a descriptor that never arrived is refused; unclaimed ones are handed back.
    (rejected,) = receiver.receive_data(box(_command=b"Hand", _ask=b"4", fd=b"5", text=b"c"))
    assert isinstance(rejected, amp.CallRejected)
    assert "no file descriptor #5 received for 'fd'" in rejected.description
    assert receiver.unclaimed_fds() == [32]
    assert receiver.unclaimed_fds() == []


class HandTwo(amp.Command):
    arguments = [(b"a", amp.Descriptor()), (b"b", amp.Descriptor())]


def test_a_call_refused_for_its_second_descriptor_leaves_the_first_unclaimed() -> None:
    # The first was claimed before the second was found missing: it must be handed back
    # with the unclaimed (to be closed), not dropped with the refused call.
    receiver = amp.Connection({b"HandTwo": HandTwo})
    receiver.receive_fds([30])
    (rejected,) = receiver.receive_data(box(_command=b"HandTwo", _ask=b"1", a=b"0", b=b"1"))
    assert isinstance(rejected, amp.CallRejected)
    assert "no file descriptor #1 received for 'b'" in rejected.description
    assert receiver.unclaimed_fds() == [30]


def test_descriptor_in_an_answer() -> None:
    caller = amp.Connection()
    caller.send_call(Ask, {"text": "t"})
    responder = amp.Connection({b"Ask": Ask})
    (call,) = responder.receive_data(caller.data_to_send())
    assert isinstance(call, amp.CallReceived)
    assert call.tag is not None
    responder.send_answer(call.tag, Ask, {"fd": 12})
    assert responder.fds_to_send() == [12]
    caller.receive_fds([40])
    (answer,) = caller.receive_data(responder.data_to_send())
    assert answer == amp.AnswerReceived(b"1", Ask, {"fd": 40})
