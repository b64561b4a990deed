"""Serving one request: choose nodes, try them in order, relay, and resume broken streams.

``Dispatcher.handle`` takes a validated request and returns a ``Reply`` (status, headers and
either bytes or an async iterator of bytes).

Failure semantics (DESIGN.md, "Failure semantics of a request"):

1. Candidates come from the membership view (alive, ready, serving the model, breaker closed).
2. Until the first token reaches the client, any failure (connect error, 5xx, 429, an error
   event, no first token within ``ttft_timeout_s``) moves the request to the next candidate,
   at most ``max_attempts`` in all, with jittered exponential backoff. The role chunk is held
   back until the first token so that a failover before it is invisible.
3. After that, a broken stream (reset, EOF without ``[DONE]``, an error event, no chunk within
   ``inter_token_timeout_s``) is resumed on another candidate: it is sent the same request id
   and ``quorum_resume`` (the events and text the client has), and continues from there.
4. Only when no candidate can continue does the client get one ``data: {"error": ...}`` event
   and ``data: [DONE]``. Never a fake ``finish_reason``.

A stream served without incident is relayed as the serving node produced it, byte for byte,
cut only at event boundaries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from quorum.backends.base import Backend, Fault, Generation, Resume
from quorum.errors import (
    ApiError,
    BackendBroken,
    BackendSaturated,
    BackendUnavailable,
    InvalidRequest,
    PermissionDenied,
    Saturated,
    Unauthorized,
    Unavailable,
    UpstreamFailed,
)
from quorum.metrics import Metrics
from quorum.routing.breaker import BreakerBoard
from quorum.routing.config import RoutingConfig
from quorum.routing.headers import (
    ATTEMPTS,
    CREATED,
    FAULT,
    FORWARDED,
    INTERNAL,
    NODE,
    PIN,
    REQUEST_ID,
    RESUME_FIELD,
    SHARED,
    SIGNATURE,
    SINGLE_FLIGHT,
    ClusterSigner,
)
from quorum.routing.hop import HopError, HopPool, HopResponse
from quorum.routing.membership import Member, Membership
from quorum.routing.router import candidates
from quorum.routing.select import RoutingPolicy, Selector, prefix_key
from quorum.sse import DONE, SSEParser, SSEProtocolError
from quorum.wire import Request, aggregate_chat, aggregate_completion, error_event

__all__ = ["Dispatcher", "Reply", "RoutingConfig"]

log = logging.getLogger(__name__)

STREAM_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
JSON_HEADERS = {"content-type": "application/json"}


@dataclass(slots=True)
class Reply:
    """What the HTTP layer sends: ``status``, ``headers``, and ``body`` — bytes, or an async
    iterator of bytes for a stream (closed with ``aclose`` when the client goes away)."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes] = field(default=b"")


@dataclass(frozen=True, slots=True)
class _Job:
    """One client request as the entry node handles it: the validated ``request``, the
    ``body`` as received, the endpoint ``path``, the stream's ``request_id`` and
    ``created``, the injected ``fault`` (first attempt only) and the client's ``pin``."""

    request: Request
    body: bytes
    path: str
    request_id: str
    created: int
    fault: Fault | None
    pin: str | None


class _AttemptFailed(Exception):
    """One node could not start (or keep) serving the request.

    ``saturated``: it was full (429), not broken. ``final``: a client error (4xx) that another
    node would answer the same way; ``body`` is then relayed as is.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        saturated: bool = False,
        retry_after: float | None = None,
        final: bool = False,
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.saturated = saturated
        self.retry_after = retry_after
        self.final = final
        self.body = body


# One event as relayed: its exact bytes and its data field.
_Event = tuple[bytes, str | bytes]


def _request_id(headers: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` when it is 8-64 ASCII letters, digits, ``-`` or ``_``;
    else a fresh one."""
    given = headers.get(REQUEST_ID, "")
    if 8 <= len(given) <= 64 and given.isascii() and all(c.isalnum() or c in "-_" for c in given):
        return given
    return uuid.uuid4().hex


def _created(headers: Mapping[str, str]) -> int:
    """``x-quorum-created`` of a signed forward (unix seconds, at most 12 digits), else now."""
    value = headers.get(CREATED, "")
    if value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return int(time.time())


def _stream_error(message: str) -> bytes:
    body = ApiError(message, code="stream_broken", status=502).body()
    return error_event(body) + DONE


def _fault(headers: Mapping[str, str]) -> Fault | None:
    if FAULT not in headers:
        return None
    try:
        return Fault.parse(headers[FAULT])
    except ValueError as exc:
        raise InvalidRequest(f"x-quorum-fault: {exc}") from None


