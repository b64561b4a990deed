"""The gateway's checks, in the order a request meets them: who is calling (401), may they
use what they ask for (403 for debug headers, 404 for a model outside their allowlist), is
there room in their quotas (429).

A node without ``[auth]`` has no ``Gate``: every client is anonymous, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

from quorum.errors import PermissionDenied, Saturated
from quorum.gateway.keys import ApiKeys, Caller, model_not_found
from quorum.gateway.quota import Grant, Limits, QuotaBoard

__all__ = ["ADMIN_HEADERS", "Gate"]

ADMIN_HEADERS = ("x-quorum-fault", "x-quorum-pin")
"""Client headers that change how the cluster behaves: an admin's only, under ``[auth]``."""


class Gate:
    """The checks of one node. ``keys``: the configured API keys. ``board``: the quota
    figures. ``open_metrics``: ``GET /metrics`` needs no key (``[auth] open_metrics``)."""

    def __init__(self, keys: ApiKeys, board: QuotaBoard, *, open_metrics: bool = False) -> None:
        self.keys = keys
        self.board = board
        self.open_metrics = open_metrics

    def caller(self, headers: Mapping[str, str]) -> Caller:
        """The caller named by ``Authorization: Bearer KEY`` (lower-cased ``headers``);
        raises ``Unauthorized`` (401 ``invalid_api_key``)."""
        return self.keys.authenticate(headers.get("authorization"))

    def admin(self, headers: Mapping[str, str], what: str) -> Caller:
        """The caller, who must hold an admin key for ``what`` (e.g. ``"GET /metrics"``);
        raises ``Unauthorized`` (401) or ``PermissionDenied`` (403 ``permission_denied``)."""
        caller = self.caller(headers)
        if not caller.is_admin:
            raise PermissionDenied(
                f"{what} needs an admin key; key '{caller.name}' is a user key.",
                code="permission_denied",
            )
        return caller

    def check(self, caller: Caller, model: str, headers: Mapping[str, str]) -> None:
        """What ``caller`` asks for: debug headers need an admin (403), ``model`` must be
        in the key's allowlist (404, worded as for a model no node serves, so that a key
        cannot learn which models exist beyond its own)."""
        if not caller.is_admin:
            for name in ADMIN_HEADERS:
                if name in headers:
                    raise PermissionDenied(
                        f"{name} is for admin keys only; key '{caller.name}' is a user "
                        "key. Remove the header.",
                        param=name,
                        code="permission_denied",
                    )
        if not caller.may_use(model):
            raise model_not_found(model)

    def admit(self, caller: Caller) -> Grant:
        """Count one request of ``caller`` against its quotas; raises ``Saturated`` (429
        ``rate_limit_exceeded`` with ``Retry-After`` and the quota headers)."""
        limits = limits_of(caller)
        try:
            return self.board.admit(caller.name, limits)
        except Saturated as exc:
            exc.headers.update(self.board.headers(caller.name, limits))
            raise

    def add_tokens(self, name: str, tokens: int) -> None:
        """Count a finished request's tokens against key ``name``."""
        self.board.add_tokens(name, tokens)


def limits_of(caller: Caller) -> Limits:
    """The quota limits of ``caller``'s key."""
    return Limits(
        requests_per_minute=caller.requests_per_minute,
        tokens_per_minute=caller.tokens_per_minute,
        max_concurrent=caller.max_concurrent,
    )
