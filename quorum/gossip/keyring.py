"""Packet sealing: AES-GCM with a keyring, the cluster name as associated data.

A sealed packet is::

    version (1 byte) | nonce (12 random bytes) | AES-GCM ciphertext + 16-byte tag

with the UTF-8 cluster name as associated data, so a packet meant for another cluster fails
authentication even when both clusters share a key. The first key of the ring encrypts and
every key decrypts, which allows key rotation without downtime (memberlist ``keyring.go``,
``security.go``): add the new key everywhere, make it primary everywhere, then remove the old.

An empty keyring seals nothing (for tests and local experiments on loopback only, see
:func:`~quorum.gossip.config.check_encryption`): a plaintext packet is::

    0x00 | label length (1 byte) | label | payload

The payload the core seals is always an envelope (:mod:`quorum.gossip.codec`): the sender's
name, its epoch (life) and the time since that life began, then the message. Being inside the
AES-GCM ciphertext, that header is encrypted and authenticated with the message, so it cannot
be stripped or altered, and :mod:`quorum.gossip.freshness` can drop replayed packets by it
(AES-GCM alone authenticates a packet, but says nothing about *when* it was made).
A later format takes a new version byte; version 1 keeps its meaning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_SIZES", "Keyring", "OpenError"]

KEY_SIZES = (16, 24, 32)
"""Allowed key lengths in bytes: AES-128, AES-192, AES-256."""

_PLAINTEXT = 0
_AES_GCM_V1 = 1
_NONCE_SIZE = 12
_TAG_SIZE = 16


class OpenError(Exception):
    """A packet could not be authenticated or decrypted (wrong key, wrong cluster,
    corrupted, truncated, or plaintext where encryption is required). Internal: callers
    count it and drop the packet."""


class Keyring:
    """A list of AES-GCM keys; ``keys[0]`` encrypts, every key decrypts.

    ``keys``: 16, 24 or 32 bytes each; an empty sequence means plaintext packets.
    ``nonce_source``: ``n -> n random bytes``, ``os.urandom`` unless a test injects one.
    Raises ``ValueError`` on a key of another length or a duplicate key.
    """

    def __init__(
        self,
        keys: Iterable[bytes] = (),
        *,
        nonce_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._keys: tuple[bytes, ...] = tuple(bytes(k) for k in keys)
        for key in self._keys:
            if len(key) not in KEY_SIZES:
                raise ValueError(f"gossip keys must be 16, 24 or 32 bytes, got {len(key)}")
        if len(set(self._keys)) != len(self._keys):
            raise ValueError("duplicate key in gossip keyring")
        self._ciphers = [AESGCM(k) for k in self._keys]
        self._nonce_source = nonce_source

    @property
    def encrypted(self) -> bool:
        """Whether packets are sealed with AES-GCM (false for an empty keyring)."""
        return bool(self._keys)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The keys, primary first."""
        return self._keys

    def overhead(self, label: bytes) -> int:
        """Bytes that sealing adds to a payload: 29 with keys, ``2 + len(label)`` without."""
        if self._keys:
            return 1 + _NONCE_SIZE + _TAG_SIZE
        return 2 + len(label)

    def seal(self, payload: bytes, label: bytes) -> bytes:
        """Encrypt and authenticate ``payload`` with the primary key (or frame it as
        plaintext with an empty keyring). ``label``: the cluster name, at most 255 bytes."""
        if not self._keys:
            if len(label) > 255:
                raise ValueError("cluster label longer than 255 bytes")
            return bytes((_PLAINTEXT, len(label))) + label + payload
        nonce = self._nonce_source(_NONCE_SIZE)
        return bytes((_AES_GCM_V1,)) + nonce + self._ciphers[0].encrypt(nonce, payload, label)

    def open(self, packet: bytes, label: bytes) -> bytes:
        """Return the payload of a sealed ``packet``; raises :class:`OpenError` when no key
        authenticates it under ``label``, or when its framing does not match the keyring."""
        if not packet:
            raise OpenError("empty packet")
        version = packet[0]
        if not self._keys:
            if version != _PLAINTEXT or len(packet) < 2:
                raise OpenError("expected a plaintext packet")
            size = packet[1]
            if packet[2 : 2 + size] != label:
                raise OpenError("cluster label mismatch")
            return packet[2 + size :]
        if version != _AES_GCM_V1:
            raise OpenError(f"unknown packet version {version}")
        if len(packet) < 1 + _NONCE_SIZE + _TAG_SIZE:
            raise OpenError("packet shorter than nonce and tag")
        nonce = packet[1 : 1 + _NONCE_SIZE]
        body = packet[1 + _NONCE_SIZE :]
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, body, label)
            except InvalidTag:
                continue
        raise OpenError("no key in the keyring authenticates this packet")
