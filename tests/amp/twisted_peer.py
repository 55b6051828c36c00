"""A Twisted AMP peer for the interop tests (runs in a subprocess).

    python twisted_peer.py server CERT_PEM       prints "PORT <n>", serves until killed
    python twisted_peer.py client PORT           runs the scenario, prints a JSON report
    python twisted_peer.py unix-server PATH      prints "READY", serves on a UNIX socket
    python twisted_peer.py unix-client PATH      passes descriptors to PATH, prints JSON
    python twisted_peer.py pings PORT N          N Pings at once to PORT, prints the answers

Only Twisted is imported here: these are Twisted's own declarations of the
commands in commands.py, so the two sides meet only on the wire.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor, ssl, task
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols import amp


class TwistedBigBytes(amp.Argument):
    """Twisted side of BigBytes: keys name, name.2, name.3, ... of <= 65,535 bytes each."""

    def fromBox(self, name, strings, objects, proto):
        first = strings.get(name)
        if first is None:
            objects[name.decode()] = None
            return
        chunks = [first]
        counter = 2
        while (chunk := strings.get(b"%s.%d" % (name, counter))) is not None:
            chunks.append(chunk)
            counter += 1
        objects[name.decode()] = b"".join(chunks)

    def toBox(self, name, strings, objects, proto):
        value = objects.pop(name.decode(), None)
        if value is None:
            return
        strings[name] = value[:0xFFFF]
        for counter, start in enumerate(range(0xFFFF, len(value), 0xFFFF), start=2):
            strings[b"%s.%d" % (name, counter)] = value[start : start + 0xFFFF]


class DeclaredError(Exception):
    pass


class FatalError(Exception):
    pass


TYPES = [
    (b"i", amp.Integer()),
    (b"s", amp.String()),
    (b"u", amp.Unicode()),
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
    fatalErrors = {FatalError: b"FATAL"}


class Ping(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode())]


class Pong(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode())]


class Big(amp.Command):
    arguments = [(b"data", TwistedBigBytes())]
    response = [(b"data", TwistedBigBytes()), (b"size", amp.Integer())]


class Notify(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    requiresAnswer = False


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


class Echo(protocol.Protocol):
    """What a switched connection speaks: a greeting line, then data echoed upper-cased."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def connectionMade(self) -> None:
        self.transport.write(self.greeting.encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data.upper())


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
    certificate: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    @AllTypes.responder
    def all_types(self, **kwargs):
        return kwargs

    @Fail.responder
    def fail(self, mode):
        if mode == "declared":
            raise DeclaredError("declared text")
        if mode == "fatal":
            raise FatalError("fatal text")
        raise ZeroDivisionError("secret detail")

    @Ping.responder
    async def ping(self, text):
        answer = await self.callRemote(Pong, text=text)
        return {"text": "ping:" + answer["text"]}

    @Pong.responder
    def pong(self, text):
        return {"text": "pong:" + text}

    @Big.responder
    def big(self, data):
        return {"data": data[::-1], "size": len(data)}

    @Notify.responder
    def notify(self, text):
        self.notes.append(text)
        return {}

    @GetNotes.responder
    def get_notes(self):
        return {"notes": self.notes}

    @IsSecure.responder
    def is_secure(self):
        return {"secure": ISSLTransport.providedBy(self.transport)}

    @SwitchToEcho.responder
    def switch_to_echo(self, greeting):
        if greeting == "refuse":
            raise DeclaredError("not switching")
        return Echo(greeting)

    @Hand.responder
    def hand(self, fd, text):
        written = os.write(fd, text.encode())
        os.close(fd)
        return {"written": written}

    @Ask.responder
    def ask(self, text):
        read, write = os.pipe()
        os.write(write, text.encode())
        os.close(write)
        reactor.callLater(1, os.close, read)  # sent by then
        return {"fd": read}

    @Where.responder
    def where(self, path):
        return {"path": path.child("child"), "name": path.basename()}

    @amp.StartTLS.responder
    def start_tls(self):
        return {"tls_localCertificate": self.certificate}


def serve(cert_path: str) -> None:
    with open(cert_path) as f:
        Peer.certificate = ssl.PrivateCertificate.loadPEM(f.read())
    factory = protocol.Factory.forProtocol(Peer)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print("PORT", port.getHost().port, flush=True)
    reactor.run()


def describe(failure_or_value: Any) -> Any:
    if isinstance(failure_or_value, Exception):
        return {"error": type(failure_or_value).__name__, "text": str(failure_or_value)}
    return failure_or_value


def norm(value: Any) -> Any:
    """JSON-friendly form of a value, so floats, decimals and datetimes compare exactly."""
    import datetime

    if isinstance(value, datetime.datetime):
        return "DT:" + value.isoformat()
    if isinstance(value, list):
        return [norm(item) for item in value]
    if isinstance(value, dict):
        return {key: norm(item) for key, item in sorted(value.items())}
    return repr(value)


async def call(proto: amp.AMP, command: type[amp.Command], *args: Any, **kwargs: Any) -> Any:
    try:
        return await proto.callRemote(command, *args, **kwargs)
    except Exception as exc:
        return describe(exc)


