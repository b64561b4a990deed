"""The OpenAI-compatible HTTP API of one node: a quart-trio app.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /cluster/members``. Every error, including 404/405/413 raised by the
framework, is answered in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from quorum.errors import ApiError, InvalidRequest, PayloadTooLarge
from quorum.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from quorum.routing.dispatch import REQUEST_ID, Dispatcher, Reply
from quorum.wire import parse_chat_request, parse_completion_request, parse_json_body

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _error(exc: ApiError, request_id: str | None = None) -> Response:
    headers = {}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    if request_id:
        headers[REQUEST_ID] = request_id
    return _json(exc.status, exc.body(), headers)


def _response(reply: Reply) -> Response:
    response = Response(reply.body, status=reply.status, headers=reply.headers)
    response.timeout = None  # a stream lasts as long as the generation does
    return response


def create_app(
    dispatcher: Dispatcher,
    *,
    health: Callable[[], dict[str, Any]],
    drain: Callable[[], dict[str, Any]] | None = None,
    max_body_bytes: int = 4 << 20,
    created: int | None = None,
) -> QuartTrio:
    """Build the app for one node.

    ``dispatcher``: routes requests. ``health``: returns this node's ``/health`` document.
    ``max_body_bytes``: larger bodies get 413. ``created``: unix seconds reported for models.
    """
    app = QuartTrio("quorum")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    started = created or int(time.time())

    async def _body() -> bytes:
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise PayloadTooLarge(
                f"The request body is {length} bytes; this node accepts at most "
                f"{max_body_bytes} bytes (max_body_bytes in its config)."
            )
        try:
            data = await request.get_data(cache=False, as_text=False)
            return data if isinstance(data, bytes) else data.encode()
        except RequestEntityTooLarge:
            raise PayloadTooLarge(
                f"The request body is over this node's limit of {max_body_bytes} bytes "
                "(max_body_bytes in its config)."
            ) from None

    async def _serve(parse: Callable[[dict[str, Any]], Any]) -> Response:
        model = "-"
        try:
            body = await _body()
            parsed = parse(parse_json_body(body))
            model = parsed.model
            headers = {k.lower(): v for k, v in request.headers.items()}
            reply = await dispatcher.handle(parsed, body, request.path, headers)
        except ApiError as exc:
            dispatcher.metrics.requests.labels(request.path, model, str(exc.status)).inc()
            raise
        dispatcher.metrics.requests.labels(request.path, model, str(reply.status)).inc()
        return _response(reply)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await _serve(parse_chat_request)

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await _serve(parse_completion_request)

    @app.get("/v1/models")
    async def models() -> Response:
        names: dict[str, list[str]] = {}
        for member in dispatcher.members():
            if member.state in ("dead", "left"):
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
        if drain is None:
            raise ApiError("This node cannot be drained over HTTP.", status=404)
        host = (request.scope.get("client") or ("", 0))[0]
        if not (host.startswith("127.") or host == "::1"):
            raise ApiError(
                "POST /admin/drain is accepted from this machine only (127.0.0.0/8, ::1).",
                status=403,
                code="forbidden",
            )
        return _json(202, drain())

    @app.get("/cluster/members")
    async def members() -> Response:
        return _json(
            200,
            {"self": dispatcher.name, "members": [m.as_json() for m in dispatcher.members()]},
        )

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
        return _error(ApiError(f"Internal error in Quorum: {exc!r}", code="internal_error"))

    return app
