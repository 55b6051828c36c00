"""Start moto's server, the tests' SQS stand-in, with its SQS backend made thread-safe.

moto answers each request on a thread of its own, and its SQS backend changes message
state without a lock. Two ReceiveMessage calls at once (the SQS server keeps two long
polls per queue in flight) then race once the machine is busy: both take one message,
each counting a receive, or they split a FIFO group between them and hand its messages
out of order. SQS does neither, and the tests that hold the server to SQS's guarantees
failed now and then when three suites shared one moto. Measured with two threads
receiving 8 FIFO messages at once under CPU load: 15 of 150 rounds split a group before
this module, none after.

Every call into the SQS backend holds one lock here; a long poll lets go of it while it
waits for messages to arrive. Arguments are moto_server's own (``-H``, ``-p``).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

from moto.server import main
from moto.sqs.models import Queue, SQSBackend

_backend_lock = threading.RLock()


def _serialised(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _backend_lock:
            return method(*args, **kwargs)

    return call


def _waiting_unlocked(wait: Callable[..., Any]) -> Callable[..., Any]:
    """A long poll's wait for messages, with the backend lock let go meanwhile (a
    message sent during the wait is seen: the wait checks for messages first)."""

    @functools.wraps(wait)
    def call(*args: Any, **kwargs: Any) -> Any:
        _backend_lock.release()
        try:
            return wait(*args, **kwargs)
        finally:
            _backend_lock.acquire()

    return call


def make_sqs_thread_safe() -> None:
    """Serialise every public method of moto's SQS backend but the long poll's wait."""
    for name, member in list(vars(SQSBackend).items()):
        if inspect.isfunction(member) and not name.startswith("_"):
            setattr(SQSBackend, name, _serialised(member))
    Queue.wait_for_messages = _waiting_unlocked(Queue.wait_for_messages)  # type: ignore[method-assign]


if __name__ == "__main__":
    make_sqs_thread_safe()
    main()
