"""The scenarios' clients: the official ``openai`` SDK, streaming, as an application would
use it, plus the one thing a load balancer in front of the cluster adds (retry elsewhere
on a refused connection or a 503 before any byte).

``stream_chat`` records what one client saw: the serving node (``x-quorum-node``), every
chunk's arrival time, the reasoning and content texts, ids and finish reasons, and how it
ended. ``LoadBalancer`` spreads requests over the node URLs the way an LB with health checks
does. ``compare`` counts lost and duplicated characters against an undisturbed run.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import openai
import trio

__all__ = [
    "Damage",
    "LoadBalancer",
    "StreamResult",
    "compare",
    "make_client",
    "reference_text",
    "stream_chat",
]

REASONING_FIELDS = ("reasoning_content", "reasoning")


def make_client(base_url: str, *, read_timeout_s: float = 15.0) -> openai.AsyncOpenAI:
    """A stock async OpenAI client for ``base_url`` (``http://host:port``): no SDK retries
    (a scenario counts every failure itself), a read timeout that turns a hung stream into
    an error. ``openai.Timeout`` is the class of the SDK's own HTTP library (httpx up to
    openai 2.x, httpx2 from 3.x, which refuses an ``httpx.Timeout``)."""
    return openai.AsyncOpenAI(
        base_url=base_url.rstrip("/") + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=openai.Timeout(connect=2.0, read=read_timeout_s, write=10.0, pool=10.0),
    )


@dataclass
class StreamResult:
    """What one streamed request looked like from the client.

    ``status``: HTTP status (0: no response). ``error``: None when the stream ended with
    exactly one finish_reason and no error; else what went wrong. ``kind``: "ok",
    "connect" (no connection), "status" (an HTTP error before any byte), "broken" (an error
    after bytes arrived), "hung" (the client gave up waiting). ``times``: trio clock of
    every chunk. ``retry_after``: the header of a 429/503, in seconds.
    """

    url: str = ""
    status: int = 0
    node: str | None = None
    attempts: int = 0
    reasoning: str = ""
    content: str = ""
    times: list[float] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    finishes: int = 0
    error: str | None = None
    kind: str = "ok"
    retry_after: float | None = None
    started: float = 0.0
    ended: float = 0.0
    lb_retries: int = 0

    @property
    def bytes_seen(self) -> bool:
        return bool(self.times)

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def max_gap(self, after: float | None = None) -> float:
        """Longest time between consecutive chunks (seconds), counting only gaps that end
        after ``after`` (e.g. the moment of a kill); 0 with fewer than two such chunks."""
        gaps = [
            b - a
            for a, b in zip(self.times, self.times[1:], strict=False)
            if after is None or b >= after
        ]
        return max(gaps, default=0.0)


async def stream_chat(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict[str, Any]],
    *,
    seed: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    headers: dict[str, str] | None = None,
    on_chunk: Callable[[StreamResult], None] | None = None,
    deadline_s: float = 30.0,
) -> StreamResult:
    """One streamed chat completion through ``client``; never raises for a failure, which
    is recorded in the result instead. ``deadline_s``: after this long the client gives up
    (kind "hung"). ``temperature`` 0 makes a real model greedy (the mock ignores it)."""
    result = StreamResult(url=str(client.base_url), started=trio.current_time())
    extra: dict[str, Any] = {}
    if seed is not None:
        extra["seed"] = seed
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    if temperature is not None:
        extra["temperature"] = temperature
    with trio.move_on_after(deadline_s) as scope:
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=model,
                messages=cast(Any, messages),
                stream=True,
                extra_headers=headers,
                **extra,
            )
            result.status = raw.status_code
            result.node = raw.headers.get("x-quorum-node")
            result.attempts = int(raw.headers.get("x-quorum-attempts", "0") or 0)
            stream = cast("openai.AsyncStream[Any]", raw.parse())
            async for chunk in stream:
                result.times.append(trio.current_time())
                result.ids.add(chunk.id)
                for choice in chunk.choices:
                    delta = choice.delta
                    extras = delta.model_extra or {}
                    for name in REASONING_FIELDS:
                        if isinstance(extras.get(name), str):
                            result.reasoning += extras[name]
                    if delta.content:
                        result.content += delta.content
                    if choice.finish_reason is not None:
                        result.finishes += 1
                if on_chunk is not None:
                    on_chunk(result)
            if result.finishes != 1:
                result.kind = "broken"
                result.error = f"stream ended with {result.finishes} finish_reason(s)"
            elif len(result.ids) != 1:
                result.kind = "broken"
                result.error = f"stream carried {len(result.ids)} ids"
        except openai.APIStatusError as exc:
            result.status = exc.status_code
            result.kind = "broken" if result.bytes_seen else "status"
            result.error = f"{exc.status_code}: {exc.message}"
            retry = exc.response.headers.get("retry-after")
            result.retry_after = float(retry) if retry and retry.isdigit() else None
        except (openai.APIConnectionError, httpx.TransportError) as exc:
            result.kind = "broken" if result.bytes_seen else "connect"
            result.error = f"{type(exc).__name__}: {exc}"
        except openai.APIError as exc:  # an error event inside the stream
            result.kind = "broken"
            result.error = f"error event: {exc.message}"
    if scope.cancelled_caught:
        result.kind = "hung"
        result.error = f"no end of stream after {deadline_s} s"
    result.ended = trio.current_time()
    return result


async def reference_text(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict[str, Any]],
    *,
    seed: int | None,
    pin: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> tuple[str, str]:
    """(reasoning, content) of an undisturbed, non-streamed run of the same request, on
    ``pin`` if given, never shared with a concurrent identical request."""
    headers = {"x-quorum-single-flight": "off"}
    if pin is not None:
        headers["x-quorum-pin"] = pin
    extra: dict[str, Any] = {} if seed is None else {"seed": seed}
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    if temperature is not None:
        extra["temperature"] = temperature
    with trio.fail_after(60):
        response = await client.chat.completions.create(
            model=model, messages=cast(Any, messages), stream=False, extra_headers=headers, **extra
        )
    message = cast(Any, response).choices[0].message
    extras = message.model_extra or {}
    reasoning = next((extras[n] for n in REASONING_FIELDS if isinstance(extras.get(n), str)), "")
    return reasoning, message.content or ""


@dataclass(frozen=True)
class Damage:
    """Characters ``lost`` (in the reference, not received) and ``duplicated`` (received,
    not in the reference, e.g. text sent twice across a resume)."""

    lost: int = 0
    duplicated: int = 0

    def __add__(self, other: Damage) -> Damage:
        return Damage(self.lost + other.lost, self.duplicated + other.duplicated)


def _diff(want: str, got: str) -> Damage:
    if want == got:
        return Damage()
    lost = dup = 0
    matcher = difflib.SequenceMatcher(None, want, got, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op in ("delete", "replace"):
            lost += i2 - i1
        if op in ("insert", "replace"):
            dup += j2 - j1
    return Damage(lost, dup)


def compare(result: StreamResult, reference: tuple[str, str]) -> Damage:
    """Lost and duplicated characters of reasoning and content against ``reference``."""
    return _diff(reference[0], result.reasoning) + _diff(reference[1], result.content)


class LoadBalancer:
    """What a load balancer with health checks gives a client: requests spread over
    ``urls`` at random; a refused connection or a 503 before any byte is retried on another
    node (at most ``max_tries`` tries and ``budget_s`` seconds). Anything else, and any
    failure after bytes arrived, is the request's result."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        rng: random.Random | None = None,
        max_tries: int = 40,
        budget_s: float = 30.0,
        read_timeout_s: float = 15.0,
    ) -> None:
        self.urls = list(urls)
        self.clients = {u: make_client(u, read_timeout_s=read_timeout_s) for u in self.urls}
        self.rng = rng or random.Random(0)
        self.max_tries = max_tries
        self.budget_s = budget_s
        self.retries = 0
        self.retried_statuses: dict[str, int] = {}

    async def stream(
        self, model: str, messages: list[dict[str, Any]], **kwargs: Any
    ) -> StreamResult:
        start = trio.current_time()
        order = self.rng.sample(self.urls, len(self.urls))
        result = StreamResult(kind="connect", error="never tried")
        tries = 0
        for attempt in range(self.max_tries):
            tries = attempt
            url = order[attempt % len(order)]
            result = await stream_chat(self.clients[url], model, messages, **kwargs)
            retryable = not result.bytes_seen and (
                result.kind == "connect" or (result.kind == "status" and result.status == 503)
            )
            if not retryable:
                break
            key = "connect" if result.kind == "connect" else "503"
            self.retried_statuses[key] = self.retried_statuses.get(key, 0) + 1
            self.retries += 1
            if trio.current_time() - start > self.budget_s:
                break
            await trio.sleep(0.02 if attempt < len(order) else 0.1)
        result.lb_retries = tries
        return result

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for client in self.clients.values():
                await client.close()
