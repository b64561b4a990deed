"""What the sans-IO core hands back: datagrams to send, push-pulls to run, and membership
events. Frozen, slotted dataclasses, like h11's events."""

from __future__ import annotations

from dataclasses import dataclass

from .messages import Addr, MemberInfo

__all__ = [
    "MemberDied",
    "MemberEvent",
    "MemberJoined",
    "MemberLeft",
    "MemberSuspected",
    "MemberUpdated",
    "Output",
    "PushPullRequest",
    "Send",
]


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` (a sealed datagram, at most ``max_datagram`` bytes) to ``addr`` over UDP."""

    addr: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class PushPullRequest:
    """Open a TCP connection to ``addr``, send ``core.push_pull_payload(join)``, read the
    answer and give it to ``core.receive_push_pull``. ``join``: this exchange is a join
    attempt to a seed."""

    addr: Addr
    join: bool


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A member we did not know, or knew as dead or left, is alive."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """A live member changed: new meta or address, or a suspicion of it was refuted."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    """A member is suspect: it missed a probe; it will be declared dead unless it refutes."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberDied:
    """A member was declared dead by the failure detector."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member left the cluster on purpose."""

    member: MemberInfo


MemberEvent = MemberJoined | MemberUpdated | MemberSuspected | MemberDied | MemberLeft
Output = Send | PushPullRequest | MemberEvent
