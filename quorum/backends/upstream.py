"""A backend that is an OpenAI-compatible HTTP server: vLLM, llama.cpp server, Ollama, or
another Quorum node.

The client's body is sent on with ``model`` replaced by ``upstream_model`` and ``stream``
forced on (with ``stream_options.include_usage`` when usage is wanted), so every request is a
stream here and the node folds it for non-streaming clients. The upstream's events are passed
on with ``id``, ``created`` and ``model`` set to the stream's own, so that a stream resumed on
another node keeps one id.

Hostile input, from either side, never hurts the node:

- The body is encoded strictly (``allow_nan=False``, UTF-8 without lone surrogates) before
  anything is sent; a body that cannot be encoded is ``InvalidRequest`` (400) naming the field.
- Every upstream event must be a JSON object of the chunk shape the layers above read
  (``choices`` a list of objects, ``delta`` an object, text fields strings, tool-call indexes
  integers); anything else is ``BackendBroken`` with a message saying what was wrong.
- Every wait has a deadline: ``connect_timeout_s`` to connect, ``read_timeout_s`` between two
  reads of the answer (so a non-streamed request, which the node folds from the stream, is
  bounded too; the entry node adds a total deadline). No answer head within
  ``read_timeout_s`` is ``BackendUnavailable`` with status 504; a silence after the head is
  ``BackendBroken``, which the entry node resumes elsewhere.
- Messages in exceptions (which reach clients) never contain the upstream's URL nor its
  credentials: they name the model and the upstream's status, with at most a 200-character
  excerpt of the upstream's ``error.message`` stripped of control characters. The URL, without
  its ``user:password@`` part, goes to the server log (``logging``, logger
  ``quorum.backends.upstream``).

Headers (``quorum.backends.headers``): the upstream gets the client's headers that the
node's ``HeaderPolicy`` allows (``Generation.headers``), then this backend's own
``content-type: application/json``, ``authorization`` (the ``api_key_env`` token, or basic
auth from the URL; never the client's), ``accept-encoding: identity`` (the answer is read
undecoded) and ``x-quorum-fault`` when a fault is injected. On a 200 answer, the upstream's
response headers the policy allows, but ``content-type`` (the node frames the body itself), go
into ``Generation.answer_headers`` before the first event.

Resume (``Generation.resume``): the partial answer is appended as an assistant message for the
upstream to continue, and the upstream's repeated role chunk is dropped. Per dialect:

- vLLM: ``continue_final_message: true`` and ``add_generation_prompt: false`` make the chat
  template continue the trailing assistant message; the partial reasoning goes on that message
  as ``reasoning_content`` (or ``reasoning``, as the stream named it), which vLLM passes to
  the chat template (templates such as Qwen3's render it as a closed think block, so the model
  goes on with the answer instead of reasoning again from the start).
- llama.cpp server: continues a trailing assistant message (prefill) by itself, ignores the
  vLLM switches, and reads ``reasoning_content`` on assistant messages.
- Ollama: continues a trailing assistant message; its OpenAI layer reads ``reasoning`` (the
  field it streams) on messages and ignores ``reasoning_content`` and the vLLM switches.
- Another Quorum node: treats the request as a new one (its mock does not continue text).

``max_tokens`` / ``max_completion_tokens`` (whichever the client set) are reduced by the
tokens already delivered, estimated as one per event the client has (``events - 1`` for chat,
whose first event is the role chunk); a resume whose budget is used up is refused. A
completion's ``prompt`` (a string, or a list of one string) gets the delivered text appended;
``echo`` is removed (the client has the echo already). What cannot be continued exactly is
refused with ``BackendUnavailable`` before anything is sent, so the entry node tries another
candidate (a deterministic mock continues exactly) or ends the stream with an error event: a
stream that already carried tool-call deltas (``Resume.tool_calls > 0``: the upstream would
start the call again or corrupt its arguments), a prompt of token ids or of several prompts.
A real model continues plausibly, not identically: the client sees no repeated and no missing
text, and usage counts the continuation only.

Trailing whitespace is held back (``HeldBack``): the delivered ``content`` (chat) or ``text``
(completions) is sent without its trailing whitespace, and the same whitespace at the start of
the continuation is dropped before it reaches the client. A server renders the partial answer
as text and tokenizes it again, and a tokenizer merges whitespace at the end of a text that it
splits before a following word (SmolLM2's BPE: ``"\n\n"`` at the end is one token, ``"\n"``
``"\n"`` before ``Step``), so a prefill ending in whitespace is not the token sequence the model
generated, and a greedy continuation goes elsewhere (``" Step"`` for ``"Step"``). Cut before the
whitespace, the prefill is what the model generated and it regenerates the same whitespace
tokens; measured with llama.cpp and SmolLM2-135M, greedy, at every cut point of 5 answers of
60 tokens: 8 of 295 resumed answers differed from the undisturbed one without the hold-back,
0 with it. The token budget gets back ``min(2, len(whitespace))`` tokens for it (a run of
whitespace before a word is generated as the run less its last character, then that character).
If the continuation does not start with the held whitespace, the part that matches is dropped
and the rest passed on (the client keeps the whitespace it had).

Config (``[[backends]]`` with ``kind = "upstream"``)::

    url = "http://127.0.0.1:8000/v1"   # base URL, up to and including /v1
    upstream_model = "Qwen/Qwen3-8B"   # the upstream's model name (default: model)
    api_key_env = "VLLM_API_KEY"       # environment variable holding a bearer token (optional)
    slots = 64                         # requests sent concurrently (the rest queue here)
    queue = 256
    connect_timeout_s = 2.0
    read_timeout_s = 60.0              # longest silence while waiting for the upstream's answer
    health_interval_s = 5.0
"""

