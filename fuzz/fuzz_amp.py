"""Fuzz target for the AMP parser and connection state machine.

Run with atheris (``pip install atheris``)::

    python fuzz/fuzz_amp.py -max_total_time=60

or without it, a quick random run: ``python fuzz/fuzz_amp.py --random 100000``.
The same target is exercised by hypothesis in tests/amp/test_amp_fuzz.py.
"""

from __future__ import annotations

import random
import sys
from typing import Any, ClassVar

from amgi import amp


class Echo(amp.Command):
    arguments: ClassVar[Any] = [
        (b"i", amp.Integer()),
        (b"u", amp.Unicode(optional=True)),
        (b"l", amp.ListOf(amp.Float(), optional=True)),
        (b"a", amp.AmpList([(b"x", amp.Boolean())], optional=True)),
        (b"d", amp.DateTime(optional=True)),
        (b"m", amp.Decimal(optional=True)),
        (b"b", amp.BigBytes(optional=True)),
    ]
    response: ClassVar[Any] = [(b"i", amp.Integer())]


def fuzz_one(data: bytes) -> None:
    """Feed ``data`` (split at a data-chosen point) to a fresh connection.

    Never raises: every input yields events, error answers or a protocol violation.
    """
    conn = amp.Connection({b"Echo": Echo, b"StartTLS": amp.StartTLS})
    for _ in range(3):
        conn.send_call(Echo, {"i": 1})
    cut = data[0] % (len(data) + 1) if data else 0
    events = conn.receive_data(data[:cut]) + conn.receive_data(data[cut:])
    violations = [e for e in events if isinstance(e, amp.ProtocolViolation)]
    assert len(violations) <= 1
    if violations:
        assert events[-1] is violations[0]
        assert conn.failed
    out = conn.data_to_send()
    if out:
        for box in amp.parse_boxes(out):
            assert b"_error" in box or b"_command" in box
    conn.connection_lost()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--random":
        rng = random.Random(0)
        seeds = [
            amp.encode_box({b"_command": b"Echo", b"_ask": b"1", b"i": b"5"}),
            amp.encode_box({b"_answer": b"2", b"i": b"7"}),
        ]
        for _ in range(int(sys.argv[2])):
            base = bytearray(rng.choice(seeds) * rng.randint(1, 3))
            for _ in range(rng.randint(0, 4)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            fuzz_one(bytes(base))
        print("ok")
        return
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
