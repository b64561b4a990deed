"""The conversation store, the same tests on both engines: SQLite in a temporary file, and
PostgreSQL on a real server (tests/conversations/conftest.py starts one; skipped, saying what
is missing, without Debian's ``postgresql`` package or psycopg)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from quorum.conversations import Conversation, ConversationStore, Limits, SQLiteStore, new_id
from quorum.conversations.schema import migrations
from quorum.errors import (
    ConversationNotFound,
    ConversationTooLong,
    InvalidRequest,
    MessageTooLarge,
    TooManyConversations,
    Unavailable,
)

CREATED = 1_760_000_000


@dataclass
class Engine:
    """One engine under test: ``open(**options)`` opens a store on the test's database;
    ``query(sql)`` reads that database directly, past the store."""

    name: str
    open: Callable[..., Awaitable[ConversationStore]]
    query: Callable[[str], list[tuple[Any, ...]]]


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        path = tmp_path / "conversations.sqlite3"

        def sqlite_query(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path) as conn:
                return conn.execute(sql).fetchall()

        return Engine("sqlite", lambda **kw: SQLiteStore.open(path, **kw), sqlite_query)

    dsn: str = request.getfixturevalue("postgres_dsn")
    import psycopg

    from quorum.conversations.postgres import PostgresStore

    def postgres_query(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn) as conn:
            return conn.execute(sql.encode()).fetchall()

    return Engine("postgres", lambda **kw: PostgresStore.open(dsn, **kw), postgres_query)


@pytest.fixture
async def store(engine: Engine) -> AsyncIterator[ConversationStore]:
    async with await engine.open() as opened:
        yield opened


def turn(i: int) -> list[dict[str, Any]]:
    """A user message and the assistant's answer, with reasoning and a tool call."""
    return [
        {"role": "user", "content": f"question {i}"},
        {
            "role": "assistant",
            "content": f"answer {i}",
            "reasoning_content": f"thinking about {i}",
            "tool_calls": [
                {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": f'{{"n": {i}}}'},
                }
            ],
        },
    ]


async def new_conversation(store: ConversationStore, key: str | None = None) -> str:
    conversation_id = new_id("node-a")
    await store.create(conversation_id, key, CREATED)
    return conversation_id


# --- create, get, append, delete ----------------------------------------------------------


async def test_new_conversation_is_empty(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store)
    conversation = await store.get(conversation_id, None)
    assert conversation == Conversation(conversation_id, CREATED, [])
    assert conversation.as_json() == {"id": conversation_id, "created": CREATED, "messages": []}


async def test_appended_turns_come_back_in_order_and_unchanged(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store)
    odd = {"role": "user", "content": "nul \u0000, lone \ud800, emoji \U0001f600, 日本語"}
    await store.append(conversation_id, None, turn(0))
    await store.append(conversation_id, None, [odd, *turn(1)])
    conversation = await store.get(conversation_id, None)
    assert conversation is not None
    assert conversation.messages == [*turn(0), odd, *turn(1)]


async def test_delete_removes_the_conversation_and_its_messages(
    engine: Engine, store: ConversationStore
) -> None:
    conversation_id = await new_conversation(store)
    await store.append(conversation_id, None, turn(0))
    assert await store.delete(conversation_id, None) is True
    assert await store.get(conversation_id, None) is None
    assert await store.delete(conversation_id, None) is False
    assert engine.query("SELECT count(*) FROM conversation_messages") == [(0,)]


async def test_append_after_delete_is_not_found(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store)
    await store.delete(conversation_id, None)
    with pytest.raises(ConversationNotFound) as caught:
        await store.append(conversation_id, None, turn(0))
    assert caught.value.status == 404
    assert caught.value.code == "conversation_not_found"


async def test_unknown_and_malformed_ids_are_not_found(store: ConversationStore) -> None:
    for conversation_id in (
        new_id("node-a"),
        "conv_x'; DROP TABLE conversations; --",
        "",
        "x" * 10**5,
    ):
        assert await store.get(conversation_id, None) is None
        assert await store.delete(conversation_id, None) is False
        with pytest.raises(ConversationNotFound):
            await store.append(conversation_id, None, turn(0))


