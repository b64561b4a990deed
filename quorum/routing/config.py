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
    model whose nodes are all warming is held before 503.
    """

    max_attempts: int = 3
    ttft_timeout_s: float = 30.0
    inter_token_timeout_s: float = 10.0
    backoff_s: float = 0.02
    cold_start_wait_s: float = 30.0
    connect_timeout_s: float = 2.0
