"""Replay protection: every packet's sealed header says who sent it, in which life, and when;
a receiver drops what is too old or from a life that has ended.

Every packet carries, inside the AES-GCM payload (so nobody without the key can forge or
alter it; see :mod:`quorum.gossip.codec` for the envelope), a :class:`~.messages.Header`:

* ``source``: the sender's node name;
* ``epoch``: the sender's life, a number fixed when its gossip starts (the runner uses the wall
  clock in nanoseconds, so a restarted node's new life has a higher epoch than its last);
* ``sent_ms``: milliseconds from the start of that life to the sealing of the packet, on the
  sender's monotonic clock.

No two nodes' clocks need to agree. For each sender the receiver keeps the newest epoch it has
heard and an estimate of the offset between the sender's clock and its own: the smallest
``now - sent`` seen so far (the fastest trip), allowed to creep up by :data:`MAX_DRIFT` per
second so that clocks ticking at slightly different rates never drift out of the window.
A packet is then judged (:meth:`Freshness.check`):

* from a sender we do not know (or no longer remember): FRESH, and its offset is learned;
* from an *older* epoch than the one we hold for its sender (a packet from its previous life,
  replayed): REPLAY;
* from a *newer* epoch: FRESH; the sender restarted, and its old life is closed for good;
* from the current epoch: STALE when it is older than ``window`` seconds by the offset
  estimate (a capture replayed later), else FRESH;
* claiming to come from ourselves (our own packet sent back to us): REPLAY.

Limits, stated plainly. A replay within ``window`` of its capture passes (the member-state
rules already ignore a statement at an incarnation we have seen). A packet from a sender we
hold no record of cannot be aged, so the first one is taken as fresh; records last
``retention`` seconds after the sender's last fresh packet and there are at most
``max_senders`` of them (the least recently heard is forgotten first). A node whose wall clock
stepped back across its restart starts a life with a lower epoch: its packets count as replays
until its old record expires, ``retention`` seconds after its last packet. Anyone holding the
cluster key can claim any ``source``: keys are shared by the whole cluster.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .messages import Header

__all__ = ["MAX_DRIFT", "Freshness", "FreshnessVerdict"]

MAX_DRIFT = 1e-3
"""How fast, in seconds per second, a sender's clock may run slower than ours (1000 ppm, ten
times what NTP lets a clock be off) before its packets start to look stale."""


class FreshnessVerdict(enum.Enum):
    """What to do with a packet, by its header."""

    FRESH = "fresh"
    """Take it."""
    STALE = "stale"
    """Older than the window: drop, count as ``dropped_stale``."""
    REPLAY = "replay"
    """From a previous life of its sender, or from ourselves: drop, count as
    ``dropped_replay``."""


@dataclass(slots=True)
class _Sender:
    epoch: int
    offset: float  # our clock minus the sender's, by the fastest packet so far (seconds)
    seen: float  # our time of the last fresh packet


class Freshness:
    """Per-sender replay window (sans-IO: every call takes ``now``, seconds on the core's
    clock).

    ``own_name``: packets claiming this source are replays of our own. ``window``: seconds a
    packet may age between sealing and arrival. ``retention``: seconds a sender's record
    outlives its last fresh packet. ``max_senders``: most senders remembered. Raises
    ``ValueError`` on a window or retention that is not positive, or a retention shorter than
    the window.
    """

    __slots__ = ("_max", "_name", "_retention", "_senders", "_window")

    def __init__(self, own_name: str, *, window: float, retention: float, max_senders: int) -> None:
        if not 0 < window <= retention or max_senders < 1:
            raise ValueError("Freshness needs 0 < window <= retention and max_senders >= 1")
        self._name = own_name
        self._window = window
        self._retention = retention
        self._max = max_senders
        self._senders: dict[str, _Sender] = {}

    def __len__(self) -> int:
        return len(self._senders)

    def check(self, now: float, header: Header) -> FreshnessVerdict:
        """Judge a packet with ``header`` that arrived at ``now``, and learn from it when it
        is fresh. Never raises."""
        if header.source == self._name:
            return FreshnessVerdict.REPLAY
        delay = now - header.sent_ms / 1000.0
        sender = self._senders.get(header.source)
        if sender is not None and now - sender.seen > self._retention:
            del self._senders[header.source]
            sender = None
        if sender is None or header.epoch > sender.epoch:
            self._remember(header.source, _Sender(header.epoch, delay, now))
            return FreshnessVerdict.FRESH
        if header.epoch < sender.epoch:
            return FreshnessVerdict.REPLAY
        offset = sender.offset + max(0.0, now - sender.seen) * MAX_DRIFT
        if delay - offset > self._window:
            return FreshnessVerdict.STALE
        sender.offset = min(offset, delay)
        sender.seen = max(sender.seen, now)
        self._remember(header.source, sender)
        return FreshnessVerdict.FRESH

    def _remember(self, source: str, sender: _Sender) -> None:
        self._senders.pop(source, None)  # re-insert: the dict's order is least recent first
        if len(self._senders) >= self._max:
            del self._senders[next(iter(self._senders))]
        self._senders[source] = sender
