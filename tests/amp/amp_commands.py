"""Our declarations of the interop commands (twisted_peer.py declares Twisted's)."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import pathlib
import ssl
from typing import Any, cast

from amgi import amp


class DeclaredError(Exception):
    pass


class FatalError(Exception):
    pass


TYPES: list[tuple[bytes | str, amp.Argument[Any]]] = [
    (b"i", amp.Integer()),
    (b"s", amp.String()),
    ("u", amp.Unicode()),
    (b"fl", amp.Float()),
    (b"b", amp.Boolean()),
    (b"d", amp.Decimal()),
    (b"dt", amp.DateTime()),
    (b"li", amp.ListOf(amp.Integer())),
    (b"lu", amp.ListOf(amp.Unicode())),
    (b"al", amp.AmpList([(b"x", amp.Integer()), (b"y", amp.Unicode(optional=True))])),
    (b"opt", amp.Unicode(optional=True)),
]


class AllTypes(amp.Command):
    arguments = TYPES
    response = TYPES


class Fail(amp.Command):
    arguments = [(b"mode", amp.Unicode())]
    errors = {DeclaredError: b"DECLARED"}
    fatal_errors = {FatalError: b"FATAL"}


class Ping(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode())]


class Pong(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode())]


class Big(amp.Command):
    arguments = [(b"data", amp.BigBytes())]
    response = [(b"data", amp.BigBytes()), (b"size", amp.Integer())]


class Notify(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    requires_answer = False


class GetNotes(amp.Command):
    response = [(b"notes", amp.ListOf(amp.Unicode()))]


class IsSecure(amp.Command):
    response = [(b"secure", amp.Boolean())]


class Nope(amp.Command):
    pass


class Where(amp.Command):
    arguments = [(b"path", amp.Path())]
    response = [(b"path", amp.Path()), (b"name", amp.Unicode())]


class SwitchToEcho(amp.ProtocolSwitchCommand):
    arguments = [(b"greeting", amp.Unicode())]
    errors = {DeclaredError: b"DECLARED"}


class Echo(asyncio.Protocol):
    """What a switched connection speaks: a greeting line, then data echoed upper-cased."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.greeting.encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


class Collect(asyncio.Protocol):
    """The caller's side after a switch: collects what arrives."""

    def __init__(self) -> None:
        self.data = b""
        self.arrived = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    async def until(self, ending: bytes) -> bytes:
        async with asyncio.timeout(10):
            while not self.data.endswith(ending):
                self.arrived.clear()
                await self.arrived.wait()
        return self.data


class Hand(amp.Command):
    """The caller hands over a descriptor; the responder writes ``text`` to it."""

    arguments = [(b"fd", amp.Descriptor()), (b"text", amp.Unicode())]
    response = [(b"written", amp.Integer())]


class Ask(amp.Command):
    """The responder answers with the read end of a pipe holding ``text``."""

    arguments = [(b"text", amp.Unicode())]
    response = [(b"fd", amp.Descriptor())]


class ListCall(amp.Command):
    arguments = [(b"items", amp.ListOf(amp.Unicode()))]


