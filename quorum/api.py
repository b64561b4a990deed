"""The OpenAI-compatible HTTP API of one node: a quart-trio app.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /cluster/members``. Every error, including 404/405/413 raised by the
framework, is answered in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import aclosing
from typing import Any

import trio
from hypercorn.typing import ASGIFramework as ASGIApp
from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import Scope
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from quorum.errors import (
    ApiError,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    Unauthorized,
)
from quorum.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from quorum.routing.dispatch import Dispatcher, Reply
from quorum.routing.headers import REQUEST_ID
from quorum.routing.membership import MemberState
from quorum.status import StatusFeed, add_status_routes
from quorum.wire import Request, parse_chat_request, parse_completion_request, parse_json_body

__all__ = ["FastPath", "answer", "create_app"]

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


async def answer(
    dispatcher: Dispatcher, path: str, body: bytes, headers: Mapping[str, str]
) -> Reply:
    """Parse, validate and dispatch one request to ``path`` (a key of ``PARSERS``), and
    count it in the metrics. ``headers``: lower-cased. Raises ``ApiError``."""
    model = "-"
    try:
        parsed = PARSERS[path](parse_json_body(body))
        # a label for models some member serves only: clients must not grow the label set
        model = parsed.model if dispatcher.known_model(parsed.model) else "other"
        reply = await dispatcher.handle(parsed, body, path, headers)
    except ApiError as exc:
        dispatcher.metrics.requests.labels(path, model, str(exc.status)).inc()
        raise
    dispatcher.metrics.requests.labels(path, model, str(reply.status)).inc()
    return reply


def _error_parts(exc: ApiError, request_id: str | None) -> tuple[dict[str, str], bytes]:
    headers = {"content-type": "application/json"}
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
    OpenAI envelopes, and a client that disconnects cancels the work (the request and a
    watcher of ``receive`` share one nursery, as quart-trio does).
    """

    def __init__(
        self,
        app: ASGIApp,
        dispatcher: Dispatcher,
        *,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.dispatcher = dispatcher
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in PARSERS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] != "POST":
            refused = InvalidRequest(
                f"{scope['method']} is not allowed on {scope['path']}; send a POST.",
                code="method_not_allowed",
                status=405,
            )
            await _send_error(send, refused, None, {"allow": "POST"})
            return
        async with trio.open_nursery() as nursery:
            try:
                body = await self._body(receive, headers)
                if body is None:
                    return  # the client left before sending its whole body
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                reply = await answer(self.dispatcher, scope["path"], body, headers)
            except ApiError as exc:
                await _send_error(send, exc, headers.get(REQUEST_ID))
                nursery.cancel_scope.cancel()
                return
            except Exception as exc:
                log.exception("unhandled error on POST %s", scope["path"])
                error = ApiError(
                    f"Internal error in Quorum ({type(exc).__name__}); the node's log has it.",
                    code="internal_error",
                )
                await _send_error(send, error, headers.get(REQUEST_ID))
                nursery.cancel_scope.cancel()
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": [(k.encode(), v.encode()) for k, v in reply.headers.items()],
                }
            )
            if isinstance(reply.body, bytes):
                await send({"type": "http.response.body", "body": reply.body, "more_body": False})
            else:
                async with aclosing(reply.body) as chunks:  # type: ignore[type-var]
                    async for chunk in chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()

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
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
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
) -> FastPath:
    """Build the ASGI app of one node: ``FastPath`` for the completion endpoints in front of
    a quart-trio app for everything else.

    ``dispatcher``: routes requests. ``health``: returns this node's ``/health`` document.
    ``drain``: starts a drain (``POST /admin/drain``, from this machine with ``drain_token``
    as its bearer token). ``max_body_bytes``: larger bodies get 413; ``body_timeout_s``: a
    body not received by then gets 408. ``created``: unix seconds reported for models.
    """
    app = QuartTrio("quorum")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    started = created or int(time.time())

    @app.get("/v1/models")
    async def models() -> Response:
        names: dict[str, list[str]] = {}
        for member in dispatcher.members():
            if member.state in (MemberState.DEAD, MemberState.LEFT):
                continue
            for model in member.models:
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

    add_status_routes(app, StatusFeed.for_dispatcher(dispatcher))  # GET /, /status, /cluster/events

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
                "/v1/chat/completions, /v1/completions, /v1/models, /health and "
                "/cluster/members."
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

    return FastPath(app, dispatcher, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
