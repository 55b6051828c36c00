"""The applications bench_http.py serves, one per contender (each imported in its own
server process, so only the one a process needs is built).

* ``ack``: the AMGI 1.0 app ``amgi run --server http`` serves: acks every message;
* ``push``: a factory of ``amgi.http.PushApp(ack)``, the same server as an ASGI app (for
  uvicorn's ``--factory``);
* ``bare``: an ASGI app answering 204 without reading the request (the limit);

Upstream's server is in ``_http_upstream.py`` (it runs in the bench venv, without ``amgi``).
"""

from __future__ import annotations

from typing import Any

from bench._common import ack_all as ack

__all__ = ["ack", "bare", "push"]

_START = {"type": "http.response.start", "status": 204, "headers": []}
_BODY = {"type": "http.response.body", "body": b""}


async def bare(scope: Any, receive: Any, send: Any) -> None:
    """Answer 204 to every request, parsing nothing."""
    if scope["type"] != "http":
        return
    await send(_START)
    await send(_BODY)


def push() -> Any:
    """``PushApp(ack)``: built in the process that serves it (uvicorn ``--factory``)."""
    from amgi.http import PushApp

    return PushApp(ack)
