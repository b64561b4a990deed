"""The status routes of a node's quart-trio app: ``GET /`` and ``GET /status`` (the page),
``GET /cluster/events`` (the feed, ``quorum.status.feed``).

Access control is one hook, ``authorize``: it is called with the request's lower-cased headers
before the feed opens and raises an ``ApiError`` (``Unauthorized`` 401 without a key,
``PermissionDenied`` 403 for a key that is not an admin's) to refuse. The default,
``open_access``, lets everyone in: Quorum has no API keys yet (issue #12). When it has, pass
``authorize=`` a check of ``Authorization: Bearer KEY`` for the admin role. The page itself is
static (no cluster data in it) and stays open: it asks for the key when the feed answers 401
or 403, keeps it in ``sessionStorage`` and sends it as a bearer token.

The page is one file, ``page.html`` beside this module, with its script and style inline and
no external fetches (a cluster may have no internet); a Content-Security-Policy with their
hashes lets the browser run nothing else and connect nowhere but this node.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Mapping
from importlib.resources import files

from quart import Response, request
from quart_trio import QuartTrio

from quorum.errors import Unavailable
from quorum.status.feed import StatusFeed

__all__ = ["Authorize", "add_status_routes", "open_access", "page_html"]

Authorize = Callable[[Mapping[str, str]], None]
"""``authorize(headers)``: returns to admit, raises ``ApiError`` (401/403) to refuse."""


def open_access(headers: Mapping[str, str]) -> None:
    """Admit everyone: the default until API keys exist (issue #12)."""


def page_html() -> bytes:
    """The status page, as shipped in the package (``quorum/status/page.html``)."""
    return files("quorum.status").joinpath("page.html").read_bytes()


def _csp(page: bytes) -> str:
    """A Content-Security-Policy admitting exactly the page's inline script and style."""

    def hashes(tag: bytes) -> str:
        blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.S)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(b).digest()).decode() + "'" for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def add_status_routes(
    app: QuartTrio,
    feed: StatusFeed,
    *,
    authorize: Authorize = open_access,
    keepalive_s: float = 15.0,
) -> None:
    """Serve the status page and ``feed`` from ``app``, and run the feed's sampler while the
    app serves (started in the app's nursery at startup, stopped at shutdown).

    ``authorize``: the access hook (module docstring). The feed is kept as
    ``app.extensions["quorum.status"]``. ``keepalive_s``: seconds of silence
    after which the feed sends an SSE comment. The feed answers 503 (``Retry-After``) when
    ``feed.max_subscribers`` streams are open.
    """
    app.extensions["quorum.status"] = feed
    page = page_html()
    page_headers = {
        "content-security-policy": _csp(page),
        "cache-control": "no-cache",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }

    @app.before_serving
    async def start_status_feed() -> None:
        await app.nursery.start(feed.run)

    @app.after_serving
    async def stop_status_feed() -> None:
        feed.stop()

    async def status_page() -> Response:
        return Response(page, content_type="text/html; charset=utf-8", headers=page_headers)

    app.add_url_rule("/", "status_page", status_page, methods=["GET"])
    app.add_url_rule("/status", "status_page_named", status_page, methods=["GET"])

    @app.get("/cluster/events")
    async def cluster_events() -> Response:
        """The status feed: server-sent events (``quorum.status.feed``)."""
        authorize({k.lower(): v for k, v in request.headers.items()})
        if feed.closed:
            raise Unavailable(
                f"Node {feed.name} is stopping: watch another node of the cluster.",
                code="node_stopping",
                retry_after=1,
            )
        if feed.full:
            raise Unavailable(
                f"This node already serves {feed.max_subscribers} status streams; close one "
                "or watch another node.",
                code="too_many_status_streams",
                retry_after=5,
            )
        response = Response(
            feed.stream(keepalive_s),
            content_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        response.timeout = None
        return response
