"""The sans-IO SWIM + Lifeguard membership state machine.

Like h11's ``Connection``, :class:`GossipCore` does no I/O and reads no clock: the caller
gives it datagrams and the current time, and it answers with :mod:`~quorum.gossip.events`
(datagrams to send, push-pulls to run, membership events)::

    core = GossipCore("a", ("10.0.0.1", 7946), meta, GossipConfig.lan(), rng=random.Random(),
                      now=clock())
    outputs = core.receive(clock(), addr, datagram)   # a datagram arrived
    outputs = core.tick(clock())                      # timers are due
    sleep_until(core.next_deadline())                 # ... or until the next datagram

Protocol (SWIM, Das et al. 2002; Lifeguard, Dadgar et al. 2018; memberlist ``state.go``):

* Failure detection: every (scaled) probe interval, ping the next member of a shuffled
  round-robin list. No ack within the (scaled) probe timeout: ask ``indirect_checks`` random
  members to ping it for us (ping-req), and they answer with an ack or, Lifeguard, a nack.
  No ack by the end of the round: suspect it. A suspicion becomes a death when its timer,
  shortened by independent confirmations, runs out, unless the member refutes by raising its
  incarnation. A ping to a suspect carries the suspicion (Lifeguard's buddy system), so the
  member hears of it at once.
* Local health: missed nacks, failed probes and refutations raise a 0..(max-1) health score;
  good probes lower it; the probe interval and timeout scale by ``score + 1``.
* Dissemination: updates ride on every ping, ping-req, ack and nack, and on gossip datagrams
  sent every ``gossip_interval`` to ``gossip_nodes`` random members, least-sent first, each
  sent ``retransmit_mult x ceil(log10(N + 1))`` times.
* Anti-entropy: a full-state push-pull with a random member every ``push_pull_interval``
  (the runner carries it over TCP), and with the seeds while no other member is alive.

* Freshness: every packet is sealed with a header (our name, our epoch, the time since it
  began); a receiver drops packets that are too old or from a previous life of their sender
  (:mod:`quorum.gossip.freshness`).

The member-state rules live in :mod:`quorum.gossip.state`; this module carries them out.
Nothing a peer sends can raise out of :meth:`receive`: bad packets are counted in
:attr:`GossipCore.counters` and dropped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import codec
from .broadcast import BroadcastQueue
from .codec import DecodeError
from .config import GossipConfig
from .events import (
    MemberDied,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
    MemberUpdated,
    Output,
    PushPullRequest,
    Send,
)
from .freshness import Freshness, FreshnessVerdict
from .keyring import Keyring, OpenError
from .lifeguard import Awareness, Suspicion
from .messages import (
    MAX_EPOCH,
    MAX_INCARNATION,
    MAX_LOAD_VERSION,
    Ack,
    Addr,
    Alive,
    Compound,
    Dead,
    Header,
    Left,
    Load,
    LoadUpdate,
    MemberInfo,
    MemberState,
    Message,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    check_host,
    check_name,
)
from .state import (
    Member,
    Verdict,
    judge_alive,
    judge_dead,
    judge_left,
    judge_load,
    judge_suspect,
    refuting_incarnation,
)

__all__ = ["COUNTERS", "GossipCore", "check_meta"]

COUNTERS = (
    "received",
    "sent",
    "bytes_received",
    "bytes_sent",
    "accepted",
    "dropped_oversize",
    "dropped_decrypt",
    "dropped_decode",
    "dropped_incarnation",
    "dropped_stale",
    "dropped_replay",
    "dropped_push_pull",
    "ping_wrong_target",
    "ack_unexpected",
    "forwards_dropped",
    "probes",
    "probe_failures",
    "suspicions",
    "deaths_declared",
    "refutes",
    "incarnation_capped",
    "load_version_capped",
    "reminders",
    "conflicts",
    "members_refused",
    "push_pulls",
)
"""Every key of :attr:`GossipCore.counters` (all present from the start, at 0). Every
datagram is ``received`` and then exactly one of ``accepted``, ``dropped_oversize``,
``dropped_decrypt``, ``dropped_decode``, ``dropped_incarnation`` (an incarnation or load
version above the cap, :data:`~quorum.gossip.messages.MAX_INCARNATION`), ``dropped_stale``
(older than ``config.freshness_window``), ``dropped_replay`` (from a previous life of its
sender, or our own packet sent back; see :mod:`quorum.gossip.freshness`).
``incarnation_capped``/``load_version_capped``: times our own counter could not be raised
because it sits at the cap. ``members_refused``: alive messages about a new member dropped
because the member table already holds ``config.max_push_pull_members`` records."""

_MAX_FORWARDS = 1024
"""Pending ping-req forwards we keep; more are refused (a flood cannot grow memory)."""
_COMPOUND_SLACK = 5
"""Bytes a compound header may need (``codec.compound_overhead`` of up to 65535 parts)."""
_GONE = (MemberState.DEAD, MemberState.LEFT)
_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)
_INF = math.inf


def check_meta(meta: NodeMeta, config: GossipConfig) -> None:
    """Raise ``ValueError`` when ``meta`` encodes to more than ``config.max_meta_size``
    bytes (it must fit in one alive datagram)."""
    size = len(codec.encode_meta(meta))
    if size > config.max_meta_size:
        raise ValueError(
            f"encoded NodeMeta is {size} bytes, over max_meta_size={config.max_meta_size}"
        )


@dataclass(slots=True)
class _Probe:
    """The probe round in progress (at most one)."""

    seq: int
    target: str
    addr: Addr
    timeout_at: float
    round_end: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Forward:
    """A ping we send on behalf of a ping-req's requester."""

    requester: Addr
    seq: int
    nack_at: float
    expires: float


