"""``quorum.launch``: configs rewired to free ports and written with tomli-w, readiness on
/health, and ending by pid."""

from __future__ import annotations

import signal
import socket
import tomllib
from pathlib import Path

import pytest
import trio

from quorum.config import NodeConfig
from quorum.launch import (
    Address,
    NodeCluster,
    NodeProcess,
    NodeStartError,
    free_port,
    rewire,
    shipped_configs,
    write_nodes,
)
from tests.helpers import NODES

NAMES = ("node-a", "node-b", "node-c")
ADDRESSES = {
    "node-a": Address("127.0.0.1", 41001, 41101),
    "node-b": Address("127.0.0.1", 41002, 41102),
    "node-c": Address("10.9.0.3", 32768, 7946, bind="0.0.0.0"),
}


def test_free_port_is_free_for_tcp_and_udp() -> None:
    port = free_port()
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", port))
        udp.bind(("127.0.0.1", port))


def test_rewire_points_gossip_at_every_other_node_and_keeps_the_rest() -> None:
    shipped = shipped_configs(NODES, NAMES)
    config = rewire(shipped["node-c"], "node-c", ADDRESSES, preset="local")
    assert config["node"] == {
        **shipped["node-c"]["node"],
        "name": "node-c",
        "listen": "0.0.0.0:32768",
        "url": "http://10.9.0.3:32768",
    }
    assert config["gossip"]["bind"] == "10.9.0.3:7946"
    assert config["gossip"]["seeds"] == ["127.0.0.1:41101", "127.0.0.1:41102"]
    assert config["gossip"]["preset"] == "local"
    assert config["gossip"]["keys"] == shipped["node-c"]["gossip"]["keys"]
    assert config["backends"] == shipped["node-c"]["backends"]
    assert "cluster" not in config


def test_rewire_static_lists_the_other_urls_as_peers_and_drops_gossip() -> None:
    shipped = shipped_configs(NODES, NAMES)
    config = rewire(shipped["node-a"], "node-a", ADDRESSES, membership="static")
    assert config["cluster"]["peers"] == ["http://127.0.0.1:41002", "http://10.9.0.3:32768"]
    assert "gossip" not in config


def test_written_configs_are_what_a_node_reads(tmp_path: Path) -> None:
    nodes = write_nodes(tmp_path, shipped_configs(NODES, NAMES), preset="local")
    for node in nodes:
        assert isinstance(node, NodeProcess)
        config = NodeConfig.from_toml(node.config_path)
        assert node.url == f"http://127.0.0.1:{config.port}" == config.url
        assert config.gossip is not None and config.gossip.preset == "local"
        assert len(config.gossip.seeds) == 2
        assert tomllib.loads(node.config_path.read_text())["node"]["name"] == node.name
        assert node.argv[-2:] == ["--config", str(node.config_path)]
        assert node.log_path == tmp_path / f"{node.name}.log"
    ports = {NodeConfig.from_toml(n.config_path).port for n in nodes}
    assert len(ports) == 3


@pytest.mark.slow
async def test_a_node_that_exits_is_reported_with_its_status_and_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nname = "bad"\n[[backends]]\nmodel = "m"\nkind = "gpu"\n')
    node = NodeProcess.of("bad", bad, "http://127.0.0.1:9", log_path=tmp_path / "bad.log")
    await node.start()
    with pytest.raises(NodeStartError) as caught:
        await node.wait_ready(30.0)
    assert caught.value.failures == {"bad": "exited with status 2"}
    assert "backends[0].kind" in caught.value.tails["bad"]
    assert "--- start 1 ---" in node.log_tail(50)


@pytest.mark.slow
async def test_a_cluster_becomes_ready_converges_and_ends_by_pid(tmp_path: Path) -> None:
    cluster = NodeCluster(write_nodes(tmp_path, shipped_configs(NODES, NAMES), preset="local"))
    try:
        await cluster.start_all()
        await cluster.wait_ready(30.0)
        await cluster.wait_converged(30.0)
        cluster.signal("node-b", signal.SIGKILL)
        assert await cluster.wait_exit("node-b", 10.0) == -signal.SIGKILL
        await cluster.start("node-b")
        assert cluster.nodes["node-b"].starts == 2
        await cluster.wait_ready(30.0, names=["node-b"])
    finally:
        with trio.fail_after(30):
            await cluster.close()
    for node in cluster.nodes.values():
        assert not node.running
        assert node.process is not None and node.process.returncode is not None
