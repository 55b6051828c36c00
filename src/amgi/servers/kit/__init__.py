"""The servers kit: the rules every protocol server and Lambda adapter shares, written once.

A server is a :class:`amgi.transport.Transport` that maps one broker onto ``connect``,
``fetch``, ``settle``, ``publish`` and ``close``; everything it would otherwise write
again is here. The API (stable; import from ``amgi.servers.kit``):

Headers (:mod:`.headers`) - what a republished retry or dead letter carries
    ``retry_headers(headers, attempt=, extra=())``, ``dead_letter_headers(headers,
    attempt=, address=, reason=)``: one order (the app's headers, ``amgi-attempt``, then
    the rest) and one encoding (UTF-8, never failing); ``attempt_from_headers(headers)``
    splits the attempt off a received message; ``headers_with_attempt``;
    ``split_dead_letter_headers(headers)`` undoes ``dead_letter_headers`` for ``amgi
    dead-letters`` (the message's headers, reason, original address); the names
    ``ATTEMPT_HEADER``, ``ORIGINAL_ADDRESS_HEADER``, ``DEAD_LETTER_REASON_HEADER``. A
    header the broker cannot carry as it is (and one of that name) travels as
    ``PACKED_HEADER`` with the value ``pack_header(name, value)``; ``unpack_header(value)``
    turns it back.

Dead letters for ``amgi dead-letters`` (:mod:`.dead_letters`)
    ``stored_dead_letter(id, headers, payload, address=, dead_at=)`` reads back a dead
    letter stored with the headers above; ``ChunkedDeadLetters`` gives a server
    ``list_dead_letters`` over its ``_dead_letter_chunks(address, limit, replay=)``.

TLS (:mod:`.tls`) - connect errors
    ``untrusted_certificate(error)`` says why the server's certificate was refused when
    ``error`` (or what it was raised from) failed verification, else None.

Watermark (:mod:`.watermark`) - cumulative acknowledgement
    ``Watermark()``: ``add(position)`` as messages or batches are handed out,
    ``settle(positions)`` returns the highest position up to which everything is
    settled (or None): acknowledge / commit that, never past an unsettled message.

Backoff (:mod:`.backoff`) - reconnect and retry loops
    ``Backoff(first, maximum)``: ``delay``, ``failed()``, ``await sleep()``, ``reset()``;
    ``doubling_delay(first, attempt, maximum)`` for per-attempt retry delays.

Delayed republisher (:mod:`.republisher`) - retries on brokers without delayed delivery
    ``DelayedRepublisher(name)``: ``schedule(delay, send)`` runs ``await send()`` later
    in a task it owns; ``await close(timeout)`` cancels the waiting ones and waits for
    those publishing. Call ``close`` from the transport's ``close``.

Moving nacked messages aside (:mod:`.aside`) - retry copies and dead letters
    ``await move_aside(settlement, retry=, dead=, address=, give_up=)`` publishes the
    copies; a retry the broker refuses is dead-lettered instead, a refused dead letter
    is tried again with backoff (loudly) until ``give_up()``; returns what was not moved.
    ``unmoved(settlement, stranded)`` is the part to try again in the background.

Due list (:mod:`.due`) - in-memory retry schedules without tasks of their own
    ``DueList()``: items ordered by due time; the owner's fetch loop asks what is due
    and how long until the next one (Redis and core NATS retries).

Refreshed figures (:mod:`.refreshed`) - consumer lag and depth for metrics
    ``Refreshed(name, every, read)``: ``get()`` returns the last ``await read()`` and
    starts, on its first call, a task re-reading it every ``every`` seconds (nothing is
    read while metrics are off); ``await close()`` from the transport's ``close``.

FIFO groups (:mod:`.fifo`)
    ``held_behind(messages, failed, group)``: the messages held back behind the first
    failure of their group (SQS FIFO, server and Lambda adapter).

Uncounted deliveries (:mod:`.uncounted`) - brokers that count every delivery
    ``Uncounted()``: ``release(ids)`` at a settle for the retries marked ``uncounted``,
    ``correct(message)`` as each message arrives, ``forget(ids)`` once settled for good
    (JetStream, SQS).

Stopping (:mod:`.handover`)
    ``await await_answers(reads, wait_time)``: a transport's ``hand_over`` waits for the
    long polls in flight, which the broker answers within ``wait_time``, and
    :data:`ANSWER_SLACK` seconds more (SQS, Redis Streams).

Options (:mod:`amgi.options`) - declared once, checked before startup
    ``option(default, help, ge=, gt=, le=, lt=, secret=, factory=)`` declares a field
    with its bounds; ``Literal[...]`` types give choices; floats must be finite. An
    options class may add ``check_together(self)`` for rules over several fields,
    raising ``invalid(self, field, problem)``. ``check_options(options)`` runs all of it
    (the runtime and ``amgi run`` call it through ``Transport.check()`` before lifespan
    startup); every message reads ``--flag problem (got field=value)``.

Secrets (:mod:`amgi.secrets`) - never shown
    ``mask_url(url)`` for a URL in a message (its password masked); ``userinfo_problem(url)``
    refuses a broker URL whose password its client would split; ``masked(value)`` is
    how a ``secret=True`` option value appears; ``redact(text, options)`` masks the
    secret option values a client library's error quotes; ``redact_client_logs(*names)``
    masks credentials a client library writes to its loggers.

Bindings (:mod:`.bindings`) - the binding keys of each protocol
    ``BINDINGS[protocol][key]`` is a ``BindingKey(name, type, direction, doc)``, named
    after AsyncAPI's message bindings; a server emits and reads only keys listed there
    (add yours when writing a server); ``parse(protocol, key, text)`` is what ``amgi
    send --binding`` uses. A server checks the values of a send before the client
    library sees them: ``whole_number(protocol, key, value, low, high)`` and
    ``text_value(protocol, key, value, pattern=, rule=)`` return the value or raise
    ``BadBinding`` (a ``ValueError``) naming the key and the rule.

Logging: a server logs to ``logging.getLogger("amgi.servers.<name>")`` and does not
repeat its name in the text (the logger name says it).
"""