class Peer(amp.AMP):
    """Our peer, answering exactly like twisted_peer.Peer."""

    def __init__(self, tls_context: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        super().__init__(tls_context=tls_context, **kwargs)
        self.notes: list[str] = []
        self.sent_fds: list[int] = []

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for fd in self.sent_fds:
            os.close(fd)
        self.sent_fds.clear()

    @AllTypes.responder
    def all_types(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    @Fail.responder
    def fail(self, mode: str) -> None:
        if mode == "declared":
            raise DeclaredError("declared text")
        if mode == "fatal":
            raise FatalError("fatal text")
        raise ZeroDivisionError("secret detail")

    @Ping.responder
    async def ping(self, text: str) -> dict[str, Any]:
        answer = await self.call_remote(Pong, text=text)
        assert answer is not None
        return {"text": "ping:" + answer["text"]}

    @Pong.responder
    def pong(self, text: str) -> dict[str, Any]:
        return {"text": "pong:" + text}

    @Big.responder
    def big(self, data: bytes) -> dict[str, Any]:
        return {"data": data[::-1], "size": len(data)}

    @Notify.responder
    def notify(self, text: str) -> None:
        self.notes.append(text)

    @GetNotes.responder
    def get_notes(self) -> dict[str, Any]:
        return {"notes": self.notes}

    @Where.responder
    def where(self, path: pathlib.Path) -> dict[str, Any]:
        return {"path": path / "child", "name": path.name}

    @Hand.responder
    def hand(self, fd: int, text: str) -> dict[str, Any]:
        try:
            return {"written": os.write(fd, text.encode())}
        finally:
            os.close(fd)

    @Ask.responder
    def ask(self, text: str) -> dict[str, Any]:
        read, write = os.pipe()
        os.write(write, text.encode())
        os.close(write)
        self.sent_fds.append(read)  # ours to close once sent
        return {"fd": read}

    @SwitchToEcho.responder
    async def switch_to_echo(self, greeting: str) -> Echo:
        await asyncio.sleep(0)  # an async responder: input is held meanwhile
        if greeting == "refuse":
            raise DeclaredError("not switching")
        return Echo(greeting)

    @IsSecure.responder
    def is_secure(self) -> dict[str, Any]:
        assert self.transport is not None
        return {"secure": self.transport.get_extra_info("ssl_object") is not None}


UTC = datetime.UTC
PLUS_0130 = datetime.timezone(datetime.timedelta(hours=1, minutes=30))
MINUS_0845 = datetime.timezone(-datetime.timedelta(hours=8, minutes=45))

# Values for AllTypes; each case is sent as Python source to the Twisted peer.
CASES: list[dict[str, Any]] = [
    {
        "i": 0,
        "s": b"",
        "u": "",
        "fl": 0.0,
        "b": False,
        "d": decimal.Decimal("0"),
        "dt": datetime.datetime(2000, 1, 1, tzinfo=UTC),
        "li": [],
        "lu": [],
        "al": [],
    },
    {
        "i": -(2**100),
        "s": bytes(range(256)),
        "u": "h\u00e9llo \u2603 \U0001f600",
        "fl": float("inf"),
        "b": True,
        "d": decimal.Decimal("-1.50E+7"),
        "dt": datetime.datetime(2012, 1, 23, 12, 34, 56, 54321, tzinfo=PLUS_0130),
        "li": [1, -2, 3**40],
        "lu": ["a", "", "\u00e9"],
        "al": [{"x": 1, "y": "one"}, {"x": 2, "y": None}],
        "opt": "present",
    },
    {
        "i": 7,
        "s": b"\x00" * 1000,
        "u": "x" * 500,
        "fl": float("-inf"),
        "b": False,
        "d": decimal.Decimal("Infinity"),
        "dt": datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=MINUS_0845),
        "li": [0],
        "lu": ["z" * 300],
        "al": [{"x": -5, "y": ""}],
    },
    {
        "i": 1,
        "s": b"x",
        "u": "nan follows",
        "fl": float("nan"),
        "b": True,
        "d": decimal.Decimal("NaN"),
        "dt": datetime.datetime(1, 1, 1, tzinfo=UTC),
        "li": [],
        "lu": [],
        "al": [],
    },
    {
        "i": 2,
        "s": b"y",
        "u": "tiny",
        "fl": 1e-300,
        "b": False,
        "d": decimal.Decimal("-0.000001"),
        "dt": datetime.datetime(2024, 2, 29, 1, 2, 3, tzinfo=UTC),
        "li": [1],
        "lu": ["q"],
        "al": [],
        "opt": None,
    },
]


def case_source(case: dict[str, Any]) -> dict[str, str]:
    """Python source of each value (datetimes rebuilt with Twisted-side tz objects)."""
    out: dict[str, str] = {}
    for key, value in case.items():
        if isinstance(value, datetime.datetime):
            offset = value.utcoffset()
            assert offset is not None
            out[key] = (
                f"datetime.datetime({value.year}, {value.month}, {value.day}, {value.hour}, "
                f"{value.minute}, {value.second}, {value.microsecond}, "
                f"tzinfo=datetime.timezone(datetime.timedelta(seconds={offset.total_seconds()})))"
            )
        elif isinstance(value, float):
            out[key] = f"float({str(value)!r})"
        elif isinstance(value, decimal.Decimal):
            out[key] = f"Decimal({str(value)!r})"
        else:
            out[key] = repr(value)
    return out


def norm(value: Any) -> Any:
    """Same normal form as twisted_peer.norm."""
    if isinstance(value, datetime.datetime):
        return "DT:" + value.isoformat()
    if isinstance(value, list):
        return [norm(item) for item in value]
    if isinstance(value, dict):
        return {key: norm(item) for key, item in sorted(value.items())}
    return repr(value)