async def test_create_refuses_a_malformed_or_taken_id(store: ConversationStore) -> None:
    with pytest.raises(ValueError, match="not a conversation id"):
        await store.create("conv_short", None, CREATED)
    conversation_id = await new_conversation(store, "team-a")
    with pytest.raises(ValueError, match="already exists"):
        await store.create(conversation_id, "team-b", CREATED)
    assert await store.get(conversation_id, "team-a") is not None


# --- ownership ------------------------------------------------------------------------------


async def test_another_key_sees_no_conversation(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store, "team-a")
    await store.append(conversation_id, "team-a", turn(0))
    for other in ("team-b", None, "TEAM-A", "team-a "):
        assert await store.get(conversation_id, other) is None
        assert await store.delete(conversation_id, other) is False
        with pytest.raises(ConversationNotFound):
            await store.append(conversation_id, other, turn(1))
    conversation = await store.get(conversation_id, "team-a")
    assert conversation is not None and conversation.messages == turn(0)


async def test_conversation_made_without_auth_is_not_a_keys(store: ConversationStore) -> None:
    conversation_id = await new_conversation(store, None)
    assert await store.get(conversation_id, "team-a") is None
    assert await store.get(conversation_id, None) is not None


# --- bounds, and appends that store all or nothing -------------------------------------------


async def test_append_past_max_messages_stores_nothing(engine: Engine) -> None:
    async with await engine.open(max_messages=3) as store:
        conversation_id = await new_conversation(store)
        await store.append(conversation_id, None, turn(0))
        with pytest.raises(ConversationTooLong, match="at most 3") as caught:
            await store.append(conversation_id, None, turn(1))
        assert (caught.value.status, caught.value.code) == (400, "conversation_too_long")
        conversation = await store.get(conversation_id, None)
        assert conversation is not None and conversation.messages == turn(0)
        await store.append(conversation_id, None, turn(1)[:1])
        conversation = await store.get(conversation_id, None)
        assert conversation is not None and len(conversation.messages) == 3


async def test_a_key_keeps_at_most_max_conversations(engine: Engine) -> None:
    async with await engine.open(max_conversations=2) as store:
        for key in ("team-a", None):
            kept = [await new_conversation(store, key) for _ in range(2)]
            with pytest.raises(TooManyConversations, match="max_conversations = 2") as caught:
                await new_conversation(store, key)
            assert (caught.value.status, caught.value.code) == (400, "too_many_conversations")
            assert await store.delete(kept[0], key)
            await new_conversation(store, key)  # room again
        await new_conversation(store, "team-b")  # each key has its own bound
        rows = engine.query("SELECT count(*) FROM conversations")
        assert rows == [(5,)]


async def test_two_nodes_creating_at_once_never_pass_max_conversations(engine: Engine) -> None:
    made: list[str] = []
    refused = 0
    async with await engine.open(max_conversations=3) as one:
        async with await engine.open(max_conversations=3) as other:

            async def create(i: int) -> None:
                nonlocal refused
                try:
                    made.append(await new_conversation((one, other)[i % 2], "team-a"))
                except TooManyConversations:
                    refused += 1

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(create, i)
    assert (len(made), refused) == (3, 7)
    assert engine.query("SELECT count(*) FROM conversations") == [(3,)]


async def test_turn_with_one_message_too_large_stores_nothing(engine: Engine) -> None:
    async with await engine.open(max_message_bytes=200) as store:
        conversation_id = await new_conversation(store)
        big = {"role": "assistant", "content": "é" * 100}  # 200 bytes of content in UTF-8
        with pytest.raises(MessageTooLarge, match="at most 200 bytes") as caught:
            await store.append(conversation_id, None, [turn(0)[0], big])
        assert (caught.value.status, caught.value.param) == (413, "messages[1]")
        conversation = await store.get(conversation_id, None)
        assert conversation is not None and conversation.messages == []


@pytest.mark.parametrize(
    "message", [["not", "an", "object"], {"content": float("nan")}, {"content": b"bytes"}]
)
async def test_message_that_is_not_json_is_refused(store: ConversationStore, message: Any) -> None:
    conversation_id = await new_conversation(store)
    with pytest.raises(InvalidRequest):
        await store.append(conversation_id, None, [turn(0)[0], message])
    conversation = await store.get(conversation_id, None)
    assert conversation is not None and conversation.messages == []


