"""Header names of the request path, in one place, and the cluster signature that makes the
internal ones trustworthy.

Three kinds of header, never confused (DESIGN.md, "Trust boundaries"):

- **Client headers** a client may send: ``x-request-id``, ``x-quorum-pin``, ``x-quorum-fault``
  (only where the node's ``[debug] faults`` allows it), ``x-quorum-single-flight``,
  ``x-conversation-id`` (``/c1``, where it is also a response header).
- **Internal headers** only a node of the cluster may send, on the hop:
  ``x-quorum-forwarded`` (the entry node's name), ``x-quorum-created`` (the stream's
  ``created``), ``x-quorum-caller`` (the name of the API key the entry node admitted the
  request under, for the serving node's log), ``x-quorum-signature``. A request carrying
  any of them is accepted only with a valid signature; a client that sends them gets 401.
- **Response headers**: ``x-quorum-node``, ``x-quorum-attempts``, ``x-request-id``,
  ``x-quorum-shared``.

The signature is an HMAC-SHA256 over the method, the path, the SHA-256 of the body (which
carries ``quorum_resume`` on a resume), a unix timestamp and every header whose value changes
what the serving node does. Its key is derived with HKDF (RFC 5869) from the cluster secret,
the gossip keyring's keys (or ``[cluster] secret`` for a static cluster), with the cluster name
as salt; every key of the keyring is tried on receipt, so a key rotation does not break the
hop. Timestamps older or newer than ``window_s`` are refused: a captured request cannot be
replayed later than that. Nodes need clocks within that window of each other (NTP).

Wire form: ``x-quorum-signature: v2 <unix seconds> <hex HMAC>`` (v2 signs ``x-quorum-caller``
and ``x-conversation-id`` too; a v1 node and a v2 node refuse each other's hop, so upgrade a
cluster all at once).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from quorum.backends.base import Fault
from quorum.errors import InvalidRequest, Unauthorized

__all__ = [
    "ATTEMPTS",
    "CALLER",
    "CONVERSATION_ID",
    "CREATED",
    "FAULT",
    "FORWARDED",
    "INTERNAL",
    "NODE",
    "PIN",
    "REQUEST_ID",
    "RESUME_FIELD",
    "SHARED",
    "SIGNATURE",
    "SINGLE_FLIGHT",
    "ClusterSigner",
    "client_fault",
    "created_time",
    "request_id",
]

# Client headers.
REQUEST_ID = "x-request-id"
PIN = "x-quorum-pin"
FAULT = "x-quorum-fault"
SINGLE_FLIGHT = "x-quorum-single-flight"
CONVERSATION_ID = "x-conversation-id"  # /c1: request and response
# Internal headers: accepted only with a valid signature.
FORWARDED = "x-quorum-forwarded"
CREATED = "x-quorum-created"
CALLER = "x-quorum-caller"
SIGNATURE = "x-quorum-signature"
INTERNAL = (FORWARDED, CREATED, CALLER, SIGNATURE)
# The body field of a resume (only under a signed forward).
RESUME_FIELD = "quorum_resume"
# Response headers.
NODE = "x-quorum-node"
ATTEMPTS = "x-quorum-attempts"
SHARED = "x-quorum-shared"

# What the signature covers besides method, path and body: every header that changes what
# the serving node does. A missing header is signed as empty, so none can be added later.
_SIGNED = (FORWARDED, CREATED, CALLER, REQUEST_ID, PIN, FAULT, CONVERSATION_ID)
_VERSION = "v2"
_INFO = b"quorum internal headers v1"


class ClusterSigner:
    """Signs and checks the internal headers of the hop.

    ``secrets``: the cluster's key material, the first one signs, all verify (raw bytes, at
    least 16 each). ``cluster``: the cluster name (HKDF salt). ``window_s``: how far a
    signature's timestamp may be from this node's clock, seconds. ``clock``: unix seconds.
    Raises ``ValueError`` without secrets or with a short one.
    """

    def __init__(
        self,
        secrets: Sequence[bytes],
        cluster: str,
        *,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("the cluster signature needs at least one secret")
        if any(len(s) < 16 for s in secrets):
            raise ValueError("every cluster secret must be at least 16 bytes")
        self._keys = [_derive(s, cluster) for s in secrets]
        self.window_s = window_s
        self._clock = clock

    def sign(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> str:
        """The ``x-quorum-signature`` value for a request with these (lower-cased) headers."""
        stamp = str(int(self._clock()))
        return f"{_VERSION} {stamp} {_mac(self._keys[0], stamp, method, path, body, headers)}"

    def verify(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Check the signature of a request that carries internal headers; raises
        ``Unauthorized`` (401) when it is missing, malformed, stale or wrong."""
        value = headers.get(SIGNATURE, "")
        parts = value.split(" ")
        if len(parts) != 3 or parts[0] != _VERSION or not parts[1].isdigit() or len(parts[1]) > 12:
            raise _refused("it has no valid x-quorum-signature")
        stamp, given = parts[1], parts[2]
        if abs(self._clock() - int(stamp)) > self.window_s:
            raise _refused("its x-quorum-signature is outside the replay window")
        expected = [_mac(key, stamp, method, path, body, headers) for key in self._keys]
        # compare_digest with every key, so timing says nothing about which one matched
        if not any([hmac.compare_digest(given, e) for e in expected]):
            raise _refused("its x-quorum-signature does not match")


def _derive(secret: bytes, cluster: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=cluster.encode(), info=_INFO)
    return hkdf.derive(secret)


def _mac(
    key: bytes, stamp: str, method: str, path: str, body: bytes, headers: Mapping[str, str]
) -> str:
    signed = "\n".join(
        [_VERSION, stamp, method, path, hashlib.sha256(body).hexdigest()]
        + [f"{name}:{headers.get(name, '')}" for name in _SIGNED]
    )
    return hmac.new(key, signed.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def _refused(why: str) -> Unauthorized:
    return Unauthorized(
        f"This request carries Quorum's internal headers ({', '.join(INTERNAL)}), but {why}. "
        "Only nodes of the cluster may send them: remove them.",
        code="invalid_internal_headers",
    )


# --- reading header values ------------------------------------------------------------


def request_id(headers: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` when it is 8-64 ASCII letters, digits, ``-`` or ``_``;
    else a fresh one."""
    given = headers.get(REQUEST_ID, "")
    if 8 <= len(given) <= 64 and given.isascii() and all(c.isalnum() or c in "-_" for c in given):
        return given
    return uuid.uuid4().hex


def created_time(headers: Mapping[str, str]) -> int:
    """``x-quorum-created`` of a signed forward (unix seconds, at most 12 digits), else now."""
    value = headers.get(CREATED, "")
    if value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return int(time.time())


def client_fault(headers: Mapping[str, str]) -> Fault | None:
    """The ``x-quorum-fault`` asked for, or None; raises ``InvalidRequest`` (400) when it
    does not parse."""
    if FAULT not in headers:
        return None
    try:
        return Fault.parse(headers[FAULT])
    except ValueError as exc:
        raise InvalidRequest(f"x-quorum-fault: {exc}", param=FAULT) from None
