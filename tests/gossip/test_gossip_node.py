"""GossipNode on real sockets (127.0.0.1, port 0) with the local preset."""

from __future__ import annotations

import trio

from quorum.gossip import GossipConfig, GossipNode, Load, MemberState, NodeMeta

KEY = b"k" * 32


def make_node(name: str, seeds: list[tuple[str, int]]) -> GossipNode:
    return GossipNode(
        name=name,
        config=GossipConfig.local(cluster_name="quorum", keys=(KEY,)),
        bind=("127.0.0.1", 0),
        meta=NodeMeta(http_url="http://127.0.0.1:32768", models=("m1",), state="ready"),
        seeds=seeds,
    )


def states(node: GossipNode) -> dict[str, MemberState]:
    return {m.name: m.state for m in node.members()}


async def wait_for(predicate: object, step: float = 0.02) -> None:
    assert callable(predicate)
    while not predicate():
        await trio.sleep(step)


def worst_case_death_s(config: GossipConfig, n_members: int) -> float:
    """The longest the protocol may take to call a silent member dead, in seconds: a probe
    round over every member, its timeout, and a suspicion that no other member confirms
    (Lifeguard's maximum, ``suspicion_max_timeout_mult`` x the minimum)."""
    rounds = n_members * (config.probe_interval + config.probe_timeout)
    return rounds + config.suspicion_max_timeout_mult * config.suspicion_min_timeout(n_members)


async def test_three_nodes_find_each_other_and_see_a_cancelled_one_die() -> None:
    # Usually about 2 s. The deadline is the protocol's worst case for the death (about 11 s
    # here) plus the joins and the leave: on a loaded CI machine a fixed 10 s was too short.
    config = GossipConfig.local(cluster_name="quorum", keys=(KEY,))
    with trio.fail_after(worst_case_death_s(config, 3) + 10):
        async with trio.open_nursery() as nursery:
            a = make_node("a", [])
            addr_a = await nursery.start(a.run)
            b, c = make_node("b", [addr_a]), make_node("c", [addr_a])
            await nursery.start(b.run)
            c_scope = trio.CancelScope()

            async def run_c() -> None:
                with c_scope:
                    await c.run()

            nursery.start_soon(run_c)
            all_alive = {"a": MemberState.ALIVE, "b": MemberState.ALIVE, "c": MemberState.ALIVE}
            await wait_for(lambda: all(states(n) == all_alive for n in (a, b, c)))

            b.set_load(Load(in_flight=2, free_slots=6, queue_depth=0))
            await wait_for(lambda: (a.member("b") or a.members()[0]).load == Load(2, 6, 0))

            c_scope.cancel()
            await wait_for(
                lambda: states(a)["c"] is MemberState.DEAD and states(b)["c"] is MemberState.DEAD
            )
            assert a.counters["dropped_decrypt"] == 0
            assert a.counters["received"] > 0
            await b.leave(timeout=2.0)
            await wait_for(lambda: states(a)["b"] is MemberState.LEFT)
            nursery.cancel_scope.cancel()
