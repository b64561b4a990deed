"""API keys: the ``[auth]`` table, and who a request's ``Authorization: Bearer`` says it is.

::

    [auth]                               # absent: the node is open
    open_metrics = false                 # true: /metrics needs no key (else an admin key)
    keys_file = "keys.toml"              # more [[keys]] tables, relative to the node config
    [[auth.keys]]
    name = "team-a"                      # a metrics label and a gossip field, never secret
    sha256 = "<hex sha256 of the key>"   # keys are never stored in clear
    role = "user"                        # "user" or "admin"
    models = ["mock-chat"]               # optional allowlist; absent: every model
    requests_per_minute = 60             # optional quotas, each cluster-wide
    tokens_per_minute = 20000
    max_concurrent = 8

``quorum keys new NAME`` makes a key (``new_key``) and prints its table. A node keeps only
digests: ``ApiKeys.authenticate`` hashes the presented key and compares it with every
configured digest in constant time, so neither the key nor which key matched leaks through
timing. A key's ``name`` (never the key) is what logs and metrics carry.

No I/O here: ``quorum.config`` reads the files.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from quorum.errors import ApiError, ModelNotFound, Unauthorized

__all__ = [
    "ApiKey",
    "ApiKeys",
    "AuthTable",
    "Caller",
    "DuplicateKey",
    "KeysFile",
    "Role",
    "auth_headers",
    "check_name",
    "digest",
    "model_not_found",
    "new_key",
]

KEY_PREFIX = "sk-quorum-"


class Role(StrEnum):
    """What a key may do: ``user`` calls the API; ``admin`` also reads /metrics and the
    admin routes."""

    USER = "user"
    ADMIN = "admin"


def new_key() -> str:
    """A fresh API key: ``"sk-quorum-"`` + 43 URL-safe base64 characters (256 random bits
    from ``secrets``)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """The hex sha256 (64 lower-case characters) of ``key`` encoded as UTF-8: what the
    config stores in place of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_name(name: str) -> str:
    """``name`` if it can name a key: 1 to 64 letters, digits, ``-``, ``_`` or ``.`` (it
    becomes a metrics label and a gossip field). Raises ``ValueError`` saying so."""
    if not _NAME.fullmatch(name):
        raise ValueError("a key's name is 1 to 64 letters, digits, '-', '_' or '.'")
    return name


def _sha256_hex(text: str) -> str:
    if not _SHA256.fullmatch(text):
        raise ValueError(
            "expected the key's sha256 as 64 hex characters (`quorum keys new` prints it)"
        )
    return text.lower()


KeyName = Annotated[str, AfterValidator(check_name)]
Sha256Hex = Annotated[str, AfterValidator(_sha256_hex)]
"""64 hex characters; upper case is accepted and stored in lower case."""


class _Table(BaseModel):
    # As quorum.config's tables: strict types, no unknown key, immutable.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ApiKey(_Table):
    """One ``[[auth.keys]]`` table.

    ``name``: see ``check_name``. ``sha256``: hex digest of the key (``digest``); upper case
    is accepted and normalised to lower case. ``role``: ``Role``. ``models``: the model names
    the key may use, None for every model (an empty list is refused: it would allow nothing).
    ``requests_per_minute``, ``tokens_per_minute``, ``max_concurrent``: cluster-wide quotas,
    each >= 1, None for no limit.
    """

    name: KeyName
    sha256: Sha256Hex
    # Lax for this one field: TOML gives a string, and strict mode wants a Role instance.
    role: Annotated[Role, Field(strict=False)] = Role.USER
    models: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)


class KeysFile(_Table):
    """A keys file (``[auth] keys_file``): ``[[keys]]`` tables in ``ApiKey``'s form."""

    keys: list[ApiKey] = []


