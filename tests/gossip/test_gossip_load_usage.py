"""Per-key quota usage rides on a node's load: the largest load fits one sealed datagram, a
usage-only change is published like any other load change, and a peer takes it exactly."""

from __future__ import annotations

import random

import msgpack
import pytest
from gossip_helpers import CONFIG, META, addr_of, drain, feed, join, make_core, opened, sent

from quorum.gossip import codec
from quorum.gossip.config import GossipConfig
from quorum.gossip.core import GossipCore
from quorum.gossip.keyring import Keyring
from quorum.gossip.messages import (
    MAX_EPOCH,
    MAX_KEY_LEN,
    MAX_LOAD_VERSION,
    MAX_NAME_LEN,
    MAX_SENT_MS,
    MAX_USAGE,
    MAX_USAGE_FIGURE,
    MAX_WINDOW,
    Alive,
    Header,
    Load,
    LoadUpdate,
    Usage,
)

LONGEST = "n" * MAX_NAME_LEN
LARGEST = Load(
    2**31 - 1,
    2**31 - 1,
    2**31 - 1,
    tuple(
        Usage(f"{i:02d}".ljust(MAX_KEY_LEN, "k"), MAX_WINDOW, *[MAX_USAGE_FIGURE] * 3)
        for i in range(MAX_USAGE)
    ),
)
"""A load at its largest: the largest figures and MAX_USAGE entries of 64-byte keys."""


def sealed_size(message: bytes, config: GossipConfig) -> int:
    """Bytes of ``message`` as the core sends it at worst: in a compound (the piggyback
    form), in an envelope from a sender of the longest name at the largest epoch and time,
    sealed with ``config``'s keyring and cluster name."""
    header = Header(LONGEST, MAX_EPOCH, MAX_SENT_MS)
    payload = codec.encode_envelope(header, codec.encode_compound([message]))
    return len(Keyring(config.keys).seal(payload, config.cluster_name.encode()))


def test_the_largest_load_update_fits_one_sealed_datagram_and_one_more_entry_would_not() -> None:
    largest = codec.encode(LoadUpdate(LONGEST, MAX_LOAD_VERSION, LARGEST))
    assert len(largest) == codec.max_load_update_size() == 1188
    assert sealed_size(largest, CONFIG) <= CONFIG.max_datagram == 1400
    entry = ["k" * MAX_KEY_LEN, MAX_WINDOW, *[MAX_USAGE_FIGURE] * 3]
    load = [*[2**31 - 1] * 3, [entry] * (MAX_USAGE + 1)]
    one_more = msgpack.packb([11, LONGEST, MAX_LOAD_VERSION, load])
    assert sealed_size(one_more, CONFIG) > CONFIG.max_datagram  # MAX_USAGE is the most


def test_a_plaintext_cluster_name_that_leaves_no_room_for_the_largest_load_is_refused() -> None:
    plain = GossipConfig.lan(cluster_name="c" * 55)
    largest = codec.encode(LoadUpdate(LONGEST, MAX_LOAD_VERSION, LARGEST))
    assert sealed_size(largest, plain) <= plain.max_datagram
    with pytest.raises(ValueError, match="largest load update"):
        GossipConfig.lan(cluster_name="c" * 56)
    with pytest.raises(ValueError, match="largest load update"):
        CONFIG.replace(max_datagram=1371, max_meta_size=500)
    CONFIG.replace(max_datagram=1372, max_meta_size=500)


def test_the_largest_load_is_gossiped_by_the_longest_named_node_and_taken_exactly() -> None:
    a = GossipCore(LONGEST, addr_of(LONGEST), META, CONFIG, rng=random.Random(1), now=0.0)
    b = make_core("b", seed=2)
    join(a, "b")
    feed(b, Alive(LONGEST, 1, addr_of(LONGEST), META))
    drain(a, 5.0)  # the join news is out
    a.set_load(LARGEST)
    sends = sent(drain(a, 10.0))
    assert sends and all(len(s.data) <= CONFIG.max_datagram for s in sends)
    assert any(isinstance(m, LoadUpdate) and m.load == LARGEST for s in sends for m in opened(s))
    for s in sends:
        b.receive(10.0, a.addr, s.data)
    info = b.member(LONGEST)
    assert info is not None and info.load == LARGEST
    assert b.counters["dropped_oversize"] == b.counters["dropped_decode"] == 0


def test_a_change_of_usage_alone_is_published_with_a_new_version() -> None:
    a, b = make_core("a"), make_core("b", seed=2)
    join(a, "b")
    join(b, "a")
    drain(a, 5.0)
    a.set_load(Load(1, 2, 3))
    first = a.member("a")
    assert first is not None
    usage = (Usage("team-a", 100, 4, 900, 1), Usage("team-b", 100, 1, 10, 0))
    a.set_load(Load(1, 2, 3, usage))
    own = a.member("a")
    assert own is not None and own.load_version == first.load_version + 1
    a.set_load(Load(1, 2, 3, usage))  # the same load again: nothing new
    assert (a.member("a") or own).load_version == own.load_version
    for s in sent(drain(a, 10.0)):
        if s.addr == b.addr:
            b.receive(10.0, a.addr, s.data)
    info = b.member("a")
    assert info is not None and info.load == Load(1, 2, 3, usage)
    assert info.load_version == own.load_version
    a.set_load(Load(1, 2, 3, ()))  # the window is over: usage gone is news too
    for s in sent(drain(a, 15.0)):
        if s.addr == b.addr:
            b.receive(15.0, a.addr, s.data)
    assert (b.member("a") or info).load == Load(1, 2, 3)


def test_a_load_resent_unchanged_reaches_a_member_that_joined_after_its_retransmits() -> None:
    """The membership layer republishes an unchanged load when a member joins: without
    ``resend`` the late member would wait for the next push-pull to learn it."""
    a, c = make_core("a"), make_core("c", seed=3)
    join(a, "b")
    drain(a, 5.0)
    a.set_load(Load(0, 24, 0))
    drain(a, 10.0)  # its retransmits are spent, on b
    join(a, "c")
    join(c, "a")

    def load_at_c(until: float) -> Load | None:
        for s in sent(drain(a, until)):
            if s.addr == c.addr:
                c.receive(until, a.addr, s.data)
        info = c.member("a")
        return None if info is None else info.load

    assert load_at_c(12.0) is None  # an equal load is not news...
    a.set_load(Load(0, 24, 0))
    assert load_at_c(13.0) is None
    before = a.member("a")
    a.set_load(Load(0, 24, 0), resend=True)  # ...unless resent
    assert load_at_c(14.0) == Load(0, 24, 0)
    after = a.member("a")
    assert before is not None and after is not None
    assert after.load_version == before.load_version  # the same news, not a new version
