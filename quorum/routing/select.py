"""Which node serves a request: filter → score → pick, with no I/O, clock or global randomness.

``Selector.order`` turns the membership view into the list of nodes to try, the chosen node
first and the others best-first after it (the caller fails over down the list).

Filter
    The node serves the model, is "alive" and "ready" (not warming or draining), its circuit
    breaker (``quorum.routing.breaker``) would let a request through, and it has not been
    tried for this request yet. ``x-quorum-pin`` makes the pinned node the only candidate (it
    must serve the model and be routable); a forwarded request may only be served here.

Score
    ``(in_flight + QUEUE_WEIGHT * queue_depth) / capacity`` per node, from its gossiped
    ``MemberLoad``, where ``capacity = free_slots + in_flight`` as gossiped (at least 1):
    ``in_flight`` is what the node's backends are serving, so the sum is their slots. The
    ``in_flight`` of the numerator is corrected by this node's own outstanding requests to
    it: gossip lags, and a node we just sent ten requests to must not look idle, so
    ``in_flight = max(gossiped, own)``. Lower is better.

Pick
    Power of two choices (Michael Mitzenmacher, "The Power of Two Choices in Randomized Load
    Balancing", IEEE TPDS 12(10), 2001): sample two distinct candidates, keep the lower score.
    The local node wins a tie or near-tie (within ``LOCAL_MARGIN``): it saves a hop.

Prefix affinity
    Requests that share a conversation prefix (``prefix_key``) go to the same node, so its
    backend's prefix (KV) cache is reused. Candidates are ranked by rendezvous, or
    highest-random-weight, hashing of (key, node name) (David Thaler and Chinya Ravishankar,
    "Using Name-Based Mappings to Increase Hit Rates", IEEE/ACM ToN 6(1), 1998): removing a
    node remaps only the keys that lived on it. The top node takes the request unless it is
    over the bounded-load cap (Vahab Mirrokni, Mikkel Thorup and Morteza Zadimoghaddam,
    "Consistent Hashing with Bounded Loads", SODA 2018); then the walk goes down the
    rendezvous order to the first node under the cap, and only if none is under it does the
    pick fall back to power of two choices.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field

from quorum.errors import InvalidRequest, ModelNotFound, Unavailable
from quorum.routing.breaker import BreakerBoard
from quorum.routing.membership import Member, MemberState
from quorum.wire import ChatRequest, CompletionRequest

__all__ = [
    "DEFAULT_POLICY",
    "LOCAL_MARGIN",
    "QUEUE_WEIGHT",
    "RoutingPolicy",
    "Selector",
    "prefix_key",
    "rendezvous_order",
]

QUEUE_WEIGHT = 4.0
"""How much more a queued request weighs in a score than a running one: a queued request
waits for a slot to free up before its first token, a running one only shares the batch."""

LOCAL_MARGIN = 0.1
"""In a power-of-two comparison the local node wins when its score is at most this much
above the other's (score units: requests per slot of capacity)."""

_PREFIX_ROLES = frozenset({"system", "developer"})
_NO_OWN: Mapping[str, int] = MappingProxyType({})