class AuthTable(_Table):
    """The ``[auth]`` table: inline ``keys``; ``keys_file``, a TOML file of more keys
    (``KeysFile``; a relative path is relative to the node config's directory);
    ``open_metrics``, true to serve /metrics without a key (else it needs an admin key).

    Checks each table's shape only: unique names and digests, and at least one key, are
    checked by ``ApiKeys`` over the inline keys and the file's together."""

    keys: list[ApiKey] = []
    keys_file: str | None = Field(default=None, min_length=1)
    open_metrics: bool = False


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from, as its key says.

    ``name``: the key's name (for logs, metrics labels and quota accounting). ``role``:
    ``Role``. ``models``: the allowlist, None for every model. ``requests_per_minute``,
    ``tokens_per_minute``, ``max_concurrent``: the key's cluster-wide quotas, None for none.
    """

    name: str
    role: Role
    models: frozenset[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @classmethod
    def of(cls, key: ApiKey) -> Caller:
        """The caller a configured key stands for."""
        return cls(
            name=key.name,
            role=key.role,
            models=None if key.models is None else frozenset(key.models),
            requests_per_minute=key.requests_per_minute,
            tokens_per_minute=key.tokens_per_minute,
            max_concurrent=key.max_concurrent,
        )

    @property
    def is_admin(self) -> bool:
        """True for an admin key."""
        return self.role is Role.ADMIN

    def may_use(self, model: str) -> bool:
        """True when ``model`` is in the key's allowlist, or the key has none. A model it may
        not use is answered as one that does not exist (``model_not_found``)."""
        return self.models is None or model in self.models


def model_not_found(model: str) -> ApiError:
    """The 404 for a model the cluster does not serve (``ModelNotFound``, code
    ``model_not_found``, ``param`` ``model``). Also the answer for a model outside the key's
    allowlist, so that a key cannot learn which models exist: the text must stay the same
    as ``quorum.routing.select``'s for an unknown model (tests/gateway/test_keys.py checks)."""
    return ModelNotFound(
        f"The model '{model}' does not exist on any node of this cluster. "
        "GET /v1/models lists the models served.",
        param="model",
    )


class DuplicateKey(ValueError):
    """Two configured keys share a name or a digest. ``index``: position of the second in
    the sequence given to ``ApiKeys``; ``field``: ``"name"`` or ``"sha256"``."""

    def __init__(self, message: str, *, index: int, field: str) -> None:
        super().__init__(message)
        self.index = index
        self.field = field


_MISSING = "send Authorization: Bearer <your key>"
_MALFORMED = "the Authorization header must be `Bearer <your key>`"
_WRONG = "the key is not valid: send the whole key, as it was given to you"


class ApiKeys:
    """The configured keys, and the check of a request's ``Authorization`` header.

    ``ApiKeys(keys)``: ``keys``, at least one ``ApiKey``. Raises ``DuplicateKey`` (a
    ``ValueError``) when two share a name or a digest, ``ValueError`` when there is none.
    """

    __slots__ = ("_callers", "_digests")

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        keys = list(keys)
        if not keys:
            raise ValueError("no key configured: add a key with `quorum keys new NAME`")
        names: dict[str, int] = {}
        digests: dict[str, str] = {}
        for i, key in enumerate(keys):
            if key.name in names:
                raise DuplicateKey(
                    f"the name {key.name!r} is already used by another key "
                    f"(each key needs its own name)",
                    index=i,
                    field="name",
                )
            if key.sha256 in digests:
                raise DuplicateKey(
                    f"the same digest as key {digests[key.sha256]!r} "
                    "(each key needs its own secret: `quorum keys new NAME`)",
                    index=i,
                    field="sha256",
                )
            names[key.name] = i
            digests[key.sha256] = key.name
        self._digests = tuple(bytes.fromhex(key.sha256) for key in keys)
        self._callers = tuple(Caller.of(key) for key in keys)

    @property
    def names(self) -> tuple[str, ...]:
        """The keys' names, in configured order: the bounded set of a metrics label."""
        return tuple(c.name for c in self._callers)

    def __len__(self) -> int:
        return len(self._callers)

    def __repr__(self) -> str:
        return f"ApiKeys({list(self.names)!r})"

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller whose key ``authorization`` carries.

        ``authorization``: the header's value (``"Bearer sk-quorum-..."``; the scheme in any
        case, surrounding whitespace ignored), or None when the request has none. The key is
        hashed and compared with every configured digest (``hmac.compare_digest``, no early
        exit), so the time taken does not depend on which key matched.

        Raises ``Unauthorized`` (401, code ``invalid_api_key``) for a missing header, another
        scheme, an empty key or a key that matches none; its message never contains what was
        presented.
        """
        text = (authorization or "").strip()
        if not text:
            raise Unauthorized(_MISSING, code="invalid_api_key")
        scheme, *rest = text.split(None, 1)
        key = rest[0] if rest else ""
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized(_MALFORMED, code="invalid_api_key")
        presented = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        found: Caller | None = None
        for configured, caller in zip(self._digests, self._callers, strict=True):
            if hmac.compare_digest(presented, configured):
                found = caller  # digests are unique: at most one match; keep looping
        if found is None:
            raise Unauthorized(_WRONG, code="invalid_api_key")
        return found


def auth_headers(variable: str = "QUORUM_API_KEY") -> dict[str, str]:
    """For Quorum's own clients (``quorum status``, ``quorum members``, the launcher):
    ``Authorization: Bearer $QUORUM_API_KEY`` when that variable is set, else nothing."""
    key = os.environ.get(variable, "").strip()
    return {"authorization": f"Bearer {key}"} if key else {}
