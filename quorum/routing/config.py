"""The ``[routing]`` table of a node config, typed (pydantic): every field checked where it is
read, with the path of a bad one in the error (``quorum.config``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RoutingConfig"]


class RoutingConfig(BaseModel):
    """The ``[routing]`` table. Times in seconds; every one finite and positive.

    ``max_attempts``: nodes tried before the first token, and again for each resume.
    ``ttft_timeout_s``: no first token by then moves the request on. ``inter_token_timeout_s``:
    no chunk for this long counts as a broken stream. ``backoff_s``: the first retry's delay
    (doubled per attempt, with full jitter). ``cold_start_wait_s``: how long a request for a
    model whose nodes are all warming is held before 503. ``unary_timeout_s``: a
    non-streamed answer not complete by then moves the request on (504 when every attempt
    timed out). ``connect_timeout_s``: to open a hop connection. ``max_answer_bytes``: the
    largest non-streamed answer accepted from another node (a larger one fails the attempt).
    ``hop_max_idle``: idle keep-alive connections kept per peer; ``hop_idle_timeout_s``: one
    idle longer is closed. ``channel``: forward on one multiplexed connection per peer
    (``quorum.routing.channel``), with the HTTP hop as the fallback for a peer that does not
    speak it. Raises ``pydantic.ValidationError`` for a value out of range.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    max_attempts: int = Field(default=3, ge=1)
    ttft_timeout_s: float = Field(default=30.0, gt=0)
    inter_token_timeout_s: float = Field(default=10.0, gt=0)
    backoff_s: float = Field(default=0.02, ge=0)
    cold_start_wait_s: float = Field(default=30.0, ge=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    unary_timeout_s: float = Field(default=300.0, gt=0)
    max_answer_bytes: int = Field(default=16 << 20, ge=1024)
    hop_max_idle: int = Field(default=64, ge=0)
    hop_idle_timeout_s: float = Field(default=30.0, gt=0)
    channel: bool = True
