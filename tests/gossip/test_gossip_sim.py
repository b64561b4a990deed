"""Whole clusters of cores on the virtual-time simulator (no sleeps, no sockets)."""

from __future__ import annotations

import math

from quorum.gossip import GossipConfig, MemberState, NodeMeta
from quorum.gossip.events import MemberDied, MemberSuspected
from quorum.gossip.sim import NetworkConditions, Simulation

LAN = GossipConfig.lan()


def deaths_of(sim: Simulation, name: str) -> list[str]:
    return [
        e.observer
        for e in sim.events
        if isinstance(e.event, MemberDied) and e.event.member.name == name
    ]


def test_ten_nodes_converge() -> None:
    sim = Simulation(LAN, seed=1)
    sim.bootstrap(10)
    assert sim.run_until(sim.converged, timeout=10.0)


def test_killed_node_marked_dead_by_every_survivor() -> None:
    sim = Simulation(LAN, seed=2)
    sim.bootstrap(10, settle=20.0)
    start = sim.now
    sim.kill("n4")
    assert sim.run_until(lambda: sim.all_see("n4", MemberState.DEAD), timeout=30.0)
    assert sim.now - start <= 12.0
    assert sorted(deaths_of(sim, "n4")) == sorted(n.name for n in sim.running())


def test_partitioned_node_suspected_then_refutes_after_heal() -> None:
    sim = Simulation(LAN, seed=3)
    sim.bootstrap(10, settle=20.0)
    sim.partition(["n7"])
    assert sim.run_until(
        lambda: any(sim.view(n.name, "n7") is MemberState.SUSPECT for n in sim.running()),
        timeout=5.0,
    )
    sim.heal()
    assert sim.run_until(sim.converged, timeout=30.0)
    assert deaths_of(sim, "n7") == []
    assert sim.nodes["n7"].core.incarnation > 1  # it refuted


def test_stalled_node_within_suspicion_window_not_declared_dead() -> None:
    sim = Simulation(LAN, seed=4)
    sim.bootstrap(10, settle=20.0)
    sim.stall("n2", 2.5)
    sim.run_for(30.0)
    suspected = [
        e
        for e in sim.events
        if isinstance(e.event, MemberSuspected) and e.event.member.name == "n2"
    ]
    assert suspected, "the stall should have been noticed"
    assert deaths_of(sim, "n2") == []
    assert sim.converged()


def test_long_partition_heals_and_rejoins_through_seeds() -> None:
    sim = Simulation(LAN, seed=5)
    sim.bootstrap(8, settle=20.0)
    sim.partition(["n5"])
    sim.run_for(90.0)  # long enough for both sides to declare the other dead and forget
    assert sim.all_see("n5", MemberState.DEAD) or sim.view("n0", "n5") is None
    sim.heal()
    assert sim.run_until(sim.converged, timeout=120.0)


def test_no_false_deaths_with_loss_and_duplication() -> None:
    sim = Simulation(LAN, seed=6, conditions=NetworkConditions(loss=0.1, duplicate=0.05))
    sim.bootstrap(10, settle=10.0)
    sim.run_for(120.0)
    assert [e for e in sim.events if isinstance(e.event, MemberDied)] == []
    assert sim.converged()


def test_update_spreads_in_few_gossip_rounds() -> None:
    sim = Simulation(LAN, seed=7)
    nodes = sim.bootstrap(50, settle=40.0)
    start = sim.now
    nodes[0].core.set_meta(NodeMeta("http://new", ("m",), "draining"))

    def everyone_has_it() -> bool:
        infos = [n.core.member("n0") for n in sim.running()]
        return all(i is not None and i.meta.state == "draining" for i in infos)

    assert sim.run_until(everyone_has_it, timeout=10.0, check_every=0.01)
    rounds = (sim.now - start) / LAN.gossip_interval
    assert rounds <= 2 * math.log2(50)