async def scenario(reactor_: Any, port: int, values_json: str) -> None:
    import datetime
    import decimal

    report: dict[str, Any] = {}
    endpoint = endpoints.TCP4ClientEndpoint(reactor_, "127.0.0.1", port)
    proto = await endpoints.connectProtocol(endpoint, Peer())
    cases = json.loads(values_json)
    report["all_types"] = []
    for case in cases:
        kwargs = {
            k: eval(v, {"datetime": datetime, "Decimal": decimal.Decimal}) for k, v in case.items()
        }
        result = await proto.callRemote(AllTypes, **kwargs)
        report["all_types"].append(norm(result))
    report["declared"] = await call(proto, Fail, mode="declared")
    report["undeclared"] = await call(proto, Fail, mode="undeclared")
    report["unhandled"] = await call(proto, Nope)
    report["ping"] = await call(proto, Ping, text="hello")
    from twisted.python.filepath import FilePath

    where = await proto.callRemote(Where, path=FilePath("/tmp/d\u00e9j\u00e0 vu"))
    report["where"] = [where["path"].path, where["name"]]
    data = bytes(range(256)) * 1100  # 281,600 bytes: five chunks
    big = await proto.callRemote(Big, data=data)
    report["big"] = [big["size"], big["data"] == data[::-1]]
    proto.callRemote(Notify, text="n1")
    proto.callRemote(Notify, text="n2")
    report["notes"] = await call(proto, GetNotes)
    report["secure_before"] = (await proto.callRemote(IsSecure))["secure"]
    await proto.callRemote(amp.StartTLS)
    report["secure_after"] = (await proto.callRemote(IsSecure))["secure"]
    report["ping_tls"] = await call(proto, Ping, text="tls")
    big = await proto.callRemote(Big, data=data)
    report["big_tls"] = [big["size"], big["data"] == data[::-1]]
    lost = defer.Deferred()
    proto.connectionLost = lambda reason: lost.callback(None)
    report["fatal"] = await call(proto, Fail, mode="fatal")
    await lost
    report["closed_after_fatal"] = True
    print(json.dumps(report, sort_keys=True), flush=True)


async def tags_scenario(reactor_: Any, port: int) -> None:
    """Calls that fail before or while framing, between good ones (see test_tags_...)."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor_, "127.0.0.1", port)
    proto = await endpoints.connectProtocol(endpoint, Peer())
    outcomes = []
    calls = [
        (Ping, {"text": "x" * 70000}),
        (Ping, {"text": "a"}),
        (Ping, {}),
        (ListCall, {"items": ["y" * 70000]}),
        (Ping, {"text": "b"}),
        (Notify, {"text": "n"}),
        (Ping, {"text": "c"}),
    ]
    for command, kwargs in calls:
        try:
            result = proto.callRemote(command, **kwargs)
            outcomes.append("sent" if result is None else describe(await result))
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    print(json.dumps(outcomes), flush=True)
    proto.transport.loseConnection()


async def pings_scenario(reactor_: Any, port: int, count: int) -> None:
    """``count`` Ping calls at once; the server's responders call Pong back on us."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor_, "127.0.0.1", port)
    proto = await endpoints.connectProtocol(endpoint, Peer())
    calls = [proto.callRemote(Ping, text=str(i)) for i in range(count)]
    answers = await defer.gatherResults(calls)
    print(json.dumps([answer["text"] for answer in answers]), flush=True)
    proto.transport.loseConnection()


class Collect(protocol.Protocol):
    """The client side after a switch: sends ``xyz`` and collects what comes back."""

    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.data = b""

    def connectionMade(self) -> None:
        self.transport.write(b"xyz")

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"XYZ") and not self.done.called:
            self.done.callback(self.data)


class CollectFactory(protocol.ClientFactory):
    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Collect:
        return Collect(self.done)


async def switch_scenario(reactor_: Any, port: int) -> None:
    """Switch our server's connection to its echo protocol, refused once first."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor_, "127.0.0.1", port)
    proto = await endpoints.connectProtocol(endpoint, Peer())
    report: dict[str, Any] = {}
    report["refused"] = await call(proto, SwitchToEcho, CollectFactory(), greeting="refuse")
    report["ping"] = await call(proto, Ping, text="still amp")
    factory = CollectFactory()
    report["answer"] = await call(proto, SwitchToEcho, factory, greeting="hi")
    report["echo"] = (await factory.done).decode()
    print(json.dumps(report), flush=True)
    proto.transport.loseConnection()


def serve_unix(path: str) -> None:
    reactor.listenUNIX(path, protocol.Factory.forProtocol(Peer))
    print("READY", flush=True)
    reactor.run()


async def unix_scenario(reactor_: Any, path: str) -> None:
    endpoint = endpoints.UNIXClientEndpoint(reactor_, path)
    proto = await endpoints.connectProtocol(endpoint, Peer())
    report: dict[str, Any] = {}
    read, write = os.pipe()
    report["hand"] = await proto.callRemote(Hand, fd=write, text="from twisted")
    os.close(write)
    report["handed"] = os.read(read, 100).decode()
    os.close(read)
    answer = await proto.callRemote(Ask, text="to twisted")
    report["asked"] = os.read(answer["fd"], 100).decode()
    os.close(answer["fd"])
    print(json.dumps(report), flush=True)
    proto.transport.loseConnection()


def client(port: int) -> None:
    values_json = sys.stdin.read()
    task.react(lambda r: defer.ensureDeferred(scenario(r, port, values_json)))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2])
    elif sys.argv[1] == "unix-server":
        serve_unix(sys.argv[2])
    elif sys.argv[1] == "unix-client":
        task.react(lambda r: defer.ensureDeferred(unix_scenario(r, sys.argv[2])))
    elif sys.argv[1] == "switch":
        task.react(lambda r: defer.ensureDeferred(switch_scenario(r, int(sys.argv[2]))))
    elif sys.argv[1] == "pings":
        task.react(
            lambda r: defer.ensureDeferred(pings_scenario(r, int(sys.argv[2]), int(sys.argv[3])))
        )
    elif sys.argv[1] == "tags":
        task.react(lambda r: defer.ensureDeferred(tags_scenario(r, int(sys.argv[2]))))
    else:
        client(int(sys.argv[2]))
