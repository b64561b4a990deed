"""The serving side: a generation on this node's own backend, for a request forwarded here
or for one this node chose for itself, and the mapping of backend failures.

A backend's refusals before any byte become ``AttemptFailed`` (the entry node's attempt loop
moves on): ``BackendSaturated`` → 429, saturated; ``BackendUnavailable`` → its status (5xx).
A break after the first byte (``BackendBroken``) ends a forwarded stream with one error event
and ``[DONE]``, which the entry node reads as a broken stream and resumes elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager

import trio

from quorum.backends.base import Backend, Generation
from quorum.errors import (
    BackendBroken,
    BackendSaturated,
    BackendUnavailable,
    Unavailable,
    UpstreamFailed,
)
from quorum.routing.attempts import AttemptFailed, api_error
from quorum.routing.headers import ATTEMPTS, NODE, REQUEST_ID
from quorum.routing.relay import Reply, StreamBody, decode, local_events, stream_error
from quorum.sse import SSEProtocolError
from quorum.wire import aggregate_chat, aggregate_completion

__all__ = ["JSON_HEADERS", "STREAM_HEADERS", "LocalServer", "open_local"]

STREAM_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
JSON_HEADERS = {"content-type": "application/json"}


class LocalServer:
    """This node's backends, serving. ``name``: the node. ``backends``: model → backend.
    ``serving``: generations open on them now, whoever the entry node (the load that
    selection compares with capacity). ``draining``: refuse new work."""

    def __init__(self, name: str, backends: dict[str, Backend]) -> None:
        self.name = name
        self.backends = backends
        self.serving = 0
        self.draining = False

    @asynccontextmanager
    async def generation(self, generation: Generation) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open ``generation`` on its model's backend, counted in ``serving`` while open.
        Raises ``AttemptFailed`` when the backend refuses (or the node drains)."""
        if self.draining:
            raise AttemptFailed(f"node {self.name} is draining", status=503)
        self.serving += 1
        try:
            async with open_local(self.backends[generation.request.model], generation) as items:
                yield items
        finally:
            self.serving -= 1

    async def serve(self, generation: Generation) -> Reply:
        """Serve a request here: a stream of the backend's bytes as produced, or the
        folded answer of a non-streamed request. Raises ``ApiError`` before any byte."""
        request = generation.request
        if self.draining:
            raise Unavailable(f"Node {self.name} is draining and takes no new requests.")
        headers = {REQUEST_ID: generation.request_id, NODE: self.name, ATTEMPTS: "1"}
        stack = AsyncExitStack()
        try:
            items = await stack.enter_async_context(self.generation(generation))
            if not request.stream:
                events = await stack.enter_async_context(aclosing(local_events(items)))
                chunks = [
                    decode(data)
                    async for batch in events
                    for _, data in batch
                    if data != "[DONE]" and data != b"[DONE]"
                ]
                await stack.aclose()
                if any("error" in chunk for chunk in chunks):
                    raise BackendBroken("the backend answered with an error event")
                fold = aggregate_chat if request.kind == "chat" else aggregate_completion
                passed = generation.answer_headers  # the upstream's, allowlisted; ours win
                return Reply(
                    200, passed | headers | JSON_HEADERS, json.dumps(fold(chunks)).encode()
                )
            first = await anext(items)
        except AttemptFailed as exc:
            await stack.aclose()
            raise api_error(exc) from None
        except BackendBroken as exc:
            await stack.aclose()
            raise UpstreamFailed(f"Node {self.name}: {exc.message}") from None
        except SSEProtocolError as exc:
            await stack.aclose()
            raise UpstreamFailed(
                f"Node {self.name}: the backend's stream is broken: {exc}"
            ) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            raise
        passed = generation.answer_headers
        body = await StreamBody.start(_local_stream(first, items, stack))
        return Reply(200, passed | headers | STREAM_HEADERS, body)


@asynccontextmanager
async def open_local(
    backend: Backend, generation: Generation
) -> AsyncIterator[AsyncIterator[bytes]]:
    """A local backend's items (one or more whole events each, as produced); its refusals
    as ``AttemptFailed``."""
    try:
        context = backend.open(generation)
        events = await context.__aenter__()
    except BackendSaturated as exc:
        raise AttemptFailed(
            f"model '{backend.model}' is saturated: {exc.message}",
            status=429,
            saturated=True,
            retry_after=exc.retry_after,
        ) from None
    except BackendUnavailable as exc:
        raise AttemptFailed(exc.message, status=exc.status if exc.status >= 500 else 502) from None
    try:
        yield events
    except BaseException as exc:
        if not await context.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await context.__aexit__(None, None, None)


async def _local_stream(
    first: bytes, items: AsyncIterator[bytes], stack: AsyncExitStack
) -> AsyncGenerator[bytes]:
    """The stream of a request served here: the backend's bytes as produced."""
    try:
        yield first
        async for item in items:
            yield item
    except BackendBroken as exc:
        yield stream_error(str(exc))
    finally:
        with trio.CancelScope(shield=True):
            await stack.aclose()
