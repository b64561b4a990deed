"""Relaying a stream at the entry node, and resuming it elsewhere when it breaks.

``StreamRelay`` holds the role chunk back until the first token (so a failover before it is
invisible), then relays the serving node's events byte for byte, cut only at event
boundaries. For each event it keeps what a resume needs (DESIGN.md, "Failure semantics"):
how many events the client has, the text of every delta field, and how many tool-call
deltas it has had. When the stream breaks (reset, EOF without ``[DONE]``, an error event, an
event that is not a chunk object, no chunk within ``inter_token_timeout_s``) it resumes on
another node through the same attempt loop as the first try (``quorum.routing.attempts``);
when nobody can continue, the client gets one error event and ``[DONE]``.

With output policies (``quorum.gateway.enforce.StreamGuard``), each event goes through the
guard after it is counted: the bookkeeping stays on the events as the serving node produced
them, so a resume continues the original text and the guard just goes on. A block ends the
stream there (``finish_reason: "content_filter"``, ``[DONE]``): the source is closed, not
drained, which cancels the generation, and nothing resumes it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
import trio
from msgspec import UNSET

from quorum.backends.base import Resume
from quorum.errors import ApiError, BackendBroken
from quorum.routing.attempts import (
    AttemptFailed,
    AttemptsExhausted,
    exhausted,
    final_error,
)
from quorum.routing.hop import HopError
from quorum.routing.membership import Member
from quorum.sse import DONE, SSEParser, SSEProtocolError
from quorum.wire import error_event

if TYPE_CHECKING:
    from quorum.gateway.enforce import StreamGuard
    from quorum.routing.dispatch import Dispatcher, Job

__all__ = [
    "Choice",
    "Chunk",
    "Event",
    "Reply",
    "StreamBody",
    "StreamRelay",
    "decode",
    "kind",
    "local_events",
    "read_chunk",
    "remote_events",
    "stream_error",
    "usage_tokens",
    "whole_events",
]

log = logging.getLogger(__name__)

# One event as relayed: its exact bytes and its data field.
Event = tuple[bytes, str | bytes]


@dataclass(slots=True)
class Reply:
    """What the HTTP layer sends: ``status``, ``headers``, and ``body`` — bytes, or an async
    iterator of bytes for a stream. Whoever takes a stream's ``body`` closes it (``aclose``)
    whatever happens, even when it never sends a byte of it: a stream holds a generation,
    a hop, the relay's count and its tokens' accounting until it is closed."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes] = field(default=b"")


class StreamBody:
    """A stream's bytes from an async generator that has already been run to its first
    chunk (``await StreamBody.start(gen)``), so that ``aclose`` runs the generator's
    ``finally`` even when nobody iterated it: Python runs nothing of a generator closed
    before its first step, which would leave its generation running, its hop open and its
    counts unreleased until the garbage collector came by.

    Every streamed ``Reply.body`` a node makes is one of these (or a ``Follower``, which
    closes alike)."""

    __slots__ = ("_first", "_gen")

    def __init__(self, first: bytes | None, gen: AsyncGenerator[bytes]) -> None:
        self._first = first
        self._gen = gen

    @classmethod
    async def start(cls, gen: AsyncGenerator[bytes]) -> StreamBody:
        """``gen`` run to its first chunk. If that raises, ``gen`` is closed and the error
        raised."""
        try:
            first = await anext(gen)
        except StopAsyncIteration:
            return cls(None, gen)
        except BaseException:
            with trio.CancelScope(shield=True):
                await gen.aclose()
            raise
        return cls(first, gen)

    @property
    def ready(self) -> bool:
        """Whether a first chunk with bytes in it is in hand (the next ``__anext__`` returns
        them at once): an empty one would leave a head held for it unsent."""
        return bool(self._first)

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._gen)

    async def aclose(self) -> None:
        self._first = None
        await self._gen.aclose()


def stream_error(message: str) -> bytes:
    """The end of a stream that broke for good: one error event, then ``[DONE]``."""
    body = ApiError(message, code="stream_broken", status=502).body()
    return error_event(body) + DONE


