"""``quorum bench``: load figures for any OpenAI-compatible endpoint, in the spirit of
``vllm bench serve``.

::

    quorum bench http://127.0.0.1:32768/v1 --model mock-chat --concurrency 16 --requests 500
    quorum bench http://127.0.0.1:32768 --rate 50 --max-concurrency 128 --duration 30 --json
    quorum bench http://127.0.0.1:32768 --node-config nodes/node-a.toml   # start it, then RSS

Every request is a streamed ``POST /v1/chat/completions`` with a prompt of about
``--prompt-tokens`` words, ``max_tokens = --output-tokens`` and
``stream_options.include_usage``. Arrivals are either a fixed number of concurrent streams
(``--concurrency``), or Poisson at ``--rate`` requests/s with at most ``--max-concurrency`` in
flight. The run is always bounded: it stops issuing requests after ``--requests`` or
``--duration`` seconds, whichever comes first, and each request is cut after ``--timeout``.

Figures, per request (``stream_timings``): TTFT, seconds from sending the request to the first
chunk carrying content or reasoning; ITL, the gaps between successive such chunks; TPOT,
``(E2E - TTFT) / (output tokens - 1)``; E2E, from sending to ``[DONE]``. Output tokens come
from the ``usage`` chunk, or when a server sends none, from the count of content/reasoning
chunks. The report gives mean, p50, p90, p99 of each in milliseconds (ITL over every gap of
every request, as vLLM does), output tokens/s and requests/s over the wall time, and failed
requests by kind: ``http <status>``, ``connect``, ``broken stream`` (reset, EOF before
``[DONE]``, unparsable chunk), ``error event`` (a ``data: {"error": ...}`` event), ``timeout``.

The statistics (``Summary``, ``stream_timings``, ``build_report``) are pure functions;
percentiles are ``quorum.stats.percentile`` (linear interpolation between the closest ranks).
``run_bench`` is the coroutine that drives the load; ``--node-config`` starts nodes with
``quorum.launch.NodeProcess`` and reports their peak RSS (``VmHWM``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import trio

from quorum.launch import NodeProcess, NodeStartError, peak_rss_kb
from quorum.sse import SSEParser, SSEProtocolError
from quorum.stats import percentile

__all__ = [
    "BenchConfig",
    "Report",
    "RequestResult",
    "Summary",
    "Timings",
    "add_arguments",
    "build_report",
    "chat_url",
    "main",
    "run_bench",
    "stream_timings",
]

# --- statistics (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """``n`` values summarized: ``mean``, ``p50``, ``p90``, ``p99``, in the values' unit."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float], *, scale: float = 1.0) -> Summary | None:
        """Summary of ``values`` each multiplied by ``scale`` (1000 turns s into ms); None
        when there are no values."""
        if not values:
            return None
        scaled = [v * scale for v in values]
        return cls(
            n=len(scaled),
            mean=math.fsum(scaled) / len(scaled),
            p50=percentile(scaled, 50),
            p90=percentile(scaled, 90),
            p99=percentile(scaled, 99),
        )


@dataclass(frozen=True, slots=True)
class Timings:
    """One stream's figures, in seconds: ``ttft`` (None when no token arrived), ``itl`` (gaps
    between successive token chunks), ``tpot`` (None for fewer than two output tokens),
    ``e2e``."""

    ttft: float | None
    itl: tuple[float, ...]
    tpot: float | None
    e2e: float