from __future__ import annotations

import json
import logging
import math
import os
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Annotated, Any, NoReturn

import httpx
import trio
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from quorum.backends.base import Backend, BackendLoad, BackendState, Generation, Resume
from quorum.backends.headers import DEFAULT, HeaderPolicy
from quorum.errors import BackendBroken, BackendSaturated, BackendUnavailable, InvalidRequest
from quorum.sse import DONE, SSEParser, SSEProtocolError, encode
from quorum.wire import json_type_name

__all__ = ["HeldBack", "UpstreamBackend", "UpstreamOptions"]

log = logging.getLogger(__name__)


def _upstream_url(text: str) -> str:
    example = "e.g. http://127.0.0.1:8000/v1"
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL:
        raise ValueError(f"not a valid URL; give the upstream's base URL, {example}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"expected an http(s) URL with a host, {example}")
    return text


class UpstreamOptions(BaseModel):
    """The options of a ``kind = "upstream"`` backend (see the module docstring), typed:
    ``url`` required, counts and seconds positive and finite, no unknown key. Raises
    ``pydantic.ValidationError``."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    url: Annotated[str, AfterValidator(_upstream_url)]
    upstream_model: str | None = Field(default=None, min_length=1)
    api_key_env: str | None = Field(default=None, min_length=1)
    slots: int = Field(default=64, ge=1)
    queue: int = Field(default=256, ge=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    health_interval_s: float = Field(default=5.0, gt=0)
    weight: float = Field(default=1.0, gt=0)


ERROR_BODY_BYTES = 64 << 10
"""The most bytes read of an upstream's error answer (or of its ``/models`` answer)."""

EXCERPT_CHARS = 200
"""The longest excerpt of an upstream's error message passed on to clients."""

_REASONING_FIELDS = ("reasoning_content", "reasoning")


@dataclass(frozen=True, slots=True)
class HeldBack:
    """What a resume holds back of the delivered text (see the module docstring): ``field``
    ("content" for chat, "text" for completions), the trailing ``whitespace`` sent to the
    upstream without it, and ``tokens``, the tokens it is taken to have cost."""

    field: str
    whitespace: str

    @property
    def tokens(self) -> int:
        return min(2, len(self.whitespace))

    @classmethod
    def of(cls, generation: Generation) -> HeldBack | None:
        """The whitespace ``generation``'s resume holds back, or None (a fresh request, or
        delivered text that does not end in whitespace)."""
        resume = generation.resume
        if resume is None:
            return None
        field = "content" if generation.request.kind == "chat" else "text"
        text = resume.text.get(field, "")
        whitespace = text[len(text.rstrip()) :]
        return cls(field, whitespace) if whitespace else None


class UpstreamBackend(Backend):
    """One model on an OpenAI-compatible HTTP server.

    ``url``: base URL ending in ``/v1``; ``user:password@`` in it is sent as basic auth (unless
    ``api_key`` is given: then the bearer token) and is never logged or shown: the ``url``
    attribute is the URL without it. ``slots``: concurrent upstream requests; ``queue``: how
    many more may wait here. ``connect_timeout_s``: seconds to connect; ``read_timeout_s``:
    seconds of silence allowed while waiting for the answer's head or its next bytes.
    ``policy``: which client headers the upstream gets and which of its response headers go
    back (``quorum.backends.headers``; the node passes its own). ``state`` is "warming" until
    ``GET {url}/models`` answers 200.
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
        read_timeout_s: float = 60.0,
        health_interval_s: float = 5.0,
        weight: float = 1.0,
        policy: HeaderPolicy = DEFAULT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        # Credentials in the URL are sent as basic auth and kept out of ``url``, which is
        # what httpx logs and what our log lines show.
        parsed = httpx.URL(url.rstrip("/"))
        self.url = str(parsed.copy_with(userinfo=b""))
        # A user name alone may be a token (http://TOKEN@host); with a password it is not secret.
        secrets = (parsed.userinfo.decode(), parsed.password or parsed.username)
        self._secrets = [s for s in secrets if s]
        auth = httpx.BasicAuth(parsed.username, parsed.password) if parsed.userinfo else None
        self.upstream_model = upstream_model or model
        self.weight = weight
        self._slots = trio.Semaphore(slots)
        self._size = slots
        self._queue = queue
        self._queued = 0
        self._ready = False
        self._health_interval = health_interval_s
        self._read_timeout = read_timeout_s
        # The answer is read raw (``aiter_raw``), undecoded: ask for it unencoded, where
        # httpx would offer gzip and deflate (and a gzipped stream would not parse).
        headers = {"accept-encoding": "identity"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            auth=None if api_key else auth,
            timeout=httpx.Timeout(
                connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=30.0
            ),
            limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
            # Never keep an upstream's cookies: one client's set-cookie would go out with
            # every later client's request (a policy that accepts no domain stores none).
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    @classmethod
    def from_config(
        cls, model: str, table: Mapping[str, Any], *, policy: HeaderPolicy = DEFAULT
    ) -> UpstreamBackend:
        """Build from a ``[[backends]]`` table's options (``UpstreamOptions``) and the node's
        header ``policy``; raises ``pydantic.ValidationError`` (a ``ValueError``) naming the
        bad key."""
        options = UpstreamOptions.model_validate(dict(table))
        api_key = os.environ.get(options.api_key_env) if options.api_key_env else None
        return cls(
            model,
            url=options.url,
            upstream_model=options.upstream_model,
            api_key=api_key,
            slots=options.slots,
            queue=options.queue,
            connect_timeout_s=options.connect_timeout_s,
            read_timeout_s=options.read_timeout_s,
            health_interval_s=options.health_interval_s,
            weight=options.weight,
            policy=policy,
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
                self._ready = await self._healthy()
                await trio.sleep(self._health_interval if self._ready else 1.0)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (``run`` does it when it ends)."""
        with trio.CancelScope(shield=True):
            await self._client.aclose()

    async def _healthy(self) -> bool:
        """One ``GET {url}/models``: True on 200 within 5 s (at most ``ERROR_BODY_BYTES`` of
        the answer are read, so a hostile upstream cannot make it unbounded)."""
        with trio.move_on_after(5.0):
            try:
                async with self._client.stream("GET", self.url + "/models", timeout=5.0) as r:
                    await _read_capped(r)
                    return r.status_code == 200
            except httpx.HTTPError:
                return False
        return False

    # --- the request ------------------------------------------------------------------------

    def _body(self, generation: Generation) -> dict[str, Any]:
        """The upstream request: the client's body with our model name and streaming on; for
        a resume, the partial answer appended for the upstream to continue (see the module
        docstring). Raises ``BackendUnavailable`` (502) for a resume that cannot be continued
        exactly."""
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
            if resume.tool_calls > 0:
                self._refuse(
                    f"the stream broke after {resume.tool_calls} tool-call deltas, and an "
                    "upstream server cannot continue a partial tool call exactly"
                )
            held = HeldBack.of(generation)
            if held is not None:
                text = resume.text[held.field]
                resume = Resume(
                    max(0, resume.events - held.tokens),
                    {**resume.text, held.field: text[: len(text) - len(held.whitespace)]},
                    resume.tool_calls,
                )
            if request.kind == "chat":
                self._resume_chat(body, resume)
            else:
                self._resume_completion(body, resume)
        return body

    def _refuse(self, why: str) -> NoReturn:
        raise BackendUnavailable(
            f"The upstream server for model '{self.model}' cannot resume this stream: {why}.",
            status=502,
        )

    def _budget(self, body: dict[str, Any], keys: tuple[str, ...], delivered: int) -> None:
        """Reduce each token limit in ``keys`` that the client set by ``delivered``; refuse
        when nothing is left."""
        for key in keys:
            limit = body.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool):
                if limit - delivered < 1:
                    self._refuse(
                        f"'{key}' is {limit} and about {delivered} tokens were delivered already"
                    )
                body[key] = limit - delivered

    def _resume_chat(self, body: dict[str, Any], resume: Resume) -> None:
        self._budget(body, ("max_completion_tokens", "max_tokens"), max(0, resume.events - 1))
        partial: dict[str, Any] = {"role": "assistant", "content": resume.text.get("content", "")}
        for key in _REASONING_FIELDS:
            if resume.text.get(key):
                partial[key] = resume.text[key]
        messages = list(body["messages"])
        last = messages[-1]
        if body.get("continue_final_message") is True and last.get("role") == "assistant":
            # The client asked for its own last assistant message to be continued: the
            # delivered text continues it, rather than following it as another message.
            merged = dict(last)
            for key, value in partial.items():
                before = last.get(key) or ""
                if key != "role" and value:
                    if not isinstance(before, str):
                        self._refuse(f"the client's final assistant message has a non-text {key}")
                    merged[key] = before + value
            messages[-1] = merged
        else:
            messages.append(partial)
        body["messages"] = messages
        # vLLM's chat-template switches: continue the last assistant message.
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False

    def _resume_completion(self, body: dict[str, Any], resume: Resume) -> None:
        self._budget(body, ("max_tokens",), resume.events)
        body.pop("echo", None)
        text = resume.text.get("text", "")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            body["prompt"] = prompt + text
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            body["prompt"] = [prompt[0] + text]
        else:
            self._refuse("the prompt is not text (token ids, or several prompts)")

    def _encode(self, generation: Generation) -> bytes:
        """The request body as strict JSON in UTF-8. Raises ``InvalidRequest`` (400, with
        ``param``) for a body JSON cannot carry (NaN, Infinity, lone surrogates, too deep);
        for a resume, ``BackendUnavailable`` instead (the client's request was served before,
        so another candidate may continue it)."""
        body = self._body(generation)
        try:
            try:
                text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
                return text.encode()
            except UnicodeEncodeError:
                path = _find(body, lambda v: isinstance(v, str) and _has_surrogate(v))
                raise InvalidRequest(
                    f"'{path}' contains a lone UTF-16 surrogate (such as \\ud800), which is "
                    "not valid Unicode text; send well-formed UTF-8 text.",
                    param=path,
                ) from None
            except ValueError:
                path = _find(body, lambda v: isinstance(v, float) and not math.isfinite(v))
                raise InvalidRequest(
                    f"'{path}' is NaN or Infinity, which JSON does not allow; send a finite "
                    "number.",
                    param=path,
                ) from None
            except RecursionError:
                raise InvalidRequest(
                    "The request is nested too deeply to be forwarded; flatten it."
                ) from None
        except InvalidRequest as exc:
            if generation.resume is None:
                raise
            self._refuse(exc.message)

    @asynccontextmanager
    async def open(self, generation: Generation) -> AsyncIterator[AsyncIterator[bytes]]:
        content = self._encode(generation)  # refusals and bad input: before any slot or byte
        if self._slots.value == 0 and self._queued >= self._queue:
            raise BackendSaturated(
                f"{self._size} requests in flight and {self._queued} queued for model "
                f"'{self.model}'",
                retry_after=max(1.0, math.ceil(self._queued / self._size)),
            )
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        try:
            path = "/chat/completions" if generation.request.kind == "chat" else "/completions"
            request = self._client.build_request(
                "POST", self.url + path, content=content, headers=self._headers(generation)
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                if isinstance(exc, httpx.ReadTimeout):
                    self._log("did not answer", exc)
                    raise BackendUnavailable(
                        f"The upstream server for model '{self.model}' did not answer within "
                        f"{self._read_timeout:g} s.",
                        status=504,
                    ) from None
                self._log("could not be reached", exc)
                raise BackendUnavailable(
                    f"The upstream server for model '{self.model}' could not be reached "
                    f"({type(exc).__name__})."
                ) from None
            try:
                if response.status_code != 200:
                    raise await self._status_error(response)
                answer = self.policy.client(response.headers.multi_items())
                answer.pop("content-type", None)
                generation.answer_headers.update(answer)
                events = self._events(response, generation)
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

    def _headers(self, generation: Generation) -> httpx.Headers:
        """The request's headers: the client's that the policy allows, then ours over them.
        Values go as latin-1 bytes, the bytes the client sent (the policy dropped any that
        are not a field value)."""
        headers = self.policy.upstream(generation.headers)
        headers["content-type"] = "application/json"
        # A fault is passed on: a Quorum node or mock upstream applies it, others ignore it.
        if generation.fault:
            headers["x-quorum-fault"] = generation.fault.header()
        # Our own credentials are added by the httpx client: its default ``authorization``
        # (the api_key_env token) or its basic auth (the URL's user:password).
        return httpx.Headers(headers, encoding="latin-1")

    # --- the answer -------------------------------------------------------------------------

    async def _status_error(
        self, response: httpx.Response
    ) -> BackendSaturated | BackendUnavailable:
        """The exception for a non-200 answer: the model, the status, and a short sanitised
        excerpt of the upstream's ``error.message`` (read within ``read_timeout_s``)."""
        status = response.status_code
        data = b""
        with trio.move_on_after(self._read_timeout):
            try:
                data = await _read_capped(response)
            except httpx.HTTPError:
                pass
        excerpt = _excerpt(self._scrub(_error_message(data)))
        log.warning(
            "upstream %s for model %r answered %d: %s", self.url, self.model, status, excerpt
        )
        text = f"The upstream server for model '{self.model}' answered {status}"
        text += f": {excerpt}" if excerpt else "."
        if status == 429:
            return BackendSaturated(text)
        return BackendUnavailable(text, status=503 if status == 503 else 502)

    async def _events(
        self, response: httpx.Response, generation: Generation
    ) -> AsyncGenerator[bytes]:
        """The upstream's events as this node's stream: ``id``, ``created`` and ``model``
        become the stream's own (so the stream keeps one id if another node resumes it); for a
        resume, the upstream's role chunk is dropped (the client has had it). Raises
        ``BackendBroken`` for a break, a silence over ``read_timeout_s``, an error event, or
        an event that is not a well-formed chunk."""
        parser = SSEParser()
        head = {
            "id": generation.stream_id,
            "created": generation.created,
            "model": generation.request.model,
        }
        kind = generation.request.kind
        resuming = generation.resume is not None
        held = HeldBack.of(generation)
        pending = held.whitespace if held is not None else ""
        try:
            async with aclosing(response.aiter_raw()) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    for event in parser.feed(chunk):
                        if event.is_done:
                            yield DONE
                            return
                        obj = self._chunk(event.data, kind)
                        if resuming and kind == "chat" and _role_only(obj):
                            resuming = False
                            continue
                        if pending:
                            assert held is not None
                            pending, keep = _drop_held(obj, held.field, pending)
                            if not keep:
                                continue
                        obj.update(head)
                        try:
                            data = json.dumps(
                                obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")
                            ).encode()
                        except ValueError:  # a float out of range, or a lone surrogate
                            raise self._broken(
                                "sent a number out of range or text that is not valid Unicode"
                            ) from None
                        yield encode(data)
        except httpx.ReadTimeout as exc:
            self._log("went silent", exc)
            raise self._broken(f"sent nothing for {self._read_timeout:g} s") from None
        except httpx.HTTPError as exc:
            self._log("broke mid-stream", exc)
            raise self._broken(f"broke mid-stream ({type(exc).__name__})") from None
        except SSEProtocolError as exc:
            raise self._broken(f"sent a malformed event stream ({exc})") from None
        raise self._broken("ended the stream without [DONE]")

    def _chunk(self, data: str, kind: str) -> dict[str, Any]:
        """One event's data as a chunk object; ``BackendBroken`` if it is not one."""
        try:
            obj = json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise self._broken("sent an event that is not JSON") from None
        if not isinstance(obj, dict):
            raise self._broken(f"sent an event that is JSON {json_type_name(obj)}, not an object")
        if "error" in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else error
            excerpt = _excerpt(self._scrub(message if isinstance(message, str) else ""))
            raise self._broken("sent an error event" + (f": {excerpt}" if excerpt else ""))
        problem = _chunk_problem(obj, kind)
        if problem:
            raise self._broken(f"sent a malformed chunk: {problem}")
        return obj

    def _broken(self, what: str) -> BackendBroken:
        log.warning("upstream %s for model %r %s", self.url, self.model, what)
        return BackendBroken(f"The upstream server for model '{self.model}' {what}.")

    def _log(self, what: str, exc: BaseException) -> None:
        log.warning(
            "upstream %s for model %r %s: %s: %s",
            self.url,
            self.model,
            what,
            type(exc).__name__,
            self._scrub(str(exc)),
        )

    def _scrub(self, text: str) -> str:
        """``text`` with the credentials of the upstream's URL replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


# --- helpers ---------------------------------------------------------------------------------


async def _read_capped(response: httpx.Response) -> bytes:
    """At most ``ERROR_BODY_BYTES`` of ``response``'s body (the rest is not read)."""
    data = bytearray()
    async with aclosing(response.aiter_raw()) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            data += chunk
            if len(data) >= ERROR_BODY_BYTES:
                break
    return bytes(data[:ERROR_BODY_BYTES])


def _error_message(data: bytes) -> str:
    """``error.message`` (or a string ``error``) of an error body, or "" if it has none."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return ""
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else ""


def _excerpt(text: str) -> str:
    """``text`` as one short line: control and format characters (escapes, bidi overrides,
    surrogates) become spaces, runs of spaces one, at most ``EXCERPT_CHARS`` characters."""
    clean = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    clean = " ".join(clean.split())
    if len(clean) > EXCERPT_CHARS:
        clean = clean[: EXCERPT_CHARS - 1].rstrip() + "…"
    return clean


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _chunk_problem(obj: dict[str, Any], kind: str) -> str | None:
    """What makes ``obj`` unusable as a chunk for the layers above (the relay's accounting and
    ``quorum.wire.aggregate_*``), or None. Unknown fields are left alone."""
    if obj.get("usage") is not None and not isinstance(obj["usage"], dict):
        return "'usage' is not an object"
    choices = obj.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list):
        return "'choices' is not an array"
    for i, choice in enumerate(choices):
        where = f"choices[{i}]"
        if not isinstance(choice, dict):
            return f"'{where}' is not an object"
        if not _text(choice.get("finish_reason")):
            return f"'{where}.finish_reason' is not a string"
        if kind != "chat":
            if not _text(choice.get("text")):
                return f"'{where}.text' is not a string"
            continue
        delta = choice.get("delta")
        if delta is None:
            continue
        if not isinstance(delta, dict):
            return f"'{where}.delta' is not an object"
        for key in ("role", "content", "refusal", *_REASONING_FIELDS):
            if not _text(delta.get(key)):
                return f"'{where}.delta.{key}' is not a string"
        calls = delta.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list):
            return f"'{where}.delta.tool_calls' is not an array"
        for j, call in enumerate(calls):
            at = f"{where}.delta.tool_calls[{j}]"
            if not isinstance(call, dict):
                return f"'{at}' is not an object"
            index = call.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                return f"'{at}.index' is not an integer"
            if not _text(call.get("id")):
                return f"'{at}.id' is not a string"
            function = call.get("function")
            if function is None:
                continue
            if not isinstance(function, dict):
                return f"'{at}.function' is not an object"
            for key in ("name", "arguments"):
                if not _text(function.get(key)):
                    return f"'{at}.function.{key}' is not a string"
    return None


def _role_only(chunk: dict[str, Any]) -> bool:
    """A chunk whose only news is the assistant role (empty content); ``chunk`` has passed
    ``_chunk_problem``."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if any(k != "role" and v for k, v in delta.items()) or choice.get("finish_reason"):
            return False
    return bool(chunk.get("choices"))


def _drop_held(chunk: dict[str, Any], field: str, pending: str) -> tuple[str, bool]:
    """Drop the start of ``pending`` (held-back whitespace not yet seen again) from the
    ``field`` text of ``chunk``'s first choice, in place. Returns what is still pending ("" once
    the text went another way, or the chunk carries anything else first) and whether the chunk
    is still worth sending (False when it carried nothing but held whitespace); ``chunk`` has
    passed ``_chunk_problem``."""
    choices = chunk.get("choices") or []
    if not choices:
        return pending, True  # a usage chunk: nothing to compare
    choice = choices[0]
    holder = choice.get("delta") if field == "content" else choice
    text = holder.get(field) if isinstance(holder, dict) else None
    if not text:
        return "", True
    same = 0
    while same < min(len(text), len(pending)) and text[same] == pending[same]:
        same += 1
    holder[field] = text[same:]
    rest = pending[same:] if same == len(text) else ""
    if holder[field]:
        return rest, True
    news = (
        choice.get("finish_reason")
        or chunk.get("usage")
        or any(value for key, value in holder.items() if key not in (field, "role", "index"))
    )
    return rest, bool(news)


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _find(body: Any, bad: Callable[[Any], bool]) -> str:
    """The dotted path (``messages[0].content``) of the first value or key in ``body`` for
    which ``bad`` is true, or "" if none; iterative, so any depth is safe. The path is made
    printable (surrogates escaped) and at most ``EXCERPT_CHARS`` long: it goes into messages."""
    stack: list[tuple[str, Any]] = [("", body)]
    found = ""
    while stack:
        path, value = stack.pop()
        if bad(value):
            found = path
            break
        if isinstance(value, dict):
            items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
            bad_key = next((p for (p, _), k in zip(items, value, strict=True) if bad(k)), None)
            if bad_key is not None:
                found = bad_key
                break
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(value)]))
    found = found.encode("utf-8", "backslashreplace").decode()
    return found if len(found) <= EXCERPT_CHARS else found[: EXCERPT_CHARS - 1] + "…"
