"""Gossip timing and limits, with named presets (memberlist ``config.go``:
``DefaultLANConfig``, ``DefaultLocalConfig``)."""

from __future__ import annotations

import ipaddress
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import codec
from .keyring import KEY_SIZES, Keyring
from .messages import MAX_NAME_LEN

__all__ = ["GossipConfig", "PlaintextGossipError", "check_encryption", "is_loopback"]

_COMPOUND_SLACK = codec.compound_overhead(2**16 - 1)
"""Bytes a compound header may need around its parts."""


def _alive_room(config: GossipConfig) -> int:
    """Worst-case bytes of a datagram that carries one alive, besides its meta: the longest
    name and host and the largest numbers (``codec.alive_overhead``), the envelope of a
    sender with the longest name, and the sealing (29 bytes with keys, the cluster name and
    2 bytes without)."""
    sealing = Keyring(config.keys).overhead(config.cluster_name.encode())
    longest = "n" * MAX_NAME_LEN
    return codec.alive_overhead() + codec.envelope_overhead(longest) + sealing + _COMPOUND_SLACK


def _load_update_room(config: GossipConfig) -> int:
    """Worst-case bytes of a datagram that carries the largest load update (see
    :data:`~quorum.gossip.messages.MAX_USAGE`): the update, the envelope of a sender with the
    longest name, a compound header and the sealing. 1372 with keys."""
    sealing = Keyring(config.keys).overhead(config.cluster_name.encode())
    longest = "n" * MAX_NAME_LEN
    return (
        codec.max_load_update_size() + codec.envelope_overhead(longest) + sealing + _COMPOUND_SLACK
    )


