"""Node configuration: one TOML file per node (``nodes/node-a.toml``), read with ``tomllib``.

::

    [node]
    name = "node-a"
    listen = "127.0.0.1:32768"        # HTTP API address
    # url = "http://10.0.0.5:32768"   # what other nodes use to reach it (default: from listen)
    max_body_bytes = 4194304
    max_connections = 10000
    body_timeout_s = 30.0             # the request head and body must arrive by then
    send_timeout_s = 30.0             # a client reading nothing for this long is dropped

    [cluster]
    peers = ["http://127.0.0.1:32769", "http://127.0.0.1:32770"]
    # secret = "..."                  # signs the hop of a static cluster (>= 16 characters);
    #                                  # a gossip cluster uses its [gossip].keys instead

    [headers]                          # allowlists between clients and upstream servers
    to_upstream = ["content-type", "accept", "x-request-id"]
    to_client = ["content-type", "cache-control", "x-request-id", "x-quota-*", "x-ratelimit-*"]

    [debug]
    faults = false                     # obey the x-quorum-fault header (tests, scenarios)

    [auth]                             # absent: the node is open (it warns at start)
    open_metrics = false               # true: /metrics needs no key (else an admin key)
    # keys_file = "keys.toml"          # more [[keys]] tables, relative to this file
    [[auth.keys]]                      # `quorum keys new NAME` prints one
    name = "team-a"                    # in logs and metrics labels (never the key)
    sha256 = "<hex sha256 of the key>" # keys are never stored in clear
    role = "user"                      # "user" or "admin"
    models = ["mock-chat"]             # optional allowlist; absent: every model
    requests_per_minute = 60           # optional quotas, each cluster-wide
    tokens_per_minute = 20000
    max_concurrent = 8

    [conversations]                    # absent: /c1 answers 404 on this node
    store = "sqlite"                   # "sqlite": a file per node; "postgres": shared
    path = "conversations"             # sqlite: the directory of <node name>.sqlite3,
                                       # relative to this file
    # dsn = "postgresql://quorum@db/quorum"  # postgres: the database
    max_messages = 1000                # per conversation
    max_message_bytes = 1048576        # one message as stored JSON
    max_conversations = 10000          # kept at once per API key (no [auth]: all clients)

    [[policies]]                       # governance rules (quorum.gateway.policy)
    name = "no-emails"
    detect = "email"                   # or regex = "..." with max_match_chars = N
    on = "both"                        # "input", "output" or "both"
    action = "block"                   # or "redact"

    [[backends]]
    model = "mock-chat"
    kind = "mock"                      # "mock", "upstream" or "llamacpp"
    ttft_ms = 40
    itl_ms = 15
    slots = 8

The schema is typed (pydantic models, strict: no string for a number, no boolean for an
integer, no unknown key); every problem raises one ``ConfigError`` that names the file and
the path of the field to fix.

In a file read with ``NodeConfig.from_toml``, any string value may name environment
variables as ``$(NAME)`` (Kubernetes' syntax) or ``${NAME}``; ``$$`` is a literal ``$``. So one
file serves every pod of a StatefulSet: ``name = "$(POD_NAME)"``, ``advertise =
"$(POD_IP):7946"``, ``keys = ["$(QUORUM_GOSSIP_KEY)"]`` (from a Secret). A variable that is
not set is an error, not an empty string. The same holds in the ``[auth] keys_file``.
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
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from quorum.backends.headers import HeaderPolicy
from quorum.backends.mock import MockOptions
from quorum.backends.upstream import UpstreamOptions
from quorum.gateway.keys import ApiKey, ApiKeys, AuthTable, DuplicateKey, KeysFile
from quorum.gateway.policy import DuplicatePolicy, Policies, Policy
from quorum.routing.config import RoutingConfig

__all__ = [
    "BackendConfig",
    "ConfigError",
    "NodeConfig",
    "RoutingConfig",
    "expand_env",
    "parse_hostport",
]


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
class ConversationSettings:
    """The ``[conversations]`` table: ``store`` "sqlite" (``path``: the SQLite file of this
    node) or "postgres" (``dsn``: the database every node shares), and the store's bounds
    (``quorum.conversations.store.Limits``)."""

    store: Literal["sqlite", "postgres"]
    path: Path | None = None
    dsn: str | None = None
    max_messages: int = 1000
    max_message_bytes: int = 1 << 20
    max_conversations: int = 10_000


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node's whole configuration.

    ``host``/``port``: where the HTTP API listens (port 0 picks a free port). ``url``: the
    advertised base URL, None to derive it from the bound address. ``peers``: peer base URLs
    for static membership. ``gossip``: gossip settings, or None for static membership only.
    ``max_connections``: client connections served at once (more are closed at once).
    ``body_timeout_s``: a request body not received by then is answered 408; a connection
    that has not sent a whole request head (or sits idle between requests) that long is closed.
    ``send_timeout_s``: a client that reads nothing of its answer for this long is
    disconnected (its work is cancelled, its slot freed). ``secret``: key material for the
    hop's signature in a static cluster (``[cluster] secret``). ``debug_faults``: obey
    ``x-quorum-fault`` from clients (``[debug] faults``). ``auth``: the API keys (``[auth]``,
    inline and from its ``keys_file``), None when the node is open. ``open_metrics``: with
    ``auth``, serve /metrics without a key (else it needs an admin key). ``headers``: which
    client headers may reach an upstream server and which of its headers may reach the
    client (``[headers] to_upstream`` / ``to_client``, ``quorum.backends.headers``).
    ``conversations``: the ``/c1`` store (``[conversations]``), None when /c1 is off.
    ``policies``: the governance rules (``[[policies]]``, ``quorum.gateway.policy``).
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
    auth: ApiKeys | None = None
    open_metrics: bool = False
    headers: HeaderPolicy = field(default_factory=HeaderPolicy)
    conversations: ConversationSettings | None = None
    policies: Policies = field(default_factory=Policies)
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
        (default ``os.environ``), then the ``[auth] keys_file`` if any (relative to the
        file's directory); raises ``ConfigError`` (also for a missing or unparsable file, or
        a variable that is not set)."""
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
        return cls.from_mapping(data, source=str(path), base_dir=path.parent, environ=environ)

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<config>",
        base_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NodeConfig:
        """Build from parsed TOML; raises ``ConfigError`` with one line that names the file
        and the path of the first bad field: ``nodes/node-a.toml: backends[1].slots:
        expected a valid integer, got 'x'``.

        ``base_dir``: where a relative ``[auth] keys_file`` is (default: the current
        directory). ``environ``: expands the keys file's strings (default ``os.environ``).
        """
        try:
            file = ConfigFile.model_validate(data)
        except ValidationError as exc:
            raise _config_error(source, exc) from None
        auth = None
        if file.auth is not None:
            auth = _api_keys(file.auth, source, base_dir, environ)
        backends = []
        seen: set[str] = set()
        for i, table in enumerate(file.backends):
            if table.model in seen:
                raise ConfigError(
                    f"{source}: backends[{i}].model: {table.model!r} is configured twice"
                )
            seen.add(table.model)
            options = {k: v for k, v in (table.model_extra or {}).items()}
            try:
                validate_backend_options(table.kind, options)
            except ValidationError as exc:
                raise _config_error(source, exc, ("backends", i)) from None
            except ValueError as exc:
                raise ConfigError(f"{source}: backends[{i}]: {exc}") from None
            backends.append(BackendConfig(model=table.model, kind=table.kind, options=options))
        gossip = None
        if file.gossip is not None:
            g = file.gossip
            gossip = GossipSettings(
                bind=parse_hostport(g.bind),
                seeds=tuple(parse_hostport(s) for s in g.seeds),
                cluster=g.cluster,
                keys=tuple(g.keys),
                preset=g.preset,
                advertise=parse_hostport(g.advertise) if g.advertise is not None else None,
            )
        try:
            policies = Policies(file.policies)
        except DuplicatePolicy as exc:
            raise ConfigError(f"{source}: policies[{exc.index}].name: {exc}") from None
        conversations = None
        if file.conversations is not None:
            c = file.conversations
            path = None
            if c.store == "sqlite":
                folder = Path(c.path)
                if not folder.is_absolute() and base_dir is not None:
                    folder = base_dir / folder
                path = folder / f"{file.node.name}.sqlite3"
            elif c.dsn is None:
                raise ConfigError(f"{source}: conversations.dsn: missing (required for postgres)")
            conversations = ConversationSettings(
                c.store, path, c.dsn, c.max_messages, c.max_message_bytes, c.max_conversations
            )
        host, port = parse_hostport(file.node.listen)
        return cls(
            name=file.node.name,
            routing=file.routing,
            host=host,
            port=port,
            url=file.node.url,
            peers=tuple(p.rstrip("/") for p in file.cluster.peers),
            max_body_bytes=file.node.max_body_bytes,
            max_connections=file.node.max_connections,
            body_timeout_s=file.node.body_timeout_s,
            send_timeout_s=file.node.send_timeout_s,
            backends=tuple(backends),
            gossip=gossip,
            secret=file.cluster.secret,
            debug_faults=file.debug.faults,
            auth=auth,
            open_metrics=file.auth is not None and file.auth.open_metrics,
            headers=file.headers,
            conversations=conversations,
            policies=policies,
            source=source,
        )