class Dispatcher:
    """Routes validated requests for one node.

    ``name``: this node's name. ``backends``: model name → local ``Backend``. ``membership``:
    the cluster view. ``signer``: signs and checks the hop's internal headers
    (``quorum.routing.headers``). ``allow_faults``: obey ``x-quorum-fault`` from clients
    (``[debug] faults``; a fault a signed forward carries is always obeyed). ``tap``: test
    hook called with every body chunk a hop receives. ``rng``: randomness for backoff jitter.
    """

    def __init__(
        self,
        name: str,
        backends: Mapping[str, Backend],
        membership: Membership,
        *,
        signer: ClusterSigner,
        config: RoutingConfig | None = None,
        allow_faults: bool = False,
        tap: Callable[[bytes], None] | None = None,
        rng: random.Random | None = None,
        policy: RoutingPolicy | None = None,
    ) -> None:
        self.name = name
        self.backends = dict(backends)
        self.membership = membership
        self.signer = signer
        self.config = config or RoutingConfig()
        self.allow_faults = allow_faults
        self._in_flight = 0
        self._idle = trio.Event()
        self.outstanding: dict[str, int] = {}  # attempts open to each node, by name
        self.breakers = BreakerBoard()
        self.draining = False
        self._rng = rng or random.Random()
        self.policy = policy or RoutingPolicy()
        self.selector = Selector(name, self.policy, rng=self._rng)
        self.flights: dict[bytes, _Flight] = {}
        self.metrics = Metrics()
        self.nursery: trio.Nursery | None = None  # set by the node: where flights run
        self._peers = HopPool(connect_timeout_s=self.config.connect_timeout_s, tap=tap)

    @property
    def in_flight(self) -> int:
        """Requests this node is working on, as entry or as server."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        if value == 0:
            self._idle.set()
            self._idle = trio.Event()

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self._in_flight:
            await self._idle.wait()

    async def aclose(self) -> None:
        await self._peers.aclose()

    def members(self) -> Sequence[Member]:
        return self.membership.members()

    def known_model(self, model: str) -> bool:
        """Whether some member (this node included) serves ``model``: only those become
        metric labels, so that clients cannot grow the label set."""
        return model in self.backends or any(model in m.models for m in self.members())

    async def handle(
        self, request: Request, body: bytes, path: str, headers: Mapping[str, str]
    ) -> Reply:
        """Serve ``request`` (``body``: the raw bytes received, ``path``: the endpoint path,
        ``headers``: lower-cased request headers). Raises ``ApiError`` before any byte: 401
        for internal headers without a valid signature, 403 for a fault this node does not
        allow, 400/404/429/502/503/504 as the request path decides."""
        if any(name in headers for name in INTERNAL):
            self.signer.verify("POST", path, body, headers)
            if FORWARDED not in headers:
                raise Unauthorized(
                    f"{SIGNATURE} without {FORWARDED}: internal headers come from nodes only.",
                    code="invalid_internal_headers",
                )
            return await self._serve_forwarded(request, headers)
        if FAULT in headers and not self.allow_faults:
            raise PermissionDenied(
                f"{FAULT} is refused: fault injection is off on node {self.name} "
                "([debug] faults = true in its config turns it on, for tests and scenarios).",
                param=FAULT,
            )
        if self.draining:
            raise Unavailable(
                f"Node {self.name} is draining: send requests to another node of the cluster.",
                retry_after=1.0,
            )
        if RESUME_FIELD in request.raw:
            raise InvalidRequest(
                f"'{RESUME_FIELD}' is set by Quorum nodes between themselves; remove it.",
                param=RESUME_FIELD,
            )
        job = _Job(
            request,
            body,
            path,
            _request_id(headers),
            int(time.time()),
            _fault(headers),
            headers.get(PIN) or None,
        )
        if self.nursery is not None and _shareable(request, headers):
            return await self._single_flight(job)
        return await self._route(job)

    async def _serve_forwarded(self, request: Request, headers: Mapping[str, str]) -> Reply:
        """A request another node forwarded here (signature checked): serve it locally."""
        candidates(
            self.members(),
            request.model,
            self_name=self.name,
            pin=headers.get(PIN) or None,
            forwarded=True,
        )
        resume = None
        if RESUME_FIELD in request.raw:
            try:
                resume = Resume.from_json(request.raw[RESUME_FIELD])
            except ValueError as exc:
                raise InvalidRequest(str(exc), param=RESUME_FIELD) from None
        generation = Generation(
            request=request,
            request_id=_request_id(headers),
            created=_created(headers),
            include_usage=request.include_usage or not request.stream,
            fault=_fault(headers),
            resume=resume,
        )
        return await self._serve_local(generation)

    async def _route(self, job: _Job) -> Reply:
        """Choose nodes for a client's request and serve it from the first that can."""
        order = await self._candidates(job.request, job.pin)
        self.in_flight += 1
        if not job.request.stream:
            try:
                return await self._unary(job, order)
            finally:
                self.in_flight -= 1
        try:
            relay = _StreamRelay(self, job, order)
            first = await relay.start()
        except BaseException:
            self.in_flight -= 1  # after start() succeeds, the stream's body owns the count
            raise
        headers_out = {
            REQUEST_ID: job.request_id,
            NODE: relay.node,
            ATTEMPTS: str(relay.attempts),
        } | STREAM_HEADERS
        return Reply(200, headers_out, relay.body(first))

    def order(
        self, request: Request, pin: str | None = None, exclude: Sequence[str] = ()
    ) -> list[Member]:
        """The nodes to try for ``request``, best first (``quorum.routing.select``): alive,
        ready, breaker closed, not in ``exclude``; prefix-affine, else power of two choices
        on gossiped load corrected by this node's own outstanding requests. Raises
        ``ApiError`` (404 unknown model, 400 bad pin, 503 nobody can take it)."""
        key = prefix_key(request, prefix_chars=self.policy.affinity_prefix_chars)
        return self.selector.order(
            self.members(),
            request.model,
            key=key if self.policy.affinity else None,
            own_in_flight=self.outstanding,
            breakers=self.breakers,
            now=trio.current_time(),
            exclude=exclude,
            pin=pin,
        )

    async def _single_flight(self, job: _Job) -> Reply:
        """Identical concurrent deterministic requests share one generation: the first one
        starts a flight in the node's nursery, the others follow it (from its start). The
        flight is cancelled when the last of its clients has left, whether it was streaming,
        waiting for its head, or waiting for a non-streamed answer."""
        # What changes the answer or its route is in the key: the body, a pin, a fault.
        fault = job.fault.header() if job.fault is not None else ""
        extra = f"{job.pin or ''}\0{fault}".encode()
        key = hashlib.sha256(job.path.encode() + b"\0" + extra + b"\0" + job.body).digest()
        flight = self.flights.get(key)
        if flight is None:
            flight = _Flight()
            self.flights[key] = flight

            async def run() -> None:
                try:
                    with flight.scope:
                        await flight.run(self._route(job))
                finally:
                    flight.finish()
                    if self.flights.get(key) is flight:
                        del self.flights[key]

            assert self.nursery is not None
            self.nursery.start_soon(run)
        return await flight.reply()

    async def _candidates(self, request: Request, pin: str | None) -> list[Member]:
        """``order``, but a request whose nodes are all warming is held (bounded)."""
        deadline = trio.current_time() + self.config.cold_start_wait_s
        while True:
            try:
                return self.order(request, pin)
            except Unavailable:
                warming = any(
                    request.model in m.models and m.state == "alive" and m.node_state == "warming"
                    for m in self.members()
                )
                if not warming or trio.current_time() >= deadline:
                    raise
            await trio.sleep(0.1)

    def next_member(
        self, request: Request, first: list[Member], pin: str | None, tried: Sequence[str]
    ) -> Member | None:
        """The node for the next attempt: the head of ``first`` for the first attempt, then a
        fresh ``order`` without the nodes tried; None when nobody is left."""
        if not tried:
            return first[0]
        try:
            return self.order(request, pin, exclude=tried)[0]
        except ApiError:
            return None

    async def backoff(self, attempt: int) -> None:
        """Full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter")."""
        await trio.sleep(self._rng.uniform(0, self.config.backoff_s * 2 ** (attempt - 1)))

    # --- serving here -------------------------------------------------------------------

    async def _serve_local(self, generation: Generation) -> Reply:
        """Serve a request forwarded here (or a non-streamed one) on the local backend."""
        request = generation.request
        if self.draining:
            raise Unavailable(f"Node {self.name} is draining and takes no new requests.")
        backend = self.backends[request.model]
        headers = {REQUEST_ID: generation.request_id, NODE: self.name, ATTEMPTS: "1"}
        stack = AsyncExitStack()
        self.in_flight += 1
        stack.callback(self._done)
        try:
            items = await stack.enter_async_context(_open_local(backend, generation))
            if not request.stream:
                events = await stack.enter_async_context(aclosing(_local_events(items)))
                chunks = [
                    _decode(data)
                    async for batch in events
                    for _, data in batch
                    if data != "[DONE]" and data != b"[DONE]"
                ]
                await stack.aclose()
                for chunk in chunks:
                    if "error" in chunk:
                        raise BackendBroken("the backend answered with an error event")
                fold = aggregate_chat if request.kind == "chat" else aggregate_completion
                return Reply(200, headers | JSON_HEADERS, json.dumps(fold(chunks)).encode())
            first = await anext(items)
        except _AttemptFailed as exc:
            await stack.aclose()
            raise _api_error(exc) from None
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
        return Reply(200, headers | STREAM_HEADERS, _local_stream(first, items, stack))

    def _done(self) -> None:
        self.in_flight -= 1

    # --- non-streamed, from the entry node -----------------------------------------------

    async def _unary(self, job: _Job, order: list[Member]) -> Reply:
        failures: list[_AttemptFailed] = []
        tried: list[str] = []
        while len(tried) < self.config.max_attempts:
            member = self.next_member(job.request, order, job.pin, tried)
            if member is None:
                break
            if tried:
                await self.backoff(len(tried))
            tried.append(member.name)
            breaker = self.breakers.get(member.name)
            breaker.allow(trio.current_time())
            fault = job.fault if len(tried) == 1 else None
            try:
                try:
                    with trio.fail_after(self.config.unary_timeout_s):
                        reply = await self._unary_once(job, member, fault)
                except trio.TooSlowError:
                    raise _AttemptFailed(
                        f"node {member.name} gave no answer in {self.config.unary_timeout_s} s",
                        status=504,
                    ) from None
            except _AttemptFailed as exc:
                if exc.final:
                    breaker.release(trio.current_time())
                    headers = JSON_HEADERS | {REQUEST_ID: job.request_id}
                    return Reply(exc.status, headers, exc.body)
                if exc.saturated or job.pin is not None:
                    # a pinned attempt says nothing about the node's health to others
                    breaker.release(trio.current_time())
                else:
                    breaker.record_failure(trio.current_time())
                log.info("%s: attempt on %s failed: %s", job.request_id, member.name, exc.message)
                self.metrics.attempt_failures.labels(member.name).inc()
                failures.append(exc)
                continue
            except BaseException:
                breaker.release(trio.current_time())
                raise
            breaker.record_success(trio.current_time())
            reply.headers[ATTEMPTS] = str(len(tried))
            return reply
        raise _exhausted(job.request.model, failures)

    async def _unary_once(self, job: _Job, member: Member, fault: Fault | None) -> Reply:
        self.outstanding[member.name] = self.outstanding.get(member.name, 0) + 1
        try:
            if member.name == self.name:
                generation = Generation(job.request, job.request_id, job.created, True, fault=fault)
                try:
                    return await self._serve_local(generation)
                except ApiError as exc:
                    raise _AttemptFailed(
                        exc.message,
                        status=exc.status,
                        saturated=exc.status == 429,
                        retry_after=exc.retry_after,
                        final=_is_final(exc.status),
                        body=json.dumps(exc.body()).encode(),
                    ) from None
            async with self._exchange(member, job, job.body, fault) as response:
                try:
                    data = await response.read(self.config.max_answer_bytes)
                except HopError as exc:
                    raise _AttemptFailed(
                        f"node {member.name} broke while answering: {exc}"
                    ) from None
            if response.status != 200:
                raise _status_failure(member, response, data)
            headers = {REQUEST_ID: job.request_id, NODE: response.headers.get(NODE, member.name)}
            return Reply(200, headers | JSON_HEADERS, data)
        finally:
            self.outstanding[member.name] -= 1

    # --- talking to other nodes -----------------------------------------------------------

    @asynccontextmanager
    async def _exchange(
        self, member: Member, job: _Job, body: bytes, fault: Fault | None
    ) -> AsyncIterator[HopResponse]:
        """POST ``body`` (the job's, or its resume) to ``member``; yields the streaming
        response, closes it on exit. Raises ``_AttemptFailed`` when the node cannot be
        reached."""
        headers = {
            "content-type": "application/json",
            FORWARDED: self.name,
            REQUEST_ID: job.request_id,
            CREATED: str(job.created),
        }
        if fault is not None:
            headers[FAULT] = fault.header()
        headers[SIGNATURE] = self.signer.sign("POST", job.path, body, headers)
        answered = False
        try:
            async with self._peers.post(member.url, job.path, body, headers) as response:
                answered = True
                yield response
        except HopError as exc:
            if answered:
                raise  # it broke after the head: the caller decides what that means
            raise _AttemptFailed(f"node {member.name} could not be reached: {exc}") from None

    @asynccontextmanager
    async def open_source(
        self, member: Member, job: _Job, fault: Fault | None, resume: Resume | None
    ) -> AsyncIterator[AsyncIterator[list[_Event]]]:
        """A stream of event batches from ``member`` (this node or another). Raises
        ``_AttemptFailed`` if it cannot start."""
        self.outstanding[member.name] = self.outstanding.get(member.name, 0) + 1
        try:
            if member.name == self.name:
                if self.draining:
                    raise _AttemptFailed(f"node {self.name} is draining", status=503)
                request = job.request
                generation = Generation(
                    request,
                    job.request_id,
                    job.created,
                    request.include_usage,
                    fault=fault,
                    resume=resume,
                )
                async with _open_local(self.backends[request.model], generation) as items:
                    async with aclosing(_local_events(items)) as events:
                        yield events
                return
            body = job.body
            if resume is not None:
                body = json.dumps({**job.request.raw, RESUME_FIELD: resume.as_json()}).encode()
            async with self._exchange(member, job, body, fault) as response:
                if response.status != 200:
                    try:
                        head = await response.read(65536)
                    except HopError:
                        head = b""
                    raise _status_failure(member, response, head)
                events = _remote_events(response)
                try:
                    yield events
                finally:
                    with trio.CancelScope(shield=True):
                        await events.aclose()
        finally:
            self.outstanding[member.name] -= 1


