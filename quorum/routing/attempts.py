"""The attempt loop, once: choose a node, claim its breaker, try, give the verdict; and the
classification of what went wrong.

Unary answers, a stream's first token and a resume all go through ``Attempts.run`` (as
sgl-router's ``RetryExecutor`` is the one retry loop of its router)::

    attempts = Attempts(choose, breakers, config, rng, metrics, request_id="abc")
    reply = await attempts.run(once)      # once(member, number) -> T, raises AttemptFailed

For each attempt the loop:

1. asks ``choose(tried)`` for a node (None: nobody is left);
2. waits the jittered backoff (attempts after the first);
3. claims the node's circuit breaker *after* the backoff, right before sending: a half-open
   breaker lets exactly one request through until it has a verdict, so a node whose trial is
   taken by another request is skipped (without counting as an attempt);
4. calls ``once``; a success closes the trial (``record_success``); an ``AttemptFailed`` is a
   failure (``record_failure``), except a saturated node (429) or a pinned request, whose
   failures say nothing of the node's health to others (``release``); a final failure (the
   client's own 4xx) is raised at once; cancellation releases the claim.

``AttemptsExhausted`` carries every failure when the attempts or the nodes ran out.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from quorum.errors import ApiError, Saturated, Unavailable, UpstreamFailed
from quorum.metrics import Metrics
from quorum.routing.breaker import BreakerBoard
from quorum.routing.config import RoutingConfig
from quorum.routing.membership import Member

__all__ = [
    "AttemptFailed",
    "Attempts",
    "AttemptsExhausted",
    "api_error",
    "exhausted",
    "final_error",
    "is_final",
    "status_failure",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class AttemptFailed(Exception):
    """One node could not start (or keep) serving the request.

    ``status``: the HTTP status it maps to. ``saturated``: the node was full (429), not
    broken; ``retry_after``: its hint, seconds. ``final``: a client error (4xx) that another
    node would answer the same way; ``body`` is then relayed as is.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        saturated: bool = False,
        retry_after: float | None = None,
        final: bool = False,
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.saturated = saturated
        self.retry_after = retry_after
        self.final = final
        self.body = body


class AttemptsExhausted(Exception):
    """Every attempt failed, or no node was left to try; ``failures`` in order."""

    def __init__(self, failures: Sequence[AttemptFailed]) -> None:
        super().__init__(f"{len(failures)} attempts failed")
        self.failures = list(failures)


class Attempts:
    """The tries of one request (or of one resume of it).

    ``choose(tried)``: the next node given the names tried so far, None when nobody is left.
    ``breakers``: the node's circuit breakers. ``config``: ``max_attempts`` and ``backoff_s``.
    ``rng``: jitter. ``metrics``: counts failed attempts by node. ``request_id``: for logs.
    ``pinned``: the client asked for one node (its failures do not feed the breaker).
    ``tried``: names tried by earlier loops of the same request (a resume excludes them).
    """

    def __init__(
        self,
        choose: Callable[[Sequence[str]], Member | None],
        breakers: BreakerBoard,
        config: RoutingConfig,
        rng: random.Random,
        metrics: Metrics,
        *,
        request_id: str,
        pinned: bool = False,
        tried: list[str] | None = None,
    ) -> None:
        self._choose = choose
        self._breakers = breakers
        self._config = config
        self._rng = rng
        self._metrics = metrics
        self.request_id = request_id
        self.pinned = pinned
        self.tried: list[str] = tried if tried is not None else []
        self.count = 0  # attempts made by this loop

    async def run(self, once: Callable[[Member, int], Awaitable[T]]) -> T:
        """Try nodes with ``once(member, number)`` (``number`` from 1) until one returns.
        Raises ``AttemptFailed`` for a final failure and ``AttemptsExhausted`` otherwise."""
        failures: list[AttemptFailed] = []
        while self.count < self._config.max_attempts:
            member = self._choose(self.tried)
            if member is None:
                break
            if self.count:
                await self.backoff(self.count)
            self.tried.append(member.name)
            breaker = self._breakers.get(member.name)
            if not breaker.allow(trio.current_time()):
                log.info("%s: %s skipped, its breaker is not letting requests through",
                         self.request_id, member.name)  # fmt: skip
                continue
            self.count += 1
            try:
                result = await once(member, self.count)
            except AttemptFailed as exc:
                if exc.final:
                    breaker.release(trio.current_time())
                    raise
                if exc.saturated or self.pinned:
                    breaker.release(trio.current_time())
                else:
                    breaker.record_failure(trio.current_time())
                log.info("%s: attempt on %s failed: %s", self.request_id, member.name, exc.message)
                self._metrics.attempt_failures.labels(member.name).inc()
                failures.append(exc)
                continue
            except BaseException:
                breaker.release(trio.current_time())
                raise
            breaker.record_success(trio.current_time())
            return result
        raise AttemptsExhausted(failures)

    async def backoff(self, attempt: int) -> None:
        """Full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter"): a uniform
        delay in [0, ``backoff_s`` · 2^(attempt-1)) seconds."""
        await trio.sleep(self._rng.uniform(0, self._config.backoff_s * 2 ** (attempt - 1)))


