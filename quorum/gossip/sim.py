"""A deterministic network simulator for gossip cores, on virtual time.

:class:`Simulation` drives hundreds of :class:`~quorum.gossip.core.GossipCore` directly
through ``receive``/``tick``/``next_deadline`` with a discrete-event loop: no trio, no sleeps,
no sockets. Ten simulated minutes of a 200-node cluster take seconds. The network is seeded:
drop, delay (latency + jitter), duplication, partitions, killed and stalled nodes all come
from one ``random.Random``, so a failing seed replays exactly (the in-memory counterpart of
memberlist ``mock_transport.go``).

Push-pull exchanges, which the real runner carries over TCP, are modelled as reliable
round trips that fail when either side is killed, stalled or partitioned away.

Example::

    sim = Simulation(GossipConfig.lan(), seed=7)
    sim.bootstrap(10)
    sim.run_for(30.0)
    sim.kill("n3")
    sim.run_until(lambda: sim.all_see("n3", MemberState.DEAD), timeout=60.0)
"""

from __future__ import annotations

import copy
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import GossipConfig
from .core import GossipCore
from .events import MemberEvent, Output, PushPullRequest, Send
from .messages import Addr, MemberState, NodeMeta

__all__ = ["NetworkConditions", "SimNode", "Simulation", "TimedEvent"]

_TIMER, _DELIVER, _PUSH_PULL_REPLY, _STALL_START, _STALL_END, _CALL = range(6)


@dataclass(slots=True)
class NetworkConditions:
    """How the simulated network misbehaves. Times in seconds, probabilities in [0, 1].

    ``latency``: one-way base delay. ``jitter``: extra uniform delay in ``[0, jitter)``.
    ``loss``: chance a datagram is dropped. ``duplicate``: chance it is delivered twice.
    """

    latency: float = 0.0005
    jitter: float = 0.001
    loss: float = 0.0
    duplicate: float = 0.0


@dataclass(frozen=True, slots=True)
class TimedEvent:
    """A membership event seen by ``observer`` at virtual time ``time`` (seconds)."""

    time: float
    observer: str
    event: MemberEvent


@dataclass(slots=True)
class SimNode:
    """One simulated node: its core and its fate."""

    name: str
    addr: Addr
    core: GossipCore
    killed: bool = False
    stalled: bool = False
    inbox: list[tuple[int, Any]] = field(default_factory=list)
    timer_token: int = 0
    timer_at: float = float("inf")


