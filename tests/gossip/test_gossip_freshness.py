"""Freshness: the sealed header (source, epoch, sent time) lets a receiver drop captured
packets replayed later, and packets from a previous life of their sender."""

from __future__ import annotations

import msgpack
import pytest
from gossip_helpers import CONFIG, addr_of, feed, join, make_core, opened, seal, sent

from quorum.gossip import codec
from quorum.gossip.codec import DecodeError
from quorum.gossip.config import GossipConfig
from quorum.gossip.events import Send
from quorum.gossip.freshness import Freshness, FreshnessVerdict
from quorum.gossip.messages import Ack, Alive, Compound, Header, NodeMeta, Ping
from quorum.gossip.sim import Simulation

WINDOW = CONFIG.freshness_window
OLD_META = NodeMeta("http://10.0.0.66:32768", ("old-model",), "ready")
NEW_META = NodeMeta("http://10.0.0.66:32768", ("new-model",), "ready")
SPOOFED = ("10.9.9.9", 53)  # where a replayed ping's ack would be reflected to


def acks_to(outputs: list, addr: tuple[str, int]) -> list[Ack]:  # type: ignore[type-arg]
    return [m for s in sent(outputs) if s.addr == addr for m in opened(s) if isinstance(m, Ack)]


def test_captured_ping_replayed_after_the_window_is_dropped_and_counted() -> None:
    core = make_core()
    captured = seal(Ping(7, "a", "b"), src="b", sent=0.0)
    assert acks_to(core.receive(0.0, addr_of("b"), captured), addr_of("b")) == [Ack(7)]
    for t in range(1, 40):  # b keeps talking: the receiver keeps its clock offset
        feed(core, Ping(100 + t, "a", "b"), now=float(t), src="b")
    out = core.receive(40.0, SPOOFED, captured)  # replayed from a spoofed address
    assert acks_to(out, SPOOFED) == []
    assert core.counters["dropped_stale"] == 1
    # within the window a late packet is still taken (delay, stalls)
    late = seal(Ping(8, "a", "b"), src="b", sent=40.0 - WINDOW + 1)
    assert acks_to(core.receive(40.0, addr_of("b"), late), addr_of("b")) == [Ack(8)]


def test_packet_from_a_previous_life_cannot_override_the_current_state() -> None:
    """b's old life said "alive at 5 with the old meta"; b restarted (new epoch, incarnation
    1, new meta). The old packet, replayed within the window, must not take b back."""
    core = make_core()
    captured = seal(Alive("b", 5, addr_of("b"), OLD_META), src="b", epoch=100, sent=30.0)
    core.receive(1.0, addr_of("b"), seal(Alive("b", 1, addr_of("b"), NEW_META), src="b", epoch=200))
    core.receive(2.0, addr_of("b"), captured)
    info = core.member("b")
    assert info is not None and info.meta == NEW_META and info.incarnation == 1
    assert core.counters["dropped_replay"] == 1


def test_restarted_sender_is_heard_at_once() -> None:
    core = make_core()
    for t in range(100):  # a long first life
        feed(core, Ping(t, "a", "b"), now=float(t), src="b")
    reborn = seal(Ping(999, "a", "b"), src="b", epoch=2, sent=0.0)  # its clock starts over
    assert acks_to(core.receive(100.0, addr_of("b"), reborn), addr_of("b")) == [Ack(999)]
    old = seal(Ping(1000, "a", "b"), src="b", epoch=1, sent=100.0)  # a last one of life 1
    assert core.receive(100.5, addr_of("b"), old) == []
    assert core.counters["dropped_replay"] == 1 and core.counters["dropped_stale"] == 0


@pytest.mark.parametrize("skew", [-1e6, -3600.0, 0.0, 3600.0, 1e6])
def test_clocks_of_sender_and_receiver_need_not_agree(skew: float) -> None:
    fresh = Freshness("a", window=30.0, retention=120.0, max_senders=8)
    for t in range(600):  # ten minutes, a packet a second
        header = Header("b", 1, max(0, round((t + skew + 2e6) * 1000)))
        assert fresh.check(float(t), header) is FreshnessVerdict.FRESH


def test_a_sender_clock_slower_by_500_ppm_never_drifts_out_of_the_window() -> None:
    fresh = Freshness("a", window=30.0, retention=120.0, max_senders=8)
    for t in range(0, 10 * 3600, 5):  # ten hours, a packet every 5 s
        header = Header("b", 1, round(t * (1 - 500e-6) * 1000))
        assert fresh.check(float(t), header) is FreshnessVerdict.FRESH, t
    replay = Header("b", 1, round((10 * 3600 - 60) * (1 - 500e-6) * 1000))
    assert fresh.check(10 * 3600.0, replay) is FreshnessVerdict.STALE


def test_our_own_packet_sent_back_is_dropped() -> None:
    core = make_core()
    join(core, "b")
    ours = [s for s in sent(core.tick(core.next_deadline())) if isinstance(s, Send)]
    while not ours:
        ours = sent(core.tick(core.next_deadline()))
    assert core.receive(core.next_deadline(), addr_of("b"), ours[0].data) == []
    assert core.counters["dropped_replay"] == 1


