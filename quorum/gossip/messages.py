"""Gossip messages: frozen, slotted dataclasses, one per datagram or push-pull kind.

Like h11's ``_events.py``, these are plain values with no behaviour; ``codec.py`` turns them
into msgpack bytes and back, ``core.py`` decides what they mean.

Each message has a numeric tag in :class:`MessageType`. The table is append-only (as in
memberlist ``net.go``): nodes running different versions share a cluster during a rolling
upgrade, so a tag, once released, keeps its meaning forever.

The value types carried inside messages (:class:`NodeMeta`, :class:`Load`, :class:`Usage`,
:class:`MemberState`, :class:`MemberInfo`) live here too, because they are wire data.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = [
    "MAX_EPOCH",
    "MAX_HOST_LEN",
    "MAX_INCARNATION",
    "MAX_KEY_LEN",
    "MAX_LOAD_VERSION",
    "MAX_MODELS",
    "MAX_MODEL_LEN",
    "MAX_NAME_LEN",
    "MAX_SENT_MS",
    "MAX_URL_LEN",
    "MAX_USAGE",
    "MAX_USAGE_FIGURE",
    "MAX_WINDOW",
    "META_STATES",
    "Ack",
    "Addr",
    "Alive",
    "Compound",
    "Dead",
    "Header",
    "Left",
    "Load",
    "LoadUpdate",
    "MemberInfo",
    "MemberState",
    "Message",
    "MessageType",
    "Nack",
    "NodeMeta",
    "Ping",
    "PingReq",
    "PushPull",
    "Suspect",
    "Usage",
    "check_host",
    "check_name",
]

Addr = tuple[str, int]
"""A UDP/TCP address: (host, port). The host is an IP literal or a resolvable name."""


class MessageType(enum.IntEnum):
    """Numeric tag of each message on the wire.

    ONLY APPEND TO THIS TABLE. Never renumber, never reuse a retired number.
    """

    PING = 1
    PING_REQ = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7
    LEFT = 8
    PUSH_PULL = 9
    COMPOUND = 10
    LOAD = 11
    ENVELOPE = 12
    """Not a message: the frame around every packet's message (a :class:`Header`, then the
    message), see :mod:`quorum.gossip.codec`."""


class MemberState(enum.StrEnum):
    """What the local node believes about a member (SWIM, Das et al. 2002, section 4.2).

    ``left`` is a graceful departure announced by the member itself; ``dead`` is a verdict
    reached by the failure detector. Both are terminal until the member comes back with a
    higher incarnation.
    """

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


META_STATES = ("warming", "ready", "draining")
"""Values allowed in :attr:`NodeMeta.state`."""


MAX_WEIGHT = 1000.0
"""The largest routing weight a model may have."""

MAX_EPOCH = 2**63 - 1
"""The largest epoch (a sender's life, see :class:`Header`). Epochs are compared, never
incremented, so the whole signed 64-bit range is safe."""
MAX_SENT_MS = 2**53 - 1
"""The largest ``Header.sent_ms``: 285,000 years of one life."""
MAX_NAME_LEN = 128
"""Longest node name, in characters."""
MAX_HOST_LEN = 64
"""Longest host of a gossip address: an IP literal (an IPv6 one with a zone id is at most 61)."""
MAX_URL_LEN = 2048
"""Longest ``NodeMeta.http_url``, in characters."""
MAX_MODELS = 256
"""Most models one node may announce."""
MAX_MODEL_LEN = 256
"""Longest model id, in characters."""


def _printable(value: object, max_len: int) -> bool:
    return type(value) is str and 0 < len(value) <= max_len and value.isprintable()


def check_name(name: object) -> str:
    """Return ``name`` if it can name a node: a string of 1..128 printable characters (no
    control characters: names reach logs, terminals and JSON). Raises ``ValueError``."""
    if not _printable(name, MAX_NAME_LEN):
        raise ValueError(f"a node name must be 1..{MAX_NAME_LEN} printable characters")
    assert isinstance(name, str)
    return name


@functools.lru_cache(maxsize=4096)  # every alive carries one; a cluster has few hosts
def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_host(host: object) -> str:
    """Return ``host`` if it can be a gossip address: an IPv4 or IPv6 literal of at most 64
    characters. Host names are refused: a peer must not make us resolve names it chose, and
    every node advertises an IP (``quorum.node`` resolves its own). Raises ``ValueError``."""
    if type(host) is not str or not 0 < len(host) <= MAX_HOST_LEN:
        raise ValueError(f"a gossip host must be an IP literal of 1..{MAX_HOST_LEN} characters")
    if not _ip_literal(host):
        raise ValueError(f"a gossip host must be an IP literal, not {host!r:.70}")
    return host


_SPACE = re.compile(r"\s")


def _check_url(url: object) -> None:
    """An absolute ``http://`` or ``https://`` URL with a host, at most 2048 printable
    characters, no spaces, no user info, no query or fragment (it is a base URL)."""
    if type(url) is not str or not _http_base_url(url):
        raise ValueError(
            f"NodeMeta.http_url must be an http(s) base URL of at most {MAX_URL_LEN} "
            f"characters, not {url!r:.70}"
        )


@functools.lru_cache(maxsize=4096)  # every alive carries one; a cluster has few URLs
def _http_base_url(url: str) -> bool:
    if not _printable(url, MAX_URL_LEN) or _SPACE.search(url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and not parts.query
        and not parts.fragment
    )


MAX_INCARNATION = 2**53 - 1
"""The largest incarnation on the wire. An ``alive`` may carry it; an accusation (``suspect``,
``dead``, ``left``) must stay below it, which leaves the accused the one step it needs to
refute. Anything higher is dropped and counted (``dropped_incarnation``), and a node's own
incarnation never passes it.

Why 2**53 - 1, far below the 2**63 - 1 of a signed 64-bit integer: it is the largest integer
that every decoder holds exactly (msgpack in any language, and JSON readers that parse numbers
as doubles: ``/cluster/members`` shows incarnations), so ``claim + 1`` can never overflow
anywhere. An honest node raises its incarnation once per refutation or meta change: at a
thousand per second it would take 285,000 years to get there, so only a forged message can
come near it (see :mod:`quorum.gossip.state` for what happens then)."""

MAX_LOAD_VERSION = 2**53 - 1
"""The largest load version on the wire, for the same reasons as :data:`MAX_INCARNATION`. A
node that reaches it (only a forged load update can push it there) keeps publishing its load
at that version; members that already hold that version keep the figures they have."""


MAX_KEY_LEN = 64
"""Longest API key name in :class:`Usage`, in bytes of UTF-8 (64 ASCII characters)."""
MAX_WINDOW = 2**40
"""The largest quota window index (unix seconds // window length: 2**40 one-second windows
is 35,000 years)."""
MAX_USAGE_FIGURE = 2**53 - 1
"""The largest ``Usage`` count, for the same reasons as :data:`MAX_INCARNATION`."""
MAX_USAGE = 10
"""Most :class:`Usage` entries one :class:`Load` may carry.

Chosen so that the largest load update fits one datagram of 1400 bytes (``DESIGN.md``):
an entry at its largest (a 64-byte key; the window and three counts, each a 9-byte msgpack
integer) takes 103 bytes; a ``LoadUpdate`` with 10 of them, for a node of the longest name
(128 characters) at the largest version and load figures, takes 1188 bytes; with the envelope
of a sender of the longest name (150), a compound header (5) and AES-GCM sealing (29) that is
1372 bytes. 11 entries would be 1475. A plaintext cluster (loopback only) fits as long as its
cluster name is at most 55 bytes; :class:`~quorum.gossip.config.GossipConfig` refuses a
``max_datagram`` that the largest load update does not fit."""


@dataclass(frozen=True, slots=True)
class Usage:
    """One API key's quota figures on the sending node, in one fixed window.

    ``key``: the key's name, 1..64 printable characters and at most :data:`MAX_KEY_LEN`
    bytes of UTF-8 (the name, never the secret). ``window``: the window's index, unix seconds
    // the window length, 0..2**40. ``requests``, ``tokens``: counted in that window on this
    node, 0..2**53-1; they only grow within a window, so a receiver may merge the figures of
    one (node, key, window) by max, as a G-counter. ``concurrent``: requests of that key open
    at this node now, 0..2**53-1 (a gauge: the newest value wins). Raises ``ValueError`` on
    anything else (a bool is not an int here).
    """

    key: str
    window: int
    requests: int
    tokens: int
    concurrent: int

    def __post_init__(self) -> None:
        if not _usage_key(self.key):
            raise ValueError(
                f"Usage.key must be 1..{MAX_KEY_LEN} bytes of printable UTF-8, not {self.key!r:.80}"
            )
        if type(self.window) is not int or not 0 <= self.window <= MAX_WINDOW:
            raise ValueError(f"Usage.window must be an int in [0, {MAX_WINDOW}]")
        for value in (self.requests, self.tokens, self.concurrent):
            if type(value) is not int or not 0 <= value <= MAX_USAGE_FIGURE:
                raise ValueError(f"Usage figures must be ints in [0, {MAX_USAGE_FIGURE}]")


def _usage_key(key: object) -> bool:
    if not _printable(key, MAX_KEY_LEN):
        return False
    assert isinstance(key, str)
    try:
        return len(key.encode()) <= MAX_KEY_LEN
    except UnicodeEncodeError:  # a lone surrogate is printable, but not UTF-8
        return False


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """What a node tells the cluster about itself. Carried in every ``Alive``.

    ``http_url``: the node's OpenAI-compatible base URL, e.g. ``"http://10.0.0.5:32768"``:
    ``http`` or ``https``, a host, at most 2048 printable characters, no user info, query or
    fragment. ``models``: model ids the node serves (at most 256, each 1..256 printable
    characters, no repeats). ``state``: ``"warming"`` (booting, do not route),
    ``"ready"`` or ``"draining"`` (finish what you have, take nothing new). ``weights``:
    routing weight of each model, in the order of ``models`` (empty: all 1.0); encoded as a
    trailing field, so nodes that predate it read the rest.
    A change of meta raises the owner's incarnation, so it wins over older alive messages.
    Raises ``ValueError`` on a bad URL, model list or state, or a weight list that does not
    match; a peer's meta that fails these checks is dropped (``codec`` turns it into a
    ``DecodeError``).
    """

    http_url: str
    models: tuple[str, ...]
    state: Literal["warming", "ready", "draining"] | str = "ready"
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.state not in META_STATES:
            raise ValueError(f"NodeMeta.state must be one of {META_STATES}, not {self.state!r}")
        _check_url(self.http_url)
        if not isinstance(self.models, tuple):
            object.__setattr__(self, "models", tuple(self.models))
        if not isinstance(self.weights, tuple):
            object.__setattr__(self, "weights", tuple(self.weights))
        if len(self.models) > MAX_MODELS or len(set(self.models)) != len(self.models):
            raise ValueError(f"NodeMeta.models must be at most {MAX_MODELS} distinct ids")
        if not all(_printable(m, MAX_MODEL_LEN) for m in self.models):
            raise ValueError(f"NodeMeta.models must be 1..{MAX_MODEL_LEN} printable characters")
        if self.weights and len(self.weights) != len(self.models):
            raise ValueError("NodeMeta.weights must have one weight per model")
        if any(
            not isinstance(w, float | int) or not math.isfinite(w) or not 0 < w <= MAX_WEIGHT
            for w in self.weights
        ):
            raise ValueError(f"NodeMeta.weights must be in (0, {MAX_WEIGHT}]")

    def weight(self, model: str) -> float:
        """The routing weight of ``model`` here (1.0 unless set)."""
        if self.weights and model in self.models:
            return self.weights[self.models.index(model)]
        return 1.0


@dataclass(frozen=True, slots=True)
class Load:
    """A node's current load, piggybacked as a versioned value (no incarnation bump).

    ``in_flight``: requests being served now. ``free_slots``: requests the node could start
    now without queueing. ``queue_depth``: requests waiting for a slot. All are counts >= 0
    (the codec takes at most 2**31-1). ``usage``: this node's per-key quota figures
    (:class:`Usage`), at most :data:`MAX_USAGE` (10: the most that keeps the largest load
    update in one 1400-byte datagram), no two for the same (key, window); a list is turned
    into a tuple. Encoded as a trailing field, so a load without usage keeps its old wire
    form and a node that predates usage reads the rest (and relays the load without it).
    Raises ``ValueError`` on a negative figure, a non-``Usage`` entry, too many entries or a
    repeated (key, window).
    """

    in_flight: int
    free_slots: int
    queue_depth: int
    usage: tuple[Usage, ...] = ()

    def __post_init__(self) -> None:
        for value in (self.in_flight, self.free_slots, self.queue_depth):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Load figures must be non-negative ints, got {self}")
        if not isinstance(self.usage, tuple):
            object.__setattr__(self, "usage", tuple(self.usage))
        if len(self.usage) > MAX_USAGE:
            raise ValueError(f"Load.usage holds at most {MAX_USAGE} entries")
        if not all(isinstance(u, Usage) for u in self.usage):
            raise ValueError("Load.usage entries must be Usage values")
        if len({(u.key, u.window) for u in self.usage}) != len(self.usage):
            raise ValueError("Load.usage has two entries for the same (key, window)")


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One member as the local node sees it; also the entry type of a push-pull.

    ``addr``: the member's gossip address (UDP and TCP share the port number).
    ``incarnation``: only the member itself raises it, to refute suspicion or publish new meta.
    ``load``/``load_version``: the newest load figures heard of and their version
    (``None``/0 before any).
    """

    name: str
    addr: Addr
    state: MemberState
    incarnation: int
    meta: NodeMeta
    load: Load | None = None
    load_version: int = 0