def test_limits_check_refuses_before_anything_is_asked() -> None:
    limits = Limits(max_messages=2, max_message_bytes=50)
    small = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    limits.check(None, small)
    with pytest.raises(ConversationTooLong):
        limits.check(Conversation("c", CREATED, small[:1]), small)
    with pytest.raises(MessageTooLarge):
        limits.check(None, [{"content": "x" * 50}])
    with pytest.raises(ValueError):
        Limits(max_messages=0)


# --- concurrency -----------------------------------------------------------------------------


async def test_concurrent_appends_from_two_stores_keep_every_turn_whole(
    engine: Engine, store: ConversationStore
) -> None:
    """Two store objects (two nodes on one database, or two connections on one file), ten
    tasks each, append turns while readers watch: no turn is lost, split or seen half."""
    conversation_id = await new_conversation(store)
    turns = 20
    seen_odd = []

    async with await engine.open() as other:

        async def writer(i: int) -> None:
            await (store, other)[i % 2].append(conversation_id, None, turn(i))

        async def reader() -> None:
            for _ in range(10):
                conversation = await other.get(conversation_id, None)
                assert conversation is not None
                if len(conversation.messages) % 2:
                    seen_odd.append(len(conversation.messages))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(turns):
                nursery.start_soon(writer, i)

    assert seen_odd == []
    conversation = await store.get(conversation_id, None)
    assert conversation is not None
    messages = conversation.messages
    assert len(messages) == 2 * turns
    order = []
    for user, assistant in zip(messages[::2], messages[1::2], strict=True):
        i = int(user["content"].removeprefix("question "))
        assert [user, assistant] == turn(i)
        order.append(i)
    assert sorted(order) == list(range(turns))


# --- persistence and migrations --------------------------------------------------------------


async def test_reopened_store_keeps_conversations(engine: Engine) -> None:
    async with await engine.open() as store:
        conversation_id = await new_conversation(store, "team-a")
        await store.append(conversation_id, "team-a", turn(0))
    async with await engine.open() as store:
        assert await store.get(conversation_id, "team-a") == Conversation(
            conversation_id, CREATED, turn(0)
        )


async def test_migrations_are_applied_once(engine: Engine) -> None:
    for _ in range(2):
        async with await engine.open():
            pass
    applied = engine.query("SELECT version FROM schema_migrations ORDER BY version")
    assert applied == [(m.version,) for m in migrations(engine.name)]
    assert applied[0] == ("0001_conversations",)


async def test_closed_store_refuses_calls(engine: Engine) -> None:
    store = await engine.open()
    await store.aclose()
    await store.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await store.get(new_id("node-a"), None)


# --- engine specifics ------------------------------------------------------------------------


async def test_sqlite_file_is_in_wal_mode_with_cascading_deletes(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    async with await SQLiteStore.open(path) as store:
        conversation_id = await new_conversation(store)
        await store.append(conversation_id, None, turn(0))
        await store.delete(conversation_id, None)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*) FROM conversation_messages").fetchone() == (0,)


async def test_sqlite_locked_too_long_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    async with await SQLiteStore.open(path, busy_timeout_s=0.05) as store:
        conversation_id = await new_conversation(store)
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(Unavailable) as caught:
                await store.append(conversation_id, None, turn(0))
            assert caught.value.code == "conversation_store_unavailable"
            assert str(path) not in caught.value.message
        finally:
            holder.close()
        await store.append(conversation_id, None, turn(0))


async def test_postgres_replaces_connections_the_server_ended(postgres_dsn: str) -> None:
    import psycopg

    from quorum.conversations.postgres import PostgresStore

    async with await PostgresStore.open(postgres_dsn, max_connections=2) as store:
        conversation_id = await new_conversation(store)
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        await store.append(conversation_id, None, turn(0))
        conversation = await store.get(conversation_id, None)
        assert conversation is not None and conversation.messages == turn(0)


async def test_postgres_unreachable_at_open_fails_fast(postgres_dsn: str) -> None:
    import psycopg

    from quorum.conversations.postgres import PostgresStore

    with pytest.raises(psycopg.OperationalError):
        await PostgresStore.open(postgres_dsn + " port=1", timeout_s=1)
