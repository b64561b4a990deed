"""Serving one request: check who sent it, choose nodes, and hand it to the part that does
the job.

``Dispatcher.handle`` takes a validated request and returns a ``Reply`` (status, headers and
either bytes or an async iterator of bytes). The jobs live in their own modules:

=========================  ==================================================================
``routing.headers``        header names; the cluster signature of internal headers
``routing.select``         which nodes, in which order (the one place that chooses)
``routing.attempts``       the attempt loop (breaker claim, backoff, verdict) and failures
``routing.relay``          a stream at the entry node: first token, relay, resume
``routing.single_flight``  identical deterministic requests sharing one generation
``routing.serve``          a generation on this node's own backends
``routing.hop``            HTTP/1.1 to other nodes
=========================  ==================================================================

Failure semantics (DESIGN.md, "Failure semantics of a request"):

1. Candidates come from the membership view (alive, ready, serving the model, breaker closed).
2. Until the first token reaches the client, any failure (connect error, 5xx, 429, an error
   event, no first token within ``ttft_timeout_s``; for a non-streamed request no answer
   within ``unary_timeout_s``) moves the request to the next candidate, at most
   ``max_attempts`` in all, with jittered exponential backoff. The role chunk is held back
   until the first token so that a failover before it is invisible.
3. After that, a broken stream is resumed on another candidate: it is sent the same request
   id and ``quorum_resume`` (what the client has), and continues from there.
4. Only when no candidate can continue does the client get one ``data: {"error": ...}`` event
   and ``data: [DONE]``. Never a fake ``finish_reason``.

Load, counted in one way each: ``serving`` — generations open on this node's backends,
whoever the entry node (gossiped; selection compares it with capacity); ``relaying`` — client
requests this node is the entry node of, wherever they are served (``outstanding`` splits
them by serving node, for this node's own view of its peers).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field

import trio

from quorum.backends.base import Backend, Fault, Generation, Resume
from quorum.backends.headers import DEFAULT as DEFAULT_HEADERS
from quorum.backends.headers import HeaderPolicy
from quorum.backends.mock import count_prompt_tokens
from quorum.errors import (
    ApiError,
    InvalidRequest,
    PermissionDenied,
    Unauthorized,
    Unavailable,
)
from quorum.gateway.enforce import Enforcer
from quorum.gateway.policy import Policies
from quorum.metrics import Metrics
from quorum.routing.attempts import (
    AttemptFailed,
    Attempts,
    AttemptsExhausted,
    exhausted,
    is_final,
    status_failure,
)
from quorum.routing.breaker import BreakerBoard
from quorum.routing.channel import ChannelPool, ChannelRefused, ChannelResponse
from quorum.routing.config import RoutingConfig
from quorum.routing.headers import (
    ATTEMPTS,
    CALLER,
    CREATED,
    FAULT,
    FORWARDED,
    INTERNAL,
    NODE,
    PIN,
    REQUEST_ID,
    RESUME_FIELD,
    SIGNATURE,
    ClusterSigner,
    client_fault,
    created_time,
    request_id,
)
from quorum.routing.hop import HopError, HopPool, HopResponse
from quorum.routing.membership import Member, Membership, MemberState, NodeState
from quorum.routing.relay import (
    Event,
    Reply,
    StreamBody,
    StreamRelay,
    local_events,
    remote_events,
    usage_tokens,
)
from quorum.routing.select import RoutingPolicy, Selector, prefix_key
from quorum.routing.serve import JSON_HEADERS, STREAM_HEADERS, LocalServer
from quorum.routing.single_flight import SingleFlight, shareable
from quorum.wire import Request

__all__ = ["Dispatcher", "Job", "Reply", "RoutingConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    """One client request as the entry node handles it: the validated ``request``, the
    ``body`` as received, the endpoint ``path``, the stream's ``request_id`` and
    ``created``, the injected ``fault`` (first attempt only) and the client's ``pin``.
    ``caller``: the API key's name the request was admitted under (None without
    ``[auth]``); its tokens go to ``Dispatcher.on_tokens`` when the request ends.
    ``count_usage``: ask the serving node for the usage chunk even when the client did not
    (it is counted, and relayed only if the client asked for it). ``passed``: the client's
    headers that may reach an upstream server (``[headers] to_upstream``), carried on the hop.
    """

    request: Request
    body: bytes
    path: str
    request_id: str
    created: int
    fault: Fault | None
    pin: str | None
    caller: str | None = None
    count_usage: bool = False
    passed: Mapping[str, str] = field(default_factory=dict)

    @property
    def hide_usage(self) -> bool:
        """The usage chunk is for Quorum's count only: the client did not ask for it."""
        return self.count_usage and not self.request.include_usage


