"""Header allowlists between clients and upstream servers (``quorum.backends.headers``): only
the allowed client headers reach an upstream, never the client's credentials; only the
allowed upstream headers come back in ``Generation.answer_headers``.

The upstream is the raw HTTP/1.1 server of ``test_upstream_hostile`` on 127.0.0.1 port 0: it
records the request bytes exactly as they arrived and answers with a crafted head.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from pydantic import ValidationError

from quorum.backends.base import Fault, Generation
from quorum.backends.headers import DEFAULT, NEVER_TO_CLIENT, NEVER_TO_UPSTREAM, HeaderPolicy
from quorum.backends.mock import MockBackend
from quorum.backends.upstream import UpstreamBackend
from quorum.errors import BackendSaturated
from quorum.wire import parse_chat_request
from tests.backends.test_upstream_hostile import ROLE, RawUpstream, raw_upstream

ANSWER_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-store\r\n"
    b"x-request-id: up-7\r\n"
    b"x-ratelimit-remaining-requests: 5\r\n"
    b"X-RateLimit-Reset-Tokens: 6ms\r\n"
    b"x-quota-allowed: 10\r\n"
    b"x-upstream-region: eu-west\r\n"
    b"set-cookie: s=1\r\n"
    b"server: secret-box/1.0\r\n"
    b"x-internal-trace: abc\r\n"
    b"x-quorum-node: evil\r\n"
    b"content-encoding: identity\r\n"
    b"connection: close\r\n"
    b"\r\n"
)
ANSWER = ANSWER_HEAD + ROLE + b"data: [DONE]\n\n"

CLIENT_HEADERS = {
    "authorization": "Bearer client-secret",
    "proxy-authorization": "Basic cHJveHktc2VjcmV0",
    "cookie": "session=cookie-secret",
    "x-quorum-pin": "node-b",
    "x-quorum-forwarded": "node-a",
    "x-forwarded-for": "10.1.2.3",
    "x-secret": "do-not-send",
    "x-tenant": "acme",
    "host": "evil.example",
    "content-length": "99999",
    "transfer-encoding": "chunked",
    "connection": "upgrade",
    "upgrade": "h2c",
    "te": "trailers",
    "content-type": "text/plain",
    "accept": "text/event-stream",
    "accept-encoding": "gzip, br",
    "content-encoding": "gzip",
    "x-request-id": "req-00000042",
}
SECRETS = (b"client-secret", b"cHJveHktc2VjcmV0", b"cookie-secret", b"do-not-send", b"evil")


async def answer(stream: trio.SocketStream) -> None:
    await stream.send_all(ANSWER)


def generation(stream: bool, headers: dict[str, str] | None = None) -> Generation:
    body: dict[str, Any] = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    body["stream"] = stream
    request = parse_chat_request(body)
    return Generation(request, "rid00001", 1, not stream, headers=headers or CLIENT_HEADERS)


def backend_for(upstream: RawUpstream, credentials: str = "", **options: Any) -> UpstreamBackend:
    """A backend for ``upstream``; a request it cannot finish fails in seconds, not minutes."""
    return UpstreamBackend("llama", url=upstream.url(credentials), read_timeout_s=5, **options)


async def serve(backend: UpstreamBackend, gen: Generation) -> dict[str, str]:
    """Open ``gen``, note ``answer_headers`` before the first event, read every event."""
    try:
        async with backend.open(gen) as events:
            before = dict(gen.answer_headers)
            async for _ in events:
                pass
    finally:
        await backend.aclose()
    return before


def received(upstream: RawUpstream) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The one request the upstream got: its raw bytes, and its header lines as (lower-case
    name, raw value) in the order sent."""
    [raw] = upstream.requests
    head = raw.partition(b"\r\n\r\n")[0]
    pairs: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        pairs.append((name.decode().lower(), value.strip()))
    return raw, pairs


def one(pairs: list[tuple[str, bytes]], name: str) -> bytes:
    values = [value for key, value in pairs if key == name]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


