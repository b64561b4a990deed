"""Header allowlists end to end: a client at node-a, a model that only node-b serves from an
upstream server that sets extra headers. Only the allowlisted client headers reach the
upstream (through the hop), only the allowlisted upstream headers reach the client."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import trio

from quorum.config import BackendConfig
from tests.backends.test_upstream_headers import ANSWER, CLIENT_HEADERS, SECRETS
from tests.backends.test_upstream_hostile import raw_upstream
from tests.helpers import MESSAGES, node_config, start_cluster

# what a client can send over HTTP/1.1 without breaking its own request
SENT = {
    k: v
    for k, v in CLIENT_HEADERS.items()
    if k not in ("host", "content-length", "transfer-encoding", "connection", "upgrade", "te")
    and k not in ("content-encoding", "x-quorum-forwarded")
}


async def answer(stream: trio.SocketStream) -> None:
    await stream.send_all(ANSWER)


@pytest.mark.parametrize("stream", [True, False])
async def test_headers_pass_both_ways_by_the_allowlists_only(
    nursery: trio.Nursery, stream: bool
) -> None:
    upstream = await raw_upstream(nursery, answer)
    llama = BackendConfig("llama", "upstream", {"url": upstream.url(), "read_timeout_s": 5})
    b = node_config("node-b")
    configs = [node_config("node-a"), dataclasses.replace(b, backends=(*b.backends, llama))]
    cluster = await start_cluster(nursery, configs)
    body = {"model": "llama", "messages": MESSAGES, "stream": stream}
    async with httpx.AsyncClient(base_url=cluster.url("node-a"), timeout=10) as http:
        reply = await http.post("/v1/chat/completions", json=body, headers=SENT)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-quorum-node"] == "node-b"  # served across the hop

    [raw] = [r for r in upstream.requests if r.startswith(b"POST")]
    head = raw.partition(b"\r\n\r\n")[0].lower()
    for secret in SECRETS:
        assert secret.lower() not in head, secret
    for name in (b"cookie:", b"x-quorum-", b"x-forwarded-for:", b"x-secret:", b"x-tenant:"):
        assert name not in head, name
    assert b"\r\naccept: text/event-stream" in head
    assert b"\r\ncontent-type: application/json" in head
    assert b"x-request-id: req-00000042" in head  # the client's id, kept by the entry node

    h = reply.headers
    assert h["x-ratelimit-remaining-requests"] == "5" and h["x-quota-allowed"] == "10"
    assert h["x-ratelimit-reset-tokens"] == "6ms"
    assert h["x-request-id"] == "req-00000042"  # Quorum's own headers win over the upstream's
    for name in ("set-cookie", "x-internal-trace", "x-upstream-region", "content-encoding"):
        assert name not in h, name
    assert h.get("server", "") != "secret-box/1.0"
    assert h["x-quorum-node"] == "node-b"
