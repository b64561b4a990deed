"""Gossip membership: SWIM with the Lifeguard refinements, over msgpack datagrams.

Layers, lowest first (nothing here imports anything above ``quorum.gossip``):

* :mod:`~quorum.gossip.messages`: the wire messages and value types.
* :mod:`~quorum.gossip.codec`, :mod:`~quorum.gossip.keyring`: msgpack and AES-GCM.
* :mod:`~quorum.gossip.freshness`: the replay window (sender, life and time in every packet).
* :mod:`~quorum.gossip.state`: the member-state rules, in one place.
* :mod:`~quorum.gossip.core`: the sans-IO state machine (``receive``/``tick``/``next_deadline``).
* :mod:`~quorum.gossip.transport`, :mod:`~quorum.gossip.runner`: trio, UDP and TCP.
* :mod:`~quorum.gossip.sim`: a seeded virtual-time network for tests and benchmarks.
"""

from __future__ import annotations

from .config import GossipConfig, PlaintextGossipError
from .core import GossipCore
from .events import (
    MemberDied,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
    MemberUpdated,
    Output,
    PushPullRequest,
    Send,
)
from .messages import MAX_USAGE, Addr, Load, MemberInfo, MemberState, NodeMeta, Usage
from .runner import GossipNode

__all__ = [
    "MAX_USAGE",
    "Addr",
    "GossipConfig",
    "GossipCore",
    "GossipNode",
    "Load",
    "MemberDied",
    "MemberEvent",
    "MemberInfo",
    "MemberJoined",
    "MemberLeft",
    "MemberState",
    "MemberSuspected",
    "MemberUpdated",
    "NodeMeta",
    "Output",
    "PlaintextGossipError",
    "PushPullRequest",
    "Send",
    "Usage",
]