class StreamRelay:
    """One streamed request at the entry node: attempts until the first token, then the
    relay, then resumes on other nodes if the serving one breaks. ``body(first)`` is the
    client's stream; it owns one count of ``dispatcher.relaying`` from ``start()`` on.
    ``guard``: the output policies' filter for this stream, None without output policies
    (the events then go out byte for byte)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        job: Job,
        order: list[Member],
        guard: StreamGuard | None = None,
    ) -> None:
        self.d = dispatcher
        self.job = job
        self.request = job.request
        self.request_id = job.request_id
        self.order = order
        self.tried: list[str] = []
        self.attempts = 0
        self.node = ""
        self.events_sent = 0
        self.text: dict[str, list[str]] = {}
        self.tool_calls = 0  # tool-call deltas relayed: an upstream cannot continue those
        self.tokens: int | None = None  # prompt + completion, from the usage chunk
        self.answer_headers: dict[str, str] = {}  # the serving answer's, for the client
        self.done = False
        self.guard = guard
        self.cut = False  # the guard ended the stream: closed, not drained nor resumed
        self._stack = AsyncExitStack()
        self._source: AsyncIterator[list[Event]] | None = None
        self._pending: list[Event] = []  # events read but not relayed yet
        self._broken: SSEProtocolError | None = None  # the first token broke the stream
        self._started = trio.current_time()

    async def _open(self, member: Member, resume: Resume | None, number: int) -> None:
        await self._close()
        self._pending = []  # what the last source sent is not this one's
        self._stack = AsyncExitStack()
        fault = self.job.fault if number == 1 and resume is None else None
        self.answer_headers = {}
        self._source = await self._stack.enter_async_context(
            self.d.open_source(member, self.job, fault, resume, self.answer_headers)
        )

    async def _close(self) -> None:
        if self._source is None:  # nothing open: the stack is empty
            return
        with trio.CancelScope(shield=True):
            await self._stack.aclose()
        self._source = None

    async def start(self) -> bytes:
        """Try candidates until one yields its first token; return the bytes to send first
        (the held role chunk and that token). Raises ``ApiError`` when every attempt failed
        (or the serving node answered the client's own error)."""
        attempts = self.d.attempts(self.job, self.order, self.tried)
        try:
            held = await attempts.run(self._first_token)
        except AttemptFailed as exc:  # final: the client's own error, as the node said it
            await self._close()
            raise final_error(exc) from None
        except AttemptsExhausted as exc:
            await self._close()
            raise exhausted(self.request.model, exc.failures) from None
        except BaseException:
            await self._close()
            raise
        finally:
            self.attempts = attempts.count
        self.d.metrics.ttft.labels(self.request.model).observe(trio.current_time() - self._started)
        out: list[bytes] = []
        *roles, (raw, data) = held
        out.extend(raw for raw, data in roles if self._account(raw, data))
        try:  # the first token, as _relay takes every later event
            relayed, raw = self._take(raw, data)
        except SSEProtocolError as exc:
            self._broken = exc  # body() sends what is held, then takes its path for a break
            return b"".join(out)
        if relayed and raw:
            out.append(raw)
        return b"".join(out)

    def _take(self, raw: bytes, data: str | bytes) -> tuple[bool | None, bytes]:
        """One event counted (``_account``'s verdict) and, when it is relayed, the bytes
        the output policies put in its place; ``done`` and ``cut`` set when they ended
        the stream. Raises ``SSEProtocolError`` as ``_account`` and the guard do."""
        relayed = self._account(raw, data)
        guard = self.guard
        if relayed and guard is not None:
            raw = guard.event(raw, data)  # after the count: the guard takes counted events
            if guard.ended:
                self.done = self.cut = True
        return relayed, raw

    async def _first_token(self, member: Member, number: int) -> list[Event]:
        """Open ``member`` and read up to its first token; the events held until then, that
        token last (what came with it in the same batch is left in ``_pending``)."""
        ttft = self.d.config.ttft_timeout_s
        try:
            with trio.fail_after(ttft):
                await self._open(member, None, number)
                assert self._source is not None
                held: list[Event] = []
                token = False
                while not token:
                    try:
                        batch = await anext(self._source)
                    except StopAsyncIteration:
                        raise AttemptFailed(f"node {member.name} ended before a token") from None
                    for i, event in enumerate(batch):
                        what = kind(event[1])
                        if what == "error":
                            raise AttemptFailed(f"node {member.name} sent an error event")
                        held.append(event)
                        if what != "role":
                            # the first token: sent in the same write as what was held,
                            # before the rest of its batch is read (by _relay)
                            self._pending = batch[i + 1 :]
                            token = True
                            break
        except trio.TooSlowError:
            await self._close()
            raise AttemptFailed(
                f"node {member.name} gave no first token in {ttft} s", status=504
            ) from None
        except (BackendBroken, HopError, SSEProtocolError) as exc:
            await self._close()
            raise AttemptFailed(f"node {member.name} broke: {exc!r}") from None
        except AttemptFailed:
            await self._close()
            raise
        self.node = member.name
        return held

    def _account(self, raw: bytes, data: str | bytes) -> bool | None:
        """Count an event as delivered; False for an error event (never relayed here), None
        for a usage chunk the client did not ask for (counted, not relayed). Raises
        ``SSEProtocolError`` for an event that is not a chunk object."""
        if data == "[DONE]" or data == b"[DONE]":
            self.done = True
            return True
        chunk = read_chunk(data)
        if chunk.error is not UNSET:
            return False
        if chunk.usage is not None:
            self.tokens = usage_tokens(chunk.usage)
            if self.job.hide_usage and not _choices(chunk):
                return None
        self.events_sent += 1
        for choice in _choices(chunk):
            delta = choice.delta
            if delta is None:
                text = choice.text
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

    def resume_point(self) -> Resume:
        """What the client has: events, text per delta field, tool-call deltas."""
        text = {k: "".join(v) for k, v in self.text.items()}
        return Resume(self.events_sent, text, tool_calls=self.tool_calls)

    async def body(self, first: bytes) -> AsyncGenerator[bytes]:
        """The client's stream: ``first``, the rest, resumes; always ends with ``[DONE]``."""
        try:
            yield first
            while not self.done:
                try:
                    if self._broken is not None:
                        broken, self._broken = self._broken, None
                        raise broken
                    async with aclosing(self._relay()) as relay:
                        async for out in relay:
                            yield out
                    if self.done:
                        break
                    raise BackendBroken(f"node {self.node} ended the stream without [DONE]")
                except (BackendBroken, HopError, SSEProtocolError, trio.TooSlowError) as exc:
                    log.warning("%s: stream from %s broke: %r", self.request_id, self.node, exc)
                    if self.job.pin is None:
                        self.d.breakers.get(self.node).record_failure(trio.current_time())
                    await self._close()
                    resumed = await self._resume()
                    self.d.metrics.resumes.labels("resumed" if resumed else "failed").inc()
                    if not resumed:
                        yield stream_error(
                            f"The stream broke on node {self.node} and no other node could "
                            f"continue it ({exc})."
                        )
                        return
            if not self.cut:
                await self._drain()
        finally:
            await self._close()
            self.d.relaying -= 1
            self.d.count_tokens(self.job, self.tokens, self.events_sent)

    async def _drain(self) -> None:
        """Read the source to its end after [DONE] (the chunked terminator), so the
        node-to-node connection goes back to the pool instead of being closed."""
        if self._source is None:
            return
        with trio.move_on_after(1.0):
            try:
                async for _ in self._source:
                    pass
            except (HopError, SSEProtocolError, BackendBroken):
                pass

    async def _relay(self) -> AsyncGenerator[bytes]:
        source = self._source
        assert source is not None
        while True:
            if self._pending:
                batch, self._pending = self._pending, []
            else:
                with trio.move_on_after(self.d.config.inter_token_timeout_s) as timeout:
                    try:
                        batch = await anext(source)
                    except StopAsyncIteration:
                        return
                if timeout.cancelled_caught:
                    limit = self.d.config.inter_token_timeout_s
                    raise BackendBroken(f"no chunk from node {self.node} in {limit} s")
            out: list[bytes] = []
            for raw, data in batch:
                try:
                    relayed, raw = self._take(raw, data)
                except SSEProtocolError:
                    if out:  # counted as sent: send them before the stream breaks
                        yield b"".join(out)
                    raise
                if relayed is False:
                    if out:
                        yield b"".join(out)
                    raise BackendBroken(f"node {self.node} sent an error event")
                if relayed and raw:
                    out.append(raw)
                if self.done:
                    break
            if out:
                yield b"".join(out)
            if self.done:
                return

    async def _resume(self) -> bool:
        """Open another candidate at the resume point, through the attempt loop (breakers
        claimed as for a first try); False when none could."""
        point = self.resume_point()
        ttft = self.d.config.ttft_timeout_s

        async def reopen(member: Member, number: int) -> None:
            try:
                with trio.fail_after(ttft):
                    await self._open(member, point, number)
            except trio.TooSlowError:
                await self._close()
                raise AttemptFailed(f"node {member.name} did not answer in {ttft} s") from None
            except AttemptFailed:
                await self._close()
                raise
            self.node = member.name

        try:
            await self.d.attempts(self.job, [], self.tried).run(reopen)
        except (AttemptFailed, AttemptsExhausted) as exc:
            log.info("%s: no node could resume: %s", self.request_id, exc)
            return False
        log.info("%s: resumed on %s after %d events", self.request_id, self.node, point.events)
        return True


# --- event sources -----------------------------------------------------------------------------


async def local_events(events: AsyncIterator[bytes]) -> AsyncGenerator[list[Event]]:
    """A backend's items (one or more whole events each) as batches of events. Events from
    Quorum's own encoders are one ``data:`` line each and split without a parser."""
    async for raw in events:
        fields = whole_events(raw)
        if fields is not None:
            yield [(f + b"\n\n", f[6:]) for f in fields]
            continue
        yield [(e.raw, e.data) for e in SSEParser().feed(raw)]


def whole_events(raw: bytes) -> list[bytes] | None:
    """``raw`` cut into its events (each without its blank line: ``b"data: {...}"``) when
    it is nothing but whole one-line ``data: `` events ending in LF, as Quorum's encoders
    and the usual upstreams write them; None for anything else (CRs, comments, other
    fields, several data lines, a cut event), which needs ``SSEParser``. For such bytes
    the parser finds the same events, at a tenth of the cost."""
    if b"\r" in raw or not raw.endswith(b"\n\n"):
        return None
    pieces = raw.split(b"\n\n")
    if pieces.pop():  # ended in three or more LFs
        return None
    for piece in pieces:
        if not piece.startswith(b"data: ") or b"\n" in piece:
            return None
    return pieces


class PeerBody(Protocol):
    """A peer's answer whose body arrives in chunks: ``HopResponse`` (HTTP) or the channel's
    ``ChannelResponse``."""

    def body(self) -> AsyncGenerator[bytes]: ...


async def remote_events(response: PeerBody) -> AsyncGenerator[list[Event]]:
    """A peer's streamed answer (either hop) as batches of events, as the bytes arrive.
    Bytes that hold whole one-line events (a DATA frame of the channel is one item of the
    serving node's stream, so it usually does) are cut without the parser
    (``whole_events``), and their data decoded as the parser decodes it."""
    parser = SSEParser()
    async with aclosing(response.body()) as chunks:
        async for chunk in chunks:
            fields = whole_events(chunk) if not parser.pending else None
            if fields is not None:
                yield [(f + b"\n\n", f[6:].decode("utf-8", "replace")) for f in fields]
                continue
            events = parser.feed(chunk)
            if events:
                yield [(e.raw, e.data) for e in events]


# --- reading events ------------------------------------------------------------------------------


def usage_tokens(usage: object) -> int | None:
    """Prompt + completion tokens of a ``usage`` object, None when it has none."""
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts):
        return sum(parts)  # type: ignore[arg-type]
    return None