from __future__ import annotations

from amgi.options import bounds_text, invalid, option
from amgi.options import check as check_options
from amgi.secrets import mask_url, masked, redact, redact_client_logs, userinfo_problem
from amgi.servers.kit.aside import move_aside, unmoved
from amgi.servers.kit.backoff import Backoff, doubling_delay
from amgi.servers.kit.bindings import (
    BINDINGS,
    BadBinding,
    BindingKey,
    UnknownBinding,
    binding_key,
    text_value,
    whole_number,
)
from amgi.servers.kit.dead_letters import ChunkedDeadLetters, DeadLetterChunk, stored_dead_letter
from amgi.servers.kit.due import DueList
from amgi.servers.kit.fifo import held_behind
from amgi.servers.kit.handover import ANSWER_SLACK, await_answers
from amgi.servers.kit.headers import (
    ATTEMPT_HEADER,
    DEAD_LETTER_REASON_HEADER,
    MOST_REASON,
    ORIGINAL_ADDRESS_HEADER,
    PACKED_HEADER,
    PACKED_HEADER_BYTES,
    attempt_from_headers,
    bounded_reason,
    dead_letter_headers,
    encode_text,
    headers_with_attempt,
    pack_header,
    retry_headers,
    split_dead_letter_headers,
    unpack_header,
)
from amgi.servers.kit.refreshed import Refreshed
from amgi.servers.kit.republisher import DelayedRepublisher
from amgi.servers.kit.tls import client_context, server_context, untrusted_certificate
from amgi.servers.kit.uncounted import Uncounted
from amgi.servers.kit.watermark import Watermark

__all__ = [
    "ANSWER_SLACK",
    "ATTEMPT_HEADER",
    "BINDINGS",
    "DEAD_LETTER_REASON_HEADER",
    "MOST_REASON",
    "ORIGINAL_ADDRESS_HEADER",
    "PACKED_HEADER",
    "PACKED_HEADER_BYTES",
    "Backoff",
    "BadBinding",
    "BindingKey",
    "ChunkedDeadLetters",
    "DeadLetterChunk",
    "DelayedRepublisher",
    "DueList",
    "Refreshed",
    "Uncounted",
    "UnknownBinding",
    "Watermark",
    "attempt_from_headers",
    "await_answers",
    "binding_key",
    "bounded_reason",
    "bounds_text",
    "check_options",
    "client_context",
    "dead_letter_headers",
    "doubling_delay",
    "encode_text",
    "headers_with_attempt",
    "held_behind",
    "invalid",
    "mask_url",
    "masked",
    "move_aside",
    "option",
    "pack_header",
    "redact",
    "redact_client_logs",
    "retry_headers",
    "server_context",
    "split_dead_letter_headers",
    "stored_dead_letter",
    "text_value",
    "unmoved",
    "unpack_header",
    "untrusted_certificate",
    "userinfo_problem",
    "whole_number",
]
