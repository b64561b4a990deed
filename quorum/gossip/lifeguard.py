"""The Lifeguard refinements of SWIM (Dadgar, Phillips, Currey, "Lifeguard: Local Health
Awareness for More Accurate Failure Detection", 2018): local health awareness and the
dynamic suspicion timeout. Pure arithmetic on virtual time; no I/O.
"""

from __future__ import annotations

import math

__all__ = ["Awareness", "Suspicion", "suspicion_timeout"]


class Awareness:
    """Local health score (Lifeguard section 4.1, memberlist ``awareness.go``).

    ``score`` runs from 0 (healthy) to ``max_multiplier - 1``. Timeouts and the probe interval
    are multiplied by ``score + 1``, so a node that is itself slow (overloaded, starved of CPU)
    waits longer before it accuses others. Raised by: a probe round that failed without helpers
    to vouch for us, each nack we expected but did not get, and each refutation of a suspicion
    about ourselves. Lowered by every successful probe.
    """

    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        """Move the score by ``delta``, clamped to ``[0, max_multiplier - 1]``."""
        self.score = min(self._max - 1, max(0, self.score + delta))

    def scale(self, seconds: float) -> float:
        """``seconds x (score + 1)``."""
        return seconds * (self.score + 1)


def suspicion_timeout(confirmations: int, k: int, min_timeout: float, max_timeout: float) -> float:
    """Seconds from the start of a suspicion until its member is declared dead
    (Lifeguard section 4.3, memberlist ``suspicion.go`` ``remainingSuspicionTime``)::

        timeout = max - (max - min) x log(c + 1) / log(k + 1), never below min

    ``confirmations`` (c): independent suspicions heard after the first. ``k``: how many we
    expect. With ``k < 1`` the minimum applies at once.
    """
    if k < 1:
        return min_timeout
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    return max(min_timeout, max_timeout - (max_timeout - min_timeout) * frac)


class Suspicion:
    """A running suspicion of one member.

    ``start``: virtual time in seconds when we began to suspect. ``source``: who raised it
    (not counted as a confirmation). ``k``: confirmations expected. Each new, distinct
    confirming source moves :attr:`deadline` earlier, down to ``start + min_timeout``.
    """

    __slots__ = ("_seen", "confirmations", "deadline", "k", "max_timeout", "min_timeout", "start")

    def __init__(
        self, start: float, source: str, k: int, min_timeout: float, max_timeout: float
    ) -> None:
        self.start = start
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self._seen = {source}
        self.confirmations = 0
        self.deadline = start + suspicion_timeout(0, k, min_timeout, max_timeout)

    def confirm(self, source: str) -> bool:
        """Count ``source`` as an independent confirmation. Returns whether it was new
        (and so worth re-gossiping); a source counts once, and only ``k`` are counted."""
        if self.confirmations >= self.k or source in self._seen:
            return False
        self._seen.add(source)
        self.confirmations += 1
        self.deadline = self.start + suspicion_timeout(
            self.confirmations, self.k, self.min_timeout, self.max_timeout
        )
        return True
