"""The governance rules on the request path, without sockets: the stream guard filters what
the client will see across chunk boundaries and ends a blocked stream with one
content_filter finish, the usage the client asked for and one [DONE]; whole answers are
filtered the same way; input is blocked or redacted and re-parsed; each firing is counted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from quorum.errors import InvalidRequest, UpstreamFailed
from quorum.gateway.enforce import Enforcer, StreamGuard
from quorum.gateway.policy import Policies, Policy
from quorum.sse import SSEParser, SSEProtocolError
from quorum.wire import (
    ChatChunkEncoder,
    CompletionChunkEncoder,
    parse_chat_request,
    parse_completion_request,
)

CHAT = parse_chat_request(
    {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": True}
)
CHAT_USAGE = parse_chat_request(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "hi there"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
COMPLETION = parse_completion_request({"model": "m", "prompt": "hi", "stream": True})


def policy(**fields: Any) -> Policy:
    return Policy.model_validate(fields)


def enforcer(*policies: Policy) -> tuple[Enforcer, list[tuple[str, str, str]]]:
    fired: list[tuple[str, str, str]] = []
    return Enforcer(Policies(policies), lambda *a: fired.append(a)), fired


BLOCK_WORD = policy(name="word", regex="case place", max_match_chars=10, on="output")


def run(guard: StreamGuard, events: list[bytes]) -> tuple[list[Any], bytes]:
    """Feed whole events through the guard: the client's events (parsed; [DONE] as the
    string) and bytes."""
    out = b""
    for raw in events:
        (event,) = SSEParser().feed(raw)
        out += guard.event(raw, event.data)
        if guard.ended:
            break
    parsed = [e.data if e.is_done else json.loads(e.data) for e in SSEParser().feed(out)]
    return parsed, out


def content(events: list[Any]) -> str:
    return "".join(
        c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e["choices"]
    )


def chat_stream(pieces: list[str], *, usage: bool = False) -> list[bytes]:
    enc = ChatChunkEncoder("id-1", "m", 1)
    events = [enc.role(), *(enc.content(p) for p in pieces), enc.finish("stop")]
    if usage:
        events.append(enc.usage(3, len(pieces)))
    return [*events, b"data: [DONE]\n\n"]


def finish_reasons(events: list[Any]) -> list[str]:
    return [
        c["finish_reason"]
        for e in events
        if isinstance(e, dict)
        for c in e["choices"]
        if c.get("finish_reason")
    ]


def test_a_match_split_over_two_deltas_is_blocked_before_any_of_it_leaves() -> None:
    e, fired = enforcer(BLOCK_WORD)
    pieces = ["Place", " also", " new", " case", " place", " into"]
    events, raw = run(StreamGuard(e, CHAT), chat_stream(pieces))
    assert content(events) == "Place also new "
    assert b"case" not in raw
    assert finish_reasons(events) == ["content_filter"]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert events[-2]["choices"][0]["delta"] == {}
    assert fired == [("word", "output", "block")]


def test_a_block_sends_the_usage_chunk_the_client_asked_for_estimated() -> None:
    e, _ = enforcer(BLOCK_WORD)
    pieces = ["Place", " also", " new", " case", " place", " into"]
    guard = StreamGuard(e, CHAT_USAGE)
    events, _ = run(guard, chat_stream(pieces, usage=True))
    assert guard.ended
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == []
    assert usage["prompt_tokens"] == 3 + 2  # count_prompt_tokens: 3 a message + 2 words
    assert usage["completion_tokens"] == 5  # chunks that carried text, the blocking one too
    assert usage["total_tokens"] == 10
    assert finish_reasons(events) == ["content_filter"]


def test_without_a_match_the_text_is_whole_and_held_text_goes_before_the_finish() -> None:
    e, fired = enforcer(BLOCK_WORD)
    pieces = ["Place", " also", " new", " case"]
    events, _ = run(StreamGuard(e, CHAT_USAGE), chat_stream(pieces, usage=True))
    assert content(events) == "Place also new case"
    assert finish_reasons(events) == ["stop"]
    finish = next(i for i, ev in enumerate(events) if finish_reasons([ev]))
    assert content(events[:finish]) == "Place also new case"  # released before the finish
    assert events[finish]["choices"][0]["delta"] == {}
    assert events[-2]["usage"]["completion_tokens"] == 4  # the serving node's, passed on
    assert events.count("[DONE]") == 1 and fired == []


def test_unchanged_events_pass_as_their_bytes() -> None:
    e, _ = enforcer(policy(name="z", regex="zebra", max_match_chars=5, on="output"))
    stream = chat_stream(["Place", " also", " new"], usage=True)
    _, raw = run(StreamGuard(e, CHAT_USAGE), stream)
    assert raw == b"".join(stream)


def test_redaction_on_output_replaces_the_match_across_deltas() -> None:
    e, fired = enforcer(
        policy(name="mail", detect="email", action="redact", on="output"),
    )
    pieces = ["write", " to", " bob", "@exa", "mple", ".com", " now"]
    events, raw = run(StreamGuard(e, CHAT), chat_stream(pieces))
    assert content(events) == "write to [REDACTED:email] now"
    assert b"bob" not in raw and b"example" not in raw
    assert finish_reasons(events) == ["stop"]
    assert fired == [("mail", "output", "redact")]


def test_a_block_found_at_the_finish_keeps_the_serving_nodes_usage_and_done() -> None:
    e, _ = enforcer(policy(name="ip", detect="ipv4", on="output"))
    pieces = ["ping", " 10.0", ".0.1"]  # decided only at the end of the text
    guard = StreamGuard(e, CHAT_USAGE)
    events, raw = run(guard, chat_stream(pieces, usage=True))
    assert content(events) == "ping "
    assert b"10.0" not in raw
    assert finish_reasons(events) == ["content_filter"]
    assert events[-2]["usage"]["completion_tokens"] == 3  # the serving node's own
    assert events.count("[DONE]") == 1 and not guard.ended


def test_done_without_a_finish_reason_releases_the_held_text() -> None:
    e, _ = enforcer(BLOCK_WORD)
    enc = ChatChunkEncoder("id-1", "m", 1)
    stream = [enc.role(), enc.content("new"), enc.content(" case"), b"data: [DONE]\n\n"]
    events, _ = run(StreamGuard(e, CHAT), stream)
    assert content(events) == "new case" and events[-1] == "[DONE]"


def test_tool_call_arguments_are_filtered_per_tool_call() -> None:
    e, _ = enforcer(policy(name="secret", regex="hunter2", max_match_chars=7, on="output"))
    enc = ChatChunkEncoder("id-1", "m", 1)
    stream = [
        enc.role(),
        enc.tool_call_start(0, "call_a", "f"),
        enc.tool_call_arguments(0, '{"p": "hun'),
        enc.tool_call_start(1, "call_b", "g"),
        enc.tool_call_arguments(1, '{"q": "ok"}'),
        enc.tool_call_arguments(0, 'ter2"}'),
        enc.finish("tool_calls"),
        b"data: [DONE]\n\n",
    ]
    events, raw = run(StreamGuard(e, CHAT), stream)
    args: dict[int, str] = {}
    for ev in events[:-1]:
        for call in ev["choices"][0]["delta"].get("tool_calls") or ():
            args[call["index"]] = args.get(call["index"], "") + call["function"]["arguments"]
    assert args == {0: '{"p": "', 1: '{"q": "ok"}'}
    assert b"hun" not in raw.replace(b"chat.completion.chunk", b"")
    assert finish_reasons(events) == ["content_filter"]


def test_reasoning_is_filtered_only_under_include_reasoning() -> None:
    enc = ChatChunkEncoder("id-1", "m", 1)
    stream = [
        enc.role(),
        enc.reasoning("reasoning_content", "case"),
        enc.reasoning("reasoning_content", " place"),
        enc.content("fine"),
        enc.finish("stop"),
        b"data: [DONE]\n\n",
    ]
    e, _ = enforcer(BLOCK_WORD)
    _, raw = run(StreamGuard(e, CHAT), stream)
    assert raw == b"".join(stream)
    e, _ = enforcer(BLOCK_WORD.model_copy(update={"include_reasoning": True}))
    events, raw = run(StreamGuard(e, CHAT), stream)
    assert b"case" not in raw and finish_reasons(events) == ["content_filter"]


def test_completions_text_is_filtered() -> None:
    e, _ = enforcer(BLOCK_WORD)
    enc = CompletionChunkEncoder("id-1", "m", 1)
    stream = [
        enc.text(" new"),
        enc.text(" case"),
        enc.text(" place"),
        enc.text("", "length"),
        b"data: [DONE]\n\n",
    ]
    events, raw = run(StreamGuard(e, COMPLETION), stream)
    assert "".join(c["text"] for ev in events[:-1] for c in ev["choices"]) == " new "
    assert b"case" not in raw
    assert finish_reasons(events) == ["content_filter"]
    assert events[-2]["object"] == "text_completion"


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        "[1]",
        '{"choices": 5}',
        '{"choices": [{"delta": {"content": 5}}]}',
        '{"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "x"}}]}}]}',
        '{"choices": [{"delta": {"tool_calls": "x"}}]}',
        '{"choices": [{"index": "0", "delta": {}}]}',
        '{"choices": [{"text": 7}]}',
    ],
)
def test_a_chunk_the_guard_cannot_read_is_a_broken_stream(data: str) -> None:
    e, _ = enforcer(BLOCK_WORD)
    request = COMPLETION if '"text"' in data else CHAT
    with pytest.raises(SSEProtocolError):
        StreamGuard(e, request).event(f"data: {data}\n\n".encode(), data)


def test_the_guard_continues_over_a_resume_as_one_text() -> None:
    # The relay hands it the original text whatever node produced it: a split at any delta
    # boundary gives the same client text.
    e, _ = enforcer(BLOCK_WORD)
    pieces = ["Place", " also", " new", " case", " place", " into"]
    for cut in range(1, len(pieces)):
        guard = StreamGuard(e, CHAT)
        first, _ = run(guard, chat_stream(pieces)[: cut + 1])
        rest = [ChatChunkEncoder("id-1", "m", 1).content(p) for p in pieces[cut:]]
        second, _ = run(guard, [*rest, ChatChunkEncoder("id-1", "m", 1).finish("stop")])
        assert content(first + second) == "Place also new "


# --- whole answers -------------------------------------------------------------------------


def answer(message: dict[str, Any]) -> bytes:
    return json.dumps(
        {"id": "x", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    ).encode()


def test_a_whole_answer_is_cut_before_the_match_with_content_filter() -> None:
    e, fired = enforcer(BLOCK_WORD)
    out = json.loads(e.filter_answer(CHAT, answer({"content": "new case place into"})))
    assert out["choices"][0]["message"]["content"] == "new "
    assert out["choices"][0]["finish_reason"] == "content_filter"
    assert fired == [("word", "output", "block")]


def test_a_whole_answer_redacted_and_an_untouched_one_kept_as_bytes() -> None:
    e, fired = enforcer(policy(name="mail", detect="email", action="redact"))
    out = json.loads(e.filter_answer(CHAT, answer({"content": "mail a@b.com or c@d.org"})))
    assert out["choices"][0]["message"]["content"] == "mail [REDACTED:email] or [REDACTED:email]"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert fired == [("mail", "output", "redact")] * 2
    body = answer({"content": "nothing here"})
    assert e.filter_answer(CHAT, body) is body


def test_a_whole_answer_blocked_in_content_drops_later_tool_calls() -> None:
    e, _ = enforcer(BLOCK_WORD)
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    out = json.loads(e.filter_answer(CHAT, answer({"content": "case place", "tool_calls": calls})))
    message = out["choices"][0]["message"]
    assert message["content"] == "" and "tool_calls" not in message


def test_a_whole_completion_is_filtered() -> None:
    e, _ = enforcer(BLOCK_WORD)
    body = json.dumps({"choices": [{"index": 0, "text": " a case place", "finish_reason": "stop"}]})
    out = json.loads(e.filter_answer(COMPLETION, body.encode()))
    assert out["choices"][0] == {"index": 0, "text": " a ", "finish_reason": "content_filter"}


def test_an_answer_that_is_not_json_is_a_502_not_a_crash() -> None:
    e, _ = enforcer(BLOCK_WORD)
    for body in (b"garbage", b"[]", b'{"choices": [1]}'):
        with pytest.raises(UpstreamFailed):
            e.filter_answer(CHAT, body)


# --- input ---------------------------------------------------------------------------------


def test_input_block_is_counted_and_names_the_policy() -> None:
    e, fired = enforcer(policy(name="ip", detect="ipv4", on="input"))
    request = parse_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "1.2.3.4"}]}
    )
    with pytest.raises(InvalidRequest) as caught:
        e.screen(request, b"{}")
    assert caught.value.code == "content_policy_violation"
    assert fired == [("ip", "input", "block")]


def test_input_redaction_gives_a_request_and_body_that_agree() -> None:
    e, fired = enforcer(policy(name="mail", detect="email", action="redact", on="input"))
    raw = {"model": "m", "prompt": "to a@b.com", "max_tokens": 3}
    body = json.dumps(raw).encode()
    request, new_body = e.screen(parse_completion_request(raw), body)
    assert request.prompt == "to [REDACTED:email]"
    assert json.loads(new_body) == {**raw, "prompt": "to [REDACTED:email]"}
    assert request.raw == json.loads(new_body)
    assert fired == [("mail", "input", "redact")]
    clean = parse_completion_request({"model": "m", "prompt": "nothing"})
    assert e.screen(clean, b"same") == (clean, b"same")


def test_output_only_policies_do_not_screen_input() -> None:
    e, _ = enforcer(BLOCK_WORD)
    request = parse_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "case place"}]}
    )
    assert e.screen(request, b"b") == (request, b"b")
    assert not e.screens_input and e.filters_output
