"""Validly sealed packets with hostile contents: names, addresses, URLs and counts are bounded,
and a bad one is dropped and counted, never raised; the routing view never takes a member
whose URL is not an http(s) base URL."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from gossip_helpers import CONFIG, META, addr_of, feed, join, make_core, seal_payload

from quorum.gossip.messages import (
    Alive,
    Load,
    MemberInfo,
    MemberState,
    NodeMeta,
)
from quorum.routing.membership import GossipMembership, Member

GOOD_META: list[Any] = ["http://10.0.0.9:32768", ["m1"], "ready"]


def alive(name: Any = "z", host: Any = "10.0.0.9", meta: Any = None, port: Any = 7946) -> bytes:
    """The msgpack of an alive message, built field by field (no validation on the way)."""
    return msgpack.packb([6, name, 1, [host, port], GOOD_META if meta is None else meta])


HOSTILE_ALIVES = {
    "file URL": alive(meta=["file:///etc/passwd", ["m1"], "ready"]),
    "javascript URL": alive(meta=["javascript:alert(1)", ["m1"], "ready"]),
    "gopher URL": alive(meta=["gopher://10.0.0.9:70/", ["m1"], "ready"]),
    "URL without host": alive(meta=["http://", ["m1"], "ready"]),
    "URL with user info": alive(meta=["http://u:p@10.0.0.9:1", ["m1"], "ready"]),
    "URL with a newline": alive(meta=["http://10.0.0.9:1/\nHost: x", ["m1"], "ready"]),
    "URL with a space": alive(meta=[" http://10.0.0.9:1", ["m1"], "ready"]),
    "URL with a bad port": alive(meta=["http://10.0.0.9:99999", ["m1"], "ready"]),
    "URL with a query": alive(meta=["http://10.0.0.9:1/?to=evil", ["m1"], "ready"]),
    "empty URL": alive(meta=["", ["m1"], "ready"]),
    "URL of 2049 characters": alive(meta=["http://h/" + "a" * 2040, [], "ready"]),
    "URL not a string": alive(meta=[7, ["m1"], "ready"]),
    "model with control characters": alive(meta=[GOOD_META[0], ["m\x1b[2J"], "ready"]),
    "empty model": alive(meta=[GOOD_META[0], [""], "ready"]),
    "repeated model": alive(meta=[GOOD_META[0], ["m1", "m1"], "ready"]),
    "model not a string": alive(meta=[GOOD_META[0], [["m1"]], "ready"]),
    "meta over max_meta_size": alive(
        meta=["http://10.0.0.9:1", [f"model-{i:03d}" for i in range(96)], "ready"]
    ),
    "name with an escape sequence": alive(name="z\x1b]0;pwned\x07"),
    "name with a newline": alive(name="z\nINFO fake log line"),
    "name of 129 characters": alive(name="z" * 129),
    "empty name": alive(name=""),
    "name not a string": alive(name=12),
    "host name instead of an IP": alive(host="evil.example.com"),
    "host with a space": alive(host="10.0.0.9 "),
    "host of 300 characters": alive(host="1" * 300),
    "port not an int": alive(port="7946"),
}


@pytest.mark.parametrize("data", HOSTILE_ALIVES.values(), ids=HOSTILE_ALIVES.keys())
def test_hostile_alive_is_dropped_and_counted(data: bytes) -> None:
    core = make_core()
    join(core, "b")
    before = core.members()
    assert core.receive(0.0, addr_of("x"), seal_payload(data)) == []
    assert core.members() == before
    drops = {k: v for k, v in core.counters.items() if k.startswith("dropped_") and v}
    assert drops in ({"dropped_decode": 1}, {"dropped_oversize": 1})
    assert core.counters["accepted"] == 1  # only the join


def test_the_good_alive_that_the_hostile_ones_are_made_from_is_accepted() -> None:
    core = make_core()
    core.receive(0.0, addr_of("x"), seal_payload(alive()))
    info = core.member("z")
    assert info is not None and info.meta.http_url == GOOD_META[0]


def test_hostile_push_pull_entry_refuses_the_whole_push_pull() -> None:
    core = make_core()
    entry: list[Any] = ["z", ["10.0.0.9", 7946], "alive", 1, ["gopher://x/", [], "ready"], None, 0]
    data = seal_payload(msgpack.packb([9, "z", False, [entry]]))
    answer, out = core.answer_push_pull(0.0, addr_of("z"), data)
    assert answer is None and out == []
    assert core.counters["dropped_decode"] == core.counters["dropped_push_pull"] == 1
    assert [m.name for m in core.members()] == ["a"]


def test_member_table_is_bounded() -> None:
    core = make_core(config=CONFIG.replace(max_push_pull_members=8))
    for i in range(20):
        feed(core, Alive(f"n{i:02d}", 1, addr_of(f"n{i:02d}"), META))
    assert len(core.members()) == 8  # ourselves and the first seven
    assert core.counters["members_refused"] == 13
    feed(core, Alive("n00", 2, addr_of("n00"), META))  # a known member still updates
    info = core.member("n00")
    assert info is not None and info.incarnation == 2


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://10.0.0.9/", "http://", "http://u:p@h/", "http://h/?q"]
)
def test_own_meta_must_have_an_http_base_url(url: str) -> None:
    with pytest.raises(ValueError, match="http_url"):
        NodeMeta(url, ("m1",), "ready")


def raw_meta(**fields: Any) -> NodeMeta:
    """A NodeMeta with whatever fields, past its own checks (as no decoder would make one)."""
    meta = object.__new__(NodeMeta)
    values = {"http_url": "http://10.0.0.9:1", "models": ("m1",), "state": "ready"}
    values.update(fields)
    for key, value in {"weights": (), **values}.items():
        object.__setattr__(meta, key, value)
    return meta


class StubGossip:
    """The part of GossipNode that GossipMembership reads."""

    def __init__(self, infos: list[MemberInfo]) -> None:
        self.infos = infos

    def member(self, name: str) -> MemberInfo | None:
        return next((m for m in self.infos if m.name == name), None)

    def members(self) -> list[MemberInfo]:
        return self.infos


def test_routing_view_leaves_out_members_with_hostile_meta() -> None:
    hostile = {
        "file": raw_meta(http_url="file:///etc/passwd"),
        "gopher": raw_meta(http_url="gopher://10.0.0.9:70/"),
        "no-host": raw_meta(http_url="http:///v1"),
        "huge": raw_meta(http_url="http://h/" + "a" * 100_000),
        "int-url": raw_meta(http_url=7),
        "int-models": raw_meta(models=(1, 2)),
        "list-models": raw_meta(models=["m1"]),
        "huge-model": raw_meta(models=("m" * 100_000,)),
        "bad-state": raw_meta(state="pwned"),
        "nan-weight": raw_meta(weights=(float("nan"),)),
    }
    infos = [
        MemberInfo(name, ("10.0.0.9", 7946), MemberState.ALIVE, 1, meta, Load(0, 1, 0), 1)
        for name, meta in hostile.items()
    ]
    good = NodeMeta("https://node-b.example:8443/quorum", ("m1",), "ready")
    infos.append(MemberInfo("b", ("10.0.0.2", 7946), MemberState.ALIVE, 1, good))
    me = Member(name="a", url="http://127.0.0.1:1", state="alive", node_state="ready", models=())
    membership = GossipMembership(lambda: me, StubGossip(infos))  # type: ignore[arg-type]
    assert [m.name for m in membership.members()] == ["a", "b"]
    assert membership.members()[1].url == "https://node-b.example:8443/quorum"
