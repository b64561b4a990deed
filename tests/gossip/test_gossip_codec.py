"""msgpack codec and AES-GCM keyring: round trips, and everything hostile is dropped and
counted."""

from __future__ import annotations

import msgpack
import pytest
from gossip_helpers import CONFIG, META, addr_of, make_core, seal

from quorum.gossip import codec
from quorum.gossip.codec import DecodeError
from quorum.gossip.keyring import Keyring, OpenError
from quorum.gossip.messages import (
    MAX_INCARNATION,
    MAX_USAGE,
    Ack,
    Alive,
    Compound,
    Dead,
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
    Usage,
)

OLD_KEY = b"o" * 16
NEW_KEY = b"n" * 32
MESSAGES: list[Message] = [
    Ping(1, "b", "a"),
    PingReq(2**32 - 1, "c", ("10.0.0.3", 7946), "a", True),
    Ack(0),
    Nack(5),
    Suspect("b", 3, "a"),
    Alive("b", 4, ("::1", 7946), META),
    Dead("b", MAX_INCARNATION - 1, "a"),
    Left("b", 9),
    LoadUpdate("b", 12, Load(3, 0, 7)),
    LoadUpdate("b", 13, Load(3, 0, 7, (Usage("team-a", 2**40, 2**53 - 1, 0, 1),))),
    Compound((Ping(1, "b", "a"), Alive("a", 1, ("10.0.0.1", 1), META), Left("z", 1))),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(msg: Message) -> None:
    assert codec.decode(codec.encode(msg), max_size=1400) == msg


def test_meta_weights_round_trip_and_older_meta_still_reads() -> None:
    weighted = NodeMeta("http://10.0.0.1:32768", ("m1", "m2"), "ready", weights=(2.0, 0.5))
    assert codec.decode(
        codec.encode(Alive("a", 3, ("10.0.0.1", 1), weighted)), max_size=1400
    ) == Alive("a", 3, ("10.0.0.1", 1), weighted)
    assert weighted.weight("m1") == 2.0 and weighted.weight("zz") == 1.0
    plain = NodeMeta("http://10.0.0.1:32768", ("m1",), "ready")
    assert codec.encode_meta(plain) == msgpack.packb(["http://10.0.0.1:32768", ["m1"], "ready"])
    with pytest.raises(ValueError):
        NodeMeta("http://x", ("m1", "m2"), "ready", weights=(1.0,))


def test_push_pull_round_trip() -> None:
    members = (
        MemberInfo("a", ("10.0.0.1", 7946), MemberState.ALIVE, 3, META, Load(1, 2, 3), 8),
        MemberInfo("b", ("10.0.0.2", 7946), MemberState.LEFT, 1, META),
    )
    msg = PushPull("a", True, members)
    assert codec.decode(codec.encode(msg), max_size=10_000, max_members=2) == msg
    with pytest.raises(DecodeError):
        codec.decode(codec.encode(msg), max_size=10_000, max_members=1)


def test_load_without_usage_keeps_its_wire_form_and_reads_back_with_no_usage() -> None:
    """A node that predates usage sends [in_flight, free_slots, queue_depth]: it reads as a
    load with ``usage=()``, and such a load is encoded byte for byte as before."""
    old_wire = msgpack.packb([11, "b", 12, [3, 0, 7]])
    assert codec.encode(LoadUpdate("b", 12, Load(3, 0, 7))) == old_wire
    assert codec.decode(old_wire, max_size=1400) == LoadUpdate("b", 12, Load(3, 0, 7, ()))
    member = MemberInfo("a", ("10.0.0.1", 7946), MemberState.ALIVE, 3, META, Load(1, 2, 3), 8)
    meta = [META.http_url, list(META.models), META.state]
    entry = ["a", ["10.0.0.1", 7946], "alive", 3, meta, [1, 2, 3], 8]
    assert codec.encode(PushPull("a", False, (member,))) == msgpack.packb([9, "a", False, [entry]])


def test_usage_round_trips_in_order_and_trailing_fields_are_ignored() -> None:
    usage = (Usage("b", 7, 1, 2, 3), Usage("a", 7, 0, 0, 0), Usage("a", 6, 9, 9, 0))
    load = Load(1, 2, 3, usage)
    decoded = codec.decode(codec.encode(LoadUpdate("n", 2, load)), max_size=1400)
    assert isinstance(decoded, LoadUpdate) and decoded.load.usage == usage
    later = msgpack.packb(
        [11, "n", 2, [1, 2, 3, [["b", 7, 1, 2, 3, "future"]], "future"], "future"]
    )
    assert codec.decode(later, max_size=1400) == LoadUpdate(
        "n", 2, Load(1, 2, 3, (Usage("b", 7, 1, 2, 3),))
    )
    listed = Load(0, 0, 0, [Usage("k", 0, 0, 0, 0)])  # type: ignore[arg-type]
    assert listed.usage == (Usage("k", 0, 0, 0, 0),)


def test_push_pull_carries_usage() -> None:
    load = Load(1, 2, 3, tuple(Usage(f"key-{i}", 100, i, 10 * i, 1) for i in range(MAX_USAGE)))
    member = MemberInfo("a", ("10.0.0.1", 7946), MemberState.ALIVE, 3, META, load, 8)
    msg = PushPull("a", False, (member,))
    assert codec.decode(codec.encode(msg), max_size=10_000, max_members=1) == msg


@pytest.mark.parametrize(
    "fields",
    [
        ("", 0, 0, 0, 0),  # empty key
        ("k" * 65, 0, 0, 0, 0),  # key too long
        ("é" * 33, 0, 0, 0, 0),  # 33 characters, but 66 bytes of UTF-8
        ("\ud800", 0, 0, 0, 0),  # a lone surrogate: not UTF-8
        ("k\n", 0, 0, 0, 0),  # not printable
        (b"k", 0, 0, 0, 0),  # not a str
        ("k", -1, 0, 0, 0),
        ("k", 2**40 + 1, 0, 0, 0),
        ("k", 0, -1, 0, 0),
        ("k", 0, 0, 2**53, 0),
        ("k", 0, 0, 0, True),  # a bool is not an int
        ("k", 0, 1.0, 0, 0),
    ],
)
def test_usage_refuses_values_out_of_range(fields: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        Usage(*fields)  # type: ignore[arg-type]


def test_load_refuses_too_many_or_repeated_usage_entries() -> None:
    assert Usage("é" * 32, 2**40, 2**53 - 1, 2**53 - 1, 2**53 - 1).key == "é" * 32  # 64 bytes
    Load(0, 0, 0, (Usage("k", 1, 0, 0, 0), Usage("k", 2, 0, 0, 0)))  # other windows: fine
    with pytest.raises(ValueError):
        Load(0, 0, 0, (Usage("k", 1, 0, 0, 0), Usage("k", 1, 5, 5, 5)))
    with pytest.raises(ValueError):
        Load(0, 0, 0, tuple(Usage(f"k{i}", 1, 0, 0, 0) for i in range(MAX_USAGE + 1)))
    with pytest.raises(ValueError):
        Load(0, 0, 0, (("k", 1, 0, 0, 0),))  # type: ignore[arg-type]


GOOD_USAGE = ["k", 7, 1, 2, 3]


def usage_load(*entries: object) -> bytes:
    return msgpack.packb([11, "b", 2, [1, 2, 3, list(entries)]])


HOSTILE_USAGE = {
    "usage not a list": msgpack.packb([11, "b", 2, [1, 2, 3, "k"]]),
    "usage is nil": msgpack.packb([11, "b", 2, [1, 2, 3, None]]),
    "entry not a list": usage_load("k"),
    "entry a field short": usage_load(GOOD_USAGE[:4]),
    "too many entries": usage_load(*[[f"k{i}", 7, 1, 2, 3] for i in range(MAX_USAGE + 1)]),
    "repeated key and window": usage_load(GOOD_USAGE, ["k", 7, 9, 9, 9]),
    "empty key": usage_load(["", 7, 1, 2, 3]),
    "key of 65 characters": usage_load(["k" * 65, 7, 1, 2, 3]),
    "key of 66 bytes": usage_load(["é" * 33, 7, 1, 2, 3]),
    "key with an escape sequence": usage_load(["k\x1b[2J", 7, 1, 2, 3]),
    "key not a string": usage_load([7, 7, 1, 2, 3]),
    "key as binary": usage_load([b"k", 7, 1, 2, 3]),
    "negative window": usage_load(["k", -1, 1, 2, 3]),
    "window past 2**40": usage_load(["k", 2**40 + 1, 1, 2, 3]),
    "window a string": usage_load(["k", "7", 1, 2, 3]),
    "negative requests": usage_load(["k", 7, -1, 2, 3]),
    "tokens past 2**53-1": usage_load(["k", 7, 1, 2**53, 3]),
    "concurrent of 2**64-1": usage_load(["k", 7, 1, 2, 2**64 - 1]),
    "bool requests": usage_load(["k", 7, True, 2, 3]),
    "float tokens": usage_load(["k", 7, 1, 2.0, 3]),
    "nil concurrent": usage_load(["k", 7, 1, 2, None]),
}


@pytest.mark.parametrize("data", HOSTILE_USAGE.values(), ids=HOSTILE_USAGE.keys())
def test_malformed_usage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(data, max_size=1400)


def test_the_good_usage_the_hostile_ones_are_made_from_decodes() -> None:
    decoded = codec.decode(usage_load(GOOD_USAGE, ["k", 8, 1, 2, 3]), max_size=1400)
    assert isinstance(decoded, LoadUpdate)
    assert decoded.load.usage == (Usage("k", 7, 1, 2, 3), Usage("k", 8, 1, 2, 3))


def test_compound_of_pre_encoded_parts_decodes() -> None:
    parts = [codec.encode(m) for m in MESSAGES[:10]] * 3
    decoded = codec.decode(codec.encode_compound(parts), max_size=10_000)
    assert isinstance(decoded, Compound) and len(decoded.parts) == 30
    assert len(codec.encode_compound(parts)) <= sum(map(len, parts)) + codec.compound_overhead(30)


@pytest.mark.parametrize(
    "obj",
    [
        [],
        [99, 1],
        ["1", 1],
        [1, -1, "b", "a"],  # negative seq
        [1, 2**32, "b", "a"],  # seq out of range
        [1, True, "b", "a"],  # bool is not an int
        [1, 1, "", "a"],  # empty name
        [1, 1, "x" * 129, "a"],  # name too long
        [1, 1, "b"],  # missing field
        [6, "b", 1, ["10.0.0.1", 0], ["u", [], "ready"]],  # port 0
        [6, "b", 1, ["10.0.0.1", 7946], ["u", [], "asleep"]],  # unknown meta state
        [6, "b", 1, ["10.0.0.1", 7946], ["u", [1], "ready"]],  # model not a string
        [11, "b", 1, [1, -2, 0]],  # negative load
        [10, [[10, [[3, 1]]]]],  # nested compound
        [10, []],  # empty compound
        [9, "a", False, []],  # push-pull in a datagram
        {"not": "a list"},
        "just a string",
    ],
)
def test_decode_rejects_nonsense(obj: object) -> None:
    data = msgpack.packb(obj)
    with pytest.raises(DecodeError):
        codec.decode(data, max_size=1400)


def test_decode_rejects_truncated_trailing_and_oversized() -> None:
    data = codec.encode(Alive("b", 4, ("10.0.0.2", 7946), META))
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            codec.decode(data[:cut], max_size=1400)
    with pytest.raises(DecodeError):
        codec.decode(data + b"\x00", max_size=1400)
    with pytest.raises(DecodeError):
        codec.decode(data, max_size=len(data) - 1)
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb(b"binary"), max_size=1400)


def test_keyring_round_trip_and_key_sizes() -> None:
    for size in (16, 24, 32):
        ring = Keyring([bytes(size)])
        assert ring.open(ring.seal(b"hello", b"quorum"), b"quorum") == b"hello"
        assert len(ring.seal(b"hello", b"quorum")) == 5 + ring.overhead(b"quorum")
    with pytest.raises(ValueError):
        Keyring([bytes(17)])
    with pytest.raises(ValueError):
        Keyring([bytes(16), bytes(16)])


def test_key_rotation_new_key_encrypts_old_key_still_decrypts() -> None:
    old_only = Keyring([OLD_KEY])
    rotating = Keyring([NEW_KEY, OLD_KEY])
    new_only = Keyring([NEW_KEY])
    assert rotating.open(old_only.seal(b"x", b"q"), b"q") == b"x"
    sealed = rotating.seal(b"y", b"q")
    assert new_only.open(sealed, b"q") == b"y"
    with pytest.raises(OpenError):
        old_only.open(sealed, b"q")


def test_wrong_key_dropped_and_counted() -> None:
    core = make_core()
    other = CONFIG.replace(keys=(OLD_KEY,))
    assert core.receive(0.0, addr_of("b"), seal(Ping(1, "a", "b"), config=other)) == []
    assert core.counters["dropped_decrypt"] == 1
    assert core.counters["received"] == 1


def test_cluster_name_mismatch_dropped() -> None:
    core = make_core()
    other = CONFIG.replace(cluster_name="another-cluster")
    assert core.receive(0.0, addr_of("b"), seal(Ping(1, "a", "b"), config=other)) == []
    assert core.counters["dropped_decrypt"] == 1
    plain = make_core(config=CONFIG.replace(keys=()))
    plain_other = CONFIG.replace(keys=(), cluster_name="another-cluster")
    assert plain.receive(0.0, addr_of("b"), seal(Ping(1, "a", "b"), config=plain_other)) == []
    assert plain.counters["dropped_decrypt"] == 1


def test_plaintext_packet_refused_by_a_keyed_core() -> None:
    core = make_core()
    plain = CONFIG.replace(keys=())
    core.receive(0.0, addr_of("b"), seal(Ping(1, "a", "b"), config=plain))
    assert core.counters["dropped_decrypt"] == 1


def test_truncated_and_garbage_datagrams_dropped() -> None:
    core = make_core()
    good = seal(Ping(1, "a", "b"))
    for data in (b"", good[:5], good[:-1], b"\x01" + b"\x00" * 40, b"garbage" * 10, b"\xff"):
        assert core.receive(0.0, addr_of("b"), data) == []
    core.receive(0.0, addr_of("b"), b"x" * 1401)
    c = core.counters
    assert c["received"] == 7
    assert c["dropped_decrypt"] == 6 and c["dropped_oversize"] == 1
    plain = make_core(config=CONFIG.replace(keys=()))
    framed = Keyring().seal(b"\xc1garbage", CONFIG.cluster_name.encode())
    plain.receive(0.0, addr_of("b"), framed)
    assert plain.counters["dropped_decode"] == 1
