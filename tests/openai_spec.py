"""Validate Quorum's output against OpenAI's own published spec (``shared/openai/openapi.json``).

``validate("CreateChatCompletionStreamResponse", chunk)`` raises ``jsonschema.ValidationError``
when ``chunk`` does not match the schema of that name under ``components.schemas``.

The document is loaded once, with every OpenAPI 3.0 ``nullable: true`` rewritten into
``anyOf: [S, {"type": "null"}]`` (JSON Schema ignores ``nullable``), and registered as one
resource under ``urn:openai`` (see ``shared/openai/README.md``). One compiled validator is kept
per schema name.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["SPEC_PATH", "validate", "validator"]

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
