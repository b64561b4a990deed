"""msgpack encoding of gossip messages, with bounded, strictly validated decoding.

A message is a msgpack array ``[tag, field, field, ...]`` with positional fields in the order
of the dataclass (see :mod:`quorum.gossip.messages`); nested values are arrays too:
``Addr = [host, port]``, ``NodeMeta = [http_url, [model, ...], state, [weight, ...]?]``,
``Load = [in_flight, free_slots, queue_depth, [usage, ...]?]`` (the usage list only when
non-empty) with ``Usage = [key, window, requests, tokens, concurrent]``, a push-pull entry is
``[name, addr, state, incarnation, meta, load | nil, load_version]``, and a compound is
``[10, [message, ...]]``. Trailing fields beyond the known ones are ignored, so a later
version may append fields to a message without a new tag.

Every packet (datagram or push-pull frame) is one *envelope* around one message (which may be
a compound)::

    [12, source, epoch, sent_ms, message, ...]

``source``/``epoch``/``sent_ms`` are the :class:`~quorum.gossip.messages.Header` that
:mod:`quorum.gossip.freshness` judges; the envelope is what :mod:`quorum.gossip.keyring`
seals, so the header is authenticated and encrypted with the message. It follows the same
rules: tag 12 is appended to the tag table, and fields a later version appends after the
message are ignored. A bare message without an envelope (a node older than the envelope, or a
packet stripped of it) is dropped: accepting it would let anyone replay old captures.
Envelopes never nest and never appear inside a compound.

Decoding never trusts the peer: msgpack itself is bounded (``max_str_len``, ``max_array_len``,
no maps, no binary, no extension types), then every field is checked for type and range:
names are 1..128 printable characters, hosts IP literals, meta URLs ``http(s)`` base URLs
(:class:`~quorum.gossip.messages.NodeMeta`), incarnations and load versions at most
:data:`~quorum.gossip.messages.MAX_INCARNATION` (accusations one less), a load's usage at most
:data:`~quorum.gossip.messages.MAX_USAGE` entries with distinct (key, window) and figures in
range (:class:`~quorum.gossip.messages.Usage`). Anything nonsensical
raises :class:`DecodeError`, which callers count and drop; nothing else escapes
:func:`decode` and :func:`decode_packet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import msgpack  # type: ignore[import-untyped]

from .messages import (
    MAX_EPOCH,
    MAX_HOST_LEN,
    MAX_INCARNATION,
    MAX_KEY_LEN,
    MAX_LOAD_VERSION,
    MAX_MODEL_LEN,
    MAX_MODELS,
    MAX_NAME_LEN,
    MAX_SENT_MS,
    MAX_URL_LEN,
    MAX_USAGE,
    MAX_USAGE_FIGURE,
    MAX_WEIGHT,
    MAX_WINDOW,
    META_STATES,
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
    MessageType,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    Usage,
    check_host,
    check_name,
)

__all__ = [
    "MAX_MODELS",
    "MAX_NAME_LEN",
    "DecodeError",
    "alive_overhead",
    "compound_overhead",
    "decode",
    "decode_packet",
    "encode",
    "encode_compound",
    "encode_envelope",
    "encode_meta",
    "envelope_overhead",
    "max_load_update_size",
    "max_push_pull_size",
]

MAX_SEQ = 2**32 - 1
MAX_LOAD_FIGURE = 2**31 - 1
_MAX_STR = max(MAX_URL_LEN, MAX_HOST_LEN, MAX_MODEL_LEN, MAX_NAME_LEN)


class DecodeError(Exception):
    """Bytes that are not a valid gossip message. Internal: count and drop, never raise
    past the core. ``counter``: the :data:`~quorum.gossip.core.COUNTERS` key to count the
    drop under (``dropped_decode`` unless a more precise one applies)."""

    def __init__(self, what: str, counter: str = "dropped_decode") -> None:
        super().__init__(what)
        self.counter = counter


# --- encoding -----------------------------------------------------------------------------


def _meta(meta: NodeMeta) -> list[Any]:
    fields: list[Any] = [meta.http_url, list(meta.models), meta.state]
    if meta.weights:
        fields.append(list(meta.weights))
    return fields


def _load(load: Load) -> list[Any]:
    fields: list[Any] = [load.in_flight, load.free_slots, load.queue_depth]
    if load.usage:
        fields.append([[u.key, u.window, u.requests, u.tokens, u.concurrent] for u in load.usage])
    return fields


def _member(m: MemberInfo) -> list[Any]:
    return [
        m.name,
        list(m.addr),
        m.state.value,
        m.incarnation,
        _meta(m.meta),
        None if m.load is None else _load(m.load),
        m.load_version,
    ]


def _fields(msg: Message) -> list[Any]:
    if isinstance(msg, Ping):
        return [MessageType.PING, msg.seq, msg.target, msg.source]
    if isinstance(msg, PingReq):
        return [
            MessageType.PING_REQ,
            msg.seq,
            msg.target,
            list(msg.target_addr),
            msg.source,
            msg.nack,
        ]
    if isinstance(msg, Ack):
        return [MessageType.ACK, msg.seq]
    if isinstance(msg, Nack):
        return [MessageType.NACK, msg.seq]
    if isinstance(msg, Suspect):
        return [MessageType.SUSPECT, msg.node, msg.incarnation, msg.source]
    if isinstance(msg, Alive):
        return [MessageType.ALIVE, msg.node, msg.incarnation, list(msg.addr), _meta(msg.meta)]
    if isinstance(msg, Dead):
        return [MessageType.DEAD, msg.node, msg.incarnation, msg.source]
    if isinstance(msg, Left):
        return [MessageType.LEFT, msg.node, msg.incarnation]
    if isinstance(msg, LoadUpdate):
        return [MessageType.LOAD, msg.node, msg.version, _load(msg.load)]
    if isinstance(msg, PushPull):
        return [MessageType.PUSH_PULL, msg.source, msg.join, [_member(m) for m in msg.members]]
    if isinstance(msg, Compound):
        return [MessageType.COMPOUND, [_fields(p) for p in msg.parts]]
    raise TypeError(f"not a gossip message: {msg!r}")


def encode(msg: Message) -> bytes:
    """msgpack bytes of one message. Raises ``TypeError`` for a non-message."""
    return msgpack.packb(_fields(msg), use_bin_type=True)  # type: ignore[no-any-return]


def encode_meta(meta: NodeMeta) -> bytes:
    """msgpack bytes of a ``NodeMeta`` alone (used to bound its size)."""
    return msgpack.packb(_meta(meta), use_bin_type=True)  # type: ignore[no-any-return]


def compound_overhead(count: int) -> int:
    """Bytes a compound of ``count`` parts adds around its encoded parts."""
    header = 1 if count < 16 else 3 if count < 2**16 else 5
    return 2 + header


def encode_compound(parts: Sequence[bytes]) -> bytes:
    """A compound message from already-encoded messages, without re-encoding them
    (msgpack values are self-delimiting, so an array is its header plus its items)."""
    count = len(parts)
    if count < 16:
        header = bytes((0x90 | count,))
    elif count < 2**16:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return b"\x92" + bytes((MessageType.COMPOUND,)) + header + b"".join(parts)


def encode_envelope(header: Header, message: bytes) -> bytes:
    """A packet's plaintext: ``header`` and the already-encoded ``message`` in an envelope."""
    fields = (MessageType.ENVELOPE, header.source, header.epoch, header.sent_ms)
    return b"\x95" + b"".join(msgpack.packb(f) for f in fields) + message


