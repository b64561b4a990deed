"""Serving one request: locally on a backend, or forwarded to the node that serves it.

``Dispatcher.handle`` takes a validated request and returns a ``Reply`` (status, headers and
either bytes or an async iterator of bytes). A forwarded reply relays the serving node's bytes
unchanged; they are cut only at event boundaries, so the client never receives half an event.

Failure semantics (DESIGN.md, "Failure semantics of a request"): a failure before the first
byte becomes an HTTP error (``ApiError``); a failure after streaming began ends the stream
with one ``data: {"error": ...}`` event and ``data: [DONE]`` — never a fake finish_reason.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field

import httpx
import trio

from quorum.backends.base import Backend, Fault, Generation
from quorum.errors import (
    ApiError,
    BackendBroken,
    BackendSaturated,
    BackendUnavailable,
    InvalidRequest,
    Saturated,
    Unavailable,
    UpstreamFailed,
)
from quorum.routing.membership import Member, Membership
from quorum.routing.router import candidates
from quorum.sse import DONE, SSEParser, SSEProtocolError
from quorum.wire import Request, aggregate_chat, aggregate_completion, error_event

__all__ = ["Dispatcher", "Reply"]

log = logging.getLogger(__name__)

FORWARDED = "x-quorum-forwarded"
PIN = "x-quorum-pin"
CREATED = "x-quorum-created"
FAULT = "x-quorum-fault"
REQUEST_ID = "x-request-id"
NODE = "x-quorum-node"
ATTEMPTS = "x-quorum-attempts"

STREAM_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
JSON_HEADERS = {"content-type": "application/json"}
# Headers of the serving node's reply that a relay passes on to the client.
RELAYED_HEADERS = ("content-type", "cache-control", "x-accel-buffering", NODE, "retry-after")


@dataclass(slots=True)
class Reply:
    """What the HTTP layer sends: ``status``, ``headers``, and ``body`` — bytes, or an async
    iterator of bytes for a stream (closed with ``aclose`` when the client goes away)."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes] = field(default=b"")


def _request_id(headers: Mapping[str, str]) -> str:
    given = headers.get(REQUEST_ID, "")
    if 8 <= len(given) <= 64 and all(c.isalnum() or c in "-_" for c in given):
        return given
    return uuid.uuid4().hex


def _error_event(exc: Exception) -> bytes:
    body = ApiError(str(exc), code="stream_broken", status=502).body()
    return error_event(body) + DONE


