"""The conversation store's interface, what it returns, and the bounds every store enforces.

A store keeps, per conversation id: the owning API key (None when auth is off), the creation
time, and an ordered list of messages, each a JSON object as the chat API has it (``role``,
``content``, ``reasoning_content``, ``tool_calls``, ...). Messages are only ever appended,
a whole turn at a time, and read back in the order they were appended.

The engines (:mod:`quorum.conversations.sqlite`, :mod:`quorum.conversations.postgres`) do
their blocking work in threads; everything here is pure.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self, TypeVar

from quorum.conversations.ids import valid_id
from quorum.errors import (
    ConversationNotFound,
    ConversationTooLong,
    InvalidRequest,
    MessageTooLarge,
    TooManyConversations,
    Unavailable,
)

__all__ = [
    "DEFAULT_MAX_CONVERSATIONS",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Conversation",
    "ConversationStore",
    "Limits",
    "Operations",
    "SQLStore",
    "not_found",
    "unavailable",
]

DEFAULT_MAX_MESSAGES = 1000
"""Messages one conversation may hold unless a store is told otherwise (500 turns)."""

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
"""Bytes of one stored message (compact JSON, UTF-8) unless a store is told otherwise."""

DEFAULT_MAX_CONVERSATIONS = 10_000
"""Conversations one API key (or, with auth off, all clients together) may keep at once
unless a store is told otherwise: every table a client can grow is bounded."""


@dataclass(frozen=True, slots=True)
class Conversation:
    """One stored conversation. ``id``: see :mod:`quorum.conversations.ids`. ``created``:
    int, unix seconds. ``messages``: the chat messages in the order they were appended."""

    id: str
    created: int
    messages: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """The answer of ``GET /c1/conversations/{id}``: ``{"id", "created", "messages"}``."""
        return {"id": self.id, "created": self.created, "messages": list(self.messages)}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one store accepts. ``max_messages``: messages per conversation (a turn is
    usually two: the user's and the assistant's). ``max_message_bytes``: bytes of one
    message as stored, compact JSON in UTF-8. ``max_conversations``: conversations one key
    keeps at once (the clients of a node without auth count as one key).

    A route can call :meth:`check` before it asks a backend for an answer, so a turn that
    could not be stored is refused before any tokens are spent on it.
    """

    max_messages: int = DEFAULT_MAX_MESSAGES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_conversations: int = DEFAULT_MAX_CONVERSATIONS

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_message_bytes < 2 or self.max_conversations < 1:
            raise ValueError(
                "max_messages and max_conversations must be >= 1, max_message_bytes >= 2"
            )

    def check_conversations(self, key: str | None, kept: int) -> None:
        """Raises ``TooManyConversations`` when ``key`` already keeps ``kept`` >=
        ``max_conversations`` conversations."""
        if kept >= self.max_conversations:
            who = f"API key {key!r}" if key is not None else "This node's clients (no [auth])"
            raise TooManyConversations(
                f"{who} already keep(s) {kept} conversations, the most this cluster allows "
                f"([conversations] max_conversations = {self.max_conversations}); delete one "
                "with DELETE /c1/conversations/{id} to start another"
            )

    def encode(self, messages: Sequence[dict[str, Any]]) -> list[str]:
        """Each message as the JSON text a store keeps. Raises ``InvalidRequest`` when a
        message is not a JSON object (or holds NaN, infinity, or a non-JSON value), and
        ``MessageTooLarge`` when one is over ``max_message_bytes`` bytes."""
        encoded = []
        for index, message in enumerate(messages):
            text = _to_json(message, index)
            size = len(text.encode("utf-8"))
            if size > self.max_message_bytes:
                raise MessageTooLarge(
                    f"message {index} of this turn is {size} bytes as stored JSON; a "
                    f"conversation keeps messages of at most {self.max_message_bytes} bytes",
                    param=f"messages[{index}]",
                )
            encoded.append(text)
        return encoded

    def check_count(self, stored: int, adding: int) -> None:
        """Raises ``ConversationTooLong`` when ``stored`` + ``adding`` messages are more than
        ``max_messages``."""
        if stored + adding > self.max_messages:
            raise ConversationTooLong(
                f"this conversation has {stored} messages and may hold at most "
                f"{self.max_messages}; adding {adding} more would pass that: start a new one"
            )

    def check(self, conversation: Conversation | None, messages: Sequence[dict[str, Any]]) -> None:
        """Raises what :meth:`ConversationStore.append` would raise for the bounds, without
        storing: ``InvalidRequest``, ``MessageTooLarge``, ``ConversationTooLong``."""
        self.encode(messages)
        self.check_count(len(conversation.messages) if conversation else 0, len(messages))


def not_found() -> ConversationNotFound:
    """The error for an id that is unknown to the caller (the id is not echoed: it is the
    client's text)."""
    return ConversationNotFound(
        "no such conversation: it was never created, was deleted, or belongs to another API key"
    )


