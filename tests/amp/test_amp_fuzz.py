"""Property tests: the parser and state machine on arbitrary input."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from amgi import amp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
from fuzz_amp import fuzz_one

keys = st.binary(min_size=1, max_size=255)
values = st.binary(max_size=300)
boxes = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    fuzz_one(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(boxes, max_size=5), st.data())
def test_encode_parse_round_trip_in_any_chunks(items: list[amp.Box], data: st.DataObject) -> None:
    wire = b"".join(amp.encode_box(box) for box in items)
    parser = amp.BoxParser()
    out: list[amp.Box] = []
    pos = 0
    while pos < len(wire):
        step = data.draw(st.integers(1, max(1, len(wire) - pos)))
        out.extend(parser.feed(wire[pos : pos + step]))
        pos += step
    assert out == items
    assert parser.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(boxes, min_size=1, max_size=3), st.binary(max_size=40))
def test_mutated_valid_stream_never_raises(items: list[amp.Box], noise: bytes) -> None:
    wire = b"".join(amp.encode_box({b"_command": b"Echo", b"_ask": b"1", **b}) for b in items)
    fuzz_one(wire + noise)
    fuzz_one(noise + wire)
