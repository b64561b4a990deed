"""Helpers for driving one gossip core by hand in synchronous tests."""

from __future__ import annotations

import random

from quorum.gossip import codec
from quorum.gossip.config import GossipConfig
from quorum.gossip.core import GossipCore
from quorum.gossip.events import Output, Send
from quorum.gossip.keyring import Keyring
from quorum.gossip.messages import Addr, Alive, Compound, Header, MemberState, Message, NodeMeta

KEY = bytes(range(32))
CONFIG = GossipConfig.lan(keys=(KEY,), push_pull_interval=0)
META = NodeMeta(http_url="http://127.0.0.1:32768", models=("m1",), state="ready")


def addr_of(name: str) -> Addr:
    """A distinct fake address per node name."""
    return (f"10.0.0.{sum(name.encode()) % 250 + 1}", 7946)


def make_core(name: str = "a", *, config: GossipConfig = CONFIG, seed: int = 1) -> GossipCore:
    return GossipCore(name, addr_of(name), META, config, rng=random.Random(seed), now=0.0)


def seal_payload(
    payload: bytes,
    *,
    config: GossipConfig = CONFIG,
    src: str = "x",
    epoch: int = 1,
    sent: float = 0.0,
) -> bytes:
    """Seal already-encoded message bytes (hostile ones, say) as node ``src`` in its life
    ``epoch`` would at ``sent`` seconds into that life."""
    envelope = codec.encode_envelope(Header(src, epoch, round(sent * 1000)), payload)
    return Keyring(config.keys).seal(envelope, config.cluster_name.encode())


def seal(
    msg: Message,
    *,
    config: GossipConfig = CONFIG,
    src: str = "x",
    epoch: int = 1,
    sent: float = 0.0,
) -> bytes:
    return seal_payload(codec.encode(msg), config=config, src=src, epoch=epoch, sent=sent)


def feed(core: GossipCore, *msgs: Message, now: float = 0.0, src: str = "x") -> list[Output]:
    """Deliver ``msgs`` to ``core`` in one datagram, as if sent by node ``src`` at ``now``
    (its clock agrees with the core's)."""
    msg = msgs[0] if len(msgs) == 1 else Compound(tuple(msgs))
    return core.receive(now, addr_of(src), seal(msg, config=core.config, src=src, sent=now))


def join(core: GossipCore, *names: str, incarnation: int = 1) -> None:
    """Make ``core`` know ``names`` as alive members."""
    for name in names:
        feed(core, Alive(name, incarnation, addr_of(name), META))
        assert core.member(name) is not None


def opened(out: Output, *, config: GossipConfig = CONFIG) -> list[Message]:
    """The messages inside a ``Send`` output."""
    assert isinstance(out, Send)
    payload = Keyring(config.keys).open(out.data, config.cluster_name.encode())
    _, msg = codec.decode_packet(payload, max_size=config.max_datagram)
    return list(msg.parts) if isinstance(msg, Compound) else [msg]


def sent(outputs: list[Output]) -> list[Send]:
    return [o for o in outputs if isinstance(o, Send)]


def state_of(core: GossipCore, name: str) -> MemberState | None:
    info = core.member(name)
    return None if info is None else info.state


def drain(core: GossipCore, until: float) -> list[Output]:
    """Run ``core``'s timers up to virtual time ``until``; nobody answers."""
    outputs: list[Output] = []
    while (deadline := core.next_deadline()) <= until:
        outputs += core.tick(deadline)
    return outputs
