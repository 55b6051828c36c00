"""The producer: delivery reports on their own thread, republishing nacked records (private)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from amgi.errors import ConfigurationError
from amgi.servers.kafka._client import KafkaClient, KafkaSendError
from amgi.servers.kafka.records import (
    RETRY_DUE_HEADER,
    RETRY_GROUP_HEADER,
    SERVER_HEADERS,
    record_headers,
)
from amgi.servers.kit import (
    ORIGINAL_ADDRESS_HEADER,
    dead_letter_headers,
    move_aside,
    redact,
    retry_headers,
)
from amgi.transport import DeadLetter, HeaderList, Message, Retry, Settlement

logger = logging.getLogger("amgi.servers.kafka")

_REPLACE_INTERVAL = 5.0
"""Least seconds between two replacements of a producer that failed for good."""


class Producing(KafkaClient):
    """Produce records and await the broker's acknowledgement without blocking the loop."""

    def _serve_deliveries(self, producer: Any, retired: threading.Event) -> None:
        """Serve ``producer``'s delivery reports until the transport stops or the
        producer is ``retired`` (a thread)."""
        while not self._stopping.is_set() and not retired.is_set():
            producer.poll(0.1)

    def _start_producers(self) -> None:
        """The producer, and the mover when ``--acks`` is not ``all``, each with the
        thread serving its delivery reports.

        A move (retry copy, dead letter, replayed record) takes the place of a record
        that is committed once the move is confirmed: with ``acks=0`` a producer counts a
        record stored as soon as it is written to the socket, so one the broker never
        took (a connection lost, a refusal) had its original committed and was lost; with
        ``acks=1`` one the leader lost in a failover likewise. ``--acks`` is for the
        application's own sends: moves are always confirmed by every in-sync replica.
        """
        self._producer = self._new_producer(None, "producer")
        if self.config.acks not in ("all", "-1"):
            self._mover = self._new_producer("all", "mover")

    def _new_producer(self, acks: str | None, role: str) -> Any:
        """A producer (``acks`` in place of ``--acks`` unless None) and the thread serving
        its delivery reports, named after its ``role``."""
        from confluent_kafka import KafkaException, Producer

        try:
            producer = Producer(self._producer_config(acks))
        except (KafkaException, ValueError, TypeError) as exc:
            why = redact(str(exc), self.config)  # librdkafka quotes a bad value
            raise ConfigurationError(f"invalid Kafka producer option: {why}") from None
        retired = threading.Event()
        thread = threading.Thread(
            target=self._serve_deliveries,
            args=(producer, retired),
            name=f"amgi-kafka-delivery-{role}",
            daemon=True,
        )
        self._delivery_threads.append(thread)
        self._producer_threads[id(producer)] = (retired, thread)
        thread.start()
        return producer

    def _producer_failed(self, producer: Any, why: str) -> None:
        """``producer`` failed for good (a fatal error: librdkafka takes no record from
        it any more): put a new one in its place and retire it (the event loop).

        Tansu fences an idempotent producer whose send timed out, and every later send,
        retry copy and dead letter then failed alike, for ever. A new producer gets a new
        producer id; the sends under way on the old one fail, for now (their senders and
        ``move_aside`` send them again). Replaced at most once per ``_REPLACE_INTERVAL``:
        a broker that fails every new producer at once is not asked in a loop.
        """
        if producer is self._producer:
            role, acks = "producer", None
        elif producer is self._mover:
            role, acks = "mover", "all"
        else:
            return  # replaced already
        now = time.monotonic()
        if self._closing or now < self._replace_due.get(role, 0.0):
            return
        self._replace_due[role] = now + _REPLACE_INTERVAL
        logger.warning(
            "the Kafka %s failed for good (%s): replaced by a new one; its sends under way fail",
            role,
            why,
        )
        try:
            new = self._new_producer(acks, role)
        except ConfigurationError as exc:  # the options were taken once: unlikely
            logger.error("the Kafka %s could not be replaced: %s", role, exc)
            return
        if role == "producer":
            self._producer = new
        else:
            self._mover = new
        task = asyncio.get_running_loop().create_task(self._retire(producer))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, producer: Any) -> None:
        """Stop the thread of a failed producer, fail the sends it still holds, close it."""
        retired, thread = self._producer_threads.pop(id(producer))
        retired.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, thread.join)
        if thread in self._delivery_threads:
            self._delivery_threads.remove(thread)
        producer.purge()
        producer.poll(0)  # their delivery reports: a send still awaited fails now
        close = getattr(producer, "close", None)  # older confluent-kafka releases lack it
        if close is not None:
            await loop.run_in_executor(None, close)

    def _produce(
        self,
        topic: str,
        headers: HeaderList,
        payload: bytes | None,
        key: Any,
        partition: int | None,
        server_headers: HeaderList | None = None,
        *,
        move: bool = False,
    ) -> asyncio.Future[None]:
        """Produce one record. ``server_headers`` (a retry copy's or dead letter's) go
        after ``headers`` as they are, and then an application's header named like one
        of them travels packed. A ``move`` goes by the mover (``_start_producers``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        producer = self._producer
        if move and self._mover is not None:
            producer = self._mover
        if producer is None:
            done.set_exception(KafkaSendError(f"cannot send to {topic!r}: not connected"))
            return done

        def settle_future(err: Any, record: Any) -> None:
            if done.done():
                return
            if err is None:
                done.set_result(None)
                return
            error = KafkaSendError(f"Kafka did not take a record for {topic!r}: {err.str()}")
            error.for_now = _for_now(err)
            if _failed_for_good(err):  # the producer's state, not the record's: replaced
                error.for_now = True
                self._producer_failed(producer, err.str())
            done.set_exception(error)

        def on_delivery(err: Any, record: Any) -> None:
            loop.call_soon_threadsafe(settle_future, err, record)

        # Kafka header names are strings; the client would str() a bytes name.
        if server_headers is None:
            names = record_headers(headers)
        else:
            names = record_headers(headers, SERVER_HEADERS)
            names.extend((n.decode(), v) for n, v in server_headers)
        kwargs: dict[str, Any] = {"value": payload, "headers": names, "on_delivery": on_delivery}
        if key is not None:
            kwargs["key"] = key.encode() if isinstance(key, str) else key
        if partition is not None:
            kwargs["partition"] = partition
        try:
            producer.produce(topic, **kwargs)
        except BufferError:
            full = KafkaSendError(f"Kafka producer queue is full (sending to {topic!r})")
            full.for_now = True
            done.set_exception(full)
        except Exception as exc:
            # A KafkaException carries a KafkaError, whose str() is the readable part.
            error: Any = exc.args[0] if exc.args else None
            text = error.str() if hasattr(error, "str") else str(exc)
            refused = KafkaSendError(f"cannot send to {topic!r}: {text}")
            if hasattr(error, "fatal") and _failed_for_good(error):  # as in settle_future
                refused.for_now = True
                self._producer_failed(producer, text)
            done.set_exception(refused)
        return done

    async def _republish(
        self, address: str, settlement: Settlement, give_up: Any, since: float
    ) -> list[Message]:
        """Copy retries and dead letters (kit rule); the messages that could not be moved.

        A retry copy the broker could not take for now (``KafkaSendError.for_now``) is
        tried again, its record unacknowledged, for ``--retry-refused-for`` seconds from
        ``since`` (``time.monotonic()`` of the first try) before it is dead-lettered:
        dead-lettered at once, a record with attempts left went to the dead letters for a
        broker away longer than ``--delivery-timeout-ms`` (the dead letter, sent next,
        was taken once it was back).
        """
        original = address.encode()
        group = self.config.group_id.encode()
        preparing = self._preparing.get(address)
        if preparing is not None:  # a topic matched by a pattern, its topics being made
            await asyncio.wait([preparing])

        async def retry(r: Retry) -> None:
            m = r.message
            due = str(int(time.time() * 1000) + int(r.delay * 1000)).encode()
            own = retry_headers(
                [],
                attempt=m.attempt + (not r.uncounted),
                extra=[
                    (ORIGINAL_ADDRESS_HEADER, original),
                    (RETRY_DUE_HEADER, due),
                    (RETRY_GROUP_HEADER, group),
                ],
            )
            key = m.bindings.get("kafka", {}).get("key")
            target = self._retry_name(address)
            await self._produce(target, m.headers, m.payload, key, None, own, move=True)

        async def dead(d: DeadLetter) -> None:
            m = d.message
            # The kit's order (the message's headers, then the server's), with none of
            # the message's left out: they travel packed when named like the server's.
            own = dead_letter_headers([], attempt=m.attempt, address=address, reason=d.reason)
            key = m.bindings.get("kafka", {}).get("key")
            target = self._dead_name(address)
            await self._produce(target, m.headers, m.payload, key, None, own, move=True)

        return await move_aside(
            settlement,
            retry=retry,
            dead=dead,
            address=address,
            give_up=give_up,
            transient=lambda exc: isinstance(exc, KafkaSendError) and exc.for_now,
            transient_for=self.config.retry_refused_for,
            since=since,
        )


_FOR_NOW = frozenset(
    {
        "_MSG_TIMED_OUT",
        "_TIMED_OUT",
        "_TRANSPORT",
        "_ALL_BROKERS_DOWN",
        "_QUEUE_FULL",
        "_PURGE_QUEUE",
        "_PURGE_INFLIGHT",
        "REQUEST_TIMED_OUT",
        "NOT_ENOUGH_REPLICAS",
        "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        "LEADER_NOT_AVAILABLE",
        "NOT_LEADER_FOR_PARTITION",
    }
)
"""Delivery errors (librdkafka's names) of a broker that could not take a record for now."""


def _for_now(err: Any) -> bool:
    """Whether delivery error ``err`` may pass: no fault of the record's."""
    return bool(err.retriable()) or err.name() in _FOR_NOW


_FOR_GOOD = frozenset({"_FATAL", "PRODUCER_FENCED"})
"""Delivery errors (librdkafka's names) after which the producer takes no record again.
librdkafka flags its own fatal errors (``fatal()``) on its error callback, not on the
records' delivery reports, which carry the broker's: a fenced producer's."""


def _failed_for_good(err: Any) -> bool:
    """Whether error ``err`` leaves its producer unusable (replaced: ``_producer_failed``)."""
    return bool(err.fatal()) or err.name() in _FOR_GOOD