def alive_overhead() -> int:
    """The most bytes an alive message takes besides its meta (longest name and host, largest
    incarnation and port)."""
    fields = [MessageType.ALIVE, "n" * MAX_NAME_LEN, MAX_INCARNATION, ["f" * MAX_HOST_LEN, 65535]]
    return len(msgpack.packb(fields))  # a fixarray header: one byte for 4 items or for 5


def _largest_load() -> list[Any]:
    """The wire form of a load at its largest: the largest figures and :data:`MAX_USAGE`
    entries, each with a 64-byte key and the largest numbers."""
    usage = [
        [f"{i:02d}".ljust(MAX_KEY_LEN, "k"), MAX_WINDOW] + [MAX_USAGE_FIGURE] * 3
        for i in range(MAX_USAGE)
    ]
    return [*[MAX_LOAD_FIGURE] * 3, usage]


def max_load_update_size() -> int:
    """The most bytes an encoded ``LoadUpdate`` can take: a node name of 128 characters, the
    largest version, the largest load (see :data:`~quorum.gossip.messages.MAX_USAGE`)."""
    fields = [MessageType.LOAD, "n" * MAX_NAME_LEN, MAX_LOAD_VERSION, _largest_load()]
    return len(msgpack.packb(fields))


def max_push_pull_size(members: int, max_meta_size: int) -> int:
    """The most bytes the plaintext of a push-pull with ``members`` entries can take: each
    entry at its largest (128-character name, 64-character host, a meta of
    ``max_meta_size`` bytes, the largest numbers and load), in an envelope from a sender with
    the longest name. A frame limit derived from this never refuses an honest push-pull."""
    longest = "n" * MAX_NAME_LEN
    big = _largest_load()
    entry = [
        longest,
        ["f" * MAX_HOST_LEN, 65535],
        "suspect",
        MAX_INCARNATION,
        0,
        big,
        MAX_LOAD_VERSION,
    ]
    entry_size = len(msgpack.packb(entry)) - 1 + max_meta_size  # the 0 stands for the meta
    head = len(msgpack.packb([MessageType.PUSH_PULL, longest, False])) + 5  # + members header
    return envelope_overhead(longest) + head + members * entry_size