class Dispatcher:
    """Routes validated requests for one node.

    ``name``: this node's name. ``backends``: model name → local ``Backend``. ``membership``:
    the cluster view. ``signer``: signs and checks the hop's internal headers
    (``quorum.routing.headers``). ``allow_faults``: obey ``x-quorum-fault`` from clients
    (``[debug] faults``; a fault a signed forward carries is always obeyed). ``tap``: test
    hook called with every body chunk a hop receives. ``rng``: randomness for backoff jitter
    and the power of two choices. ``hop``: the connections to other nodes (a fake in tests).
    ``headers``: which client headers may reach an upstream server and which of its headers
    the client (``quorum.backends.headers``). ``on_tokens``: called with ``(caller,
    tokens)`` when a request admitted under an API key ends (prompt + completion from the
    usage chunk; for a stream the client left before usage, the prompt's estimate plus one
    token per chunk relayed). ``policies``: the governance rules (``[[policies]]``),
    applied to client requests only: input screening in ``handle``, output filtering of
    the answers (``quorum.gateway.enforce``); None or empty: neither.
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
        hop: HopPool | None = None,
        headers: HeaderPolicy = DEFAULT_HEADERS,
        policies: Policies | None = None,
    ) -> None:
        self.name = name
        self.backends = dict(backends)
        self.membership = membership
        self.signer = signer
        self.config = config or RoutingConfig()
        self.allow_faults = allow_faults
        self.headers = headers
        self.local = LocalServer(name, self.backends)
        self._relaying = 0
        self._idle = trio.Event()
        self.outstanding: dict[str, int] = {}  # attempts open to each node, by name
        self.breakers = BreakerBoard()
        self._rng = rng or random.Random()
        self.policy = policy or RoutingPolicy()
        self.selector = Selector(name, self.policy, rng=self._rng)
        self.single_flight = SingleFlight()
        self.metrics = Metrics()
        self.enforcer: Enforcer | None = None
        if policies is not None and len(policies):
            self.enforcer = Enforcer(policies, self.metrics.policy_action)
        self.on_tokens: Callable[[str, int], None] | None = None
        self.channel: ChannelPool | None = None
        if self.config.channel and hop is None:
            self.channel = ChannelPool(
                connect_timeout_s=self.config.connect_timeout_s,
                max_frame=self.config.max_answer_bytes + (1 << 20),
                tap=tap,
            )
        self.hop = hop or HopPool(
            connect_timeout_s=self.config.connect_timeout_s,
            max_idle=self.config.hop_max_idle,
            idle_timeout_s=self.config.hop_idle_timeout_s,
            tap=tap,
        )

    # --- state -------------------------------------------------------------------------------

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where shared generations run: the node's nursery (set by the node)."""
        return self.single_flight.nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self.single_flight.nursery = nursery

    @property
    def draining(self) -> bool:
        return self.local.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.local.draining = value

    @property
    def serving(self) -> int:
        """Generations open on this node's backends now, whoever the entry node."""
        return self.local.serving

    @property
    def relaying(self) -> int:
        """Client requests this node is the entry node of, wherever they are served."""
        return self._relaying

    @relaying.setter
    def relaying(self, value: int) -> None:
        self._relaying = value
        if not self.busy:
            self._idle.set()
            self._idle = trio.Event()

    @property
    def busy(self) -> int:
        """``serving + relaying``: what a drain waits for."""
        return self.local.serving + self._relaying

    async def wait_idle(self, poll_s: float = 0.05) -> None:
        """Return once nothing is served or relayed here."""
        while self.busy:
            with trio.move_on_after(poll_s):
                await self._idle.wait()

    async def aclose(self) -> None:
        await self.hop.aclose()
        if self.channel is not None:
            await self.channel.aclose()

    def members(self) -> Sequence[Member]:
        return self.membership.members()

    def known_model(self, model: str) -> bool:
        """Whether some member (this node included) serves ``model``: only those become
        metric labels, so that clients cannot grow the label set."""
        return model in self.backends or any(model in m.models for m in self.members())

    # --- who is asking -----------------------------------------------------------------------

    def is_forward(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> bool:
        """True for a node's signed forward, False for a client's request (no internal
        header at all). Raises ``Unauthorized`` (401) for internal headers without a valid
        signature over ``method``, ``path`` and ``body``, or without ``x-quorum-forwarded``."""
        if not any(name in headers for name in INTERNAL):
            return False
        self.signer.verify(method, path, body, headers)
        if FORWARDED not in headers:
            raise Unauthorized(
                f"{SIGNATURE} without {FORWARDED}: internal headers come from nodes only.",
                code="invalid_internal_headers",
            )
        return True

    async def handle(
        self,
        request: Request,
        body: bytes,
        path: str,
        headers: Mapping[str, str],
        *,
        caller: str | None = None,
        count_usage: bool = False,
        allow_debug: bool = False,
    ) -> Reply:
        """Serve ``request`` (``body``: the raw bytes received, ``path``: the endpoint path,
        ``headers``: lower-cased request headers). ``caller``/``count_usage``: see ``Job``.
        ``allow_debug``: the caller is an admin, whose ``x-quorum-fault`` is obeyed even
        where ``[debug] faults`` is off. Raises ``ApiError`` before any byte: 401 for
        internal headers without a valid signature, 403 for a fault this node does not
        allow, 400 ``content_policy_violation`` for a request an input policy blocks,
        400/404/429/502/503/504 as the request path decides. A client's request (never a
        signed forward) goes through the input policies here, before anything else sees it:
        a redacted request is routed, shared and forwarded as its re-encoded body."""
        if self.is_forward("POST", path, body, headers):
            return await self._serve_forwarded(request, headers)
        if FAULT in headers and not (self.allow_faults or allow_debug):
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
        if self.enforcer is not None:
            request, body = self.enforcer.screen(request, body)
        job = Job(
            request,
            body,
            path,
            request_id(headers),
            int(time.time()),
            client_fault(headers),
            headers.get(PIN) or None,
            caller,
            count_usage,
            self.headers.upstream(headers),
        )
        if self.nursery is not None and shareable(request, headers):
            fault = job.fault.header() if job.fault is not None else ""
            # one generation per caller: each key's tokens are its own
            key = SingleFlight.key(path, f"{job.pin}\n{caller}", fault, body)
            return await self.single_flight.join(key, lambda: self._route(job))
        return await self._route(job)

    async def _serve_forwarded(self, request: Request, headers: Mapping[str, str]) -> Reply:
        """A request another node forwarded here (signature checked): serve it locally."""
        self.selector.check_forwarded(self.members(), request.model)
        if CALLER in headers:
            log.debug(
                "%s: serving for key %r from %s",
                request_id(headers),
                headers[CALLER],
                headers[FORWARDED],
            )
        resume = None
        if RESUME_FIELD in request.raw:
            try:
                resume = Resume.from_json(request.raw[RESUME_FIELD])
            except ValueError as exc:
                raise InvalidRequest(str(exc), param=RESUME_FIELD) from None
        generation = Generation(
            request=request,
            request_id=request_id(headers),
            created=created_time(headers),
            include_usage=request.include_usage or not request.stream,
            fault=client_fault(headers),
            resume=resume,
            headers=self.headers.upstream(headers),
        )
        return await self.local.serve(generation)

    # --- choosing ----------------------------------------------------------------------------

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

    async def _candidates(self, request: Request, pin: str | None) -> list[Member]:
        """``order``, but a request whose nodes are all warming is held (bounded)."""
        deadline = trio.current_time() + self.config.cold_start_wait_s
        while True:
            try:
                return self.order(request, pin)
            except Unavailable:
                warming = any(
                    request.model in m.models
                    and m.state == MemberState.ALIVE
                    and m.node_state == NodeState.WARMING
                    for m in self.members()
                )
                if not warming or trio.current_time() >= deadline:
                    raise
            await trio.sleep(0.1)

    def attempts(self, job: Job, first: list[Member], tried: list[str]) -> Attempts:
        """The attempt loop for ``job``: ``first[0]`` for the first try (when given and
        nothing was tried yet), then a fresh ``order`` without the nodes in ``tried``."""

        def choose(tried: Sequence[str]) -> Member | None:
            if first and not tried:
                return first[0]
            try:
                return self.order(job.request, job.pin, exclude=tried)[0]
            except ApiError:
                return None

        return Attempts(
            choose,
            self.breakers,
            self.config,
            self._rng,
            self.metrics,
            request_id=job.request_id,
            pinned=job.pin is not None,
            tried=tried,
        )

    # --- serving a client's request --------------------------------------------------------------

    async def _route(self, job: Job) -> Reply:
        """Choose nodes for a client's request and serve it from the first that can."""
        order = await self._candidates(job.request, job.pin)
        self.relaying += 1
        if not job.request.stream:
            try:
                reply = await self._unary(job, order)
            finally:
                self.relaying -= 1
            if self.enforcer is not None and reply.status == 200:
                assert isinstance(reply.body, bytes)
                reply.body = self.enforcer.filter_answer(job.request, reply.body)
            return reply
        try:
            guard = self.enforcer.stream_guard(job.request) if self.enforcer else None
            relay = StreamRelay(self, job, order, guard)
            first = await relay.start()
        except BaseException:
            self.relaying -= 1  # after start() succeeds, the stream's body owns the count
            raise
        headers = {REQUEST_ID: job.request_id, NODE: relay.node, ATTEMPTS: str(relay.attempts)}
        body = await StreamBody.start(relay.body(first))
        return Reply(200, relay.answer_headers | headers | STREAM_HEADERS, body)

    async def _unary(self, job: Job, order: list[Member]) -> Reply:
        attempts = self.attempts(job, order, [])
        timeout = self.config.unary_timeout_s

        async def once(member: Member, number: int) -> Reply:
            try:
                with trio.fail_after(timeout):
                    return await self._unary_once(job, member, job.fault if number == 1 else None)
            except trio.TooSlowError:
                raise AttemptFailed(
                    f"node {member.name} gave no answer in {timeout} s", status=504
                ) from None

        try:
            reply = await attempts.run(once)
        except AttemptFailed as exc:  # final: the client's own error, as the node said it
            return Reply(exc.status, JSON_HEADERS | {REQUEST_ID: job.request_id}, exc.body)
        except AttemptsExhausted as exc:
            raise exhausted(job.request.model, exc.failures) from None
        except trio.Cancelled:  # the client left: the prompt was read all the same
            self.count_tokens(job, None)
            raise
        self.count_tokens(job, _answer_usage(reply.body))
        reply.headers[ATTEMPTS] = str(attempts.count)
        return reply

    def count_tokens(self, job: Job, usage: int | None, relayed: int = 0) -> None:
        """Give a finished request's tokens to ``on_tokens``: ``usage`` (prompt +
        completion) when the serving node reported it, else the prompt's estimate plus
        ``relayed`` (chunks that reached the client, about a token each)."""
        if job.caller is None or self.on_tokens is None:
            return
        if usage is None:
            usage = count_prompt_tokens(job.request) + relayed
        self.on_tokens(job.caller, usage)

    async def _unary_once(self, job: Job, member: Member, fault: Fault | None) -> Reply:
        self.outstanding[member.name] = self.outstanding.get(member.name, 0) + 1
        try:
            if member.name == self.name:
                generation = Generation(
                    job.request, job.request_id, job.created, True, fault=fault, headers=job.passed
                )
                try:
                    return await self.local.serve(generation)
                except ApiError as exc:
                    raise AttemptFailed(
                        exc.message,
                        status=exc.status,
                        saturated=exc.status == 429,
                        retry_after=exc.retry_after,
                        final=is_final(exc.status),
                        body=json.dumps(exc.body()).encode(),
                    ) from None
            async with self._exchange(member, job, job.body, fault) as response:
                try:
                    data = await response.read(self.config.max_answer_bytes)
                except HopError as exc:
                    raise AttemptFailed(
                        f"node {member.name} broke while answering: {exc}"
                    ) from None
            if response.status != 200:
                raise status_failure(member, response.status, response.headers, data)
            headers = {REQUEST_ID: job.request_id, NODE: response.headers.get(NODE, member.name)}
            return Reply(200, self.passed_back(response.headers) | headers | JSON_HEADERS, data)
        finally:
            self.outstanding[member.name] -= 1

    # --- talking to other nodes ------------------------------------------------------------------

    @asynccontextmanager
    async def _exchange(
        self, member: Member, job: Job, body: bytes, fault: Fault | None
    ) -> AsyncIterator[HopResponse | ChannelResponse]:
        """POST ``body`` (the job's, or its resume) to ``member``, signed; yields the
        streaming response, closes it on exit. Raises ``AttemptFailed`` when the node cannot
        be reached."""
        headers = {
            **job.passed,
            "content-type": "application/json",
            FORWARDED: self.name,
            REQUEST_ID: job.request_id,
            CREATED: str(job.created),
        }
        if job.caller is not None:
            headers[CALLER] = job.caller
        if fault is not None:
            headers[FAULT] = fault.header()
        headers[SIGNATURE] = self.signer.sign("POST", job.path, body, headers)
        async with AsyncExitStack() as stack:
            response: HopResponse | ChannelResponse | None = None
            try:
                if self.channel is not None and self.channel.usable(member.url):
                    try:
                        response = await stack.enter_async_context(
                            self.channel.post(member.url, job.path, body, headers)
                        )
                    except ChannelRefused:
                        response = None  # a node without the channel: the HTTP hop
                if response is None:
                    response = await stack.enter_async_context(
                        self.hop.post(member.url, job.path, body, headers)
                    )
            except HopError as exc:
                raise AttemptFailed(f"node {member.name} could not be reached: {exc}") from None
            # a break after the head propagates as HopError: the caller decides what it means
            yield response

    def passed_back(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Of a peer's answer headers, those that may reach the client (``[headers]
        to_client``: the upstream's, which the serving node passed on), less the body's
        ``content-type``, which the entry node sets itself."""
        passed = self.headers.client(headers)
        passed.pop("content-type", None)
        return passed

    @asynccontextmanager
    async def open_source(
        self,
        member: Member,
        job: Job,
        fault: Fault | None,
        resume: Resume | None,
        answer_headers: dict[str, str] | None = None,
    ) -> AsyncIterator[AsyncIterator[list[Event]]]:
        """A stream of event batches from ``member`` (this node or another). Raises
        ``AttemptFailed`` if it cannot start. ``answer_headers``: filled with the headers
        of the answer that may reach the client, once its head has arrived."""
        self.outstanding[member.name] = self.outstanding.get(member.name, 0) + 1
        try:
            if member.name == self.name:
                request = job.request
                generation = Generation(
                    request,
                    job.request_id,
                    job.created,
                    request.include_usage or job.count_usage,
                    fault=fault,
                    resume=resume,
                    headers=job.passed,
                )
                async with self.local.generation(generation) as items:
                    if answer_headers is not None:
                        answer_headers.update(generation.answer_headers)
                    async with aclosing(local_events(items)) as events:
                        yield events
                return
            body = job.body
            if resume is not None or job.hide_usage:
                raw = dict(job.request.raw)
                if job.hide_usage:
                    options = raw.get("stream_options")
                    raw["stream_options"] = {**(options or {}), "include_usage": True}
                if resume is not None:
                    raw[RESUME_FIELD] = resume.as_json()
                body = json.dumps(raw).encode()
            async with self._exchange(member, job, body, fault) as response:
                if response.status != 200:
                    try:
                        head = await response.read(65536)
                    except HopError:
                        head = b""
                    raise status_failure(member, response.status, response.headers, head)
                if answer_headers is not None:
                    answer_headers.update(self.passed_back(response.headers))
                events = remote_events(response)
                try:
                    yield events
                finally:
                    with trio.CancelScope(shield=True):
                        await events.aclose()
        finally:
            self.outstanding[member.name] -= 1


def _answer_usage(body: object) -> int | None:
    """The tokens of a whole (non-streamed) answer, from its ``usage``."""
    if not isinstance(body, bytes):
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return usage_tokens(answer.get("usage")) if isinstance(answer, dict) else None
