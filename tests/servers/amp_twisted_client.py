"""A plain Twisted AMP client of the AMGI-over-AMP server (runs in a subprocess).

python amp_twisted_client.py PORT     prints a JSON report
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, endpoints, task
from twisted.protocols import amp


class Nacked(Exception):
    pass


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


class Subscribe(amp.Command):
    arguments = [(b"address", amp.Unicode())]


class Client(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.delivered: defer.Deferred[Any] = defer.Deferred()

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


async def scenario(reactor: Any, port: int) -> None:
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    proto = await endpoints.connectProtocol(endpoint, Client())
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
    task.react(lambda r: defer.ensureDeferred(scenario(r, int(sys.argv[1]))))