def envelope_overhead(source: str) -> int:
    """The most bytes an envelope from ``source`` adds around its message."""
    return len(encode_envelope(Header(source, MAX_EPOCH, MAX_SENT_MS), b""))


# --- decoding -----------------------------------------------------------------------------


def _fail(what: str) -> NoReturn:
    raise DecodeError(what)


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        _fail(f"{what}: expected int in [{lo}, {hi}], got {v!r:.40}")
    return v


def _counter(v: object, limit: int, what: str) -> int:
    """An incarnation or a load version: a non-negative int; above ``limit`` it is counted
    apart (``dropped_incarnation``), as a forged attempt to run a member out of numbers."""
    if type(v) is not int or v < 0:
        _fail(f"{what}: expected a non-negative int, got {v!r:.40}")
    if v > limit:
        raise DecodeError(f"{what}: {v} is over the limit of {limit}", "dropped_incarnation")
    return v


def _str(v: object, max_len: int, what: str) -> str:
    if type(v) is not str or not 0 < len(v) <= max_len:
        _fail(f"{what}: expected a string of 1..{max_len} characters")
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        _fail(f"{what}: expected a bool")
    return v


def _list(v: object, min_len: int, what: str) -> list[Any]:
    if type(v) is not list or len(v) < min_len:
        _fail(f"{what}: expected an array of at least {min_len} items")
    return v


def _addr(v: object) -> Addr:
    items = _list(v, 2, "addr")
    try:
        host = check_host(items[0])
    except ValueError as exc:
        _fail(f"addr.host: {exc}")
    return (host, _int(items[1], 1, 65535, "addr.port"))


def _name(v: object, what: str = "name") -> str:
    try:
        return check_name(v)
    except ValueError as exc:
        _fail(f"{what}: {exc}")


def _decode_meta(v: object, max_meta: int | None) -> NodeMeta:
    items = _list(v, 3, "meta")
    url = _str(items[0], MAX_URL_LEN, "meta.http_url")
    models = _list(items[1], 0, "meta.models")
    if len(models) > MAX_MODELS:
        _fail("meta.models: too many models")
    state = items[2]
    if state not in META_STATES or type(state) is not str:
        _fail("meta.state: unknown state")
    weights: tuple[float, ...] = ()
    if len(items) > 3:
        raw = _list(items[3], 0, "meta.weights")
        if len(raw) != len(models) or not all(
            type(w) in (int, float) and 0 < w <= MAX_WEIGHT for w in raw
        ):
            _fail("meta.weights: one weight in (0, 1000] per model")
        weights = tuple(float(w) for w in raw)
    meta = NodeMeta(  # checks the URL's scheme and host, the model ids (ValueError)
        http_url=url,
        models=tuple(_str(m, MAX_MODEL_LEN, "meta.models[]") for m in models),
        state=state,
        weights=weights,
    )
    if max_meta is not None and len(encode_meta(meta)) > max_meta:
        _fail(f"meta: over {max_meta} bytes encoded")
    return meta


