"""Real ``GossipNode`` runners (not just cores) over the in-memory network, on MockClock."""

from __future__ import annotations

import trio

from quorum.gossip import GossipConfig, GossipNode, Load, MemberState, NodeMeta, Usage
from quorum.gossip.memory import MemoryNetwork

KEY = b"k" * 32


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i + 1}", 7946)


CONFIG = GossipConfig.lan(cluster_name="test", keys=(KEY,))


async def start_nodes(
    nursery: trio.Nursery, network: MemoryNetwork, n: int, *, first: int = 0
) -> tuple[dict[str, GossipNode], dict[str, trio.CancelScope]]:
    """Start nodes ``n{first}`` .. ``n{first + n - 1}``, each seeded with ``n0``."""
    config = CONFIG
    nodes, scopes = {}, {}
    for i in range(first, first + n):
        name = f"n{i}"
        node = GossipNode(
            name,
            config,
            addr(i),
            NodeMeta(f"http://{addr(i)[0]}:32768", ("m",), "ready"),
            seeds=[addr(0)] if i else [],
            transport=network.transport(addr(i)),
        )
        scope = trio.CancelScope()

        async def run(
            node: GossipNode = node,
            scope: trio.CancelScope = scope,
            *,
            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            with scope:
                await node.run(task_status=task_status)

        await nursery.start(run)
        nodes[name], scopes[name] = node, scope
    return nodes, scopes


def states(node: GossipNode) -> dict[str, MemberState]:
    return {m.name: m.state for m in node.members()}


async def test_runners_converge_and_a_killed_runner_is_declared_dead(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork(nursery, seed=3, loss=0.10, delay=0.002)
    nodes, scopes = await start_nodes(nursery, network, 10)
    with trio.fail_after(30):
        while not all(len(states(n)) == 10 for n in nodes.values()):
            await trio.sleep(0.1)
    scopes["n7"].cancel()  # dies silently: no leave
    killed_at = trio.current_time()
    survivors = [n for name, n in nodes.items() if name != "n7"]
    with trio.fail_after(60):
        while not all(states(n)["n7"] == MemberState.DEAD for n in survivors):
            await trio.sleep(0.1)
    assert trio.current_time() - killed_at <= 12.0
    # two more virtual minutes at 10% loss: nobody else is ever declared dead
    end = trio.current_time() + 120
    while trio.current_time() < end:
        for n in survivors:
            dead = {k for k, v in states(n).items() if v == MemberState.DEAD}
            assert dead <= {"n7"}, dead
        await trio.sleep(0.5)
    for scope in scopes.values():
        scope.cancel()


async def test_partitioned_runner_is_suspected_then_alive_again_after_heal(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork(nursery, seed=5, delay=0.002)
    nodes, scopes = await start_nodes(nursery, network, 5)
    with trio.fail_after(30):
        while not all(len(states(n)) == 5 for n in nodes.values()):
            await trio.sleep(0.1)
    network.partition({addr(i) for i in range(4)}, {addr(4)})
    with trio.fail_after(60):
        while states(nodes["n0"])["n4"] == MemberState.ALIVE:
            await trio.sleep(0.1)
    network.heal()
    with trio.fail_after(120):
        while not all(
            all(s == MemberState.ALIVE for s in states(n).values()) for n in nodes.values()
        ):
            await trio.sleep(0.1)
    for scope in scopes.values():
        scope.cancel()


USAGE = (Usage("team-a", 1_700_000, 12, 3_400, 2), Usage("team-b", 1_700_000, 1, 80, 0))


async def test_usage_reaches_every_runner_within_one_dissemination_and_a_late_joiner_by_push_pull(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork(nursery, seed=11, delay=0.002)
    nodes, scopes = await start_nodes(nursery, network, 3)
    with trio.fail_after(30):
        while not all(len(states(n)) == 3 for n in nodes.values()):
            await trio.sleep(0.1)
    await trio.sleep(10)  # the join news has run out of retransmits
    load = Load(1, 3, 0, USAGE)
    nodes["n0"].set_load(load)
    published = trio.current_time()
    # an update is piggybacked retransmit_limit times, on gossip rounds every gossip_interval
    dissemination = CONFIG.retransmit_limit(3) * CONFIG.gossip_interval
    with trio.fail_after(dissemination):
        while not all(getattr(n.member("n0"), "load", None) == load for n in nodes.values()):
            await trio.sleep(0.01)
    assert trio.current_time() - published <= dissemination
    await trio.sleep(10)  # every piggyback of that load is spent
    late, late_scopes = await start_nodes(nursery, network, 1, first=3)
    joined = trio.current_time()
    with trio.fail_after(5):
        while (info := late["n3"].member("n0")) is None or info.load is None:
            await trio.sleep(0.01)
    assert info.load == load and info.load.usage == USAGE
    assert trio.current_time() - joined < CONFIG.push_pull_interval  # the join push-pull
    for scope in (*scopes.values(), *late_scopes.values()):
        scope.cancel()