class _StreamRelay:
    """One streamed request at the entry node: attempts until the first token, then the
    relay, then resumes on other nodes if the serving one breaks."""

    def __init__(self, dispatcher: Dispatcher, job: _Job, order: list[Member]) -> None:
        self.d = dispatcher
        self.job = job
        self.request = job.request
        self.request_id = job.request_id
        self.order = order
        self.tried: list[str] = []
        self.attempts = 0
        self.node = ""
        self.events_sent = 0
        self.text: dict[str, list[str]] = {}
        self.tool_calls = 0  # tool-call deltas relayed: an upstream cannot continue those
        self.done = False
        self._stack = AsyncExitStack()
        self._source: AsyncIterator[list[_Event]] | None = None
        self._pending: list[_Event] = []  # events read but not relayed yet
        self._started = trio.current_time()

    async def _open(self, member: Member, resume: Resume | None) -> AsyncIterator[list[_Event]]:
        await self._stack.aclose()
        self._stack = AsyncExitStack()
        fault = self.job.fault if self.attempts == 1 and resume is None else None
        source = await self._stack.enter_async_context(
            self.d.open_source(member, self.job, fault, resume)
        )
        self._source = source
        return source

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stack.aclose()
        self._source = None

    async def start(self) -> bytes:
        """Try candidates until one yields its first token; return the bytes to send first
        (the held role chunk and that token). Raises ``ApiError`` when every attempt failed."""
        failures: list[_AttemptFailed] = []
        cfg = self.d.config
        while self.attempts < cfg.max_attempts:
            member = self.d.next_member(self.request, self.order, self.job.pin, self.tried)
            if member is None:
                break
            if self.attempts:
                await self.d.backoff(self.attempts)
            self.attempts += 1
            self.tried.append(member.name)
            self._pending = []
            breaker = self.d.breakers.get(member.name)
            breaker.allow(trio.current_time())
            try:
                with trio.fail_after(cfg.ttft_timeout_s):
                    source = await self._open(member, None)
                    held: list[_Event] = []
                    while not self._pending:
                        try:
                            batch = await anext(source)
                        except StopAsyncIteration:
                            raise _AttemptFailed(
                                f"node {member.name} ended before a token"
                            ) from None
                        for i, event in enumerate(batch):
                            kind = _kind(event[1])
                            if kind == "error":
                                raise _AttemptFailed(f"node {member.name} sent an error event")
                            held.append(event)
                            if kind != "role":
                                # the first token: send it with what was held; the rest of
                                # the batch is relayed (and checked) by _relay
                                self._pending = [event, *batch[i + 1 :]]
                                held.pop()
                                break
            except (
                _AttemptFailed,
                trio.TooSlowError,
                BackendBroken,
                HopError,
                SSEProtocolError,
            ) as exc:
                await self._close()
                failure = _as_failure(member, exc, cfg.ttft_timeout_s)
                if failure.final:
                    breaker.release(trio.current_time())
                    raise _final_error(failure) from None
                if failure.saturated or self.job.pin is not None:
                    # a pinned attempt says nothing about the node's health to others
                    breaker.release(trio.current_time())
                else:
                    breaker.record_failure(trio.current_time())
                log.info(
                    "%s: attempt on %s failed: %s", self.request_id, member.name, failure.message
                )
                self.d.metrics.attempt_failures.labels(member.name).inc()
                failures.append(failure)
                continue
            except BaseException:
                breaker.release(trio.current_time())
                await self._close()
                raise
            breaker.record_success(trio.current_time())
            self.node = member.name
            self.d.metrics.ttft.labels(self.request.model).observe(
                trio.current_time() - self._started
            )
            for raw, data in held:
                self._account(raw, data)
            return b"".join(raw for raw, _ in held)
        await self._close()
        raise _exhausted(self.request.model, failures)

    def _account(self, raw: bytes, data: str | bytes) -> bool:
        """Count an event as delivered; False for an error event (never relayed here)."""
        if data == "[DONE]" or data == b"[DONE]":
            self.done = True
            return True
        obj = _decode(data)
        if "error" in obj:
            return False
        self.events_sent += 1
        for choice in _choices(obj):
            delta = choice.get("delta")
            if delta is None:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    self.text.setdefault("text", []).append(text)
                continue
            if not isinstance(delta, dict):
                raise SSEProtocolError("an event's delta is not an object")
            for key, value in delta.items():
                if key != "role" and isinstance(value, str) and value:
                    self.text.setdefault(key, []).append(value)
            if delta.get("tool_calls"):
                self.tool_calls += 1
        return True

    def _resume_point(self) -> Resume:
        return Resume(self.events_sent, {k: "".join(v) for k, v in self.text.items()})

    async def body(self, first: bytes) -> AsyncGenerator[bytes]:
        """The client's stream: ``first``, the rest, resumes; always ends with ``[DONE]``."""
        try:
            yield first
            while not self.done:
                try:
                    async with aclosing(self._relay()) as relay:
                        async for out in relay:
                            yield out
                    if self.done:
                        break
                    raise BackendBroken(f"node {self.node} ended the stream without [DONE]")
                except (
                    BackendBroken,
                    HopError,
                    SSEProtocolError,
                    _AttemptFailed,
                    trio.TooSlowError,
                ) as exc:
                    log.warning("%s: stream from %s broke: %r", self.request_id, self.node, exc)
                    self.d.breakers.get(self.node).record_failure(trio.current_time())
                    await self._close()
                    resumed = await self._resume()
                    self.d.metrics.resumes.labels("resumed" if resumed else "failed").inc()
                    if not resumed:
                        yield _stream_error(
                            f"The stream broke on node {self.node} and no other node could "
                            f"continue it ({exc})."
                        )
                        return
            await self._drain()
        finally:
            await self._close()
            self.d.in_flight -= 1

    async def _drain(self) -> None:
        """Read the source to its end after [DONE] (the chunked terminator), so the
        node-to-node connection goes back to the pool instead of being closed."""
        if self._source is None:
            return
        with trio.move_on_after(1.0):
            try:
                async for _ in self._source:
                    pass
            except (HopError, SSEProtocolError, BackendBroken):
                pass

    async def _relay(self) -> AsyncGenerator[bytes]:
        source = self._source
        assert source is not None
        while True:
            if self._pending:
                batch, self._pending = self._pending, []
            else:
                with trio.move_on_after(self.d.config.inter_token_timeout_s) as timeout:
                    try:
                        batch = await anext(source)
                    except StopAsyncIteration:
                        return
                if timeout.cancelled_caught:
                    limit = self.d.config.inter_token_timeout_s
                    raise BackendBroken(f"no chunk from node {self.node} in {limit} s")
            out: list[bytes] = []
            for raw, data in batch:
                if not self._account(raw, data):
                    if out:
                        yield b"".join(out)
                    raise BackendBroken(f"node {self.node} sent an error event")
                out.append(raw)
                if self.done:
                    break
            if out:
                yield b"".join(out)
            if self.done:
                return

    async def _resume(self) -> bool:
        """Open another candidate at the resume point; False when none could."""
        for attempt in range(1, self.d.config.max_attempts + 1):
            member = self.d.next_member(self.request, [], self.job.pin, self.tried)
            if member is None:
                return False
            self.tried.append(member.name)
            if attempt > 1:
                await self.d.backoff(attempt - 1)
            try:
                try:
                    with trio.fail_after(self.d.config.ttft_timeout_s):
                        await self._open(member, self._resume_point())
                except trio.TooSlowError:
                    await self._close()
                    raise _AttemptFailed(f"node {member.name} did not answer in time") from None
            except _AttemptFailed as exc:
                self.d.breakers.get(member.name).record_failure(trio.current_time())
                log.info("%s: resume on %s failed: %s", self.request_id, member.name, exc)
                continue
            log.info(
                "%s: resumed on %s after %d events", self.request_id, member.name, self.events_sent
            )
            self.node = member.name
            return True
        return False


