"""deploy/kubernetes: every manifest validates against a current Kubernetes release's schema
(kubernetes-validate ships them: no cluster, no network), the parts refer to each other
correctly, node.toml parses with the node's own loader, and the probes and the preStop do
what they say against a real node on loopback."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import trio
import yaml

from quorum.config import NodeConfig
from quorum.node import Node

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.35"  # a current release; kubernetes-validate ships its schemas
KEY = "Hyc80cdrTNfE1LNR7LwwSS2w2AdVpjNshWh4EnRGfTU="  # any 32 bytes, as the Secret holds

# What kustomize does with the parts of kustomization.yaml used here; the renderer below
# refuses any other key, so a patch added later cannot be skipped silently.
KUSTOMIZE_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "configMapGenerator",
    "images",
}


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def render() -> list[dict[str, Any]]:
    """``kustomize build deploy/kubernetes``, for the features it uses (namespace, labels on
    metadata, a ConfigMap generated from files, the image tag), without the binary. The
    generated ConfigMap keeps its bare name (kustomize adds a content hash and rewrites the
    references to it)."""
    kust = kustomization()
    assert set(kust) <= KUSTOMIZE_KEYS, f"render() does not know {set(kust) - KUSTOMIZE_KEYS}"
    docs: list[dict[str, Any]] = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        files = {Path(f).name: (DEPLOY / f).read_text() for f in gen["files"]}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": files,
            }
        )
    images = {i["name"]: i for i in kust.get("images", [])}
    for doc in docs:
        meta = doc["metadata"]
        meta["namespace"] = kust["namespace"]
        for entry in kust.get("labels", []):
            assert not entry.get("includeSelectors"), "render() sets labels on metadata only"
            meta.setdefault("labels", {}).update(entry["pairs"])
        for container in containers(doc):
            image = images.get(container["image"])
            if image is not None:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def node_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in containers(one(docs, "StatefulSet")) if c["name"] == "quorum"]
    return container


def pod_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets, with made-up values for the downward API and the
    Secret; fails on an env source this test does not know."""
    made_up = {
        "metadata.name": "quorum-1",
        "metadata.namespace": "quorum",
        "status.podIP": "10.4.0.7",
    }
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = made_up[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert var["valueFrom"]["secretKeyRef"]["name"] == "quorum-gossip-key"
            env[var["name"]] = KEY
    return env


# --- schemas --------------------------------------------------------------------------------


def test_kustomization_names_every_manifest_and_every_file_it_names_exists() -> None:
    kust = kustomization()
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == manifests
    for gen in kust["configMapGenerator"]:
        assert all((DEPLOY / f).is_file() for f in gen["files"])


@pytest.mark.parametrize("version", [KUBERNETES, kubernetes_validate.latest_version()])
def test_every_rendered_manifest_validates_against_the_kubernetes_schema(
    docs: list[dict[str, Any]], version: str
) -> None:
    """Strict: a misspelt or misplaced field is an error, not ignored."""
    assert {d["kind"] for d in docs} == {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_does_catch_a_misspelt_field(docs: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(one(docs, "StatefulSet")))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


# --- the parts agree ------------------------------------------------------------------------


def test_services_and_budget_select_the_statefulsets_pods(docs: list[dict[str, Any]]) -> None:
    sts = one(docs, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for c in containers(sts) for p in c.get("ports", [])}
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gossip_service_is_headless_lists_unready_pods_and_carries_udp_and_tcp(
    docs: list[dict[str, Any]],
) -> None:
    sts = one(docs, "StatefulSet")
    gossip = one(docs, "Service", sts["spec"]["serviceName"])
    assert gossip["spec"]["clusterIP"] == "None"
    assert gossip["spec"]["publishNotReadyAddresses"] is True  # warming nodes must join
    assert {(p["port"], p["protocol"]) for p in gossip["spec"]["ports"]} == {
        (7946, "UDP"),
        (7946, "TCP"),
    }
    api = one(docs, "Service", "quorum")
    assert api["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in api["spec"]["ports"]] == [32768]


def test_node_toml_parses_with_the_nodes_loader_in_the_pods_environment(
    docs: list[dict[str, Any]], node_container: dict[str, Any]
) -> None:
    sts = one(docs, "StatefulSet")
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    (mount,) = [m for m in node_container["volumeMounts"] if m["name"] == volume["name"]]
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    args = node_container["args"]
    path = Path(args[args.index("--config") + 1])
    assert path.parent == Path(mount["mountPath"]) and path.name in config_map["data"]

    text = config_map["data"][path.name]
    env = pod_env(node_container)
    used = set(re.findall(r"\$[({](\w+)[)}]", text))
    assert used <= set(env), f"node.toml uses {used - set(env)}, which the pod does not set"
    config = NodeConfig.from_toml(DEPLOY / path.name, environ=env)  # the ConfigMap's source
    assert config.name == "quorum-1"
    assert (config.host, config.port) == ("0.0.0.0", 32768)
    assert config.url == "http://10.4.0.7:32768"
    assert config.gossip is not None
    assert config.gossip.bind == ("0.0.0.0", 7946)
    assert config.gossip.advertise == ("10.4.0.7", 7946)
    assert config.gossip.keys == (KEY,)
    namespace = one(docs, "Service", sts["spec"]["serviceName"])["metadata"]["namespace"]
    service = f"{sts['spec']['serviceName']}.{namespace}.svc.cluster.local"
    assert config.gossip.seeds == ((service, 7946),)
    Node(config)  # builds: backends, and a key to sign the hop with beyond loopback


def test_ports_and_probes_match_the_node_config(node_container: dict[str, Any]) -> None:
    config = NodeConfig.from_toml(DEPLOY / "node.toml", environ=pod_env(node_container))
    assert config.gossip is not None
    ports = {p["name"]: p["containerPort"] for p in node_container["ports"]}
    assert ports == {
        "openai": config.port,
        "gossip-udp": config.gossip.bind[1],
        "gossip-tcp": config.gossip.bind[1],
    }
    assert node_container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    local = f"http://127.0.0.1:{config.port}"
    assert local in " ".join(node_container["readinessProbe"]["exec"]["command"])
    assert local in " ".join(node_container["lifecycle"]["preStop"]["exec"]["command"])


def test_grace_period_outlasts_the_prestop_drain(docs: list[dict[str, Any]]) -> None:
    spec = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    (command,) = [c["lifecycle"]["preStop"]["exec"]["command"][-1] for c in spec["containers"]]
    sleep = float(re.search(r"sleep (\d+)", command)[1])  # type: ignore[index]
    timeout = float(re.search(r"--timeout (\d+)", command)[1])  # type: ignore[index]
    node_drain_s = 60.0  # Node.drain's default, the /admin/drain path
    assert sleep + node_drain_s + 5 < sleep + timeout < spec["terminationGracePeriodSeconds"]


# --- the probes and the preStop, run against a real node on loopback --------------------------


def local_command(command: list[str], port: int) -> list[str]:
    """A container's command as this machine runs it: our interpreter and checkout, the
    node's real port, no preStop sleep."""
    if command[:2] == ["sh", "-c"]:
        script = re.sub(r"^sleep \d+;\s*(exec\s+)?", "", command[2])
        command = shlex.split(script)
    command = [c.replace("127.0.0.1:32768", f"127.0.0.1:{port}") for c in command]
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    assert command[0] == "quorum"
    return [sys.executable, "-m", "quorum", *command[1:]]


async def run_command(command: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = await trio.run_process(
        command,
        env=env,
        stdin=b"",
        check=False,
        capture_stdout=True,
        capture_stderr=True,
        cwd=ROOT,
    )
    return result.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pod_node(container: dict[str, Any], port: int, warmup_s: float = 0.0) -> Node:
    """The pod's node on 127.0.0.1 ``port``, without gossip, whose URL names another address
    than the one it listens on, as a pod's names its pod IP."""
    env = {**pod_env(container), "POD_IP": "127.0.0.9"}
    config = NodeConfig.from_toml(DEPLOY / "node.toml", environ=env)
    backends = tuple(
        dataclasses.replace(b, options={**b.options, "warmup_s": warmup_s}) for b in config.backends
    )
    return Node(
        dataclasses.replace(config, host="127.0.0.1", port=port, gossip=None, backends=backends)
    )


async def test_readiness_probe_passes_only_when_ready_and_liveness_passes_while_warming(
    nursery: trio.Nursery, node_container: dict[str, Any]
) -> None:
    ports = {"warming": free_port(), "ready": free_port()}
    warming = pod_node(node_container, ports["warming"], warmup_s=600)
    ready = pod_node(node_container, ports["ready"])
    await nursery.start(warming.run)
    await nursery.start(ready.run)
    probe = node_container["readinessProbe"]["exec"]["command"]
    with trio.fail_after(30):
        assert await run_command(local_command(probe, ports["warming"])) == 1
        assert await run_command(local_command(probe, ports["ready"])) == 0
        async with httpx.AsyncClient() as client:  # what the kubelet's liveness GET sees
            health = await client.get(f"http://127.0.0.1:{ports['warming']}/health")
    assert health.status_code == 200 and health.json()["state"] == "warming"
    warming.stop()
    ready.stop()


async def test_prestop_drains_the_node_through_loopback(node_container: dict[str, Any]) -> None:
    """The node's URL names its pod IP, but /admin/drain answers loopback only: the preStop's
    `quorum drain http://127.0.0.1:32768` must find the drain token all the same."""
    port = free_port()
    node = pod_node(node_container, port)
    assert node.url == "http://127.0.0.9:32768"  # the pod IP's URL, not the listen address
    prestop = node_container["lifecycle"]["preStop"]["exec"]["command"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            assert await run_command(local_command(prestop, port)) == 0
            assert node.draining
        # run() has returned: the drain stopped the node