class Simulation:
    """A virtual-time cluster of gossip cores on a seeded fake network.

    ``config``: every node's gossip config (plaintext keys are fastest; keys work too).
    ``seed``: seeds the network and every core. ``conditions``: loss, delay, duplication;
    may be changed between runs. ``record``: keep every membership event in :attr:`events`.
    """

    def __init__(
        self,
        config: GossipConfig,
        *,
        seed: int = 0,
        conditions: NetworkConditions | None = None,
        record: bool = True,
    ) -> None:
        self.config = config
        self.conditions = conditions or NetworkConditions()
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.events: list[TimedEvent] = []
        self.record = record
        self.listeners: list[Callable[[TimedEvent], None]] = []
        self._rng = random.Random(seed)
        self._by_addr: dict[Addr, SimNode] = {}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._groups: dict[str, int] = {}

    # --- building the cluster ----------------------------------------------------------------

    def add_node(
        self,
        name: str | None = None,
        *,
        seeds: list[Addr] | None = None,
        meta: NodeMeta | None = None,
        config: GossipConfig | None = None,
    ) -> SimNode:
        """Start a node now. ``seeds`` default to the first node's address. A name already
        in use replaces that node (a restart under the same name, at the same address)."""
        name = name or f"n{len(self.nodes)}"
        old = self.nodes.get(name)
        if old is not None:
            old.killed = True
            addr = old.addr
        else:
            addr = (f"10.0.{len(self.nodes) // 250}.{len(self.nodes) % 250 + 1}", 7946)
        if seeds is None:
            first = next(iter(self.nodes.values()), None)
            seeds = [first.addr] if first is not None and first.name != name else []
        core = GossipCore(
            name,
            addr,
            meta or NodeMeta(http_url=f"http://{addr[0]}:32768", models=("m",), state="ready"),
            config or self.config,
            rng=random.Random(self._rng.getrandbits(64)),
            now=self.now,
            seeds=seeds,
        )
        node = SimNode(name, addr, core)
        self.nodes[name] = node
        self._by_addr[addr] = node
        self._schedule_timer(node)
        return node

    def bootstrap(self, n: int, *, settle: float = 0.0) -> list[SimNode]:
        """Add ``n`` nodes that join through the first one, then run ``settle`` seconds."""
        nodes = [self.add_node() for _ in range(n)]
        if settle:
            self.run_for(settle)
        return nodes

    def fork(self, seed: int) -> Simulation:
        """An independent copy of the whole cluster whose randomness from now on comes from
        ``seed`` (warm a cluster up once, then measure it under many seeds)."""
        twin = copy.deepcopy(self)
        twin._rng = random.Random(seed)
        for node in twin.nodes.values():
            node.core._rng = random.Random(twin._rng.getrandbits(64))
        twin.events = []
        twin.listeners = []
        return twin

    # --- faults --------------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """Stop a node for good, like a ``kill -9``: it sends and answers nothing more."""
        self.nodes[name].killed = True

    def stall(self, name: str, duration: float, *, at: float | None = None) -> None:
        """Freeze a node (a long GC pause, a stopped VM) for ``duration`` seconds from ``at``
        (default now). Datagrams for it wait in its socket buffer; timers wait too."""
        start = self.now if at is None else at
        self._push(start, _STALL_START, name)
        self._push(start + duration, _STALL_END, name)

    def partition(self, *groups: list[str]) -> None:
        """Split the network: nodes in different groups cannot talk; nodes in no group form
        one more group."""
        self._groups = {}
        for index, group in enumerate(groups, start=1):
            for name in group:
                self._groups[name] = index

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        self._groups = {}

    def at(self, time: float, action: Callable[[], None]) -> None:
        """Run ``action`` at virtual ``time`` (e.g. to change load or meta mid-run)."""
        self._push(time, _CALL, action)

    # --- running ---------------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        """Advance virtual time by ``seconds``."""
        self._run(self.now + seconds, None)

    def run_until(
        self, predicate: Callable[[], bool], *, timeout: float, check_every: float = 0.05
    ) -> bool:
        """Advance until ``predicate()`` holds (checked every ``check_every`` seconds) or
        ``timeout`` seconds pass. Returns whether it held."""
        end = self.now + timeout
        while self.now < end:
            if predicate():
                return True
            self._run(min(end, self.now + check_every), None)
        return predicate()

    def _run(self, end: float, _unused: None) -> None:
        heap = self._heap
        while heap and heap[0][0] <= end:
            time, _, kind, payload = heapq.heappop(heap)
            self.now = time
            if kind == _TIMER:
                node, token = payload
                if node.timer_token != token or node.killed:
                    continue
                node.timer_at = float("inf")
                if node.stalled:
                    continue  # the stall's end ticks it
                self._apply(node, node.core.tick(time))
            elif kind == _DELIVER:
                node, src, data = payload
                if node.killed:
                    continue
                if node.stalled:
                    node.inbox.append((_DELIVER, (src, data)))
                    continue
                self._apply(node, node.core.receive(time, src, data))
            elif kind == _PUSH_PULL_REPLY:
                node, src, data = payload
                if node.killed:
                    continue
                if node.stalled:
                    node.inbox.append((_PUSH_PULL_REPLY, (src, data)))
                    continue
                self._apply(node, node.core.receive_push_pull(time, src, data))
            elif kind == _STALL_START:
                self.nodes[payload].stalled = True
            elif kind == _STALL_END:
                self._unstall(self.nodes[payload])
            else:
                payload()
        self.now = end

    def _unstall(self, node: SimNode) -> None:
        node.stalled = False
        if node.killed:
            return
        backlog, node.inbox = node.inbox, []
        for kind, (src, data) in backlog:
            if kind == _DELIVER:
                self._apply(node, node.core.receive(self.now, src, data))
            else:
                self._apply(node, node.core.receive_push_pull(self.now, src, data))
        self._apply(node, node.core.tick(self.now))

    # --- the network -----------------------------------------------------------------------------

    def _push(self, time: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, self._seq, kind, payload))

    def _schedule_timer(self, node: SimNode) -> None:
        deadline = max(node.core.next_deadline(), self.now)
        if deadline < node.timer_at:
            node.timer_token += 1
            node.timer_at = deadline
            self._push(deadline, _TIMER, (node, node.timer_token))

    def _connected(self, a: str, b: str) -> bool:
        return self._groups.get(a, 0) == self._groups.get(b, 0)

    def _delay(self) -> float:
        return self.conditions.latency + self._rng.random() * self.conditions.jitter

    def _apply(self, node: SimNode, outputs: list[Output]) -> None:
        cond = self.conditions
        for out in outputs:
            if isinstance(out, Send):
                dest = self._by_addr.get(out.addr)
                if dest is None or not self._connected(node.name, dest.name):
                    continue
                if cond.loss and self._rng.random() < cond.loss:
                    continue
                self._push(self.now + self._delay(), _DELIVER, (dest, node.addr, out.data))
                if cond.duplicate and self._rng.random() < cond.duplicate:
                    self._push(self.now + self._delay(), _DELIVER, (dest, node.addr, out.data))
            elif isinstance(out, PushPullRequest):
                self._push_pull(node, out)
            else:
                timed = TimedEvent(self.now, node.name, out)
                if self.record:
                    self.events.append(timed)
                for listener in self.listeners:
                    listener(timed)
        self._schedule_timer(node)

    def _push_pull(self, client: SimNode, request: PushPullRequest) -> None:
        server = self._by_addr.get(request.addr)
        if (
            server is None
            or server.killed
            or server.stalled
            or not self._connected(client.name, server.name)
        ):
            return
        payload = client.core.push_pull_payload(request.join, self.now)
        answer, outputs = server.core.answer_push_pull(self.now, client.addr, payload)
        self._apply(server, outputs)
        if answer is not None:
            rtt = self._delay() + self._delay()
            self._push(self.now + rtt, _PUSH_PULL_REPLY, (client, server.addr, answer))

    # --- looking at the cluster ------------------------------------------------------------------

    def running(self) -> list[SimNode]:
        """Nodes not killed."""
        return [n for n in self.nodes.values() if not n.killed]

    def view(self, observer: str, name: str) -> MemberState | None:
        """What ``observer`` believes about ``name`` (None: no record)."""
        info = self.nodes[observer].core.member(name)
        return None if info is None else info.state

    def all_see(self, name: str, state: MemberState, *, exclude: tuple[str, ...] = ()) -> bool:
        """Whether every running node other than ``name`` holds ``name`` in ``state``."""
        return all(
            self.view(n.name, name) is state
            for n in self.running()
            if n.name != name and n.name not in exclude
        )

    def converged(self) -> bool:
        """Whether every running node sees every running node alive."""
        names = [n.name for n in self.running()]
        for node in self.running():
            for name in names:
                if self.view(node.name, name) is not MemberState.ALIVE:
                    return False
        return True
