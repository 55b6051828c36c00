"""The asyncio layer: :class:`AMP`, an :class:`asyncio.Protocol` around the sans-IO
connection.

Its parts stand on each other: :class:`~._link.Link` (state, output, closing),
:class:`~._calls.Caller` (calls to the peer), :class:`~._dispatch.Dispatcher` (the
peer's input); :class:`AMP` adds the hooks asyncio calls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from ._dispatch import Dispatcher
from ._errors import ConnectionLost

__all__ = ["AMP"]

log = logging.getLogger("amgi.amp")


class AMP(Dispatcher):
    """One AMP connection: it calls the peer and answers the peer's calls.

    Subclass it and decorate methods with ``@SomeCommand.responder``; a
    responder takes the command's arguments as keywords and returns the
    response dict (or ``None`` for an empty response), directly or from a
    coroutine.

    ``max_outstanding_calls`` bounds calls awaiting an answer (more callers
    wait for a slot); ``max_concurrent_responders`` bounds running async
    responders: the peer's calls beyond it wait, and reading pauses once as many
    wait, unless some call of ours awaits its answer (which must be read); then
    reading goes on and a peer with more than ``max_queued_calls`` calls waiting
    (default 4 x ``max_concurrent_responders``) is disconnected with a WARNING;
    ``call_timeout`` is the default timeout of :meth:`call_remote`;
    ``tls_context`` lets the peer switch this connection to TLS with
    ``StartTLS`` (this side acts as the TLS server); ``max_box_size`` and
    ``max_keys_per_box`` bound each box received (a peer exceeding them is
    disconnected with a WARNING), and ``max_unclaimed_fds`` the descriptors a UNIX
    peer sent that no argument claimed yet (likewise); ``close_timeout`` bounds how
    long closing waits for the peer to read what is still queued before the
    connection is aborted.

    Writing is flow-controlled: while the transport asks to pause writing, the
    peer's calls are not run but queued (reading pauses once
    ``max_concurrent_responders`` wait), so answers stop piling up, and
    :meth:`call_remote` waits before sending.
    """

    # ------------------------------------------------------------- asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self._hold_input:
            self._held_input.append(data)
            return
        try:
            self._handle(self._core.receive_data(data))
        except Exception:
            # A bug here must not escape into the event loop; the stream is now unusable.
            log.exception("internal error while processing AMP data; closing")
            self._close_transport("internal error while processing AMP data")

    def fds_received(self, fds: list[int]) -> None:
        """File descriptors from the peer (UNIX connections), for Descriptor arguments."""
        events = self._core.receive_fds(fds)
        if events:  # too many held: the connection closes, and they are closed now
            self._handle(events)
            self._close_unclaimed_fds()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._refused_unsent = 0
        self._run_queued()
        self._update_reading()
        self._wake_drain_waiters()
        self._flush_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._end_reason  # why we closed it ourselves, if we did
        if reason is None:
            reason = f"connection lost: {exc}" if exc else "connection closed"
        self._finish(ConnectionLost(reason))
