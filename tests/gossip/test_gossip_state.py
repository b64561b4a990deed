"""Member-state rules and Lifeguard behaviour, driving one core by hand (no I/O, no time)."""

from __future__ import annotations

import math

import pytest
from gossip_helpers import (
    CONFIG,
    META,
    addr_of,
    drain,
    feed,
    join,
    make_core,
    opened,
    seal,
    sent,
    state_of,
)

from quorum.gossip.broadcast import BroadcastQueue
from quorum.gossip.core import GossipCore
from quorum.gossip.events import MemberDied, MemberJoined, MemberSuspected, MemberUpdated
from quorum.gossip.lifeguard import suspicion_timeout
from quorum.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Left,
    Load,
    LoadUpdate,
    MemberInfo,
    MemberState,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)

ALIVE, SUSPECT, DEAD, LEFT = MemberState


def test_new_member_joins_on_alive() -> None:
    core = make_core()
    out = feed(core, Alive("b", 1, addr_of("b"), META))
    assert [type(o) for o in out] == [MemberJoined]
    assert state_of(core, "b") is ALIVE


def test_suspect_refuted_by_higher_incarnation() -> None:
    core = make_core()
    join(core, "b")
    assert isinstance(feed(core, Suspect("b", 1, "c"))[0], MemberSuspected)
    assert state_of(core, "b") is SUSPECT
    out = feed(core, Alive("b", 2, addr_of("b"), META))
    assert [type(o) for o in out] == [MemberUpdated]
    assert state_of(core, "b") is ALIVE
    assert core.suspicion("b") is None


def test_alive_at_same_incarnation_does_not_clear_suspicion() -> None:
    core = make_core()
    join(core, "b")
    feed(core, Suspect("b", 1, "c"))
    feed(core, Alive("b", 1, addr_of("b"), META))
    assert state_of(core, "b") is SUSPECT


def test_old_suspicion_ignored() -> None:
    core = make_core()
    join(core, "b", incarnation=5)
    assert feed(core, Suspect("b", 4, "c")) == []
    assert state_of(core, "b") is ALIVE


def test_double_suspicion_counts_each_source_once() -> None:
    core = make_core()
    join(core, "b", "c", "d", "e", "f")
    feed(core, Suspect("b", 1, "c"))
    suspicion = core.suspicion("b")
    assert suspicion is not None and suspicion.confirmations == 0
    first_deadline = suspicion.deadline
    assert feed(core, Suspect("b", 1, "c")) == []  # the accuser again: not independent
    assert suspicion.confirmations == 0
    feed(core, Suspect("b", 1, "d"))
    assert suspicion.confirmations == 1
    assert suspicion.deadline < first_deadline


def test_suspect_about_self_is_refuted() -> None:
    core = make_core()
    join(core, "b")
    feed(core, Suspect("a", 1, "b"))
    assert core.incarnation == 2
    assert core.health_score == 1  # Lifeguard: being suspected hints that we are slow
    assert core.counters["refutes"] == 1
    gossip = [m for s in sent(drain(core, 1.0)) for m in opened(s)]
    assert Alive("a", 2, addr_of("a"), META) in gossip


@pytest.mark.parametrize("kind", ["suspect", "dead"])
def test_old_suspicion_of_ourselves_reminds_its_sender_directly(kind: str) -> None:
    """The sender missed our refutation (every broadcast of it lost): our incarnation stays,
    and our current alive goes straight to that sender, so it cannot time us out dead."""
    core = make_core()
    join(core, "b", "c")
    feed(core, Suspect("a", 1, "b"))  # refuted: incarnation 2
    drain(core, 1.0)
    stale = Suspect("a", 1, "c") if kind == "suspect" else Dead("a", 1, "c")
    out = feed(core, stale, now=1.0)
    assert core.incarnation == 2 and core.counters["refutes"] == 1
    assert core.counters["reminders"] == 1
    direct = [s for s in sent(out) if s.addr == addr_of("c")]
    assert any(Alive("a", 2, addr_of("a"), META) in opened(s) for s in direct)


def test_dead_refuted_by_the_node_itself() -> None:
    core = make_core()
    feed(core, Dead("a", 7, "b"))
    assert core.incarnation == 8
    assert state_of(core, "a") is ALIVE


