"""The quota board: per-key windows, the cluster's sum from gossiped figures (merged by max),
and the headers. A fake unix clock; no sleeping."""

from __future__ import annotations

import pytest

from quorum.errors import Saturated
from quorum.gateway.quota import Figures, Limits, QuotaBoard, duration, quota_headers


class Clock:
    def __init__(self, now: float = 6_000_000.0) -> None:  # a window start (100000 * 60)
        self.now = now

    def __call__(self) -> float:
        return self.now


def board(node: str = "a", clock: Clock | None = None) -> QuotaBoard:
    return QuotaBoard(node, ["team-a", "team-b"], clock=clock or Clock())


def test_requests_per_minute_refuses_the_next_request_until_the_window_ends() -> None:
    clock = Clock(6_000_000.0 + 20)
    b = board(clock=clock)
    limits = Limits(requests_per_minute=3)
    grants = [b.admit("team-a", limits) for _ in range(3)]
    assert [g.headers["x-ratelimit-remaining-requests"] for g in grants] == ["2", "1", "0"]
    with pytest.raises(Saturated) as refused:
        b.admit("team-a", limits)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.retry_after == pytest.approx(40)
    assert "3 requests this minute" in refused.value.message
    b.admit("team-b", limits)  # another key has its own count
    clock.now += 40  # the next window
    assert b.admit("team-a", limits).headers["x-quota-available"] == "2"


def test_tokens_are_counted_when_requests_end_and_refuse_once_spent() -> None:
    clock = Clock()
    b = board(clock=clock)
    limits = Limits(tokens_per_minute=100)
    b.admit("team-a", limits).release()
    b.add_tokens("team-a", 60)
    assert b.admit("team-a", limits).headers["x-ratelimit-remaining-tokens"] == "40"
    b.add_tokens("team-a", 45)  # over by what the open request produced
    with pytest.raises(Saturated, match="105 tokens this minute"):
        b.admit("team-a", limits)
    b.add_tokens("team-a", -5)
    assert b.cluster("team-a")[1] == 105


def test_max_concurrent_counts_open_requests_and_release_is_idempotent() -> None:
    b = board()
    limits = Limits(max_concurrent=2)
    first, second = b.admit("team-a", limits), b.admit("team-a", limits)
    with pytest.raises(Saturated) as refused:
        b.admit("team-a", limits)
    assert refused.value.retry_after == 1.0
    first.release()
    first.release()
    third = b.admit("team-a", limits)
    assert b.cluster("team-a")[2] == 2
    second.release(), third.release()
    assert b.cluster("team-a")[2] == 0


def test_the_cluster_sum_includes_what_peers_gossip() -> None:
    clock = Clock(6_000_000.0 + 5)
    a = board("a", clock)
    w = a.window(clock.now)
    a.hear("b", [Figures("team-a", w, 2, 10, 1)])
    a.hear("c", [Figures("team-a", w, 3, 0, 0)])
    limits = Limits(requests_per_minute=6)
    assert a.admit("team-a", limits).headers["x-quota-available"] == "0"  # 2 + 3 + 1
    with pytest.raises(Saturated, match="6 requests this minute"):
        a.admit("team-a", limits)
    assert a.cluster("team-a") == (6, 10, 2)


def test_figures_merge_by_max_and_a_late_old_message_never_lowers_them() -> None:
    clock = Clock()
    a = board("a", clock)
    w = a.window(clock.now)
    a.hear("b", [Figures("team-a", w, 5, 50, 2)])
    a.hear("b", [Figures("team-a", w, 3, 20, 1)])  # an older message, arriving late
    assert a.cluster("team-a") == (5, 50, 1)  # counts by max; concurrency is the newest
    a.hear("b", [Figures("team-a", w - 1, 99, 99, 9)])  # an older window: ignored
    assert a.cluster("team-a") == (5, 50, 1)
    clock.now += 60
    assert a.cluster("team-a") == (0, 0, 1)  # last window's counts are gone, open ones not
    a.hear("b", [Figures("team-a", w + 1, 1, 0, 0)])
    assert a.cluster("team-a") == (1, 0, 0)


