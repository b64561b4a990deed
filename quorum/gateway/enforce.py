"""The governance rules on the request path, at the entry node (issue #14).

``quorum.gateway.policy`` says what matches; this module applies it to requests and answers,
with no I/O (the dispatcher calls in, the relay hands it events):

- ``Enforcer.screen``: a client's request through the input policies, before it is routed
  (a ``block`` is a 400 ``content_policy_violation``; a ``redact`` gives a new request and
  body, re-encoded, so that what is forwarded and what is parsed agree).
- ``StreamGuard``: one stream's chunks through the output policies, after the relay has
  counted them for a resume (so a resume continues the original text and the filters just
  go on). Text fields: ``delta.content`` and ``delta.refusal``, each tool call's
  ``delta.tool_calls[i].function.arguments`` (by choice index and tool-call index),
  ``delta.reasoning_content`` and ``delta.reasoning`` only under a policy with
  ``include_reasoning``; ``choices[].text`` for ``/v1/completions``.
- ``Enforcer.filter_answer``: a non-streamed answer through the same filters (the whole
  text fed at once, then ``finish``).

A block ends the answer with ``finish_reason: "content_filter"``, a normal end of stream
that nothing retries. Requests another node forwarded are never screened again: only the
entry node holds an ``Enforcer`` to its client's requests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Final

from quorum.backends.mock import count_prompt_tokens
from quorum.errors import UpstreamFailed
from quorum.gateway.policy import (
    FilterStep,
    OutputFilter,
    Policies,
    Policy,
    PolicyViolation,
    TextKind,
)
from quorum.sse import SSEProtocolError
from quorum.wire import Request, parse_chat_request, parse_completion_request

__all__ = ["CONTENT_FILTER", "Enforcer", "Record", "StreamGuard"]

CONTENT_FILTER: Final = "content_filter"
"""The ``finish_reason`` of an answer a policy blocked."""

Record = Callable[[str, str, str], None]
"""Counts one firing: ``(policy name, on, action)``, ``on`` "input" or "output", ``action``
"block" or "redact" (``Metrics.policy_action``)."""

Json = dict[str, Any]

_CONTENT_KEYS: Final = ("content", "refusal")
_REASONING_KEYS: Final = ("reasoning_content", "reasoning")
_TOOL_CALLS: Final = "tool_calls"
_DONE: Final = b"data: [DONE]\n\n"


class Enforcer:
    """The configured ``policies`` on this node's client requests; ``record`` counts each
    firing. ``screens_input`` / ``filters_output``: whether any policy applies in that
    direction (when not, the path does not call in at all)."""

    __slots__ = ("_reasoning", "filters_output", "policies", "record", "screens_input")

    def __init__(self, policies: Policies, record: Record) -> None:
        self.policies = policies
        self.record = record
        self.screens_input = any(p.on in ("input", "both") for p in policies.policies)
        output = [p for p in policies.policies if p.on in ("output", "both")]
        self.filters_output = bool(output)
        self._reasoning = any(p.include_reasoning for p in output)

    def screen(self, request: Request, body: bytes) -> tuple[Request, bytes]:
        """``request`` (parsed from ``body``) through the input policies: the same pair when
        nothing matched, else the redacted request and its re-encoded body (JSON, ASCII).
        Raises ``PolicyViolation`` (400 ``content_policy_violation``) when a policy blocks."""
        if not self.screens_input:
            return request, body
        redacted: list[str] = []
        try:
            if request.kind == "chat":
                raw = self.policies.screen_chat(request.raw, redacted=redacted)
            else:
                raw = self.policies.screen_completion(request.raw, redacted=redacted)
        except PolicyViolation as exc:
            self.record(exc.policy, "input", "block")
            raise
        if not redacted:
            return request, body
        for name in redacted:
            self.record(name, "input", "redact")
        parse = parse_chat_request if request.kind == "chat" else parse_completion_request
        return parse(raw), json.dumps(raw).encode()

    def stream_guard(self, request: Request) -> StreamGuard | None:
        """A new ``StreamGuard`` for one streamed answer to ``request``; None when no
        policy applies to output."""
        if not self.filters_output:
            return None
        return StreamGuard(self, request)

    def output_filter(self, kind: TextKind) -> OutputFilter:
        return self.policies.output_filter(kind)

    def text_kind(self, key: str) -> TextKind | None:
        """The kind of a message or delta field the output policies read, None for others."""
        if key in _CONTENT_KEYS:
            return TextKind.CONTENT
        if key in _REASONING_KEYS and self._reasoning:
            return TextKind.REASONING
        return None

    def note(self, policies: Iterable[Policy], block: Policy | None) -> None:
        """Count an output step: its redactions, then its block."""
        for p in policies:
            self.record(p.name, "output", "redact")
        if block is not None:
            self.record(block.name, "output", "block")

    def filter_answer(self, request: Request, body: bytes) -> bytes:
        """A non-streamed answer (``chat.completion`` or ``text_completion`` JSON) through
        the output policies: each choice's ``message.content``, ``refusal``, reasoning
        (with ``include_reasoning``) and tool calls' ``function.arguments`` in that order,
        or its ``text``. A block cuts that field before the match, empties the fields after
        it (drops later tool calls) and sets the choice's ``finish_reason`` to
        "content_filter". Returns the body re-encoded, or ``body`` itself when nothing
        changed. Raises ``UpstreamFailed`` (502) for an answer it cannot read."""
        if not self.filters_output:
            return body
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise UpstreamFailed("The serving node's answer is not JSON.") from None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise UpstreamFailed("The serving node's answer has no list of choices.")
        changed = False
        for choice in choices:
            changed |= self._filter_choice(request, choice)
        return _dumps(answer).encode() if changed else body

    def _filter_choice(self, request: Request, choice: Json) -> bool:
        """Filter one choice of a whole answer in place; True when it changed."""
        # (holder, key, kind): the fields in the order a stream would have sent them
        fields: list[tuple[Json, str, TextKind]] = []
        if request.kind == "chat":
            message = choice.get("message")
            if not isinstance(message, dict):
                return False
            for key in (*_REASONING_KEYS, *_CONTENT_KEYS):
                kind = self.text_kind(key)
                if kind is not None and isinstance(message.get(key), str):
                    fields.append((message, key, kind))
            calls = message.get(_TOOL_CALLS)
            if isinstance(calls, list):
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        fields.append((fn, "arguments", TextKind.TOOL_ARGUMENTS))
        elif isinstance(choice.get("text"), str):
            fields.append((choice, "text", TextKind.CONTENT))
        changed = False
        for n, (holder, key, kind) in enumerate(fields):
            text = holder[key]
            f = self.output_filter(kind)
            a = f.feed(text)
            b = f.finish() if a.block is None else None
            block = a.block or (b.block if b is not None else None)
            self.note((*a.redacted, *(b.redacted if b is not None else ())), block)
            out = a.text + (b.text if b is not None else "")
            if out != text:
                holder[key] = out
                changed = True
            if block is not None:
                self._cut_after(choice, fields[n + 1 :])
                choice["finish_reason"] = CONTENT_FILTER
                return True
        return changed

    @staticmethod
    def _cut_after(choice: Json, later: list[tuple[Json, str, TextKind]]) -> None:
        """After a block: the later text fields emptied, the later tool calls dropped."""
        message = choice.get("message")
        dropped = {id(holder) for holder, _, kind in later if kind is TextKind.TOOL_ARGUMENTS}
        for holder, key, kind in later:
            if kind is not TextKind.TOOL_ARGUMENTS:
                holder[key] = ""
        if dropped and isinstance(message, dict):
            kept = [c for c in message[_TOOL_CALLS] if id(c.get("function")) not in dropped]
            if kept:
                message[_TOOL_CALLS] = kept
            else:
                del message[_TOOL_CALLS]


class StreamGuard:
    """The output policies on one stream, event by event (see the module's docstring).

    ``event(raw, data)`` takes one event the relay has counted and relays (a chunk or
    ``[DONE]``; never an error event) and returns the bytes for the client in its place:
    ``raw`` itself when the event holds no text the filters changed, else re-encoded
    ``data: {...}\\n\\n`` events, possibly none (a chunk whose text is all held back, with
    nothing else in it, is dropped). Per text field, at most the filter's holdback is held;
    when a choice's ``finish_reason`` arrives, the held text goes out in a chunk before the
    finish chunk (``[DONE]`` without one releases it too).

    A block: the text before the match, then a chunk with an empty delta and
    ``finish_reason: "content_filter"``, then (when the client asked for
    ``stream_options.include_usage`` and the serving node's usage has not gone out) a usage
    chunk estimated as Quorum estimates a stream's tokens (``count_prompt_tokens``, one
    completion token per chunk that carried text), then ``data: [DONE]``; ``ended`` is
    then True and the caller stops reading and closes the source (the generation is
    cancelled). A block found only by ``finish`` (the choice was ending anyway) changes
    that choice's ``finish_reason`` and lets the serving node's usage and ``[DONE]``
    through; later chunks with choices are dropped.

    Raises ``SSEProtocolError`` for a chunk whose text fields it cannot read (not JSON, a
    text that is not a string, tool calls that are not objects with an integer
    ``index``): the relay's path for a broken stream.
    """

    __slots__ = ("_closing", "_e", "_filters", "_head", "_request", "_tokens", "_usage", "ended")

    def __init__(self, enforcer: Enforcer, request: Request) -> None:
        self._e = enforcer
        self._request = request
        # (choice index, field, tool-call index) -> filter, in the order the fields began
        self._filters: dict[tuple[int, str, int], OutputFilter] = {}
        self._head: Json | None = None  # the last chunk's fields but choices and usage
        self._tokens = 0  # chunks that carried text: the completion's estimate
        self._usage = False  # a usage chunk went out
        self._closing = False
        self.ended = False

    # --- events ----------------------------------------------------------------------------

    def event(self, raw: bytes, data: str | bytes) -> bytes:
        """The client's bytes in place of one relayed event (see the class docstring)."""
        if self.ended:
            return b""
        if data == "[DONE]" or data == b"[DONE]":
            return self._done(raw)
        chunk = _read(data)
        choices = chunk.get("choices")
        if choices is None:
            choices = []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise SSEProtocolError("an event's choices are not a list of objects")
        self._head = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        if chunk.get("usage") is not None:
            self._usage = True
        if self._closing:
            return raw if not choices else b""
        if not choices:
            return raw
        chat = self._request.kind == "chat"
        out_choices: list[Json] = []
        released: list[Json] = []  # the text finish() let out, per finishing choice
        finishing: list[Json] = []  # the finish chunk's choices
        changed = carried = False
        block: Policy | None = None
        for choice in choices:
            index = choice.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool):
                raise SSEProtocolError("a choice's index is not an integer")
            new, fed, block, alters = (
                self._chat_choice(index, choice) if chat else self._text_choice(index, choice)
            )
            carried |= fed
            changed |= alters
            out_choices.append(new)
            if block is not None:
                break
            reason = choice.get("finish_reason")
            if reason is not None:
                rest, block = self._finish(index)
                if rest is not None:
                    released.append(rest)
                if rest is not None or block is not None:
                    new["finish_reason"] = None
                    finishing.append(
                        self._finish_choice(index, reason if block is None else CONTENT_FILTER)
                    )
                    changed = True
                if block is not None:
                    self._closing = True
                    break
        if carried:
            self._tokens += 1
        if block is not None and not self._closing:
            return self._cut(chunk, out_choices)
        if not changed:
            return raw
        events = [self._encode(chunk, out_choices, keep_usage=True)]
        if released:
            events.append(self._encode(chunk, released))
        if finishing:
            events.append(self._encode(chunk, finishing))
        return b"".join(events)

    def _chat_choice(self, index: int, choice: Json) -> tuple[Json, bool, Policy | None, bool]:
        """One chat choice through the filters: ``(new choice, carried text, block,
        changed)``; after a block, the delta's later fields are dropped."""
        delta = choice.get("delta")
        if delta is None:
            return choice, False, None, False
        if not isinstance(delta, dict):
            raise SSEProtocolError("an event's delta is not an object")
        new_delta: Json = {}
        carried = changed = False
        block: Policy | None = None
        for key, value in delta.items():
            kind = self._e.text_kind(key)
            if kind is not None and value is not None and value != "":
                if not isinstance(value, str):
                    raise SSEProtocolError(f"an event's delta.{key} is not a string")
                carried = True
                step = self._feed(index, key, 0, kind, value)
                new_delta[key] = step.text
                changed |= step.text != value
                block = step.block
            elif key == _TOOL_CALLS and value:
                calls, fed, alters, block = self._tool_calls(index, value)
                new_delta[key] = calls
                carried |= fed
                changed |= alters
            else:
                new_delta[key] = value
            if block is not None:
                changed = True
                break
        if not changed:
            return choice, carried, None, False
        return {**choice, "delta": new_delta}, carried, block, True

    def _tool_calls(
        self, index: int, calls: object
    ) -> tuple[list[Json], bool, bool, Policy | None]:
        if not isinstance(calls, list):
            raise SSEProtocolError("an event's delta.tool_calls is not a list")
        out: list[Json] = []
        carried = changed = False
        for call in calls:
            if not isinstance(call, dict):
                raise SSEProtocolError("a tool call delta is not an object")
            k = call.get("index")
            if not isinstance(k, int) or isinstance(k, bool):
                raise SSEProtocolError("a tool call delta has no integer index")
            fn = call.get("function")
            args = fn.get("arguments") if isinstance(fn, dict) else None
            if fn is not None and not isinstance(fn, dict):
                raise SSEProtocolError("a tool call delta's function is not an object")
            if args is None or args == "":
                out.append(call)
                continue
            if not isinstance(args, str):
                raise SSEProtocolError("a tool call delta's arguments are not a string")
            carried = True
            step = self._feed(index, _TOOL_CALLS, k, TextKind.TOOL_ARGUMENTS, args)
            assert isinstance(fn, dict)
            out.append({**call, "function": {**fn, "arguments": step.text}})
            changed |= step.text != args
            if step.block is not None:
                return out, carried, True, step.block
        return out, carried, changed, None

    def _text_choice(self, index: int, choice: Json) -> tuple[Json, bool, Policy | None, bool]:
        """One ``/v1/completions`` choice through the filter (as ``_chat_choice``)."""
        text = choice.get("text")
        if text is None or text == "":
            return choice, False, None, False
        if not isinstance(text, str):
            raise SSEProtocolError("an event's text is not a string")
        step = self._feed(index, "text", 0, TextKind.CONTENT, text)
        if step.text == text and step.block is None:
            return choice, True, None, False
        return {**choice, "text": step.text}, True, step.block, True

    def _feed(self, index: int, key: str, call: int, kind: TextKind, text: str) -> FilterStep:
        f = self._filters.get((index, key, call))
        if f is None:
            f = self._filters[(index, key, call)] = self._e.output_filter(kind)
        step = f.feed(text)
        self._e.note(step.redacted, step.block)
        return step

    def _finish(self, index: int) -> tuple[Json | None, Policy | None]:
        """Finish choice ``index``'s filters: the choice carrying the text they release
        (None when they release none) and the policy that blocked, if one did."""
        keys = [key for key in self._filters if key[0] == index]
        texts: Json = {}
        calls: list[Json] = []
        block: Policy | None = None
        for key in keys:
            step = self._filters.pop(key).finish()
            self._e.note(step.redacted, step.block)
            if step.text:
                if key[1] == _TOOL_CALLS:
                    calls.append({"index": key[2], "function": {"arguments": step.text}})
                else:
                    texts[key[1]] = step.text
            if step.block is not None:
                block = step.block
                for rest in keys[keys.index(key) + 1 :]:
                    self._filters.pop(rest, None)
                break
        if not texts and not calls:
            return None, block
        if self._request.kind != "chat":
            return {
                "index": index,
                "text": texts["text"],
                "logprobs": None,
                "finish_reason": None,
            }, block
        if calls:
            texts[_TOOL_CALLS] = calls
        return {"index": index, "delta": texts, "logprobs": None, "finish_reason": None}, block

    def _finish_choice(self, index: int, reason: str) -> Json:
        if self._request.kind == "chat":
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def _done(self, raw: bytes) -> bytes:
        """``[DONE]`` from the serving node: release what no ``finish_reason`` released."""
        if self._closing or not self._filters or self._head is None:
            return raw
        head = self._head
        released: list[Json] = []
        for index in sorted({key[0] for key in self._filters}):
            rest, block = self._finish(index)
            if rest is not None:
                released.append(rest)
            if block is not None:
                return self._cut(head, released)
        events = [self._encode(head, [c]) for c in released]
        return b"".join([*events, raw])

    def _cut(self, chunk: Json, out_choices: list[Json]) -> bytes:
        """The end of a blocked stream: ``out_choices`` (the text before the match), the
        content_filter finish, the usage chunk if the client asked, ``[DONE]``."""
        self.ended = True
        self._filters.clear()
        events: list[bytes] = []
        for choice in out_choices:
            choice["finish_reason"] = None
        kept = [c for c in out_choices if not _empty(c)]
        if kept:
            events.append(self._encode(chunk, kept))
        indexes = sorted({c.get("index", 0) for c in out_choices}) or [0]
        events.append(
            self._encode(chunk, [self._finish_choice(i, CONTENT_FILTER) for i in indexes])
        )
        if self._request.include_usage and not self._usage:
            prompt = count_prompt_tokens(self._request)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": self._tokens,
                "total_tokens": prompt + self._tokens,
            }
            events.append(_event({**self._head_of(chunk), "choices": [], "usage": usage}))
        events.append(_DONE)
        return b"".join(events)

    def _head_of(self, chunk: Json) -> Json:
        return {k: v for k, v in chunk.items() if k not in ("choices", "usage")}

    def _encode(self, chunk: Json, choices: list[Json], *, keep_usage: bool = False) -> bytes:
        """``chunk``'s head with the ``choices`` that are not empty (and its ``usage``, when
        ``keep_usage``) as one event; b"" when that would carry nothing."""
        kept = [c for c in choices if not _empty(c)]
        usage = chunk.get("usage") if keep_usage else None
        if not kept and usage is None:
            return b""
        obj = {**self._head_of(chunk), "choices": kept}
        if keep_usage and "usage" in chunk:
            obj["usage"] = usage
        return _event(obj)


def _empty(choice: Json) -> bool:
    """A choice that tells the client nothing: no finish_reason, no logprobs, and no
    delta field but empty texts and empty argument fragments."""
    if choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
        return False
    if "delta" not in choice:
        return not choice.get("text")
    delta = choice.get("delta") or {}
    for key, value in delta.items():
        if key == _TOOL_CALLS:
            for call in value or ():
                fn = call.get("function") or {}
                if set(call) - {"index", "function"} or set(fn) - {"arguments"}:
                    return False
                if fn.get("arguments"):
                    return False
        elif key in _CONTENT_KEYS or key in _REASONING_KEYS:
            if value:
                return False
        else:
            return False
    return True


def _read(data: str | bytes) -> Json:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise SSEProtocolError("an event is not JSON") from None
    if not isinstance(obj, dict):
        raise SSEProtocolError("an event is not a JSON object")
    return obj


def _dumps(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate the serving node escaped: escape it again
        text = json.dumps(obj, separators=(",", ":"))
    return text


def _event(obj: Json) -> bytes:
    return ("data: " + _dumps(obj) + "\n\n").encode()
