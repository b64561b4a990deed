"""docker-compose.yml: three nodes from one image, ports 32768-32770, a /health healthcheck.

There is no Docker engine here; Debian's `docker-compose config` parses and validates the file
without one."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from quorum.config import NodeConfig
from tests.helpers import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("docker-compose") is None,
        reason="docker-compose is not installed (apt-get install -y docker-compose)",
    ),
]


def compose_config() -> dict:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_validates_with_three_nodes_from_one_image() -> None:
    config = compose_config()
    services = config["services"]
    assert set(services) == {"node-a", "node-b", "node-c"}
    assert {s["image"] for s in services.values()} == {"quorum:latest"}
    published = set()
    for name, service in services.items():
        assert service["command"] == ["node", "--config", f"/app/nodes/compose/{name}.toml"]
        assert "/health" in " ".join(service["healthcheck"]["test"])
        for port in service["ports"]:
            published.add(
                int(port["published"]) if isinstance(port, dict) else int(str(port).split(":")[0])
            )
    assert published == {32768, 32769, 32770}


def test_compose_node_configs_name_their_gossip_seeds_by_service() -> None:
    for name in ("node-a", "node-b", "node-c"):
        config = NodeConfig.from_toml(ROOT / "nodes" / "compose" / f"{name}.toml")
        assert config.name == name and config.port == 32768 and config.host == "0.0.0.0"
        assert config.url == f"http://{name}:32768"
        assert config.gossip is not None and config.gossip.bind == ("0.0.0.0", 7946)
        others = {(n, 7946) for n in ("node-a", "node-b", "node-c") if n != name}
        assert set(config.gossip.seeds) == others
