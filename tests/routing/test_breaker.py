"""The per-node circuit breaker, driven directly with explicit times (no clock)."""

from __future__ import annotations

import pytest

from quorum.routing.breaker import BreakerBoard, CircuitBreaker


def opened(now: float, *, cooldown_s: float = 5.0, max_cooldown_s: float = 60.0) -> CircuitBreaker:
    """A breaker (threshold 3) that has just opened at ``now``."""
    breaker = CircuitBreaker(3, cooldown_s, max_cooldown_s)
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(now)
    assert breaker.state(now) == "open"
    return breaker


def test_closed_breaker_allows_every_request() -> None:
    breaker = CircuitBreaker()
    assert breaker.state(0.0) == "closed"
    assert all(breaker.allow(0.0) for _ in range(10))


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    breaker.record_failure(1.0)
    breaker.record_failure(1.1)
    assert breaker.state(1.1) == "closed" and breaker.allow(1.1)
    breaker.record_failure(1.2)
    assert breaker.state(1.2) == "open"
    assert not breaker.allow(1.2)
    assert not breaker.would_allow(1.2)


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    breaker.record_success(0.0)
    assert breaker.consecutive_failures == 0
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    assert breaker.state(0.0) == "closed"


def test_open_breaker_refuses_until_the_cooldown_ends() -> None:
    breaker = opened(10.0, cooldown_s=5.0)
    assert breaker.state(14.99) == "open" and not breaker.allow(14.99)
    assert breaker.state(15.0) == "half_open"


def test_half_open_admits_exactly_one_trial() -> None:
    breaker = opened(0.0, cooldown_s=5.0)
    assert breaker.allow(5.0)
    assert not breaker.allow(5.0)
    assert not breaker.allow(30.0)  # still one trial under way, however long it takes
    assert breaker.state(30.0) == "half_open"


def test_would_allow_does_not_claim_the_trial() -> None:
    breaker = opened(0.0, cooldown_s=5.0)
    assert breaker.would_allow(5.0) and breaker.would_allow(5.0)
    assert breaker.allow(5.0)
    assert not breaker.would_allow(5.0)


def test_trial_success_closes_and_resets_the_cooldown() -> None:
    breaker = opened(0.0, cooldown_s=5.0)
    assert breaker.allow(5.0)
    breaker.record_failure(5.0)  # reopen with 10 s
    assert breaker.allow(15.0)
    breaker.record_success(15.5)
    assert breaker.state(15.5) == "closed"
    assert breaker.cooldown_s == 5.0 and breaker.consecutive_failures == 0
    assert breaker.allow(15.5) and breaker.allow(15.5)


def test_trial_failure_reopens_with_doubled_cooldown() -> None:
    breaker = opened(0.0, cooldown_s=5.0, max_cooldown_s=60.0)
    assert breaker.allow(5.0)
    breaker.record_failure(6.0)
    assert breaker.state(6.0) == "open" and breaker.cooldown_s == 10.0
    assert breaker.state(15.99) == "open"
    assert breaker.state(16.0) == "half_open"


def test_cooldown_doubles_up_to_the_maximum() -> None:
    breaker = opened(0.0, cooldown_s=5.0, max_cooldown_s=30.0)
    now = 0.0
    seen = []
    for _ in range(5):
        now += breaker.cooldown_s
        assert breaker.allow(now)
        breaker.record_failure(now)
        seen.append(breaker.cooldown_s)
    assert seen == [10.0, 20.0, 30.0, 30.0, 30.0]


def test_release_frees_the_trial_without_a_verdict() -> None:
    breaker = opened(0.0, cooldown_s=5.0)
    assert breaker.allow(5.0)
    breaker.release(6.0)
    assert breaker.state(6.0) == "half_open" and breaker.cooldown_s == 5.0
    assert breaker.allow(6.0)
    assert not breaker.allow(6.0)


def test_verdicts_of_requests_sent_before_opening_are_ignored() -> None:
    breaker = opened(0.0, cooldown_s=5.0)
    breaker.record_success(1.0)  # late answer of a request sent while closed
    breaker.record_failure(2.0)
    assert breaker.state(2.0) == "open" and breaker.cooldown_s == 5.0
    breaker.record_success(6.0)  # half-open, but no trial claimed
    assert breaker.state(6.0) == "half_open"


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=0.0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=10.0, max_cooldown_s=5.0)
    with pytest.raises(ValueError):
        BreakerBoard(failure_threshold=0)


def test_board_creates_breakers_on_demand_and_reports_states() -> None:
    board = BreakerBoard(failure_threshold=1, cooldown_s=2.0)
    assert board.states(0.0) == {}
    assert board.would_allow("a", 0.0)
    assert board.states(0.0) == {}  # would_allow creates nothing
    board.get("b").record_failure(0.0)
    assert board.get("a").allow(0.0)
    assert board.get("b") is board.get("b")
    assert board.states(1.0) == {"a": "closed", "b": "open"}
    assert board.states(2.0) == {"a": "closed", "b": "half_open"}
    assert not board.would_allow("b", 1.0)
    assert board.get("b").failure_threshold == 1
