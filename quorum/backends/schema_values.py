"""JSON values for a JSON Schema: deterministic, bounded, and valid for the schema.

``generate_json(schema, rng)`` draws one value that validates against ``schema``. The mock
backend uses it for tool-call arguments and ``response_format`` content; nothing in here knows
about the mock. The same schema and the same seeded ``random.Random`` give the same value on
every node and in every run.

**The subset of JSON Schema it honours** (a value generated for a schema written in it
validates, which ``tests/backends/test_schema_values.py`` checks with ``jsonschema``):

- ``true``/``false`` as schemas; ``type`` as one name or a list of names;
- objects: ``properties``, ``required``, ``additionalProperties`` (``false`` or a schema),
  ``minProperties``, ``maxProperties``;
- arrays: ``items``, ``prefixItems`` (and the draft 4-7 form: ``items`` as an array with
  ``additionalItems``), ``minItems``, ``maxItems``, ``uniqueItems``;
- strings: ``minLength``, ``maxLength``, ``format`` (date, date-time, time, email, uri, uuid)
  and ``pattern`` (Python ``re`` syntax, without lookahead or lookbehind);
- numbers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum`` (as numbers, or
  as draft 4 flags), ``multipleOf``;
- ``const``, ``enum``, ``anyOf``, ``oneOf`` (one branch is chosen; branches that overlap are
  not told apart), ``allOf`` (its parts are merged into one schema), and local ``$ref``
  (a JSON pointer into the same document, ``#/$defs/...``), recursive ones included.

Ignored (a schema that relies on them may get a value that does not validate): ``not``,
``if``/``then``/``else``, ``contains``, ``dependentRequired``/``dependentSchemas``,
``unevaluated*``, ``patternProperties`` and ``propertyNames`` (they only stop the generator
from inventing extra keys), two ``anyOf``/``oneOf`` that meet in one merged schema (one of
them wins), ``$id`` and ``$anchor``.

**Recursion.** Before generating, the schema's graph is analysed (Knuth's generalisation of
Dijkstra's algorithm to grammars, "A generalization of Dijkstra's algorithm", IPL 1977): for
every subschema, the least nesting its smallest value needs, or infinity when every value
would be infinite (a required property, or a required array item, that leads back to itself
with no way out). Near the top the value is drawn freely; from ``_SHALLOW`` levels down it is
drawn small (optional properties left out, arrays at ``minItems``) and, in a recursive schema,
each ``anyOf``/``oneOf`` or ``type`` list takes the alternative with the least nesting, so
required recursion is cut by a non-recursive branch, a ``null`` type or an optional property
wherever the schema offers one. Where it offers none, ``SchemaError`` says so.

**Bounds.** Everything is bounded by ``SchemaLimits``, whatever the input: subschemas in the
document, steps of resolving, merging and analysis, values and characters generated (past
half of either, the rest of the value is drawn small), nesting, and ``minItems``,
``minProperties``, ``minLength`` and pattern sizes (beyond their caps the schema is refused,
not generated). ``$ref`` and ``allOf`` cycles are found by bookkeeping, never by running out of
stack. With the default limits a call takes milliseconds.
"""

from __future__ import annotations

import heapq
import importlib
import json
import math
import random
import re
import warnings
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypeGuard, TypeVar
from urllib.parse import unquote

from quorum.wire import json_type_name

__all__ = [
    "DEFAULT_LIMITS",
    "WORDS",
    "SchemaError",
    "SchemaLimits",
    "generate_json",
    "infer_type",
]

# The regular-expression parser of the standard library (``sre_parse`` before 3.11, which
# warns on import there). Private, but the only parser of Python's own pattern syntax.
_sre: Any = importlib.import_module("re._parser")
_sc: Any = importlib.import_module("re._constants")

WORDS: Final = tuple(
    """
    the a model answer cluster node request token stream reply system question data result
    value simple clear quick careful small large first second next last every some many few
    each and or but so because while when then if also still just is are was will can should
    might does has makes takes gives runs sends reads keeps finds shows needs uses builds
    checks moves holds starts stops returns follows explains means to of in on for with from
    by at over under through between after before about into across this that these those it
    we you they one two three more most less other same new old good better fast slow steady
    quiet bright plain river mountain garden window morning evening light road city story
    idea reason step path part way time place point case number list table letter word line
    page book note plan problem solution example detail summary method pattern signal
    balance change choice effect level measure order record source probably clearly simply
    really often usually almost exactly together already again here there now today perhaps
    indeed
    """.split()
)
"""The vocabulary strings are drawn from (the mock's text uses it too)."""


class SchemaError(ValueError):
    """The schema has no value this generator can produce, or is over a limit.

    ``message``: what is wrong and, where it helps, how to fix the schema. ``where``: a JSON
    pointer into the schema (``#/properties/a``), or a path through it for recursion.
    """

    def __init__(self, message: str, where: str = "#") -> None:
        super().__init__(message)
        self.message = message
        self.where = where


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """Bounds on one ``generate_json`` call; every one is enforced, whatever the schema.

    ``max_schema_nodes``: subschemas in the document (more: ``SchemaError``). ``max_work``:
    steps of resolving ``$ref``, merging ``allOf``, analysing and pattern generation.
    ``max_values``: JSON values in the output (each object, array, string, number... counts
    one). ``max_chars``: characters of strings and copied ``const``/``enum`` values in the
    output. Past half of ``max_values`` or ``max_chars`` the rest is drawn small (optional
    parts left out); past all of either, ``SchemaError``. ``max_depth``: nesting of the value,
    each ``$ref`` followed counting one level. ``max_items``: the largest ``minItems`` or
    ``minProperties`` accepted. ``max_length``: the largest ``minLength`` accepted, and the
    most characters a ``pattern`` may need. ``max_pattern``: characters of a ``pattern``.
    """

    max_schema_nodes: int = 10_000
    max_work: int = 100_000
    max_values: int = 4_096
    max_chars: int = 65_536
    max_depth: int = 64
    max_items: int = 1_024
    max_length: int = 4_096
    max_pattern: int = 1_000


DEFAULT_LIMITS: Final = SchemaLimits()

