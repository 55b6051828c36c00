"""Golden bytes: every type and special key encodes exactly as Twisted encodes it."""

from __future__ import annotations

import datetime
import decimal
import math
from typing import Any

import pytest
from amp_commands import TYPES, AllTypes, DeclaredError, Fail, Notify, Ping
from twisted.internet.testing import StringTransport
from twisted.protocols import amp as tamp

from amgi import amp

TZ = datetime.timezone(datetime.timedelta(hours=5, minutes=45))

# (our argument, Twisted's argument, value, expected bytes hard-coded and checked against Twisted)
SCALARS: list[tuple[amp.Argument[Any], tamp.Argument, Any, bytes]] = [
    (amp.Integer(), tamp.Integer(), 0, b"0"),
    (amp.Integer(), tamp.Integer(), -12345678901234567890, b"-12345678901234567890"),
    (amp.String(), tamp.String(), b"\x00\xffabc", b"\x00\xffabc"),
    (amp.Unicode(), tamp.Unicode(), "h\u00e9 \u2603", "h\u00e9 \u2603".encode()),
    (amp.Float(), tamp.Float(), 1.5, b"1.5"),
    (amp.Float(), tamp.Float(), 0.1, b"0.1"),
    (amp.Float(), tamp.Float(), 1e100, b"1e+100"),
    (amp.Float(), tamp.Float(), float("inf"), b"inf"),
    (amp.Float(), tamp.Float(), float("-inf"), b"-inf"),
    (amp.Float(), tamp.Float(), float("nan"), b"nan"),
    (amp.Boolean(), tamp.Boolean(), True, b"True"),
    (amp.Boolean(), tamp.Boolean(), False, b"False"),
    (amp.Decimal(), tamp.Decimal(), decimal.Decimal("1.50"), b"1.50"),
    (amp.Decimal(), tamp.Decimal(), decimal.Decimal("-1.5E+7"), b"-1.5E+7"),
    (amp.Decimal(), tamp.Decimal(), decimal.Decimal("Infinity"), b"Infinity"),
    (amp.Decimal(), tamp.Decimal(), decimal.Decimal("-Infinity"), b"-Infinity"),
    (amp.Decimal(), tamp.Decimal(), decimal.Decimal("NaN"), b"NaN"),
    (amp.Decimal(), tamp.Decimal(), decimal.Decimal("sNaN"), b"sNaN"),
    (
        amp.DateTime(),
        tamp.DateTime(),
        datetime.datetime(2012, 1, 23, 12, 34, 56, 54321, tzinfo=TZ),
        b"2012-01-23T12:34:56.054321+05:45",
    ),
    (
        amp.DateTime(),
        tamp.DateTime(),
        datetime.datetime(1, 2, 3, tzinfo=datetime.UTC),
        b"0001-02-03T00:00:00.000000-00:00",
    ),
    (
        amp.DateTime(),
        tamp.DateTime(),
        datetime.datetime(
            2020, 6, 1, 8, tzinfo=datetime.timezone(-datetime.timedelta(hours=3, minutes=30))
        ),
        b"2020-06-01T08:00:00.000000-03:30",
    ),
    (amp.ListOf(amp.Integer()), tamp.ListOf(tamp.Integer()), [], b""),
    (
        amp.ListOf(amp.Integer()),
        tamp.ListOf(tamp.Integer()),
        [1, 20, -3],
        b"\x00\x011\x00\x0220\x00\x02-3",
    ),
    (
        amp.ListOf(amp.Unicode()),
        tamp.ListOf(tamp.Unicode()),
        ["", "\u00e9"],
        b"\x00\x00\x00\x02\xc3\xa9",
    ),
    (
        amp.AmpList([(b"b", amp.Integer()), (b"a", amp.Unicode(optional=True))]),
        tamp.AmpList([(b"b", tamp.Integer()), (b"a", tamp.Unicode(optional=True))]),
        [{"b": 1, "a": "x"}, {"b": 2}],
        b"\x00\x01a\x00\x01x\x00\x01b\x00\x011\x00\x00\x00\x01b\x00\x012\x00\x00",
    ),
]


@pytest.mark.parametrize(("ours", "theirs", "value", "wire"), SCALARS)
def test_scalar_bytes_match_twisted(
    ours: amp.Argument[Any], theirs: tamp.Argument, value: Any, wire: bytes
) -> None:
    assert theirs.toStringProto(value, None) == wire
    assert ours.to_bytes(value) == wire
    decoded = ours.from_bytes(wire)
    theirs_decoded = theirs.fromStringProto(wire, None)
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(decoded)
    elif isinstance(value, decimal.Decimal) and value.is_nan():
        assert decoded.is_nan()
        assert str(decoded) == str(theirs_decoded)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        assert decoded == [{"b": 1, "a": "x"}, {"b": 2, "a": None}]
        assert decoded == theirs_decoded
    else:
        assert decoded == value
        assert decoded == theirs_decoded