def stream_timings(
    start: float, token_times: Sequence[float], end: float, output_tokens: int
) -> Timings:
    """Figures of one stream from its clock readings (seconds, any common origin).

    ``start``: when the request was sent. ``token_times``: arrival of each chunk that carried
    content or reasoning, in order. ``end``: when the stream finished. ``output_tokens``: the
    tokens generated (usage), which may exceed ``len(token_times)`` when a server packs
    several tokens in a chunk. TPOT is ``(e2e - ttft) / (output_tokens - 1)``."""
    e2e = end - start
    if not token_times:
        return Timings(ttft=None, itl=(), tpot=None, e2e=e2e)
    ttft = token_times[0] - start
    itl = tuple(b - a for a, b in itertools.pairwise(token_times))
    tpot = (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else None
    return Timings(ttft=ttft, itl=itl, tpot=tpot, e2e=e2e)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request: ``start``/``end`` (``time.perf_counter`` seconds), its ``timings``,
    ``output_tokens``, ``prompt_tokens`` (from usage, None if not reported), ``error`` (its
    kind, None when it succeeded) and ``detail`` (what went wrong, for a person)."""

    start: float
    end: float
    timings: Timings
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Report:
    """A run's figures. Latencies are ``Summary`` in milliseconds (None when nothing was
    measured); ``wall_s`` runs from the first request sent to the last one finished;
    ``errors`` maps a failure kind to its count and ``error_examples`` to the first failure's
    detail; ``peak_rss_kb`` maps a process name to its
    VmHWM in KiB (only for processes the bench was told about)."""

    completed: int
    failed: int
    errors: dict[str, int]
    error_examples: dict[str, str]
    wall_s: float
    output_tokens: int
    prompt_tokens: int
    req_per_s: float
    output_tok_per_s: float
    ttft_ms: Summary | None
    itl_ms: Summary | None
    tpot_ms: Summary | None
    e2e_ms: Summary | None
    config: dict[str, Any] = field(default_factory=dict)
    peak_rss_kb: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def build_report(results: Sequence[RequestResult], wall_s: float) -> Report:
    """Fold per-request results into a ``Report``. Latency figures and throughput count only
    successful requests; ``wall_s`` (seconds) is the denominator of both rates."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.timings.ttft for r in ok if r.timings.ttft is not None]
    tpot = [r.timings.tpot for r in ok if r.timings.tpot is not None]
    itl = [gap for r in ok for gap in r.timings.itl]
    examples: dict[str, str] = {}
    for r in results:
        if r.error is not None:
            examples.setdefault(r.error, r.detail)
    rate = (lambda x: x / wall_s) if wall_s > 0 else (lambda x: 0.0)
    return Report(
        completed=len(ok),
        failed=len(results) - len(ok),
        errors=dict(Counter(r.error for r in results if r.error is not None).most_common()),
        error_examples=examples,
        wall_s=wall_s,
        output_tokens=out_tokens,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        req_per_s=rate(len(ok)),
        output_tok_per_s=rate(out_tokens),
        ttft_ms=Summary.of(ttft, scale=1000),
        itl_ms=Summary.of(itl, scale=1000),
        tpot_ms=Summary.of(tpot, scale=1000),
        e2e_ms=Summary.of([r.timings.e2e for r in ok], scale=1000),
    )