class Dispatcher:
    """Routes validated requests for one node.

    ``name``: this node's name. ``backends``: model name → local ``Backend``. ``membership``:
    the cluster view. ``transport``: an httpx transport for node-to-node calls (tests pass a
    recording one). Timeouts in seconds.
    """

    def __init__(
        self,
        name: str,
        backends: Mapping[str, Backend],
        membership: Membership,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = 2.0,
        max_connections: int = 4096,
    ) -> None:
        self.name = name
        self.backends = dict(backends)
        self.membership = membership
        self.in_flight = 0
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=10.0, pool=10.0),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def members(self) -> Sequence[Member]:
        return self.membership.members()

    async def handle(
        self, request: Request, body: bytes, path: str, headers: Mapping[str, str]
    ) -> Reply:
        """Serve ``request`` (``body``: the raw bytes received, ``path``: the endpoint path,
        ``headers``: lower-cased request headers). Raises ``ApiError`` before any byte."""
        forwarded = FORWARDED in headers
        order = candidates(
            self.members(),
            request.model,
            self_name=self.name,
            pin=headers.get(PIN) or None,
            forwarded=forwarded,
        )
        request_id = _request_id(headers)
        created = _int_header(headers, CREATED) or int(time.time())
        target = order[0]
        if target.name == self.name:
            fault = None
            if FAULT in headers:
                try:
                    fault = Fault.parse(headers[FAULT])
                except ValueError as exc:
                    raise InvalidRequest(f"x-quorum-fault: {exc}") from None
            generation = Generation(
                request=request,
                request_id=request_id,
                created=created,
                include_usage=request.include_usage or not request.stream,
                fault=fault,
            )
            return await self._serve_local(generation, self.backends[request.model])
        out_headers = {
            "content-type": "application/json",
            FORWARDED: self.name,
            REQUEST_ID: request_id,
            CREATED: str(created),
        }
        if FAULT in headers:
            out_headers[FAULT] = headers[FAULT]
        return await self._forward(request, target, path, body, out_headers)

    # --- local --------------------------------------------------------------------------

    async def _serve_local(self, generation: Generation, backend: Backend) -> Reply:
        headers = {REQUEST_ID: generation.request_id, NODE: self.name, ATTEMPTS: "1"}
        stack = AsyncExitStack()
        self.in_flight += 1
        stack.callback(self._done)
        try:
            events = await stack.enter_async_context(backend.open(generation))
            iterator = aiter(events)
            if not generation.request.stream:
                parser = SSEParser()
                chunks = [
                    json.loads(ev.data)
                    async for e in iterator
                    for ev in parser.feed(e)
                    if not ev.is_done
                ]
                await stack.aclose()
                fold = aggregate_chat if generation.request.kind == "chat" else aggregate_completion
                return Reply(200, headers | JSON_HEADERS, json.dumps(fold(chunks)).encode())
            first = await anext(iterator)
        except BackendSaturated as exc:
            await stack.aclose()
            raise Saturated(
                f"Model '{backend.model}' is saturated on node {self.name}: every slot and "
                "queue place is taken. Retry after the time in Retry-After.",
                retry_after=exc.retry_after,
            ) from None
        except (BackendUnavailable, BackendBroken) as exc:
            await stack.aclose()
            cls = Unavailable if exc.status == 503 else UpstreamFailed
            raise cls(
                f"Node {self.name} could not serve '{backend.model}': {exc.message}",
                status=exc.status if exc.status >= 500 else None,
            ) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            raise
        return Reply(200, headers | STREAM_HEADERS, _local_stream(first, iterator, stack))

    def _done(self) -> None:
        self.in_flight -= 1

    # --- forwarded ----------------------------------------------------------------------

    async def _forward(
        self, request: Request, member: Member, path: str, body: bytes, headers: dict[str, str]
    ) -> Reply:
        self.in_flight += 1
        try:
            upstream = await self._client.send(
                self._client.build_request(
                    "POST", member.url + path, content=body, headers=headers
                ),
                stream=True,
            )
        except httpx.TransportError as exc:
            self.in_flight -= 1
            raise UpstreamFailed(
                f"Node {member.name} ({member.url}) could not be reached: {exc!r}."
            ) from None
        except BaseException:
            self.in_flight -= 1
            raise
        out = {k: v for k in RELAYED_HEADERS if (v := upstream.headers.get(k)) is not None}
        out[REQUEST_ID] = headers[REQUEST_ID]
        out[ATTEMPTS] = "1"
        if upstream.status_code != 200 or not request.stream:
            try:
                data = await upstream.aread()
            except httpx.TransportError as exc:
                raise UpstreamFailed(
                    f"Node {member.name} broke while answering: {exc!r}."
                ) from None
            finally:
                await upstream.aclose()
                self.in_flight -= 1
            return Reply(upstream.status_code, out, data)
        return Reply(200, out, self._relay(upstream, member))

    async def _relay(self, upstream: httpx.Response, member: Member) -> AsyncGenerator[bytes]:
        """Yield the serving node's bytes as received, cut at event boundaries."""
        parser = SSEParser()
        pending = b""
        done = False
        try:
            async with aclosing(upstream.aiter_raw()) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    events = parser.feed(chunk)
                    pending += chunk
                    if parser.pending < len(pending):
                        cut = len(pending) - parser.pending
                        out, pending = pending[:cut], pending[cut:]
                        yield out
                    if events and events[-1].is_done:
                        done = True
            if not done:
                raise BackendBroken(f"node {member.name} ended the stream without [DONE]")
        except (httpx.TransportError, BackendBroken, SSEProtocolError) as exc:
            log.warning("relay from %s broke: %r", member.name, exc)
            yield _error_event(exc)
        finally:
            with trio.CancelScope(shield=True):
                await upstream.aclose()
            self.in_flight -= 1


async def _local_stream(
    first: bytes, iterator: AsyncIterator[bytes], stack: AsyncExitStack
) -> AsyncIterator[bytes]:
    try:
        yield first
        async for event in iterator:
            yield event
    except BackendBroken as exc:
        yield _error_event(exc)
    finally:
        with trio.CancelScope(shield=True):
            await stack.aclose()


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None or not value.isdigit():
        return None
    return int(value)
