"""Passive health: a circuit breaker per node, driven by the outcomes of real requests.

Pure: no clock reads and no I/O; every method takes ``now`` (seconds, any monotonic origin,
e.g. ``trio.current_time()``). The model is the classic breaker (Michael Nygard, *Release
It!*, 2007, "Circuit Breaker") with the ejection backoff of Envoy's outlier detection
(``consecutive_5xx``; the ejection time grows with each ejection, up to ``max_ejection_time``)::

    closed ──failure_threshold consecutive failures──▶ open
      ▲                                                  │ cooldown elapsed
      │ trial succeeds                                   ▼
      └──────────────────────────────────────────── half_open ──trial fails──▶ open
                                                         (cooldown doubled, up to max)

In ``half_open`` exactly one request at a time is let through as the trial: ``allow`` claims
the trial slot, ``record_success`` / ``record_failure`` give its verdict, and ``release``
hands the slot back when the trial ended without one (the client went away). ``would_allow``
answers the same question as ``allow`` without claiming anything, for filtering candidates.

Outcomes are not tied to a particular ``allow`` call: a verdict that arrives while the
breaker is open, or half-open with no trial claimed, comes from a request sent before the
breaker opened and is ignored; one that arrives while a trial is claimed is taken as the
trial's verdict.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["BreakerBoard", "BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """One node's breaker.

    ``failure_threshold``: consecutive failures (int, ≥ 1) that open a closed breaker.
    ``cooldown_s``: seconds an opened breaker refuses requests before it lets a trial through.
    ``max_cooldown_s``: the cap, in seconds, for the cooldown, which doubles each time a trial
    fails and returns to ``cooldown_s`` when a trial succeeds. Raises ``ValueError`` for a
    threshold below 1, a cooldown that is not positive, or a cap below the cooldown.
    """

    __slots__ = (
        "_cooldown",
        "_failures",
        "_opened_at",
        "_trial",
        "base_cooldown_s",
        "failure_threshold",
        "max_cooldown_s",
    )

    def __init__(
        self, failure_threshold: int = 3, cooldown_s: float = 5.0, max_cooldown_s: float = 60.0
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
        if not cooldown_s > 0:
            raise ValueError(f"cooldown_s must be positive, not {cooldown_s}")
        if not max_cooldown_s >= cooldown_s:
            raise ValueError(
                f"max_cooldown_s ({max_cooldown_s}) must be at least cooldown_s ({cooldown_s})"
            )
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._cooldown = cooldown_s
        self._trial = False  # the half-open trial slot is claimed

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row while closed (reset by a success and when the breaker closes)."""
        return self._failures

    @property
    def cooldown_s(self) -> float:
        """The current cooldown, seconds: ``cooldown_s`` doubled once per failed trial, capped."""
        return self._cooldown

    def state(self, now: float) -> BreakerState:
        """The state at ``now``: "closed", "open" (refusing until the cooldown ends) or
        "half_open" (a trial may go, or is under way)."""
        if self._opened_at is None:
            return "closed"
        if now - self._opened_at < self._cooldown:
            return "open"
        return "half_open"

    def would_allow(self, now: float) -> bool:
        """Whether ``allow(now)`` would return True, without claiming the trial slot."""
        state = self.state(now)
        return state == "closed" or (state == "half_open" and not self._trial)

    def allow(self, now: float) -> bool:
        """True when the caller may send a request now. In ``half_open`` this claims the one
        trial slot: further calls return False until ``record_success``, ``record_failure``
        or ``release``."""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def record_success(self, now: float) -> None:
        """A request succeeded: resets the failure count; a trial's success closes the
        breaker and resets the cooldown to ``cooldown_s``."""
        if self._opened_at is None:
            self._failures = 0
        elif self._trial:
            self._close()

    def record_failure(self, now: float) -> None:
        """A request failed: counts toward ``failure_threshold`` while closed; a trial's
        failure opens the breaker again from ``now`` with the cooldown doubled (capped)."""
        if self._opened_at is None:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._opened_at = now
        elif self._trial:
            self._trial = False
            self._opened_at = now
            self._cooldown = min(self._cooldown * 2, self.max_cooldown_s)

    def release(self, now: float) -> None:
        """Hand back a claimed trial slot whose request ended without a verdict (cancelled,
        client gone). No effect when no trial is claimed."""
        self._trial = False

    def _close(self) -> None:
        self._opened_at = None
        self._trial = False
        self._failures = 0
        self._cooldown = self.base_cooldown_s

    def __repr__(self) -> str:
        opened = "closed" if self._opened_at is None else f"opened_at={self._opened_at}"
        return (
            f"CircuitBreaker({opened}, failures={self._failures}, cooldown_s={self._cooldown}, "
            f"trial={self._trial})"
        )


class BreakerBoard:
    """The breakers of every node, by node name, created on demand (closed) by ``get``.

    Keyword arguments are those of ``CircuitBreaker`` and apply to every breaker (they are
    checked here, so a bad value fails at construction rather than on first use).
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 60.0,
    ) -> None:
        CircuitBreaker(failure_threshold, cooldown_s, max_cooldown_s)  # validate
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._max_cooldown_s = max_cooldown_s
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        """The breaker of node ``name``, created closed on first use."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(self._threshold, self._cooldown_s, self._max_cooldown_s)
            self._breakers[name] = breaker
        return breaker

    def would_allow(self, name: str, now: float) -> bool:
        """``get(name).would_allow(now)`` without creating a breaker for an unknown node
        (an unknown node's breaker is closed)."""
        breaker = self._breakers.get(name)
        return breaker is None or breaker.would_allow(now)

    def states(self, now: float) -> dict[str, str]:
        """Node name → "closed" | "open" | "half_open", for every breaker created so far."""
        return {name: b.state(now) for name, b in sorted(self._breakers.items())}