@dataclass(frozen=True, slots=True)
class Header:
    """Who sealed a packet, in which life, and when: the freshness header inside every sealed
    payload (see :mod:`quorum.gossip.freshness` for how a receiver uses it).

    ``source``: the sender's node name. ``epoch``: the sender's life, fixed when its gossip
    starts and higher for each later start (the runner uses the wall clock in nanoseconds);
    0..2**63-1. ``sent_ms``: milliseconds from the start of that life to the sealing, on the
    sender's monotonic clock; 0..2**53-1.
    """

    source: str
    epoch: int
    sent_ms: int


# --- failure detection (SWIM section 3.1, Lifeguard section 4.2) ---------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. ``target`` is the name the sender expects to answer, so a different
    node that now owns the address does not ack on its behalf. ``seq``: 0..2**32-1."""

    seq: int
    target: str
    source: str


@dataclass(frozen=True, slots=True)
class PingReq:
    """Indirect probe request: "please ping ``target`` at ``target_addr`` for me and forward
    its ack as ``Ack(seq)``". With ``nack`` the helper answers ``Nack(seq)`` when the target
    stays silent (Lifeguard's nack, which tells the requester that the helper is healthy)."""

    seq: int
    target: str
    target_addr: Addr
    source: str
    nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a ``Ping``, or a forwarded answer to a ``PingReq`` (same ``seq``)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """A helper's "I tried, the target did not answer" for a ``PingReq`` (same ``seq``)."""

    seq: int


# --- membership updates, disseminated by piggybacking (SWIM section 4.1) ------------------


@dataclass(frozen=True, slots=True)
class Suspect:
    """``source`` suspects ``node`` at ``incarnation``."""

    node: str
    incarnation: int
    source: str


@dataclass(frozen=True, slots=True)
class Alive:
    """``node`` is alive at ``incarnation``, reachable at ``addr``, with ``meta``."""

    node: str
    incarnation: int
    addr: Addr
    meta: NodeMeta


@dataclass(frozen=True, slots=True)
class Dead:
    """``source`` declares ``node`` dead at ``incarnation``."""

    node: str
    incarnation: int
    source: str


@dataclass(frozen=True, slots=True)
class Left:
    """``node`` left the cluster on purpose at ``incarnation`` (only ever sent by itself)."""

    node: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class LoadUpdate:
    """``node``'s load figures, version ``version`` (newer version wins)."""

    node: str
    version: int
    load: Load


# --- anti-entropy and batching -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full membership state of ``source``, exchanged over TCP (memberlist ``pushPullReq``).

    ``join`` is true on the exchange that makes a node join the cluster.
    """

    source: str
    join: bool
    members: tuple[MemberInfo, ...]


@dataclass(frozen=True, slots=True)
class Compound:
    """Several messages in one datagram: a primary message plus piggybacked updates.
    Compounds never nest."""

    parts: tuple[Message, ...]  # forward reference: Message is defined below


Message = (
    Ping | PingReq | Ack | Nack | Suspect | Alive | Dead | Left | LoadUpdate | PushPull | Compound
)
"""Any gossip message."""
