"""The example order service run with ``amgi run`` on the real Kafka broker, end to end."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import pytest

from amgi.servers.kit import DEAD_LETTER_REASON_HEADER
from tests.servers.kafka_helpers import (
    BOOTSTRAP,
    ROOT,
    create_topic,
    ensure_broker,
    fresh,
    produce,
    read_all,
)

pytestmark = pytest.mark.timeout(120)


def test_orders_to_invoices_on_kafka_with_poison_dead_lettered() -> None:
    ensure_broker()
    region = fresh("eu")
    topic = create_topic(f"orders.{region}", partitions=1)
    with contextlib.suppress(Exception):  # it exists after the first run
        create_topic("invoices", partitions=1)
    customer = f"ada-{region}"
    good = {"id": 1, "customer": customer, "lines": [{"sku": "book", "qty": 2}]}
    invalid = {"id": 2, "customer": customer, "lines": [{"sku": "pen", "qty": 0}]}
    blocked = {"id": 3, "customer": "mallory", "lines": [{"sku": "pen", "qty": 1}]}
    produce(
        topic,
        [
            (None, json.dumps(good).encode(), [("trace-id", b"t-1")]),
            (None, json.dumps(invalid).encode(), []),
            (None, json.dumps(blocked).encode(), []),
        ],
    )
    server = subprocess.Popen(
        [
            sys.executable, "-m", "amgi", "run", "examples.orders:app", topic,
            "--server", "kafka", "--bootstrap-servers", BOOTSTRAP, "--group-id", fresh("billing"),
            "--session-timeout-ms", "1000", "--heartbeat-interval-ms", "200",
            "--max-attempts", "2", "--retry-delay", "0.2",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        invoices: list[object] = []
        deadline = time.monotonic() + 60
        while not invoices and time.monotonic() < deadline:
            records = read_all("invoices", 10_000, timeout=3)
            invoices = [
                json.loads(r.value()) for r in records if customer.encode() in (r.value() or b"")
            ]
        # The server created the dead-letter topic at startup, before the invoice went out.
        dead = read_all(f"{topic}.dlq", 2, timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert invoices == [{"order_id": 1, "customer": customer, "region": region, "total": "24.00"}]
    reasons = {
        json.loads(r.value())["id"]: dict(r.headers() or [])[DEAD_LETTER_REASON_HEADER.decode()]
        for r in dead
    }
    assert set(reasons) == {2, 3}, output
    assert b"lines.0.qty: Input should be greater than 0" in reasons[2]
    assert reasons[3].endswith(b"customer 'mallory' is blocked")
    assert "ledger opened" in output
    assert "ledger closed" in output
