"""The producer: delivery reports on their own thread, republishing nacked records (private)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

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
    retry_headers,
)
from amgi.transport import DeadLetter, HeaderList, Message, Retry, Settlement

logger = logging.getLogger("amgi.servers.kafka")


class Producing(KafkaClient):
    """Produce records and await the broker's acknowledgement without blocking the loop."""

    def _serve_deliveries(self) -> None:
        producer = self._producer
        while producer is not None and not self._stopping.is_set():
            producer.poll(0.1)

    def _produce(
        self,
        topic: str,
        headers: HeaderList,
        payload: bytes | None,
        key: Any,
        partition: int | None,
        server_headers: HeaderList | None = None,
    ) -> asyncio.Future[None]:
        """Produce one record. ``server_headers`` (a retry copy's or dead letter's) go
        after ``headers`` as they are, and then an application's header named like one
        of them travels packed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        producer = self._producer
        if producer is None:
            done.set_exception(KafkaSendError(f"cannot send to {topic!r}: not connected"))
            return done

        def settle_future(err: Any, record: Any) -> None:
            if done.done():
                return
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(
                    KafkaSendError(f"Kafka did not take a record for {topic!r}: {err.str()}")
                )

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
            done.set_exception(
                KafkaSendError(f"Kafka producer queue is full (sending to {topic!r})")
            )
        except Exception as exc:
            # A KafkaException carries a KafkaError, whose str() is the readable part.
            error: Any = exc.args[0] if exc.args else None
            text = error.str() if hasattr(error, "str") else str(exc)
            done.set_exception(KafkaSendError(f"cannot send to {topic!r}: {text}"))
        return done

    async def _republish(self, address: str, settlement: Settlement, give_up: Any) -> list[Message]:
        """Copy retries and dead letters (kit rule); the messages that could not be moved."""
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
            await self._produce(self._retry_name(address), m.headers, m.payload, key, None, own)

        async def dead(d: DeadLetter) -> None:
            m = d.message
            # The kit's order (the message's headers, then the server's), with none of
            # the message's left out: they travel packed when named like the server's.
            own = dead_letter_headers([], attempt=m.attempt, address=address, reason=d.reason)
            key = m.bindings.get("kafka", {}).get("key")
            await self._produce(self._dead_name(address), m.headers, m.payload, key, None, own)

        return await move_aside(
            settlement, retry=retry, dead=dead, address=address, give_up=give_up
        )