# --- toward the upstream ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_only_allowlisted_client_headers_reach_the_upstream(
    nursery: trio.Nursery, stream: bool
) -> None:
    upstream = await raw_upstream(nursery, answer)
    await serve(backend_for(upstream), generation(stream))
    raw, pairs = received(upstream)
    names = {name for name, _ in pairs}
    for secret in SECRETS:
        assert secret not in raw
    assert names.isdisjoint(
        {"authorization", "proxy-authorization", "cookie", "x-quorum-pin", "x-quorum-forwarded"}
    )
    assert names.isdisjoint({"x-forwarded-for", "x-secret", "x-tenant", "upgrade", "te"})
    assert one(pairs, "accept") == b"text/event-stream"  # the client's, over httpx's */*
    assert one(pairs, "x-request-id") == b"req-00000042"
    assert one(pairs, "content-type") == b"application/json"  # ours, over the client's
    assert one(pairs, "host") == f"127.0.0.1:{upstream.port}".encode()
    assert int(one(pairs, "content-length")) == len(raw.partition(b"\r\n\r\n")[2])
    assert one(pairs, "connection") == b"keep-alive"
    assert one(pairs, "accept-encoding") == b"identity"  # the answer is read undecoded
    assert names.isdisjoint({"transfer-encoding", "content-encoding"})


async def test_the_backends_own_token_is_sent_never_the_clients(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUORUM_TEST_UPSTREAM_KEY", "upstream-token")
    upstream = await raw_upstream(nursery, answer)
    backend = UpstreamBackend.from_config(
        "llama", {"url": upstream.url(), "api_key_env": "QUORUM_TEST_UPSTREAM_KEY"}
    )
    await serve(backend, generation(True))
    raw, pairs = received(upstream)
    assert one(pairs, "authorization") == b"Bearer upstream-token"
    assert b"client-secret" not in raw


async def test_basic_auth_from_the_url_is_sent_never_the_clients(nursery: trio.Nursery) -> None:
    upstream = await raw_upstream(nursery, answer)
    await serve(backend_for(upstream, "user:pw@"), generation(True))
    raw, pairs = received(upstream)
    assert one(pairs, "authorization") == b"Basic dXNlcjpwdw=="  # user:pw
    assert b"client-secret" not in raw


async def test_without_a_token_no_authorization_is_sent(nursery: trio.Nursery) -> None:
    upstream = await raw_upstream(nursery, answer)
    await serve(backend_for(upstream), generation(True))
    _, pairs = received(upstream)
    assert "authorization" not in {name for name, _ in pairs}


async def test_a_fault_is_passed_on_but_a_clients_x_quorum_fault_is_not(
    nursery: trio.Nursery,
) -> None:
    upstream = await raw_upstream(nursery, answer)
    gen = generation(True, {**CLIENT_HEADERS, "x-quorum-fault": "status=500"})
    await serve(backend_for(upstream), gen)
    _, pairs = received(upstream)
    assert "x-quorum-fault" not in {name for name, _ in pairs}

    upstream = await raw_upstream(nursery, answer)
    faulty = Generation(gen.request, "rid00002", 1, False, Fault(fail_after=9), headers=gen.headers)
    await serve(backend_for(upstream), faulty)
    _, pairs = received(upstream)
    assert one(pairs, "x-quorum-fault") == b"fail_after=9"


async def test_a_header_value_reaches_the_upstream_as_the_bytes_the_client_sent(
    nursery: trio.Nursery,
) -> None:
    upstream = await raw_upstream(nursery, answer)
    # An HTTP server hands header values over as latin-1 text; a header injection attempt
    # (which no HTTP parser would produce, but a caller might) is dropped, not sent.
    headers = {"x-request-id": "caf\xe9 \xff", "accept": "a\r\nx-evil: 1"}
    await serve(backend_for(upstream), generation(True, headers))
    raw, pairs = received(upstream)
    assert one(pairs, "x-request-id") == b"caf\xe9 \xff"
    assert one(pairs, "accept") == b"*/*"  # httpx's own
    assert b"x-evil" not in raw


# --- back to the client -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_only_allowlisted_upstream_headers_come_back_before_the_first_event(
    nursery: trio.Nursery, stream: bool
) -> None:
    upstream = await raw_upstream(nursery, answer)
    gen = generation(stream)
    before = await serve(backend_for(upstream), gen)
    expected = {
        "cache-control": "no-store",
        "x-request-id": "up-7",
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-tokens": "6ms",
        "x-quota-allowed": "10",
    }
    assert before == expected
    assert gen.answer_headers == expected


async def test_a_refused_request_brings_no_headers_back(nursery: trio.Nursery) -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        body = b'{"error":{"message":"slow down"}}'
        await stream.send_all(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
            b"x-ratelimit-remaining-requests: 0\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )

    upstream = await raw_upstream(nursery, refuse)
    gen = generation(True)
    with pytest.raises(BackendSaturated):
        await serve(backend_for(upstream), gen)
    assert gen.answer_headers == {}


# --- a policy of the node's own -----------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_custom_policy_changes_what_passes_both_ways(
    nursery: trio.Nursery, stream: bool
) -> None:
    policy = HeaderPolicy(to_upstream=["x-tenant"], to_client=["x-upstream-region"])
    upstream = await raw_upstream(nursery, answer)
    gen = generation(stream)
    await serve(backend_for(upstream, policy=policy), gen)
    raw, pairs = received(upstream)
    assert one(pairs, "x-tenant") == b"acme"
    assert "x-request-id" not in {name for name, _ in pairs}
    assert one(pairs, "accept") == b"*/*"  # httpx's own, not the client's
    assert b"client-secret" not in raw
    assert gen.answer_headers == {"x-upstream-region": "eu-west"}