def decode(data: str | bytes) -> dict[str, Any]:
    """An event's JSON object; raises ``SSEProtocolError`` for anything else (a node or an
    upstream that sends garbage has broken its stream)."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise SSEProtocolError("an event is not JSON") from None
    except RecursionError:  # nested past what the interpreter's recursion limit leaves
        raise SSEProtocolError("an event nests arrays and objects too deep to read") from None
    if not isinstance(obj, dict):
        raise SSEProtocolError(f"an event is JSON {type(obj).__name__}, not an object")
    return obj


class Choice(msgspec.Struct, gc=False):
    """What the bookkeeping reads of one ``choices[]`` entry; its other fields are skipped.
    Each is the JSON value as ``json.loads`` gives it, None when absent."""

    delta: Any = None
    text: Any = None
    finish_reason: Any = None


class Chunk(msgspec.Struct, gc=False):
    """What the bookkeeping reads of one event: ``choices`` (None when absent), ``usage``
    (None when absent), ``error`` (``msgspec.UNSET`` when the key is absent: any value,
    null too, makes it an error event). Its other fields are skipped, unparsed."""

    choices: list[Choice] | None = None
    usage: Any = None
    error: Any = UNSET


# Decodes straight into the structs (no dict for the chunk, none for a choice, nothing for the
# skipped fields): 2-3 times json.loads' events per second (benchmarks/relay_bookkeeping.py).
_CHUNK_DECODER: Final = msgspec.json.Decoder(Chunk)

# The slow path's stand-in for choices that are not a list of objects: _choices raises for it,
# so each reader fails where it looks at the choices (kind does not for an error event or a
# usage chunk), as each did when both read json.loads' dict.
_NOT_CHOICES: Final[list[Choice]] = []

# An event longer than this may hold an integer that json.loads refuses (more digits than
# sys.get_int_max_str_digits(), a ValueError) and msgspec skips; json.loads reads it, as before.
_FAST_MAX_CHARS: Final = sys.get_int_max_str_digits() or sys.maxsize


def read_chunk(data: str | bytes) -> Chunk:
    """The fields of an event that the bookkeeping reads; raises ``SSEProtocolError`` for an
    event that is not a JSON object.

    The fast path is msgspec. Where msgspec and ``json.loads`` disagree, it is msgspec that
    refuses (lone surrogates, NaN, a BOM, numbers out of range, UTF-16 bytes), and anything it
    refuses is read again by ``json.loads``, which decides as it always has. What msgspec
    accepts in the fields it skips and ``json.loads`` does not is kept from it: bytes that are
    not UTF-8 (bytes are decoded strictly first), and integers longer than Python's
    ``sys.get_int_max_str_digits()`` as it was at import (an event longer than that limit
    takes the slow path)."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
        if len(text) <= _FAST_MAX_CHARS:
            return _CHUNK_DECODER.decode(text)
    except Exception:  # refused, for any reason: the slow path raises or reads it
        pass
    obj = decode(data)
    if "error" in obj:
        return Chunk(error=obj["error"])
    choices = obj.get("choices")
    if choices is not None:
        if isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
            choices = [
                Choice(c.get("delta"), c.get("text"), c.get("finish_reason")) for c in choices
            ]
        else:
            choices = _NOT_CHOICES
    return Chunk(choices, obj.get("usage"))


def _choices(chunk: Chunk) -> list[Choice]:
    choices = chunk.choices
    if choices is _NOT_CHOICES:
        raise SSEProtocolError("an event's choices are not a list of objects")
    return choices or []


def kind(data: str | bytes) -> str:
    """ "role" (a chunk with only the role), "error", or "token" (anything else, [DONE] too).
    Raises ``SSEProtocolError`` for an event that is not a chunk object."""
    if data == "[DONE]" or data == b"[DONE]":
        return "token"
    chunk = read_chunk(data)
    if chunk.error is not UNSET:
        return "error"
    if chunk.usage:
        return "token"
    for choice in _choices(chunk):
        if choice.finish_reason or choice.text:
            return "token"
        delta = choice.delta or {}
        if not isinstance(delta, dict):
            raise SSEProtocolError("an event's delta is not an object")
        if any(k != "role" and v for k, v in delta.items()):
            return "token"
    return "role"
