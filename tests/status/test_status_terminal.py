"""`quorum status` and `quorum members` in an 80-column terminal: every node's full URL and
every model are printed, nothing is cut to "…"; the live view follows the feed."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
import pytest
import trio
from rich.console import Console

from quorum import cli
from quorum.status.terminal import ClusterView, describe, members_table, render, watch
from tests.conftest import Cluster


def capture(monkeypatch: pytest.MonkeyPatch, width: int = 80) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=width, highlight=False))
    return out


def assert_every_member_in_full(text: str, cluster: Cluster) -> None:
    assert "…" not in text
    for node in cluster.nodes.values():
        assert re.search(rf"(?<![\d]){re.escape(node.url)}(?!\d)", text), node.url
        for model in node.backends:
            assert model in text, model
    assert max(len(line) for line in text.splitlines()) <= 80


async def test_members_prints_full_urls_and_models_in_80_columns(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = capture(monkeypatch)
    status = await trio.to_thread.run_sync(cli.main, ["members", cluster.url("node-a")])
    assert status == 0
    text = out.getvalue()
    assert "members as seen by node-a" in text
    assert_every_member_in_full(text, cluster)


async def test_status_once_prints_one_frame_with_every_node_in_full(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient
) -> None:
    chat = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert (await http.post(cluster.url("node-b") + "/v1/chat/completions", json=chat)).is_success
    with trio.fail_after(5):  # one summary with the request in it
        while not any(
            s["requests"] for s in cluster["node-b"].app.app.extensions["quorum.status"].summaries
        ):
            await trio.sleep(0.05)
    out = capture(monkeypatch)
    argv = ["status", "--once", cluster.url("node-b")]
    with trio.fail_after(10):
        status = await trio.to_thread.run_sync(cli.main, argv)
    assert status == 0
    text = out.getvalue()
    assert "members as seen by node-b" in text and "traffic through node-b" in text
    assert re.search(r"mock-chat\s+[\d.]+\s+0\s+\d+ ms", text)
    for node in cluster.nodes.values():
        assert re.search(rf"{node.name}\s+alive", text)
    assert_every_member_in_full(text, cluster)


async def test_status_once_reports_a_node_that_does_not_serve_the_feed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = capture(monkeypatch)
    status = await trio.to_thread.run_sync(cli.main, ["status", "--once", "http://127.0.0.1:9"])
    assert status == 1
    assert "quorum status:" in out.getvalue()


MEMBERS: list[dict[str, Any]] = [
    {
        "name": f"gpu-box-{i}.example.internal",
        "url": f"https://gpu-box-{i}.example.internal:32768",
        "state": state,
        "node_state": "ready",
        "incarnation": 12,
        "models": ["meta-llama/Llama-3.1-70B-Instruct", "Qwen/Qwen2.5-Coder-32B-Instruct"],
        "load": {"in_flight": 120, "free_slots": 3, "queue_depth": 17},
    }
    for i, state in enumerate(["alive", "suspect", "dead"])
]


def column(text: str, header: str, next_header: str | None) -> str:
    """The cells of one left-justified column of a rendered table, joined without blanks."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if "───" in line)
    head = lines[rule - 1]
    start = re.search(rf"\b{header}\b", head).start()  # type: ignore[union-attr]
    end = re.search(rf"\b{next_header}\b", head).start() if next_header else None  # type: ignore[union-attr]
    return "".join(line[start:end].strip() for line in lines[rule + 1 :]).replace(" ", "")


@pytest.mark.parametrize("width", [60, 80, 240])
def test_members_table_folds_long_names_instead_of_cutting_them(width: int) -> None:
    out = io.StringIO()
    console = Console(file=out, width=width)
    console.print(members_table(MEMBERS, "gpu-box-0.example.internal", console))
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    # folded onto several lines maybe, but whole: a column's pieces, joined, read as its values
    names = column(text, "name", "state")
    urls = column(text, "url", "models")
    models = column(text, "models", None)
    assert names == "".join(m["name"] for m in MEMBERS)
    assert urls == "".join(m["url"] for m in MEMBERS)
    assert models.replace(",", "") == "".join("".join(m["models"]) for m in MEMBERS)
    if width == 240:  # wide enough: one line per member, one column per figure
        assert all(m["url"] in text for m in MEMBERS)
        assert "free slots" in text


def test_view_follows_the_feed_and_the_frame_shows_changes_and_failures() -> None:
    view = ClusterView()
    a = {"name": "a", "url": "http://a:1", "state": "alive", "node_state": "ready"}
    view.apply("snapshot", {"self": "a", "members": [a], "summaries": [], "log": []})
    view.apply("members", {"members": [a, {**a, "name": "b", "state": "dead"}]})
    view.apply(
        "summary",
        {"t": 1.0, "models": {}, "failovers": 2, "resumed": 1, "resume_failed": 0},
    )
    view.apply(
        "log",
        {"type": "member", "t": 1.0, "name": "b", "state": "dead", "was_state": "suspect",
         "node_state": "ready", "was_node_state": "ready"},
    )  # fmt: skip
    out = io.StringIO()
    console = Console(file=out, width=100)
    console.print(render(view, console))
    text = out.getvalue()
    assert "2 members (1 alive, 1 dead)" in text
    assert "2 failovers, 1 streams resumed" in text
    assert "b: suspect → dead" in text
    assert describe({"type": "resume", "outcome": "failed", "count": 1})[1] == "red"
    assert (
        "node-b failed before the first token"
        in describe({"type": "failover", "node": "node-b", "count": 3})[0]
    )


async def test_live_view_redraws_as_the_cluster_changes_and_survives_its_node_leaving(
    cluster: Cluster,
) -> None:
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    url = cluster.url("node-c")
    done = trio.Event()
    status: list[int] = []

    def run() -> None:
        try:
            status.append(watch(url, console=console, frames=6, max_backoff_s=0.5))
        finally:
            trio.from_thread.run_sync(done.set)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, run)
        with trio.fail_after(10):
            while out.getvalue().count("members as seen by node-c") < 2:
                await trio.sleep(0.05)
        cluster["node-c"].stop()
        with trio.fail_after(20):
            await done.wait()
    text = out.getvalue()
    assert status == [0]
    assert "live from " + url in text
    assert f"disconnected from {url}" in text  # the node left: the view says so and retries
