"""The incarnation cap: forged numbers near the top of the range cannot kill a member or pin
a URL on it, and a node's own numbers never pass the cap."""

from __future__ import annotations

import pytest
from gossip_helpers import META, addr_of, drain, feed, join, make_core, seal, sent, state_of

from quorum.gossip.core import GossipCore
from quorum.gossip.messages import (
    MAX_INCARNATION,
    MAX_LOAD_VERSION,
    Alive,
    Dead,
    Left,
    Load,
    LoadUpdate,
    MemberInfo,
    MemberState,
    Message,
    NodeMeta,
    PushPull,
    Suspect,
)

ALIVE, SUSPECT, DEAD, LEFT = MemberState
HOSTILE = NodeMeta("http://10.6.6.6:32768", ("m1",), "ready")


def pair() -> tuple[GossipCore, GossipCore]:
    """``a`` and ``b``, each knowing the other alive."""
    a, b = make_core("a"), make_core("b", seed=2)
    join(a, "b")
    join(b, "a")
    return a, b


def deliver(src: GossipCore, dst: GossipCore, until: float) -> None:
    """Run ``src``'s timers to ``until`` and hand ``dst`` everything sent to it."""
    for send in sent(drain(src, until)):
        if send.addr == dst.addr:
            dst.receive(until, src.addr, send.data)


@pytest.mark.parametrize("kind", [Suspect, Dead])
def test_accusation_at_the_int64_edge_does_not_kill_the_victim(kind: type) -> None:
    """The reported attack: a suspect or dead at 2**63 - 1 made the victim refute with 2**63,
    which no decoder accepts, so the victim stayed dead until restarted."""
    a, b = pair()
    forged: Message = kind("a", 2**63 - 1, "x")
    feed(a, forged)
    feed(b, forged)
    deliver(a, b, 2.0)
    assert state_of(b, "a") is ALIVE
    assert a.incarnation <= MAX_INCARNATION
    assert b.counters["dropped_decode"] == 0
    assert a.counters["dropped_incarnation"] == b.counters["dropped_incarnation"] == 1


@pytest.mark.parametrize("kind", ["suspect", "dead", "left"])
def test_victim_accused_just_below_the_cap_refutes_at_the_cap(kind: str) -> None:
    a, b = pair()
    forged: Message = (
        Suspect("a", MAX_INCARNATION - 1, "x")
        if kind == "suspect"
        else Dead("a", MAX_INCARNATION - 1, "x")
        if kind == "dead"
        else Left("a", MAX_INCARNATION - 1)
    )
    feed(a, forged)
    feed(b, forged)
    assert state_of(b, "a") is not ALIVE
    assert a.incarnation == MAX_INCARNATION
    deliver(a, b, 2.0)
    info = b.member("a")
    assert info is not None and info.state is ALIVE and info.incarnation == MAX_INCARNATION


@pytest.mark.parametrize(
    "msg",
    [
        Alive("b", MAX_INCARNATION + 1, addr_of("b"), HOSTILE),
        Suspect("b", MAX_INCARNATION, "x"),
        Dead("b", MAX_INCARNATION, "x"),
        Left("b", MAX_INCARNATION),
        Dead("b", 2**64 - 1, "x"),
        LoadUpdate("b", MAX_LOAD_VERSION + 1, Load(9, 9, 9)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_numbers_over_the_cap_are_dropped_and_counted(msg: Message) -> None:
    core = make_core()
    join(core, "b")
    before = core.members()
    assert feed(core, msg) == []
    assert core.members() == before
    assert core.counters["dropped_incarnation"] == 1


def test_push_pull_entries_over_the_cap_are_dropped_and_counted() -> None:
    core = make_core()
    for state, incarnation in ((ALIVE, MAX_INCARNATION + 1), (DEAD, MAX_INCARNATION)):
        entry = MemberInfo("b", addr_of("b"), state, incarnation, HOSTILE)
        data = seal(PushPull("c", False, (entry,)))
        answer, _ = core.answer_push_pull(0.0, addr_of("c"), data)
        assert answer is None
    assert core.counters["dropped_incarnation"] == 2
    assert core.counters["dropped_push_pull"] == 2
    assert [m.name for m in core.members()] == ["a"]


def test_forged_alive_just_below_the_cap_is_refuted_at_the_cap() -> None:
    a, b = pair()
    forged = Alive("a", MAX_INCARNATION - 1, addr_of("a"), HOSTILE)
    feed(a, forged)
    feed(b, forged)
    assert a.incarnation == MAX_INCARNATION
    deliver(a, b, 2.0)
    info = b.member("a")
    assert info is not None and info.meta == META and info.incarnation == MAX_INCARNATION


def test_forged_alive_at_the_cap_cannot_be_outbid_but_kills_nobody() -> None:
    """The documented limit (state.py): an alive at the cap itself is the last word."""
    a, b = pair()
    forged = Alive("a", MAX_INCARNATION, addr_of("a"), HOSTILE)
    feed(a, forged)
    feed(b, forged)
    deliver(a, b, 2.0)
    assert a.incarnation == MAX_INCARNATION and a.counters["incarnation_capped"] == 1
    info = b.member("a")
    assert info is not None and info.state is ALIVE and info.meta == HOSTILE


def test_own_numbers_never_pass_the_cap() -> None:
    core = make_core()
    join(core, "b")
    feed(core, Dead("a", MAX_INCARNATION - 1, "b"))
    assert core.incarnation == MAX_INCARNATION
    feed(core, Alive("a", MAX_INCARNATION, addr_of("a"), HOSTILE))  # cannot be outbid
    assert core.incarnation == MAX_INCARNATION
    core.set_meta(NodeMeta("http://127.0.0.1:1", ("m2",), "draining"))
    info = core.member("a")
    assert info is not None and info.incarnation == MAX_INCARNATION and info.meta == META
    assert core.counters["incarnation_capped"] == 2
    core.set_load(Load(1, 1, 1))
    feed(core, LoadUpdate("a", MAX_LOAD_VERSION, Load(7, 7, 7)))
    core.set_load(Load(2, 2, 2))
    info = core.member("a")
    assert info is not None and info.load_version == MAX_LOAD_VERSION
    assert info.load == Load(2, 2, 2)
    assert core.counters["load_version_capped"] == 2
