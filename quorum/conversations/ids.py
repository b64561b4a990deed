"""Conversation ids: random, URL-path-safe, and carrying the node that created them.

::

    conv_Xq3v9T0bW1nY-p_4kLmZ8aRc.bm9kZS1h
    └──┘ └──────────────────────┘ └──────┘
    prefix  24 random characters   owner: the creating node's name, UTF-8, base64url
            (144 bits, base64url)  without padding ("node-a" here)

With the SQLite store a conversation lives on the node that created it; any node reads the
owner from the id alone (no registry, nothing gossiped) and forwards the request there. With
PostgreSQL every node reaches every conversation and the owner is only informative.

Ids arrive from clients, so :func:`valid_id` parses strictly: one canonical spelling per id
(no padding, no non-canonical trailing bits), a bounded length, and an owner that decodes to
printable UTF-8. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

__all__ = ["MAX_ID_LEN", "MAX_OWNER_BYTES", "PREFIX", "new_id", "owner_of", "valid_id"]

PREFIX = "conv_"
"""What every conversation id starts with."""

RANDOM_LEN = 24
"""Random characters after the prefix: base64url of 18 bytes from ``secrets`` (144 bits)."""

MAX_OWNER_BYTES = 512
"""Longest owner (node name), in bytes of UTF-8: room for any name a node may have (gossip's
128 printable characters, at most 4 bytes each)."""

_MAX_OWNER_TOKEN = -(-MAX_OWNER_BYTES * 4 // 3)  # unpadded base64 of MAX_OWNER_BYTES: 683

MAX_ID_LEN = len(PREFIX) + RANDOM_LEN + 1 + _MAX_OWNER_TOKEN
"""Longest valid id, in characters (713); a 6-character ASCII node name makes 38."""

_ID = re.compile(
    rf"{PREFIX}[A-Za-z0-9_-]{{{RANDOM_LEN}}}\.([A-Za-z0-9_-]{{2,{_MAX_OWNER_TOKEN}}})",
    re.ASCII,
)


def new_id(owner_node: str) -> str:
    """A fresh conversation id created on ``owner_node``: ``conv_`` + 24 random base64url
    characters + ``.`` + the node name as unpadded base64url of its UTF-8. At most
    :data:`MAX_ID_LEN` characters, all of them ``[A-Za-z0-9_.-]``.

    Raises ``ValueError`` when ``owner_node`` is empty, longer than :data:`MAX_OWNER_BYTES`
    bytes of UTF-8, or has a non-printable character (a node could not own such an id).
    """
    if not _good_owner(owner_node):
        raise ValueError(
            f"a conversation owner must be 1..{MAX_OWNER_BYTES} bytes of printable UTF-8"
        )
    token = base64.urlsafe_b64encode(owner_node.encode()).rstrip(b"=").decode()
    return f"{PREFIX}{secrets.token_urlsafe(RANDOM_LEN * 3 // 4)}.{token}"


def owner_of(conversation_id: str) -> str | None:
    """The name of the node that created ``conversation_id``, or None when the text is not a
    valid id (see :func:`valid_id`). Never raises."""
    if not isinstance(conversation_id, str) or len(conversation_id) > MAX_ID_LEN:
        return None
    match = _ID.fullmatch(conversation_id)
    if match is None:
        return None
    token = match.group(1)
    if len(token) % 4 == 1:  # no byte string encodes to this length
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        owner = raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    # One spelling per id: the decoder ignores non-zero bits left over in the last character.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != token or not _good_owner(owner):
        return None
    return owner


def valid_id(text: object) -> bool:
    """True when ``text`` is a conversation id as :func:`new_id` makes them: a string of at
    most :data:`MAX_ID_LEN` characters, ``conv_`` + 24 base64url characters + ``.`` + the
    canonical unpadded base64url of a printable UTF-8 owner name. Never raises."""
    return isinstance(text, str) and owner_of(text) is not None


def _good_owner(name: str) -> bool:
    # isprintable() first: it refuses lone surrogates, which encode() would raise on.
    return name.isprintable() and 0 < len(name.encode()) <= MAX_OWNER_BYTES
