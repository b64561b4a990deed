"""Fuzzing with VALID encryption and hostile contents: a peer that holds the cluster key sends
messages of every type with wrong types, out-of-range and capped numbers, huge or unprintable
strings, hostile URLs, unknown tags and too many members.

Every packet is sealed with the right key and a fresh envelope, so it gets past AES-GCM and
the replay window: what stops it is the codec and the member-state rules. The properties:
nothing raises, every bad packet is counted exactly once, and the node's view of a healthy
cluster is unchanged (no member dies, no hostile URL appears). Deterministic (derandomized),
a bounded number of examples, a few seconds in all.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import msgpack
from gossip_helpers import CONFIG, META, addr_of, drain, feed, join, make_core, seal_payload, sent
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from quorum.gossip.core import GossipCore
from quorum.gossip.messages import (
    MAX_INCARNATION,
    MAX_LOAD_VERSION,
    MAX_USAGE,
    MAX_USAGE_FIGURE,
    MAX_WINDOW,
    Alive,
    Dead,
    Left,
    MemberState,
    Message,
    NodeMeta,
    Suspect,
    Usage,
)

# Hypothesis caches constants and character maps in its home directory (.hypothesis in the
# working directory by default): keep them out of the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "quorum-hypothesis")

FUZZ = settings(
    max_examples=400,
    derandomize=True,
    database=None,  # nothing written to .hypothesis/
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: no patch files
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HEALTHY = ("b", "c", "d")
HOSTILE_URLS = [
    "file:///etc/passwd",
    "gopher://10.6.6.6:70/_",
    "javascript:alert(1)",
    "ftp://10.6.6.6/",
    "http://",
    "http:///v1",
    "http://user:pw@10.6.6.6/",
    "http://10.6.6.6/\r\nX-Injected: 1",
    "http://10.6.6.6:99999/",
    "http://10.6.6.6/?next=evil",
    "//10.6.6.6/",
    "10.6.6.6:32768",
    "",
]

# --- hostile values, by the kind of field they replace ----------------------------------------

STATE_NAMES = {state.value for state in MemberState}


def wrong_type(*allowed: type) -> st.SearchStrategy[Any]:
    """A value whose msgpack type is not one of ``allowed`` (bool is not an int here)."""
    options: list[st.SearchStrategy[Any]] = [st.none(), st.binary(max_size=4)]
    if int not in allowed:
        options.append(st.integers(min_value=-(2**63), max_value=2**64 - 1))
    if bool not in allowed:
        options.append(st.booleans())
    if float not in allowed:
        options.append(st.floats(allow_nan=True, allow_infinity=True))
    if str not in allowed:
        options.append(st.text(max_size=8))
    if list not in allowed:
        options.append(st.lists(st.integers(0, 9), max_size=3))
    options.append(st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2))
    return st.one_of(options)


def bad_int(lo: int, hi: int) -> st.SearchStrategy[Any]:
    out_of_range = [st.integers(min_value=-(2**63), max_value=lo - 1)]
    if hi < 2**64 - 1:
        out_of_range.append(st.integers(min_value=hi + 1, max_value=2**64 - 1))
    return st.one_of(*out_of_range, wrong_type(int))


def bad_text(max_len: int) -> st.SearchStrategy[Any]:
    printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8)
    return st.one_of(
        st.just(""),
        st.text(min_size=max_len + 1, max_size=max_len + 64),
        st.just("h" * 100_000),
        st.builds(
            lambda a, c, b: a + c + b,
            printable,
            st.sampled_from(["\x00", "\n", "\r", "\x1b[2J", "\x7f", "\u2028", "\x9b"]),
            printable,
        ),
        wrong_type(str),
    )


GOOD_META: list[Any] = ["http://10.0.0.5:32768", ["m1"], "ready"]


def bad_meta() -> st.SearchStrategy[Any]:
    url = st.one_of(st.sampled_from(HOSTILE_URLS), bad_text(2048))
    model = st.one_of(bad_text(256))
    weight = st.one_of(
        st.sampled_from([0, -1, 1000.5, float("nan"), float("inf"), 2**64 - 1]),
        wrong_type(int, float),
    )
    return st.one_of(
        wrong_type(list),
        st.builds(lambda u: [u, ["m1"], "ready"], url),
        st.builds(lambda m: [GOOD_META[0], [m], "ready"], model),
        st.just([GOOD_META[0], ["m1", "m1"], "ready"]),  # repeated model
        st.just([GOOD_META[0], [f"m{i}" for i in range(257)], "ready"]),  # too many
        st.builds(lambda m: [GOOD_META[0], m, "ready"], wrong_type(list)),
        st.builds(
            lambda s: [GOOD_META[0], ["m1"], s],
            st.one_of(st.text(max_size=12).filter(lambda s: s not in ("ready",)), wrong_type(str)),
        ).filter(lambda m: m[2] not in ("warming", "draining")),
        st.builds(lambda w: [GOOD_META[0], ["m1"], "ready", [w]], weight),
        st.just([GOOD_META[0], ["m1"], "ready", [1.0, 2.0]]),  # one weight too many
        st.just(GOOD_META[:2]),  # a field short
    )


def bad_addr() -> st.SearchStrategy[Any]:
    host = st.one_of(
        st.sampled_from(["evil.example.com", "localhost", "10.0.0.5 ", "::g", "1" * 300, ""]),
        bad_text(64),
    )
    return st.one_of(
        wrong_type(list),
        st.builds(lambda h: [h, 7946], host),
        st.builds(lambda p: ["10.0.0.5", p], bad_int(1, 65535)),
        st.just(["10.0.0.5"]),
    )


GOOD_USAGE: list[Any] = ["team-a", 7, 1, 2, 3]


def good_usage() -> st.SearchStrategy[list[Any]]:
    """A valid usage list: up to MAX_USAGE entries, distinct (key, window), figures in range."""
    entry = st.tuples(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64),
        st.integers(0, MAX_WINDOW),
        st.integers(0, MAX_USAGE_FIGURE),
        st.integers(0, MAX_USAGE_FIGURE),
        st.integers(0, MAX_USAGE_FIGURE),
    ).map(list)
    return st.lists(entry, max_size=MAX_USAGE, unique_by=lambda u: (u[0], u[1]))


def bad_usage_entry() -> st.SearchStrategy[Any]:
    """A usage entry wrong in exactly one way (or not an entry at all)."""
    bad_field: list[st.SearchStrategy[Any]] = [
        st.one_of(bad_text(64), st.just("é" * 33)),  # 33 characters, 66 bytes
        bad_int(0, MAX_WINDOW),
        bad_int(0, MAX_USAGE_FIGURE),
        bad_int(0, MAX_USAGE_FIGURE),
        bad_int(0, MAX_USAGE_FIGURE),
    ]
    return st.one_of(
        wrong_type(list),
        st.integers(0, 4).flatmap(
            lambda i: bad_field[i].map(
                lambda v: [v if j == i else f for j, f in enumerate(GOOD_USAGE)]
            )
        ),
        st.integers(0, 4).map(lambda n: GOOD_USAGE[:n]),
    )


def bad_usage() -> st.SearchStrategy[Any]:
    """A usage list with one bad entry among good ones, too many entries, a repeated (key,
    window), or not a list."""
    return st.one_of(
        wrong_type(list),
        st.builds(
            lambda good, bad, at: [*good[:at], bad, *good[at:]],
            good_usage().map(lambda g: g[: MAX_USAGE - 1]),
            bad_usage_entry(),
            st.integers(0, MAX_USAGE),
        ),
        st.integers(1, 40).map(lambda n: [[f"k{i}", 7, 1, 2, 3] for i in range(MAX_USAGE + n)]),
        good_usage().filter(bool).map(lambda g: [*g, [g[0][0], g[0][1], 0, 0, 0]]),
    )


def bad_load() -> st.SearchStrategy[Any]:
    figure = bad_int(0, 2**31 - 1)
    return st.one_of(
        wrong_type(list),
        st.builds(lambda f, i: [f if j == i else 1 for j in range(3)], figure, st.integers(0, 2)),
        st.just([1, 2]),
        st.builds(lambda u: [1, 2, 3, u], bad_usage()),
    )


BAD: dict[str, st.SearchStrategy[Any]] = {
    "seq": bad_int(0, 2**32 - 1),
    "name": bad_text(128),
    "alive_inc": bad_int(0, MAX_INCARNATION),
    "accusation_inc": bad_int(0, MAX_INCARNATION - 1),
    "version": bad_int(1, MAX_LOAD_VERSION),
    "addr": bad_addr(),
    "bool": wrong_type(bool),
    "meta": bad_meta(),
    "load": bad_load(),
}

# A valid message of every datagram type, with the kind of each field after the tag.
TEMPLATES: dict[str, tuple[list[Any], list[str]]] = {
    "ping": ([1, 7, "a", "b"], ["seq", "name", "name"]),
    "ping-req": (
        [2, 7, "c", ["10.0.0.3", 7946], "b", True],
        ["seq", "name", "addr", "name", "bool"],
    ),
    "ack": ([3, 7], ["seq"]),
    "nack": ([4, 7], ["seq"]),
    "suspect": ([5, "c", 1, "b"], ["name", "accusation_inc", "name"]),
    "alive": (
        [6, "e", 1, ["10.0.0.5", 7946], GOOD_META],
        ["name", "alive_inc", "addr", "meta"],
    ),
    "dead": ([7, "c", 1, "b"], ["name", "accusation_inc", "name"]),
    "left": ([8, "c", 1], ["name", "accusation_inc"]),
    "load": ([11, "c", 2, [1, 2, 3, [GOOD_USAGE]]], ["name", "version", "load"]),
}
VALID_TAGS = {1, 2, 3, 4, 5, 6, 7, 8, 10, 11}


@st.composite
def hostile_message(draw: st.DrawFn) -> list[Any]:
    """One datagram message that is invalid in exactly the way drawn."""
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    fields, kinds = TEMPLATES[kind]
    msg = list(fields)
    how = draw(st.sampled_from(["field", "field", "field", "tag", "short"]))
    if how == "field":
        i = draw(st.integers(0, len(kinds) - 1))
        msg[i + 1] = draw(BAD[kinds[i]])
    elif how == "tag":
        msg[0] = draw(
            st.one_of(
                st.integers(min_value=-(2**63), max_value=2**64 - 1).filter(
                    lambda t: t not in VALID_TAGS
                ),
                wrong_type(int),
            )
        )
    else:
        msg = msg[: draw(st.integers(0, len(msg) - 1))]
    return msg


@st.composite
def hostile_packet(draw: st.DrawFn) -> list[Any]:
    """A datagram's message: a hostile one alone, or hidden among valid ones in a compound,
    or a compound that breaks the compound rules."""
    bad = draw(hostile_message())
    shape = draw(st.sampled_from(["alone", "alone", "compound", "nested", "push-pull", "empty"]))
    if shape == "alone":
        return bad
    if shape == "compound":
        valid = draw(st.lists(st.sampled_from([t[0] for t in TEMPLATES.values()]), max_size=4))
        at = draw(st.integers(0, len(valid)))
        return [10, [*valid[:at], bad, *valid[at:]]]
    if shape == "nested":
        return [10, [[1, 7, "a", "b"], [10, [[3, 7]]]]]
    if shape == "push-pull":  # full state belongs on TCP, never in a datagram
        return [9, "b", False, [["b", ["10.0.0.2", 7946], "alive", 1, GOOD_META, None, 0]]]
    return [10, []]


def healthy_core() -> GossipCore:
    core = make_core()
    join(core, *HEALTHY)
    return core


def dropped(core: GossipCore) -> int:
    return sum(v for k, v in core.counters.items() if k.startswith("dropped_"))


def hostile_urls_in(core: GossipCore) -> list[str]:
    return [m.meta.http_url for m in core.members() if m.meta.http_url in HOSTILE_URLS]


@FUZZ
@given(hostile_packet())
@example([5, "a", 2**63 - 1, "b"])  # the reported attack: suspect at the int64 edge
@example([7, "a", MAX_INCARNATION, "b"])  # dead at the cap: nothing above is refutable
@example([6, "b", 1, ["10.0.0.2", 7946], ["file:///etc/passwd", ["m1"], "ready"]])
@example([10, [[1, 7, "a", "b"], [99, 1]]])  # an unknown tag hides a valid ping
def test_hostile_datagrams_are_dropped_counted_and_change_nothing(msg: list[Any]) -> None:
    core = healthy_core()
    before = core.members()
    received, accepted, drops = core.counters["received"], core.counters["accepted"], dropped(core)
    out = core.receive(1.0, addr_of("x"), seal_payload(msgpack.packb(msg), src="x", sent=1.0))
    assert out == []
    assert core.members() == before
    assert core.counters["received"] == received + 1
    assert core.counters["accepted"] == accepted
    assert dropped(core) == drops + 1
    assert core.incarnation == 1 and not hostile_urls_in(core)


@FUZZ
@given(good_usage(), st.booleans())
def test_valid_usage_is_taken_exactly_from_a_datagram_and_a_push_pull(
    usage: list[list[Any]], by_push_pull: bool
) -> None:
    """The other side of the hostile loads: any usage within the bounds is accepted, in a
    datagram or a push-pull, and read back exactly as sent."""
    core = healthy_core()
    load = [1, 2, 3, usage]
    if by_push_pull:
        entry = ["c", list(addr_of("c")), "alive", 1, GOOD_META, load, 5]
        frame = seal_payload(msgpack.packb([9, "x", False, [entry]]), src="x", sent=1.0)
        answer, _ = core.answer_push_pull(1.0, addr_of("x"), frame)
        assert answer is not None
    else:
        data = seal_payload(msgpack.packb([11, "c", 5, load]), src="x", sent=1.0)
        core.receive(1.0, addr_of("x"), data)
        assert core.counters["accepted"] == len(HEALTHY) + 1
    info = core.member("c")
    assert info is not None and info.load is not None and info.load_version == 5
    assert info.load.usage == tuple(Usage(*u) for u in usage)


@st.composite
def hostile_push_pull(draw: st.DrawFn) -> list[Any]:
    """A push-pull frame with one hostile entry among valid ones, or too many entries."""
    good = [
        [f"n{i}", [f"10.0.1.{i + 1}", 7946], "alive", 1, GOOD_META, [1, 1, 1, [GOOD_USAGE]], 1]
        for i in range(draw(st.integers(0, 6)))
    ]
    if draw(st.booleans()):  # more members than a push-pull may carry
        many = [
            [f"m{i}", [f"10.0.2.{i % 250 + 1}", 7946], "alive", 1, GOOD_META, None, 0]
            for i in range(CONFIG.max_push_pull_members + draw(st.integers(1, 50)))
        ]
        return [9, "x", False, many]
    entry: list[Any] = ["z", ["10.0.0.26", 7946], "alive", 1, GOOD_META, None, 0]
    field = draw(st.integers(0, 7))
    bad_entry_field: dict[int, st.SearchStrategy[Any]] = {
        0: BAD["name"],
        1: BAD["addr"],
        2: st.one_of(st.text(max_size=8).filter(lambda s: s not in STATE_NAMES), wrong_type(str)),
        3: BAD["alive_inc"],
        4: BAD["meta"],
        5: bad_load().filter(lambda v: v is not None),
        6: bad_int(0, MAX_LOAD_VERSION),
    }
    if field == 7:
        entry = entry[: draw(st.integers(0, 6))]
    else:
        entry[field] = draw(bad_entry_field[field])
    at = draw(st.integers(0, len(good)))
    return [9, "x", draw(st.booleans()), [*good[:at], entry, *good[at:]]]


@settings(FUZZ, max_examples=100)
@given(hostile_push_pull())
def test_hostile_push_pulls_are_refused_counted_and_change_nothing(msg: list[Any]) -> None:
    core = healthy_core()
    before = core.members()
    frame = seal_payload(msgpack.packb(msg), src="x", sent=1.0)
    answer, out = core.answer_push_pull(1.0, addr_of("x"), frame)
    assert answer is None and out == []
    assert core.members() == before
    assert core.counters["dropped_push_pull"] == 1
    assert not hostile_urls_in(core)


HOSTILE_META = NodeMeta("http://10.6.6.6:32768", ("m1",), "ready")
INCARNATIONS = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2, MAX_INCARNATION - 1, MAX_INCARNATION, MAX_INCARNATION + 1]),
    st.sampled_from([2**62, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1]),
)


@settings(FUZZ, max_examples=100)
@given(st.sampled_from(["suspect", "dead", "left", "alive"]), INCARNATIONS)
@example("dead", 2**63 - 1)
@example("suspect", MAX_INCARNATION - 1)
@example("alive", MAX_INCARNATION)
def test_accusations_at_any_incarnation_never_kill_or_rewrite_the_victim(
    kind: str, incarnation: int
) -> None:
    """Whatever number an accusation of ``a`` carries, sent to ``a`` and to its peer ``b``:
    after ``a`` has gossiped for two seconds, ``b`` holds ``a`` alive with its own meta,
    every packet ``a`` sent was accepted, and ``a``'s incarnation is within the cap. (A forged
    alive at the cap itself is the one claim ``a`` cannot outbid; see ``state.py``.)"""
    a, b = make_core("a"), make_core("b", seed=2)
    join(a, "b")
    join(b, "a")
    forged: Message = (
        Suspect("a", incarnation, "x")
        if kind == "suspect"
        else Dead("a", incarnation, "x")
        if kind == "dead"
        else Left("a", incarnation)
        if kind == "left"
        else Alive("a", incarnation, addr_of("a"), HOSTILE_META)
    )
    feed(a, forged, src="x")
    feed(b, forged, src="x")
    b_drops = dropped(b)
    for send in sent(drain(a, 2.0)):
        if send.addr == b.addr:
            b.receive(2.0, a.addr, send.data)
    assert dropped(b) == b_drops  # nothing a says is refused
    info = b.member("a")
    assert info is not None and info.state is MemberState.ALIVE
    assert a.incarnation <= MAX_INCARNATION
    if kind == "alive" and incarnation == MAX_INCARNATION:
        assert info.meta in (META, HOSTILE_META)  # the last word cannot be outbid (state.py)
    else:
        assert info.meta == META