def test_dead_node_not_resurrected_by_old_alive() -> None:
    core = make_core()
    join(core, "b", incarnation=3)
    out = feed(core, Dead("b", 3, "c"))
    assert isinstance(out[0], MemberDied)
    assert feed(core, Alive("b", 3, addr_of("b"), META)) == []  # a replay
    assert state_of(core, "b") is DEAD
    out = feed(core, Alive("b", 4, addr_of("b"), META))  # b refuted
    assert isinstance(out[0], MemberJoined)
    assert state_of(core, "b") is ALIVE


def test_left_is_not_overwritten_by_dead_but_replaces_it() -> None:
    core = make_core()
    join(core, "b", "c")
    feed(core, Left("b", 1))
    feed(core, Dead("b", 1, "x"))
    assert state_of(core, "b") is LEFT
    feed(core, Dead("c", 1, "x"))
    feed(core, Left("c", 1))
    assert state_of(core, "c") is LEFT
    feed(core, Alive("c", 1, addr_of("c"), META))
    assert state_of(core, "c") is LEFT


def test_leaving_node_does_not_refute_its_own_death() -> None:
    core = make_core()
    join(core, "b")
    core.leave(0.0)
    feed(core, Dead("a", 1, "b"))
    assert core.incarnation == 1
    assert state_of(core, "a") is LEFT


def test_leave_is_gossiped_until_sent_enough_times() -> None:
    core = make_core()
    join(core, "b", "c")
    out = core.leave(0.0)
    assert any(Left("a", 1) in opened(s) for s in sent(out))
    assert not core.leave_done
    drain(core, 5.0)
    assert core.leave_done


def test_conflicting_addresses_for_one_name_keep_the_existing() -> None:
    core = make_core()
    join(core, "b")
    feed(core, Alive("b", 2, ("10.9.9.9", 7946), META))
    info = core.member("b")
    assert info is not None and info.addr == addr_of("b") and info.incarnation == 1
    assert core.counters["conflicts"] == 1
    feed(core, Dead("b", 1, "c"))
    feed(core, Alive("b", 1, ("10.9.9.9", 7946), META))  # a dead name may be reclaimed
    info = core.member("b")
    assert info is not None and info.addr == ("10.9.9.9", 7946) and info.state is ALIVE


def test_restart_under_the_same_name_rejoins_alive() -> None:
    seed = make_core("s")
    join(seed, "b", incarnation=5)
    feed(seed, Dead("b", 5, "s"))
    restarted = make_core("b", seed=2)  # incarnation 1 again, same address
    answer, _ = seed.answer_push_pull(1.0, restarted.addr, restarted.push_pull_payload(join=True))
    assert state_of(seed, "b") is DEAD  # its alive at 1 is older than what we hold
    assert answer is not None
    restarted.receive_push_pull(1.0, seed.addr, answer)
    assert restarted.incarnation == 6  # refuted the death the cluster holds
    for send in sent(drain(restarted, 2.0)):
        if send.addr == seed.addr:
            seed.receive(2.0, restarted.addr, send.data)
    info = seed.member("b")
    assert info is not None and info.state is ALIVE and info.incarnation == 6


def test_suspicion_timeout_shrinks_with_confirmations() -> None:
    # memberlist suspicion_test.go: min 2 s, max 30 s, k = 3
    expected = {0: 30.0, 1: 16.0, 2: 30 - 28 * math.log(3) / math.log(4), 3: 2.0, 4: 2.0}
    for confirmations, seconds in expected.items():
        assert suspicion_timeout(confirmations, 3, 2.0, 30.0) == pytest.approx(seconds)
    assert suspicion_timeout(0, 0, 2.0, 30.0) == 2.0


def test_suspicion_timer_values_follow_cluster_size() -> None:
    core = make_core()
    names = [f"n{i}" for i in range(9)]
    join(core, *names)  # N = 10: min = 4 x max(1, log10 10) x 1 s = 4 s, max = 24 s, k = 2
    feed(core, Suspect("n0", 1, "n1"), now=100.0)
    suspicion = core.suspicion("n0")
    assert suspicion is not None and suspicion.k == 2
    assert suspicion.deadline == pytest.approx(124.0)
    feed(core, Suspect("n0", 1, "n2"), now=101.0)
    assert suspicion.deadline == pytest.approx(100 + 24 - 20 * math.log(2) / math.log(3))
    feed(core, Suspect("n0", 1, "n3"), now=102.0)
    assert suspicion.deadline == pytest.approx(104.0)
    out = drain(core, 104.0)
    assert any(isinstance(o, MemberDied) and o.member.name == "n0" for o in out)


def _probe(core: GossipCore) -> tuple[float, Ping]:
    """Tick until ``core`` sends a ping; return the time and the ping."""
    while True:
        now = core.next_deadline()
        for send in sent(core.tick(now)):
            for msg in opened(send):
                if isinstance(msg, Ping):
                    return now, msg


