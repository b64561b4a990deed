"""Gossip figures on the virtual-time simulator, printed next to the DESIGN.md targets.

    python benchmarks/gossip_sim.py            # full run (a few minutes)
    python benchmarks/gossip_sim.py --quick    # fewer seeds (well under a minute)

Every figure comes from ``quorum.gossip.sim.Simulation`` driving real ``GossipCore``s with
the LAN preset (memberlist's numbers) on a seeded fake network; nothing sleeps.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quorum.gossip import GossipConfig, Load, MemberState, NodeMeta
from quorum.gossip.events import MemberDied
from quorum.gossip.sim import NetworkConditions, Simulation, TimedEvent
from quorum.stats import percentile

LAN = GossipConfig.lan()


def warm(n: int, seed: int, settle: float) -> Simulation:
    sim = Simulation(LAN, seed=seed, record=False)
    sim.bootstrap(n, settle=settle)
    assert sim.converged(), f"N={n} did not converge in {settle} s"
    return sim


def time_to_dead(base: Simulation, seeds: int) -> list[float]:
    """Seconds from a kill until every survivor holds the victim dead."""
    results = []
    for seed in range(seeds):
        sim = base.fork(seed)
        victim = random.Random(seed).choice(list(sim.nodes))
        start = sim.now
        sim.kill(victim)
        ok = sim.run_until(lambda s=sim, v=victim: s.all_see(v, MemberState.DEAD), timeout=120.0)
        results.append(sim.now - start if ok else math.inf)
    return results


def rounds_to_spread(base: Simulation, seeds: int) -> list[float]:
    """Gossip rounds (elapsed / gossip interval) for one meta update to reach every node."""
    results = []
    for seed in range(seeds):
        sim = base.fork(seed)
        origin = sim.nodes[random.Random(seed).choice(list(sim.nodes))]
        start = sim.now
        origin.core.set_meta(NodeMeta("http://updated", ("m",), "draining"))
        target = origin.core.incarnation

        def reached(sim: Simulation = sim, name: str = origin.name, target: int = target) -> bool:
            for node in sim.nodes.values():
                info = node.core.member(name)
                if info is None or info.incarnation < target:
                    return False
            return True

        sim.run_until(reached, timeout=30.0, check_every=0.01)
        results.append((sim.now - start) / LAN.gossip_interval)
    return results


def false_deaths(seed: int, minutes: float) -> int:
    """MemberDied verdicts over ``minutes`` with 10% loss and one node stalled 2 s in 10."""
    sim = Simulation(LAN, seed=seed, conditions=NetworkConditions(loss=0.0), record=False)
    sim.bootstrap(10, settle=20.0)
    sim.conditions.loss = 0.10
    deaths: list[TimedEvent] = []
    sim.listeners.append(lambda e: deaths.append(e) if isinstance(e.event, MemberDied) else None)
    start = sim.now
    t = start + 5.0
    while t < start + minutes * 60:
        sim.stall("n3", 2.0, at=t)
        t += 10.0
    sim.run_for(minutes * 60)
    return len(deaths)


def cost_per_node(seconds: float, load_every: float = 0.5) -> tuple[float, float]:
    """Datagrams and bytes sent per node per second at N=10, loads changing every 0.5 s."""
    sim = Simulation(LAN, seed=11, record=False)
    nodes = sim.bootstrap(10, settle=30.0)
    rng = random.Random(1)

    def churn(node_index: int, when: float) -> Callable[[], None]:
        def action() -> None:
            nodes[node_index].core.set_load(Load(rng.randrange(8), rng.randrange(8), 0))
            sim.at(when + load_every, churn(node_index, when + load_every))

        return action

    for i in range(len(nodes)):
        first = sim.now + rng.random() * load_every
        sim.at(first, churn(i, first))
    before = [(n.core.counters["sent"], n.core.counters["bytes_sent"]) for n in nodes]
    sim.run_for(seconds)
    msgs = [n.core.counters["sent"] - b[0] for n, b in zip(nodes, before, strict=True)]
    size = [n.core.counters["bytes_sent"] - b[1] for n, b in zip(nodes, before, strict=True)]
    return max(msgs) / seconds, max(size) / seconds


def fuzz(count: int) -> tuple[float, dict[str, int]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "gossip"))
    from gossip_helpers import CONFIG, make_core  # type: ignore[import-not-found]
    from test_gossip_fuzz import feed_all, hostile_datagrams  # type: ignore[import-not-found]

    core = make_core()
    datagrams = hostile_datagrams(random.Random(5), CONFIG, count)
    began = time.perf_counter()
    feed_all(core, datagrams)
    return time.perf_counter() - began, core.counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds")
    args = parser.parse_args()
    quick = args.quick
    rows: list[tuple[str, str, str, bool]] = []
    began = time.perf_counter()

    base10 = warm(10, seed=1, settle=30.0)
    dead10 = time_to_dead(base10, 100 if quick else 1000)
    p50, p99 = percentile(dead10, 50), percentile(dead10, 99)
    rows.append(
        ("killed node dead on all survivors, N=10, p50", f"{p50:.2f} s", "<= 8 s", p50 <= 8)
    )
    rows.append(
        ("killed node dead on all survivors, N=10, p99", f"{p99:.2f} s", "<= 12 s", p99 <= 12)
    )

    base200 = warm(200, seed=2, settle=60.0)
    dead200 = time_to_dead(base200, 5 if quick else 20)
    rows.append(
        (
            "killed node dead on all survivors, N=200, p50 / p99",
            f"{percentile(dead200, 50):.2f} / {percentile(dead200, 99):.2f} s",
            "(no target)",
            True,
        )
    )

    for n, base, seeds in (
        (10, base10, 300 if quick else 3000),
        (200, base200, 30 if quick else 1000),
    ):
        spread = rounds_to_spread(base, seeds)
        bound = 2 * math.log2(n)
        share = sum(r <= bound for r in spread) / len(spread)
        rows.append(
            (
                f"rounds for one update to reach all, N={n}, 0% loss ({seeds} seeds)",
                f"p50 {percentile(spread, 50):.1f}, max {max(spread):.1f}; "
                f"{share * 100:.2f}% <= {bound:.1f}",
                ">= 99.9% of seeds",
                share >= 0.999,
            )
        )

    minutes = 10.0
    runs = 2 if quick else 5
    deaths = sum(false_deaths(seed, minutes) for seed in range(runs))
    rows.append(
        (
            f"false dead verdicts, N=10, {runs} x 10 min, 10% loss, 1 node stalled 2 s / 10 s",
            str(deaths),
            "0",
            deaths == 0,
        )
    )

    msgs, size = cost_per_node(60.0 if quick else 300.0)
    rows.append(
        ("datagrams sent per node, N=10 (busiest node)", f"{msgs:.1f} /s", "<= 50 /s", msgs <= 50)
    )
    rows.append(
        (
            "bytes sent per node, N=10 (busiest node)",
            f"{size / 1000:.2f} KB/s",
            "<= 15 KB/s",
            size <= 15_000,
        )
    )

    seconds, counters = fuzz(100_000)
    counted = (
        counters["dropped_decrypt"]
        + counters["dropped_decode"]
        + counters["dropped_oversize"]
        + counters["accepted"]
    )
    rows.append(
        (
            "fuzz: 100,000 hostile datagrams into one core",
            f"{seconds:.2f} s, {counted} counted, {counters['accepted']} accepted",
            "no exception, all counted",
            counted == 100_000,
        )
    )

    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':<{vwidth}}  {'target':<18}  met")
    print("-" * (width + vwidth + 28))
    for name, value, target, met in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {target:<18}  {'yes' if met else 'NO'}")
    print(f"\n({'quick' if quick else 'full'} run, {time.perf_counter() - began:.1f} s wall clock)")


if __name__ == "__main__":
    main()
