"""One table of binding keys: the servers, ``amgi send --binding`` and docs/spec.md agree.

Keys a server emits on real messages are checked by the conformance suite against each
broker (``test_send_reaches_broker_intact``); here, the keys each server's code reads or
maps, the spec's table and the command line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from amgi.servers.kit.bindings import BINDINGS, BadBinding, markdown_table, parse
from tests.cli import amgi
from tests.core.test_cli import one_line_error

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "src" / "amgi").glob("server*/**/*.py"))
PROTOCOLS = ("kafka", "amqp", "mqtt", "sqs")
# binding.get("k"), kafka.get("k"), sqs["k"], bindings["mqtt"]["k"], m.bindings["sqs"].get("k")
READ = re.compile(
    r"""\b(?:binding|kafka|sqs|amqp|mqtt|bindings\["(?P<p>\w+)"\])"""
    r"""(?:\.get\(|\[)"(?P<key>\w+)"[,)\]]"""
)


def _protocol(path: Path) -> str | None:
    found = [p for p in PROTOCOLS if p in str(path.relative_to(ROOT / "src"))]
    return found[0] if len(found) == 1 else None


def test_every_key_a_server_reads_is_in_the_table() -> None:
    checked = 0
    for path in SOURCES:
        default = _protocol(path)
        for match in READ.finditer(path.read_text()):
            protocol = match.group("p") or default
            if protocol is None or protocol not in BINDINGS:
                continue
            assert match.group("key") in BINDINGS[protocol], f"{path.name}: {match.group(0)}"
            checked += 1
    assert checked >= 15, "the scan found too few binding reads: is the pattern stale?"


def test_property_maps_name_only_keys_of_the_table() -> None:
    from amgi.servers.amqp import _codec as amqp
    from amgi.servers.mqtt import _codec as mqtt
    from amgi.servers.sqs import records as sqs

    # (client attribute, binding key) pairs for AMQP and MQTT; (key, attribute) for SQS
    keys = {
        "amqp": [key for _, key in amqp._PROPERTY_BINDINGS],
        "mqtt": [key for _, key in mqtt._PROPERTY_BINDINGS],
        "sqs": [key for key, _ in sqs._SYSTEM_BINDINGS],
    }
    for protocol, names in keys.items():
        assert set(names) <= set(BINDINGS[protocol]), protocol


def test_the_spec_shows_the_table() -> None:
    assert markdown_table() in (ROOT / "docs" / "spec.md").read_text()


@pytest.mark.parametrize(
    ("binding", "expected"),
    [
        ("mqtt.correlation_data=x", "mqtt has no binding 'correlation_data'"),
        ("kafka.offset=3", "kafka.offset is set by the server on receive"),
        ("nosuch.key=1", "unknown binding protocol 'nosuch'"),
    ],
)
def test_amgi_send_refuses_keys_outside_the_table(
    tmp_path: Path, binding: str, expected: str
) -> None:
    result = amgi("send", "q", "p", "--binding", binding, cwd=tmp_path)
    assert expected in one_line_error(result)
    assert not (tmp_path / "amgi.db").exists()


def test_amgi_send_encodes_text_of_bytes_keys(tmp_path: Path) -> None:
    from amgi.servers.sqlite import SqliteQueue

    sent = amgi(
        "send", "q", "p", "--binding", "kafka.key=k1", "--binding", "mqtt.correlationData=c",
        "--binding", "amqp.priority=5", cwd=tmp_path,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    queue = SqliteQueue(str(tmp_path / "amgi.db"))
    _, (message,) = queue.lease("q", 1, 30)
    queue.close()
    assert message.bindings["kafka"] == {"key": b"k1"}
    assert message.bindings["mqtt"] == {"correlationData": b"c"}
    assert message.bindings["amqp"] == {"priority": 5}


def test_a_bytes_binding_sent_from_the_shell_takes_its_bytes_as_given() -> None:
    """Bytes the shell passed that are not UTF-8 (``kafka.key=$'\\xff'``) reach Python as
    escapes, and a JSON escape of a lone surrogate is no text at all: both were an
    'unexpected UnicodeEncodeError'."""
    assert parse("kafka", "key", os.fsdecode(b"k\xff")) == b"k\xff"
    with pytest.raises(BadBinding, match=r"kafka.key is no valid text \(surrogates"):
        parse("kafka", "key", '"\\ud800"')


def test_a_binding_that_is_no_valid_text_is_one_usage_error(tmp_path: Path) -> None:
    result = amgi("send", "q", "x", "--binding", 'kafka.key="\\ud800"', cwd=tmp_path)
    assert result.returncode == 2
    assert one_line_error(result).startswith("amgi: error: --binding kafka.key: kafka.key is no")
