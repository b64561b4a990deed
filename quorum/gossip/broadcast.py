"""The piggyback queue: which updates ride on the next datagrams (memberlist ``queue.go``,
``TransmitLimitedQueue``; SWIM section 4.1, infection-style dissemination)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["BroadcastQueue"]


@dataclass(slots=True)
class _Item:
    order: int
    payload: bytes
    transmits: int = 0
    useless_to: str | None = None  # the one member this update tells nothing new


class BroadcastQueue:
    """Encoded updates waiting to be piggybacked, each sent a bounded number of times.

    Updates are keyed: queueing an update under a key that is already queued replaces the old
    one (a newer statement about the same member makes the older one pointless; load figures
    coalesce the same way). :meth:`take` hands out the least-sent updates first, newest first
    among equals, as many as fit in a byte budget, and forgets an update once it has been sent
    ``limit`` times.
    """

    __slots__ = ("_counter", "_items")

    def __init__(self) -> None:
        self._items: dict[Hashable, _Item] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def queue(self, key: Hashable, payload: bytes, *, useless_to: str | None = None) -> None:
        """Queue ``payload`` (an encoded message) under ``key``, replacing any older one.
        ``useless_to``: a member that gains nothing from it (the subject of an ``alive``);
        ``take`` for that member skips it, so its few transmits reach members who need it."""
        self._counter += 1
        self._items[key] = _Item(order=self._counter, payload=payload, useless_to=useless_to)

    def transmits(self, key: Hashable) -> int | None:
        """How often the update under ``key`` has been sent, or None when not queued."""
        item = self._items.get(key)
        return None if item is None else item.transmits

    def take(self, budget: int, limit: int, *, target: str | None = None) -> list[bytes]:
        """Updates to piggyback to member ``target``, least-sent first, whose sizes sum to at
        most ``budget`` bytes. Each one handed out counts as one transmit; after ``limit`` it is
        dropped. Updates useless to ``target`` are left for others."""
        if not self._items or budget <= 0:
            return []
        chosen: list[bytes] = []
        spent = 0
        finished: list[Hashable] = []
        ranked = sorted(self._items.items(), key=lambda kv: (kv[1].transmits, -kv[1].order))
        for key, item in ranked:
            if target is not None and item.useless_to == target:
                continue
            size = len(item.payload)
            if spent + size > budget:
                continue
            chosen.append(item.payload)
            spent += size
            item.transmits += 1
            if item.transmits >= limit:
                finished.append(key)
            if budget - spent < 4:  # no message is that small
                break
        for key in finished:
            del self._items[key]
        return chosen
