"""Server-side conversations: ``POST /c1/chat``, ``GET`` and ``DELETE /c1/conversations/{id}``
(issue #14; the shape comes from NVIDIA's DGX gateway).

``POST /c1/chat`` (also ``/c1/chat/completions``, so a stock OpenAI SDK with base URL
``.../c1`` can use it) takes the body of ``/v1/chat/completions`` and answers the same JSON or
SSE, but the node keeps the history:

- without ``x-conversation-id`` a new conversation is made (id: ``conv_`` + 24 random
  characters + the creating node, ``quorum.conversations.ids``) and its id is the answer's
  ``x-conversation-id`` header, sent with the head;
- with it, the stored messages are put before the request's ``messages`` (the client sends
  only the new turn), and the answer is asked for the whole conversation;
- when the answer has completed (a ``finish_reason`` and ``[DONE]`` for a stream), the turn's
  messages and the assistant's message (``content``, ``reasoning_content`` kept apart,
  ``tool_calls``) are appended, before ``[DONE]`` reaches the client, so its next turn sees
  them. A stream the client leaves, or that ends in an error event, stores nothing of the
  turn. When the store refuses the append, the client gets an error event before ``[DONE]``.

Where a conversation lives: with PostgreSQL (``[conversations] store = "postgres"``) every
node reads and writes every conversation. With SQLite it lives on the node that created it
(named in its id); another node forwards ``/c1`` requests for it there over the signed hop
(``x-quorum-forwarded``, ``x-quorum-caller``), and answers 503 while that node is not a live
member. The owner does the rest as an entry node would: choosing a backend anywhere in the
cluster, failover, resume.

Ownership: under ``[auth]`` a conversation belongs to the API key that created it; another
key gets 404 ``conversation_not_found``, as for an id that never existed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AsyncExitStack, aclosing
from typing import Any

import trio

from quorum.conversations import ConversationStore, new_id, owner_of
from quorum.conversations.store import not_found
from quorum.errors import ApiError, Unavailable
from quorum.gateway.policy import PolicyViolation
from quorum.routing.dispatch import Dispatcher, Reply
from quorum.routing.headers import (
    CALLER,
    CONVERSATION_ID,
    FAULT,
    FORWARDED,
    INTERNAL,
    NODE,
    PIN,
    REQUEST_ID,
    SIGNATURE,
    SINGLE_FLIGHT,
    request_id,
)
from quorum.routing.hop import HopError
from quorum.routing.membership import Member, MemberState
from quorum.routing.relay import StreamBody, stream_error
from quorum.sse import SSEParser, SSEProtocolError
from quorum.wire import error_event, parse_chat_request, parse_json_body

__all__ = ["C1_CHAT", "C1_CHAT_PATHS", "Conversations", "TurnRecorder"]

log = logging.getLogger(__name__)

C1_CHAT = "/c1/chat"
# the same, where an OpenAI SDK whose base URL is ``http://node/c1`` sends its chat requests
C1_CHAT_PATHS = frozenset({C1_CHAT, "/c1/chat/completions"})
CHAT = "/v1/chat/completions"

# Client headers a forward to the owning node carries (besides [headers] to_upstream's).
_CARRIED = (REQUEST_ID, PIN, SINGLE_FLIGHT, CONVERSATION_ID)
# Answer headers of the owning node that reach the client.
_RETURNED = ("content-type", "cache-control", CONVERSATION_ID, NODE, REQUEST_ID, "retry-after")


class TurnRecorder:
    """The assistant's message of one answer, put together from its chunks (choice 0).

    ``add(chunk)`` takes each decoded chunk of a stream; ``message()`` is then the message
    to store: ``{"role": "assistant", "content": str | None, "reasoning_content"?: str,
    "tool_calls"?: [{"id", "type", "function": {"name", "arguments"}}]}``, the reasoning
    under the field name the backend used (``reasoning_content`` or ``reasoning``).
    ``finished``: a ``finish_reason`` was seen and no error event; only then is a turn
    stored.
    """

    def __init__(self) -> None:
        self.role = "assistant"
        self.text: dict[str, list[str]] = {}
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.failed = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None and not self.failed

    def add(self, chunk: object) -> None:
        """Take one chunk (the JSON object of a ``data:`` event)."""
        if not isinstance(chunk, dict):
            self.failed = True
            return
        if "error" in chunk:
            self.failed = True
            return
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            if isinstance(delta.get("role"), str):
                self.role = delta["role"]
            for field in ("content", "reasoning_content", "reasoning"):
                value = delta.get(field)
                if isinstance(value, str):
                    self.text.setdefault(field, []).append(value)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    self._tool_call(call)

    def _tool_call(self, delta: dict[str, Any]) -> None:
        index = delta.get("index", 0)
        if not isinstance(index, int) or not 0 <= index < 128:
            return
        call = self.tool_calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        for key in ("id", "type"):
            if isinstance(delta.get(key), str):
                call[key] = delta[key]
        function = delta.get("function")
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    call["function"][key] += function[key]

    def message(self) -> dict[str, Any]:
        content = self.text.get("content")
        message: dict[str, Any] = {
            "role": self.role,
            "content": "".join(content) if content is not None else None,
        }
        for field in ("reasoning_content", "reasoning"):
            if field in self.text:
                message[field] = "".join(self.text[field])
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message


def _answer_message(body: bytes) -> dict[str, Any] | None:
    """The assistant's message of a whole (non-streamed) answer, None when it has none."""
    try:
        answer = json.loads(body)
        message = answer["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    return {k: v for k, v in message.items() if v is not None or k == "content"}


class Conversations:
    """The ``/c1`` routes of one node.

    ``dispatcher``: this node's (routes the answer, signs and checks the hop). ``store``:
    where conversations live, or None while the node has not opened it (and for a node
    without ``[conversations]``: then /c1 answers 404). ``shared``: the store is reached by
    every node (PostgreSQL); False (SQLite) forwards requests for another node's
    conversations to it. Errors are ``ApiError``: 404 ``conversation_not_found``, 503 when
    the owner or the store cannot be reached, and what ``/v1/chat/completions`` answers.
    """

    def __init__(
        self, dispatcher: Dispatcher, store: ConversationStore | None = None, *, shared: bool
    ) -> None:
        self.d = dispatcher
        self.store = store
        self.shared = shared

    def _store(self) -> ConversationStore:
        if self.store is None:
            raise ApiError(
                f"Node {self.d.name} keeps no conversations: /c1 needs a [conversations] "
                "table in its config.",
                code="conversations_off",
                status=404,
            )
        return self.store

    def _remote_owner(self, conversation_id: str, forwarded: bool) -> Member | None:
        """The live member that holds ``conversation_id`` when it is not this node (SQLite);
        None when this node does. Raises 404 for an id that is not one, 503 when the owner
        is not a live member now."""
        owner = owner_of(conversation_id)
        if owner is None:
            raise not_found()
        if self.shared or owner == self.d.name:
            return None
        if forwarded:  # a forward is never forwarded again
            raise not_found()
        for member in self.d.members():
            if member.name == owner and member.state not in (MemberState.DEAD, MemberState.LEFT):
                return member
        raise Unavailable(
            f"This conversation is kept by node {owner}, which is not a live member of the "
            'cluster now; try again when it is back ([conversations] store = "postgres" '
            "lets every node continue every conversation).",
            code="conversation_owner_unavailable",
            retry_after=5.0,
        )

    # --- POST /c1/chat ---------------------------------------------------------------------

    async def chat(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        caller: str | None = None,
        admit: Any = None,
        allow_debug: bool = False,
    ) -> Reply:
        """Answer one ``POST /c1/chat`` (``headers``: lower-cased). ``caller``: the API key's
        name (None without ``[auth]``); ``admit``: called with the parsed request to check
        the caller's allowlist and quotas (raises 403/404/429). Raises ``ApiError``."""
        store = self._store()
        raw = parse_json_body(body)
        request = parse_chat_request(raw)
        forwarded = self.d.is_forward("POST", C1_CHAT, body, headers)
        if forwarded:
            caller = headers.get(CALLER) or None
            # the entry node admitted it and checked its fault; this node serves it anew
            headers = {k: v for k, v in headers.items() if k not in INTERNAL and k != FAULT}
        elif admit is not None:
            admit(request, headers)
        conversation_id = headers.get(CONVERSATION_ID)
        history: list[dict[str, Any]] = []
        if conversation_id is not None:
            owner = self._remote_owner(conversation_id, forwarded)
            if owner is not None:
                return await self._forward_chat(owner, body, headers, caller)
            conversation = await store.get(conversation_id, caller)
            if conversation is None:
                raise not_found()
            history = conversation.messages
        turn = list(raw["messages"])
        enforcer = self.d.enforcer
        if enforcer is not None and enforcer.screens_input:
            try:  # stored as it was sent on: redacted, and a blocked turn never stored
                turn = enforcer.policies.screen_chat({"messages": turn})["messages"]
            except PolicyViolation as exc:
                enforcer.record(exc.policy, "input", "block")
                raise
        store.limits.encode(turn)
        store.limits.check_count(len(history), len(turn) + 1)  # + the assistant's message
        merged = {**raw, "messages": [*history, *turn]}
        merged_body = json.dumps(merged).encode()
        made = None  # a conversation made here: deleted unless its id reaches the client
        if conversation_id is None:
            made = conversation_id = new_id(self.d.name)
            # before any token: a key over max_conversations is refused for free
            await store.create(made, caller, int(time.time()))
        try:
            reply = await self.d.handle(
                parse_chat_request(merged),
                merged_body,
                CHAT,
                headers,
                caller=caller,
                count_usage=caller is not None and self.d.on_tokens is not None,
                allow_debug=allow_debug,
            )
            if reply.status != 200:
                if made is not None:
                    await self._forget(store, made, caller)
                return reply  # the client's own error, as the serving node said it
            reply.headers[CONVERSATION_ID] = conversation_id
            if isinstance(reply.body, bytes):
                message = _answer_message(reply.body)
                if message is not None:
                    await store.append(conversation_id, caller, [*turn, message])
                return reply
            reply.body = await StreamBody.start(
                self._recorded(reply.body, store, conversation_id, caller, turn)
            )
            return reply
        except BaseException:
            if made is not None:
                await self._forget(store, made, caller)
            raise

    async def _forget(
        self, store: ConversationStore, conversation_id: str, caller: str | None
    ) -> None:
        """Delete a conversation this request made whose id never reached the client (it
        could neither use nor delete it, and it would count toward ``max_conversations``)."""
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await store.delete(conversation_id, caller)
            except (ApiError, trio.ClosedResourceError) as exc:
                log.warning("could not delete unused conversation %s: %r", conversation_id, exc)

    async def _recorded(
        self,
        chunks: AsyncIterator[bytes],
        store: ConversationStore,
        conversation_id: str,
        caller: str | None,
        turn: list[dict[str, Any]],
    ) -> AsyncGenerator[bytes]:
        """``chunks`` as they are, reading the assistant's message from them; the turn is
        appended before ``[DONE]`` is sent (an error event instead when the store refuses)."""
        parser = SSEParser(max_event_bytes=self.d.config.max_answer_bytes)
        recorder = TurnRecorder()
        async with aclosing(chunks) as source:  # type: ignore[type-var]
            async for chunk in source:
                try:
                    events = parser.feed(chunk)
                except SSEProtocolError:
                    recorder.failed = True
                    yield chunk
                    continue
                out: list[bytes] = []
                for event in events:
                    if event.data == "[DONE]":
                        if out:
                            yield b"".join(out)
                            out = []
                        if recorder.finished:
                            try:
                                await store.append(
                                    conversation_id, caller, [*turn, recorder.message()]
                                )
                            except ApiError as exc:
                                log.warning(
                                    "conversation %s: turn not stored: %s", conversation_id, exc
                                )
                                yield error_event(exc.body())
                    else:
                        try:
                            recorder.add(json.loads(event.data))
                        except (ValueError, RecursionError):
                            recorder.failed = True
                    out.append(event.raw)
                if out:
                    yield b"".join(out)

    async def _forward_chat(
        self, owner: Member, body: bytes, headers: Mapping[str, str], caller: str | None
    ) -> Reply:
        """Hand a /c1 request to the node that keeps its conversation; its answer is
        relayed as it comes (no resume: only that node can continue the conversation)."""
        stack = AsyncExitStack()
        try:
            response = await self._hop(stack, owner, "POST", C1_CHAT, body, headers, caller)
        except BaseException:
            await stack.aclose()
            raise
        answer_headers = {k: v for k in _RETURNED if (v := response.headers.get(k)) is not None}
        answer_headers |= self.d.passed_back(response.headers)
        if response.status != 200 or "text/event-stream" not in response.headers.get(
            "content-type", ""
        ):
            try:
                with trio.fail_after(self.d.config.unary_timeout_s):
                    data = await response.read(self.d.config.max_answer_bytes)
            except (HopError, trio.TooSlowError) as exc:
                raise Unavailable(f"Node {owner.name} broke while answering: {exc!r}") from None
            finally:
                await stack.aclose()
            return Reply(response.status, answer_headers, data)
        stream = await StreamBody.start(self._relayed(stack, response.body(), owner.name))
        return Reply(200, answer_headers, stream)

    async def _relayed(
        self, stack: AsyncExitStack, chunks: AsyncGenerator[bytes], owner: str
    ) -> AsyncGenerator[bytes]:
        limit = self.d.config.inter_token_timeout_s
        try:
            async with aclosing(chunks):
                while True:
                    with trio.move_on_after(limit) as waited:
                        try:
                            chunk = await anext(chunks)
                        except StopAsyncIteration:
                            return
                    if waited.cancelled_caught:
                        raise HopError(f"no chunk in {limit} s")
                    yield chunk
        except HopError as exc:
            log.warning("conversation stream from %s broke: %s", owner, exc)
            yield stream_error(
                f"The stream broke on node {owner}, which keeps this conversation ({exc})."
            )
        finally:
            with trio.CancelScope(shield=True):
                await stack.aclose()

    async def _hop(
        self,
        stack: AsyncExitStack,
        owner: Member,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        caller: str | None,
    ) -> Any:
        """Send a signed request to ``owner``; the response, its head received."""
        out = {k: v for k in _CARRIED if (v := headers.get(k)) is not None}
        out |= self.d.headers.upstream(headers)
        out |= {"content-type": "application/json", FORWARDED: self.d.name}
        out.setdefault(REQUEST_ID, request_id(headers))
        if caller is not None:
            out[CALLER] = caller
        out[SIGNATURE] = self.d.signer.sign(method, path, body, out)
        try:
            with trio.fail_after(self.d.config.ttft_timeout_s * self.d.config.max_attempts):
                return await stack.enter_async_context(
                    self.d.hop.post(owner.url, path, body, out, method=method)
                )
        except (HopError, trio.TooSlowError) as exc:
            raise Unavailable(
                f"Node {owner.name}, which keeps this conversation, could not be reached: {exc!r}",
                code="conversation_owner_unavailable",
                retry_after=5.0,
            ) from None

    # --- GET and DELETE /c1/conversations/{id} ----------------------------------------------

    async def read(
        self, method: str, conversation_id: str, headers: Mapping[str, str], caller: str | None
    ) -> tuple[int, dict[str, Any]]:
        """``GET`` (``{"id", "created", "messages"}``) or ``DELETE`` (``{"id", "object":
        "conversation.deleted", "deleted": true}``) of one conversation: (status, JSON).
        Raises 404 ``conversation_not_found``, 503."""
        store = self._store()
        path = f"/c1/conversations/{conversation_id}"
        forwarded = self.d.is_forward(method, path, b"", headers)
        if forwarded:
            caller = headers.get(CALLER) or None
        owner = self._remote_owner(conversation_id, forwarded)
        if owner is not None:
            async with AsyncExitStack() as stack:
                response = await self._hop(stack, owner, method, path, b"", headers, caller)
                try:
                    with trio.fail_after(self.d.config.unary_timeout_s):
                        data = await response.read(self.d.config.max_answer_bytes)
                    return response.status, json.loads(data)
                except (HopError, trio.TooSlowError, ValueError) as exc:
                    raise Unavailable(
                        f"Node {owner.name} broke while answering: {exc!r}",
                        code="conversation_owner_unavailable",
                    ) from None
        if method == "DELETE":
            if not await store.delete(conversation_id, caller):
                raise not_found()
            return 200, {"id": conversation_id, "object": "conversation.deleted", "deleted": True}
        conversation = await store.get(conversation_id, caller)
        if conversation is None:
            raise not_found()
        return 200, conversation.as_json()
