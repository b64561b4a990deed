"""The embedded store: one SQLite file per node (stdlib ``sqlite3``, WAL).

One connection, used by one worker thread at a time: every call takes a ``trio.Lock`` (FIFO,
cancellable while waiting) and then runs in ``trio.to_thread.run_sync``, which lets the
statement finish when the caller is cancelled, so a transaction is always committed or rolled
back, never left open. Writes start with ``BEGIN IMMEDIATE``; another process on the same file
is waited for up to ``busy_timeout_s``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Self, TypeVar

import trio

from quorum.conversations.schema import migrations
from quorum.conversations.store import (
    DEFAULT_MAX_CONVERSATIONS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_MESSAGES,
    Conversation,
    Limits,
    Operations,
    SQLStore,
    not_found,
    unavailable,
)

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")


class SQLiteStore(SQLStore):
    """Conversations in the SQLite file at ``path`` (created when missing; its directory must
    exist). Opening sets WAL and ``foreign_keys`` and applies the migrations under
    ``migrations/sqlite/`` not yet recorded in the file's ``schema_migrations``.

    ``max_messages``, ``max_message_bytes``, ``max_conversations``: see
    :class:`~quorum.conversations.store.Limits`.
    ``busy_timeout_s``: seconds to wait for another connection's write lock before a call
    raises ``Unavailable``.

    The constructor blocks (file I/O, migrations): call it at start-up, or ``await
    SQLiteStore.open(...)`` from trio. Raises ``sqlite3.Error`` (with a note naming the file)
    when the file cannot be opened or migrated.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_conversations: int = DEFAULT_MAX_CONVERSATIONS,
        busy_timeout_s: float = 5.0,
    ) -> None:
        self.limits = Limits(max_messages, max_message_bytes, max_conversations)
        self.path = os.fspath(path)
        self._lock = trio.Lock()
        try:
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            exc.add_note(f"conversation store: {self.path}")
            raise
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, not 'wal'")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                exc.add_note(f"conversation store: {self.path}")
            raise
        self._conn: sqlite3.Connection | None = conn

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_conversations: int = DEFAULT_MAX_CONVERSATIONS,
        busy_timeout_s: float = 5.0,
    ) -> Self:
        """The constructor, run in a worker thread."""
        return await trio.to_thread.run_sync(
            partial(
                cls,
                path,
                max_messages=max_messages,
                max_message_bytes=max_message_bytes,
                max_conversations=max_conversations,
                busy_timeout_s=busy_timeout_s,
            )
        )

    async def aclose(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise trio.ClosedResourceError("the conversation store is closed")
            try:
                return await trio.to_thread.run_sync(partial(fn, conn, *args))
            except sqlite3.OperationalError as exc:  # locked, disk full, I/O error, read-only
                raise unavailable() from exc


# The blocking halves, each run in the worker thread with the connection.


def _create(
    conn: sqlite3.Connection, id: str, key: str | None, created: int, limits: Limits
) -> None:
    # BEGIN IMMEDIATE: the count and the insert see no other writer in between
    with _transaction(conn):
        (kept,) = conn.execute(
            "SELECT count(*) FROM conversations WHERE api_key IS ?", (key,)
        ).fetchone()
        limits.check_conversations(key, kept)
        try:
            conn.execute(
                "INSERT INTO conversations (id, api_key, created) VALUES (?, ?, ?)",
                (id, key, created),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"conversation {id} already exists") from None


def _get(conn: sqlite3.Connection, id: str, key: str | None) -> Conversation | None:
    # One statement, so one snapshot: a concurrent append is seen whole or not at all.
    rows = conn.execute(
        "SELECT c.created, m.body FROM conversations AS c"
        " LEFT JOIN conversation_messages AS m ON m.conversation_id = c.id"
        " WHERE c.id = ? AND c.api_key IS ? ORDER BY m.seq",
        (id, key),
    ).fetchall()
    if not rows:
        return None
    return Conversation(id, rows[0][0], [json.loads(body) for _, body in rows if body is not None])


def _append(
    conn: sqlite3.Connection, id: str, key: str | None, bodies: list[str], limits: Limits
) -> None:
    with _transaction(conn):
        row = conn.execute(
            "SELECT message_count FROM conversations WHERE id = ? AND api_key IS ?", (id, key)
        ).fetchone()
        if row is None:
            raise not_found()
        start: int = row[0]
        limits.check_count(start, len(bodies))
        conn.execute(
            "UPDATE conversations SET message_count = ? WHERE id = ?", (start + len(bodies), id)
        )
        conn.executemany(
            "INSERT INTO conversation_messages (conversation_id, seq, body) VALUES (?, ?, ?)",
            [(id, start + i, body) for i, body in enumerate(bodies)],
        )


def _delete(conn: sqlite3.Connection, id: str, key: str | None) -> bool:
    cursor = conn.execute("DELETE FROM conversations WHERE id = ? AND api_key IS ?", (id, key))
    return cursor.rowcount > 0


def _migrate(conn: sqlite3.Connection) -> None:
    # BEGIN IMMEDIATE takes the write lock before reading what is applied, so two processes
    # opening one file apply each migration once; SQLite's DDL is transactional.
    with _transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version TEXT PRIMARY KEY, applied INTEGER NOT NULL)"
        )
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in migrations("sqlite"):
            if migration.version in applied:
                continue
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied) VALUES (?, ?)",
                (migration.version, int(time.time())),
            )


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` when the body or the commit raises
    (the connection is in autocommit mode, ``isolation_level=None``)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _statements(sql: str) -> Iterator[str]:
    """The statements of a migration file, split where ``sqlite3.complete_statement`` says
    one ends (so a ``;`` inside a string or a trigger body does not split)."""
    *pieces, tail = sql.split(";")
    pending = ""
    for piece in pieces:
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if _has_code(pending):
                yield pending
            pending = ""
    if _has_code(pending + tail):
        raise ValueError(f"an unfinished statement ends a migration: {pending + tail!r}")


def _has_code(sql: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in sql.splitlines())


SQLiteStore.ops = Operations(_create, _get, _append, _delete)