async def test_from_config_takes_the_nodes_policy(nursery: trio.Nursery) -> None:
    policy = HeaderPolicy(to_upstream=["x-tenant"], to_client=[])
    upstream = await raw_upstream(nursery, answer)
    backend = UpstreamBackend.from_config("llama", {"url": upstream.url()}, policy=policy)
    gen = generation(True)
    await serve(backend, gen)
    _, pairs = received(upstream)
    assert one(pairs, "x-tenant") == b"acme"
    assert gen.answer_headers == {}


def test_a_policy_is_not_an_upstream_option() -> None:
    with pytest.raises(ValidationError, match="policy"):
        UpstreamBackend.from_config("llama", {"url": "http://127.0.0.1:1/v1", "policy": {}})


async def test_the_mock_leaves_answer_headers_empty() -> None:
    gen = generation(True)
    async with MockBackend("llama", ttft_ms=0.0, itl_ms=0.0).open(gen) as events:
        async for _ in events:
            pass
    assert gen.answer_headers == {}


def test_existing_call_sites_get_empty_headers() -> None:
    request = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    a = Generation(request, "r1", 1, True)
    b = Generation(request, "r2", 1, True)
    assert a.headers == {} and a.answer_headers == {}
    a.answer_headers["x"] = "1"
    assert b.answer_headers == {}  # one dict per generation


# --- HeaderPolicy: validation -------------------------------------------------------------


def test_the_default_policy_is_the_issues() -> None:
    assert DEFAULT == HeaderPolicy()
    assert DEFAULT.to_upstream == ["content-type", "accept", "x-request-id"]
    assert DEFAULT.to_client == [
        "content-type",
        "cache-control",
        "x-request-id",
        "x-quota-*",
        "x-ratelimit-*",
    ]


@pytest.mark.parametrize("name", [*NEVER_TO_UPSTREAM, "x-quorum-pin", "x-quorum-signature"])
def test_a_name_that_never_goes_upstream_is_refused_saying_why(name: str) -> None:
    with pytest.raises(ValidationError, match=f"'{name}' may never pass: .*; remove it") as info:
        HeaderPolicy(to_upstream=["accept", name])
    assert info.value.errors()[0]["loc"] == ("to_upstream",)


@pytest.mark.parametrize("name", [*NEVER_TO_CLIENT, "x-quorum-node"])
def test_a_name_that_never_goes_back_is_refused_saying_why(name: str) -> None:
    with pytest.raises(ValidationError, match=f"'{name}' may never pass: .*; remove it") as info:
        HeaderPolicy(to_client=[name])
    assert info.value.errors()[0]["loc"] == ("to_client",)


def test_each_list_refuses_only_the_names_forbidden_in_its_direction() -> None:
    assert HeaderPolicy(to_client=["authorization"]).to_client == ["authorization"]
    assert HeaderPolicy(to_upstream=["set-cookie"]).to_upstream == ["set-cookie"]


@pytest.mark.parametrize(
    ("pattern", "caught"),
    [
        ("*", "authorization"),
        ("x-*", "x-quorum-*"),
        ("x-q*", "x-quorum-*"),
        ("x-quorum-*", "x-quorum-*"),
        ("x-quorum-pin-*", "x-quorum-*"),
        ("c*", "connection, content-encoding, content-length, cookie"),
        ("content-*", "content-encoding, content-length"),
        ("accept-*", "accept-encoding"),
        ("t*", "te, transfer-encoding"),
    ],
)
def test_a_pattern_that_would_let_a_forbidden_name_through_is_refused(
    pattern: str, caught: str
) -> None:
    with pytest.raises(ValidationError, match=f"would let .*{caught}.* through"):
        HeaderPolicy(to_upstream=[pattern])


