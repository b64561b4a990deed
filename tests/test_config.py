"""Node configs: the shipped ones parse and cover what the cluster promises; bad ones say
which key to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quorum.config import ConfigError, NodeConfig, parse_hostport
from quorum.node import Node
from tests.helpers import NODES, ROOT


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


UPSTREAM = '[node]\nname = "a"\n[[backends]]\nmodel = "m"\nkind = "upstream"\nurl = "http://h/v1"\n'


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[node]\n", "node.name: missing (required)"),
        ('[node]\nname = "a"\nlisten = "nowhere"\n', "node.listen: 'nowhere' is not host:port"),
        (
            '[node]\nname = "a"\nmax_connections = true\n',
            "node.max_connections: expected a valid integer, got True",
        ),
        (
            '[node]\nname = "a"\n[cluster]\npeers = ["ftp://x"]\n',
            "cluster.peers[0]: expected an http(s) URL",
        ),
        (
            '[node]\nname = "a"\n[[backends]]\nkind = "mock"\n',
            "backends[0].model: missing (required)",
        ),
        (
            '[node]\nname = "a"\n[[backends]]\nmodel = "m"\nkind = "tpu"\n',
            "backends[0].kind: expected 'mock', 'upstream' or 'llamacpp', got 'tpu'",
        ),
        (
            '[node]\nname = "a"\n[[backends]]\nmodel = "m"\n[[backends]]\nmodel = "m"\n',
            "backends[1].model: 'm' is configured twice",
        ),
        (
            UPSTREAM + 'slots = "x"\n',
            "backends[0].slots: expected a valid integer, got 'x'",
        ),
        (
            UPSTREAM + "slots = 0\n",
            "backends[0].slots: expected greater than or equal to 1, got 0",
        ),
        (
            '[node]\nname = "a"\n[routing]\nttft_timeout_s = nan\n',
            "routing.ttft_timeout_s: expected a finite number",
        ),
        ('[node]\nname = "a"\n[routing]\nretries = 2\n', "routing.retries: unknown key"),
        (
            '[node]\nname = "a"\n[gossip]\nkeys = ["c2hvcnQ="]\n',
            "gossip.keys[0]: expected a key of 16, 24 or 32 bytes",
        ),
        ('[node]\nname = "a"\n[nodes]\n', "nodes: unknown key"),
        (
            '[node]\nname = "a"\n[conversations]\nstore = "postgres"\n',
            "conversations.dsn: missing (required for postgres)",
        ),
        ('[node]\nname = "a"\n[conversations]\nstore = "redis"\n', "conversations.store"),
        (
            '[node]\nname = "a"\n[conversations]\nstore = "sqlite"\nmax_messages = 0\n',
            "conversations.max_messages",
        ),
        (
            '[node]\nname = "a"\n' + '[[policies]]\nname = "p"\ndetect = "email"\n' * 2,
            "policies[1].name",
        ),
        ("[node\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_field(tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "n.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and line in message
    assert "\n" not in message


def test_bad_backend_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"backends\[0\]\.slots: expected a valid integer"):
        NodeConfig.from_mapping(
            {"node": {"name": "a"}, "backends": [{"model": "m", "kind": "mock", "slots": "many"}]}
        )


def test_quorum_node_with_a_bad_config_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nname = "a"\nlisten = "127.0.0.1:1"\n[[backends]]\nmodel = "m"\n'
                    'kind = "upstream"\nurl = "http://h/v1"\nslots = "x"\n')  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "quorum", "node", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"quorum node: {path}: backends[0].slots: expected a valid integer, got 'x'"
    ]


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


def test_conversations_path_is_a_directory_beside_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text('[node]\nname = "a"\n[conversations]\nstore = "sqlite"\npath = "data"\n')
    settings = NodeConfig.from_toml(path).conversations
    assert settings is not None and settings.store == "sqlite"
    assert settings.path == tmp_path / "data" / "a.sqlite3"
    assert NodeConfig.from_mapping({"node": {"name": "a"}}).conversations is None
