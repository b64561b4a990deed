"""Which headers cross between a client and an upstream server, and which never do.

An HTTP upstream (``quorum.backends.upstream``) is another party: it gets none of the client's
headers but those a ``HeaderPolicy`` lets through, and the client gets none of the upstream's
but those the policy lets through. The rest are stripped. ::

    client ──(policy.upstream)──▶ upstream backend ──▶ upstream server
    client ◀──(policy.client)──── Generation.answer_headers ◀── upstream's answer head

Some names never pass, whatever a list says (they are refused in the lists, and the filters
skip them again): toward an upstream the client's credentials (``authorization``,
``proxy-authorization``, ``cookie``: the backend sends its own ``api_key_env`` token), the
transport's own headers (``host``, ``content-length``, ``transfer-encoding``, ``connection``,
``te``, ``upgrade``, ``keep-alive``: set per hop by the HTTP client), the body's coding
(``accept-encoding``, ``content-encoding``: the node reads the upstream's answer unencoded
and frames its own), and Quorum's internal ``x-quorum-*``; back to a client the upstream's
``set-cookie``, the transport's headers, ``content-encoding`` and ``x-quorum-*`` (Quorum sets
its own).

Config (the node passes one policy to its upstream backends)::

    to_upstream = ["content-type", "accept", "x-request-id"]
    to_client = ["content-type", "cache-control", "x-request-id", "x-quota-*", "x-ratelimit-*"]

An entry is a lower-case header name, or a name prefix ending in ``*`` (``x-ratelimit-*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["DEFAULT", "INTERNAL_PREFIX", "NEVER_TO_CLIENT", "NEVER_TO_UPSTREAM", "HeaderPolicy"]

INTERNAL_PREFIX = "x-quorum-"
"""Quorum's own headers (``quorum.routing.headers``): never from a client to an upstream, nor
from an upstream to a client."""

_CREDENTIALS = "a client's credentials never reach an upstream (the backend sends its own token)"
_TRANSPORT = "it belongs to one HTTP connection, and each hop sets its own"
_CODING = "Quorum decodes and re-encodes the body, so each side gets the node's own coding"

NEVER_TO_UPSTREAM: Mapping[str, str] = {
    "authorization": _CREDENTIALS,
    "proxy-authorization": _CREDENTIALS,
    "cookie": _CREDENTIALS,
    "host": _TRANSPORT,
    "content-length": _TRANSPORT,
    "transfer-encoding": _TRANSPORT,
    "connection": _TRANSPORT,
    "te": _TRANSPORT,
    "upgrade": _TRANSPORT,
    "keep-alive": _TRANSPORT,
    "accept-encoding": _CODING,
    "content-encoding": _CODING,
}
"""Client header names no policy passes to an upstream, each with the reason (``x-quorum-*``
too)."""

NEVER_TO_CLIENT: Mapping[str, str] = {
    "set-cookie": "an upstream's cookies never reach clients",
    "content-length": _TRANSPORT,
    "transfer-encoding": _TRANSPORT,
    "connection": _TRANSPORT,
    "keep-alive": _TRANSPORT,
    "upgrade": _TRANSPORT,
    "content-encoding": _CODING,
}
"""Upstream header names no policy passes back to a client, each with the reason
(``x-quorum-*`` too)."""

# RFC 9110 §5.6.2 token characters, lower case, without "*" (which ends a prefix pattern).
_ENTRY = re.compile(r"[a-z0-9!#$%&'+.^_`|~-]*\*?")
# RFC 9110 §5.5 field value, as h11 checks it before sending: visible characters and obs-text
# (a str header value is read as latin-1), spaces and tabs only between them.
_VALUE = re.compile(r"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")


def _never(name: str, never: Mapping[str, str]) -> str | None:
    """Why the lower-case ``name`` may never pass, or None."""
    if name.startswith(INTERNAL_PREFIX):
        return "x-quorum-* headers are Quorum's own"
    return never.get(name)


def _entry_problem(entry: str, never: Mapping[str, str]) -> str | None:
    """What is wrong with one list entry, or None."""
    if not entry or not _ENTRY.fullmatch(entry.lower()):
        return (
            f"{entry!r} is not a header name (RFC 9110 token characters), nor a name prefix "
            "ending in '*'"
        )
    if entry != entry.lower():
        return f"header names are written in lower case: write {entry.lower()!r}"
    if not entry.endswith("*"):
        why = _never(entry, never)
        return f"{entry!r} may never pass: {why}; remove it" if why else None
    prefix = entry[:-1]
    caught = sorted(name for name in never if name.startswith(prefix))
    if prefix.startswith(INTERNAL_PREFIX) or INTERNAL_PREFIX.startswith(prefix):
        caught.append(INTERNAL_PREFIX + "*")
    if caught:
        return (
            f"{entry!r} would let {', '.join(caught)} through, which may never pass; "
            "list the names (or a narrower prefix) instead"
        )
    return None


def _check(entries: list[str], never: Mapping[str, str]) -> list[str]:
    for entry in entries:
        problem = _entry_problem(entry, never)
        if problem:
            raise ValueError(problem)
    return entries


def _matches(name: str, entries: Iterable[str]) -> bool:
    return any(
        name.startswith(entry[:-1]) if entry.endswith("*") else name == entry for entry in entries
    )


class HeaderPolicy(BaseModel):
    """The header allowlists between clients and upstream servers (module docstring).

    ``to_upstream``: the client headers an upstream may get. ``to_client``: the upstream's
    response headers a client may get. Each entry is a lower-case header name or a prefix
    ending in ``*``. Raises ``pydantic.ValidationError`` (a ``ValueError``) for an unknown
    key, an entry that is not a name, or one that would let a never-passed name through
    (``NEVER_TO_UPSTREAM``, ``NEVER_TO_CLIENT``, ``x-quorum-*``; so ``*`` and ``x-*`` are
    refused), saying what to change.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    to_upstream: list[str] = ["content-type", "accept", "x-request-id"]
    to_client: list[str] = [
        "content-type",
        "cache-control",
        "x-request-id",
        "x-quota-*",
        "x-ratelimit-*",
    ]

    @field_validator("to_upstream")
    @classmethod
    def _to_upstream(cls, entries: list[str]) -> list[str]:
        return _check(entries, NEVER_TO_UPSTREAM)

    @field_validator("to_client")
    @classmethod
    def _to_client(cls, entries: list[str]) -> list[str]:
        return _check(entries, NEVER_TO_CLIENT)

    def upstream(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The client's ``headers`` an upstream may get: name (lower-cased) → value, for the
        names ``to_upstream`` allows. A never-passed name, a name that is not a token, or a
        value that is not a valid field value (control characters, characters above U+00FF,
        spaces at either end) is dropped. Never raises."""
        return _filter(headers.items(), self.to_upstream, NEVER_TO_UPSTREAM)

    def client(self, headers: Iterable[tuple[str, str]] | Mapping[str, str]) -> dict[str, str]:
        """The upstream's response ``headers`` a client may get: name (lower-cased) → value,
        for the names ``to_client`` allows. ``headers``: a mapping, or (name, value) pairs in
        which a name may repeat (httpx's ``Headers.multi_items()``); repeated values are
        joined with ``", "`` (RFC 9110 §5.3). Dropped as in ``upstream``. Never raises."""
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        return _filter(pairs, self.to_client, NEVER_TO_CLIENT)


def _filter(
    pairs: Iterable[tuple[str, str]], entries: list[str], never: Mapping[str, str]
) -> dict[str, str]:
    kept: dict[str, str] = {}
    for raw, value in pairs:
        name = raw.lower()
        if (
            not name
            or "*" in name
            or not _ENTRY.fullmatch(name)
            or _never(name, never)
            or not _matches(name, entries)
            or not _VALUE.fullmatch(value)
        ):
            continue
        kept[name] = f"{kept[name]}, {value}" if name in kept else value
    return kept


DEFAULT = HeaderPolicy()
"""The policy of the issue: ``content-type``, ``accept``, ``x-request-id`` to an upstream;
``content-type``, ``cache-control``, ``x-request-id``, ``x-quota-*``, ``x-ratelimit-*`` back."""