def test_sender_records_are_bounded_and_expire() -> None:
    fresh = Freshness("a", window=30.0, retention=120.0, max_senders=8)
    for i in range(100):
        fresh.check(0.0, Header(f"n{i}", 1, 0))
    assert len(fresh) == 8
    # a forged header for b from a far future life locks b's real life out only until the
    # record expires, retention seconds after the forged packet
    fresh.check(0.0, Header("b", 2**62, 0))
    assert fresh.check(100.0, Header("b", 5, 100_000)) is FreshnessVerdict.REPLAY
    assert fresh.check(121.0, Header("b", 5, 121_000)) is FreshnessVerdict.FRESH


def test_freshness_window_must_cover_a_push_pull() -> None:
    with pytest.raises(ValueError, match="freshness_window"):
        GossipConfig.lan(tcp_timeout=60.0)


def test_envelope_round_trip_and_a_later_version_may_append_fields() -> None:
    header = Header("b", 2**63 - 1, 2**53 - 1)
    msg = Compound((Ping(1, "a", "b"), Ack(2)))
    data = codec.encode_envelope(header, codec.encode(msg))
    assert codec.decode_packet(data, max_size=1400) == (header, msg)
    assert len(data) - len(codec.encode(msg)) <= codec.envelope_overhead("b")
    appended = msgpack.packb([12, "b", 1, 2, [3, 9], "a field from the future", 42])
    assert codec.decode_packet(appended, max_size=1400) == (Header("b", 1, 2), Ack(9))


@pytest.mark.parametrize(
    "obj",
    [
        [3, 9],  # a bare message: no header, no freshness
        [12, "b", 1, 2],  # no message
        [12, "b", -1, 2, [3, 9]],  # negative epoch
        [12, "b", 1, -2, [3, 9]],  # negative sent time
        [12, "b", 2**63, 2, [3, 9]],  # epoch out of range
        [12, "b", 1, 2**53, [3, 9]],  # sent time out of range
        [12, "b\x00", 1, 2, [3, 9]],  # unprintable source
        [12, "b", 1, 2, [12, "b", 1, 2, [3, 9]]],  # nested envelope
        [10, [[12, "b", 1, 2, [3, 9]]]],  # envelope inside a compound
        [12.0, "b", 1, 2, [3, 9]],  # tag not an int
    ],
)
def test_packet_without_a_valid_envelope_is_dropped(obj: object) -> None:
    with pytest.raises(DecodeError):
        codec.decode_packet(msgpack.packb(obj), max_size=1400)
    core = make_core()
    core.receive(0.0, addr_of("b"), seal_raw(msgpack.packb(obj)))
    assert core.counters["dropped_decode"] == 1 and core.counters["accepted"] == 0


def seal_raw(plaintext: bytes) -> bytes:
    from quorum.gossip.keyring import Keyring

    return Keyring(CONFIG.keys).seal(plaintext, CONFIG.cluster_name.encode())


class RecordingSimulation(Simulation):
    """A simulation that keeps every datagram one node sends (an eavesdropper's capture)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.captured: dict[str, list[bytes]] = {}

    def _apply(self, node, outputs):  # type: ignore[no-untyped-def]
        for out in outputs:
            if isinstance(out, Send):
                self.captured.setdefault(node.name, []).append(out.data)
        super()._apply(node, outputs)


def test_replaying_a_restarted_nodes_previous_life_changes_nothing_in_the_simulator() -> None:
    """n3 lives a while (its meta changes, incarnation 5), dies and is forgotten, and comes
    back under its name with new meta at incarnation 1. An eavesdropper replays its old
    life's packets to everyone: without the epoch, "n3 alive at 5 with the old meta" would
    win over the new life's incarnation 1 everywhere."""
    sim = RecordingSimulation(CONFIG.replace(push_pull_interval=15.0), seed=11)
    sim.bootstrap(5, settle=10.0)
    n3 = sim.nodes["n3"].core
    for port in range(1, 5):
        n3.set_meta(NodeMeta(f"http://10.0.0.66:{port}", ("old-model",), "ready"))
        sim.run_for(1.0)
    n3.set_meta(OLD_META)
    start = len(sim.captured["n3"])
    sim.run_for(3.0)
    assert n3.incarnation == 6 and sim.converged()
    old_life = sim.captured["n3"][start:]  # what an eavesdropper kept
    sim.kill("n3")
    assert sim.run_until(
        lambda: all(sim.view(n.name, "n3") is None for n in sim.running()), timeout=120.0
    )
    sim.add_node("n3", meta=NEW_META)
    assert sim.run_until(sim.converged, timeout=30.0)
    for node in sim.running():
        if node.name != "n3":
            for data in old_life:
                sim._apply(node, node.core.receive(sim.now, sim.nodes["n3"].addr, data))
    for node in sim.running():
        info = node.core.member("n3")
        assert info is not None and info.meta == NEW_META, node.name
        if node.name != "n3":  # from a closed life, or (not heard from n3 since) too old
            c = node.core.counters
            assert c["dropped_replay"] + c["dropped_stale"] >= len(old_life)
