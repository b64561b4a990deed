"""The ``[routing]`` table of a node config."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RoutingConfig"]


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """The ``[routing]`` table. Times in seconds.

    ``max_attempts``: nodes tried before the first token, and again for each resume.
    ``ttft_timeout_s``: no first token by then moves the request on. ``inter_token_timeout_s``:
    no chunk for this long counts as a broken stream. ``backoff_s``: the first retry's delay
    (doubled per attempt, with full jitter). ``cold_start_wait_s``: how long a request for a
    model whose nodes are all warming is held before 503. ``unary_timeout_s``: a
    non-streamed answer not complete by then moves the request on (504 when every attempt
    timed out). ``connect_timeout_s``: to open a hop connection. ``max_answer_bytes``: the
    largest non-streamed answer accepted from another node (a larger one fails the attempt).
    ``hop_max_idle``: idle keep-alive connections kept per peer; ``hop_idle_timeout_s``: one
    idle longer is closed.
    """

    max_attempts: int = 3
    ttft_timeout_s: float = 30.0
    inter_token_timeout_s: float = 10.0
    backoff_s: float = 0.02
    cold_start_wait_s: float = 30.0
    connect_timeout_s: float = 2.0
    unary_timeout_s: float = 300.0
    max_answer_bytes: int = 16 << 20
    hop_max_idle: int = 64
    hop_idle_timeout_s: float = 30.0
