"""Request routing policy: filter → score → pick, driven directly with seeded randomness."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from quorum.errors import ApiError, InvalidRequest, ModelNotFound, Unavailable
from quorum.routing.breaker import BreakerBoard
from quorum.routing.membership import Member
from quorum.routing.select import RoutingPolicy, Selector, prefix_key, rendezvous_order
from quorum.wire import ChatRequest, CompletionRequest
from tests.helpers import member


def names(members: Sequence[Member]) -> list[str]:
    return [m.name for m in members]


def selector(self_name: str = "a", seed: int = 1, *, affinity: bool = True) -> Selector:
    return Selector(self_name, RoutingPolicy(affinity=affinity), rng=random.Random(seed))


def chosen(
    sel: Selector,
    view: Sequence[Member],
    draws: int,
    *,
    key: bytes | None = None,
    own_in_flight: Mapping[str, int] | None = None,
) -> Counter[str]:
    """How often each node comes first over ``draws`` calls of ``sel.order``."""
    own = own_in_flight or {}
    return Counter(sel.order(view, "m", key=key, own_in_flight=own)[0].name for _ in range(draws))


def idle(*nodes: str) -> list[Member]:
    return [member(n) for n in nodes]


def keys(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(count)]


# --- filter --------------------------------------------------------------------------------


def test_dead_suspect_warming_and_draining_nodes_are_left_out() -> None:
    view = [
        member("a", ()),
        member("ok"),
        member("dead", state="dead"),
        member("suspect", state="suspect"),
        member("warming", node_state="warming"),
        member("draining", node_state="draining"),
        member("other", ("x",)),
    ]
    for _ in range(20):
        assert names(selector().order(view, "m")) == ["ok"]


def test_node_with_open_breaker_is_left_out() -> None:
    board = BreakerBoard(failure_threshold=1, cooldown_s=5.0)
    board.get("b").record_failure(0.0)
    sel = selector()
    assert set(names(sel.order(idle("a", "b", "c"), "m", breakers=board, now=1.0))) == {"a", "c"}
    # Half-open with its trial free: a candidate again.
    assert "b" in names(sel.order(idle("a", "b", "c"), "m", breakers=board, now=5.0))


def test_ordering_does_not_claim_a_half_open_trial() -> None:
    board = BreakerBoard(failure_threshold=1, cooldown_s=5.0)
    board.get("b").record_failure(0.0)
    sel = selector()
    for _ in range(5):
        assert names(sel.order(idle("b"), "m", breakers=board, now=6.0)) == ["b"]
    assert board.get("b").allow(6.0)  # the caller claims the trial right before sending
    with pytest.raises(Unavailable, match="b: circuit half_open"):
        sel.order(idle("b"), "m", breakers=board, now=6.0)


def test_nodes_already_tried_are_left_out() -> None:
    sel = selector()
    assert set(names(sel.order(idle("a", "b", "c"), "m", exclude={"a", "c"}))) == {"b"}


def test_every_usable_node_refused_is_unavailable() -> None:
    board = BreakerBoard(failure_threshold=1)
    board.get("b").record_failure(0.0)
    with pytest.raises(Unavailable) as info:
        selector().order(idle("a", "b"), "m", breakers=board, now=1.0, exclude=("a",))
    assert info.value.message == (
        "No node can serve model 'm' now (a: already tried, b: circuit open). Retry shortly."
    )


ROUTER_VIEW = [
    member("a", ("chat",)),
    member("b", ("chat", "code"), queue=2),
    member("c", ("chat", "code"), free=16),
    member("d", ("code",), state="dead"),
    member("e", ("warm",), node_state="warming"),
]


@pytest.mark.parametrize(
    ("model", "self_name", "pin", "forwarded", "error", "says"),
    [
        ("nope", "a", None, False, ModelNotFound, "does not exist on any node"),
        ("code", "a", "zz", False, InvalidRequest, "not a member"),
        ("code", "a", "a", False, InvalidRequest, "does not serve"),  # pinned node lacks it
        ("code", "a", "d", False, Unavailable, "cannot take requests"),  # pinned node is dead
        ("code", "a", "b", True, Unavailable, "does not forward twice"),  # forwarded, pin elsewhere
        ("code", "a", None, True, Unavailable, "No node can serve"),  # forwarded, cannot serve
        ("warm", "a", None, False, Unavailable, "No node can serve"),  # only a warming node
    ],
)
def test_refusals_say_why(
    model: str,
    self_name: str,
    pin: str | None,
    forwarded: bool,
    error: type[ApiError],
    says: str,
) -> None:
    with pytest.raises(error, match=says) as got:
        selector(self_name).order(ROUTER_VIEW, model, pin=pin, forwarded=forwarded)
    if error is ModelNotFound:
        assert (got.value.status, got.value.code, got.value.param) == (
            404,
            "model_not_found",
            "model",
        )


def test_pinned_node_is_the_only_candidate_even_when_its_breaker_is_open() -> None:
    board = BreakerBoard(failure_threshold=1)
    board.get("b").record_failure(0.0)
    sel = selector()
    assert names(sel.order(ROUTER_VIEW, "code", pin="b", breakers=board, now=1.0)) == ["b"]
    with pytest.raises(Unavailable, match="already tried"):
        sel.order(ROUTER_VIEW, "code", pin="b", exclude=("b",))


def test_forwarded_requests_are_only_served_locally() -> None:
    assert names(selector("b").order(ROUTER_VIEW, "code", forwarded=True)) == ["b"]
    assert names(selector("b").order(ROUTER_VIEW, "code", forwarded=True, key=b"k")) == ["b"]


def test_single_candidate_is_returned() -> None:
    assert names(selector().order([member("a", ()), member("b")], "m", key=b"k")) == ["b"]


# --- score and pick ----------------------------------------------------------------------


def test_every_candidate_is_listed_chosen_first_then_best_first() -> None:
    view = [member("a", in_flight=4), member("b", in_flight=2), member("c"), member("d", queue=1)]
    for seed in range(20):
        order = names(selector(seed=seed).order(view, "m"))
        assert sorted(order) == ["a", "b", "c", "d"]
        rest = [n for n in ["c", "b", "a", "d"] if n != order[0]]
        assert order[1:] == rest


def test_two_choices_picks_the_less_loaded_of_two() -> None:
    counts = chosen(selector("x"), [member("a", in_flight=3), member("b", in_flight=1)], 200)
    assert counts == {"b": 200}


def test_two_choices_sends_most_to_the_idle_node_and_least_to_the_busiest() -> None:
    view = [
        member("idle"),
        member("light", in_flight=2, free=6),
        member("busy", in_flight=6, free=2),
        member("queued", in_flight=8, free=0, queue=3),
    ]
    counts = chosen(selector("elsewhere"), view, 3000)
    assert counts["idle"] > counts["light"] > counts["busy"] > counts["queued"]
    # Rank i of n is picked with probability (n - 1 - i) / C(n, 2): 1/2, 1/3, 1/6, 0.
    assert abs(counts["idle"] - 1500) < 150 and abs(counts["light"] - 1000) < 150
    assert counts["queued"] == 0


def test_queued_requests_weigh_more_than_running_ones() -> None:
    view = [member("running", in_flight=4, free=4), member("queued", in_flight=1, free=7, queue=1)]
    assert chosen(selector("x"), view, 50) == {"running": 50}


def test_load_is_relative_to_capacity() -> None:
    view = [member("small", in_flight=2, free=0), member("big", in_flight=4, free=12)]
    assert chosen(selector("x"), view, 50) == {"big": 50}


def test_local_node_wins_a_tie() -> None:
    assert chosen(selector("a"), idle("b", "a"), 100) == {"a": 100}
    # Three equal nodes: the local one wins whenever it is drawn (2 draws in 3).
    counts = chosen(selector("a"), idle("a", "b", "c"), 3000)
    assert abs(counts["a"] - 2000) < 150
    assert abs(counts["b"] - counts["c"]) < 150


def test_local_node_wins_a_near_tie_but_not_a_clear_loss() -> None:
    near = [member("a", in_flight=1, free=15), member("b")]  # 1/16 vs 0
    assert chosen(selector("a"), near, 50) == {"a": 50}
    far = [member("a", in_flight=4, free=4), member("b")]  # 1/2 vs 0
    assert chosen(selector("a"), far, 50) == {"b": 50}


def test_own_in_flight_moves_traffic_away_from_a_node_gossip_reports_idle() -> None:
    view = idle("b", "c")  # gossip has not seen anything we sent yet
    assert chosen(selector("x"), view, 50, own_in_flight={"b": 5}) == {"c": 50}
    # A burst under frozen gossip spreads evenly instead of piling onto one "idle" node.
    sel = selector("x")
    own: Counter[str] = Counter()
    for _ in range(100):
        own[sel.order(view, "m", own_in_flight=own)[0].name] += 1
    assert abs(own["b"] - own["c"]) <= 1


def test_gossip_in_flight_counts_when_above_our_own() -> None:
    view = [member("b", in_flight=6, free=2), member("c", in_flight=1, free=7)]
    assert chosen(selector("x"), view, 50, own_in_flight={"b": 1, "c": 3}) == {"c": 50}


# --- prefix affinity -----------------------------------------------------------------------


def test_same_prefix_goes_to_the_same_node_while_loads_are_equal() -> None:
    view = idle("a", "b", "c", "d")
    for key in keys(20):
        home = rendezvous_order(key, view)[0].name
        assert chosen(selector("a"), view, 30, key=key) == {home: 30}


def test_different_prefixes_spread_evenly_across_nodes() -> None:
    view = idle("a", "b", "c")
    sel = selector("a")
    counts = Counter(sel.order(view, "m", key=k)[0].name for k in keys(3000))
    assert set(counts) == {"a", "b", "c"}
    assert all(850 <= n <= 1150 for n in counts.values()), counts


def test_overloaded_affine_node_spills_to_the_next_rendezvous_node() -> None:
    key = keys(1)[0]
    home, second, third = (m.name for m in rendezvous_order(key, idle("a", "b", "c")))
    # total 5, cap ceil(1.25 * 6 / 3) = 3: home (5 + 1) is over, and its slots are all taken
    view = [member(n, in_flight=5, free=0) if n == home else member(n) for n in ("a", "b", "c")]
    assert chosen(selector("a"), view, 20, key=key) == {second: 20}
    # Within the cap the home node keeps its keys: total 2, cap ceil(1.25 * 3 / 3) = 2, and
    # the home node with this request is at 1 + 1 = 2.
    view = [member(n, in_flight={home: 1, third: 1}.get(n, 0)) for n in ("a", "b", "c")]
    assert chosen(selector("a"), view, 20, key=key) == {home: 20}


def test_own_in_flight_counts_toward_the_affinity_cap() -> None:
    key = keys(1)[0]
    home, second, _ = (m.name for m in rendezvous_order(key, idle("a", "b", "c")))
    view = idle("a", "b", "c")  # 8 slots each, as gossip last said
    # our own 8 outstanding fill the home node's slots: over the cap and no room
    assert chosen(selector("a"), view, 20, key=key, own_in_flight={home: 8}) == {second: 20}
    # 5 leave it room: a node with free slots keeps its keys however small the mean
    assert chosen(selector("a"), view, 20, key=key, own_in_flight={home: 5}) == {home: 20}


def test_affine_node_with_open_breaker_hands_its_keys_to_the_next_rendezvous_node() -> None:
    key = keys(1)[0]
    home, second, _ = (m.name for m in rendezvous_order(key, idle("a", "b", "c")))
    board = BreakerBoard(failure_threshold=1)
    board.get(home).record_failure(0.0)
    order = selector("a").order(idle("a", "b", "c"), "m", key=key, breakers=board, now=1.0)
    assert order[0].name == second and home not in names(order)


def test_removing_a_node_remaps_only_the_keys_that_lived_on_it() -> None:
    sel = selector("a")
    before = {k: sel.order(idle("a", "b", "c", "d"), "m", key=k)[0].name for k in keys(1000)}
    after = {k: sel.order(idle("a", "b", "c"), "m", key=k)[0].name for k in keys(1000)}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k in before if before[k] == "d"}
    assert 150 < len(moved) < 350


def test_affinity_off_uses_two_choices() -> None:
    counts = chosen(selector("x", affinity=False), idle("a", "b", "c"), 300, key=b"k" * 32)
    assert len(counts) == 3


def test_policy_rejects_a_load_factor_below_one() -> None:
    with pytest.raises(ValueError):
        RoutingPolicy(load_factor=0.9)
    with pytest.raises(ValueError):
        RoutingPolicy(affinity_prefix_chars=0)


# --- prefix_key ----------------------------------------------------------------------------


def chat(*messages: tuple[str, str], model: str = "m") -> ChatRequest:
    return ChatRequest(model=model, messages=tuple({"role": r, "content": c} for r, c in messages))


def test_prefix_key_is_shared_by_turns_of_one_conversation() -> None:
    first = chat(("system", "be brief"), ("user", "summarise this document: ..."))
    later = chat(
        ("system", "be brief"),
        ("user", "summarise this document: ..."),
        ("assistant", "It says ..."),
        ("user", "shorter"),
    )
    key = prefix_key(first)
    assert key is not None and len(key) == 32
    assert prefix_key(later) == key


def test_prefix_key_differs_when_the_first_user_message_differs() -> None:
    a = chat(("system", "be brief"), ("user", "document one"))
    b = chat(("system", "be brief"), ("user", "document two"))
    assert prefix_key(a) != prefix_key(b)


def test_prefix_key_covers_the_system_prompt_and_the_model() -> None:
    base = chat(("system", "be brief"), ("user", "hi"))
    assert prefix_key(base) != prefix_key(chat(("developer", "be brief"), ("user", "hi")))
    assert prefix_key(base) != prefix_key(chat(("system", "be long"), ("user", "hi")))
    assert prefix_key(base) != prefix_key(chat(("system", "be brief"), ("user", "hi"), model="n"))


def test_prefix_key_of_a_completion_is_its_leading_characters() -> None:
    doc = "x" * 100
    same = prefix_key(CompletionRequest(model="m", prompt=doc + "A"), prefix_chars=100)
    assert same == prefix_key(CompletionRequest(model="m", prompt=doc + "B"), prefix_chars=100)
    assert same != prefix_key(CompletionRequest(model="m", prompt=doc + "A"), prefix_chars=101)


def test_prefix_key_is_none_with_nothing_to_key_on() -> None:
    assert prefix_key(CompletionRequest(model="m", prompt="")) is None
    assert prefix_key(chat(("assistant", "hello"))) is None


# --- weights -------------------------------------------------------------------------------


def weighted(name: str, weight: float, **load: int) -> Member:
    return dataclasses.replace(member(name, **load), weights=(("m", weight),))


def test_a_heavier_node_is_home_to_proportionally_more_conversations() -> None:
    view = [weighted("a", 2.0), member("b"), member("c")]
    homes = Counter(rendezvous_order(k, view, "m")[0].name for k in keys(4000))
    assert 0.45 < homes["a"] / 4000 < 0.55  # weight 2 of 4
    assert 0.2 < homes["b"] / 4000 < 0.3 and 0.2 < homes["c"] / 4000 < 0.3


def test_equal_weights_keep_the_unweighted_rendezvous_order() -> None:
    view = [weighted("a", 3.0), weighted("b", 3.0), weighted("c", 3.0)]
    for k in keys(200):
        assert names(rendezvous_order(k, view, "m")) == names(
            rendezvous_order(k, idle("a", "b", "c"))
        )


def test_power_of_two_choices_favours_the_heavier_of_equally_loaded_nodes() -> None:
    view = [weighted("b", 4.0, in_flight=2), member("c", in_flight=2)]
    picks = chosen(selector("a", affinity=False), view, 400)
    assert picks["b"] == 400  # same load, but half as loaded per unit of weight