def _shareable(request: Request, headers: Mapping[str, str]) -> bool:
    """Deterministic (``seed`` set, or temperature 0) and not opted out."""
    if headers.get(SINGLE_FLIGHT, "").lower() in ("off", "0", "false", "no"):
        return False
    return request.seed is not None or request.raw.get("temperature") == 0


class _Flight:
    """One generation shared by identical concurrent requests.

    The generation runs in the node's nursery, not in any one client's request, so a client
    that leaves does not end it for the others. Every client is counted from the moment it
    asks (``shared`` and ``clients``) until it has its whole answer or leaves, so the work
    is cancelled as soon as nobody waits for it, even a non-streamed answer still being
    generated. Nothing the generation raises escapes into the node's nursery: an
    ``ApiError`` is every client's answer, anything else is logged and answered as a 502
    (before the head) or ends the shared stream with an error event (after it). Every
    follower gets the whole stream from its first byte.
    """

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.started = trio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.error: ApiError | None = None
        self.chunks: list[bytes] = []
        self.done = False
        self.clients = 0  # clients attached now
        self.shared = 0  # clients that asked for this flight in all
        self._changed = trio.Event()

    async def run(self, reply_coro: Any) -> None:
        try:
            reply: Reply = await reply_coro
        except ApiError as exc:
            self.error = exc
            return
        except Exception:
            log.exception("a shared generation failed before its head")
            self.error = UpstreamFailed("The shared generation failed before its first byte.")
            return
        self.status, self.headers = reply.status, reply.headers
        if isinstance(reply.body, bytes):
            self.chunks.append(reply.body)
            return
        self.started.set()
        try:
            async with aclosing(reply.body) as body:  # type: ignore[type-var]
                async for chunk in body:
                    self._append(chunk)
        except Exception:
            log.exception("a shared stream failed")
            self._append(_stream_error("The shared stream failed on this node."))

    def _append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._changed.set()
        self._changed = trio.Event()

    def finish(self) -> None:
        self.done = True
        self.started.set()
        self._changed.set()

    def leave(self) -> None:
        """One client is done with the flight; the last one to leave stops the work."""
        self.clients -= 1
        if not self.clients and not self.done:
            self.scope.cancel()

    async def reply(self) -> Reply:
        """This client's answer: the shared error, the shared body, or a follower of the
        shared stream (which leaves the flight when it is closed)."""
        self.clients += 1
        self.shared += 1
        try:
            await self.started.wait()
            if self.error is not None:
                raise self.error
            if not self.chunks and self.done:
                raise UpstreamFailed("the shared generation ended before it produced anything")
        except BaseException:
            self.leave()
            raise
        headers = self.headers | {SHARED: str(self.shared)}
        if not self.headers.get("content-type", "").startswith("text/event-stream"):
            self.leave()
            return Reply(self.status, headers, b"".join(self.chunks))
        return Reply(self.status, headers, _Follower(self))


