"""Seeds by DNS name: the resolver, and runners that find their peers through a name that
resolves to nothing at first and to the peers later (a headless Service as pods start)."""

from __future__ import annotations

import dataclasses
import socket
import threading
from typing import Any

import pytest
import trio
import trio.testing

from quorum.gossip import GossipConfig, GossipNode, MemberState, NodeMeta
from quorum.gossip.memory import MemoryNetwork
from quorum.gossip.messages import Addr
from quorum.gossip.seeds import resolve_seed, system_resolver
from quorum.node import Node
from tests.conftest import node_config

KEY = b"k" * 32
SERVICE = "quorum-gossip.quorum.svc.cluster.local"
META = NodeMeta(http_url="http://127.0.0.1:32768", models=("m1",), state="ready")


class FakeDNS:
    """A resolver the test controls: ``name`` has no record (NXDOMAIN, as a headless Service
    without pods) until ``records`` is set, then resolves to those addresses. (A real A
    record has no port, the seed's applies; on one loopback address the nodes need their own
    ports, which the resolver interface can carry.) Records every lookup."""

    def __init__(self, name: str = SERVICE) -> None:
        self.name = name
        self.records: list[Addr] = []
        self.lookups: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[Addr]:
        with self._lock:  # runs in worker threads
            self.lookups.append((host, port))
            if host != self.name or not self.records:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return list(self.records)


class InMemoryDNS(FakeDNS):
    """:class:`FakeDNS` as an ``async`` resolver, awaited on the event loop: under trio's
    virtual clock a worker thread would race the clock (the clock jumps ahead while the
    thread runs, and the lookup times out)."""

    async def __call__(self, host: str, port: int) -> list[Addr]:  # type: ignore[override]
        return super().__call__(host, port)


def states(node: GossipNode) -> dict[str, MemberState]:
    return {m.name: m.state for m in node.members()}


# --- the system resolver and the deadline ------------------------------------------------


def test_system_resolver_gives_an_address_literal_back_without_a_lookup() -> None:
    assert system_resolver("10.1.2.3", 7946) == [("10.1.2.3", 7946)]
    assert system_resolver("::1", 7946) == [("::1", 7946)]


def test_system_resolver_reads_hosts_file_names() -> None:
    assert ("127.0.0.1", 7946) in system_resolver("localhost", 7946)