# --- requests -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run. ``url``: an OpenAI base URL (``http://host:port/v1``) or a node URL.
    ``concurrency``: fixed concurrent streams, or None for Poisson arrivals at ``rate``
    requests/s with at most ``max_concurrency`` in flight. ``requests``/``duration_s``: stop
    issuing after this many requests or seconds, whichever comes first. ``timeout_s``: one
    request's limit. ``warmup``: requests run first at the same concurrency, not counted."""

    url: str
    model: str
    concurrency: int | None = 8
    rate: float | None = None
    max_concurrency: int = 256
    prompt_tokens: int = 128
    output_tokens: int = 128
    requests: int = 200
    duration_s: float = 60.0
    timeout_s: float = 60.0
    warmup: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency and rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be above 0 requests/s")
        for name in ("max_concurrency", "prompt_tokens", "output_tokens", "requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not (self.duration_s > 0 and self.timeout_s > 0):
            raise ValueError("duration and timeout must be above 0 seconds")
        if self.warmup < 0:
            raise ValueError("warmup must be 0 or more")

    @property
    def in_flight(self) -> int:
        """The most requests open at once."""
        return self.concurrency if self.concurrency is not None else self.max_concurrency


def chat_url(url: str) -> str:
    """The chat completions URL for a base URL: ``http://h:1`` and ``http://h:1/v1`` give
    ``http://h:1/v1/chat/completions``; a URL already ending so is kept."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


_VOCABULARY = tuple(
    """time person year way day thing man world life hand part child eye woman place work week
    case point number group problem fact river garden window morning story idea reason step
    path table letter word line page book note plan method pattern signal balance change
    choice effect level measure order record source model cluster node request token stream
    """.split()
)


def make_prompt(rng: random.Random, tokens: int) -> str:
    """A prompt of ``tokens - 3`` words (at least one): the mock backend counts one token per
    word plus 3 per message, so it reports exactly ``tokens`` prompt tokens; real tokenizers
    give roughly that many for these common English words."""
    return " ".join(rng.choice(_VOCABULARY) for _ in range(max(1, tokens - 3)))


def request_body(config: BenchConfig, index: int) -> bytes:
    """The JSON body of request ``index``: a prompt drawn from ``(seed, index)`` so that every
    request differs (no prefix-cache or determinism shortcut) and every run repeats."""
    rng = random.Random(config.seed * 1_000_003 + index)
    return json.dumps(
        {
            "model": config.model,
            "messages": [{"role": "user", "content": make_prompt(rng, config.prompt_tokens)}],
            "stream": True,
            "max_tokens": config.output_tokens,
            "stream_options": {"include_usage": True},
        }
    ).encode()


_TOKEN_FIELDS = ("content", "reasoning_content", "reasoning")


class _StreamError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


async def _one(client: httpx.AsyncClient, url: str, body: bytes, timeout_s: float) -> RequestResult:
    """Send one streamed request and time it; never raises for a failed request."""
    token_times: list[float] = []
    usage_out: int | None = None
    usage_prompt: int | None = None
    error: str | None = None
    detail = ""
    start = time.perf_counter()
    with trio.move_on_after(timeout_s) as scope:
        try:
            async with client.stream(
                "POST", url, content=body, headers={"content-type": "application/json"}
            ) as response:
                if response.status_code != 200:
                    text = (await response.aread())[:300].decode("utf-8", "replace")
                    raise _StreamError(f"http {response.status_code}", text)
                parser = SSEParser()
                done = False
                async with aclosing(response.aiter_raw()) as chunks:  # type: ignore[type-var]
                    async for data in chunks:
                        now = time.perf_counter()
                        for event in parser.feed(data):
                            if event.is_done:
                                done = True
                                continue
                            try:
                                chunk = json.loads(event.data)
                            except ValueError:
                                raise _StreamError(
                                    "broken stream", "a chunk is not JSON: " + event.data[:200]
                                ) from None
                            if not isinstance(chunk, dict):
                                raise _StreamError("broken stream", "a chunk is not an object")
                            if "error" in chunk:
                                if error is None:
                                    error, detail = "error event", event.data[:300]
                                continue
                            for choice in chunk.get("choices") or ():
                                delta = choice.get("delta") or {}
                                if any(delta.get(f) for f in _TOKEN_FIELDS):
                                    token_times.append(now)
                                    break
                            usage = chunk.get("usage")
                            if isinstance(usage, dict):
                                usage_out = usage.get("completion_tokens", usage_out)
                                usage_prompt = usage.get("prompt_tokens", usage_prompt)
                if not done:
                    raise _StreamError("broken stream", "the stream ended without [DONE]")
        except _StreamError as exc:
            if error is None:
                error, detail = exc.kind, exc.detail
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error, detail = "connect", repr(exc)
        except httpx.PoolTimeout as exc:
            error, detail = "timeout", repr(exc)
        except (httpx.TransportError, SSEProtocolError) as exc:
            error, detail = "broken stream", repr(exc)
    end = time.perf_counter()
    if scope.cancelled_caught:
        error, detail = "timeout", f"no [DONE] within {timeout_s} s"
    output = usage_out if isinstance(usage_out, int) else len(token_times)
    return RequestResult(
        start=start,
        end=end,
        timings=stream_timings(start, token_times, end, output),
        output_tokens=output,
        prompt_tokens=usage_prompt if isinstance(usage_prompt, int) else None,
        error=error,
        detail=detail,
    )


async def _drive(
    config: BenchConfig,
    clients: Sequence[httpx.AsyncClient],
    count: int,
    first_index: int,
    record: Callable[[RequestResult], None],
) -> None:
    """Issue up to ``count`` requests under ``config``'s arrival pattern, one per free client
    of ``clients`` (``config.in_flight`` of them), stopping new ones at ``config.duration_s``;
    returns when every issued request has finished."""
    url = chat_url(config.url)
    deadline = trio.current_time() + config.duration_s
    issued = 0

    def take() -> int | None:
        nonlocal issued
        if issued >= count or trio.current_time() >= deadline:
            return None
        issued += 1
        return first_index + issued - 1

    async def one(client: httpx.AsyncClient, index: int) -> None:
        record(await _one(client, url, request_body(config, index), config.timeout_s))

    async with trio.open_nursery() as nursery:
        if config.rate is None:

            async def worker(client: httpx.AsyncClient) -> None:
                while (index := take()) is not None:
                    await one(client, index)

            for client in clients:
                nursery.start_soon(worker, client)
            return
        arrivals = random.Random(config.seed)
        free = list(clients)
        slots = trio.Semaphore(len(free))
        next_at = trio.current_time()

        async def capped(client: httpx.AsyncClient, index: int) -> None:
            try:
                await one(client, index)
            finally:
                free.append(client)
                slots.release()

        while True:
            await trio.sleep_until(next_at)
            await slots.acquire()
            index = take()
            if index is None:
                slots.release()
                return
            nursery.start_soon(capped, free.pop(), index)
            next_at += arrivals.expovariate(config.rate)


async def run_bench(
    config: BenchConfig,
    *,
    on_result: Callable[[RequestResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Report:
    """Run ``config`` and return its ``Report``. ``on_result`` is called after each measured
    request (a progress bar); ``transport`` replaces httpx's (tests). Bounded: at most
    ``warmup + requests`` requests, none started after ``duration_s``, each cut at
    ``timeout_s``.

    Each in-flight slot has its own one-connection client: httpcore's pool scans all its
    connections on every request and every close, which with one shared pool of 256
    connections costs the load generator more CPU than a zero-latency server spends."""
    results: list[RequestResult] = []

    def record(result: RequestResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    timeout = httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = httpx.create_ssl_context()  # built once: loading the CA bundle takes milliseconds
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits, verify=tls)
            )
            for _ in range(config.in_flight)
        ]
        if config.warmup:
            await _drive(config, clients, config.warmup, 10**9, lambda _: None)
        began = time.perf_counter()
        await _drive(config, clients, config.requests, 0, record)
        finished = time.perf_counter()
    if results:
        began = min(r.start for r in results)
    report = build_report(results, finished - began)
    return replace(report, config=asdict(config))


# --- the command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``quorum bench`` options."""
    parser.add_argument("url", help="OpenAI base URL (http://127.0.0.1:32768/v1) or node URL")
    parser.add_argument("--model", help="model to request (default: the first in /v1/models)")
    arrivals = parser.add_mutually_exclusive_group()
    arrivals.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="N concurrent streams, each sending its next request when one ends (the default, N=8)",
    )
    arrivals.add_argument(
        "--rate", type=float, metavar="R", help="Poisson arrivals at R requests/s instead"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=256,
        metavar="N",
        help="with --rate: at most N in flight (default 256)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=128, metavar="N")
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=128,
        metavar="N",
        help="sent as max_tokens (default 128)",
    )
    parser.add_argument(
        "--requests", type=int, default=200, metavar="N", help="stop after N requests (default 200)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=60.0,
        metavar="S",
        help="stop issuing requests after S seconds (default 60)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="one request's limit (default 60)"
    )
    parser.add_argument(
        "--warmup", type=int, default=0, metavar="N", help="N requests first, not counted"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--node-config",
        type=Path,
        action="append",
        default=[],
        metavar="TOML",
        help="start this node first (repeatable), report its peak RSS, stop it at the end",
    )
    parser.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="also report this running process's peak RSS (repeatable)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``quorum bench`` from parsed ``args``; returns the exit status (1 when every
    request failed, 2 for bad arguments)."""
    from rich.console import Console

    console = Console(highlight=False, stderr=args.json)
    try:
        return trio.run(_main, args, console)
    except ValueError as exc:
        console.print(f"[red]quorum bench: {exc}")
        return 2
    except RuntimeError as exc:
        console.print(f"[red]quorum bench: {exc}", markup=False)
        return 1


async def _main(args: argparse.Namespace, console: Any) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    nodes: list[NodeProcess] = []
    try:
        for path in args.node_config:
            from quorum.config import ConfigError, NodeConfig

            try:
                cfg = NodeConfig.from_toml(path)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            url = cfg.url or f"http://{cfg.host}:{cfg.port}"
            node = NodeProcess.of(cfg.name, path, url)
            nodes.append(node)
            await node.start()
            try:
                await node.wait_ready(30.0)
            except NodeStartError as exc:
                raise RuntimeError(f"node {path}: {exc}") from None
        model = args.model or await _first_model(args.url)
        config = BenchConfig(
            url=args.url,
            model=model,
            concurrency=(
                None
                if args.rate is not None
                else 8
                if args.concurrency is None
                else args.concurrency
            ),
            rate=args.rate,
            max_concurrency=args.max_concurrency,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            requests=args.requests,
            duration_s=args.duration,
            timeout_s=args.timeout,
            warmup=args.warmup,
            seed=args.seed,
        )
        show = not args.json and console.is_terminal
        with Progress(
            TextColumn("[bold]bench"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=console,
            disable=not show,
            transient=True,
        ) as progress:
            task = progress.add_task("requests", total=config.requests, failed=0)
            failed = 0

            def tick(result: RequestResult) -> None:
                nonlocal failed
                failed += not result.ok
                progress.update(task, advance=1, failed=failed)

            report = await run_bench(config, on_result=tick)
        rss = {n.name: kb for n in nodes if (kb := n.peak_rss_kb()) is not None}
        rss |= {f"pid {pid}": kb for pid in args.pid if (kb := peak_rss_kb(pid)) is not None}
        report = replace(report, peak_rss_kb=rss)
    finally:
        for node in nodes:
            await node.stop()
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print_report(report, console)
    return 1 if report.completed == 0 else 0


async def _first_model(url: str) -> str:
    base = chat_url(url).removesuffix("/chat/completions")
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            data = (await client.get(base + "/models")).json()
        return str(data["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(
            f"no --model given and {base}/models did not name one: {exc!r}"
        ) from None


def print_report(report: Report, console: Any) -> None:
    """The report as rich tables on ``console``."""
    from rich.table import Table
    from rich.text import Text

    cfg = report.config
    shape = (
        f"concurrency {cfg.get('concurrency')}"
        if cfg.get("concurrency")
        else f"rate {cfg.get('rate')}/s, max concurrency {cfg.get('max_concurrency')}"
    )
    console.print(
        f"[bold]quorum bench[/]: {cfg.get('model')} at {cfg.get('url')}, {shape}, "
        f"{cfg.get('prompt_tokens')} prompt / {cfg.get('output_tokens')} output tokens"
    )
    head = Table(show_header=False)
    head.add_column(justify="left")
    head.add_column(justify="right")
    head.add_row("successful requests", str(report.completed))
    head.add_row("failed requests", str(report.failed))
    for kind, count in report.errors.items():
        head.add_row(f"  {kind}", str(count))
        head.add_row(Text(f"    e.g. {report.error_examples.get(kind, '')[:60]}"), "")
    head.add_row("wall time (s)", f"{report.wall_s:.2f}")
    head.add_row("requests/s", f"{report.req_per_s:.2f}")
    head.add_row("output tokens", str(report.output_tokens))
    head.add_row("output tokens/s", f"{report.output_tok_per_s:.1f}")
    head.add_row("prompt tokens", str(report.prompt_tokens))
    for name, kb in report.peak_rss_kb.items():
        head.add_row(f"peak RSS {name} (MiB)", f"{kb / 1024:.1f}")
    console.print(head)
    lat = Table(title="latency (ms)")
    for col in ("", "mean", "p50", "p90", "p99", "n"):
        lat.add_column(col, justify="right" if col else "left")
    for name, s in (
        ("TTFT", report.ttft_ms),
        ("ITL", report.itl_ms),
        ("TPOT", report.tpot_ms),
        ("E2E", report.e2e_ms),
    ):
        if s is None:
            lat.add_row(name, "-", "-", "-", "-", "0")
        else:
            lat.add_row(
                name, f"{s.mean:.2f}", f"{s.p50:.2f}", f"{s.p90:.2f}", f"{s.p99:.2f}", str(s.n)
            )
    console.print(lat)
