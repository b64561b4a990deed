"""Conversations kept by the gateway for ``/c1`` (issue #14): ids, and one store interface
over two engines.

``quorum.conversations.ids``: ``new_id``, ``owner_of``, ``valid_id`` (pure).
``quorum.conversations.store``: ``ConversationStore``, ``Conversation``, ``Limits`` (pure).
``quorum.conversations.schema``: the plain-SQL migrations under ``migrations/<engine>/``.
``quorum.conversations.sqlite``: ``SQLiteStore``, the embedded default (a file per node).
``quorum.conversations.postgres``: ``PostgresStore``, shared by a cluster; needs the
``postgres`` extra, so this package does not import it.

This package imports ``quorum.errors`` and nothing else of Quorum's.
"""

from quorum.conversations.ids import new_id, owner_of, valid_id
from quorum.conversations.sqlite import SQLiteStore
from quorum.conversations.store import Conversation, ConversationStore, Limits

__all__ = [
    "Conversation",
    "ConversationStore",
    "Limits",
    "SQLiteStore",
    "new_id",
    "owner_of",
    "valid_id",
]
