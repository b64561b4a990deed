"""The entry node's per-event bookkeeping (``StreamRelay._account``), events per second.

    python benchmarks/relay_bookkeeping.py [--seconds 0.5] [--repeats 5]

Each event a relay forwards is read for what a resume needs (events sent, text per delta
field, tool-call deltas, [DONE], the usage chunk's tokens, error events). The streams read
here are realistic: the mock backend's chat stream (role, reasoning deltas, content deltas of
1-4 tokens, some of them non-ASCII, a tool call's argument fragments, finish, usage, [DONE]),
encoded by ``quorum.wire.ChatChunkEncoder``; and the same stream as a vLLM upstream sends it
and ``quorum.backends.upstream`` re-encodes it (extra fields: ``stop_reason``, ``token_ids``,
``reasoning_content: null``, ``usage: null`` on every chunk). Events arrive as ``bytes`` from
a local backend and as ``str`` from a peer (the hop's SSE parser decodes them).

Rows: the bookkeeping as it was (``json.loads`` and dict lookups), the same with the parse
swapped for orjson and for msgspec's untyped decoder, and ``StreamRelay._account`` as it is
in this tree. Best of ``--repeats`` runs of ``--seconds`` each.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quorum.routing.relay import StreamRelay, usage_tokens
from quorum.sse import SSEProtocolError
from quorum.wire import ChatChunkEncoder

WORDS = ["the", "a", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then",
         "naïve", "café", "日本語", "🙂", "x", "(", ");", "\n", "\"quoted\""]  # fmt: skip


def _pieces(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        yield "".join(" " + rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def mock_stream(rng: random.Random) -> list[bytes]:
    """One chat stream's data fields as the mock backend encodes them."""
    enc = ChatChunkEncoder("chatcmpl-3f9a1c2e8b7d4e6f", "mock-chat", 1_700_000_000)
    events = [enc.role()]
    events += [enc.reasoning("reasoning_content", p) for p in _pieces(rng, 40)]
    events += [enc.content(p) for p in _pieces(rng, 150)]
    events.append(enc.tool_call_start(0, "call_8f3b2a", "get_weather"))
    events += [enc.tool_call_arguments(0, json.dumps({"city": p})[:9]) for p in _pieces(rng, 20)]
    events += [enc.finish("tool_calls"), enc.usage(120, 212), b"data: [DONE]\n\n"]
    return [e[len(b"data: ") : -2] for e in events]


def vllm_stream(rng: random.Random) -> list[bytes]:
    """The same stream as vLLM's chunks, re-encoded the way the upstream backend does."""
    head = {
        "id": "chatcmpl-3f9a1c2e8b7d4e6f",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "Qwen/Qwen3-8B",
        "prompt_token_ids": None,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": None,
        }
        obj = head | {"choices": [choice], "usage": None}
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"reasoning_content": p, "content": None}) for p in _pieces(rng, 40)]
    events += [chunk({"content": p, "reasoning_content": None}) for p in _pieces(rng, 150)]
    call = {"index": 0, "id": "call_8f3b2a", "type": "function"}
    events.append(chunk({"tool_calls": [call | {"function": {"name": "get_weather"}}]}))
    events += [
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": p[:9]}}]})
        for p in _pieces(rng, 20)
    ]
    events.append(chunk({}, "tool_calls"))
    usage = {"prompt_tokens": 120, "total_tokens": 332, "completion_tokens": 212}
    last = head | {"choices": [], "usage": usage}
    events.append(json.dumps(last, separators=(",", ":")).encode())
    return [*events, b"[DONE]"]


# --- the bookkeeping as it was, with the parse as a parameter -----------------------------------