def _decode_load(v: object) -> Load:
    items = _list(v, 3, "load")
    return Load(
        in_flight=_int(items[0], 0, MAX_LOAD_FIGURE, "load.in_flight"),
        free_slots=_int(items[1], 0, MAX_LOAD_FIGURE, "load.free_slots"),
        queue_depth=_int(items[2], 0, MAX_LOAD_FIGURE, "load.queue_depth"),
        usage=_decode_usage(items[3]) if len(items) > 3 else (),
    )


def _decode_usage(v: object) -> tuple[Usage, ...]:
    entries = _list(v, 0, "load.usage")
    if len(entries) > MAX_USAGE:
        _fail(f"load.usage: {len(entries)} entries is over the cap of {MAX_USAGE}")
    usage = []
    for entry in entries:
        items = _list(entry, 5, "load.usage[]")
        usage.append(
            Usage(  # checks the key: printable, at most 64 bytes of UTF-8 (ValueError)
                key=_str(items[0], MAX_KEY_LEN, "usage.key"),
                window=_int(items[1], 0, MAX_WINDOW, "usage.window"),
                requests=_int(items[2], 0, MAX_USAGE_FIGURE, "usage.requests"),
                tokens=_int(items[3], 0, MAX_USAGE_FIGURE, "usage.tokens"),
                concurrent=_int(items[4], 0, MAX_USAGE_FIGURE, "usage.concurrent"),
            )
        )
    if len({(u.key, u.window) for u in usage}) != len(usage):
        _fail("load.usage: two entries for the same (key, window)")
    return tuple(usage)


_STATES = {s.value: s for s in MemberState}
_MAX_ACCUSATION = MAX_INCARNATION - 1
"""Suspect, dead and left stay below the cap, so the accused can always refute."""


def _version(v: object) -> int:
    version = _counter(v, MAX_LOAD_VERSION, "load-update.version")
    if version < 1:
        _fail("load-update.version: expected >= 1")
    return version


def _decode_member(v: object, max_meta: int | None) -> MemberInfo:
    items = _list(v, 7, "member")
    state = _STATES.get(items[2]) if type(items[2]) is str else None
    if state is None:
        _fail("member.state: unknown state")
    limit = MAX_INCARNATION if state is MemberState.ALIVE else _MAX_ACCUSATION
    return MemberInfo(
        name=_name(items[0], "member.name"),
        addr=_addr(items[1]),
        state=state,
        incarnation=_counter(items[3], limit, "member.incarnation"),
        meta=_decode_meta(items[4], max_meta),
        load=None if items[5] is None else _decode_load(items[5]),
        load_version=_counter(items[6], MAX_LOAD_VERSION, "member.load_version"),
    )


