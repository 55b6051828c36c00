"""A plain Twisted AMP client of the AMGI-over-AMP server (runs in a subprocess).

python amp_twisted_client.py PORT [--token T] [--ca PEM] [--cert PEM]
                                  [--only-deliver]          prints a JSON report

``--token`` authenticates first (the Authenticate command of docs/servers/amp.md);
``--ca`` connects over TLS trusting that CA, ``--cert`` (certificate + key) adds a
client certificate; ``--only-deliver`` makes one Deliver and reports how it ended.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet import defer, endpoints, ssl, task
from twisted.protocols import amp


class Nacked(Exception):
    pass


class Unauthenticated(Exception):
    pass


class Forbidden(Exception):
    pass


REFUSALS = {Unauthenticated: b"UNAUTHENTICATED", Forbidden: b"FORBIDDEN"}


class Authenticate(amp.Command):
    arguments = [(b"token", amp.String())]
    fatalErrors = REFUSALS


class Payload(amp.Argument):
    """The large-bytes recipe: keys name, name.2, name.3, ... of <= 65,535 bytes."""

    def fromBox(self, name, strings, objects, proto):
        chunks = []
        key, counter = name, 2
        while (chunk := strings.get(key)) is not None:
            chunks.append(chunk)
            key, counter = b"%s.%d" % (name, counter), counter + 1
        objects[name.decode()] = b"".join(chunks) if chunks else None

    def toBox(self, name, strings, objects, proto):
        value = objects.pop(name.decode(), None)
        if value is None:
            return
        strings[name] = value[:0xFFFF]
        for counter, start in enumerate(range(0xFFFF, len(value), 0xFFFF), start=2):
            strings[b"%s.%d" % (name, counter)] = value[start : start + 0xFFFF]


class Deliver(amp.Command):
    arguments = [
        (b"address", amp.Unicode()),
        (b"headers", amp.AmpList([(b"name", amp.String()), (b"value", amp.String())])),
        (b"payload", Payload(optional=True)),
    ]
    errors = {Nacked: b"NACK"}
    fatalErrors = REFUSALS


class Subscribe(amp.Command):
    arguments = [(b"address", amp.Unicode())]
    fatalErrors = REFUSALS


class Client(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.delivered: defer.Deferred[Any] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)

    @Deliver.responder
    def deliver(self, address, headers, payload):
        from twisted.internet import reactor

        pairs = [[h["name"].decode(), h["value"].decode()] for h in headers]
        message = {"address": address, "headers": pairs, "payload": payload.decode()}
        reactor.callLater(0, self._fire, message)
        return {}

    def _fire(self, message: dict[str, Any]) -> None:
        if not self.delivered.called:
            self.delivered.callback(message)


def endpoint_for(reactor: Any, args: argparse.Namespace) -> Any:
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", args.port)
    if args.ca is None:
        return endpoint
    with open(args.ca) as f:
        trust = ssl.Certificate.loadPEM(f.read())
    client_cert = None
    if args.cert is not None:
        with open(args.cert) as f:
            client_cert = ssl.PrivateCertificate.loadPEM(f.read())
    options = ssl.optionsForClientTLS("localhost", trustRoot=trust, clientCertificate=client_cert)
    return endpoints.wrapClientTLS(options, endpoint)


async def only_deliver(proto: Client) -> dict[str, Any]:
    """One Deliver; report its answer or error and whether the server then closed."""
    report: dict[str, Any] = {}
    try:
        report["deliver"] = await proto.callRemote(
            Deliver, address="orders", headers=[], payload=b"from twisted"
        )
    except Exception as exc:
        report["deliver"] = {"error": type(exc).__name__, "text": str(exc)}
        await proto.lost
        report["closed"] = True
        return report
    proto.transport.loseConnection()
    await proto.lost
    return report


async def scenario(reactor: Any, args: argparse.Namespace) -> None:
    proto = await endpoints.connectProtocol(endpoint_for(reactor, args), Client())
    if args.token is not None:
        try:
            await proto.callRemote(Authenticate, token=args.token.encode())
        except Exception as exc:
            print(json.dumps({"authenticate": {"error": type(exc).__name__}}), flush=True)
            return
    if args.only_deliver:
        print(json.dumps(await only_deliver(proto)), flush=True)
        return
    report: dict[str, Any] = {}
    await proto.callRemote(Subscribe, address="replies")
    report["ack"] = await proto.callRemote(
        Deliver, address="orders", headers=[{"name": b"k", "value": b"v"}], payload=b"twisted"
    )
    big = b"x" * 150_000
    report["big"] = await proto.callRemote(Deliver, address="orders", headers=[], payload=big)
    try:
        await proto.callRemote(Deliver, address="orders", headers=[], payload=b"bad")
        report["nack"] = None
    except Nacked as exc:
        report["nack"] = str(exc)
    # The app answers this one with a message.send to "replies", which the server
    # delivers to us as a Deliver call because we subscribed.
    report["reply_ack"] = await proto.callRemote(
        Deliver, address="orders", headers=[], payload=b"please reply"
    )
    report["received"] = await proto.delivered
    proto.transport.loseConnection()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--token")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--only-deliver", action="store_true")
    arguments = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(scenario(r, arguments)))
