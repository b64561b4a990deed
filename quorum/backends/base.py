"""The one interface every backend implements, and what a backend is asked to do.

A backend serves one model on this node. It always produces an OpenAI *stream*: complete SSE
events as bytes, ending with ``data: [DONE]``; the HTTP layer folds the stream into a single
response object when the client did not ask to stream (``quorum.wire.aggregate_chat``). So
the mock, an HTTP upstream and a relay all look the same to the layers above.

Usage::

    # open() may raise BackendSaturated / BackendUnavailable
    async with backend.open(generation) as events:
        async for event in events:                   # bytes: one or more whole SSE events
            ...                                      # may raise BackendBroken

Leaving the ``async with`` block (normally, by error, or by cancellation when the client went
away) stops the work and frees the slot before ``__aexit__`` returns.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from quorum.wire import Request

__all__ = [
    "MAX_RESUME_COUNT",
    "MAX_RESUME_TEXT_CHARS",
    "Backend",
    "BackendLoad",
    "BackendState",
    "Fault",
    "Generation",
    "Resume",
]

BackendState = Literal["warming", "ready"]


class NodeState(enum.StrEnum):
    """What a node says of itself (gossiped in its meta, shown in ``/health``): ``warming``
    (a backend is not ready: do not route to it), ``ready``, ``draining`` (finishing what it
    has, taking nothing new). A backend is only ever warming or ready."""

    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class Fault:
    """Fault injection for one generation (mock backend; scenarios and tests).

    ``fail_after``: break the stream (``BackendBroken``) after this many tokens.
    ``stall_after``: stop emitting after this many tokens, holding the slot until cancelled.
    ``status``: refuse before any byte with this HTTP status (``BackendUnavailable``).
    Parsed from the ``x-quorum-fault`` header: ``fail_after=5``, ``stall_after=3``,
    ``status=500``, comma-separated.
    """

    fail_after: int | None = None
    stall_after: int | None = None
    status: int | None = None

    def header(self) -> str:
        """The ``x-quorum-fault`` text that ``parse`` reads back into this fault."""
        return ",".join(
            f"{key}={value}"
            for key in ("fail_after", "stall_after", "status")
            if (value := getattr(self, key)) is not None
        )

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse ``"fail_after=5,status=500"``; raises ``ValueError`` on anything else."""
        values: dict[str, int] = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in ("fail_after", "stall_after", "status"):
                raise ValueError(f"unknown fault {item.strip()!r}")
            values[key] = int(value)
        return cls(**values)


MAX_RESUME_COUNT = 1_000_000
"""The largest ``events`` and ``tool_calls`` a ``quorum_resume`` field may carry: a million
events is longer than any model's context, and it bounds the work a resume asks for."""

MAX_RESUME_TEXT_CHARS = 4 << 20
"""The most characters ``quorum_resume.text`` may hold, field names and values together (the
node's default ``max_body_bytes`` is the same number of bytes)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a broken stream stopped, for another backend to continue it.

    ``events``: how many events of the stream the client already has (the role chunk
    included, ``[DONE]`` excluded). ``text``: per delta field (``content``,
    ``reasoning_content``, ``reasoning``; ``text`` for completions) the text already delivered.
    ``tool_calls``: how many tool-call deltas (chunks carrying ``delta.tool_calls``) the client
    already has; their arguments are not in ``text``.
    A deterministic backend (the mock) skips ``events`` events of the same plan; an HTTP
    upstream continues from the partial assistant ``text`` and refuses a resume after a tool
    call, which it cannot continue exactly.

    On the wire (the ``quorum_resume`` body field of a forwarded request)::

        {"events": 12, "tool_calls": 0, "text": {"content": "One, two,", "reasoning": "..."}}

    ``tool_calls`` absent means 0 (nodes before it was added never send it).
    """

    events: int
    text: Mapping[str, str] = field(default_factory=dict)
    tool_calls: int = 0

    def as_json(self) -> dict[str, Any]:
        """The ``quorum_resume`` field: ``{"events", "tool_calls", "text"}``."""
        return {"events": self.events, "tool_calls": self.tool_calls, "text": dict(self.text)}

    @classmethod
    def from_json(cls, value: Any) -> Resume:
        """Parse the ``quorum_resume`` body field; raises ``ValueError`` saying what is wrong.

        ``events`` and ``tool_calls`` are integers from 0 to ``MAX_RESUME_COUNT``
        (``tool_calls`` may be absent: 0); ``text`` maps field names to strings, at most
        ``MAX_RESUME_TEXT_CHARS`` characters in all.
        """
        if not isinstance(value, dict):
            raise ValueError("quorum_resume must be an object")
        events = _count(value, "events", None)
        tool_calls = _count(value, "tool_calls", 0)
        text = value.get("text", {})
        if not isinstance(text, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in text.items()
        ):
            raise ValueError("quorum_resume.text must map field names to strings")
        size = sum(len(k) + len(v) for k, v in text.items())
        if size > MAX_RESUME_TEXT_CHARS:
            raise ValueError(
                f"quorum_resume.text holds {size} characters; at most "
                f"{MAX_RESUME_TEXT_CHARS} are accepted"
            )
        return cls(events=events, text=text, tool_calls=tool_calls)


