"""The cluster's store: PostgreSQL through psycopg 3 and a ``psycopg_pool.ConnectionPool``.

Every node connects to the same database, so any node continues any conversation and a node's
death loses none. The pool is synchronous; each call runs in ``trio.to_thread.run_sync``
under a ``trio.CapacityLimiter`` as wide as the pool, so callers queue in trio (cancellable)
rather than in threads, and a statement that has started finishes or rolls back whole.

Appends lock the conversation's row (``SELECT ... FOR UPDATE``) before they number their
messages, so appends from several nodes to one conversation are serialized; a delete that
comes first makes the append raise ``ConversationNotFound``. Migrations run at open inside
one transaction holding an advisory lock, so nodes starting together apply each file once.

Needs the ``postgres`` extra (``pip install 'quorum[postgres]'``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Self, TypeVar

import psycopg
import trio
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

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

__all__ = ["MIGRATION_LOCK", "PostgresStore"]

_T = TypeVar("_T")

MIGRATION_LOCK = 0x71756F72756D
"""The ``pg_advisory_xact_lock`` key migrations hold (``"quorum"`` in ASCII)."""

CREATE_LOCK = 0x7163
"""The first half of the two-int advisory lock a create holds on its key (``"qc"``)."""


class PostgresStore(SQLStore):
    """Conversations in the PostgreSQL database at ``dsn`` (a libpq connection string or
    URI). Opening connects, then applies the migrations under ``migrations/postgres/`` not
    yet recorded in ``schema_migrations``; the tables go in the connection's default schema
    (give Quorum its own database, or a schema through ``options=-csearch_path=...``).

    ``max_messages``, ``max_message_bytes``, ``max_conversations``: see
    :class:`~quorum.conversations.store.Limits`.
    ``max_connections``: the pool's size (and how many calls run at once). ``timeout_s``:
    seconds to wait for a connection, at open and for each call, before ``Unavailable``.

    The constructor blocks (connecting, migrations): call it at start-up, or ``await
    PostgresStore.open(...)`` from trio. Raises ``psycopg.Error`` (``PoolTimeout`` when no
    connection could be made within ``timeout_s``).
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_conversations: int = DEFAULT_MAX_CONVERSATIONS,
        max_connections: int = 8,
        timeout_s: float = 10.0,
    ) -> None:
        self.limits = Limits(max_messages, max_message_bytes, max_conversations)
        self._limiter = trio.CapacityLimiter(max_connections)
        self._pool: ConnectionPool | None = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max_connections,
            open=False,
            timeout=timeout_s,
            # A connection broken while idle (the server restarted) is replaced, not used.
            check=ConnectionPool.check_connection,
            name="quorum-conversations",
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
            with self._pool.connection() as conn:
                _migrate(conn)
        except BaseException:
            self._pool.close()
            raise

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_conversations: int = DEFAULT_MAX_CONVERSATIONS,
        max_connections: int = 8,
        timeout_s: float = 10.0,
    ) -> Self:
        """The constructor, run in a worker thread."""
        return await trio.to_thread.run_sync(
            partial(
                cls,
                dsn,
                max_messages=max_messages,
                max_message_bytes=max_message_bytes,
                max_conversations=max_conversations,
                max_connections=max_connections,
                timeout_s=timeout_s,
            )
        )

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Waits for calls in flight: they hold connections until they finish.
            await trio.to_thread.run_sync(pool.close)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        async with self._limiter:
            pool = self._pool
            if pool is None:
                raise trio.ClosedResourceError("the conversation store is closed")
            try:
                return await trio.to_thread.run_sync(partial(_with_connection, pool, fn, *args))
            except psycopg.OperationalError as exc:  # unreachable, restarted, pool timeout
                raise unavailable() from exc


def _with_connection(pool: ConnectionPool, fn: Callable[..., _T], *args: Any) -> _T:
    # The pool's context commits when fn returns and rolls back when it raises.
    with pool.connection() as conn:
        return fn(conn, *args)


# The blocking halves, each run in a worker thread with a pooled connection.


def _create(
    conn: psycopg.Connection, id: str, key: str | None, created: int, limits: Limits
) -> None:
    # one key's creates take turns (a transaction-scoped advisory lock on the key), so two
    # nodes cannot both see room for the last conversation
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s::integer, hashtext(coalesce(%s, '')))", (CREATE_LOCK, key)
    )
    if key is None:  # "IS NOT DISTINCT FROM" would not use the index
        row = conn.execute("SELECT count(*) FROM conversations WHERE api_key IS NULL").fetchone()
    else:
        row = conn.execute(
            "SELECT count(*) FROM conversations WHERE api_key = %s", (key,)
        ).fetchone()
    limits.check_conversations(key, row[0] if row else 0)
    try:
        conn.execute(
            "INSERT INTO conversations (id, api_key, created) VALUES (%s, %s, %s)",
            (id, key, created),
        )
    except pg_errors.UniqueViolation:
        raise ValueError(f"conversation {id} already exists") from None


def _get(conn: psycopg.Connection, id: str, key: str | None) -> Conversation | None:
    # One statement, so one snapshot: a concurrent append is seen whole or not at all.
    rows = conn.execute(
        "SELECT c.created, m.body FROM conversations AS c"
        " LEFT JOIN conversation_messages AS m ON m.conversation_id = c.id"
        " WHERE c.id = %s AND c.api_key IS NOT DISTINCT FROM %s ORDER BY m.seq",
        (id, key),
    ).fetchall()
    if not rows:
        return None
    return Conversation(id, rows[0][0], [json.loads(body) for _, body in rows if body is not None])


def _append(
    conn: psycopg.Connection, id: str, key: str | None, bodies: list[str], limits: Limits
) -> None:
    with conn.transaction():
        row = conn.execute(
            "SELECT message_count FROM conversations"
            " WHERE id = %s AND api_key IS NOT DISTINCT FROM %s FOR UPDATE",
            (id, key),
        ).fetchone()
        if row is None:
            raise not_found()
        start: int = row[0]
        limits.check_count(start, len(bodies))
        conn.execute(
            "UPDATE conversations SET message_count = %s WHERE id = %s",
            (start + len(bodies), id),
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO conversation_messages (conversation_id, seq, body)"
                " VALUES (%s, %s, %s)",
                [(id, start + i, body) for i, body in enumerate(bodies)],
            )


def _delete(conn: psycopg.Connection, id: str, key: str | None) -> bool:
    cursor = conn.execute(
        "DELETE FROM conversations WHERE id = %s AND api_key IS NOT DISTINCT FROM %s", (id, key)
    )
    return cursor.rowcount > 0


def _migrate(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version text PRIMARY KEY, applied bigint NOT NULL)"
        )
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in migrations("postgres"):
            if migration.version in applied:
                continue
            # Without parameters psycopg sends the file as one simple query: many statements.
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, applied) VALUES (%s, %s)",
                (migration.version, int(time.time())),
            )


PostgresStore.ops = Operations(_create, _get, _append, _delete)