class DictBookkeeping:
    """``StreamRelay._account`` before msgspec: a parse to a dict, then dict lookups."""

    def __init__(self, loads: Callable[[Any], Any]) -> None:
        self.loads = loads
        self.done = False
        self.events_sent = 0
        self.text: dict[str, list[str]] = {}
        self.tool_calls = 0
        self.tokens: int | None = None
        self.hide_usage = False

    def _choices(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        choices = obj.get("choices")
        if choices is None:
            return []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise SSEProtocolError("an event's choices are not a list of objects")
        return choices

    def account(self, data: str | bytes) -> bool | None:
        if data == "[DONE]" or data == b"[DONE]":
            self.done = True
            return True
        try:
            obj = self.loads(data)
        except ValueError:
            raise SSEProtocolError("an event is not JSON") from None
        if not isinstance(obj, dict):
            raise SSEProtocolError("an event is not an object")
        if "error" in obj:
            return False
        if obj.get("usage") is not None:
            self.tokens = usage_tokens(obj["usage"])
            if self.hide_usage and not self._choices(obj):
                return None
        self.events_sent += 1
        for choice in self._choices(obj):
            delta = choice.get("delta")
            if delta is None:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    self.text.setdefault("text", []).append(text)
                continue
            if not isinstance(delta, dict):
                raise SSEProtocolError("an event's delta is not an object")
            for key, value in delta.items():
                if key != "role" and isinstance(value, str) and value:
                    self.text.setdefault(key, []).append(value)
            if delta.get("tool_calls"):
                self.tool_calls += 1
        return True


def quorum_relay() -> StreamRelay:
    """A ``StreamRelay`` with only what ``_account`` reads and writes."""
    relay = StreamRelay.__new__(StreamRelay)
    relay.job = SimpleNamespace(hide_usage=False)  # type: ignore[assignment]
    relay.done, relay.events_sent, relay.tool_calls, relay.tokens = False, 0, 0, None
    relay.text = {}
    return relay


def candidates() -> dict[str, Callable[[], Callable[[Any], Any]]]:
    """Name -> a factory of a fresh per-stream ``account(data)``."""
    out: dict[str, Callable[[], Callable[[Any], Any]]] = {
        "json.loads + dicts (before)": lambda: DictBookkeeping(json.loads).account,
    }
    try:
        import orjson

        out["orjson.loads + dicts"] = lambda: DictBookkeeping(orjson.loads).account
    except ImportError:
        print("(orjson not installed: its row is skipped)")
    try:
        import msgspec

        untyped = msgspec.json.Decoder()
        out["msgspec untyped + dicts"] = lambda: DictBookkeeping(untyped.decode).account
    except ImportError:
        print("(msgspec not installed: its row is skipped)")

    def ours() -> Callable[[Any], Any]:
        relay = quorum_relay()
        return lambda data: relay._account(b"", data)

    out["StreamRelay._account (this tree)"] = ours
    return out


def rate(make: Callable[[], Callable[[Any], Any]], stream: list[Any], seconds: float) -> float:
    """Events per second over whole streams, for about ``seconds``."""
    events = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        account = make()
        for data in stream:
            account(data)
        events += len(stream)
    return events / elapsed


def main(seconds: float, repeats: int) -> None:
    rng = random.Random(13)
    streams = {"mock": mock_stream(rng), "vLLM": vllm_stream(rng)}
    kinds = {
        f"{name} {form}": stream if form == "bytes" else [e.decode() for e in stream]
        for name, stream in streams.items()
        for form in ("bytes", "str")
    }
    rows = candidates()
    sizes = {name: sum(map(len, s)) / len(s) for name, s in streams.items()}
    print(
        f"events per second (best of {repeats} x {seconds:g} s); mean event size: "
        + ", ".join(f"{n} {b:.0f} B" for n, b in sizes.items())
    )
    print(f"{'':36}" + "".join(f"{k:>14}" for k in kinds))
    base: dict[str, float] = {}
    for name, make in rows.items():
        figures = []
        for kind, stream in kinds.items():
            best = max(rate(make, stream, seconds) for _ in range(repeats))
            base.setdefault(kind, best)
            figures.append(f"{best / 1000:>8.0f}k x{best / base[kind]:.1f}")
        print(f"{name:36}" + "".join(f"{f:>14}" for f in figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.seconds, args.repeats)