class _Follower(AsyncIterator[bytes]):
    """One client's view of a shared stream: every chunk from the first. ``aclose`` (also
    when it was never iterated) leaves the flight."""

    def __init__(self, flight: _Flight) -> None:
        self._flight = flight
        self._next = 0
        self._left = False

    def __aiter__(self) -> _Follower:
        return self

    async def __anext__(self) -> bytes:
        flight = self._flight
        while self._next >= len(flight.chunks):
            if flight.done or self._left:
                await self.aclose()
                raise StopAsyncIteration
            await flight._changed.wait()
        self._next += 1
        return flight.chunks[self._next - 1]

    async def aclose(self) -> None:
        if not self._left:
            self._left = True
            self._flight.leave()


# --- event sources ---------------------------------------------------------------------------


@asynccontextmanager
async def _open_local(
    backend: Backend, generation: Generation
) -> AsyncIterator[AsyncIterator[bytes]]:
    """A local backend's items (one or more whole events each, as produced); its refusals
    as ``_AttemptFailed``."""
    try:
        context = backend.open(generation)
        events = await context.__aenter__()
    except BackendSaturated as exc:
        raise _AttemptFailed(
            f"model '{backend.model}' is saturated: {exc.message}",
            status=429,
            saturated=True,
            retry_after=exc.retry_after,
        ) from None
    except BackendUnavailable as exc:
        raise _AttemptFailed(exc.message, status=exc.status if exc.status >= 500 else 502) from None
    try:
        yield events
    except BaseException as exc:
        if not await context.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await context.__aexit__(None, None, None)