# --- classifying failures ----------------------------------------------------------------------


def is_final(status: int) -> bool:
    """A 4xx that another node would answer the same way: the client's own error. Not 401
    or 403 (between nodes, those are the cluster's fault: a key or clock mismatch), not 408,
    not 429."""
    return 400 <= status < 500 and status not in (401, 403, 408, 429)


def status_failure(
    member: Member, status: int, headers: dict[str, str], data: bytes
) -> AttemptFailed:
    """The failure a node's non-200 answer (``status``, ``headers``, body ``data``) is."""
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = data[:200].decode("utf-8", "replace")
    text = f"node {member.name} answered {status}: {message}"
    if status == 429:
        retry = headers.get("retry-after", "1")
        hint = float(retry) if retry.isascii() and retry.isdigit() and len(retry) < 6 else 1.0
        return AttemptFailed(text, status=429, saturated=True, retry_after=hint)
    if is_final(status):
        return AttemptFailed(text, status=status, final=True, body=data)
    return AttemptFailed(text, status=status)


def api_error(exc: AttemptFailed) -> ApiError:
    """The answer of a local attempt that failed before any byte."""
    if exc.saturated:
        return Saturated(
            f"{exc.message}. Every slot and queue place is taken; retry after the time in "
            "Retry-After.",
            retry_after=exc.retry_after or 1.0,
        )
    if exc.status == 503:
        return Unavailable(exc.message)
    return UpstreamFailed(exc.message, status=exc.status if exc.status >= 500 else None)


def final_error(exc: AttemptFailed) -> ApiError:
    """A final failure's own error envelope, as the serving node answered it."""
    try:
        error = json.loads(exc.body)["error"]
        answer = ApiError(
            str(error["message"]),
            param=error.get("param"),
            code=error.get("code"),
            status=exc.status,
        )
        if isinstance(error.get("type"), str):
            answer.type = error["type"]  # as the node said it (invalid_request_error, ...)
        return answer
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(exc.message, status=exc.status)


def exhausted(model: str, failures: Sequence[AttemptFailed]) -> ApiError:
    """The answer when every attempt failed: 503 when nobody could be tried, 429 when every
    node was full, 504 when every one timed out, else 502 with every reason."""
    if not failures:
        return Unavailable(f"No node can serve model '{model}' now. Retry shortly.")
    if all(f.saturated for f in failures):
        return Saturated(
            f"Every node serving '{model}' is saturated (slots and queues full). Retry after "
            "the time in Retry-After.",
            retry_after=min(f.retry_after or 1.0 for f in failures),
        )
    reasons = "; ".join(f.message for f in failures)
    status = 504 if all(f.status == 504 for f in failures) else None
    return UpstreamFailed(
        f"Every node tried for '{model}' failed before the first byte: {reasons}", status=status
    )
