"""The routing view of gossip: a node's per-key quota usage, given with its own ``Member``,
reaches every peer's ``members()``; run on the in-memory network, on virtual time."""

from __future__ import annotations

from dataclasses import replace

import trio
import trio.testing

from quorum.backends.base import NodeState
from quorum.gossip import GossipConfig, GossipNode, MemberState, Usage
from quorum.gossip.memory import MemoryNetwork
from quorum.routing.membership import GossipMembership, Member, MemberLoad, gossip_meta

CONFIG = GossipConfig.lan(cluster_name="test", keys=(b"k" * 32,))


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i + 1}", 7946)


class Local:
    """A node's own ``Member``, changed by the test as the node's figures would change."""

    def __init__(self, i: int) -> None:
        self.member = Member(
            name=f"n{i}",
            url=f"http://{addr(i)[0]}:32768",
            state=MemberState.ALIVE,
            node_state=NodeState.READY,
            models=("m",),
            load=MemberLoad(0, 4, 0),
        )

    def __call__(self) -> Member:
        return self.member


async def start(
    nursery: trio.Nursery, network: MemoryNetwork, n: int
) -> tuple[list[Local], list[GossipMembership]]:
    locals_, views = [], []
    for i in range(n):
        local = Local(i)
        node = GossipNode(
            local.member.name,
            CONFIG,
            addr(i),
            gossip_meta(local.member),
            seeds=[addr(0)] if i else [],
            transport=network.transport(addr(i)),
        )
        await nursery.start(node.run)
        view = GossipMembership(local, node)
        await nursery.start(view.run)
        locals_.append(local)
        views.append(view)
    return locals_, views


def usage_of(view: GossipMembership, name: str) -> tuple[Usage, ...] | None:
    return next((m.usage for m in view.members() if m.name == name), None)


async def test_usage_given_with_the_local_member_reaches_every_peers_view(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork(nursery, seed=4, delay=0.002)
    locals_, views = await start(nursery, network, 3)
    with trio.fail_after(30):
        while not all(len(v.members()) == 3 for v in views):
            await trio.sleep(0.1)
    assert all(m.usage == () for v in views for m in v.members())
    usage = (Usage("team-a", 28_333_333, 7, 1_200, 1),)
    locals_[0].member = replace(locals_[0].member, usage=usage)  # only usage changes
    with trio.fail_after(2):
        while not all(usage_of(v, "n0") == usage for v in views):
            await trio.sleep(0.05)
    later = (Usage("team-a", 28_333_333, 9, 1_500, 0), Usage("team-b", 28_333_333, 1, 3, 1))
    locals_[0].member = replace(locals_[0].member, usage=later)
    with trio.fail_after(2):
        while not all(usage_of(v, "n0") == later for v in views):
            await trio.sleep(0.05)
    assert all(usage_of(v, "n1") == () for v in views)
    nursery.cancel_scope.cancel()


def test_a_static_member_has_no_usage() -> None:
    member = Member("p", "http://p", MemberState.ALIVE, NodeState.READY, ())
    assert member.usage == ()


async def test_a_nudge_publishes_before_the_next_interval(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork(nursery, seed=5, delay=0.002)
    locals_, views = await start(nursery, network, 2)
    with trio.fail_after(30):
        while not all(len(v.members()) == 2 for v in views):
            await trio.sleep(0.1)
    await trio.sleep(1.0)  # the publish after the member count changed is done
    published: list[float] = []
    gossip = views[0].gossip
    set_load = gossip.set_load

    def recording(load: object, *, resend: bool = False) -> None:
        published.append(trio.current_time())
        set_load(load, resend=resend)  # type: ignore[arg-type]

    gossip.set_load = recording  # type: ignore[method-assign]
    await trio.sleep(1.0)  # nothing changes: nothing is published
    assert published == []
    usage = (Usage("team-a", 28_333_333, 1, 0, 1),)
    locals_[0].member = replace(locals_[0].member, usage=usage)
    start_at = trio.current_time()
    for _ in range(5):  # a burst of nudges: one publish
        views[0].nudge()
    await trio.sleep(0.05)
    assert len(published) == 1 and published[0] - start_at < 0.05  # not the 0.2 s interval
    nursery.cancel_scope.cancel()
