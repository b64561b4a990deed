"""What the node's HTTP server (``quorum.server``) and the ASGI app it serves
(``quorum.api``) tell each other beyond ASGI, about one client connection.

- :data:`HOLD_HEAD`, a key of an ``http.response.start`` message: the head's bytes are sent
  with the response's next write instead of on their own.
- :data:`CLIENT`, the connection's :class:`Departure`, set by the server for the tasks it
  runs for that connection (the app's among them): it says when the client has gone, so the
  app can cancel a request's work on it without a task of its own reading ``receive`` for
  ``http.disconnect`` (which costs a task, a nursery and ~5 KB for every open stream).

Outside ``quorum.server`` (an ASGI test transport, another server), :data:`CLIENT` is None
and the app watches ``receive`` as ASGI has it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Final

__all__ = ["CLIENT", "HOLD_HEAD", "Departure"]

HOLD_HEAD: Final = "quorum.hold_head"
"""A key of an ASGI ``http.response.start`` message: when true, the head's bytes are sent
with the response's next write instead of on their own. For a head whose first body chunk
follows at once (a ``StreamBody`` that is ``ready``): until that chunk, the client has
nothing to read."""


class Departure:
    """When a client connection's peer has gone (its end of file, a failed read or write, the
    connection closed): callbacks registered with :meth:`call_when_gone` run then, once.
    ``gone``: whether that has happened."""

    __slots__ = ("_callbacks", "gone")

    def __init__(self) -> None:
        self.gone = False
        self._callbacks: set[Callable[[], object]] = set()

    def call_when_gone(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Run ``callback`` (synchronous, must not raise) when the client has gone, at once
        if it already has. Returns the function that unregisters it."""
        if self.gone:
            callback()
            return _nothing
        self._callbacks.add(callback)
        return lambda: self._callbacks.discard(callback)

    def set_gone(self) -> None:
        """The client has gone: run every registered callback (the first call only)."""
        if self.gone:
            return
        self.gone = True
        callbacks, self._callbacks = self._callbacks, set()
        for callback in callbacks:
            callback()


def _nothing() -> None:
    return None


CLIENT: ContextVar[Departure | None] = ContextVar("quorum_client", default=None)
"""The :class:`Departure` of the client connection the current task serves, None outside
``quorum.server``."""
