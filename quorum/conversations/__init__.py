"""Conversations kept by the gateway for ``/c1`` (issue #14).

``quorum.conversations.ids``: ``new_id``, ``owner_of``, ``valid_id`` (pure).

This package imports ``quorum.errors`` and nothing else of Quorum's.
"""

from quorum.conversations.ids import new_id, owner_of, valid_id

__all__ = ["new_id", "owner_of", "valid_id"]
