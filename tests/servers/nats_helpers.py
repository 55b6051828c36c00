"""Shared by the NATS server tests: the broker, the test stream, fresh subjects, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amgi.servers.nats._headers import decode
from amgi.transport import HeaderList, Message, Transport
from tests.net import port_open

ROOT = Path(__file__).resolve().parents[2]
PORT = 4222
URL = f"nats://127.0.0.1:{PORT}"
STREAM = "AMGI_TEST"
PREFIX = "amgi-test"


def ensure_broker() -> None:
    """Start the shared nats-server with the project's script when it does not answer."""
    if port_open(PORT):
        return
    done = subprocess.run(
        ["bash", "scripts/brokers/nats.sh"], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0 or not port_open(PORT):
        pytest.fail(f"could not start nats-server:\n{done.stdout}\n{done.stderr}")


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def ensure_stream(
    url: str = URL,
    name: str = STREAM,
    subjects: Any = None,
    *,
    on_disk: bool = False,
    **connect: Any,
) -> None:
    """The stream the tests publish to (in memory unless ``on_disk``), created when missing;
    ``connect``: more arguments of ``nats.connect`` (TLS, credentials)."""
    import nats
    from nats.js import api
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url, **connect)
    try:
        jsm = nc.jsm()
        try:
            await jsm.stream_info(name)
        except NotFoundError:
            await jsm.add_stream(
                api.StreamConfig(
                    name=name,
                    subjects=subjects or [f"{PREFIX}.>"],
                    storage=api.StorageType.FILE if on_disk else api.StorageType.MEMORY,
                    max_age=3600,
                )
            )
    finally:
        await nc.close()


async def read_subject(
    subject: str, count: int, timeout: float, url: str = URL
) -> list[tuple[HeaderList, bytes, Any]]:
    """The first ``count`` messages stored on ``subject``: ``(headers, payload, msg)``."""
    import nats
    from nats import errors as nats_errors

    nc = await nats.connect(url)
    found: list[tuple[HeaderList, bytes, Any]] = []
    try:
        sub = await nc.jetstream().pull_subscribe(subject, durable=None)
        deadline = time.monotonic() + timeout
        while len(found) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{subject}: {len(found)} of {count} messages after {timeout}s")
            try:
                msgs = await sub.fetch(count - len(found), timeout=0.5)
            except nats_errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                headers, _ = decode(m.headers)
                found.append((headers, m.data, m))
    finally:
        await nc.close()
    return found


async def fetch_all(t: Transport, n: int, timeout: float = 15) -> list[Message]:
    """Fetch from ``t`` until ``n`` messages came (or fail after ``timeout`` seconds)."""
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            for batch in await t.fetch():
                got.extend(batch.messages)
    return got


async def consumer_state(stream: str, durable: str, url: str = URL, **connect: Any) -> Any:
    import nats

    nc = await nats.connect(url, **connect)
    try:
        return await nc.jsm().consumer_info(stream, durable)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def retention_stream(retention: str, tag: str = "") -> AsyncIterator[tuple[str, str]]:
    """A fresh in-memory stream with ``retention`` (limits, interest, workqueue) that
    captures ``amgi-test-{tag}.>`` (a fresh tag by default), deleted at the end: its
    name, and the ``--dead-letter-subject`` that goes there."""
    import nats
    from nats.js import api

    tag = tag or fresh("dl")
    name = f"AMGI_TEST_{tag.replace('-', '_')}"
    nc = await nats.connect(URL)
    try:
        await nc.jsm().add_stream(
            api.StreamConfig(
                name=name, subjects=[f"{PREFIX}-{tag}.>"], storage=api.StorageType.MEMORY,
                retention=api.RetentionPolicy(retention), max_age=600,
            )
        )  # fmt: skip
        yield name, f"{PREFIX}-{tag}.{{subject}}"
    finally:
        with contextlib.suppress(Exception):
            await nc.jsm().delete_stream(name)
        await nc.close()


async def stored(subject: str, url: str = URL) -> list[bytes]:
    """The payloads of every message stored on ``subject`` now (nothing is acked)."""
    import nats

    nc = await nats.connect(url)
    payloads: list[bytes] = []
    try:
        sub = await nc.jetstream().pull_subscribe(subject, durable=None)
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:  # (nats-py's own is one too)
                return payloads
            payloads += [m.data for m in msgs]
    finally:
        await nc.close()