async def _local_events(events: AsyncIterator[bytes]) -> AsyncGenerator[list[_Event]]:
    """A backend's items (one or more whole events each) as batches of events. Events from
    Quorum's own encoders are one ``data:`` line each and split without a parser."""
    async for raw in events:
        if b"\r" not in raw:
            pieces = raw.split(b"\n\n")
            if not pieces[-1] and all(
                p.startswith(b"data: ") and b"\n" not in p for p in pieces[:-1]
            ):
                yield [(p + b"\n\n", p[6:]) for p in pieces[:-1]]
                continue
        yield [(e.raw, e.data) for e in SSEParser().feed(raw)]


async def _remote_events(response: HopResponse) -> AsyncGenerator[list[_Event]]:
    parser = SSEParser()
    async with aclosing(response.body()) as chunks:
        async for chunk in chunks:
            events = parser.feed(chunk)
            if events:
                yield [(e.raw, e.data) for e in events]


async def _local_stream(
    first: bytes, items: AsyncIterator[bytes], stack: AsyncExitStack
) -> AsyncGenerator[bytes]:
    """The stream of a request forwarded here: the backend's bytes as produced."""
    try:
        yield first
        async for item in items:
            yield item
    except BackendBroken as exc:
        yield _stream_error(str(exc))
    finally:
        with trio.CancelScope(shield=True):
            await stack.aclose()