Schema = Mapping[str, Any] | bool
_N = TypeVar("_N", int, float)
_D = TypeVar("_D", int, None)
_SHALLOW: Final = 4  # from this depth down, values are drawn small (optional parts left out)
_INF: Final = math.inf
_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})
_KNOWN_TYPES: Final = frozenset(
    {"object", "array", "string", "integer", "number", "boolean", "null"}
)
# Keywords whose value is a schema, a map of schemas, or a list of schemas.
_ONE_SCHEMA: Final = (
    "additionalProperties",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_SCHEMA_MAPS: Final = (
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
)
_SCHEMA_LISTS: Final = ("allOf", "anyOf", "oneOf", "prefixItems")

# Analysis: what a node of the schema graph needs.
_LEAF, _AND, _OR, _NEVER = range(4)


def generate_json(
    schema: Schema, rng: random.Random, *, limits: SchemaLimits = DEFAULT_LIMITS
) -> Any:
    """A JSON value (``dict``/``list``/``str``/``int``/``float``/``bool``/``None``) valid for
    the JSON Schema ``schema`` (a mapping or a boolean), drawn from ``rng``: the same schema
    and the same seeded ``rng`` give the same value. See the module docstring for the subset
    of JSON Schema honoured and for how recursion is cut.

    Raises ``SchemaError`` (a ``ValueError``) when the schema has no finite value (required
    recursion with no way out), has no valid value at all (``false``, an empty ``enum``,
    ``minimum`` above ``maximum``, ...), is malformed (a ``$ref`` to nothing or outside the
    document, a cycle of ``$ref``/``allOf`` with no object or array in between, a pattern that
    does not compile, an unknown type), or is over one of ``limits``. Nothing else escapes.
    """
    return _Generator(schema, rng, limits).run()


def infer_type(schema: Mapping[str, Any]) -> str | None:
    """The JSON type ``schema`` describes: its ``type`` when that is one name, else the type its
    keywords imply (``properties`` -> "object", ``items`` -> "array", ``minLength`` ->
    "string", ``minimum`` -> "number", ...), else None."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind
    if any(
        k in schema
        for k in (
            "properties",
            "required",
            "additionalProperties",
            "minProperties",
            "maxProperties",
            "patternProperties",
        )
    ):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
        return "string"
    if any(
        k in schema
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
    ):
        return "number"
    return None


# --- the graph's nodes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Typed:
    """One type of a schema whose ``type`` is a list: a node of its own in the analysis."""

    schema: Mapping[str, Any]
    kind: str


_Node = Mapping[str, Any] | bool | _Typed
_Expansion = tuple[int, list[tuple[_Node, int, str]], str]


def _key(node: _Node) -> Hashable:
    # Every node is kept alive by the generator's caches (or the document) while it runs.
    if isinstance(node, _Typed):
        return (id(node.schema), node.kind)
    return id(node)


@dataclass(frozen=True, slots=True)
class _Pattern:
    parsed: Any  # re._parser.SubPattern
    ignore_case: bool
    anchored_end: bool  # has $ or \Z: padding at the end could break the match


# --- the generator --------------------------------------------------------------------------


class _Generator:
    __slots__ = (
        "_branch_cache",
        "_chars",
        "_deref_cache",
        "_expansions",
        "_flat_cache",
        "_heights",
        "_limits",
        "_norm_cache",
        "_patterns",
        "_recursive",
        "_ref_cache",
        "_rng",
        "_root",
        "_targets",
        "_values",
        "_work",
    )

    def __init__(self, root: Schema, rng: random.Random, limits: SchemaLimits) -> None:
        self._root = root
        self._rng = rng
        self._limits = limits
        self._work = 0
        self._values = 0
        self._chars = 0
        self._recursive = False
        self._targets: dict[str, Schema] = {}
        self._patterns: dict[str, _Pattern] = {}
        # Derived schemas, keyed by the ids of what they were made from; each entry keeps
        # its source alive so that ids stay unique while the generator runs.
        self._ref_cache: dict[int, tuple[Any, Schema]] = {}
        self._deref_cache: dict[int, tuple[Any, Schema]] = {}
        self._flat_cache: dict[int, tuple[Any, Schema]] = {}
        self._norm_cache: dict[int, tuple[Any, Schema, int, str]] = {}
        self._branch_cache: dict[tuple[int, str], tuple[Any, list[tuple[Any, Schema]]]] = {}
        self._expansions: dict[Hashable, _Expansion] = {}
        self._heights: dict[Hashable, float] = {}

    def run(self) -> Any:
        try:
            self._lint()
            height = self._height(self._root)
            if height == _INF:
                raise SchemaError(self._explain(self._root))
            if height > self._limits.max_depth:
                raise SchemaError(
                    f"the schema's smallest value nests {int(height)} levels deep (each $ref "
                    f"counts one); the limit is {self._limits.max_depth}"
                )
            return self._value(self._root, 0)
        except (RecursionError, OverflowError, ZeroDivisionError) as exc:
            # Belt and braces: the bookkeeping above should make these impossible.
            raise SchemaError(f"the schema cannot be generated for: {exc!r}") from None

    # -- budgets ----------------------------------------------------------------------------

    def _spend(self, steps: int) -> None:
        self._work += steps
        if self._work > self._limits.max_work:
            raise SchemaError(
                f"the schema needs more than {self._limits.max_work} steps of resolving, "
                "merging and analysis; simplify it (fewer $ref/allOf combinations)"
            )

    def _count_value(self) -> None:
        self._values += 1
        if self._values > self._limits.max_values:
            raise SchemaError(
                f"the schema's value needs more than {self._limits.max_values} JSON values "
                "even when drawn as small as the schema allows"
            )

    def _add_chars(self, n: int) -> None:
        self._chars += n
        if self._chars > self._limits.max_chars:
            raise SchemaError(
                f"the schema's value needs more than {self._limits.max_chars} characters of "
                "strings and constants even when drawn as small as the schema allows"
            )

    @property
    def _soft(self) -> bool:
        """Past half of a budget: draw the rest small."""
        limits = self._limits
        return self._values > limits.max_values // 2 or self._chars > limits.max_chars // 2

    def _small(self, depth: int) -> bool:
        return depth >= _SHALLOW or self._soft

    # -- checking the document --------------------------------------------------------------

    def _lint(self) -> None:
        """Walk every subschema once: shapes of keywords, caps, ``$ref`` targets, patterns;
        resolve every ``$ref``/``allOf`` (so a cycle of them is refused wherever it is, not
        only where the value happens to go); and note whether any ``$ref`` leads back into a
        subschema that contains it (the schema is recursive)."""
        root = self._root
        parent: dict[int, int | None] = {}
        refs: list[tuple[int, Schema]] = []
        stack: list[tuple[Any, str, int | None]] = [(root, "#", None)]
        seen_targets: list[tuple[Schema, str]] = []
        resolve: list[Mapping[str, Any]] = []
        count = 0
        while True:
            if not stack:
                # Targets outside the usual keywords (``#/examples/0``) are checked too.
                stack = [
                    (target, ref, None)
                    for target, ref in seen_targets
                    if isinstance(target, Mapping) and id(target) not in parent
                ]
                seen_targets = []
                if not stack:
                    break
            node, where, up = stack.pop()
            if isinstance(node, bool):
                continue
            if not isinstance(node, Mapping):
                raise SchemaError(
                    "a schema must be an object or a boolean, "
                    f"not {json_type_name(node)} (at {where})",
                    where,
                )
            if id(node) in parent:
                continue
            parent[id(node)] = up
            count += 1
            if count > self._limits.max_schema_nodes:
                raise SchemaError(
                    f"the schema has more than {self._limits.max_schema_nodes} subschemas"
                )
            self._spend(1)
            self._check_keywords(node, where)
            if "$ref" in node:
                target = self._target(node["$ref"], where)
                refs.append((id(node), target))
                seen_targets.append((target, str(node["$ref"])))
                resolve.append(node)
            elif "allOf" in node:
                resolve.append(node)
            for sub, sub_where in _subschemas(node, where):
                stack.append((sub, sub_where, id(node)))
        for node in resolve:  # cycles of $ref/allOf are refused wherever they are
            self._normalize(node)
        self._recursive = _has_cycle(id(root) if isinstance(root, Mapping) else 0, refs, parent)

    def _check_keywords(self, node: Mapping[str, Any], where: str) -> None:
        for key in ("$dynamicRef", "$recursiveRef"):
            if key in node:
                raise SchemaError(f"'{key}' is not supported; use '$ref' (at {where})", where)
        kind = node.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            for k in kinds:
                if not isinstance(k, str) or k not in _KNOWN_TYPES:
                    raise SchemaError(
                        f"'type' {k!r} is not a JSON Schema type (object, array, string, "
                        f"integer, number, boolean, null) (at {where}/type)",
                        f"{where}/type",
                    )
        for key in ("enum", "required", *_SCHEMA_LISTS):
            if key in node and not isinstance(node[key], list):
                raise SchemaError(f"'{key}' must be an array (at {where}/{key})", f"{where}/{key}")
        for key in _SCHEMA_MAPS:
            if key in node and not isinstance(node[key], Mapping):
                raise SchemaError(f"'{key}' must be an object (at {where}/{key})", f"{where}/{key}")
        limits = self._limits
        for key, cap in (
            ("minItems", limits.max_items),
            ("minProperties", limits.max_items),
            ("minLength", limits.max_length),
        ):
            value = _count(node.get(key), 0)
            if value > cap:
                raise SchemaError(
                    f"'{key}' is {value}; the generator accepts at most {cap} (at {where})",
                    f"{where}/{key}",
                )
        for key in _NUMBER_KEYS:
            bound = node.get(key)
            if isinstance(bound, int) and not isinstance(bound, bool) and abs(bound) >= 2**1000:
                raise SchemaError(
                    f"'{key}' is too large for the generator to work with (at {where})",
                    f"{where}/{key}",
                )
        if "pattern" in node:
            self._pattern(node["pattern"], f"{where}/pattern")

    def _target(self, ref: Any, where: str = "#") -> Schema:
        """The subschema a ``$ref`` points to; ``SchemaError`` when it points nowhere."""
        if not isinstance(ref, str):
            raise SchemaError(
                f"'$ref' must be a string, not {json_type_name(ref)} (at {where})", where
            )
        hit = self._targets.get(ref)
        if hit is not None:
            return hit
        if not ref.startswith("#"):
            raise SchemaError(
                f"'$ref' {ref!r} points outside this schema; only local references such as "
                f"'#/$defs/name' are supported (at {where})",
                where,
            )
        fragment = unquote(ref[1:])
        if fragment and not fragment.startswith("/"):
            raise SchemaError(
                f"'$ref' {ref!r} names an anchor; only JSON pointers such as '#/$defs/name' are "
                f"supported (at {where})",
                where,
            )
        node: Any = self._root
        for raw in fragment.split("/")[1:] if fragment else ():
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif (
                isinstance(node, list)
                and part.isascii()
                and part.isdigit()
                and len(part) < 10
                and int(part) < len(node)
            ):
                node = node[int(part)]
            else:
                raise SchemaError(
                    f"'$ref' {ref!r} points to nothing in the schema (at {where})", where
                )
        if not isinstance(node, Mapping | bool):
            raise SchemaError(
                f"'$ref' {ref!r} points to {json_type_name(node)}, not a schema (at {where})", where
            )
        self._targets[ref] = node
        return node

    # -- resolving and merging --------------------------------------------------------------

    def _ref_step(self, schema: Mapping[str, Any]) -> Schema:
        """``schema`` with its ``$ref`` replaced by the target, the siblings merged in."""
        hit = self._ref_cache.get(id(schema))
        if hit is not None:
            return hit[1]
        target = self._target(schema["$ref"])
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        out = self._conj(target, rest) if rest else target
        self._ref_cache[id(schema)] = (schema, out)
        return out

    def _deref(self, schema: Mapping[str, Any]) -> Schema:
        """``schema`` with top-level ``$ref``s followed until there is none."""
        hit = self._deref_cache.get(id(schema))
        if hit is not None:
            return hit[1]
        cur: Schema = schema
        seen: set[str] = set()
        while isinstance(cur, Mapping) and "$ref" in cur:
            self._spend(1)
            ref = cur["$ref"]
            if ref in seen:
                raise SchemaError(_ref_cycle(ref))
            seen.add(ref)
            cur = self._ref_step(cur)
        self._deref_cache[id(schema)] = (schema, cur)
        return cur

    def _normalize(self, schema: Mapping[str, Any]) -> tuple[Schema, int, str]:
        """``schema`` with ``$ref``s followed and ``allOf`` merged in: the schema that says
        what the value is, how many ``$ref``s were followed (each counts one level of depth),
        and those refs as a label."""
        hit = self._norm_cache.get(id(schema))
        if hit is not None:
            return hit[1], hit[2], hit[3]
        cur: Schema = schema
        hops = 0
        seen: list[str] = []
        while isinstance(cur, Mapping) and "$ref" in cur:
            self._spend(1)
            ref = cur["$ref"]
            if ref in seen:
                raise SchemaError(_ref_cycle(ref))
            seen.append(ref)
            cur = self._ref_step(cur)
            hops += 1
        if isinstance(cur, Mapping) and "allOf" in cur and "const" not in cur and "enum" not in cur:
            cur = self._flatten(cur, frozenset(), 0)
        label = " -> ".join(f"$ref {ref!r}" for ref in seen)
        self._norm_cache[id(schema)] = (schema, cur, hops, label)
        return cur, hops, label

    def _flatten(self, schema: Mapping[str, Any], above: frozenset[int], level: int) -> Schema:
        """``schema`` with its ``allOf`` parts (``$ref``s followed, their own ``allOf`` merged
        first) merged in order. ``above``: the parts being merged around this one; meeting one
        again is a cycle."""
        hit = self._flat_cache.get(id(schema))
        if hit is not None:
            return hit[1]
        if level > self._limits.max_depth:
            raise SchemaError(f"'allOf' is nested more than {self._limits.max_depth} levels deep")
        merged: Schema = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            self._spend(1)
            if not isinstance(part, Mapping):
                if part is False:
                    merged = False
                continue
            if id(part) in above:
                raise SchemaError(
                    "'allOf' includes itself (through '$ref'), so the schema is defined only in "
                    "terms of itself; put the recursion under a property or items instead"
                )
            sub = self._deref(part)
            if isinstance(sub, Mapping) and "allOf" in sub:
                sub = self._flatten(sub, above | {id(part)}, level + 1)
            merged = self._conj(merged, sub)
        self._flat_cache[id(schema)] = (schema, merged)
        return merged

    def _conj(self, a: Schema, b: Schema) -> Schema:
        """Both schemas' constraints in one (best effort; see ``_merge``)."""
        if a is False or b is False:
            return False
        if a is True:
            return dict(b) if isinstance(b, Mapping) else True
        if b is True:
            return dict(a) if isinstance(a, Mapping) else True
        assert isinstance(a, Mapping) and isinstance(b, Mapping)
        return self._merge(a, b)

    def _merge(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        """``a`` and ``b`` in one schema: properties combined (a name in both gets an
        ``allOf`` of the two), ``required`` and ``allOf`` joined, the tighter bound of each
        min/max, the common types and enum values; otherwise ``b``'s keyword wins."""
        self._spend(len(a) + len(b))
        out = dict(a)
        for key, value in b.items():
            if key not in out:
                out[key] = value
                continue
            old = out[key]
            if key == "properties" and isinstance(old, Mapping) and isinstance(value, Mapping):
                self._spend(len(old) + len(value))
                props = dict(old)
                for name, sub in value.items():
                    props[name] = {"allOf": [props[name], sub]} if name in props else sub
                out[key] = props
            elif key in ("required", "allOf") and isinstance(old, list) and isinstance(value, list):
                self._spend(len(old) + len(value))
                if key == "required":
                    out[key] = list(dict.fromkeys([*old, *value]))
                else:
                    ids = {id(x) for x in old}
                    out[key] = [*old, *(x for x in value if id(x) not in ids)]
            elif key in _MIN_KEYS and _is_number(old) and _is_number(value):
                out[key] = max(old, value)
            elif key in _MAX_KEYS and _is_number(old) and _is_number(value):
                out[key] = min(old, value)
            elif key == "type":
                olds = set(old) if isinstance(old, list) else {old}
                news = set(value) if isinstance(value, list) else {value}
                if "number" in olds and "integer" in news:
                    olds.add("integer")
                if "number" in news and "integer" in olds:
                    news.add("integer")
                both = [t for t in (value if isinstance(value, list) else [value]) if t in olds]
                out[key] = both[0] if len(both) == 1 else (both or value)
            elif key == "enum" and isinstance(old, list) and isinstance(value, list):
                out[key] = self._common(old, value) or value
            elif key == "additionalProperties" and (old is False or value is False):
                out[key] = False
            else:
                out[key] = value
        return out

    def _common(self, old: list[Any], new: list[Any]) -> list[Any]:
        """The values of ``new`` that are also in ``old`` (Python equality, as ``in`` has)."""
        try:
            lookup: Any = set(old)
            self._spend((len(old) + len(new)) // 16)  # hashing is cheap next to a merge step
        except TypeError:  # unhashable members (objects, arrays): compare pairwise
            lookup = old
            self._spend(len(old) * len(new))
        return [v for v in new if v in lookup]

    def _branches(self, schema: Mapping[str, Any], key: str) -> list[tuple[Any, Schema]]:
        """Each option of ``schema[key]`` (anyOf/oneOf, ``false`` ones left out) with the
        schema it makes: the option, ``$ref``s followed, merged with ``schema``'s other
        keywords."""
        hit = self._branch_cache.get((id(schema), key))
        if hit is not None:
            return hit[1]
        rest = {k: v for k, v in schema.items() if k != key}
        out: list[tuple[Any, Schema]] = []
        for option in schema[key]:
            self._spend(1)
            if option is False:
                continue
            if isinstance(option, Mapping):
                out.append((option, self._conj(rest, self._deref(option))))
            else:
                out.append((option, rest or option))
        self._branch_cache[(id(schema), key)] = (schema, out)
        return out

    # -- analysis: the least nesting of each subschema's smallest value ----------------------

    def _expansion(self, node: _Node) -> _Expansion:
        """What ``node``'s smallest value needs: nothing (leaf), all of its children (and), one
        of them (or), or it cannot exist (never, with the reason). Children come with the
        depth they add and a label for messages."""
        key = _key(node)
        hit = self._expansions.get(key)
        if hit is not None:
            return hit
        self._spend(1)
        out = self._expand(node)
        self._spend(len(out[1]))
        self._expansions[key] = out
        return out

    def _expand(self, node: _Node) -> _Expansion:
        if isinstance(node, _Typed):
            return self._expand_typed(node.schema, node.kind)
        if node is True:
            return _LEAF, [], ""
        if node is False:
            return _NEVER, [], "a 'false' schema matches nothing"
        flat, hops, label = self._normalize(node)
        if flat is not node:
            return _AND, [(flat, hops, label or "allOf")], ""
        if not isinstance(flat, Mapping):  # pragma: no cover - normalize keeps mappings
            return _LEAF, [], ""
        if "const" in flat:
            return _LEAF, [], ""
        if "enum" in flat:
            return (_LEAF, [], "") if flat["enum"] else (_NEVER, [], "'enum' is empty")
        for key in ("anyOf", "oneOf"):
            if key in flat:
                branches = self._branches(flat, key)
                if not branches:
                    return _NEVER, [], f"'{key}' has no branch that can match"
                options = flat[key]
                indexes = [i for i, o in enumerate(options) if o is not False]
                return (
                    _OR,
                    [(b, 0, f"{key}[{i}]") for i, (_, b) in zip(indexes, branches, strict=True)],
                    "",
                )
        kind = flat.get("type")
        if isinstance(kind, list):
            kinds = list(dict.fromkeys(k for k in kind if isinstance(k, str)))
            if not kinds:
                return _NEVER, [], "'type' lists no type"
            return _OR, [(_Typed(flat, k), 0, f"type {k}") for k in kinds], ""
        if kind is None:
            kind = infer_type(flat)
        if kind is None:
            return _LEAF, [], ""
        return self._expand_typed(flat, kind)

    def _expand_typed(self, schema: Mapping[str, Any], kind: str) -> _Expansion:
        children: list[tuple[_Node, int, str]] = []
        if kind == "object":
            props, required, extra, may_add, min_props, max_props = _object_parts(schema)
            if max_props is not None and (len(required) > max_props or min_props > max_props):
                return _NEVER, [], "'maxProperties' is below what 'required'/'minProperties' need"
            for name in required:
                if name in props:
                    children.append((props[name], 1, f"properties.{name}"))
                elif extra is False:
                    return (
                        _NEVER,
                        [],
                        f"required property {name!r} is not in 'properties' and "
                        "'additionalProperties' is false",
                    )
                else:
                    sub = extra if isinstance(extra, Mapping) else _EMPTY
                    children.append((sub, 1, f"properties.{name}"))
            need = min_props - len(required)
            if need > 0:
                if may_add:
                    if isinstance(extra, Mapping) and extra:
                        children.append((extra, 1, "additionalProperties"))
                else:
                    optional = [(n, s) for n, s in props.items() if n not in required]
                    if len(optional) < need:
                        return _NEVER, [], "'minProperties' asks for more properties than allowed"
                    children.extend((s, 1, f"properties.{n}") for n, s in optional[:need])
            return _AND, children, ""
        if kind == "array":
            prefix, items, lo, hi = _array_parts(schema)
            if hi is not None and hi < lo:
                return _NEVER, [], "'minItems' is above 'maxItems'"
            for i in range(min(lo, len(prefix))):
                children.append((prefix[i], 1, f"prefixItems[{i}]"))
            if lo > len(prefix):
                if items is False:
                    return _NEVER, [], "'minItems' asks for more items than 'prefixItems' allows"
                children.append((items, 1, "items"))
            return _AND, children, ""
        if kind == "string":
            lo_len = _count(schema.get("minLength"), 0)
            hi_len = _count(schema.get("maxLength"), None)
            if hi_len is not None and lo_len > hi_len:
                return _NEVER, [], "'minLength' is above 'maxLength'"
            return _LEAF, [], ""
        if kind in ("integer", "number"):
            if _empty_range(schema, kind):
                return _NEVER, [], f"no {kind} lies between the schema's minimum and maximum"
            return _LEAF, [], ""
        return _LEAF, [], ""

    def _height(self, node: _Node) -> float:
        """The least depth ``node``'s smallest value adds (infinity: it has none)."""
        key = _key(node)
        known = self._heights.get(key)
        if known is not None:
            return known
        self._analyse(node)
        return self._heights[key]

    def _fits(self, node: _Node, depth: int) -> bool:
        return depth + self._height(node) <= self._limits.max_depth

    def _analyse(self, start: _Node) -> None:
        """Heights of every node reachable from ``start`` not yet known: Knuth's algorithm
        (a Dijkstra for "and/or" graphs: an and-node is done when all its children are, an
        or-node with its first child done), with a heap of tentative heights."""
        heights = self._heights
        found: dict[Hashable, _Expansion] = {}
        todo: list[_Node] = [start]
        while todo:
            node = todo.pop()
            key = _key(node)
            if key in heights or key in found:
                continue
            expansion = self._expansion(node)
            found[key] = expansion
            for child, _, _ in expansion[1]:
                ck = _key(child)
                if ck not in heights and ck not in found:
                    todo.append(child)
        parents: dict[Hashable, list[tuple[Hashable, int]]] = {}
        pending: dict[Hashable, int] = {}
        best: dict[Hashable, float] = {}
        heap: list[tuple[float, int, Hashable]] = []
        tick = 0
        for key, (op, children, _) in found.items():
            if op == _LEAF or (op == _AND and not children):
                heap.append((0, tick, key))
                tick += 1
            elif op == _AND:
                waiting, most = 0, 0.0
                for child, cost, _ in children:
                    ck = _key(child)
                    if ck in heights:
                        most = max(most, heights[ck] + cost)
                    else:
                        waiting += 1
                        parents.setdefault(ck, []).append((key, cost))
                if waiting:
                    pending[key], best[key] = waiting, most
                elif most < _INF:
                    heap.append((most, tick, key))
                    tick += 1
            elif op == _OR:
                for child, cost, _ in children:
                    ck = _key(child)
                    if ck in heights:
                        if heights[ck] < _INF:
                            heap.append((heights[ck] + cost, tick, key))
                            tick += 1
                    else:
                        parents.setdefault(ck, []).append((key, cost))
        heapq.heapify(heap)
        done: dict[Hashable, float] = {}
        while heap:
            height, _, key = heapq.heappop(heap)
            if key in done:
                continue
            done[key] = height
            self._spend(1)
            for parent, cost in parents.get(key, ()):
                if parent in done:
                    continue
                if found[parent][0] == _OR:
                    heapq.heappush(heap, (height + cost, tick, parent))
                    tick += 1
                else:
                    best[parent] = max(best[parent], height + cost)
                    pending[parent] -= 1
                    if pending[parent] == 0 and best[parent] < _INF:
                        heapq.heappush(heap, (best[parent], tick, parent))
                        tick += 1
        for key in found:
            heights[key] = done.get(key, _INF)

    def _explain(self, root: _Node) -> str:
        """Why ``root`` has no finite value: the first impossible part, or the loop."""
        path: list[str] = []
        seen: set[Hashable] = set()
        node = root
        while True:
            key = _key(node)
            op, children, reason = self._expansion(node)
            where = " -> ".join(path) or "the top level"
            if op == _NEVER:
                return f"the schema has no valid value: {reason} (at {where})"
            if key in seen:
                return (
                    f"the schema has no finite value: {where} leads back to where it started "
                    "and every step on the way is required, so the value would never end. "
                    "Make a property on that path optional, allow null there (for example "
                    '"type": ["object", "null"]), or add an anyOf/oneOf branch that does '
                    "not recurse"
                )
            seen.add(key)
            stuck = [(c, label) for c, _, label in children if self._heights.get(_key(c)) == _INF]
            if not stuck:  # pragma: no cover - a node of infinite height has such a child
                return f"the schema has no finite value (at {where})"
            node, label = stuck[0]
            path.append(label)

    # -- generation -------------------------------------------------------------------------

    def _value(self, schema: Schema, depth: int) -> Any:
        self._count_value()
        if not isinstance(schema, Mapping):
            if schema is False:
                raise SchemaError("a 'false' schema matches nothing")
            return self._word()
        flat, hops, _ = self._normalize(schema)
        depth += hops
        if depth > self._limits.max_depth:
            raise SchemaError(
                f"the value would nest more than {self._limits.max_depth} levels deep"
            )
        if not isinstance(flat, Mapping):
            if flat is False:
                raise SchemaError("a 'false' schema matches nothing")
            return self._word()
        if "const" in flat:
            return self._copy(flat["const"])
        if "enum" in flat:
            if not flat["enum"]:
                raise SchemaError("'enum' is empty")
            return self._copy(self._rng.choice(flat["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in flat:
                return self._value(self._choose_branch(flat, key, depth), depth)
        kind = flat.get("type")
        if isinstance(kind, list):
            kind = self._choose_type(flat, kind, depth)
        if kind is None:
            kind = infer_type(flat)
        if kind == "object":
            return self._object(flat, depth)
        if kind == "array":
            return self._array(flat, depth)
        if kind == "string":
            return self._string(flat)
        if kind in ("integer", "number"):
            try:
                return self._integer(flat) if kind == "integer" else self._number(flat)
            except SchemaError:
                raise
            except (OverflowError, ZeroDivisionError, ValueError):
                raise SchemaError(
                    f"the {kind}'s minimum, maximum and multipleOf are too extreme to generate "
                    "a number for"
                ) from None
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return self._word()

    def _choose_branch(self, schema: Mapping[str, Any], key: str, depth: int) -> Schema:
        branches = self._branches(schema, key)
        fit = [(o, b) for o, b in branches if self._fits(b, depth)]
        if not fit:
            raise SchemaError(f"no '{key}' branch has a value within the nesting limit")
        if self._small(depth):
            if self._recursive:
                return min(fit, key=lambda ob: self._height(ob[1]))[1]
            for option, branch in fit:
                o = self._deref(option) if isinstance(option, Mapping) else option
                if isinstance(o, Mapping) and infer_type(o) not in ("object", "array"):
                    return branch
        return self._rng.choice(fit)[1]

    def _choose_type(self, schema: Mapping[str, Any], kinds: list[Any], depth: int) -> str | None:
        names = [k for k in kinds if isinstance(k, str)]
        if not names:
            return None
        fit = [k for k in names if self._fits(_Typed(schema, k), depth)]
        if not fit:
            raise SchemaError("no type in 'type' has a value within the nesting limit")
        if self._small(depth):
            if "null" in fit:
                return "null"
            if self._recursive:
                return min(fit, key=lambda k: self._height(_Typed(schema, k)))
        concrete = [k for k in fit if k != "null"]
        if concrete and self._rng.random() < 0.85:
            return self._rng.choice(concrete)
        return self._rng.choice(fit)

    def _word(self) -> str:
        word = self._rng.choice(WORDS)
        self._add_chars(len(word))
        return word

    def _copy(self, value: Any) -> Any:
        if isinstance(value, dict | list):
            try:
                text = json.dumps(value)
            except (ValueError, TypeError, RecursionError) as exc:
                raise SchemaError(f"a 'const'/'enum' value cannot be copied: {exc}") from None
            self._add_chars(len(text))
            return json.loads(text)
        if isinstance(value, str):
            self._add_chars(len(value))
        return value

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        rng = self._rng
        props, required, extra, may_add, min_props, max_props = _object_parts(schema)
        required_set = set(required)
        missing = len(required_set)  # required names not yet in ``out``
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required_set:
                out[name] = self._value(sub, depth + 1)
                missing -= 1
            elif depth < _SHALLOW and not self._soft and rng.random() < 0.6:
                room = max_props is None or len(out) + missing < max_props
                if room and self._fits(sub, depth + 1):
                    out[name] = self._value(sub, depth + 1)
        for name in required:
            if name not in out:
                out[name] = self._value(extra if isinstance(extra, Mapping) else _EMPTY, depth + 1)
        # Optional properties to reach minProperties, then free keys if allowed.
        for name, sub in props.items():
            if len(out) >= min_props:
                break
            if name not in out and self._fits(sub, depth + 1):
                out[name] = self._value(sub, depth + 1)
        want = min_props
        if not props and may_add and depth < _SHALLOW - 1 and not self._soft:
            want = max(want, rng.randint(1, 3))
        if max_props is not None:
            want = min(want, max_props)
        if may_add:
            sub_schema: Mapping[str, Any] = extra if isinstance(extra, Mapping) else _EMPTY
            if not sub_schema or self._fits(sub_schema, depth + 1):
                tries = 0
                while len(out) < want and tries < 64 + want:
                    tries += 1
                    key = rng.choice(WORDS) if tries < 32 else f"{rng.choice(WORDS)}_{tries}"
                    if key not in out and key not in props:
                        out[key] = (
                            self._value(sub_schema, depth + 1) if sub_schema else self._scalar()
                        )
        if len(out) < min_props:
            raise SchemaError(f"could not find {min_props} properties for 'minProperties'")
        return out

    def _scalar(self) -> Any:
        self._count_value()
        pick = self._rng.randrange(4)
        if pick == 0:
            return self._rng.randint(0, 100)
        if pick == 1:
            return self._rng.random() < 0.5
        text = " ".join(self._rng.choice(WORDS) for _ in range(self._rng.randint(1, 3)))
        self._add_chars(len(text))
        return text

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        rng = self._rng
        prefix, items, lo, hi_given = _array_parts(schema)
        hi = hi_given if hi_given is not None else max(lo, 3)
        if items is False:
            hi = min(hi, max(lo, len(prefix)))
        hi = max(lo, hi)
        if self._small(depth):
            n = lo
        else:
            n = rng.randint(max(lo, min(1, hi)), min(hi, lo + 3))
        k = lo  # positions below minItems fit: the analysis saw to that
        while k < n and self._fits(prefix[k] if k < len(prefix) else items, depth + 1):
            k += 1
        n = k
        unique = schema.get("uniqueItems") is True
        out: list[Any] = []
        seen: set[bytes] = set()
        for i in range(n):
            sub = prefix[i] if i < len(prefix) else items
            value = self._value(sub, depth + 1)
            if unique:
                key = _canonical(value)
                tries = 0
                while key in seen and tries < 8:
                    value = self._value(sub, depth + 1)
                    key = _canonical(value)
                    tries += 1
                if key in seen:
                    if len(out) >= lo:
                        break
                    continue
                seen.add(key)
            out.append(value)
        if len(out) < lo:
            raise SchemaError(
                f"could not find {lo} distinct items for 'minItems' and 'uniqueItems'"
            )
        return out

    def _string(self, schema: Mapping[str, Any]) -> str:
        lo = _count(schema.get("minLength"), 0)
        hi = _count(schema.get("maxLength"), -1)
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            text = self._pattern_string(pattern, lo, hi)
            self._add_chars(len(text))
            return text
        rng = self._rng
        fmt = schema.get("format")
        if fmt == "date":
            year, month, day = rng.randint(2000, 2030), rng.randint(1, 12), rng.randint(1, 28)
            text = f"{year:04d}-{month:02d}-{day:02d}"
        elif fmt == "date-time":
            text = (
                f"{rng.randint(2000, 2030):04d}-{rng.randint(1, 12):02d}-"
                f"{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}Z"
            )
        elif fmt == "time":
            text = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
        elif fmt == "email":
            text = f"{rng.choice(WORDS)}.{rng.choice(WORDS)}@example.com"
        elif fmt in ("uri", "url", "iri"):
            text = f"https://example.com/{rng.choice(WORDS)}/{rng.choice(WORDS)}"
        elif fmt == "uuid":
            h = f"{rng.getrandbits(128):032x}"
            text = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        parts = [text]
        length = len(text)
        while length < lo:
            word = rng.choice(WORDS)
            parts.append(word)
            length += 1 + len(word)
        text = " ".join(parts)
        if 0 <= hi < len(text):
            text = text[:hi].rstrip() if len(text[:hi].rstrip()) >= lo else text[:hi]
        self._add_chars(len(text))
        return text

    def _integer(self, schema: Mapping[str, Any]) -> int:
        self._add_chars(8)
        lo_f, lo_open, hi_f, hi_open = _bounds(schema)
        lo = None if lo_f is None else (math.floor(lo_f) + 1 if lo_open else math.ceil(lo_f))
        hi = None if hi_f is None else (math.ceil(hi_f) - 1 if hi_open else math.floor(hi_f))
        lo, hi = _window(lo, hi, 0, 100)
        step = schema.get("multipleOf")
        if _is_number(step) and step > 0 and float(step).is_integer():
            m = int(step)
            k_lo, k_hi = -(-lo // m), hi // m
            if k_lo <= k_hi:
                return self._rng.randint(k_lo, k_hi) * m
        return self._rng.randint(lo, hi) if lo <= hi else lo

    def _number(self, schema: Mapping[str, Any]) -> float | int:
        self._add_chars(8)
        lo, lo_open, hi, hi_open = _bounds(schema)
        step = schema.get("multipleOf")
        a, b = _window(lo, hi, 0.0, 100.0)
        if _is_number(step) and step > 0:
            k_lo = math.floor(a / step) + 1 if lo_open else math.ceil(a / step)
            k_hi = math.ceil(b / step) - 1 if hi_open else math.floor(b / step)
            for _ in range(8 if k_lo <= k_hi else 0):
                k = self._rng.randint(k_lo, k_hi)
                if isinstance(step, int):
                    return k * step
                v = round(k * step, 12)
                if (v / step).is_integer():  # float division, as validators check it
                    return v
            return 0 if a <= 0 <= b else a
        x = round(a + (b - a) * self._rng.random(), 2)
        if x < a or x > b or (lo_open and x <= a) or (hi_open and x >= b):
            x = (a + b) / 2
            if not math.isfinite(x):
                x = a / 2 + b / 2
        return x

    # -- patterns ---------------------------------------------------------------------------

    def _pattern(self, pattern: Any, where: str) -> _Pattern:
        """``pattern`` parsed (once per generation) and checked for what can be generated."""
        if not isinstance(pattern, str):
            raise SchemaError(f"'pattern' must be a string (at {where})", where)
        hit = self._patterns.get(pattern)
        if hit is not None:
            return hit
        if len(pattern) > self._limits.max_pattern:
            raise SchemaError(
                f"'pattern' has {len(pattern)} characters; the generator accepts at most "
                f"{self._limits.max_pattern} (at {where})",
                where,
            )
        self._spend(len(pattern))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parsed = _sre.parse(pattern)
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise SchemaError(
                f"'pattern' {pattern!r} is not a valid regular expression: {exc} (at {where})",
                where,
            ) from None
        anchored_end = False
        stack: list[tuple[Any, int]] = [(parsed, 0)]
        while stack:
            sub, level = stack.pop()
            if level > 64:
                raise SchemaError(f"'pattern' nests groups more than 64 deep (at {where})", where)
            for op, av in sub:
                self._spend(1)
                if op in (_sc.ASSERT, _sc.ASSERT_NOT):
                    raise SchemaError(
                        f"'pattern' {pattern!r} uses lookahead or lookbehind, which the "
                        f"generator does not support (at {where})",
                        where,
                    )
                if op is _sc.AT and av in (_sc.AT_END, _sc.AT_END_STRING):
                    anchored_end = True
                elif op is _sc.BRANCH:
                    stack.extend((p, level + 1) for p in av[1])
                elif op is _sc.SUBPATTERN:
                    stack.append((av[3], level + 1))
                elif op in (_sc.MAX_REPEAT, _sc.MIN_REPEAT, _sc.POSSESSIVE_REPEAT):
                    stack.append((av[2], level + 1))
                elif op is _sc.ATOMIC_GROUP:
                    stack.append((av, level + 1))
                elif op is _sc.GROUPREF_EXISTS:
                    stack.extend((p, level + 1) for p in av[1:] if p is not None)
                elif op not in _PATTERN_OPS:
                    raise SchemaError(
                        f"'pattern' {pattern!r} uses {op}, which the generator does not support "
                        f"(at {where})",
                        where,
                    )
        out = _Pattern(parsed, bool(parsed.state.flags & re.IGNORECASE), anchored_end)
        self._patterns[pattern] = out
        return out

    def _pattern_string(self, pattern: str, lo: int, hi: int) -> str:
        """A string matching ``pattern`` (in full, so also as ``re.search`` looks for it) with
        ``lo <= len <= hi`` (``hi`` < 0: no maximum); a few tries, then padding."""
        compiled = self._pattern(pattern, "pattern")
        text = ""
        grow = 0
        small = False
        for _ in range(6):
            chars: list[str] = []
            self._emit(compiled, compiled.parsed, chars, {}, grow, small)
            text = "".join(chars)
            if len(text) < lo:
                grow, small = grow + max(4, lo - len(text)), False
            elif 0 <= hi < len(text):
                grow, small = 0, True
            else:
                return text
        if len(text) < lo and not compiled.anchored_end:
            return text + "x" * (lo - len(text))  # search still finds the match at the start
        raise SchemaError(
            f"could not produce a string matching 'pattern' {pattern!r} with minLength {lo} "
            f"and maxLength {hi if hi >= 0 else 'unbounded'}"
        )

    def _emit(
        self,
        compiled: _Pattern,
        sub: Any,
        out: list[str],
        groups: dict[int, str],
        grow: int,
        small: bool,
    ) -> None:
        rng = self._rng
        for op, av in sub:
            self._spend(1)
            if len(out) > self._limits.max_length:
                raise SchemaError(f"'pattern' needs more than {self._limits.max_length} characters")
            if op is _sc.LITERAL:
                out.append(chr(av))
            elif op is _sc.NOT_LITERAL:
                out.append(self._char_outside([(_sc.LITERAL, av)], compiled.ignore_case))
            elif op is _sc.ANY:
                out.append(rng.choice(_ALNUM))
            elif op is _sc.IN:
                out.append(self._char_in(av, compiled.ignore_case))
            elif op is _sc.BRANCH:
                self._emit(compiled, rng.choice(av[1]), out, groups, grow, small)
            elif op is _sc.SUBPATTERN:
                start = len(out)
                self._emit(compiled, av[3], out, groups, grow, small)
                if av[0] is not None:
                    groups[av[0]] = "".join(out[start:])
            elif op in (_sc.MAX_REPEAT, _sc.MIN_REPEAT, _sc.POSSESSIVE_REPEAT):
                low, high, body = av
                if small:
                    count = low
                else:
                    count = low + rng.randint(0, min(high - low, 3 + grow))
                for _ in range(count):
                    self._spend(1)
                    before = len(out)
                    self._emit(compiled, body, out, groups, grow, small)
                    if len(out) == before:
                        break  # the body matched "": the remaining repeats may match "" too
            elif op is _sc.GROUPREF:
                out.append(groups.get(av, ""))
            elif op is _sc.GROUPREF_EXISTS:
                gid, yes, no = av
                branch = yes if gid in groups else no
                if branch is not None:
                    self._emit(compiled, branch, out, groups, grow, small)
            elif op is _sc.ATOMIC_GROUP:
                self._emit(compiled, av, out, groups, grow, small)
            # AT (anchors, boundaries): nothing to emit.

    def _char_in(self, items: list[tuple[Any, Any]], ignore_case: bool) -> str:
        if any(op is _sc.NEGATE for op, _ in items):
            return self._char_outside([i for i in items if i[0] is not _sc.NEGATE], ignore_case)
        op, av = self._rng.choice(items)
        if op is _sc.LITERAL:
            return chr(av)
        if op is _sc.RANGE:
            a, b = av
            readable = [c for c in _PRINTABLE if a <= ord(c) <= b]
            if readable:
                return self._rng.choice(readable)
            return chr(self._rng.randint(a, b))
        if op is _sc.CATEGORY:
            return self._rng.choice(_CATEGORY_CHARS.get(av, _ALNUM))
        raise SchemaError(f"a character class uses {op}, which the generator does not support")

    def _char_outside(self, items: list[tuple[Any, Any]], ignore_case: bool) -> str:
        candidates = [c for c in _PRINTABLE if not _class_matches(items, c, ignore_case)]
        if not candidates:
            raise SchemaError("a negated character class in 'pattern' excludes every character")
        return self._rng.choice(candidates)


# --- small pure helpers ---------------------------------------------------------------------

_ALNUM: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
_PRINTABLE: Final = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;!?@#$%&*+=/()[]{}<>'\"~"
)
_CATEGORY_CHARS: Final[dict[Any, str]] = {
    _sc.CATEGORY_DIGIT: "0123456789",
    _sc.CATEGORY_NOT_DIGIT: "abcdefghijklmnopqrstuvwxyz",
    _sc.CATEGORY_SPACE: " ",
    _sc.CATEGORY_NOT_SPACE: _ALNUM,
    _sc.CATEGORY_WORD: _ALNUM + "_",
    _sc.CATEGORY_NOT_WORD: " -.,",
    _sc.CATEGORY_LINEBREAK: "\n",
    _sc.CATEGORY_NOT_LINEBREAK: _ALNUM,
}
_PATTERN_OPS: Final = frozenset(
    {
        _sc.LITERAL,
        _sc.NOT_LITERAL,
        _sc.ANY,
        _sc.IN,
        _sc.AT,
        _sc.GROUPREF,
    }
)
_NUMBER_KEYS: Final = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_MAX_KEYS: Final = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
_MIN_KEYS: Final = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")


def _class_matches(items: list[tuple[Any, Any]], char: str, ignore_case: bool) -> bool:
    forms = {char, char.lower(), char.upper()} if ignore_case else {char}
    for c in forms:
        code = ord(c)
        for op, av in items:
            if op is _sc.LITERAL and code == av:
                return True
            if op is _sc.RANGE and av[0] <= code <= av[1]:
                return True
            if op is _sc.CATEGORY and _category_matches(av, c):
                return True
    return False


def _category_matches(category: Any, c: str) -> bool:
    if category is _sc.CATEGORY_DIGIT:
        return c.isdecimal()
    if category is _sc.CATEGORY_NOT_DIGIT:
        return not c.isdecimal()
    if category is _sc.CATEGORY_SPACE:
        return c.isspace()
    if category is _sc.CATEGORY_NOT_SPACE:
        return not c.isspace()
    if category is _sc.CATEGORY_WORD:
        return c.isalnum() or c == "_"
    if category is _sc.CATEGORY_NOT_WORD:
        return not (c.isalnum() or c == "_")
    if category is _sc.CATEGORY_LINEBREAK:
        return c == "\n"
    return c != "\n"


def _subschemas(node: Mapping[str, Any], where: str) -> Iterator[tuple[Any, str]]:
    """The subschemas directly under ``node`` (values of schema keywords), with pointers."""
    for key in _ONE_SCHEMA:
        if key in node:
            yield node[key], f"{where}/{key}"
    items = node.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            yield sub, f"{where}/items/{i}"
    elif "items" in node:
        yield items, f"{where}/items"
    for key in _SCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, Mapping):
            for name, sub in value.items():
                yield sub, f"{where}/{key}/{_escape(str(name))}"
    for key in _SCHEMA_LISTS:
        value = node.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                yield sub, f"{where}/{key}/{i}"


def _has_cycle(root: int, refs: list[tuple[int, Schema]], parent: Mapping[int, int | None]) -> bool:
    """Whether a ``$ref`` leads back into a subschema that (through more refs) contains it:
    edges go from each ref target (and the root) to the targets of the refs inside it."""
    targets = {id(t) for _, t in refs if isinstance(t, Mapping)} | {root}
    edges: dict[int, set[int]] = {}
    for at, target in refs:
        if not isinstance(target, Mapping):
            continue
        node: int | None = at
        steps = 0
        while node is not None and steps < 10_000:
            if node in targets:
                edges.setdefault(node, set()).add(id(target))
            node = parent.get(node)
            steps += 1
    # Iterative depth-first search with three colours.
    colour: dict[int, int] = {}
    for start in edges:
        if colour.get(start):
            continue
        stack: list[tuple[int, Iterator[int]]] = [(start, iter(edges.get(start, ())))]
        colour[start] = 1
        while stack:
            node_id, children = stack[-1]
            for child in children:
                state = colour.get(child, 0)
                if state == 1:
                    return True
                if state == 0:
                    colour[child] = 1
                    stack.append((child, iter(edges.get(child, ()))))
                    break
            else:
                colour[node_id] = 2
                stack.pop()
    return False


def _object_parts(
    schema: Mapping[str, Any],
) -> tuple[Mapping[str, Any], list[str], Any, bool, int, int | None]:
    """properties, required names (in order, once each), additionalProperties, whether free
    keys may be added, minProperties, maxProperties (None: no maximum)."""
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = list(dict.fromkeys(r for r in schema.get("required") or () if isinstance(r, str)))
    extra = schema.get("additionalProperties", True)
    may_add = (
        extra is not False
        and "patternProperties" not in schema
        and "propertyNames" not in schema
        and schema.get("unevaluatedProperties", True) is not False
    )
    return (
        props,
        required,
        extra,
        may_add,
        _count(schema.get("minProperties"), 0),
        _count(schema.get("maxProperties"), None),
    )


def _array_parts(schema: Mapping[str, Any]) -> tuple[list[Any], Any, int, int | None]:
    """prefix item schemas, the schema of the items after them, minItems, maxItems."""
    prefix = schema.get("prefixItems")
    prefix = list(prefix) if isinstance(prefix, list) else []
    items = schema.get("items", _EMPTY)
    if isinstance(items, list):  # draft 4-7 tuple form
        if not prefix:
            prefix = list(items)
        items = schema.get("additionalItems", _EMPTY)
    return prefix, items, _count(schema.get("minItems"), 0), _count(schema.get("maxItems"), None)


def _bounds(schema: Mapping[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    lo: float | None = None
    hi: float | None = None
    lo_open = hi_open = False
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if _is_number(minimum):
        lo = float(minimum)
        lo_open = ex_lo is True  # draft 4: exclusiveMinimum is a flag
    if _is_number(ex_lo) and (lo is None or ex_lo >= lo):
        lo, lo_open = float(ex_lo), True
    if _is_number(maximum):
        hi = float(maximum)
        hi_open = ex_hi is True
    if _is_number(ex_hi) and (hi is None or ex_hi <= hi):
        hi, hi_open = float(ex_hi), True
    return lo, lo_open, hi, hi_open


def _empty_range(schema: Mapping[str, Any], kind: str) -> bool:
    """Whether no ``kind`` ("integer"/"number") lies within the schema's bounds."""
    try:
        lo, lo_open, hi, hi_open = _bounds(schema)
        if lo is None or hi is None:
            return False
        if kind == "integer":
            low = math.floor(lo) + 1 if lo_open else math.ceil(lo)
            high = math.ceil(hi) - 1 if hi_open else math.floor(hi)
            step = schema.get("multipleOf")
            if _is_number(step) and step > 0 and float(step).is_integer() and low <= high:
                m = int(step)
                return -(-low // m) > high // m
            return low > high
        return lo > hi or (lo == hi and (lo_open or hi_open))
    except (OverflowError, ValueError):
        raise SchemaError("the schema's numeric bounds are too large to work with") from None


def _window(lo: _N | None, hi: _N | None, default_lo: _N, default_hi: _N) -> tuple[_N, _N]:
    """Finite bounds for a number: the schema's, else a window of 100 beside the one given."""
    if lo is None:
        if hi is None:
            return default_lo, default_hi
        return hi - (default_hi - default_lo), hi
    if hi is None:
        return lo, lo + (default_hi - default_lo)
    return lo, hi


def _is_number(value: object) -> TypeGuard[int | float]:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**1000  # beyond that, float() would overflow
    return isinstance(value, float) and math.isfinite(value)


def _count(value: Any, default: _D) -> int | _D:
    """A count keyword (minItems, maxLength...): an integer (or integral float) >= 0."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and 0 <= value < 2**63:
        return int(value)
    return default


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    ).encode("utf-8", "surrogatepass")


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _ref_cycle(ref: str) -> str:
    return (
        f"'$ref' {ref!r} leads back to itself through '$ref's alone, so the schema is "
        "defined only in terms of itself; put the recursion under a property or items"
    )
