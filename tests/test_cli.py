"""`quorum up` and `quorum node` as real OS processes: the README's cluster command works,
a node that cannot start is reported and the others are stopped, SIGTERM stops everything."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from quorum.launch import Membership, NodeCluster, shipped_configs, write_nodes
from tests.helpers import NODES, ROOT, needs_llamacpp

pytestmark = pytest.mark.slow  # every test here runs quorum as OS processes

MESSAGES = [{"role": "user", "content": "Count to five."}]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def readme_cluster_command() -> list[str]:
    """The cluster half of the README's first command (the install half ran already)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None
    first = block.group(1).splitlines()[0].split("#")[0]
    install, _, run = first.partition("&&")
    assert "pip install" in install
    return shlex.split(run)


def loopback_cluster(
    tmp: Path, *, membership: Membership, preset: str | None = None
) -> NodeCluster:
    """``nodes/*.toml`` on free loopback ports, written to ``tmp`` (not started)."""
    configs = shipped_configs(NODES, ("node-a", "node-b", "node-c"))
    return NodeCluster(write_nodes(tmp, configs, membership=membership, preset=preset))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class Up:
    """A `quorum up` process with its output collected."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = ""
        self.ready = trio.Event()

    async def pump(self) -> None:
        assert self.process.stdout is not None
        async for data in self.process.stdout:
            self.output += data.decode("utf-8", "replace")
            if "Ctrl-C stops the cluster" in self.output:
                self.ready.set()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until it says the cluster is up; a failure with what it printed otherwise."""
        with trio.move_on_after(timeout_s):
            await self.ready.wait()
            return
        pytest.fail(f"`quorum up` was not ready in {timeout_s} s; it printed:\n{self.output}")


async def start_up(nursery: trio.Nursery, args: list[str]) -> Up:
    process = await trio.lowlevel.open_process(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "120"},
    )
    up = Up(process)
    nursery.start_soon(up.pump)
    return up


async def stop_up(up: Up) -> int:
    if up.process.returncode is None:
        up.process.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        return await up.process.wait()


async def test_readme_cluster_command_serves_streams_through_node_a(
    nursery: trio.Nursery,
) -> None:
    ports = (32768, 32769, 32770)
    if any(port_open(p) for p in ports):
        pytest.skip("ports 32768-32770 are in use on this machine")
    args = readme_cluster_command()
    assert args[:3] == ["python3", "-m", "quorum"]
    up = await start_up(nursery, [sys.executable, *args[1:]])
    try:
        await up.wait_ready(40)
        for name in ("node-a", "node-b", "node-c"):
            assert name in up.output
        async with httpx.AsyncClient(timeout=10) as client:
            chunks = 0
            async with client.stream(
                "POST",
                "http://127.0.0.1:32768/v1/chat/completions",
                json={"model": "mock-coder", "stream": True, "messages": MESSAGES},
            ) as response:
                assert response.headers["x-quorum-node"] == "node-c"
                async for _ in response.aiter_raw():
                    chunks += 1
            assert chunks > 3  # tokens arrive one by one, not as one body
    finally:
        status = await stop_up(up)
    assert status == 0, up.output
    assert "cluster stopped" in up.output
    assert not any(port_open(p) for p in ports)


@needs_llamacpp
async def test_up_example_llamacpp_serves_the_real_model_through_node_a(
    nursery: trio.Nursery,
) -> None:
    ports = (32768, 32769, 32770)
    if any(port_open(p) for p in ports):
        pytest.skip("ports 32768-32770 are in use on this machine")
    up = await start_up(nursery, [sys.executable, "-m", "quorum", "up", "--example", "llamacpp"])
    try:
        await up.wait_ready(120)  # a real model loads slowly on a busy machine
        # the curl line it prints, run as it is
        line = re.search(r"curl -N (\S+) .*?\\\n\s+-d '(.*?)'", up.output, re.S)
        assert line is not None, up.output
        url, body = line.group(1), json.loads(line.group(2))
        assert url == "http://127.0.0.1:32768/v1/chat/completions"
        assert body["model"] == "smollm2" and body["stream"] is True
        async with httpx.AsyncClient(timeout=30) as client:
            chunks = 0
            async with client.stream("POST", url, json=body) as response:
                assert response.status_code == 200
                assert response.headers["x-quorum-node"] in ("node-b", "node-c")
                async for _ in response.aiter_raw():
                    chunks += 1
            assert chunks > 3  # real tokens, one by one
    finally:
        status = await stop_up(up)
    assert status == 0, up.output
    assert not any(port_open(p) for p in ports)


async def test_up_names_the_examples_when_asked_for_one_that_does_not_exist() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "quorum", "up", "--example", "nope"],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert "no example 'nope'; there are: llamacpp" in result.stdout.decode()


async def test_a_node_that_cannot_start_is_reported_and_the_others_stopped(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    cluster = loopback_cluster(tmp_path, membership="static")  # only its configs are used
    ports = {name: port_of(url) for name, url in cluster.urls.items()}
    paths = [tmp_path / f"{name}.toml" for name in ports]
    with socket.socket() as blocker:  # node-b's port is taken
        blocker.bind(("127.0.0.1", ports["node-b"]))
        blocker.listen()
        up = await start_up(
            nursery,
            [sys.executable, "-m", "quorum", "up", "--startup-timeout", "30", *map(str, paths)],
        )
        with trio.fail_after(40):
            status = await up.process.wait()
    assert status == 1
    assert "node node-b" in up.output and "failed to start" in up.output
    assert "cannot listen" in up.output
    assert not port_open(ports["node-a"]) and not port_open(ports["node-c"])


async def test_up_rejects_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nname = "x"\n[[backends]]\nmodel = "m"\nkind = "gpu"\n')
    result = await trio.run_process(
        [sys.executable, "-m", "quorum", "up", str(bad)],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert "backends[0].kind" in result.stdout.decode()


async def members(client: httpx.AsyncClient, port: int) -> dict[str, dict]:
    data = (await client.get(f"http://127.0.0.1:{port}/cluster/members")).json()
    return {m["name"]: m for m in data["members"]}


async def test_killed_node_is_dead_everywhere_then_alive_after_restart(tmp_path: Path) -> None:
    """Real processes, gossip on loopback with the LAN preset: kill -9 node-c."""
    cluster = loopback_cluster(tmp_path, membership="gossip", preset="lan")
    ports = {name: port_of(url) for name, url in cluster.urls.items()}
    await cluster.start_all()
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def wait_states(want: str, limit_s: float) -> None:
                with trio.fail_after(limit_s):
                    while True:
                        try:
                            seen = [
                                (await members(client, ports[n]))["node-c"]["state"]
                                for n in ("node-a", "node-b")
                            ]
                            if seen == [want, want]:
                                return
                        except (httpx.HTTPError, KeyError):
                            pass
                        await trio.sleep(0.1)

            await wait_states("alive", 30)
            body = {"model": "mock-coder", "messages": MESSAGES}
            url = cluster.url("node-a") + "/v1/chat/completions"
            assert (await client.post(url, json=body)).headers["x-quorum-node"] == "node-c"

            await cluster.kill("node-c")  # SIGKILL: no goodbye
            await wait_states("dead", 60)  # a deadline, not a target: benchmarks/gossip_sim.py
            refused = await client.post(url, json=body)
            assert refused.status_code == 503  # nobody else serves mock-coder

            await cluster.start("node-c")  # same name, new generation
            await wait_states("alive", 30)
            with trio.fail_after(10):
                while (await client.post(url, json=body)).status_code != 200:
                    await trio.sleep(0.1)
    finally:
        await cluster.close()
