"""Server-sent events framing, with no I/O (like h11): bytes in, events out; data in, bytes out.

The parser follows the WHATWG "event stream interpretation" rules: lines end in CRLF, LF or a
lone CR; ``data:`` lines of one event are joined with ``\\n``; a blank line dispatches; lines
starting with ``:`` are comments; an event without data is not dispatched. Each ``Event`` also
keeps the exact bytes it was framed from (``raw``), so a relay can count and forward what it
parsed without re-serializing it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DONE", "Event", "SSEParser", "SSEProtocolError", "encode"]

DONE = b"data: [DONE]\n\n"
"""The OpenAI stream terminator, as bytes on the wire."""


class SSEProtocolError(Exception):
    """The peer sent something that cannot be an event stream (an event over the size cap)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event.

    ``data``: the joined data lines (str). ``event``: the ``event:`` field or None. ``id``: the
    ``id:`` field or None. ``raw``: the bytes from the event's first line through its blank line.
    """

    data: str
    event: str | None
    id: str | None
    raw: bytes

    @property
    def is_done(self) -> bool:
        """True for OpenAI's ``data: [DONE]`` terminator."""
        return self.data == "[DONE]"


def encode(data: bytes | str) -> bytes:
    """Frame ``data`` as one event: ``data: <line>\\n`` per line, then a blank line.

    JSON from ``json.dumps`` has no raw newlines, so the common case is one line.
    """
    if isinstance(data, str):
        data = data.encode()
    if b"\n" not in data and b"\r" not in data:
        return b"data: " + data + b"\n\n"
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


class SSEParser:
    """Incremental event-stream parser.

    ``feed(data)`` returns the events completed by ``data`` (a list, possibly empty).
    ``pending`` is the number of buffered bytes of an event not yet complete; a stream that
    ends with ``pending > 0`` was cut mid-event. ``max_event_bytes`` bounds one event; a
    longer one raises ``SSEProtocolError``.
    """

    __slots__ = ("_buf", "_data", "_event", "_id", "_max", "_pos", "_start")

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._pos = 0  # next unread byte in _buf
        self._start = 0  # first byte of the event being built
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._max = max_event_bytes

    @property
    def pending(self) -> int:
        """Bytes of an incomplete event still buffered."""
        return len(self._buf) - self._start

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return every event it completes, in order."""
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = self._pos
        n = len(buf)
        while pos < n:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else n)
            if cr >= 0:
                if cr + 1 == n:
                    break  # a CR at the end may be the first half of CRLF: wait
                end, nxt = cr, (cr + 2 if buf[cr + 1] == 0x0A else cr + 1)
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            line = bytes(buf[pos:end])
            pos = nxt
            if line:
                self._field(line)
                continue
            if self._data:
                events.append(
                    Event(
                        data="\n".join(self._data),
                        event=self._event,
                        id=self._id,
                        raw=bytes(buf[self._start : pos]),
                    )
                )
            self._data = []
            self._event = None
            self._start = pos
        if self._start:
            del buf[: self._start]
            pos -= self._start
            self._start = 0
        self._pos = pos
        if len(buf) > self._max:
            raise SSEProtocolError(f"an event is longer than {self._max} bytes")
        return events

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            self._id = value.decode("utf-8", "replace")
        # "retry" and unknown fields are ignored, as the spec says.
