"""Node configuration: one TOML file per node (``nodes/node-a.toml``), read with ``tomllib``.

::

    [node]
    name = "node-a"
    listen = "127.0.0.1:32768"        # HTTP API address
    # url = "http://10.0.0.5:32768"   # what other nodes use to reach it (default: from listen)
    max_body_bytes = 4194304
    max_connections = 10000
    body_timeout_s = 30.0             # the request body must arrive by then (else 408)
    send_timeout_s = 30.0             # a client reading nothing for this long is dropped

    [cluster]
    peers = ["http://127.0.0.1:32769", "http://127.0.0.1:32770"]
    # secret = "..."                  # signs the hop of a static cluster (>= 16 characters);
    #                                  # a gossip cluster uses its [gossip].keys instead

    [debug]
    faults = false                     # obey the x-quorum-fault header (tests, scenarios)

    [[backends]]
    model = "mock-chat"
    kind = "mock"                      # "mock", "upstream" or "llamacpp"
    ttft_ms = 40
    itl_ms = 15
    slots = 8

Every problem raises ``ConfigError`` naming the file and the key to fix.

In a file read with ``NodeConfig.from_toml``, any string value may name environment
variables as ``$(NAME)`` (Kubernetes' syntax) or ``${NAME}``; ``$$`` is a literal ``$``. So one
file serves every pod of a StatefulSet: ``name = "$(POD_NAME)"``, ``advertise =
"$(POD_IP):7946"``, ``keys = ["$(QUORUM_GOSSIP_KEY)"]`` (from a Secret). A variable that is
not set is an error, not an empty string.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quorum.routing.config import RoutingConfig

__all__ = [
    "BackendConfig",
    "ConfigError",
    "NodeConfig",
    "RoutingConfig",
    "expand_env",
    "parse_hostport",
]

BACKEND_KINDS = ("mock", "upstream", "llamacpp")


class ConfigError(ValueError):
    """A node config that cannot be used; the message says which key to fix."""


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:32768"`` → ``("127.0.0.1", 32768)``; ``"[::1]:80"`` → ``("::1", 80)``.

    Raises ``ValueError`` for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{text!r} is not host:port")
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)


_ENV_REF = re.compile(r"\$\$|\$\((\w+)\)|\$\{(\w+)\}")


def expand_env(value: Any, environ: Mapping[str, str], *, where: str = "") -> Any:
    """``value`` (parsed TOML: tables, arrays, scalars) with ``$(NAME)`` and ``${NAME}`` in
    its strings replaced by ``environ[NAME]`` and ``$$`` by ``$``; other values unchanged.
    Raises ``ValueError`` naming the key (``where``, dotted) of a variable that is not set."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            if name is None:
                return "$"
            if name not in environ:
                raise ValueError(f"{where or 'a value'}: environment variable {name} is not set")
            return environ[name]

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, Mapping):
        return {
            k: expand_env(v, environ, where=f"{where}.{k}" if where else k)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, environ, where=f"{where}[{i}]") for i, v in enumerate(value)]
    return value


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One ``[[backends]]`` table: ``model``, ``kind`` and the kind's own ``options``."""

    model: str
    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GossipSettings:
    """The ``[gossip]`` table: ``bind`` (host, port) for UDP and TCP, ``seeds`` to join through,
    ``cluster`` name (associated data of every packet), ``keys`` (base64 AES keys, the first
    encrypts), ``preset`` "lan" | "local"."""

    bind: tuple[str, int]
    seeds: tuple[tuple[str, int], ...] = ()
    cluster: str = "quorum"
    keys: tuple[str, ...] = ()
    preset: str = "lan"
    advertise: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node's whole configuration.

    ``host``/``port``: where the HTTP API listens (port 0 picks a free port). ``url``: the
    advertised base URL, None to derive it from the bound address. ``peers``: peer base URLs
    for static membership. ``gossip``: gossip settings, or None for static membership only.
    ``max_connections``: client connections served at once (more are closed at once).
    ``body_timeout_s``: a request body not received by then is answered 408.
    ``send_timeout_s``: a client that reads nothing of its answer for this long is
    disconnected (its work is cancelled, its slot freed). ``secret``: key material for the
    hop's signature in a static cluster (``[cluster] secret``). ``debug_faults``: obey
    ``x-quorum-fault`` from clients (``[debug] faults``).
    """

    name: str
    host: str = "127.0.0.1"
    port: int = 32768
    url: str | None = None
    peers: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    max_connections: int = 10000
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    backends: tuple[BackendConfig, ...] = ()
    gossip: GossipSettings | None = None
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    secret: str | None = None
    debug_faults: bool = False
    source: str = "<config>"

    def hop_secrets(self) -> tuple[bytes, ...]:
        """Key material of the hop's signature: the gossip keys, else ``[cluster] secret``;
        empty when neither is set (allowed on loopback only, see ``quorum.node``)."""
        if self.gossip is not None and self.gossip.keys:
            return tuple(base64.b64decode(k) for k in self.gossip.keys)
        if self.secret is not None:
            return (self.secret.encode(),)
        return ()

    @classmethod
    def from_toml(cls, path: str | Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
        """Read a TOML file, expanding ``$(NAME)``/``${NAME}`` in its strings from ``environ``
        (default ``os.environ``); raises ``ConfigError`` (also for a missing or unparsable
        file, or a variable that is not set)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
            data = expand_env(data, os.environ if environ is None else environ)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "<config>") -> NodeConfig:
        """Build from parsed TOML; raises ``ConfigError``."""

        def fail(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        unknown = set(data) - {"node", "cluster", "backends", "gossip", "routing", "debug"}
        if unknown:
            raise fail(
                f"unknown table(s) {sorted(unknown)}; expected [node], [cluster], "
                "[gossip], [routing], [debug], [[backends]]"
            )
        node = data.get("node")
        if not isinstance(node, Mapping):
            raise fail("missing [node] table")
        name = node.get("name")
        if not isinstance(name, str) or not name:
            raise fail("[node].name must be a non-empty string")
        try:
            host, port = parse_hostport(str(node.get("listen", "127.0.0.1:32768")))
        except ValueError as exc:
            raise fail(f"[node].listen: {exc}") from None
        url = node.get("url")
        if url is not None and not (isinstance(url, str) and url.startswith("http")):
            raise fail("[node].url must be an http(s) URL")
        max_body = node.get("max_body_bytes", 4 << 20)
        if not isinstance(max_body, int) or max_body < 1024:
            raise fail("[node].max_body_bytes must be an integer >= 1024")
        max_connections = node.get("max_connections", 10000)
        if (
            not isinstance(max_connections, int)
            or isinstance(max_connections, bool)
            or (max_connections < 1)
        ):
            raise fail("[node].max_connections must be an integer >= 1")
        timeouts = {}
        for key in ("body_timeout_s", "send_timeout_s"):
            value = node.get(key, 30.0)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise fail(f"[node].{key} must be a number of seconds > 0")
            timeouts[key] = float(value)
        cluster = data.get("cluster", {})
        peers = cluster.get("peers", [])
        if not isinstance(peers, list) or not all(
            isinstance(p, str) and p.startswith("http") for p in peers
        ):
            raise fail("[cluster].peers must be a list of http URLs")
        secret = cluster.get("secret")
        if secret is not None and not (isinstance(secret, str) and len(secret) >= 16):
            raise fail("[cluster].secret must be a string of at least 16 characters")
        debug = data.get("debug", {})
        if not isinstance(debug, Mapping) or set(debug) - {"faults"}:
            raise fail("[debug] takes one key, faults = true | false")
        faults = debug.get("faults", False)
        if not isinstance(faults, bool):
            raise fail("[debug].faults must be true or false")
        backends = []
        seen: set[str] = set()
        for i, table in enumerate(data.get("backends", [])):
            model, kind = table.get("model"), table.get("kind", "mock")
            if not isinstance(model, str) or not model:
                raise fail(f"backends[{i}].model must be a non-empty string")
            if kind not in BACKEND_KINDS:
                raise fail(f"backends[{i}].kind is {kind!r}; it must be one of {BACKEND_KINDS}")
            if model in seen:
                raise fail(f"backends[{i}]: model {model!r} is configured twice")
            seen.add(model)
            options = {k: v for k, v in table.items() if k not in ("model", "kind")}
            backends.append(BackendConfig(model=model, kind=kind, options=options))
        gossip = None
        if "gossip" in data:
            g = data["gossip"]
            try:
                bind = parse_hostport(str(g.get("bind", "127.0.0.1:7946")))
                seeds = tuple(parse_hostport(str(s)) for s in g.get("seeds", []))
                advertise = parse_hostport(str(g["advertise"])) if "advertise" in g else None
            except ValueError as exc:
                raise fail(f"[gossip]: {exc}") from None
            keys = g.get("keys", [])
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise fail("[gossip].keys must be a list of base64 strings")
            for i, key in enumerate(keys):
                try:
                    raw = base64.b64decode(key, validate=True)
                except binascii.Error:
                    raise fail(f"[gossip].keys[{i}] is not base64") from None
                if len(raw) not in (16, 24, 32):
                    raise fail(f"[gossip].keys[{i}] must decode to 16, 24 or 32 bytes")
            preset = g.get("preset", "lan")
            if preset not in ("lan", "local"):
                raise fail("[gossip].preset must be 'lan' or 'local'")
            gossip = GossipSettings(
                bind=bind,
                seeds=seeds,
                cluster=str(g.get("cluster", "quorum")),
                keys=tuple(keys),
                preset=preset,
                advertise=advertise,
            )
        table = data.get("routing", {})
        defaults = RoutingConfig()
        for key, value in table.items():
            if key not in RoutingConfig.__dataclass_fields__:
                raise fail(f"[routing].{key} is not a routing option")
            if isinstance(getattr(defaults, key), int):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise fail(f"[routing].{key} must be an integer >= 1")
            elif not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise fail(f"[routing].{key} must be a number >= 0 (seconds)")
        return cls(
            name=name,
            routing=RoutingConfig(**table),
            host=host,
            port=port,
            url=url,
            peers=tuple(p.rstrip("/") for p in peers),
            max_body_bytes=max_body,
            max_connections=max_connections,
            **timeouts,
            backends=tuple(backends),
            gossip=gossip,
            secret=secret,
            debug_faults=faults,
            source=source,
        )