class GossipCore:
    """SWIM membership of one node, without I/O.

    ``name``: this node's unique name (1..128 printable characters). ``addr``: the address
    peers reach it at (UDP, and TCP on the same port; the host an IP literal). ``meta``: what
    it tells the cluster about itself. ``config``: timings and limits. ``rng``: the only
    source of randomness (seed it in tests). ``now``: the current time in seconds on any
    monotonic clock; every later call must pass a time on the same clock. ``seeds``:
    addresses to push-pull with while no other member is alive (join, and rejoin after a long
    partition). ``load``: initial load figures. ``epoch``: this life of the node, sealed
    into every packet with the time since ``now`` (see :mod:`quorum.gossip.freshness`); each
    start of a node must use a higher one than the last. Default: ``now`` in nanoseconds,
    which does when every life shares one clock (the simulator); a process, whose monotonic
    clock restarts with it, passes the wall clock (``time.time_ns()``), as the runner does.
    Raises ``ValueError`` for a bad name or host, or when the encoded meta exceeds
    ``config.max_meta_size``.
    """

    def __init__(
        self,
        name: str,
        addr: Addr,
        meta: NodeMeta,
        config: GossipConfig,
        *,
        rng: random.Random,
        now: float,
        seeds: Sequence[Addr] = (),
        load: Load | None = None,
        epoch: int | None = None,
    ) -> None:
        check_name(name)
        check_host(addr[0])
        check_meta(meta, config)
        self.name = name
        self.config = config
        self._rng = rng
        self._now = now
        self._keyring = Keyring(config.keys)
        self._label = config.cluster_name.encode()
        self._budget = (
            config.max_datagram
            - self._keyring.overhead(self._label)
            - codec.envelope_overhead(name)
            - _COMPOUND_SLACK
        )
        self._epoch = epoch if epoch is not None else min(MAX_EPOCH, max(0, int(now * 1e9)))
        if not 0 <= self._epoch <= MAX_EPOCH:
            raise ValueError(f"epoch must be in [0, {MAX_EPOCH}]")
        self._born = now
        self._freshness = Freshness(
            name,
            window=config.freshness_window,
            retention=config.freshness_retention,
            max_senders=config.max_push_pull_members,
        )
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        """Running totals, see :data:`COUNTERS`."""

        self._self = Member(name, addr, MemberState.ALIVE, 1, meta, now)
        if load is not None:
            self._self.load, self._self.load_version = load, 1
        self._members: dict[str, Member] = {name: self._self}
        self._live = 1  # members alive or suspect, ourselves included
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._queue = BroadcastQueue()
        self._suspicions: dict[str, Suspicion] = {}
        self._forwards: dict[int, _Forward] = {}
        self._seq = rng.randrange(2**32)

        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._probe_pos = 0
        # Stagger the first rounds so that nodes started together do not run in lockstep.
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._next_push_pull = (
            now + config.push_pull_interval * (0.5 + rng.random())
            if config.push_pull_interval > 0
            else _INF
        )
        self._seeds = [s for s in seeds if s != addr]
        self._join_backoff = config.join_retry_interval
        self._next_join = now if self._seeds else _INF
        self._leaving = False
        self._out: list[Output] = []

        self._announce()
        if load is not None:
            self._queue_load(self._self)

    # --- the h11-style API ----------------------------------------------------------------

    def receive(self, now: float, addr: Addr, data: bytes) -> list[Output]:
        """Handle one datagram from ``addr`` received at ``now``. Returns what to do.

        Never raises for anything in ``data``: oversized, undecryptable and undecodable
        datagrams are counted (``dropped_oversize``, ``dropped_decrypt``,
        ``dropped_decode``) and dropped.
        """
        self._advance(now)
        self.counters["received"] += 1
        self.counters["bytes_received"] += len(data)
        msg = self._open(now, data, max_size=self.config.max_datagram, max_members=0)
        if msg is None:
            return self._flush()
        if isinstance(msg, PushPull):  # full state travels over TCP only
            self.counters["dropped_decode"] += 1
            return self._flush()
        self.counters["accepted"] += 1
        for part in msg.parts if isinstance(msg, Compound) else (msg,):
            self._handle(part, addr)
        return self._flush()

    def tick(self, now: float) -> list[Output]:
        """Run every timer due at ``now``: probe rounds, ping-req forwards, suspicion
        timeouts, gossip, push-pull, join retries. Returns what to do."""
        self._advance(now)
        self._tick_probe(now)
        self._tick_forwards(now)
        self._tick_suspicions(now)
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval
            self._gossip()
        if not self._leaving:
            self._tick_push_pull(now)
            self._tick_join(now)
        return self._flush()

    def next_deadline(self) -> float:
        """The time at which :meth:`tick` next has work; call it then, or earlier."""
        deadline = self._next_gossip
        if not self._leaving:
            deadline = min(deadline, self._next_probe, self._next_push_pull, self._next_join)
        probe = self._probe
        if probe is not None:
            deadline = min(deadline, probe.round_end)
            if not probe.indirect_sent:
                deadline = min(deadline, probe.timeout_at)
        for fwd in self._forwards.values():
            deadline = min(deadline, fwd.nack_at, fwd.expires)
        for suspicion in self._suspicions.values():
            deadline = min(deadline, suspicion.deadline)
        return deadline

    # --- push-pull (the runner carries these bytes over TCP) -------------------------------

    def push_pull_payload(self, join: bool, now: float | None = None) -> bytes:
        """Our full state, sealed: the request (or the answer) of a push-pull. ``now``: the
        time to seal it at (default: the latest time given to the core)."""
        if now is not None:
            self._advance(now)
        members = tuple(m.info() for m in self._members.values())
        return self._seal(codec.encode(PushPull(source=self.name, join=join, members=members)))

    def answer_push_pull(
        self, now: float, addr: Addr, data: bytes
    ) -> tuple[bytes | None, list[Output]]:
        """Server side of a push-pull: ``data`` is the peer's sealed state. Returns our state
        to send back (taken before merging theirs, or None if theirs was refused) and the
        outputs of the merge. A refused push-pull is counted in ``dropped_push_pull``."""
        self._advance(now)
        remote = self._open_push_pull(now, data)
        if remote is None:
            return None, self._flush()
        answer = self.push_pull_payload(join=False)
        self._merge(remote)
        return answer, self._flush()

    def receive_push_pull(self, now: float, addr: Addr, data: bytes) -> list[Output]:
        """Client side of a push-pull: merge the peer's sealed state ``data``. A refused
        push-pull is counted in ``dropped_push_pull``."""
        self._advance(now)
        remote = self._open_push_pull(now, data)
        if remote is not None:
            self._merge(remote)
        return self._flush()

    # --- the local node ---------------------------------------------------------------------

    @property
    def addr(self) -> Addr:
        """Our gossip address."""
        return self._self.addr

    @property
    def incarnation(self) -> int:
        """Our incarnation number."""
        return self._self.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard's local health score, 0 (healthy) to ``awareness_max_multiplier - 1``."""
        return self._awareness.score

    @property
    def leaving(self) -> bool:
        """Whether :meth:`leave` was called."""
        return self._leaving

    def set_meta(self, meta: NodeMeta) -> None:
        """Publish new meta: raises our incarnation and queues an alive message.
        Raises ``ValueError`` when the encoded meta exceeds ``config.max_meta_size``."""
        check_meta(meta, self.config)
        if meta == self._self.meta:
            return
        if self._self.incarnation >= MAX_INCARNATION:
            # Nothing can outbid the cap (only forged messages push a node there): keep the
            # meta the cluster holds rather than disagree with it.
            self.counters["incarnation_capped"] += 1
            return
        self._self.meta = meta
        self._self.incarnation += 1
        self._announce()

    def set_load(self, load: Load, *, resend: bool = False) -> None:
        """Publish new load figures: a new load version, coalesced in the broadcast queue
        (only the newest load of a node waits there). Cheap; call it as often as needed.
        Any change counts, a change of ``load.usage`` alone too; an equal load is not
        published again, unless ``resend``: then it is queued again under its version,
        for members that joined after its retransmits were spent (they would otherwise
        learn it only at the next push-pull). The largest load fits one datagram
        (``GossipConfig`` checks)."""
        if load == self._self.load:
            if resend:
                self._queue_load(self._self)
            return
        self._self.load = load
        if self._self.load_version >= MAX_LOAD_VERSION:
            self.counters["load_version_capped"] += 1
        else:
            self._self.load_version += 1
        self._queue_load(self._self)

    def leave(self, now: float) -> list[Output]:
        """Start a graceful leave: queue ``Left`` about ourselves, stop probing, pushing and
        joining. Keep calling :meth:`tick` until :attr:`leave_done`."""
        self._advance(now)
        if not self._leaving:
            self._leaving = True
            self._probe = None
            self._set_state(self._self, MemberState.LEFT)
            self._queue.queue(
                ("m", self.name), codec.encode(Left(self.name, self._self.incarnation))
            )
            self._gossip()  # tell a few members at once
        return self._flush()

    @property
    def leave_done(self) -> bool:
        """True once our ``Left`` was sent its full number of times, or there is no one to
        tell."""
        if not self._leaving:
            return False
        return ("m", self.name) not in self._queue or not self._gossip_targets()

    # --- the membership view ------------------------------------------------------------------

    def members(self) -> list[MemberInfo]:
        """Every member we hold a record of, ourselves included, sorted by name."""
        return [self._members[n].info() for n in sorted(self._members)]

    def member(self, name: str) -> MemberInfo | None:
        """One member's record, or None."""
        m = self._members.get(name)
        return None if m is None else m.info()

    @property
    def num_live(self) -> int:
        """Members alive or suspect, ourselves included (the N of the formulas)."""
        return self._live

    def suspicion(self, name: str) -> Suspicion | None:
        """The running suspicion of ``name``, if any (for tests and diagnostics)."""
        return self._suspicions.get(name)

    # --- receiving ---------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if now > self._now:
            self._now = now

    def _open(self, now: float, data: bytes, *, max_size: int, max_members: int) -> Message | None:
        """Size, then seal, then envelope and message, then freshness: the first check that
        fails counts the packet under its ``dropped_*`` counter and returns None."""
        if len(data) > max_size:
            self.counters["dropped_oversize"] += 1
            return None
        try:
            payload = self._keyring.open(data, self._label)
        except OpenError:
            self.counters["dropped_decrypt"] += 1
            return None
        try:
            header, msg = codec.decode_packet(
                payload,
                max_size=max_size,
                max_members=max_members,
                max_meta_size=self.config.max_meta_size,
            )
        except DecodeError as exc:
            self.counters[exc.counter] += 1
            return None
        verdict = self._freshness.check(now, header)
        if verdict is FreshnessVerdict.STALE:
            self.counters["dropped_stale"] += 1
            return None
        if verdict is FreshnessVerdict.REPLAY:
            self.counters["dropped_replay"] += 1
            return None
        return msg

    def _open_push_pull(self, now: float, data: bytes) -> PushPull | None:
        self.counters["push_pulls"] += 1
        msg = self._open(
            now,
            data,
            max_size=self.config.max_push_pull_bytes,
            max_members=self.config.max_push_pull_members,
        )
        if isinstance(msg, PushPull):
            return msg
        if msg is not None:  # a datagram message where a push-pull belongs
            self.counters["dropped_decode"] += 1
        self.counters["dropped_push_pull"] += 1
        return None

    def _handle(self, msg: Message, addr: Addr) -> None:
        if isinstance(msg, Ping):
            self._on_ping(msg, addr)
        elif isinstance(msg, Ack):
            self._on_ack(msg)
        elif isinstance(msg, Nack):
            if self._probe is not None and msg.seq == self._probe.seq:
                self._probe.nacks += 1
        elif isinstance(msg, PingReq):
            self._on_ping_req(msg, addr)
        elif isinstance(msg, Alive):
            self._on_alive(msg)
        elif isinstance(msg, Suspect):
            self._on_suspect(msg)
        elif isinstance(msg, Dead):
            self._on_dead(msg)
        elif isinstance(msg, Left):
            self._on_left(msg)
        elif isinstance(msg, LoadUpdate):
            self._on_load(msg)
        else:  # a push-pull inside a compound
            self.counters["dropped_decode"] += 1

    def _on_ping(self, msg: Ping, addr: Addr) -> None:
        if msg.target != self.name:
            self.counters["ping_wrong_target"] += 1
            return
        self._send(addr, Ack(msg.seq))

    def _on_ack(self, msg: Ack) -> None:
        probe = self._probe
        if probe is not None and msg.seq == probe.seq:
            self._probe = None
            self._awareness.apply_delta(-1)
            return
        fwd = self._forwards.pop(msg.seq, None)
        if fwd is not None:
            self._send(fwd.requester, Ack(fwd.seq))
            return
        self.counters["ack_unexpected"] += 1

    def _on_ping_req(self, msg: PingReq, addr: Addr) -> None:
        if msg.target == self.name:
            self._send(addr, Ack(msg.seq))
            return
        if len(self._forwards) >= _MAX_FORWARDS:
            self.counters["forwards_dropped"] += 1
            return
        seq = self._next_seq()
        now = self._now
        self._forwards[seq] = _Forward(
            requester=addr,
            seq=msg.seq,
            nack_at=now + self.config.nack_timeout if msg.nack else _INF,
            expires=now + self.config.probe_interval,
        )
        self._send_ping(seq, msg.target, msg.target_addr)

    def _on_alive(self, msg: Alive) -> None:
        current = self._members.get(msg.node)
        verdict = judge_alive(current, msg, is_self=msg.node == self.name, leaving=self._leaving)
        if verdict is Verdict.REFUTE:
            if msg.addr != self._self.addr:
                self.counters["conflicts"] += 1
            self._refute(msg.incarnation)
            return
        if verdict is Verdict.CONFLICT:
            self.counters["conflicts"] += 1
            return
        if verdict is not Verdict.APPLY:
            return
        event: Output | None
        if current is None:
            if len(self._members) >= self.config.max_push_pull_members:
                self.counters["members_refused"] += 1  # a flood of names cannot grow memory
                return
            current = Member(
                msg.node, msg.addr, MemberState.ALIVE, msg.incarnation, msg.meta, self._now
            )
            self._members[msg.node] = current
            self._live += 1
            # A newcomer goes to a random place in the probe order (memberlist does the same).
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), msg.node)
            event = MemberJoined(current.info())
        else:
            was = current.state
            changed = (
                was is not MemberState.ALIVE or current.meta != msg.meta or current.addr != msg.addr
            )
            current.addr, current.meta, current.incarnation = msg.addr, msg.meta, msg.incarnation
            self._set_state(current, MemberState.ALIVE)
            if was in _GONE:
                event = MemberJoined(current.info())
            elif changed:
                event = MemberUpdated(current.info())
            else:
                event = None
        self._queue.queue(("m", msg.node), codec.encode(msg), useless_to=msg.node)
        if event is not None:
            self._out.append(event)

    def _on_suspect(self, msg: Suspect) -> None:
        current = self._members.get(msg.node)
        verdict = judge_suspect(current, msg, is_self=msg.node == self.name, leaving=self._leaving)
        if verdict is Verdict.REFUTE:
            self._refute(msg.incarnation)
        elif verdict is Verdict.REMIND:
            self._remind(msg.source)
        elif verdict is Verdict.CONFIRM:
            assert current is not None
            current.incarnation = max(current.incarnation, msg.incarnation)
            suspicion = self._suspicions.get(msg.node)
            if suspicion is not None and suspicion.confirm(msg.source):
                self._queue.queue(("m", msg.node), codec.encode(msg))
        elif verdict is Verdict.APPLY:
            assert current is not None
            current.incarnation = msg.incarnation
            self._set_state(current, MemberState.SUSPECT)
            n = self._live
            k = self.config.suspicion_mult - 2
            if n - 2 < k:
                k = 0
            min_timeout = self.config.suspicion_min_timeout(n)
            max_timeout = self.config.suspicion_max_timeout_mult * min_timeout
            self._suspicions[msg.node] = Suspicion(
                self._now, msg.source, k, min_timeout, max_timeout
            )
            self.counters["suspicions"] += 1
            self._queue.queue(("m", msg.node), codec.encode(msg))
            self._out.append(MemberSuspected(current.info()))

    def _on_dead(self, msg: Dead) -> None:
        current = self._members.get(msg.node)
        verdict = judge_dead(current, msg, is_self=msg.node == self.name, leaving=self._leaving)
        if verdict is Verdict.REFUTE:
            self._refute(msg.incarnation)
        elif verdict is Verdict.REMIND:
            self._remind(msg.source)
        elif verdict is Verdict.APPLY:
            assert current is not None
            current.incarnation = msg.incarnation
            self._set_state(current, MemberState.DEAD)
            self._queue.queue(("m", msg.node), codec.encode(msg))
            self._out.append(MemberDied(current.info()))

    def _on_left(self, msg: Left) -> None:
        current = self._members.get(msg.node)
        verdict = judge_left(current, msg, is_self=msg.node == self.name, leaving=self._leaving)
        if verdict is Verdict.REFUTE:
            self._refute(msg.incarnation)
        elif verdict is Verdict.APPLY:
            assert current is not None
            current.incarnation = msg.incarnation
            self._set_state(current, MemberState.LEFT)
            self._queue.queue(("m", msg.node), codec.encode(msg))
            self._out.append(MemberLeft(current.info()))

    def _on_load(self, msg: LoadUpdate) -> None:
        current = self._members.get(msg.node)
        verdict = judge_load(current, msg.version, msg.load, is_self=msg.node == self.name)
        if verdict is Verdict.REFUTE:  # an older run of ours published higher versions
            if msg.version >= MAX_LOAD_VERSION:
                self.counters["load_version_capped"] += 1
            self._self.load_version = min(msg.version + 1, MAX_LOAD_VERSION)
            if self._self.load is not None:
                self._queue_load(self._self)
        elif verdict is Verdict.APPLY:
            assert current is not None
            current.load, current.load_version = msg.load, msg.version
            self._queue.queue(("l", msg.node), codec.encode(msg))

    def _merge(self, remote: PushPull) -> None:
        """Merge a peer's full state (memberlist ``mergeState``). A member the peer holds
        dead is only suspected here: we give it the chance to refute."""
        for m in remote.members:
            if m.state is MemberState.ALIVE:
                self._on_alive(Alive(m.name, m.incarnation, m.addr, m.meta))
            elif m.state is MemberState.LEFT:
                self._on_left(Left(m.name, m.incarnation))
            else:
                self._on_suspect(Suspect(m.name, m.incarnation, remote.source))
            if m.load is not None and m.load_version > 0:
                self._on_load(LoadUpdate(m.name, m.load_version, m.load))

    # --- changing state --------------------------------------------------------------------

    def _set_state(self, member: Member, state: MemberState) -> None:
        if member.state is not state:
            self._live += (state in _LIVE) - (member.state in _LIVE)
            member.state = state
            member.state_change = self._now
        if state is not MemberState.SUSPECT:
            self._suspicions.pop(member.name, None)

    def _refute(self, claimed: int) -> None:
        """Only we raise our incarnation: take one above the claim and say we are alive
        (Lifeguard: being suspected hints that we are slow, so our health score rises)."""
        own = self._self.incarnation
        self._self.incarnation = refuting_incarnation(own, claimed)
        if self._self.incarnation <= max(own, claimed):
            self.counters["incarnation_capped"] += 1
        self._awareness.apply_delta(1)
        self.counters["refutes"] += 1
        self._announce()

    def _remind(self, source: str) -> None:
        """``source`` holds an old suspicion (or death) of ours: it missed our refutation.
        Send it our current alive directly rather than wait for push-pull."""
        member = self._members.get(source)
        if member is None or member.name == self.name or member.state not in _LIVE:
            return
        me = self._self
        self.counters["reminders"] += 1
        self._send(member.addr, Alive(self.name, me.incarnation, me.addr, me.meta))

    def _announce(self) -> None:
        me = self._self
        self._queue.queue(
            ("m", self.name), codec.encode(Alive(self.name, me.incarnation, me.addr, me.meta))
        )

    def _queue_load(self, member: Member) -> None:
        assert member.load is not None
        msg = LoadUpdate(member.name, member.load_version, member.load)
        self._queue.queue(("l", member.name), codec.encode(msg), useless_to=member.name)

    # --- timers ----------------------------------------------------------------------------

    def _tick_probe(self, now: float) -> None:
        probe = self._probe
        if probe is not None:
            if not probe.indirect_sent and now >= probe.timeout_at:
                self._send_indirect_probes(probe)
            if now >= probe.round_end:
                self._probe = None
                self._probe_failed(probe)
        if self._leaving or now < self._next_probe:
            return
        interval = self._awareness.scale(self.config.probe_interval)
        self._next_probe = now + interval
        target = self._next_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(
            seq=seq,
            target=target.name,
            addr=target.addr,
            timeout_at=now + self._awareness.scale(self.config.probe_timeout),
            round_end=now + interval,
        )
        self.counters["probes"] += 1
        self._send_ping(seq, target.name, target.addr)

    def _send_ping(self, seq: int, target: str, addr: Addr) -> None:
        member = self._members.get(target)
        extra: tuple[Message, ...] = ()
        if member is not None and member.state is MemberState.SUSPECT:
            # Lifeguard's buddy system: tell a suspect at once that it is suspected.
            extra = (Suspect(target, member.incarnation, self.name),)
        self._send(addr, Ping(seq, target, self.name), extra)

    def _send_indirect_probes(self, probe: _Probe) -> None:
        probe.indirect_sent = True
        helpers = [
            m
            for m in self._members.values()
            if m.state is MemberState.ALIVE and m.name not in (self.name, probe.target)
        ]
        chosen = self._rng.sample(helpers, min(self.config.indirect_checks, len(helpers)))
        probe.expected_nacks = len(chosen)
        for helper in chosen:
            self._send(helper.addr, PingReq(probe.seq, probe.target, probe.addr, self.name, True))

    def _probe_failed(self, probe: _Probe) -> None:
        self.counters["probe_failures"] += 1
        # Lifeguard: with helpers, each nack we did not get counts against our own health;
        # without them, the failed probe itself does.
        if probe.expected_nacks > 0:
            self._awareness.apply_delta(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._awareness.apply_delta(1)
        member = self._members.get(probe.target)
        if member is None or member.state in _GONE or member.addr != probe.addr:
            return
        self._on_suspect(Suspect(member.name, member.incarnation, self.name))

    def _next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_pos < len(self._probe_order):
                name = self._probe_order[self._probe_pos]
                self._probe_pos += 1
                member = self._members.get(name)
                if member is not None and member.state in _LIVE and name != self.name:
                    return member
            self._reset_probe_order()
        return None

    def _reset_probe_order(self) -> None:
        """Start a new round-robin cycle: forget long-gone members, reshuffle the rest
        (memberlist ``resetNodes``)."""
        horizon = self._now - self.config.gossip_to_the_dead_time
        for name in [
            n for n, m in self._members.items() if m.state in _GONE and m.state_change < horizon
        ]:
            if name != self.name:
                del self._members[name]
        self._probe_order = [
            n for n, m in self._members.items() if m.state in _LIVE and n != self.name
        ]
        self._rng.shuffle(self._probe_order)
        self._probe_pos = 0

    def _tick_forwards(self, now: float) -> None:
        if not self._forwards:
            return
        for seq, fwd in list(self._forwards.items()):
            if now >= fwd.nack_at:
                fwd.nack_at = _INF
                self._send(fwd.requester, Nack(fwd.seq))
            if now >= fwd.expires:
                del self._forwards[seq]

    def _tick_suspicions(self, now: float) -> None:
        if not self._suspicions:
            return
        for name, suspicion in list(self._suspicions.items()):
            if now < suspicion.deadline:
                continue
            del self._suspicions[name]
            member = self._members.get(name)
            if member is not None and member.state is MemberState.SUSPECT:
                self.counters["deaths_declared"] += 1
                self._on_dead(Dead(name, member.incarnation, self.name))

    def _gossip_targets(self) -> list[Member]:
        horizon = self._now - self.config.gossip_to_the_dead_time
        return [
            m
            for m in self._members.values()
            if m.name != self.name and (m.state in _LIVE or m.state_change >= horizon)
        ]

    def _gossip(self) -> None:
        if not len(self._queue):
            return
        targets = self._gossip_targets()
        for member in self._rng.sample(targets, min(self.config.gossip_nodes, len(targets))):
            limit = self.config.retransmit_limit(self._live)
            parts = self._queue.take(self._budget, limit, target=member.name)
            if parts:
                self._emit(member.addr, parts)

    def _tick_push_pull(self, now: float) -> None:
        if now < self._next_push_pull:
            return
        self._next_push_pull = now + self.config.push_pull_every(self._live)
        peers = [
            m
            for m in self._members.values()
            if m.state is MemberState.ALIVE and m.name != self.name
        ]
        if peers:
            self._out.append(PushPullRequest(self._rng.choice(peers).addr, join=False))

    def _tick_join(self, now: float) -> None:
        if now < self._next_join:
            return
        if self._live > 1:  # somebody else is alive: we are in; look again later
            self._join_backoff = self.config.join_retry_interval
            self._next_join = now + self.config.join_retry_max
            return
        for seed in self._seeds:
            self._out.append(PushPullRequest(seed, join=True))
        self._next_join = now + self._join_backoff
        self._join_backoff = min(self._join_backoff * 2, self.config.join_retry_max)

    # --- sending -----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _send(self, addr: Addr, primary: Message, extra: Iterable[Message] = ()) -> None:
        """Send ``primary`` (and ``extra``) to ``addr`` with as many piggybacked updates as
        fit in the datagram."""
        parts = [codec.encode(primary)]
        parts.extend(codec.encode(m) for m in extra)
        budget = self._budget - sum(len(p) for p in parts)
        target = next((m.name for m in self._members.values() if m.addr == addr), None)
        limit = self.config.retransmit_limit(self._live)
        parts.extend(self._queue.take(budget, limit, target=target))
        self._emit(addr, parts)

    def _seal(self, message: bytes) -> bytes:
        """``message`` (encoded) in an envelope with our header, sealed."""
        sent_ms = max(0, round((self._now - self._born) * 1000))
        header = Header(self.name, self._epoch, sent_ms)
        return self._keyring.seal(codec.encode_envelope(header, message), self._label)

    def _emit(self, addr: Addr, parts: list[bytes]) -> None:
        packet = self._seal(parts[0] if len(parts) == 1 else codec.encode_compound(parts))
        self.counters["sent"] += 1
        self.counters["bytes_sent"] += len(packet)
        self._out.append(Send(addr, packet))

    def _flush(self) -> list[Output]:
        out, self._out = self._out, []
        return out
