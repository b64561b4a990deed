"""Node configs: the shipped ones parse and cover what the cluster promises; bad ones say
which key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from quorum.config import ConfigError, NodeConfig, parse_hostport
from quorum.node import Node
from tests.helpers import NODES


def test_shipped_cluster_covers_shared_single_and_both_reasoning_styles() -> None:
    configs = [NodeConfig.from_toml(p) for p in sorted(NODES.glob("*.toml"))]
    assert [(c.name, c.port) for c in configs] == [
        ("node-a", 32768),
        ("node-b", 32769),
        ("node-c", 32770),
    ]
    where: dict[str, set[str]] = {}
    fields = set()
    for config in configs:
        for backend in config.backends:
            where.setdefault(backend.model, set()).add(config.name)
            if "reasoning_field" in backend.options:
                fields.add(backend.options["reasoning_field"])
        Node(config)  # every backend table builds
    assert any(len(nodes) == 3 for nodes in where.values())
    assert any(len(nodes) == 1 for nodes in where.values())
    assert fields == {"reasoning_content", "reasoning"}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[node]\n", "[node].name"),
        ('[node]\nname = "a"\nlisten = "nowhere"\n', "[node].listen"),
        ('[node]\nname = "a"\n[cluster]\npeers = ["ftp://x"]\n', "[cluster].peers"),
        ('[node]\nname = "a"\n[[backends]]\nkind = "mock"\n', "backends[0].model"),
        ('[node]\nname = "a"\n[[backends]]\nmodel = "m"\nkind = "tpu"\n', "backends[0].kind"),
        (
            '[node]\nname = "a"\n[[backends]]\nmodel = "m"\n[[backends]]\nmodel = "m"\n',
            "configured twice",
        ),
        ('[node]\nname = "a"\n[nodes]\n', "unknown table"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key_to_fix(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "n.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(path)
    assert complaint in str(info.value) and str(path) in str(info.value)


def test_bad_backend_option_is_a_config_error() -> None:
    config = NodeConfig.from_mapping(
        {"node": {"name": "a"}, "backends": [{"model": "m", "kind": "mock", "slots": "many"}]}
    )
    with pytest.raises(ConfigError, match="'m'"):
        Node(config)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:32768") == ("127.0.0.1", 32768)
    assert parse_hostport("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_hostport("host:99999")


def test_strings_name_environment_variables_as_kubernetes_and_shell_do(tmp_path: Path) -> None:
    """One file for every pod: name, URL, advertised address and keys from the environment."""
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nname = "$(POD_NAME)"\nlisten = "0.0.0.0:32768"\n'
        'url = "http://${POD_IP}:32768"\n'
        '[gossip]\nbind = "0.0.0.0:7946"\nadvertise = "$(POD_IP):7946"\n'
        'seeds = ["quorum-gossip.$(POD_NAMESPACE).svc.cluster.local:7946"]\n'
        'keys = ["$(KEY)"]\ncluster = "costs $$(nothing)"\n'
    )
    key = "Hyc80cdrTNfE1LNR7LwwSS2w2AdVpjNshWh4EnRGfTU="
    env = {"POD_NAME": "quorum-1", "POD_IP": "10.4.0.7", "POD_NAMESPACE": "ml", "KEY": key}
    config = NodeConfig.from_toml(path, environ=env)
    assert config.name == "quorum-1" and config.url == "http://10.4.0.7:32768"
    assert config.gossip is not None
    assert config.gossip.advertise == ("10.4.0.7", 7946)
    assert config.gossip.seeds == (("quorum-gossip.ml.svc.cluster.local", 7946),)
    assert config.gossip.keys == (key,)
    assert config.gossip.cluster == "costs $(nothing)"  # $$ is a literal $


def test_an_unset_environment_variable_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "a"\n[gossip]\nkeys = ["${QUORUM_GOSSIP_KEY}"]\n')
    with pytest.raises(ConfigError, match=r"gossip\.keys\[0\].*QUORUM_GOSSIP_KEY is not set"):
        NodeConfig.from_toml(path, environ={})