def test_missed_nacks_raise_health_score() -> None:
    core = make_core()
    join(core, "b", "c", "d", "e")
    start, ping = _probe(core)
    # Nobody acks: at the probe timeout, three helpers get a ping-req.
    out = core.tick(start + CONFIG.probe_timeout)
    reqs = [m for s in sent(out) for m in opened(s) if isinstance(m, PingReq)]
    assert len(reqs) == 3 and all(r.target == ping.target and r.nack for r in reqs)
    feed(core, Nack(ping.seq), now=start + 0.9)  # only one helper answers
    out = core.tick(start + CONFIG.probe_interval)
    assert core.health_score == 2  # two missed nacks
    assert state_of(core, ping.target) is SUSPECT
    assert any(isinstance(o, MemberSuspected) for o in out)


def test_successful_probe_lowers_health_score() -> None:
    core = make_core()
    join(core, "b", "c")
    feed(core, Suspect("a", 1, "b"))  # refuting raises the score to 1
    assert core.health_score == 1
    now, ping = _probe(core)
    feed(core, Ack(ping.seq), now=now + 0.01)
    assert core.health_score == 0


def test_health_score_scales_the_probe_timeout() -> None:
    core = make_core()
    join(core, "b", "c")
    feed(core, Dead("a", 1, "b"))
    feed(core, Dead("a", 2, "b"))
    assert core.health_score == 2  # timeouts x3
    start, _ = _probe(core)

    def ping_reqs(now: float) -> list[PingReq]:
        return [m for s in sent(core.tick(now)) for m in opened(s) if isinstance(m, PingReq)]

    assert ping_reqs(start + 2.9 * CONFIG.probe_timeout) == []
    assert len(ping_reqs(start + 3 * CONFIG.probe_timeout)) == 1


def test_failed_probe_without_helpers_raises_health_and_suspects() -> None:
    core = make_core()
    join(core, "b")
    start, _ = _probe(core)
    core.tick(start + CONFIG.probe_interval)
    assert core.health_score == 1
    assert state_of(core, "b") is SUSPECT


def test_ping_to_suspect_carries_the_suspicion() -> None:
    core = make_core()
    join(core, "b")
    feed(core, Suspect("b", 1, "c"))
    while True:  # Lifeguard's buddy system: the ping's own datagram carries Suspect(b)
        datagrams = [opened(s) for s in sent(core.tick(core.next_deadline()))]
        with_ping = [parts for parts in datagrams if any(isinstance(m, Ping) for m in parts)]
        if with_ping:
            assert Suspect("b", 1, "a") in with_ping[0]
            break


def test_ping_for_another_name_is_not_acked() -> None:
    core = make_core()
    assert feed(core, Ping(1, "someone-else", "b")) == []
    assert core.counters["ping_wrong_target"] == 1
    out = feed(core, Ping(2, "a", "b"))
    assert Ack(2) in opened(out[0])


def test_ping_req_is_forwarded_and_nacked_when_target_silent() -> None:
    core = make_core()
    join(core, "b", "c")
    out = feed(core, PingReq(77, "c", addr_of("c"), "b", True), now=10.0, src="b")
    forwarded = [m for s in sent(out) for m in opened(s) if isinstance(m, Ping)]
    assert forwarded and forwarded[0].target == "c"
    out = core.tick(10.0 + CONFIG.nack_timeout)
    assert any(Nack(77) in opened(s) for s in sent(out))
    # a late ack is still forwarded to the requester
    out = feed(core, Ack(forwarded[0].seq), now=10.45, src="c")
    assert [s.addr for s in sent(out)] == [addr_of("b")] and Ack(77) in opened(out[0])


def test_older_load_version_ignored() -> None:
    core = make_core()
    join(core, "b")
    feed(core, LoadUpdate("b", 5, Load(1, 2, 3)))
    feed(core, LoadUpdate("b", 3, Load(9, 9, 9)))
    info = core.member("b")
    assert info is not None and info.load == Load(1, 2, 3) and info.load_version == 5
    assert info.incarnation == 1  # load is not an incarnation bump


def test_own_load_version_jumps_above_a_previous_run() -> None:
    core = make_core()
    core.set_load(Load(0, 4, 0))
    feed(core, LoadUpdate("a", 40, Load(3, 1, 0)))
    info = core.member("a")
    assert info is not None and info.load_version == 41 and info.load == Load(0, 4, 0)