# --- classifying and mapping failures ----------------------------------------------------------


def _decode(data: str | bytes) -> dict[str, Any]:
    """An event's JSON object; raises ``SSEProtocolError`` for anything else (a node or an
    upstream that sends garbage has broken its stream)."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise SSEProtocolError("an event is not JSON") from None
    if not isinstance(obj, dict):
        raise SSEProtocolError(f"an event is JSON {type(obj).__name__}, not an object")
    return obj


def _choices(obj: dict[str, Any]) -> list[dict[str, Any]]:
    choices = obj.get("choices")
    if choices is None:
        return []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise SSEProtocolError("an event's choices are not a list of objects")
    return choices


def _kind(data: str | bytes) -> str:
    """ "role" (a chunk with only the role), "error", or "token" (anything else, [DONE] too).
    Raises ``SSEProtocolError`` for an event that is not a chunk object."""
    if data == "[DONE]" or data == b"[DONE]":
        return "token"
    obj = _decode(data)
    if "error" in obj:
        return "error"
    if obj.get("usage"):
        return "token"
    for choice in _choices(obj):
        if choice.get("finish_reason") or choice.get("text"):
            return "token"
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise SSEProtocolError("an event's delta is not an object")
        if any(k != "role" and v for k, v in delta.items()):
            return "token"
    return "role"


def _status_failure(member: Member, response: HopResponse, data: bytes) -> _AttemptFailed:
    status = response.status
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = data[:200].decode("utf-8", "replace")
    text = f"node {member.name} answered {status}: {message}"
    if status == 429:
        retry = response.headers.get("retry-after", "1")
        return _AttemptFailed(
            text, status=429, saturated=True, retry_after=float(retry) if retry.isdigit() else 1.0
        )
    if _is_final(status):
        return _AttemptFailed(text, status=status, final=True, body=data)
    return _AttemptFailed(text, status=status)


def _is_final(status: int) -> bool:
    """A 4xx that another node would answer the same way: the client's own error. Not 401
    or 403 (between nodes, those are the cluster's fault: a key or clock mismatch), not 408,
    not 429."""
    return 400 <= status < 500 and status not in (401, 403, 408, 429)


def _as_failure(member: Member, exc: BaseException, ttft: float) -> _AttemptFailed:
    if isinstance(exc, _AttemptFailed):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return _AttemptFailed(f"node {member.name} gave no first token in {ttft} s", status=504)
    return _AttemptFailed(f"node {member.name} broke: {exc!r}")


def _api_error(exc: _AttemptFailed) -> ApiError:
    if exc.saturated:
        return Saturated(
            f"{exc.message}. Every slot and queue place is taken; retry after the time in "
            "Retry-After.",
            retry_after=exc.retry_after or 1.0,
        )
    if exc.status == 503:
        return Unavailable(exc.message)
    return UpstreamFailed(exc.message, status=exc.status if exc.status >= 500 else None)


def _final_error(exc: _AttemptFailed) -> ApiError:
    try:
        error = json.loads(exc.body)["error"]
        return ApiError(
            error["message"], param=error.get("param"), code=error.get("code"), status=exc.status
        )
    except (ValueError, KeyError, TypeError):
        return ApiError(exc.message, status=exc.status)


def _exhausted(model: str, failures: list[_AttemptFailed]) -> ApiError:
    if not failures:
        return Unavailable(f"No node can serve model '{model}' now. Retry shortly.")
    if all(f.saturated for f in failures):
        return Saturated(
            f"Every node serving '{model}' is saturated (slots and queues full). Retry after "
            "the time in Retry-After.",
            retry_after=min(f.retry_after or 1.0 for f in failures),
        )
    reasons = "; ".join(f.message for f in failures)
    status = 504 if all(f.status == 504 for f in failures) else None
    return UpstreamFailed(
        f"Every node tried for '{model}' failed before the first byte: {reasons}", status=status
    )
