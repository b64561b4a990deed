"""Gossip refuses to start in plaintext where other hosts can reach it, before binding."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from quorum.config import ConfigError, NodeConfig
from quorum.gossip import GossipConfig, GossipNode, NodeMeta
from quorum.gossip.config import PlaintextGossipError, check_encryption
from quorum.node import Node

META = NodeMeta(http_url="http://127.0.0.1:32768", models=("m1",), state="ready")
PLAIN = GossipConfig.local()
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.20", "fe80::1", "db"])
def test_plaintext_gossip_on_a_reachable_bind_is_refused_before_binding(host: str) -> None:
    with pytest.raises(PlaintextGossipError, match=r"set \[gossip\] keys"):
        GossipNode("a", PLAIN, (host, 0), META)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_plaintext_gossip_on_loopback_logs_one_warning(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="quorum.gossip.runner"):
        GossipNode("a", PLAIN, (host, 0), META)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unencrypted" in warnings[0].getMessage()


def test_encrypted_gossip_binds_anywhere_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keyed = PLAIN.replace(keys=(b"k" * 32,))
    with caplog.at_level(logging.WARNING, logger="quorum.gossip.runner"):
        for host in ("0.0.0.0", "::", "10.0.0.5", "127.0.0.1"):
            GossipNode("a", keyed, (host, 0), META)
    assert caplog.records == []


def node_config(bind: str, keys: list[str]) -> NodeConfig:
    # [cluster] secret signs the hop, so that the node itself starts and gossip decides
    return NodeConfig.from_mapping(
        {
            "node": {"name": "n1", "listen": "127.0.0.1:0"},
            "cluster": {"secret": "sixteen+ characters"},
            "gossip": {"bind": bind, "preset": "local", "keys": keys},
            "backends": [{"model": "m", "kind": "mock"}],
        },
        source="n1.toml",
    )


async def test_node_turns_plaintext_on_a_reachable_bind_into_a_config_error() -> None:
    node = Node(node_config("0.0.0.0:0", []))
    with pytest.raises(ConfigError, match=r"n1\.toml: \[gossip\].*set \[gossip\] keys"):
        await node._gossip_node()


def test_a_node_without_any_key_refuses_to_listen_beyond_loopback() -> None:
    config = NodeConfig.from_mapping(
        {"node": {"name": "n1", "listen": "0.0.0.0:0"}, "backends": [{"model": "m"}]},
        source="n1.toml",
    )
    with pytest.raises(ConfigError, match=r"n1\.toml: the node listens on 0\.0\.0\.0"):
        Node(config)


async def test_shipped_node_configs_start_their_gossip() -> None:
    paths = sorted((ROOT / "nodes").glob("*.toml"))
    assert paths
    for path in paths:
        config = NodeConfig.from_toml(path)
        assert config.gossip is not None and config.gossip.keys
        # the shipped seeds and ports as they are; nothing is bound here
        assert isinstance(await Node(config)._gossip_node(), GossipNode)


def test_shipped_compose_configs_bind_every_interface_with_keys() -> None:
    paths = sorted((ROOT / "nodes" / "compose").glob("*.toml"))
    assert paths
    for path in paths:
        config = NodeConfig.from_toml(path)
        assert config.gossip is not None and config.gossip.bind[0] == "0.0.0.0"
        keys = tuple(base64.b64decode(k) for k in config.gossip.keys)
        assert check_encryption(GossipConfig.lan(keys=keys), config.gossip.bind[0]) is False