def test_system_resolver_returns_every_a_and_aaaa_record_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A headless Service answers with one record per pod; getaddrinfo may repeat each per
    socket type, and may list families that are not IP."""
    seen: list[tuple[Any, ...]] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        seen.append((host, port))
        v4, v6, unix = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
        dgram = socket.SOCK_DGRAM
        return [
            (v4, dgram, 17, "", ("10.0.0.5", port)),
            (v6, dgram, 17, "", ("fd00::6", port, 0, 0)),
            (v4, dgram, 17, "", ("10.0.0.7", port)),
            (v4, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
            (unix, dgram, 0, "", "/nowhere"),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert system_resolver(SERVICE, 7946) == [
        ("10.0.0.5", 7946),
        ("fd00::6", 7946),
        ("10.0.0.7", 7946),
    ]
    assert seen == [(SERVICE, 7946)]


def test_system_resolver_raises_oserror_for_a_name_without_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def getaddrinfo(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(OSError):
        system_resolver(SERVICE, 7946)


async def test_resolve_seed_runs_the_resolver_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def resolver(host: str, port: int) -> list[Addr]:
        threads.append(threading.get_ident())
        return [("10.0.0.5", port)]

    assert await resolve_seed(resolver, (SERVICE, 7946), within_s=5) == [("10.0.0.5", 7946)]
    assert threads and threads[0] != loop_thread


async def test_a_resolver_that_hangs_is_abandoned_with_a_timeout_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = threading.Event()

    def hangs(host: str, port: int) -> list[Addr]:
        release.wait(30)
        return [("10.0.0.5", port)]

    try:
        with pytest.raises(TimeoutError):
            await resolve_seed(hangs, (SERVICE, 7946), within_s=5)
    finally:
        release.set()


async def test_resolve_seed_awaits_an_async_resolver_on_the_loop_under_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dns = InMemoryDNS()
    dns.records = [("10.0.0.7", 7946)]
    assert await resolve_seed(dns, (SERVICE, 7946), within_s=5) == [("10.0.0.7", 7946)]
    with pytest.raises(OSError):
        await resolve_seed(dns, ("other.example", 7946), within_s=5)

    async def stalls(host: str, port: int) -> list[Addr]:
        await trio.sleep_forever()
        raise AssertionError

    start = trio.current_time()
    with pytest.raises(TimeoutError):
        await resolve_seed(stalls, (SERVICE, 7946), within_s=5)
    assert trio.current_time() - start == pytest.approx(5)


# --- runners joining through a name ------------------------------------------------------


async def test_runner_resolves_the_seed_again_on_each_join_attempt_until_peers_appear(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """In-memory network, virtual time: a and b are up, c starts with a seed name that has no
    record yet; once DNS lists the pods (c's own address among them), c joins them."""
    network = MemoryNetwork(nursery, seed=5, delay=0.002)
    config = GossipConfig.lan(cluster_name="test", keys=(KEY,))
    addrs = {name: (f"10.0.0.{i + 1}", 7946) for i, name in enumerate("abc")}
    dns = InMemoryDNS()
    seeds: dict[str, list[Addr]] = {"a": [], "b": [addrs["a"]], "c": [(SERVICE, 7946)]}
    transports = {name: network.transport(addrs[name]) for name in "abc"}
    exchanged: list[Addr] = []  # where c opened push-pulls
    c_exchange = transports["c"].exchange

    async def recording_exchange(addr: Addr, request: bytes) -> bytes:
        exchanged.append(addr)
        return await c_exchange(addr, request)

    transports["c"].exchange = recording_exchange  # type: ignore[method-assign]
    nodes = {
        name: GossipNode(
            name,
            config,
            addrs[name],
            META,
            seeds=seeds[name],
            transport=transports[name],
            resolver=dns if name == "c" else None,
        )
        for name in "abc"
    }
    for node in nodes.values():
        await nursery.start(node.run)
    a, c = nodes["a"], nodes["c"]

    with trio.fail_after(60):
        while len(dns.lookups) < 3:  # retried with backoff while the name has no record
            await trio.sleep(0.1)
    assert set(dns.lookups) == {(SERVICE, 7946)}
    assert c.counters["seed_resolve_failed"] == len(dns.lookups)
    assert set(states(c)) == {"c"} and exchanged == []

    dns.records = list(addrs.values())  # every pod, c's own address too
    with trio.fail_after(60):
        while not all(len(states(n)) == 3 for n in nodes.values()):
            await trio.sleep(0.1)
    assert states(a)["c"] is MemberState.ALIVE and states(c)["a"] is MemberState.ALIVE
    assert addrs["c"] not in exchanged  # never a push-pull with itself
    assert {addrs["a"], addrs["b"]} <= set(exchanged)  # every other address found is tried
    assert c.counters["push_pull_failed"] == 0


async def test_three_nodes_on_loopback_find_each_other_through_a_dns_name() -> None:
    """Real sockets on 127.0.0.1 port 0: every node has only the Service name as its seed.
    The name resolves to nothing until all three are bound, then to all three."""
    dns = FakeDNS()
    config = GossipConfig.local(cluster_name="quorum", keys=(KEY,))
    nodes = [
        GossipNode(name, config, ("127.0.0.1", 0), META, seeds=[(SERVICE, 7946)], resolver=dns)
        for name in "abc"
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = [await nursery.start(n.run) for n in nodes]
            while not all(n.counters["seed_resolve_failed"] for n in nodes):
                await trio.sleep(0.02)
            assert all(set(states(n)) == {n.name} for n in nodes)
            dns.records = bound
            while not all(len(states(n)) == 3 for n in nodes):
                await trio.sleep(0.02)
            assert all(
                m.state is MemberState.ALIVE and m.addr in bound for n in nodes for m in n.members()
            )
            nursery.cancel_scope.cancel()


async def test_a_node_with_a_host_name_seed_joins_its_peer(nursery: trio.Nursery) -> None:
    """``quorum.node.Node`` hands the seed's name to the runner, which resolves it
    (``localhost`` through /etc/hosts, no DNS traffic)."""
    first = Node(node_config("node-a"))
    await nursery.start(first.run)
    assert first.gossip is not None and first.gossip.address is not None
    port = first.gossip.address[1]
    config = node_config("node-b")
    assert config.gossip is not None
    config = dataclasses.replace(
        config, gossip=dataclasses.replace(config.gossip, seeds=(("localhost", port),))
    )
    second = Node(config)
    await nursery.start(second.run)
    with trio.fail_after(10):
        while {m.name for m in first.membership.members()} != {"node-a", "node-b"}:
            await trio.sleep(0.02)
    first.stop()
    second.stop()


async def test_nodes_started_before_their_service_has_records_join_once_it_has(
    nursery: trio.Nursery,
) -> None:
    """Two ``Node``s whose only seed is the Service name, started while it resolves to
    nothing (pods not yet listed): they join once DNS lists them both."""
    dns = FakeDNS()
    nodes = []
    for name in ("node-a", "node-b"):
        config = node_config(name)
        assert config.gossip is not None
        gossip = dataclasses.replace(config.gossip, seeds=((SERVICE, 7946),))
        node = Node(dataclasses.replace(config, gossip=gossip), resolver=dns)
        await nursery.start(node.run)
        nodes.append(node)
    with trio.fail_after(10):
        while not all(n.gossip and n.gossip.counters["seed_resolve_failed"] for n in nodes):
            await trio.sleep(0.02)
        assert all(len(n.membership.members()) == 1 for n in nodes)
        dns.records = [n.gossip.address for n in nodes if n.gossip and n.gossip.address]
        while not all(len(n.membership.members()) == 2 for n in nodes):
            await trio.sleep(0.02)
    for node in nodes:
        node.stop()
