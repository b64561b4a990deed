"""Hostile datagrams: random, truncated, bit-flipped and wrong-key packets never raise out of
the core, every one is counted, and memory stays flat.

Each test feeds 100,000 datagrams (about half a second: most fail AES-GCM authentication
in microseconds).
"""

from __future__ import annotations

import random
import tracemalloc

from gossip_helpers import CONFIG, META, addr_of, make_core

from quorum.gossip import codec
from quorum.gossip.config import GossipConfig
from quorum.gossip.core import GossipCore
from quorum.gossip.keyring import Keyring
from quorum.gossip.messages import (
    Ack,
    Alive,
    Compound,
    Dead,
    Header,
    Load,
    LoadUpdate,
    Message,
    Nack,
    Ping,
    PingReq,
    Suspect,
    Usage,
)

COUNT = 100_000
SAMPLES: list[Message] = [
    Ping(1, "a", "b"),
    PingReq(2, "c", addr_of("c"), "b", True),
    Ack(3),
    Nack(4),
    Suspect("c", 1, "b"),
    Alive("c", 1, addr_of("c"), META),
    Dead("c", 1, "b"),
    LoadUpdate("c", 2, Load(1, 1, 1)),
    LoadUpdate("c", 3, Load(1, 1, 1, (Usage("team-a", 2**40, 2**53 - 1, 5, 1),))),
    Compound((Ping(5, "a", "b"), Suspect("a", 1, "b"), Alive("d", 2, addr_of("d"), META))),
]


def hostile_datagrams(rng: random.Random, config: GossipConfig, count: int) -> list[bytes]:
    """Random bytes, truncations, bit flips, wrong keys, and plaintext msgpack soup."""
    label = config.cluster_name.encode()
    ring = Keyring(config.keys)
    wrong = Keyring([bytes(rng.randrange(256) for _ in range(16))])
    plain = Keyring()
    payloads = [
        codec.encode_envelope(Header("b", 1, i), codec.encode(m)) for i, m in enumerate(SAMPLES)
    ]
    out: list[bytes] = []
    for _ in range(count):
        payload = rng.choice(payloads)
        kind = rng.randrange(6)
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 1500))
        elif kind == 1:
            sealed = ring.seal(payload, label)
            data = sealed[: rng.randrange(len(sealed))]
        elif kind == 2:
            sealed = bytearray(ring.seal(payload, label))
            for pos in rng.sample(range(len(sealed)), rng.randrange(1, 4)):  # distinct bytes
                sealed[pos] ^= 1 << rng.randrange(8)
            data = bytes(sealed)
        elif kind == 3:
            data = wrong.seal(payload, label)
        elif kind == 4:  # msgpack-shaped plaintext with corrupted bytes
            soup = bytearray(payload)
            for _ in range(rng.randrange(1, 4)):
                soup[rng.randrange(len(soup))] = rng.randrange(256)
            data = plain.seal(bytes(soup[: rng.randrange(1, len(soup) + 1)]), label)
        else:
            data = ring.seal(payload, b"other-cluster")
        out.append(data)
    return out


def feed_all(core: GossipCore, datagrams: list[bytes]) -> None:
    src = addr_of("b")
    for i, data in enumerate(datagrams):
        core.receive(i * 1e-3, src, data)


def assert_all_counted(core: GossipCore, n: int) -> None:
    c = core.counters
    assert c["received"] == n
    dropped = sum(v for k, v in c.items() if k.startswith("dropped_") and k != "dropped_push_pull")
    assert dropped + c["accepted"] == n


def test_fuzzed_datagrams_never_raise_and_are_all_counted() -> None:
    rng = random.Random(2024)
    core = make_core()
    feed_all(core, hostile_datagrams(rng, CONFIG, COUNT))
    assert_all_counted(core, COUNT)
    assert core.counters["accepted"] == 0  # nothing forged gets through AES-GCM


def test_fuzzed_plaintext_core_never_raises() -> None:
    config = CONFIG.replace(keys=())
    rng = random.Random(7)
    core = make_core(config=config)
    feed_all(core, hostile_datagrams(rng, config, COUNT))
    assert_all_counted(core, COUNT)
    assert core.counters["dropped_decode"] > 0


def test_fuzzing_keeps_memory_flat() -> None:
    rng = random.Random(99)
    core = make_core()
    warmup = hostile_datagrams(rng, CONFIG, 2_000)
    batch = hostile_datagrams(rng, CONFIG, COUNT // 2)
    feed_all(core, warmup)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        feed_all(core, batch)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 64 * 1024, f"memory grew by {growth} bytes over {len(batch)} datagrams"
