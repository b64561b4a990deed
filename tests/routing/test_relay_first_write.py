"""What a relayed stream's first write carries: the held role chunk and the first token,
nothing read after it; and a first token that breaks the stream takes the path of any
later break (the held role chunk goes out, then resume or an error event)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import trio

from quorum.routing.relay import Event, StreamRelay


def event(chunk: dict[str, Any] | str) -> Event:
    data = chunk if isinstance(chunk, str) else json.dumps(chunk)
    return (f"data: {data}\n\n".encode(), data)


def delta(**fields: Any) -> Event:
    return event({"id": "c", "choices": [{"index": 0, "delta": fields, "finish_reason": None}]})


ROLE = delta(role="assistant", content="")
DONE = event("[DONE]")


class Metric:
    def labels(self, *_: str) -> Metric:
        return self

    def observe(self, _: float) -> None:
        pass

    def inc(self) -> None:
        pass


class Attempts:
    count = 0

    async def run(self, attempt: Callable[[Any, int], Awaitable[Any]]) -> Any:
        self.count += 1
        return await attempt(SimpleNamespace(name="n2"), self.count)


def relay_over(*sources: list[list[Event]]) -> tuple[StreamRelay, list[str]]:
    """A relay whose candidates send ``sources`` (the batches of each, in the order they
    are opened); and the nodes whose breaker heard a failure."""
    failures: list[str] = []
    opened = iter(sources)

    @asynccontextmanager
    async def open_source(*_: Any) -> AsyncIterator[AsyncGenerator[list[Event]]]:
        batches = next(opened)

        async def source() -> AsyncGenerator[list[Event]]:
            for batch in batches:
                yield batch

        async with aclosing(source()) as batches_:
            yield batches_

    dispatcher = SimpleNamespace(
        attempts=lambda *_: Attempts(),
        config=SimpleNamespace(ttft_timeout_s=5.0, inter_token_timeout_s=5.0),
        metrics=SimpleNamespace(ttft=Metric(), resumes=Metric()),
        open_source=open_source,
        breakers=SimpleNamespace(
            get=lambda name: SimpleNamespace(record_failure=lambda _: failures.append(name))
        ),
        relaying=1,
        count_tokens=lambda *_: None,
    )
    job = SimpleNamespace(
        request=SimpleNamespace(model="m"), request_id="r", fault=None, pin=None, hide_usage=False
    )
    return StreamRelay(dispatcher, job, [], None), failures  # type: ignore[arg-type]


async def writes(relay: StreamRelay) -> list[bytes]:
    first = await relay.start()
    return [chunk async for chunk in relay.body(first)]


async def test_the_first_write_carries_the_role_and_the_first_token_only() -> None:
    one, two, three = delta(content="Hel"), delta(content="lo"), delta(content="!")
    relay, _ = relay_over([[ROLE], [one, two], [three, DONE]])
    out = await writes(relay)
    assert out == [ROLE[0] + one[0], two[0], three[0] + DONE[0]]
    assert relay.events_sent == 4 and "".join(relay.text["content"]) == "Hello!"


async def test_a_first_token_that_breaks_the_stream_sends_the_role_then_takes_the_break_path() -> (
    None
):
    # kind() sees a token in the first choice; the accounting then finds the second broken
    bad = event({"id": "c", "choices": [{"index": 0, "text": "x"}, {"index": 1, "delta": "?"}]})
    relay, failures = relay_over([[ROLE, bad, DONE]])
    resumed: list[int] = []

    async def no_resume() -> bool:
        resumed.append(relay.events_sent)
        return False

    relay._resume = no_resume  # type: ignore[method-assign]
    with trio.fail_after(5):
        out = await writes(relay)
    assert out[0] == ROLE[0]
    assert b"stream_broken" in out[1] and out[1].endswith(b"data: [DONE]\n\n")
    assert failures == ["n2"] and resumed == [2]


async def test_a_resume_after_a_broken_first_token_drops_the_rest_of_its_batch() -> None:
    """What the broken node sent after the token is not the resuming node's: the client
    gets the role chunk, then only what the resume point asked of the next node."""
    bad = event({"id": "c", "choices": [{"index": 0, "text": "x"}, {"index": 1, "delta": "?"}]})
    left, resumed = delta(content="A1"), delta(content="B1")
    relay, failures = relay_over([[ROLE, bad, left, DONE]], [[resumed, DONE]])
    with trio.fail_after(5):
        out = await writes(relay)
    assert out == [ROLE[0], resumed[0] + DONE[0]]
    assert failures == ["n2"]
    assert "".join(relay.text["content"]) == "B1" and relay.events_sent == 3
