"""The member-state rules, all in one place (like h11 ``_state.py``: everything that decides
how a member's state may change lives here, and nowhere else).

Every membership message is judged against the local record of the member it names, and the
judgement is one :class:`Verdict`. The core then carries the verdict out (mutates the record,
starts or stops a suspicion timer, queues a broadcast, emits an event); it never second-guesses
it. The rules, for a member other than ourselves, with ``i`` the incarnation we hold and
``j`` the one in the message (SWIM, Das et al. 2002, section 4.2; memberlist ``state.go``)::

    message        unknown   alive        suspect      dead         left
    alive   j      APPLY     j > i        j > i        (*)          (*)
    suspect j      IGNORE    j >= i       CONFIRM      IGNORE       IGNORE
                              (j >= i)
    dead    j      IGNORE    j >= i       j >= i       IGNORE       IGNORE
    left    j      IGNORE    j >= i       j >= i       j >= i       IGNORE

    (*) j > i, or the message names a new address (a restarted node reclaiming its name)

Anything not allowed is IGNORE. An alive message that names a *different address* for a
member that is alive or suspect is a CONFLICT: the existing address is kept and the conflict
counted. Note that an alive at the same incarnation never overrides suspect, dead or left, so
an old alive replayed later cannot resurrect a dead member.

The incarnation cap (:data:`~quorum.gossip.messages.MAX_INCARNATION`, M; the codec drops
anything above it): accusations (suspect, dead, left) carry at most M - 1 and alive messages
at most M, so a member accused at any incarnation the codec lets through refutes, at M at
most, and every peer accepts that refutation. Nothing is ever encoded that a peer's decoder
refuses, so a forged number can no longer leave a member dead until it restarts.

What the cap cannot do: an *alive* about a member at M itself, forged by a key holder with
other meta, cannot be outbid (no order with a largest element can, and a key holder can
impersonate any member). The member keeps answering probes, so it is never declared dead; it
announces itself at M (``incarnation_capped`` counts it), and peers that took the forged alive
keep its meta. The way out is a fresh start: stop the member until every peer has declared it
dead and forgotten it (its suspicion timeout plus ``gossip_to_the_dead_time``), and it rejoins
as a new member at incarnation 1. Honest nodes never come near M (see
:data:`~quorum.gossip.messages.MAX_INCARNATION`); a forged alive *below* M is refuted as usual.

About ourselves, only we may raise our incarnation. A suspect, dead or left message with
``j >= i`` (while we are not leaving), or an alive message that is newer than ours or that
disagrees with us at our own incarnation, is answered by REFUTE: we take the incarnation
``max(i, j) + 1`` and announce ourselves alive. That is also how a node restarted under the
same name rejoins: it starts at incarnation 1, hears that the cluster holds it at ``j`` (alive,
suspect or dead), and refutes with ``j + 1``, never more than M (see above). A suspect or dead
message about us with ``j < i`` means its sender missed our refutation: REMIND sends our
current alive to that sender only (memberlist ignores it; then a member whose few refutation
broadcasts were all lost keeps suspecting us until its timeout declares us dead, seen at 10%
loss).

Load figures follow the same ownership rule with their own counter: a newer version
replaces an older one; a load about ourselves at or above our own version makes us jump our
version above it (REFUTE).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .messages import (
    MAX_INCARNATION,
    Addr,
    Alive,
    Dead,
    Left,
    Load,
    MemberInfo,
    MemberState,
    NodeMeta,
    Suspect,
)

__all__ = [
    "Member",
    "Verdict",
    "judge_alive",
    "judge_dead",
    "judge_left",
    "judge_load",
    "judge_suspect",
    "refuting_incarnation",
]

_GONE = (MemberState.DEAD, MemberState.LEFT)


class Verdict(enum.Enum):
    """What to do with a membership message."""

    IGNORE = "ignore"
    """Stale, redundant, or about a member we do not know."""
    APPLY = "apply"
    """Take the state and incarnation the message carries."""
    CONFIRM = "confirm"
    """Another suspicion of a member already suspect (Lifeguard: shortens the timeout)."""
    REFUTE = "refute"
    """The message is about us and wrong: raise our incarnation and announce ourselves."""
    CONFLICT = "conflict"
    """A second address claims the name of a live member: keep the existing, count it."""
    REMIND = "remind"
    """An old suspicion or death of ours: tell its sender our current alive, directly."""


@dataclass(slots=True)
class Member:
    """The local record of one member (mutable; owned by the core).

    ``state_change``: virtual time in seconds of the last state change, used to forget dead
    members and to stop gossiping to them.
    """

    name: str
    addr: Addr
    state: MemberState
    incarnation: int
    meta: NodeMeta
    state_change: float
    load: Load | None = None
    load_version: int = 0

    def info(self) -> MemberInfo:
        """An immutable snapshot of this record."""
        return MemberInfo(
            name=self.name,
            addr=self.addr,
            state=self.state,
            incarnation=self.incarnation,
            meta=self.meta,
            load=self.load,
            load_version=self.load_version,
        )


def refuting_incarnation(own: int, claimed: int) -> int:
    """The incarnation we take to refute a claim made at ``claimed``: one above both, but
    never above :data:`~quorum.gossip.messages.MAX_INCARNATION` (accusations stay below it,
    so only a forged alive at the cap itself meets the ceiling)."""
    return min(max(own, claimed) + 1, MAX_INCARNATION)


def judge_alive(current: Member | None, msg: Alive, *, is_self: bool, leaving: bool) -> Verdict:
    """Judge ``Alive(node, j, addr, meta)`` against our record of ``node``."""
    if is_self:
        assert current is not None
        if leaving or msg.incarnation < current.incarnation:
            return Verdict.IGNORE
        if (
            msg.incarnation == current.incarnation
            and msg.addr == current.addr
            and msg.meta == current.meta
        ):
            return Verdict.IGNORE
        return Verdict.REFUTE
    if current is None:
        return Verdict.APPLY
    if msg.addr != current.addr:
        return Verdict.APPLY if current.state in _GONE else Verdict.CONFLICT
    return Verdict.APPLY if msg.incarnation > current.incarnation else Verdict.IGNORE


def _judge_accusation(
    current: Member | None, incarnation: int, *, is_self: bool, leaving: bool
) -> Verdict | None:
    """What suspect and dead messages share: an unknown member, an accusation of ourselves
    (REFUTE at or above our incarnation, REMIND below it), a stale one. None: judge on."""
    if current is None:
        return Verdict.IGNORE
    if is_self and not leaving:
        return Verdict.REFUTE if incarnation >= current.incarnation else Verdict.REMIND
    if is_self or incarnation < current.incarnation:
        return Verdict.IGNORE
    return None


def judge_suspect(current: Member | None, msg: Suspect, *, is_self: bool, leaving: bool) -> Verdict:
    """Judge ``Suspect(node, j, source)`` against our record of ``node``."""
    verdict = _judge_accusation(current, msg.incarnation, is_self=is_self, leaving=leaving)
    if verdict is not None:
        return verdict
    assert current is not None
    if current.state is MemberState.ALIVE:
        return Verdict.APPLY
    if current.state is MemberState.SUSPECT:
        return Verdict.CONFIRM
    return Verdict.IGNORE


def judge_dead(current: Member | None, msg: Dead, *, is_self: bool, leaving: bool) -> Verdict:
    """Judge ``Dead(node, j, source)`` against our record of ``node``."""
    verdict = _judge_accusation(current, msg.incarnation, is_self=is_self, leaving=leaving)
    if verdict is not None:
        return verdict
    assert current is not None
    if current.state in _GONE:
        return Verdict.IGNORE
    return Verdict.APPLY


def judge_left(current: Member | None, msg: Left, *, is_self: bool, leaving: bool) -> Verdict:
    """Judge ``Left(node, j)`` against our record of ``node``. A left replaces a dead at
    the same incarnation (it says more: the member went on purpose), never the reverse."""
    if current is None or msg.incarnation < current.incarnation:
        return Verdict.IGNORE
    if is_self:
        return Verdict.IGNORE if leaving else Verdict.REFUTE
    if current.state is MemberState.LEFT:
        return Verdict.IGNORE
    return Verdict.APPLY


def judge_load(current: Member | None, version: int, load: Load, *, is_self: bool) -> Verdict:
    """Judge a load figure at ``version`` against our record (newer version wins)."""
    if current is None:
        return Verdict.IGNORE
    if is_self:
        if version > current.load_version or (
            version == current.load_version and load != current.load
        ):
            return Verdict.REFUTE
        return Verdict.IGNORE
    return Verdict.APPLY if version > current.load_version else Verdict.IGNORE