def unavailable() -> Unavailable:
    """The error for an engine failure. Raise it ``from`` the engine's exception: the
    message goes to the client, which is not told the database's address or error."""
    return Unavailable(
        "the conversation store cannot be used now; try again later",
        code="conversation_store_unavailable",
    )


def _to_json(message: object, index: int) -> str:
    if not isinstance(message, dict):
        raise InvalidRequest(
            f"message {index} of this turn is not a JSON object", param=f"messages[{index}]"
        )
    try:
        text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON allows "\ud800"); escaped, it is stored and read back as is.
        text = json.dumps(message, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"message {index} of this turn cannot be stored as JSON: {exc}",
            param=f"messages[{index}]",
        ) from None
    return text


class ConversationStore(abc.ABC):
    """Where conversations live: one interface over SQLite (a file per node) and PostgreSQL
    (shared by a cluster). Every method is async (trio) and safe to call from many tasks at
    once; engines run their blocking calls in threads.

    ``key`` is the owning API key's identity as the gateway names it (never the secret), or
    None when auth is off; it is compared exactly, None only matching None. A conversation of
    another key is treated as unknown. Ids that are not valid
    (:func:`quorum.conversations.ids.valid_id`) are unknown too, without a query.

    Engine failures (the database unreachable, locked too long, out of disk) raise
    ``quorum.errors.Unavailable`` with ``code`` ``conversation_store_unavailable``.
    """

    limits: Limits

    @abc.abstractmethod
    async def create(self, id: str, key: str | None, created: int) -> None:
        """Store a new, empty conversation. ``created``: unix seconds. Raises
        ``TooManyConversations`` when ``key`` already keeps ``limits.max_conversations``, and
        ``ValueError`` when ``id`` is not a valid id or already exists (ids come from
        ``new_id``: either is a bug)."""

    @abc.abstractmethod
    async def get(self, id: str, key: str | None) -> Conversation | None:
        """The conversation with its messages in order, or None when ``id`` is unknown,
        deleted, invalid, or belongs to another key."""

    @abc.abstractmethod
    async def append(self, id: str, key: str | None, messages: list[dict[str, Any]]) -> None:
        """Append ``messages`` (a turn: the user's message and the assistant's, with its
        ``reasoning_content`` and ``tool_calls`` kept as fields) atomically: all of them, after
        every message appended before, or none. Concurrent appends to one conversation are
        serialized, each turn kept contiguous.

        Raises ``ConversationNotFound`` when the conversation is unknown to ``key`` (deleted
        meanwhile included), and what :meth:`Limits.check` raises; nothing is stored then.
        """

    @abc.abstractmethod
    async def delete(self, id: str, key: str | None) -> bool:
        """Remove the conversation and its messages; False when there was none for ``key``."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the engine (connection, pool). Idempotent; no method may be called after."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_T = TypeVar("_T")


class Operations(NamedTuple):
    """One SQL engine's blocking halves, each called as ``fn(connection, *args)`` in a worker
    thread by its store's ``_run``: ``create(id, key, created, limits)`` (counts the key's
    conversations first: ``Limits.check_conversations``), ``get(id, key)``,
    ``append(id, key, bodies, limits)`` (``bodies``: ``Limits.encode``'s JSON texts),
    ``delete(id, key)``; they return what the store method of that name returns."""

    create: Callable[..., None]
    get: Callable[..., Conversation | None]
    append: Callable[..., None]
    delete: Callable[..., bool]


class SQLStore(ConversationStore):
    """What both SQL engines do the same way around their statements: invalid ids are
    unknown without a query, a turn is encoded and bounded (``Limits.encode``) before any
    I/O. An engine gives its ``ops`` and ``_run``, which runs one of them with a connection
    in a worker thread and turns the engine's operational errors into ``unavailable()``."""

    ops: ClassVar[Operations]

    @abc.abstractmethod
    def _run(self, fn: Callable[..., _T], *args: Any) -> Awaitable[_T]:
        """``fn(connection, *args)`` in a worker thread; raises ``Unavailable`` when the
        engine fails, ``trio.ClosedResourceError`` after ``aclose``."""

    async def create(self, id: str, key: str | None, created: int) -> None:
        if not valid_id(id):
            raise ValueError(f"not a conversation id: {id!r}")
        await self._run(self.ops.create, id, key, created, self.limits)

    async def get(self, id: str, key: str | None) -> Conversation | None:
        if not valid_id(id):
            return None
        return await self._run(self.ops.get, id, key)

    async def append(self, id: str, key: str | None, messages: list[dict[str, Any]]) -> None:
        bodies = self.limits.encode(messages)
        if not valid_id(id):
            raise not_found()
        await self._run(self.ops.append, id, key, bodies, self.limits)

    async def delete(self, id: str, key: str | None) -> bool:
        if not valid_id(id):
            return False
        return await self._run(self.ops.delete, id, key)
