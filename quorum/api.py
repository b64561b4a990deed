"""The OpenAI-compatible HTTP API of one node: a quart-trio app.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``POST /c1/chat`` and ``GET``/``DELETE /c1/conversations/{id}`` (``quorum.c1``),
``GET /health``, ``GET /cluster/members``. Every error, including 404/405/413 raised by the
framework, is answered in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.typing import ASGIFramework as ASGIApp
from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import HTTPResponseStartEvent, Scope
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from quorum.c1 import C1_CHAT, C1_CHAT_PATHS, Conversations
from quorum.edge import CLIENT, HOLD_HEAD
from quorum.errors import (
    ApiError,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    Unauthorized,
)
from quorum.gateway.gate import Gate
from quorum.gateway.keys import Caller
from quorum.gateway.quota import Grant
from quorum.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from quorum.routing.dispatch import Dispatcher, Reply
from quorum.routing.headers import INTERNAL, REQUEST_ID
from quorum.routing.membership import MemberState
from quorum.routing.relay import StreamBody
from quorum.status import StatusFeed, add_status_routes
from quorum.wire import Request, parse_chat_request, parse_completion_request, parse_json_body

__all__ = ["Admission", "FastPath", "answer", "create_app", "latency"]

log = logging.getLogger(__name__)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _error(exc: ApiError, request_id: str | None = None) -> Response:
    headers, body = _error_parts(exc, request_id)
    return Response(body, status=exc.status, headers=headers)


PARSERS: dict[str, Callable[[dict[str, Any]], Request]] = {
    "/v1/chat/completions": parse_chat_request,
    "/v1/completions": parse_completion_request,
}


@dataclass(slots=True)
class Admission:
    """A request's passage through the gateway: the ``gate``, the authenticated
    ``caller``, and the quota ``grant`` once admitted (released when the answer is sent)."""

    gate: Gate
    caller: Caller
    grant: Grant | None = None

    def admit(self, request: Request, headers: Mapping[str, str]) -> None:
        """403/404 for what the caller may not ask, else count it in the quotas (429)."""
        self.gate.check(self.caller, request.model, headers)
        self.grant = self.gate.admit(self.caller)

    def release(self) -> None:
        if self.grant is not None:
            self.grant.release()


async def answer(
    dispatcher: Dispatcher,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    admission: Admission | None = None,
) -> Reply:
    """Parse, validate and dispatch one request to ``path`` (a key of ``PARSERS``), and
    count it in the metrics. ``headers``: lower-cased. ``admission``: the caller under
    ``[auth]`` (None: an anonymous client, or a node's signed forward). Raises
    ``ApiError``."""
    model = "-"
    try:
        parsed = PARSERS[path](parse_json_body(body))
        # a label for models some member serves only: clients must not grow the label set
        model = parsed.model if dispatcher.known_model(parsed.model) else "other"
        if admission is None:
            reply = await dispatcher.handle(parsed, body, path, headers)
        else:
            admission.admit(parsed, headers)
            caller = admission.caller
            reply = await dispatcher.handle(
                parsed,
                body,
                path,
                headers,
                caller=caller.name,
                count_usage=True,
                allow_debug=caller.is_admin,
            )
    except ApiError as exc:
        dispatcher.metrics.requests.labels(path, model, str(exc.status)).inc()
        raise
    dispatcher.metrics.requests.labels(path, model, str(reply.status)).inc()
    return reply


def _error_parts(exc: ApiError, request_id: str | None) -> tuple[dict[str, str], bytes]:
    headers = {"content-type": "application/json", **exc.headers}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    if request_id:
        headers[REQUEST_ID] = request_id
    return headers, json.dumps(exc.body()).encode()


class FastPath:
    """The ASGI application a node serves. POSTs to the completion endpoints are answered
    here, on plain ASGI; everything else (GETs, admin, unknown paths) goes to ``app``, the
    quart-trio app.

    Why: the completion endpoints carry all the traffic, and quart's request and response
    objects cost about 0.4 ms a request on this hardware (a GET round trip: 0.86 ms through
    quart, 0.44 ms on raw ASGI) plus its per-message send loop on every streamed chunk. The
    behaviour is the same: the body is read under ``max_body_bytes`` (413), errors are
    OpenAI envelopes, and a client that disconnects cancels the work (``_left_cancels``:
    on HTTP/1 under ``quorum.server`` the connection says so; elsewhere a watcher of
    ``receive`` shares the request's nursery, as quart-trio does).
    """

    def __init__(
        self,
        app: ASGIApp,
        dispatcher: Dispatcher,
        *,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        gate: Gate | None = None,
        conversations: Conversations | None = None,
    ) -> None:
        self.app = app
        self.conversations = conversations or Conversations(dispatcher, None, shared=True)
        self.dispatcher = dispatcher
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["path"] not in PARSERS and scope["path"] not in C1_CHAT_PATHS
        ):
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] != "POST":
            refused = InvalidRequest(
                f"{scope['method']} is not allowed on {scope['path']}; send a POST.",
                code="method_not_allowed",
                status=405,
            )
            await _send_error(send, refused, None, {"allow": "POST"} | latency(arrived))
            return
        admission = None
        try:
            async with _left_cancels(scope, receive) as watch:
                try:
                    admission = self._admission(headers)
                    body = await self._body(receive, headers)
                    if body is None:
                        return  # the client left before sending its whole body
                    watch()
                    if scope["path"] in C1_CHAT_PATHS:
                        reply = await self._c1_chat(body, headers, admission)
                    else:
                        reply = await answer(
                            self.dispatcher, scope["path"], body, headers, admission
                        )
                except ApiError as exc:
                    self._count(admission, exc.status)
                    extra = admission.grant.headers if admission and admission.grant else {}
                    await _send_error(send, exc, headers.get(REQUEST_ID), extra | latency(arrived))
                    return
                except Exception as exc:
                    log.exception("unhandled error on POST %s", scope["path"])
                    error = ApiError(
                        f"Internal error in Quorum ({type(exc).__name__}); the node's log has it.",
                        code="internal_error",
                    )
                    await _send_error(send, error, headers.get(REQUEST_ID), latency(arrived))
                    return
                self._count(admission, reply.status)
                await self._send_reply(send, reply, admission, arrived)
        finally:
            if admission is not None:
                admission.release()

    def _admission(self, headers: Mapping[str, str]) -> Admission | None:
        """Under ``[auth]``, the caller (401 without a valid key); None for a node's signed
        forward (the dispatcher checks its signature) or without ``[auth]``."""
        if self.gate is None or any(name in headers for name in INTERNAL):
            return None
        return Admission(self.gate, self.gate.caller(headers))

    async def _c1_chat(
        self, body: bytes, headers: Mapping[str, str], admission: Admission | None
    ) -> Reply:
        """``POST /c1/chat`` (``quorum.c1``), counted in the metrics as the others are."""
        requests = self.dispatcher.metrics.requests
        try:
            if admission is None:
                reply = await self.conversations.chat(body, headers)
            else:
                reply = await self.conversations.chat(
                    body,
                    headers,
                    caller=admission.caller.name,
                    admit=admission.admit,
                    allow_debug=admission.caller.is_admin,
                )
        except ApiError as exc:
            requests.labels(C1_CHAT, "-", str(exc.status)).inc()
            raise
        requests.labels(C1_CHAT, "-", str(reply.status)).inc()
        return reply

    def _count(self, admission: Admission | None, status: int) -> None:
        if admission is not None:
            self.dispatcher.metrics.key_requests.labels(admission.caller.name, str(status)).inc()

    async def _send_reply(
        self, send: Send, reply: Reply, admission: Admission | None, arrived: float
    ) -> None:
        headers = dict(reply.headers)
        if admission is not None and admission.grant is not None:
            headers.update(admission.grant.headers)
        headers.update(latency(arrived))
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": reply.status,
            "headers": _encoded(headers),
        }
        if isinstance(reply.body, bytes):
            await send(start)
            await send({"type": "http.response.body", "body": reply.body, "more_body": False})
        else:
            # closed even when the head cannot be sent (the client left): see Reply
            async with aclosing(reply.body) as chunks:  # type: ignore[type-var]
                if isinstance(chunks, StreamBody) and chunks.ready:
                    start[HOLD_HEAD] = True  # type: ignore[typeddict-unknown-key]
                await send(start)
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _body(self, receive: Receive, headers: Mapping[str, str]) -> bytes | None:
        """The whole request body, None if the client left first. Raises
        ``PayloadTooLarge`` (413) over ``max_body_bytes`` and ``RequestTimeout`` (408) when
        it is not all there within ``body_timeout_s``."""
        try:
            with trio.fail_after(self.body_timeout_s):
                return await self._read_body(receive, headers)
        except trio.TooSlowError:
            raise RequestTimeout(
                f"The request body did not arrive within {self.body_timeout_s:g} s "
                "(body_timeout_s in the node's config); send it whole, promptly."
            ) from None

    async def _read_body(self, receive: Receive, headers: Mapping[str, str]) -> bytes | None:
        limit = self.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(
                f"The request body is {length} bytes; this node accepts at most {limit} "
                "bytes (max_body_bytes in its config)."
            )
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            assert isinstance(chunk, bytes)
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"The request body is over this node's limit of {limit} bytes "
                    "(max_body_bytes in its config)."
                )
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _encoded(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Header pairs as ASGI wants them: latin-1, as they were read (a character beyond it,
    which no client sent, becomes ``?``)."""
    return [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers.items()]


def latency(arrived: float) -> dict[str, str]:
    """``x-quorum-latency`` (milliseconds from the request's arrival, ``arrived`` on
    ``time.perf_counter``, to its answer's head, as BVE's added-latency header) and the same
    figure as a ``server-timing`` entry (W3C Server Timing), which browsers' tools show."""
    ms = (time.perf_counter() - arrived) * 1000
    return {"x-quorum-latency": f"{ms:.2f}", "server-timing": f"quorum;dur={ms:.2f}"}


@asynccontextmanager
async def _left_cancels(scope: Scope, receive: Receive) -> AsyncIterator[Callable[[], None]]:
    """A block that ends, cancelled, when the client leaves: from the moment the yielded
    ``watch()`` is called (once the request body is read, since until then ``receive``
    gives the body), until the block exits. Under ``quorum.server`` an HTTP/1 connection's
    ``Departure`` (``quorum.edge.CLIENT``) says when the client left; anywhere else, and on
    HTTP/2 (where a stream's reset leaves its connection open), a task reads ``receive``
    for ``http.disconnect``, as quart-trio does."""
    departure = CLIENT.get()
    if departure is not None and str(scope.get("http_version", "1.1")).startswith("1"):
        removers: list[Callable[[], None]] = []
        with trio.CancelScope() as cancel:
            try:
                yield lambda: removers.append(departure.call_when_gone(cancel.cancel))
            finally:
                for remove in removers:
                    remove()
        return
    async with trio.open_nursery() as nursery:
        try:
            yield lambda: nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        finally:
            nursery.cancel_scope.cancel()


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _send_error(
    send: Send, exc: ApiError, request_id: str | None, extra: Mapping[str, str] | None = None
) -> None:
    headers, body = _error_parts(exc, request_id)
    headers.update(extra or {})
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": _encoded(headers),
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(
    dispatcher: Dispatcher,
    *,
    health: Callable[[], dict[str, Any]],
    drain: Callable[[], dict[str, Any]] | None = None,
    drain_token: str | None = None,
    max_body_bytes: int = 4 << 20,
    body_timeout_s: float = 30.0,
    created: int | None = None,
    gate: Gate | None = None,
    conversations: Conversations | None = None,
) -> FastPath:
    """Build the ASGI app of one node: ``FastPath`` for the completion endpoints in front of
    a quart-trio app for everything else.

    ``dispatcher``: routes requests. ``health``: returns this node's ``/health`` document.
    ``drain``: starts a drain (``POST /admin/drain``, from this machine with ``drain_token``
    as its bearer token, or from anywhere with an admin key). ``max_body_bytes``: larger
    bodies get 413; ``body_timeout_s``: a body not received by then gets 408. ``created``:
    unix seconds reported for models. ``gate``: the ``[auth]`` checks, None for an open
    node: then ``/v1/*`` needs a key of any role; ``/metrics`` (unless ``open_metrics``),
    ``/cluster/*`` and ``/admin/*`` an admin key; ``/health`` and the static status page
    stay open. ``conversations``: the ``/c1`` routes (``quorum.c1``; None: they answer
    404), which need a key of any role under ``[auth]``.
    """
    app = QuartTrio("quorum")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    started = created or int(time.time())

    def lowered() -> dict[str, str]:
        return {k.lower(): v for k, v in request.headers.items()}

    @app.before_request
    async def access() -> None:
        """Who may read what, under ``[auth]`` (see above)."""
        path = request.path
        if gate is None or path in ("/health", "/", "/status", "/admin/drain"):
            return  # the drain checks its own two credentials; the page is static
        if path.startswith("/v1/"):
            gate.caller(lowered())
        elif path.startswith("/c1/"):
            headers = lowered()
            if not any(name in headers for name in INTERNAL):  # a node's: checked by the route
                gate.caller(headers)
        elif not (path == "/metrics" and gate.open_metrics):
            gate.admin(lowered(), f"{request.method} {path}")

    def admin_only(headers: Mapping[str, str]) -> None:
        if gate is not None:
            gate.admin(headers, "The status feed")

    @app.get("/v1/models")
    async def models() -> Response:
        caller = gate.caller(lowered()) if gate is not None else None
        names: dict[str, list[str]] = {}
        for member in dispatcher.members():
            if member.state in (MemberState.DEAD, MemberState.LEFT):
                continue
            for model in member.models:
                if caller is None or caller.may_use(model):
                    names.setdefault(model, []).append(member.name)
        data = [
            {
                "id": m,
                "object": "model",
                "created": started,
                "owned_by": "quorum",
                "quorum_nodes": sorted(nodes),
            }
            for m, nodes in sorted(names.items())
        ]
        return _json(200, {"object": "list", "data": data})

    c1 = conversations or Conversations(dispatcher, None, shared=True)

    @app.route("/c1/conversations/<conversation_id>", methods=["GET", "DELETE"])
    async def conversation(conversation_id: str) -> Response:
        """One stored conversation (``quorum.c1``): read it, or delete it."""
        headers = lowered()
        caller = None
        if gate is not None and not any(name in headers for name in INTERNAL):
            caller = gate.caller(headers).name
        status, body = await c1.read(request.method, conversation_id, headers, caller)
        return _json(status, body)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition (``quorum.metrics``)."""
        return Response(dispatcher.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/health")
    async def health_() -> Response:
        return _json(200, health())

    @app.post("/admin/drain")
    async def admin_drain() -> Response:
        """Stop taking requests, finish those under way, leave the cluster and exit."""
        if drain is None or drain_token is None:
            raise ApiError("This node cannot be drained over HTTP.", status=404)
        if gate is not None:
            try:  # an admin key, from anywhere (a user key: 403)
                gate.admin(lowered(), "POST /admin/drain")
                return _json(202, drain())
            except Unauthorized:
                pass  # not an API key: the drain token, from this machine
        host = (request.scope.get("client") or ("", 0))[0]
        if not (host.startswith("127.") or host == "::1"):
            raise PermissionDenied(
                "POST /admin/drain is accepted from this machine only (127.0.0.0/8, ::1)."
            )
        # A browser page (CSRF) sends Origin; a reverse proxy on this machine adds its own
        # headers: neither is the operator at this machine.
        relayed = [
            h for h in ("origin", "forwarded", "x-forwarded-for", "via") if h in request.headers
        ]
        if relayed:
            raise PermissionDenied(
                f"POST /admin/drain came with {relayed[0]}: it is accepted only straight from "
                "a program on this machine (`quorum drain`), not through a browser or a proxy."
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), drain_token.encode()
        ):
            raise Unauthorized(
                "POST /admin/drain needs the node's drain token as a bearer token: "
                "`quorum drain` reads it from the file the node wrote at start.",
                code="invalid_api_key",
            )
        return _json(202, drain())

    @app.get("/cluster/members")
    async def members() -> Response:
        return _json(
            200,
            {"self": dispatcher.name, "members": [m.as_json() for m in dispatcher.members()]},
        )

    # GET /, /status (the static page), /cluster/events (the feed: admins only under [auth])
    add_status_routes(app, StatusFeed.for_dispatcher(dispatcher), authorize=admin_only)

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return _error(exc, request.headers.get(REQUEST_ID))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            return _error(PayloadTooLarge(f"The request body is over {max_body_bytes} bytes."))
        if status == 404:
            msg = (
                f"There is no endpoint {request.method} {request.path}. Quorum serves "
                "/v1/chat/completions, /v1/completions, /v1/models, /c1/chat(/completions), "
                "/c1/conversations/{id}, /health and /cluster/members."
            )
        elif status == 405:
            msg = f"{request.method} is not allowed on {request.path}."
        else:
            msg = exc.description or exc.name
        return _error(InvalidRequest(msg, code=exc.name.lower().replace(" ", "_"), status=status))

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(
            ApiError(
                f"Internal error in Quorum ({type(exc).__name__}); the node's log has it.",
                code="internal_error",
            )
        )

    return FastPath(
        app,
        dispatcher,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
        gate=gate,
        conversations=c1,
    )