class RoutingPolicy(BaseModel):
    """The routing knobs, typed (pydantic, strict).

    ``affinity``: send requests with the same conversation prefix to the same node (prefix
    cache reuse), within the bounded-load cap. ``load_factor``: the cap, as a multiple of the
    mean load over the candidates (float ≥ 1; 1.25 lets a node take 25% over the mean before
    affinity spills to the next node). ``affinity_prefix_chars``: how many characters of a
    completion prompt form its prefix key. Raises ``pydantic.ValidationError`` (a
    ``ValueError``) for a ``load_factor`` below 1 or a non-positive ``affinity_prefix_chars``.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    affinity: bool = True
    load_factor: float = Field(default=1.25, ge=1.0)
    affinity_prefix_chars: int = Field(default=2048, ge=1)


DEFAULT_POLICY = RoutingPolicy()


def prefix_key(
    request: ChatRequest | CompletionRequest, *, prefix_chars: int = 2048
) -> bytes | None:
    """The affinity key of ``request``: a 32-byte SHA-256 digest of its conversation prefix.

    Chat: the model, the system and developer messages before the first user message, and
    the first user message (role and content; the turns after it do not count, so every turn
    of one conversation gets the same key). Completion: the model and the first
    ``prefix_chars`` characters of the prompt (use ``RoutingPolicy.affinity_prefix_chars``).
    None when there is nothing to key on (no system, developer or user message; empty prompt).
    """
    if isinstance(request, CompletionRequest):
        if not request.prompt:
            return None
        head: object = ["completion", request.model, request.prompt[:prefix_chars]]
    else:
        parts: list[object] = []
        for message in request.messages:
            role = message.get("role")
            if role in _PREFIX_ROLES:
                parts.append([role, message.get("content")])
            elif role == "user":
                parts.append([role, message.get("content")])
                break
        if not parts:
            return None
        head = ["chat", request.model, parts]
    canonical = json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()


def _weight(key: bytes, name: str) -> int:
    digest = hashlib.sha256(key + b"\x00" + name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous_order(
    key: bytes, members: Sequence[Member], model: str | None = None
) -> list[Member]:
    """``members`` by rendezvous weight for ``key``, highest first: the first is the key's
    home node, and removing any node leaves the relative order of the others unchanged.

    With ``model``, each node's routing weight for it scales its share of keys, by the
    logarithmic method of weighted rendezvous hashing (score ``-w / ln(u)`` with ``u`` the
    hash in (0, 1); Schindelhauer and Schomaker 2005): a node of weight 2 is home to twice
    the keys of a node of weight 1. With every weight 1 the order is the unweighted one.
    """

    def score(m: Member) -> float:
        u = (_weight(key, m.name) + 1) / 2.0**64  # in (0, 1]
        w = m.weight(model) if model is not None else 1.0
        return math.inf if u >= 1.0 else -w / math.log(u)

    return sorted(members, key=lambda m: (-score(m), m.name))


@dataclass(frozen=True, slots=True)
class _Load:
    member: Member
    in_flight: int  # corrected by our own outstanding requests
    queued: int
    score: float
    capacity: int  # slots: free + in flight, as gossiped

    @property
    def has_room(self) -> bool:
        """Nothing queued and a slot free even counting this request."""
        return self.queued == 0 and self.in_flight + 1 <= self.capacity

    @property
    def units(self) -> int:
        """Requests at the node, running or queued: the load bounded-load hashing caps."""
        return self.in_flight + self.queued


def _load(member: Member, own: int, weight: float = 1.0) -> _Load:
    """Load figures of ``member``; the score (lower is better) is divided by its routing
    ``weight`` for the model, so a node of weight 2 looks half as loaded."""
    gossip = member.load
    in_flight = max(gossip.in_flight, own)
    capacity = max(1, gossip.free_slots + gossip.in_flight)
    score = (in_flight + QUEUE_WEIGHT * gossip.queue_depth) / capacity / weight
    return _Load(member, in_flight, gossip.queue_depth, score, capacity)


class Selector:
    """Orders the candidates for requests received by node ``self_name``.

    ``policy``: the knobs (``RoutingPolicy``). ``rng``: the source of the power-of-two
    samples (pass a seeded ``random.Random`` for reproducible picks; default, one seeded by
    the OS).
    """

    def __init__(
        self,
        self_name: str,
        policy: RoutingPolicy = DEFAULT_POLICY,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.self_name = self_name
        self.policy = policy
        self.rng = rng if rng is not None else random.Random()

    def order(
        self,
        members: Sequence[Member],
        model: str,
        *,
        key: bytes | None = None,
        own_in_flight: Mapping[str, int] = _NO_OWN,
        breakers: BreakerBoard | None = None,
        now: float = 0.0,
        exclude: Collection[str] = (),
        pin: str | None = None,
        forwarded: bool = False,
    ) -> list[Member]:
        """Every usable candidate for ``model``: the chosen node first, then the others
        best-first (lowest score; the local node first among equals).

        ``members``: the cluster view, this node included. ``key``: the request's
        ``prefix_key`` (None: no affinity). ``own_in_flight``: node name → requests this node
        has outstanding there, itself included. ``breakers`` and ``now`` (seconds, the
        breakers' clock): nodes whose breaker would refuse are left out; nothing is claimed —
        call ``breakers.get(name).allow(now)`` right before sending. ``exclude``: names of
        nodes already tried for this request. ``pin``: a node name the client asked for
        (``x-quorum-pin``); ``forwarded``: the request was forwarded here, so only this node
        may serve it (never forwarded twice). A pinned node is not filtered by its breaker
        (the client asked for it by name; the attempt loop still claims the breaker) but is
        by ``exclude``.

        Raises ``ModelNotFound`` when no member lists the model, ``InvalidRequest`` for a pin
        that names no member, and ``Unavailable`` when members list the model but none can
        take it now (dead, warming, draining, refused by its breaker or already tried).
        Never returns an empty list.
        """
        ready = _ready(members, model, self_name=self.self_name, pin=pin, forwarded=forwarded)
        if pin is not None:
            if pin in exclude:
                raise Unavailable(f"x-quorum-pin: node '{pin}' was already tried and failed.")
            return ready
        usable: list[Member] = []
        refused: list[str] = []
        for m in ready:
            if m.name in exclude:
                refused.append(f"{m.name}: already tried")
            elif breakers is not None and not breakers.would_allow(m.name, now):
                refused.append(f"{m.name}: circuit {breakers.get(m.name).state(now)}")
            else:
                usable.append(m)
        if not usable:
            raise Unavailable(
                f"No node can serve model '{model}' now ({', '.join(refused)}). Retry shortly."
            )
        if len(usable) == 1:
            return usable
        loads = [_load(m, own_in_flight.get(m.name, 0), m.weight(model)) for m in usable]
        chosen = None
        if key is not None and self.policy.affinity:
            chosen = self._affine(key, loads, model)
        if chosen is None:
            chosen = self._two_choices(loads)
        rest = sorted(
            (x for x in loads if x is not chosen),
            key=lambda x: (x.score, x.member.name != self.self_name, x.member.name),
        )
        return [chosen.member, *(x.member for x in rest)]

    def check_forwarded(self, members: Sequence[Member], model: str) -> None:
        """For a request forwarded here: raises as ``order`` does when this node cannot
        serve ``model`` itself (it never forwards a request again)."""
        _ready(members, model, self_name=self.self_name, forwarded=True)

    def _affine(self, key: bytes, loads: list[_Load], model: str) -> _Load | None:
        """The first node in rendezvous order whose load, with this request, stays within
        ``ceil(load_factor * mean load)``; the mean counts this request too, as in Mirrokni,
        Thorup and Zadimoghaddam (a node fits while ``load + 1 ≤ ceil(c · (total + 1) / n)``,
        so an idle cluster always fits). None when every node is over the cap, which cannot
        happen while ``load_factor >= 1`` (the least loaded node is always under it); the
        power-of-two fallback is a guard, not a path taken."""
        total = sum(x.units for x in loads)
        # The epsilon keeps float error (1.1 * 10 / 11 = 1.0000000000000002) from raising the cap.
        cap = math.ceil(self.policy.load_factor * (total + 1) / len(loads) - 1e-9)
        by_name = {x.member.name: x for x in loads}
        for member in rendezvous_order(key, [x.member for x in loads], model):
            load = by_name[member.name]
            # Within the bounded-load cap, or idle enough that staying costs nothing: at low
            # absolute load the cap (ceil of a small mean) would spill on one stale request.
            if load.units + 1 <= cap or load.has_room:
                return load
        return None

    def _two_choices(self, loads: list[_Load]) -> _Load:
        """Power of two choices: two distinct candidates at random, the lower score wins; the
        local node wins within ``LOCAL_MARGIN``, and a remote tie goes to the first drawn."""
        a, b = self.rng.sample(loads, 2)
        if b.member.name == self.self_name:
            a, b = b, a
        if a.member.name == self.self_name:
            return a if a.score <= b.score + LOCAL_MARGIN else b
        return a if a.score <= b.score else b


def _ready(
    members: Sequence[Member],
    model: str,
    *,
    self_name: str,
    pin: str | None = None,
    forwarded: bool = False,
) -> list[Member]:
    """The members that may serve ``model`` now, in the view's order (``Selector.order``
    ranks them).

    ``members``: the cluster view, this node included. ``pin``: a node name the client asked
    for (``x-quorum-pin``). ``forwarded``: the request was forwarded here by another node, so it
    is only served locally (a request is never forwarded twice).

    Raises ``ModelNotFound`` when no member lists the model, ``InvalidRequest`` for a pin that
    names no member, and ``Unavailable`` when members list the model but none can take it now.
    """
    gone = (MemberState.DEAD, MemberState.LEFT)
    serving = [m for m in members if model in m.models and m.state not in gone]
    if pin is not None:
        by_name = {m.name: m for m in members}
        if pin not in by_name:
            names = ", ".join(sorted(by_name))
            raise InvalidRequest(
                f"x-quorum-pin names node '{pin}', which is not a member of this cluster "
                f"(members: {names})."
            )
        node = by_name[pin]
        if model not in node.models:  # the client's mistake, not a passing state: 400
            raise InvalidRequest(
                f"x-quorum-pin: node '{pin}' does not serve model '{model}' "
                f"(it serves: {', '.join(node.models) or 'nothing'}).",
                param="x-quorum-pin",
            )
        if not node.routable:
            raise Unavailable(
                f"x-quorum-pin: node '{pin}' cannot take requests now "
                f"(state {node.state}, {node.node_state})."
            )
        if forwarded and node.name != self_name:
            raise Unavailable(f"this node is not '{pin}' and does not forward twice.")
        return [node]
    if not serving and not any(model in m.models for m in members):
        raise ModelNotFound(
            f"The model '{model}' does not exist on any node of this cluster. "
            "GET /v1/models lists the models served.",
            param="model",
        )
    if forwarded:
        serving = [m for m in serving if m.name == self_name]
    ready = [m for m in serving if m.routable]
    if not ready:
        states = ", ".join(f"{m.name}: {m.state}/{m.node_state}" for m in serving) or "none alive"
        raise Unavailable(f"No node can serve model '{model}' now ({states}). Retry shortly.")
    return ready
