"""Real ``GossipNode`` runners (not just cores) over the in-memory network, on MockClock."""

from __future__ import annotations

import trio

from quorum.gossip import GossipConfig, GossipNode, MemberState, NodeMeta
from quorum.gossip.memory import MemoryNetwork

KEY = b"k" * 32


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i + 1}", 7946)


async def start_nodes(
    nursery: trio.Nursery, network: MemoryNetwork, n: int
) -> tuple[dict[str, GossipNode], dict[str, trio.CancelScope]]:
    config = GossipConfig.lan(cluster_name="test", keys=(KEY,))
    nodes, scopes = {}, {}
    for i in range(n):
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
