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

from quorum import cli
from quorum.scenarios import SCENARIOS, Options, env
from quorum.scenarios import run as run_scenario
from quorum.scenarios.cluster import NETNS_PREFIX, netns_available
from quorum.scenarios.env import MissingTool, partition_method
from quorum.scenarios.target import ComposeTarget
from tests.helpers import ROOT

# The openai SDK stops reading its nested async generators at [DONE] without closing them
# (openai._streaming, and its vendored httpx2/httpcore2); under trio they are finalized by
# GC with a ResourceWarning, as pyproject.toml already allows for httpx and httpcore.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'openai\\.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpx2\\.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore2\\.:ResourceWarning"),
]


@pytest.mark.slow
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


@pytest.mark.slow
# real-model runs a real model: tests/scenarios/test_real_model.py
@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.example is None])
def test_scenario_passes_in_quick_mode(name: str) -> None:
    options = Options(quick=True, trials=1 if name == "rolling-restart" else None)
    if SCENARIOS[name].partitions:
        try:
            method = partition_method(options)
        except MissingTool as exc:
            pytest.skip(str(exc))  # names the package to install
    result = run_scenario(name, options)
    assert result.passed, (result.figures, result.checks, result.notes)
    if SCENARIOS[name].partitions:
        assert method.note in result.notes  # the report says how it cut the node off


# --- what a scenario needs from the machine ----------------------------------------------


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """What ``partition_method`` finds on this (pretend) machine: set the keys."""
    found = {"root": True, "iptables": True, "ip": True, "docker": True}

    def netns_available() -> str | None:
        if not found["root"]:
            return "network namespaces need root"
        return None if found["ip"] else "iproute2 missing (apt-get install -y iproute2)"

    monkeypatch.setattr(env, "_is_root", lambda: found["root"])
    monkeypatch.setattr(env, "_has", lambda program: found[program])
    monkeypatch.setattr(env, "netns_available", netns_available)
    return found


def test_a_partition_uses_iptables_on_loopback_when_it_is_installed(
    machine: dict[str, bool],
) -> None:
    method = partition_method(Options(quick=True))
    assert not method.netns and "iptables" in method.note


def test_without_iptables_a_partition_runs_the_nodes_in_network_namespaces(
    machine: dict[str, bool],
) -> None:
    machine["iptables"] = False
    method = partition_method(Options(quick=True))
    assert method.netns
    assert "network namespaces" in method.note and "iptables is not installed" in method.note


def test_netns_asked_for_is_used_even_with_iptables(machine: dict[str, bool]) -> None:
    assert partition_method(Options(netns=True)).netns


@pytest.mark.parametrize(
    ("missing", "says"),
    [
        (("iptables", "ip"), "apt-get install -y iptables"),
        (("root",), "root"),
        (("docker",), "docker"),
    ],
)
def test_a_partition_without_any_way_to_cut_names_what_to_install(
    machine: dict[str, bool], missing: tuple[str, ...], says: str
) -> None:
    for key in missing:
        machine[key] = False
    target = "compose" if "docker" in missing else "local"
    with pytest.raises(MissingTool, match=says):
        partition_method(Options(quick=True, target=target))


def test_quorum_scenario_partition_without_a_way_to_cut_is_one_line_and_status_2(
    machine: dict[str, bool], capsys: pytest.CaptureFixture[str]
) -> None:
    machine["iptables"] = machine["ip"] = False
    assert cli.main(["scenario", "partition", "--quick"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("quorum scenario partition: ")
    assert "apt-get install -y iptables" in err and "apt-get install -y iproute2" in err


def test_quorum_scenario_without_the_openai_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now fails
    for module in ("runner", "library", "clients"):
        monkeypatch.delitem(sys.modules, f"quorum.scenarios.{module}", raising=False)
    assert cli.main(["scenario", "partition", "--quick"]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "pip install 'quorum[scenarios]'" in err


def _netns_usable() -> str | None:
    if (why := netns_available()) is not None:
        return why
    probe = f"{NETNS_PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@pytest.mark.slow
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
