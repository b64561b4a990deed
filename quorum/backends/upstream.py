"""A backend that is an OpenAI-compatible HTTP server: vLLM, llama.cpp server, Ollama, or
another Quorum node.

The client's body is sent on with ``model`` replaced by ``upstream_model`` and ``stream``
forced on (with ``stream_options.include_usage`` when usage is wanted), so every request is a
stream here and the node folds it for non-streaming clients. The upstream's events are passed
on with ``id``, ``created`` and ``model`` set to the stream's own, so that a stream resumed on
another node keeps one id.

Resume (``Generation.resume``): the partial answer is appended as an assistant message with
vLLM's ``continue_final_message`` (llama.cpp and Ollama continue a trailing assistant message
too), and the upstream's repeated role chunk is dropped. Unlike the deterministic mock, a real
model continues plausibly, not identically: the client sees no repeated and no missing text,
but a break during reasoning restarts the answer after it, and usage counts the continuation
only.

Config (``[[backends]]`` with ``kind = "upstream"``)::

    url = "http://127.0.0.1:8000/v1"   # base URL, up to and including /v1
    upstream_model = "Qwen/Qwen3-8B"   # the upstream's model name (default: model)
    api_key_env = "VLLM_API_KEY"       # environment variable holding a bearer token (optional)
    slots = 64                         # requests sent concurrently (the rest queue here)
    queue = 256
    connect_timeout_s = 2.0
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx
import trio

from quorum.backends.base import Backend, BackendLoad, BackendState, Generation
from quorum.errors import BackendBroken, BackendSaturated, BackendUnavailable
from quorum.sse import DONE, SSEParser, SSEProtocolError, encode

__all__ = ["UpstreamBackend"]

_OPTIONS = {
    "url",
    "upstream_model",
    "api_key_env",
    "slots",
    "queue",
    "connect_timeout_s",
    "weight",
    "health_interval_s",
}


class UpstreamBackend(Backend):
    """One model on an OpenAI-compatible HTTP server.

    ``url``: base URL ending in ``/v1``. ``slots``: concurrent upstream requests; ``queue``:
    how many more may wait here. ``state`` is "warming" until ``GET {url}/models`` answers.
    """

    kind = "upstream"

    def __init__(
        self,
        model: str,
        *,
        url: str,
        upstream_model: str | None = None,
        api_key: str | None = None,
        slots: int = 64,
        queue: int = 256,
        connect_timeout_s: float = 2.0,
        health_interval_s: float = 5.0,
        weight: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model
        self.url = url.rstrip("/")
        self.upstream_model = upstream_model or model
        self.weight = weight
        self._slots = trio.Semaphore(slots)
        self._size = slots
        self._queue = queue
        self._queued = 0
        self._ready = False
        self._health_interval = health_interval_s
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(connect=connect_timeout_s, read=None, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
        )

    @classmethod
    def from_config(cls, model: str, table: Mapping[str, Any]) -> UpstreamBackend:
        """Build from a ``[[backends]]`` table; raises ``ValueError`` naming the bad key."""
        unknown = set(table) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for an upstream backend")
        url = table.get("url")
        if not isinstance(url, str) or not url.startswith("http"):
            raise ValueError("'url' must be the upstream's base URL, e.g. http://127.0.0.1:8000/v1")
        api_key = None
        if "api_key_env" in table:
            api_key = os.environ.get(str(table["api_key_env"]))
        kwargs: dict[str, Any] = {}
        for key in ("slots", "queue"):
            if key in table:
                if not isinstance(table[key], int) or table[key] < (1 if key == "slots" else 0):
                    raise ValueError(f"'{key}' must be a positive integer")
                kwargs[key] = table[key]
        for key in ("connect_timeout_s", "health_interval_s", "weight"):
            if key in table:
                if not isinstance(table[key], int | float) or table[key] <= 0:
                    raise ValueError(f"'{key}' must be a positive number")
                kwargs[key] = float(table[key])
        return cls(
            model, url=url, upstream_model=table.get("upstream_model"), api_key=api_key, **kwargs
        )

    @property
    def state(self) -> BackendState:
        return "ready" if self._ready else "warming"

    def load(self) -> BackendLoad:
        return BackendLoad(
            slots=self._size, busy=self._size - self._slots.value, queued=self._queued
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll ``GET {url}/models`` every ``health_interval_s``; ready while it answers 200."""
        task_status.started()
        try:
            while True:
                try:
                    response = await self._client.get(self.url + "/models", timeout=5.0)
                    self._ready = response.status_code == 200
                except httpx.HTTPError:
                    self._ready = False
                await trio.sleep(self._health_interval if self._ready else 1.0)
        finally:
            with trio.CancelScope(shield=True):
                await self._client.aclose()

    def _body(self, generation: Generation) -> dict[str, Any]:
        """The upstream request: the client's body with our model name and streaming on; for
        a resume, the partial answer appended for the upstream to continue."""
        request = generation.request
        body = dict(request.raw)
        body.pop("quorum_resume", None)
        body["model"] = self.upstream_model
        body["stream"] = True
        if generation.include_usage:
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        resume = generation.resume
        if resume is not None:
            if request.kind == "chat":
                partial = resume.text.get("content", "")
                body["messages"] = [*body["messages"], {"role": "assistant", "content": partial}]
                # vLLM's chat-template switches: continue the last assistant message.
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            else:
                body["prompt"] = str(body.get("prompt", "")) + resume.text.get("text", "")
        return body

    @asynccontextmanager
    async def open(self, generation: Generation) -> AsyncIterator[AsyncIterator[bytes]]:
        if self._slots.value == 0 and self._queued >= self._queue:
            raise BackendSaturated(
                f"{self._size} requests in flight and {self._queued} queued for {self.url}",
                retry_after=max(1.0, math.ceil(self._queued / self._size)),
            )
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        try:
            path = "/chat/completions" if generation.request.kind == "chat" else "/completions"
            # A fault is passed on: a Quorum node or mock upstream applies it, others ignore it.
            headers = {"x-quorum-fault": generation.fault.header()} if generation.fault else {}
            request = self._client.build_request(
                "POST", self.url + path, json=self._body(generation), headers=headers
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise BackendUnavailable(f"{self.url} could not be reached: {exc!r}") from None
            try:
                if response.status_code != 200:
                    text = (await response.aread())[:500].decode("utf-8", "replace")
                    if response.status_code == 429:
                        raise BackendSaturated(f"{self.url} answered 429: {text}")
                    raise BackendUnavailable(
                        f"{self.url} answered {response.status_code}: {text}",
                        status=503 if response.status_code == 503 else 502,
                    )
                events = _events(response, self.url, generation)
                try:
                    yield events
                finally:
                    with trio.CancelScope(shield=True):
                        await events.aclose()
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
        finally:
            self._slots.release()


async def _events(
    response: httpx.Response, url: str, generation: Generation
) -> AsyncGenerator[bytes]:
    """The upstream's events as this node's stream: ``id``, ``created`` and ``model`` become
    the stream's own (so the stream keeps one id if another node resumes it); for a resume,
    the upstream's role chunk is dropped (the client has had it)."""
    parser = SSEParser()
    head = {
        "id": generation.stream_id,
        "created": generation.created,
        "model": generation.request.model,
    }
    resuming = generation.resume is not None
    try:
        async with aclosing(response.aiter_raw()) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                for event in parser.feed(chunk):
                    if event.is_done:
                        yield DONE
                        return
                    try:
                        obj = json.loads(event.data)
                    except ValueError:
                        raise BackendBroken(f"{url} sent an event that is not JSON") from None
                    if "error" in obj:
                        yield event.raw  # the relay above decides what a broken stream means
                        continue
                    if resuming and _role_only(obj):
                        resuming = False
                        continue
                    obj.update(head)
                    yield encode(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
    except (httpx.TransportError, SSEProtocolError) as exc:
        raise BackendBroken(f"{url} broke mid-stream: {exc!r}") from None
    raise BackendBroken(f"{url} ended the stream without [DONE]")


def _role_only(chunk: dict[str, Any]) -> bool:
    """A chunk whose only news is the assistant role (empty content)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if any(k != "role" and v for k, v in delta.items()) or choice.get("finish_reason"):
            return False
    return bool(chunk.get("choices"))
