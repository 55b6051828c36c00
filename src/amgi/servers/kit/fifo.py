"""FIFO groups: once a message of a group fails, the ones after it in that group wait too.

Keeping a group's order through a retry means nothing later in the group may be
acknowledged before the failed message is; SQS FIFO queues (server and Lambda adapter)
hold the rest of the group back with it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

__all__ = ["held_behind"]

T = TypeVar("T")


def held_behind(
    messages: Sequence[T], failed: Callable[[T], bool], group: Callable[[T], Hashable]
) -> dict[int, T]:
    """Messages (in delivery order) that follow the first failed one of their group.

    Returns ``{id(message): first_failed_of_its_group}`` for each such message; the
    failed ones themselves are not in it.
    """
    first: dict[Hashable, T] = {}
    held: dict[int, T] = {}
    for m in messages:
        g = group(m)
        blocker = first.get(g)
        if blocker is not None:
            held[id(m)] = blocker
        elif failed(m):
            first[g] = m
    return held
