"""The serving side of the node-to-node channel (``quorum.routing.channel`` has the wire and
the client): requests that arrive as frames on one connection, each answered by the node's
own request path as if it had come over HTTP.

Only forwards travel on a channel: a request without the cluster's signed internal headers
is refused with 401, and a signed one is checked by the dispatcher as on the HTTP hop. One
connection holds at most ``max_streams`` requests at once (more are refused with 503), and
a frame is at most ``max_frame`` bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing

import trio

from quorum.errors import ApiError, Unauthorized, Unavailable
from quorum.routing.channel import (
    ACCEPTED,
    CANCEL,
    CREDIT,
    DATA,
    END,
    HEAD,
    OPEN,
    RESET,
    WINDOW,
    ChannelError,
    FrameReader,
    FrameWriter,
    frame,
)
from quorum.routing.headers import INTERNAL
from quorum.routing.relay import Reply, StreamBody

__all__ = ["serve_channel"]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, Mapping[str, str]], Awaitable[Reply]]
"""``handler(path, body, headers)``: the node's answer to a request (``quorum.api.answer``);
raises ``ApiError``."""

_CHUNK = 64 * 1024


class _Served:
    __slots__ = ("credit", "credited", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.credit = WINDOW
        self.credited = trio.Event()


async def serve_channel(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    buffered: bytes = b"",
    max_frame: int = 64 << 20,
    max_streams: int = 1024,
) -> None:
    """Speak the channel on ``stream`` (its preface already read; ``buffered``: bytes read
    after it) until the client closes it or sends a frame that does not parse. Every error
    of a request becomes its answer; nothing escapes but cancellation."""
    served: dict[int, _Served] = {}
    writer = FrameWriter(stream)
    # send(frames, now): a request's first frames go at once when the writer is idle (its
    # TTFT waits on them); the rest are joined by the writer
    send = writer.write

    try:
        await stream.send_all(ACCEPTED)
        reader = FrameReader(stream, max_frame, buffered)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_frames, writer, stream)
            try:
                while True:
                    fields = await reader.next()
                    if fields is None:
                        break
                    kind = fields[0]
                    if kind == OPEN and _valid_open(fields):
                        _, sid, path, headers, body = fields
                        if sid in served:
                            raise ChannelError(f"stream {sid} opened twice")
                        one = served[sid] = _Served()
                        nursery.start_soon(
                            _serve_one,
                            send,
                            handler,
                            sid,
                            path,
                            headers,
                            body,
                            one,
                            served,
                            len(served) > max_streams,
                        )
                    elif kind == CANCEL and len(fields) == 2:
                        if (target := served.get(fields[1])) is not None:
                            target.scope.cancel()
                    elif kind == CREDIT and len(fields) == 3 and type(fields[2]) is int:
                        if (target := served.get(fields[1])) is not None and fields[2] > 0:
                            target.credit += fields[2]
                            target.credited.set()
                    else:
                        raise ChannelError(f"an unexpected frame of type {kind!r}")
            except ChannelError as exc:
                log.info("channel closed: %s", exc)
            writer.close()
            nursery.cancel_scope.cancel()  # the client is gone: so is its work
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _write_frames(writer: FrameWriter, stream: trio.abc.Stream) -> None:
    """The connection's writer; a failed send closes the connection, which ends the
    reader, and with it every request on it."""
    await writer.run()
    if writer.error != "the channel is closed":
        log.info("channel closed: %s", writer.error)
    with trio.CancelScope(shield=True):
        await stream.aclose()


def _valid_open(fields: list[object]) -> bool:
    if len(fields) != 5:
        return False
    _, sid, path, headers, body = fields
    return (
        type(sid) is int
        and isinstance(path, str)
        and isinstance(body, bytes)
        and isinstance(headers, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    )


async def _serve_one(
    send: Callable[[bytes, bool], Awaitable[None]],
    handler: Handler,
    sid: int,
    path: str,
    headers: dict[str, str],
    body: bytes,
    one: _Served,
    served: dict[int, _Served],
    over: bool,
) -> None:
    """Answer one request: HEAD, DATA as the body is produced (within the client's
    credit), END; RESET if the body breaks. Cancelled by the client's CANCEL."""
    try:
        with one.scope:
            try:
                if over:
                    raise Unavailable("This node's channel holds too many requests; retry.")
                lowered = {k.lower(): v for k, v in headers.items()}
                if not any(name in lowered for name in INTERNAL):
                    raise Unauthorized(
                        "The node-to-node channel carries signed forwards only.",
                        code="invalid_internal_headers",
                    )
                reply = await handler(path, body, lowered)
            except ApiError as exc:
                data = json.dumps(exc.body()).encode()
                head = frame(HEAD, sid, exc.status, {"content-type": "application/json"})
                await _send_body(send, sid, one, _once(data), head, hold=True)
                return
            except Exception as exc:
                log.exception("unhandled error on a channel request to %s", path)
                error = ApiError(f"Internal error in Quorum ({type(exc).__name__}).")
                head = frame(HEAD, sid, 500, {"content-type": "application/json"})
                data = json.dumps(error.body()).encode()
                await _send_body(send, sid, one, _once(data), head, hold=True)
                return
            if isinstance(reply.body, bytes):
                chunks, hold = _once(reply.body), True
            else:
                chunks = reply.body
                hold = isinstance(chunks, StreamBody) and chunks.ready
            try:
                await _send_body(
                    send, sid, one, chunks, frame(HEAD, sid, reply.status, reply.headers), hold
                )
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                raise
            except Exception as exc:  # the body broke after its head
                log.warning("channel stream %d broke: %r", sid, exc)
                await send(frame(RESET, sid, f"{type(exc).__name__}: {exc}"), False)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the connection is gone; the reader ends it
    finally:
        served.pop(sid, None)


async def _send_body(
    send: Callable[[bytes, bool], Awaitable[None]],
    sid: int,
    one: _Served,
    chunks: AsyncIterator[bytes],
    head: bytes = b"",
    hold: bool = False,
) -> None:
    """``head``, then ``chunks`` as DATA frames within the stream's credit, then END;
    ``chunks`` is closed whatever happens, even when ``head`` cannot be sent. ``hold``: the
    first chunk is at hand (a reply's bytes, a ``StreamBody`` that is ``ready``), so the
    head goes out in the same write as it, one send instead of two."""
    async with aclosing(chunks) as body:  # type: ignore[type-var]
        if head and not hold:
            await send(head, True)
            head = b""
        async for chunk in body:
            for start in range(0, len(chunk), _CHUNK):
                piece = chunk[start : start + _CHUNK]
                while one.credit < len(piece):
                    if head:  # the head does not wait for credit
                        await send(head, False)
                        head = b""
                    one.credited = trio.Event()
                    await one.credited.wait()
                one.credit -= len(piece)
                await send(head + frame(DATA, sid, piece), bool(head))
                head = b""
    await send(head + frame(END, sid), bool(head))


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data