def _count(value: dict[str, Any], key: str, default: int | None) -> int:
    """``value[key]``, an integer from 0 to ``MAX_RESUME_COUNT`` (``default`` when absent and
    not None); raises ``ValueError``."""
    number = value.get(key, default)
    if (
        not isinstance(number, int)
        or isinstance(number, bool)
        or not 0 <= number <= MAX_RESUME_COUNT
    ):
        raise ValueError(f"quorum_resume.{key} must be an integer from 0 to {MAX_RESUME_COUNT}")
    return number


@dataclass(frozen=True, slots=True)
class Generation:
    """What a backend is asked to produce.

    ``request``: the validated request. ``request_id``: the stream's id suffix; a chat stream's
    id is ``chatcmpl-<request_id>``, a completion's ``cmpl-<request_id>``, so the node that
    assigned it (the entry node) gets the same id from whichever node serves. ``created``: unix
    seconds for the ``created`` field. ``include_usage``: emit the usage chunk (true for every
    non-streamed request). ``fault``: injected fault, or None. ``resume``: continue a stream
    that broke elsewhere, or None for a fresh one.

    ``headers``: the client's headers that may reach an upstream, already filtered by the
    node's policy (``quorum.backends.headers.HeaderPolicy.upstream``); lower-case names.
    ``answer_headers``: filled by a backend, once its answer's head arrives (before the first
    event is yielded), with the upstream response headers that may be passed back to the
    client (``HeaderPolicy.client``), lower-case names; the mock leaves it empty. It is the
    one mutable part of a generation: one dict per generation.
    """

    request: Request
    request_id: str
    created: int
    include_usage: bool
    fault: Fault | None = None
    resume: Resume | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    answer_headers: dict[str, str] = field(default_factory=dict)

    @property
    def stream_id(self) -> str:
        prefix = "chatcmpl-" if self.request.kind == "chat" else "cmpl-"
        return prefix + self.request_id


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """A backend's load right now: ``slots`` in all, ``busy`` slots, ``queued`` waiting."""

    slots: int
    busy: int
    queued: int

    @property
    def free(self) -> int:
        return max(0, self.slots - self.busy)


class Backend(abc.ABC):
    """One model served by this node.

    ``model``: the name clients ask for. ``kind``: "mock" | "upstream" | "llamacpp".
    ``weight``: routing weight (higher takes more traffic), 1.0 by default.
    """

    model: str
    kind: str
    weight: float = 1.0

    @property
    @abc.abstractmethod
    def state(self) -> BackendState:
        """ "warming" until the backend can serve, then "ready"."""

    @abc.abstractmethod
    def load(self) -> BackendLoad:
        """Current slots, busy slots and queue depth."""

    @abc.abstractmethod
    def open(self, generation: Generation) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Start ``generation``; yields an iterator of SSE events (bytes).

        Raises ``BackendSaturated`` (slots and queue full) or ``BackendUnavailable`` before
        entering; the iterator raises ``BackendBroken`` if the work breaks midway.
        """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work for the backend's lifetime (warm-up, health polling).

        Started with ``nursery.start``; the default just reports started and returns.
        """
        task_status.started()