def test_load_updates_coalesce_in_the_broadcast_queue() -> None:
    core = make_core()
    join(core, "b")
    drain(core, 10.0)  # send the join news out
    for i in range(50):
        core.set_load(Load(i, 1, 0))
    gossip = [m for s in sent(drain(core, 10.3)) for m in opened(s)]
    loads = [m for m in gossip if isinstance(m, LoadUpdate)]
    assert loads and all(m.version == 50 and m.load == Load(49, 1, 0) for m in loads)


def test_meta_change_bumps_incarnation() -> None:
    core = make_core()
    core.set_meta(NodeMeta("http://127.0.0.1:1", ("m1", "m2"), "draining"))
    assert core.incarnation == 2
    with pytest.raises(ValueError):
        core.set_meta(NodeMeta("http://x", tuple(f"model-{i:04d}" for i in range(200)), "ready"))


def test_piggyback_sends_least_sent_first() -> None:
    queue = BroadcastQueue()
    for key in "abc":
        queue.queue(key, key.encode() * 10)
    assert queue.take(10, limit=3) == [b"c" * 10]  # newest first among equals
    assert queue.take(20, limit=3) == [b"b" * 10, b"a" * 10]
    assert queue.take(30, limit=3) == [b"c" * 10, b"b" * 10, b"a" * 10]
    assert queue.transmits("c") == 2
    queue.queue("c", b"C" * 10)  # a newer update replaces the queued one
    assert queue.take(10, limit=3) == [b"C" * 10]
    assert queue.take(100, limit=3) == [b"C" * 10, b"b" * 10, b"a" * 10]  # a, b: 3rd send
    assert len(queue) == 1 and queue.transmits("a") is None
    queue.take(100, limit=3)
    assert len(queue) == 0


def test_datagrams_respect_1400_bytes_and_pack_many_piggybacks() -> None:
    core = make_core()
    big = NodeMeta("http://" + "h" * 60, tuple(f"org/model-{i}" for i in range(8)), "ready")
    for i in range(60):
        feed(core, Alive(f"node-{i:03d}", 1, addr_of(f"node-{i:03d}"), big))
    datagrams = sent(drain(core, 3.0))
    assert datagrams
    assert max(len(s.data) for s in datagrams) <= 1400
    assert max(len(opened(s)) for s in datagrams) >= 5
    assert max(len(s.data) for s in datagrams) > 1200  # it fills them


def test_push_pull_merge() -> None:
    a = make_core("a")
    join(a, "d")
    b = make_core("b", seed=3)
    join(b, "c", "d")
    feed(b, Dead("d", 1, "b"))
    b.set_load(Load(2, 2, 2))
    answer, _ = a.answer_push_pull(1.0, b.addr, b.push_pull_payload(join=False))
    assert answer is not None
    assert state_of(a, "b") is ALIVE and state_of(a, "c") is ALIVE
    assert state_of(a, "d") is SUSPECT  # a remote death is only a suspicion here
    info = a.member("b")
    assert info is not None and info.load == Load(2, 2, 2)
    b.receive_push_pull(1.1, a.addr, answer)
    assert state_of(b, "a") is ALIVE


def test_oversized_push_pull_rejected() -> None:
    config = CONFIG.replace(max_push_pull_members=10)
    core = make_core(config=config)
    members = tuple(MemberInfo(f"n{i}", addr_of(f"n{i}"), ALIVE, 1, META) for i in range(11))
    data = seal(PushPull("n0", False, members), config=config, src="n0")
    answer, out = core.answer_push_pull(0.0, addr_of("n0"), data)
    assert answer is None and out == []
    assert core.counters["dropped_push_pull"] == 1
    assert [m.name for m in core.members()] == ["a"]


def test_alive_updates_are_not_spent_on_their_own_subject() -> None:
    """With few retransmits (2 in a small cluster), an ``alive`` about X sent to X is one
    transmit the member who has not heard of X never gets."""
    from quorum.gossip.broadcast import BroadcastQueue

    queue = BroadcastQueue()
    queue.queue(("m", "c"), b"alive-c", useless_to="c")
    queue.queue(("m", "d"), b"dead-d")
    assert queue.take(1400, 2, target="c") == [b"dead-d"]  # c gets news about d only
    assert queue.take(1400, 2, target="b") == [b"alive-c", b"dead-d"]
    assert queue.take(1400, 2, target="b") == [b"alive-c"]  # dead-d used its 2 transmits
    assert queue.take(1400, 2, target="b") == []  # and so has alive-c now