@pytest.mark.parametrize("pattern", ["*", "x-*", "s*", "transfer-*", "keep-*"])
def test_a_client_pattern_that_would_let_a_forbidden_name_through_is_refused(
    pattern: str,
) -> None:
    with pytest.raises(ValidationError, match=r"would let .* through, which may never pass"):
        HeaderPolicy(to_client=[pattern])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("X-Tenant", "written in lower case: write 'x-tenant'"),
        ("", "is not a header name"),
        ("x tenant", "is not a header name"),
        ("x-tenant:", "is not a header name"),
        ("x*tenant", "is not a header name"),
        ("**", "is not a header name"),
        ("x-ténant", "is not a header name"),
    ],
)
def test_an_entry_that_is_not_a_header_name_is_refused(entry: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HeaderPolicy(to_upstream=[entry])
    with pytest.raises(ValidationError, match=message):
        HeaderPolicy(to_client=[entry])


@pytest.mark.parametrize(
    "table",
    [
        {"to_upstream": "accept"},  # a string is not a list
        {"to_client": [1]},
        {"to_upstream": ["accept"], "to_server": []},  # an unknown key
    ],
)
def test_a_policy_table_of_the_wrong_shape_is_refused(table: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HeaderPolicy.model_validate(table)


def test_a_policy_is_frozen() -> None:
    with pytest.raises(ValidationError):
        DEFAULT.to_upstream = ["authorization"]  # type: ignore[misc]


def test_narrow_patterns_and_empty_lists_are_accepted() -> None:
    policy = HeaderPolicy(to_upstream=["x-tenant-*", "openai-*"], to_client=[])
    assert policy.upstream({"x-tenant-id": "1", "openai-organization": "o", "x-te": "x"}) == {
        "x-tenant-id": "1",
        "openai-organization": "o",
    }
    assert policy.client({"content-type": "text/event-stream"}) == {}


# --- HeaderPolicy: the filters ------------------------------------------------------------


def test_upstream_filter_keeps_allowed_names_lower_cased() -> None:
    headers = {k: v for k, v in CLIENT_HEADERS.items() if k != "x-request-id"}
    assert DEFAULT.upstream(headers | {"X-Request-Id": "req-43"}) == {
        "content-type": "text/plain",
        "accept": "text/event-stream",
        "x-request-id": "req-43",
    }


def test_client_filter_takes_pairs_joins_repeats_and_lower_cases() -> None:
    pairs = [
        ("X-RateLimit-Limit", "10"),
        ("x-ratelimit-limit", "20"),
        ("Set-Cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("Cache-Control", "no-store"),
        ("server", "secret-box/1.0"),
    ]
    assert DEFAULT.client(pairs) == {"x-ratelimit-limit": "10, 20", "cache-control": "no-store"}
    assert DEFAULT.client(httpx.Headers(pairs)) == {
        "x-ratelimit-limit": "10, 20",
        "cache-control": "no-store",
    }


def test_the_filters_drop_forbidden_names_even_when_validation_was_bypassed() -> None:
    everything = HeaderPolicy.model_construct(to_upstream=["*"], to_client=["*"])
    sent = everything.upstream(CLIENT_HEADERS)
    assert set(sent).isdisjoint(NEVER_TO_UPSTREAM)
    assert "x-quorum-pin" not in sent and "x-quorum-forwarded" not in sent
    assert sent["x-secret"] == "do-not-send"  # "*" did pass what it may
    back = everything.client(
        [
            ("set-cookie", "s=1"),
            ("content-length", "3"),
            ("content-encoding", "gzip"),
            ("x-quorum-node", "evil"),
            ("a", "b"),
        ]
    )
    assert back == {"a": "b"}


@pytest.mark.parametrize(
    "value",
    ["a\r\nx-evil: 1", "a\nb", "a\x00b", "a\x7fb", " padded", "padded\t", "€uro"],
)
def test_the_filters_drop_values_that_are_not_field_values(value: str) -> None:
    assert DEFAULT.upstream({"x-request-id": value}) == {}
    assert DEFAULT.client({"x-request-id": value}) == {}


def test_the_filters_drop_names_that_are_not_tokens() -> None:
    assert DEFAULT.upstream({"x-request-id ": "a", "accept\r\nx": "b", "x-*": "c"}) == {}
    assert HeaderPolicy(to_client=["x-a*"]).client({"x-a*": "1", "x-ab": "2"}) == {"x-ab": "2"}


async def test_an_upstreams_cookie_never_goes_out_with_a_later_request(
    nursery: trio.Nursery,
) -> None:
    upstream = await raw_upstream(nursery, answer)  # every answer sets s=1
    backend = backend_for(upstream)
    try:
        for _ in range(2):
            async with backend.open(generation(True, {})) as events:
                async for _ in events:
                    pass
    finally:
        await backend.aclose()
    assert len(upstream.requests) == 2
    assert all(b"\r\ncookie:" not in r.lower() for r in upstream.requests)