def test_a_dead_node_keeps_its_counts_but_not_its_open_requests() -> None:
    a = board("a")
    w = a.window(a._clock())
    a.hear("b", [Figures("team-a", w, 4, 0, 3)])
    a.gone("b")
    assert a.cluster("team-a") == (4, 0, 0)


def test_gossip_cannot_grow_the_table_or_speak_for_this_node() -> None:
    a = board("a")
    w = a.window(a._clock())
    a.hear("b", [Figures("stranger", w, 100, 0, 0)])
    a.hear("a", [Figures("team-a", w, 100, 0, 0)])
    assert a.cluster("stranger") == (0, 0, 0) and a.cluster("team-a") == (0, 0, 0)
    for i in range(2000):
        a.hear(f"n{i}", [Figures("team-a", w, 1, 0, 0)])
    assert len(a._peers) == 1024


def test_own_figures_are_what_a_node_gossips() -> None:
    clock = Clock()
    a = board("a", clock)
    grant = a.admit("team-a", Limits(requests_per_minute=10))
    a.add_tokens("team-a", 7)
    w = a.window(clock.now)
    assert a.figures() == (Figures("team-a", w, 1, 7, 1),)
    clock.now += 60
    assert a.figures() == (Figures("team-a", w + 1, 0, 0, 1),)  # still open
    grant.release()
    assert a.figures() == ()
    b = board("b", clock)
    b.hear("a", (Figures("team-a", w + 1, 0, 0, 1),))
    assert b.cluster("team-a") == (0, 0, 1)


def test_headers_name_the_tightest_quota() -> None:
    limits = Limits(requests_per_minute=10, tokens_per_minute=1000, max_concurrent=4)
    h = quota_headers(limits, requests=2, tokens=900, concurrent=1, reset=12.2)
    assert h["x-quota-allowed"] == "1000" and h["x-quota-available"] == "100"
    assert h["x-quota-reset"] == "13"
    assert h["x-ratelimit-limit-requests"] == "10"
    assert h["x-ratelimit-remaining-requests"] == "8"
    assert h["x-ratelimit-reset-requests"] == "13s"
    assert h["x-ratelimit-remaining-tokens"] == "100"
    h = quota_headers(limits, requests=2, tokens=0, concurrent=4, reset=12.2)
    assert (h["x-quota-allowed"], h["x-quota-available"], h["x-quota-reset"]) == ("4", "0", "1")
    assert quota_headers(Limits(), 5, 5, 5, 1.0) == {}


def test_duration_is_openai_form() -> None:
    assert [duration(s) for s in (0, 0.2, 1, 59.5, 60, 360)] == [
        "0s",
        "1s",
        "1s",
        "1m0s",
        "1m0s",
        "6m0s",
    ]


def test_more_active_keys_than_a_packet_holds_take_turns() -> None:
    clock = Clock()
    keys = [f"k{i:02}" for i in range(25)]
    a = QuotaBoard("a", keys, clock=clock)
    for key in keys:
        a.admit(key, Limits()).release()
    seen: set[str] = set()
    for second in range(3):  # ceil(25 / 10) seconds send every key
        clock.now = 6_000_000.0 + second
        sent = a.figures(10)
        assert len(sent) == 10 and len({f.key for f in sent}) == 10
        seen |= {f.key for f in sent}
    assert seen == set(keys)
    assert len(a.figures()) == 25


def test_the_membership_view_is_read_when_the_cluster_figures_are_asked_for() -> None:
    clock = Clock()
    w = QuotaBoard.window(clock.now)
    view = [
        ("b", True, [Figures("team-a", w, 2, 0, 1)]),
        ("c", False, [Figures("team-a", w, 1, 0, 4)]),
    ]
    a = QuotaBoard("a", ["team-a"], clock=clock, peers=lambda: view)
    assert a.cluster("team-a") == (3, 0, 1)  # c is dead: its count stays, its open requests not
    with pytest.raises(Saturated):
        a.admit("team-a", Limits(requests_per_minute=3))


def test_quorums_own_clients_send_the_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from quorum.gateway.keys import auth_headers

    monkeypatch.delenv("QUORUM_API_KEY", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("QUORUM_API_KEY", " sk-quorum-abc \n")
    assert auth_headers() == {"authorization": "Bearer sk-quorum-abc"}