def test_box_bytes_and_sorting() -> None:
    box = {b"zz": b"1", b"_command": b"Sum", b"_ask": b"a", b"a": b""}
    wire = (
        b"\x00\x04_ask\x00\x01a"
        b"\x00\x08_command\x00\x03Sum"
        b"\x00\x01a\x00\x00"
        b"\x00\x02zz\x00\x011"
        b"\x00\x00"
    )
    assert tamp.AmpBox(box).serialize() == wire
    assert amp.encode_box(box) == wire
    assert amp.parse_boxes(wire) == [box]
    # Receivers accept any key order.
    reordered = (
        b"\x00\x02zz\x00\x011\x00\x01a\x00\x00"
        b"\x00\x04_ask\x00\x01a\x00\x08_command\x00\x03Sum\x00\x00"
    )
    assert amp.parse_boxes(reordered) == [box]


def test_value_at_limit_and_key_at_limit() -> None:
    box = {b"k" * 255: b"v" * 65535}
    assert amp.encode_box(box) == tamp.AmpBox(box).serialize()
    assert amp.parse_boxes(amp.encode_box(box)) == [box]
    with pytest.raises(amp.TooLong):
        amp.encode_box({b"k" * 256: b""})
    with pytest.raises(amp.TooLong):
        amp.encode_box({b"k": b"v" * 65536})
    with pytest.raises(amp.TooLong):
        amp.encode_box({b"": b"v"})


class TFail(tamp.Command):
    commandName = b"Fail"
    arguments = [(b"mode", tamp.Unicode())]
    errors = {DeclaredError: b"DECLARED"}


class TPing(tamp.Command):
    commandName = b"Ping"
    arguments = [(b"text", tamp.Unicode())]
    response = [(b"text", tamp.Unicode())]


class TNotify(tamp.Command):
    commandName = b"Notify"
    arguments = [(b"text", tamp.Unicode())]
    requiresAnswer = False


def twisted_wire(calls: list[tuple[type[tamp.Command], dict[str, Any]]]) -> bytes:
    proto = tamp.AMP()
    transport = StringTransport()
    proto.makeConnection(transport)
    for command, kwargs in calls:
        proto.callRemote(command, **kwargs)
    data: bytes = transport.value()
    return data


def test_calls_and_tags_match_twisted() -> None:
    calls = [(TPing, {"text": f"t{i}"}) for i in range(20)]
    calls.insert(3, (TNotify, {"text": "no answer"}))
    expected = twisted_wire(calls)
    conn = amp.Connection()
    for command, kwargs in calls:
        ours = Notify if command is TNotify else Ping
        conn.send_call(ours, kwargs)
    assert conn.data_to_send() == expected
    tags = [box.get(b"_ask") for box in amp.parse_boxes(expected)]
    assert tags[:5] == [b"1", b"2", b"3", None, b"5"]
    assert tags[9:] == [
        b"a",
        b"b",
        b"c",
        b"d",
        b"e",
        b"f",
        b"10",
        b"11",
        b"12",
        b"13",
        b"14",
        b"15",
    ]


def test_answer_and_error_boxes_match_twisted() -> None:
    conn = amp.Connection({b"Ping": Ping})
    conn.send_answer(b"1f", Ping, {"text": "hi"})
    assert conn.data_to_send() == tamp.AmpBox({b"_answer": b"1f", b"text": b"hi"}).serialize()
    conn.send_error(b"20", b"DECLARED", "d\u00e9sc")
    assert (
        conn.data_to_send()
        == tamp.AmpBox(
            {
                b"_error": b"20",
                b"_error_code": b"DECLARED",
                b"_error_description": "d\u00e9sc".encode(),
            }
        ).serialize()
    )


def test_all_types_call_box_matches_twisted() -> None:
    from amp_commands import CASES
    from twisted_peer import AllTypes as TAllTypes  # type: ignore[import-not-found]

    assert [k if isinstance(k, bytes) else k.encode() for k, _ in TYPES] == [
        k for k, _ in TAllTypes.arguments
    ]
    for case in CASES:
        expected = twisted_wire([(TAllTypes, dict(case))])
        conn = amp.Connection()
        conn.send_call(AllTypes, case)
        assert conn.data_to_send() == expected


def test_error_description_mapping() -> None:
    conn = amp.Connection()
    tag = conn.send_call(Fail, {"mode": "x"})
    assert tag == b"1"
    conn.data_to_send()
    events = conn.receive_data(
        tamp.AmpBox(
            {b"_error": b"1", b"_error_code": b"DECLARED", b"_error_description": b"boom"}
        ).serialize()
    )
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, amp.ErrorReceived)
    assert type(event.error) is DeclaredError
    assert str(event.error) == "boom"
