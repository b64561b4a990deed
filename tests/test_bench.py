"""`quorum bench`: its statistics on fixed inputs, and one short run against a real node."""

from __future__ import annotations

import json
import random

import pytest
import trio

from quorum.bench import (
    BenchConfig,
    RequestResult,
    Summary,
    build_report,
    chat_url,
    make_prompt,
    request_body,
    run_bench,
    stream_timings,
)
from tests.helpers import node_config, start_cluster

# --- summaries -------------------------------------------------------------------------


def test_summary_scales_seconds_to_milliseconds() -> None:
    s = Summary.of([0.001, 0.002, 0.003, 0.004, 0.010], scale=1000)
    assert s is not None
    assert s.n == 5
    assert s.mean == pytest.approx(4.0)
    assert s.p50 == pytest.approx(3.0)
    assert s.p90 == pytest.approx(7.6)  # rank 3.6: 4 + 0.6 * 6
    assert s.p99 == pytest.approx(9.76)  # rank 3.96: 4 + 0.96 * 6
    assert Summary.of([]) is None


# --- one stream's timings ------------------------------------------------------------------


def test_stream_timings_from_a_timed_event_list() -> None:
    # Sent at 10.000; role chunk at 10.020 (no token); content chunks at 10.050, 10.060,
    # 10.075, 10.100; usage says 4 tokens; [DONE] at 10.110.
    start, end = 10.000, 10.110
    events = [
        (10.020, "role"),
        (10.050, "content"),
        (10.060, "content"),
        (10.075, "reasoning"),
        (10.100, "content"),
    ]
    tokens = [t for t, kind in events if kind in ("content", "reasoning")]
    t = stream_timings(start, tokens, end, output_tokens=4)
    assert t.ttft == pytest.approx(0.050)
    assert t.itl == pytest.approx((0.010, 0.015, 0.025))
    assert t.e2e == pytest.approx(0.110)
    assert t.tpot == pytest.approx((0.110 - 0.050) / 3)


def test_tpot_uses_usage_tokens_when_chunks_carry_several() -> None:
    t = stream_timings(0.0, [0.1, 0.3], 0.5, output_tokens=9)
    assert t.itl == pytest.approx((0.2,))
    assert t.tpot == pytest.approx(0.4 / 8)


def test_a_stream_without_tokens_has_no_ttft_or_tpot() -> None:
    t = stream_timings(1.0, [], 1.5, output_tokens=0)
    assert (t.ttft, t.itl, t.tpot, t.e2e) == (None, (), None, pytest.approx(0.5))
    one = stream_timings(1.0, [1.2], 1.3, output_tokens=1)
    assert one.ttft == pytest.approx(0.2) and one.tpot is None


def test_report_counts_only_successes_in_latency_and_throughput() -> None:
    ok = [
        RequestResult(
            0.0,
            1.0,
            stream_timings(0.0, [0.2, 0.4, 0.6], 1.0, 3),
            output_tokens=3,
            prompt_tokens=10,
        ),
        RequestResult(
            0.5, 2.0, stream_timings(0.5, [0.9, 1.0], 2.0, 2), output_tokens=2, prompt_tokens=10
        ),
    ]
    bad = [
        RequestResult(0.1, 0.2, stream_timings(0.1, [], 0.2, 0), error="http 503", detail="x"),
        RequestResult(0.1, 0.3, stream_timings(0.1, [], 0.3, 0), error="http 503", detail="y"),
        RequestResult(0.1, 0.4, stream_timings(0.1, [0.2], 0.4, 1), error="error event"),
    ]
    r = build_report(ok + bad, wall_s=2.0)
    assert (r.completed, r.failed) == (2, 3)
    assert r.errors == {"http 503": 2, "error event": 1}
    assert r.error_examples["http 503"] == "x"
    assert r.output_tokens == 5 and r.prompt_tokens == 20
    assert r.req_per_s == pytest.approx(1.0)
    assert r.output_tok_per_s == pytest.approx(2.5)
    assert r.ttft_ms is not None and r.ttft_ms.n == 2
    assert r.ttft_ms.mean == pytest.approx(300.0)  # 200 ms and 400 ms
    assert r.itl_ms is not None and r.itl_ms.n == 3  # 200, 200, 100 ms
    assert r.itl_ms.mean == pytest.approx(500 / 3)
    assert r.tpot_ms is not None and r.tpot_ms.p50 == pytest.approx((400 + 1100) / 2)
    assert r.e2e_ms is not None and r.e2e_ms.p50 == pytest.approx(1250.0)


# --- requests ------------------------------------------------------------------------------


def test_chat_url_accepts_a_base_url_or_a_node_url() -> None:
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_request_bodies_differ_per_request_and_repeat_per_seed() -> None:
    config = BenchConfig(url="http://h:1", model="m", prompt_tokens=20, output_tokens=7)
    first = json.loads(request_body(config, 0))
    assert first["max_tokens"] == 7 and first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert request_body(config, 0) == request_body(config, 0)
    assert request_body(config, 0) != request_body(config, 1)
    assert len(make_prompt(random.Random(1), 20).split()) == 17  # + 3 per message = 20


def test_config_needs_exactly_one_arrival_pattern() -> None:
    with pytest.raises(ValueError):
        BenchConfig(url="u", model="m", concurrency=None, rate=None)
    with pytest.raises(ValueError):
        BenchConfig(url="u", model="m", concurrency=4, rate=2.0)
    assert BenchConfig(url="u", model="m", concurrency=None, rate=2.0).in_flight == 256


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize("arrivals", [{"concurrency": 3}, {"concurrency": None, "rate": 200.0}])
async def test_bench_against_a_real_node_counts_every_request(
    nursery: trio.Nursery, arrivals: dict[str, float | None]
) -> None:
    cluster = await start_cluster(nursery, [node_config("node-a")])
    node = cluster["node-a"]
    config = BenchConfig(
        url=node.url + "/v1",
        model="mock-chat",
        requests=8,
        output_tokens=12,
        prompt_tokens=30,
        duration_s=20,
        timeout_s=10,
        warmup=2,
        **arrivals,
    )  # type: ignore[arg-type]
    seen = []
    with trio.fail_after(20):
        report = await run_bench(config, on_result=seen.append)
    node.stop()
    assert len(seen) == 8
    assert (report.completed, report.failed, report.errors) == (8, 0, {})
    assert report.output_tokens == 8 * 12  # the mock's answers are longer than max_tokens
    assert report.prompt_tokens == 8 * 30
    assert all(r.output_tokens == 12 for r in seen)
    for r in seen:
        assert r.timings.ttft is not None and 0 < r.timings.ttft <= r.timings.e2e
        assert len(r.timings.itl) == 11  # one content chunk per token from the mock
    assert report.ttft_ms is not None and report.e2e_ms is not None
    assert report.ttft_ms.p50 <= report.e2e_ms.p50
    assert report.req_per_s > 0 and report.output_tok_per_s > 0


async def test_bench_reports_http_errors_by_status(nursery: trio.Nursery) -> None:
    cluster = await start_cluster(nursery, [node_config("node-a")])
    config = BenchConfig(
        url=cluster.url("node-a"),
        model="no-such-model",
        concurrency=2,
        requests=3,
        output_tokens=4,
        timeout_s=10,
    )
    with trio.fail_after(20):
        report = await run_bench(config)
    cluster["node-a"].stop()
    assert (report.completed, report.failed) == (0, 3)
    assert report.errors == {"http 404": 3}
    assert "model_not_found" in report.error_examples["http 404"]
    assert report.ttft_ms is None
