"""The failure scenarios in quick mode (few trials, LOCAL gossip preset) on real node
processes, `quorum scenario --list`, and the docker commands of the compose target."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from quorum.scenarios import SCENARIOS, Options
from quorum.scenarios import run as run_scenario
from quorum.scenarios.cluster import NETNS_PREFIX
from quorum.scenarios.target import ComposeTarget
from tests.conftest import ROOT

# The openai SDK stops reading its nested async generators at [DONE] without closing them
# (openai._streaming, and its vendored httpx2/httpcore2); under trio they are finalized by
# GC with a ResourceWarning, as pyproject.toml already allows for httpx and httpcore.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'openai\\.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpx2\\.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore2\\.:ResourceWarning"),
]


def test_scenario_list_names_every_scenario_and_its_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quorum", "scenario", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for scenario in SCENARIOS.values():
        assert scenario.name in result.stdout
        assert (ROOT / scenario.script).exists()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_passes_in_quick_mode(name: str) -> None:
    options = Options(quick=True, trials=1 if name == "rolling-restart" else None)
    result = run_scenario(name, options)
    assert result.passed, (result.figures, result.checks, result.notes)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    probe = f"{NETNS_PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def test_kill_mid_stream_in_network_namespaces() -> None:
    why = _netns_usable()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    result = run_scenario("kill-mid-stream", Options(quick=True, netns=True, trials=1))
    assert result.target == "netns"
    assert result.passed, (result.figures, result.checks, result.notes)
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert NETNS_PREFIX + str(os.getpid()) not in leftovers


class FakeRunner:
    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    async def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.commands.append(list(argv))
        return 0, ""


def test_compose_target_builds_the_docker_commands() -> None:
    runner = FakeRunner()
    target = ComposeTarget(Path("/srv/quorum/docker-compose.yml"), runner=runner)

    async def inject() -> None:
        await target.kill("node-b")
        await target.stop("node-c")
        await target.cont("node-c")
        await target.partition("node-a")
        await target.heal("node-a")
        await target.restart("node-b")
        await target.terminate("node-c")
        await target.drain("node-a", timeout_s=30)

    trio.run(inject)
    assert target.url("node-c") == "http://127.0.0.1:32770"
    assert runner.commands == [
        ["docker", "kill", "--signal", "KILL", "quorum-node-b-1"],
        ["docker", "pause", "quorum-node-c-1"],
        ["docker", "unpause", "quorum-node-c-1"],
        ["docker", "network", "disconnect", "quorum_quorum", "quorum-node-a-1"],
        ["docker", "network", "connect", "--alias", "node-a", "quorum_quorum", "quorum-node-a-1"],
        [
            "docker", "compose", "-f", "/srv/quorum/docker-compose.yml", "-p", "quorum",
            "restart", "node-b",
        ],
        ["docker", "kill", "--signal", "TERM", "quorum-node-c-1"],
        [
            "docker", "exec", "quorum-node-a-1", "python", "-m", "quorum", "drain",
            "http://127.0.0.1:32768", "--timeout", "30",
        ],
    ]  # fmt: skip


def test_compose_target_asks_a_cut_off_node_from_inside_its_container() -> None:
    runner = FakeRunner()
    target = ComposeTarget(Path("/x/main/docker-compose.yml"), runner=runner)

    async def ask() -> None:
        await target.partition("node-b")
        import httpx

        async with httpx.AsyncClient() as client:
            await target.members("node-b", client)

    trio.run(ask)
    assert runner.commands[-1][:4] == ["docker", "exec", "main-node-b-1", "python"]
    assert runner.commands[-1][-1] == "http://127.0.0.1:32768/cluster/members"