# --- the schema ----------------------------------------------------------------------------------


def _hostport(text: str) -> str:
    parse_hostport(text)  # raises ValueError, which pydantic reports with the field's path
    return text


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL with a host, e.g. http://10.0.0.5:32768")
    return text


def _aes_key(text: str) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("expected a base64 AES key") from None
    if len(raw) not in (16, 24, 32):
        raise ValueError(f"expected a key of 16, 24 or 32 bytes, this one has {len(raw)}")
    return text


HostPort = Annotated[str, AfterValidator(_hostport)]
HttpBase = Annotated[str, AfterValidator(_http_url)]
AesKey = Annotated[str, AfterValidator(_aes_key)]


class _Table(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class NodeTable(_Table):
    """``[node]``: see ``NodeConfig`` for what each key means."""

    name: str = Field(min_length=1)
    listen: HostPort = "127.0.0.1:32768"
    url: HttpBase | None = None
    max_body_bytes: int = Field(default=4 << 20, ge=1024)
    max_connections: int = Field(default=10000, ge=1)
    body_timeout_s: float = Field(default=30.0, gt=0)
    send_timeout_s: float = Field(default=30.0, gt=0)


class ClusterTable(_Table):
    """``[cluster]``: static ``peers`` (base URLs) and the hop's ``secret``."""

    peers: list[HttpBase] = []
    secret: str | None = Field(default=None, min_length=16)


class GossipTable(_Table):
    """``[gossip]``: see ``GossipSettings``."""

    bind: HostPort = "127.0.0.1:7946"
    seeds: list[HostPort] = []
    cluster: str = Field(default="quorum", min_length=1)
    keys: list[AesKey] = []
    preset: Literal["lan", "local"] = "lan"
    advertise: HostPort | None = None


class DebugTable(_Table):
    """``[debug]``: ``faults`` obeys ``x-quorum-fault`` from clients."""

    faults: bool = False


class ConversationsTable(_Table):
    """``[conversations]``: see ``ConversationSettings``; ``path`` is a directory, relative
    to the config file's."""

    store: Literal["sqlite", "postgres"] = "sqlite"
    path: str = Field(default="conversations", min_length=1)
    dsn: str | None = Field(default=None, min_length=1)
    max_messages: int = Field(default=1000, ge=2, le=100_000)
    max_message_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    max_conversations: int = Field(default=10_000, ge=1, le=100_000_000)


class BackendTable(BaseModel):
    """``[[backends]]``: ``model``, ``kind``; the kind's own options are checked by its
    ``Options`` (``validate_backend_options``)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    model: str = Field(min_length=1)
    kind: Literal["mock", "upstream", "llamacpp"] = "mock"


class ConfigFile(_Table):
    """A node config file, the whole of it."""

    node: NodeTable
    cluster: ClusterTable = ClusterTable()
    gossip: GossipTable | None = None
    routing: RoutingConfig = RoutingConfig()
    headers: HeaderPolicy = HeaderPolicy()
    debug: DebugTable = DebugTable()
    auth: AuthTable | None = None
    conversations: ConversationsTable | None = None
    policies: list[Policy] = []
    backends: list[BackendTable] = []


def _api_keys(
    table: AuthTable, source: str, base_dir: Path | None, environ: Mapping[str, str] | None
) -> ApiKeys:
    """The keys of ``[auth]``: its own, then its ``keys_file``'s; raises ``ConfigError``
    naming the file and the field (``keys.toml: keys[2].sha256: ...``)."""
    located: list[tuple[str, ApiKey]] = [
        (f"{source}: auth.keys[{i}]", key) for i, key in enumerate(table.keys)
    ]
    empty = f"{source}: auth"  # where to add a key when there is none
    if table.keys_file is not None:
        path = Path(table.keys_file)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            data = tomllib.loads(path.read_text())
            data = expand_env(data, os.environ if environ is None else environ)
        except OSError as exc:
            raise ConfigError(
                f"{source}: auth.keys_file: cannot read {path}: {exc.strerror}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        try:
            extra = KeysFile.model_validate(data)
        except ValidationError as exc:
            raise _config_error(str(path), exc) from None
        located += [(f"{path}: keys[{i}]", key) for i, key in enumerate(extra.keys)]
        empty += f" (and its keys_file {path})"
    try:
        return ApiKeys(key for _, key in located)
    except DuplicateKey as exc:
        raise ConfigError(f"{located[exc.index][0]}.{exc.field}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{empty}: {exc}") from None


def validate_backend_options(kind: str, options: Mapping[str, Any]) -> None:
    """Check one backend's own options; raises ``pydantic.ValidationError`` (paths relative
    to the backend's table) or ``ValueError``."""
    if kind == "upstream":
        UpstreamOptions.model_validate(options)
    elif kind == "mock":
        MockOptions.model_validate(options)
    # "llamacpp" checks its options (and that its model file exists) when it is built


def _config_error(
    source: str, exc: ValidationError, prefix: tuple[str | int, ...] = ()
) -> ConfigError:
    error = exc.errors()[0]
    path = ""
    for part in (*prefix, *error["loc"]):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    kind = error["type"]
    message = error["msg"]
    if kind == "missing":
        return ConfigError(f"{source}: {path}: missing (required)")
    if kind == "extra_forbidden":
        return ConfigError(f"{source}: {path}: unknown key")
    message = message.removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
    got = error.get("input")
    shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
    return ConfigError(f"{source}: {path}: {message}, got {shown}")