class GossipConfig(BaseModel):
    """Every knob of the gossip layer. Times are in seconds, sizes in bytes.

    Build one with :meth:`lan` (the numbers of ``DESIGN.md``) or :meth:`local` (one machine),
    overriding fields by keyword. Typed (pydantic, strict): raises
    ``pydantic.ValidationError`` (a ``ValueError``) on nonsensical values.

    Failure detection (SWIM, Das et al. 2002; Lifeguard, Dadgar et al. 2018):
      ``probe_interval``: one probe per interval (scaled by the health multiplier).
      ``probe_timeout``: wait this long for a direct ack before asking helpers (scaled too).
      ``indirect_checks``: helpers asked to ping on our behalf (SWIM's k).
      ``suspicion_mult``: suspicion timeout = mult x max(1, log10 N) x probe_interval.
      ``suspicion_max_timeout_mult``: with no confirmations the timeout is this many times
      the minimum (Lifeguard's dynamic suspicion, memberlist ``suspicion.go``).
      ``awareness_max_multiplier``: health multiplier ceiling; the health score runs from 0
      to this minus 1 (Lifeguard's local health awareness, memberlist ``awareness.go``).
    Dissemination:
      ``gossip_interval``/``gossip_nodes``: piggyback rounds and their fan-out.
      ``retransmit_mult``: each update is sent mult x ceil(log10(N + 1)) times.
      ``gossip_to_the_dead_time``: keep gossiping to a dead/left member this long, so it can
      hear that it was declared dead and refute; afterwards its record is forgotten.
      ``max_datagram``: largest UDP datagram, sealed; it must hold the largest load update
      (1372 bytes with keys, see :data:`~quorum.gossip.messages.MAX_USAGE`).
    Anti-entropy:
      ``push_pull_interval``: full-state TCP exchange with one random member (scaled up
      beyond 32 members as memberlist does); 0 disables it.
      ``max_push_pull_members``: the largest cluster: a push-pull claiming more members is
      refused, and the member table (dead and left members included, until forgotten) holds
      at most this many, so no number of push-pulls can introduce more. 512: Quorum
      clusters are a handful of machines, the simulator's largest runs 200.
      :attr:`max_push_pull_bytes` (derived): the largest frame read from a peer, before it
      is decrypted.
      ``max_push_pull_conns``: push-pull connections served at once; more are closed at
      once and counted (``dropped_tcp_busy``). 16: a node starts one push-pull every
      ``push_pull_interval`` and each takes milliseconds, so even 512 members rarely put two
      on one peer at a time; joins refused in a burst retry with backoff.
      ``tcp_timeout``: connect/read/write bound; a push-pull request not read within it is
      cut (``dropped_tcp_slow``).
      ``join_retry_interval``/``join_retry_max``: retry the seeds, with backoff, while no
      other member is alive.
    Identity and security:
      ``cluster_name``: associated data of every packet (a packet for another cluster is
      dropped). ``keys``: AES-GCM keys, the first encrypts; empty means plaintext.
      ``max_meta_size``: encoded ``NodeMeta`` must fit in this many bytes.
      ``freshness_window``: a packet older than this when it arrives is dropped (see
      :mod:`quorum.gossip.freshness`). 30 s: well beyond any delivery delay or stall of a
      live node (the failure detector gives up on a member long before), and at least
      ``tcp_timeout``, the longest a push-pull may take. ``freshness_retention``: how long a
      sender's life and clock offset are remembered after its last packet; 120 s outlives
      ``gossip_to_the_dead_time`` plus the window, so by the time we would take a replayed
      packet of a dead sender as new, its member record is long gone.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    probe_interval: float = Field(default=1.0, gt=0)
    probe_timeout: float = Field(default=0.5, gt=0)
    indirect_checks: int = Field(default=3, ge=0)
    suspicion_mult: int = Field(default=4, ge=1)
    suspicion_max_timeout_mult: int = Field(default=6, ge=1)
    awareness_max_multiplier: int = Field(default=8, ge=1)
    retransmit_mult: int = Field(default=4, ge=1)
    gossip_interval: float = Field(default=0.2, gt=0)
    gossip_nodes: int = Field(default=3, ge=1)
    gossip_to_the_dead_time: float = Field(default=30.0, ge=0)
    max_datagram: int = Field(default=1400, ge=256, le=65_000)
    push_pull_interval: float = Field(default=30.0, ge=0)
    max_push_pull_members: int = Field(default=512, ge=1)
    max_push_pull_conns: int = Field(default=16, ge=1)
    tcp_timeout: float = Field(default=10.0, gt=0)
    join_retry_interval: float = Field(default=1.0, gt=0)
    join_retry_max: float = Field(default=30.0, gt=0)
    cluster_name: str = Field(default="quorum", min_length=1)
    keys: Annotated[tuple[bytes, ...], Field(strict=False)] = ()
    max_meta_size: int = Field(default=960, ge=1)
    freshness_window: float = Field(default=30.0, gt=0)
    freshness_retention: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> GossipConfig:
        """The checks between fields (each field's own range is on the field)."""
        if not self.tcp_timeout <= self.freshness_window <= self.freshness_retention:
            raise ValueError(
                "GossipConfig needs tcp_timeout <= freshness_window <= freshness_retention"
            )
        if self.probe_timeout >= self.probe_interval:
            raise ValueError("GossipConfig.probe_timeout must be shorter than probe_interval")
        if len(self.cluster_name.encode()) > 255:
            raise ValueError("GossipConfig.cluster_name must be 1..255 bytes of UTF-8")
        for key in self.keys:
            if len(key) not in KEY_SIZES:
                raise ValueError("GossipConfig.keys must be 16, 24 or 32 bytes each")
        room = _alive_room(self)
        if self.max_meta_size > self.max_datagram - room:
            raise ValueError(
                f"GossipConfig.max_meta_size must leave {room} bytes of the datagram "
                "for the rest of an alive message (name, address, envelope, sealing)"
            )
        need = _load_update_room(self)
        if need > self.max_datagram:
            raise ValueError(
                f"GossipConfig.max_datagram must be at least {need} bytes: the largest load "
                "update (with its per-key usage), its envelope and sealing must fit one "
                "datagram (a plaintext cluster's name counts: use a shorter one, or keys)"
            )
        return self

    @classmethod
    def lan(cls, **overrides: Any) -> GossipConfig:
        """memberlist's LAN numbers: probe 1 s / timeout 500 ms, 3 indirect checks,
        suspicion mult 4, retransmit mult 4, gossip 200 ms to 3 nodes, push-pull 30 s,
        datagrams of 1400 bytes."""
        return cls(**overrides)

    @classmethod
    def local(cls, **overrides: Any) -> GossipConfig:
        """Faster numbers for a cluster on one machine or in tests (in the spirit of
        memberlist ``DefaultLocalConfig``): probe 500 ms / timeout 200 ms, 1 indirect
        check, suspicion mult 3, retransmit mult 2, gossip 100 ms to 3 nodes, push-pull
        15 s, TCP timeout 1 s."""
        values: dict[str, Any] = {
            "probe_interval": 0.5,
            "probe_timeout": 0.2,
            "indirect_checks": 1,
            "suspicion_mult": 3,
            "retransmit_mult": 2,
            "gossip_interval": 0.1,
            "gossip_to_the_dead_time": 15.0,
            "push_pull_interval": 15.0,
            "tcp_timeout": 1.0,
            "join_retry_interval": 0.2,
            "join_retry_max": 2.0,
        }
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> GossipConfig:
        """A copy with some fields changed, checked again."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**fields, **changes})

    # --- derived numbers -----------------------------------------------------------------

    def retransmit_limit(self, n_members: int) -> int:
        """Sends per update: ``retransmit_mult x ceil(log10(N + 1))`` (memberlist
        ``util.go`` ``retransmitLimit``)."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n_members + 1)))

    def suspicion_min_timeout(self, n_members: int) -> float:
        """Seconds: ``suspicion_mult x max(1, log10 N) x probe_interval`` (memberlist
        ``util.go`` ``suspicionTimeout``)."""
        scale = max(1.0, math.log10(max(1, n_members)))
        return self.suspicion_mult * scale * self.probe_interval

    def push_pull_every(self, n_members: int) -> float:
        """Seconds between push-pulls: the interval, doubled for every doubling beyond 32
        members (memberlist ``util.go`` ``pushPullScale``)."""
        threshold = 32
        if n_members <= threshold:
            return self.push_pull_interval
        multiplier = math.ceil(math.log2(n_members) - math.log2(threshold)) + 1
        return self.push_pull_interval * multiplier

    @property
    def max_push_pull_bytes(self) -> int:
        """The largest push-pull frame in bytes, checked before anything is decrypted: what
        a push-pull of ``max_push_pull_members`` members needs when every field is at its
        largest (``codec.max_push_pull_size``: about 2.2 KB a member with the default
        960-byte meta and a load with :data:`~quorum.gossip.messages.MAX_USAGE` usage
        entries), sealed. 1.1 MB for the defaults; honest frames are far smaller (about 100
        bytes a member, plus about 40 per usage entry)."""
        sealing = Keyring(self.keys).overhead(self.cluster_name.encode())
        return codec.max_push_pull_size(self.max_push_pull_members, self.max_meta_size) + sealing

    @property
    def nack_timeout(self) -> float:
        """Seconds a helper waits for the target before answering a ping-req with a nack:
        80% of the probe timeout, so the nack reaches the requester before its probe
        round ends."""
        return self.probe_timeout * 0.8


class PlaintextGossipError(ValueError):
    """Gossip without keys on an address other hosts can reach. Raised before anything is
    bound; the message names the fix (set ``[gossip] keys``)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal, or ``"localhost"``) only reaches this machine:
    127.0.0.0/8, ``::1`` or ``localhost``. Anything else, including the wildcards ``0.0.0.0``
    and ``::`` and every other host name, is taken as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_encryption(config: GossipConfig, host: str) -> bool:
    """The plaintext rule: a node never gossips unencrypted where another host can reach it
    (anyone who can send it a datagram could add a member with any URL, and entry nodes would
    send prompts there).

    ``host``: the address gossip binds to. Returns True when the gossip will be plaintext on
    a loopback address (allowed, for tests and a cluster on one machine; the caller warns),
    False when it is encrypted. Raises :class:`PlaintextGossipError` when ``config.keys`` is
    empty and ``host`` is not loopback (see :func:`is_loopback`).
    """
    if config.keys:
        return False
    if not is_loopback(host):
        raise PlaintextGossipError(
            f"gossip would run unencrypted on {host}, which other hosts can reach: set "
            "[gossip] keys (base64 AES keys of 16, 24 or 32 bytes, the same on every node; "
            'e.g. python3 -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())"'
            "), or bind gossip to 127.0.0.1 for a cluster on one machine"
        )
    return True