def _decode_fields(v: object, *, max_members: int, max_meta: int | None, nested: bool) -> Message:
    items = _list(v, 1, "message")
    tag = items[0]
    if type(tag) is not int:
        _fail("message tag: expected an int")
    if tag == MessageType.PING:
        _list(items, 4, "ping")
        return Ping(
            seq=_int(items[1], 0, MAX_SEQ, "ping.seq"),
            target=_name(items[2], "ping.target"),
            source=_name(items[3], "ping.source"),
        )
    if tag == MessageType.PING_REQ:
        _list(items, 6, "ping-req")
        return PingReq(
            seq=_int(items[1], 0, MAX_SEQ, "ping-req.seq"),
            target=_name(items[2], "ping-req.target"),
            target_addr=_addr(items[3]),
            source=_name(items[4], "ping-req.source"),
            nack=_bool(items[5], "ping-req.nack"),
        )
    if tag == MessageType.ACK:
        _list(items, 2, "ack")
        return Ack(seq=_int(items[1], 0, MAX_SEQ, "ack.seq"))
    if tag == MessageType.NACK:
        _list(items, 2, "nack")
        return Nack(seq=_int(items[1], 0, MAX_SEQ, "nack.seq"))
    if tag == MessageType.SUSPECT:
        _list(items, 4, "suspect")
        return Suspect(
            node=_name(items[1], "suspect.node"),
            incarnation=_counter(items[2], _MAX_ACCUSATION, "suspect.incarnation"),
            source=_name(items[3], "suspect.source"),
        )
    if tag == MessageType.ALIVE:
        _list(items, 5, "alive")
        return Alive(
            node=_name(items[1], "alive.node"),
            incarnation=_counter(items[2], MAX_INCARNATION, "alive.incarnation"),
            addr=_addr(items[3]),
            meta=_decode_meta(items[4], max_meta),
        )
    if tag == MessageType.DEAD:
        _list(items, 4, "dead")
        return Dead(
            node=_name(items[1], "dead.node"),
            incarnation=_counter(items[2], _MAX_ACCUSATION, "dead.incarnation"),
            source=_name(items[3], "dead.source"),
        )
    if tag == MessageType.LEFT:
        _list(items, 3, "left")
        return Left(
            node=_name(items[1], "left.node"),
            incarnation=_counter(items[2], _MAX_ACCUSATION, "left.incarnation"),
        )
    if tag == MessageType.LOAD:
        _list(items, 4, "load-update")
        return LoadUpdate(
            node=_name(items[1], "load-update.node"),
            version=_version(items[2]),
            load=_decode_load(items[3]),
        )
    if tag == MessageType.PUSH_PULL:
        _list(items, 4, "push-pull")
        members = _list(items[3], 1, "push-pull.members")
        if len(members) > max_members:
            _fail(f"push-pull: {len(members)} members is over the cap of {max_members}")
        return PushPull(
            source=_name(items[1], "push-pull.source"),
            join=_bool(items[2], "push-pull.join"),
            members=tuple(_decode_member(m, max_meta) for m in members),
        )
    if tag == MessageType.COMPOUND:
        if nested:
            _fail("compound inside a compound")
        _list(items, 2, "compound")
        parts = _list(items[1], 1, "compound.parts")
        return Compound(
            parts=tuple(
                _decode_fields(p, max_members=0, max_meta=max_meta, nested=True) for p in parts
            ),
        )
    _fail(f"unknown message tag {tag}")


def decode_packet(
    data: bytes, *, max_size: int, max_members: int = 0, max_meta_size: int | None = None
) -> tuple[Header, Message]:
    """Decode and validate one packet's plaintext: an envelope (see the module docstring)
    around a message. Limits and errors as for :func:`decode`; a bare message without an
    envelope raises :class:`DecodeError` too."""
    items = _list(_unpack(data, max_size, max_members), 5, "envelope")
    if items[0] != MessageType.ENVELOPE or type(items[0]) is not int:
        _fail("expected an envelope")
    header = Header(
        source=_name(items[1], "envelope.source"),
        epoch=_int(items[2], 0, MAX_EPOCH, "envelope.epoch"),
        sent_ms=_int(items[3], 0, MAX_SENT_MS, "envelope.sent_ms"),
    )
    return header, _decode_message(items[4], max_members, max_meta_size)


def decode(
    data: bytes, *, max_size: int, max_members: int = 0, max_meta_size: int | None = None
) -> Message:
    """Decode and validate one message.

    ``max_size``: the largest acceptable input in bytes (a datagram: the datagram limit;
    a push-pull: its frame limit). ``max_members``: the most members a push-pull may carry
    (0 refuses push-pulls, as in datagrams). ``max_meta_size``: the most bytes one encoded
    ``NodeMeta`` may take (None: no limit beyond the others). Raises :class:`DecodeError` for
    anything oversized, truncated, trailing, malformed or out of range, and never anything
    else.
    """
    return _decode_message(_unpack(data, max_size, max_members), max_members, max_meta_size)


def _unpack(data: bytes, max_size: int, max_members: int) -> object:
    if len(data) > max_size:
        raise DecodeError(f"{len(data)} bytes is over the limit of {max_size}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=_MAX_STR,
            max_bin_len=0,
            max_map_len=0,
            max_ext_len=0,
            max_array_len=max(max_members, max_size),
        )
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not msgpack: {exc}") from None


def _decode_message(obj: object, max_members: int, max_meta_size: int | None) -> Message:
    try:
        return _decode_fields(obj, max_members=max_members, max_meta=max_meta_size, nested=False)
    except (ValueError, TypeError) as exc:  # a value type's own __post_init__ check
        raise DecodeError(str(exc)) from None
