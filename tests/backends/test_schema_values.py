"""The JSON-schema value generator: valid values, recursion cut or refused, bounded work.

Every value is checked with ``jsonschema`` against the schema it was generated for. Hostile
schemas (from the issue "Hostile input never hurts a node") must end in a value or a
``SchemaError``; none may run away (the old generator took seconds on some of them, or
raised ``RecursionError``).
"""

from __future__ import annotations

import random
from typing import Any

import jsonschema
import pytest

from quorum.backends.schema_values import SchemaError, SchemaLimits, generate_json

Json = dict[str, Any]


def validator(schema: Json) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def assert_valid_for_seeds(schema: Json, seeds: int = 40) -> list[Any]:
    check = validator(schema)
    values = []
    for seed in range(seeds):
        value = generate_json(schema, random.Random(seed))
        check.validate(value)
        values.append(value)
    return values


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def nested_allof(levels: int) -> Json:
    schema: Json = {"type": "string", "minLength": 3}
    for _ in range(levels):
        schema = {"allOf": [schema]}
    return schema


# --- ordinary schemas ---------------------------------------------------------------------

ORDINARY: dict[str, Json] = {
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 2, "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
    "defs_and_combinators": {
        "type": "object",
        "properties": {
            "kind": {"const": "search"},
            "query": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]},
            "limit": {"oneOf": [{"type": "integer", "multipleOf": 5}, {"type": "null"}]},
            "where": {"$ref": "#/$defs/point", "description": "a $ref with a sibling"},
            "range": {
                "allOf": [
                    {"properties": {"lo": {"type": "integer"}}, "required": ["lo"]},
                    {"properties": {"hi": {"type": "integer", "maximum": -3}}, "required": ["hi"]},
                ]
            },
        },
        "required": ["kind", "query", "limit", "where", "range"],
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tuple": {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "string"}],
                "items": False,
                "minItems": 2,
            },
            "tags": {
                "type": "array",
                "items": {"enum": ["a", "b", "c", "d"]},
                "minItems": 2,
                "maxItems": 4,
                "uniqueItems": True,
            },
        },
        "required": ["tuple", "tags"],
    },
    "draft7_tuple": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "array",
        "items": [{"type": "integer"}, {"type": "boolean"}],
        "additionalItems": False,
        "minItems": 2,
    },
    "max_properties": {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in "abcdefgh"},
        "required": ["a"],
        "maxProperties": 2,
    },
    "patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"},
            "phone": {"type": "string", "pattern": "^\\d{3}-\\d{3}-\\d{4}$"},
            "email": {"type": "string", "pattern": "^[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}$"},
            "slug": {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$", "minLength": 12},
            "not_quote": {"type": "string", "pattern": '^[^"\\\\]{5,8}$'},
            "either": {"type": "string", "pattern": "^(yes|no|maybe)!?$"},
            "backref": {"type": "string", "pattern": "^(ab|cd)-\\1$"},
            "unanchored": {"type": "string", "pattern": "x\\d", "minLength": 10},
            "ignore_case": {"type": "string", "pattern": "(?i)^[^a-z0-9]{3}$"},
        },
        "required": [
            "code",
            "phone",
            "email",
            "slug",
            "not_quote",
            "either",
            "backref",
            "unanchored",
            "ignore_case",
        ],
    },
}


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_values_validate_for_many_seeds(name: str) -> None:
    assert_valid_for_seeds(ORDINARY[name], seeds=60)


def test_same_seed_gives_the_same_value() -> None:
    schema = ORDINARY["defs_and_combinators"]
    assert generate_json(schema, random.Random(9)) == generate_json(schema, random.Random(9))


# --- recursion: cut where the schema allows it, refused where it does not -----------------

RECURSIVE_WITH_A_WAY_OUT: dict[str, Json] = {
    "anyof_null_branch": {
        "type": "object",
        "properties": {"b": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["b"],
    },
    "nullable_type": {
        "type": ["object", "null"],
        "properties": {"a": {"$ref": "#"}, "b": {"$ref": "#"}, "c": {"$ref": "#"}},
        "required": ["a", "b", "c"],
    },
    "optional_property": {
        "type": "object",
        "properties": {"next": {"$ref": "#"}, "v": {"type": "integer"}},
        "required": ["v"],
    },
    "oneof_leaf_object": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "kind": {"const": "node"},
                    "child": {"oneOf": [{"$ref": "#/$defs/node"}, {"$ref": "#/$defs/leaf"}]},
                },
                "required": ["kind", "child"],
                "additionalProperties": False,
            },
            "leaf": {
                "type": "object",
                "properties": {"kind": {"const": "leaf"}, "v": {"type": "integer"}},
                "required": ["kind", "v"],
                "additionalProperties": False,
            },
        },
        "$ref": "#/$defs/node",
    },
    "binary_tree": {
        "$defs": {
            "tree": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "left": {"$ref": "#/$defs/tree"},
                            "right": {"$ref": "#/$defs/tree"},
                        },
                        "required": ["left", "right"],
                        "additionalProperties": False,
                    },
                    {"type": "integer"},
                ]
            }
        },
        "$ref": "#/$defs/tree",
    },
    # Five branches recurse, one ends: drawn at random, it runs past any depth limit.
    "many_recursive_branches_one_leaf": {
        "type": "object",
        "properties": {
            "next": {
                "anyOf": [
                    *({"$ref": "#"} for _ in range(5)),
                    {"type": "object", "properties": {"end": {"const": True}}, "required": ["end"]},
                ]
            }
        },
        "required": ["next"],
    },
    "required_array_of_self": {
        "type": "object",
        "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["children"],
    },
    "mutual_recursion": {
        "$defs": {
            "a": {
                "type": "object",
                "properties": {"b": {"$ref": "#/$defs/b"}},
                "required": ["b"],
            },
            "b": {"type": ["object", "string"], "properties": {"a": {"$ref": "#/$defs/a"}}},
        },
        "$ref": "#/$defs/a",
    },
    "recursion_through_allof": {
        "$defs": {
            "base": {
                "type": "object",
                "properties": {"id": {"type": "integer"}},
                "required": ["id"],
            },
            "node": {
                "allOf": [{"$ref": "#/$defs/base"}],
                "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                "required": ["next"],
            },
        },
        "$ref": "#/$defs/node",
    },
}


@pytest.mark.parametrize("name", sorted(RECURSIVE_WITH_A_WAY_OUT))
def test_required_recursion_is_cut_by_the_way_out_and_validates(name: str) -> None:
    schema = RECURSIVE_WITH_A_WAY_OUT[name]
    values = [generate_json(schema, random.Random(seed)) for seed in range(60)]
    # Depth first: validating a deep value of a schema with many recursive branches costs
    # jsonschema time and memory exponential in the depth.
    assert max(depth_of(v) for v in values) <= 6
    check = validator(schema)
    for value in values:
        check.validate(value)


@pytest.mark.parametrize(
    "schema",
    [
        # {"b": {"b": ... null}} was the old answer to this one: it violates the schema.
        {"type": "object", "properties": {"b": {"$ref": "#"}}, "required": ["b"]},
        # Three required self-references: the old generator took 7 s and 8.5 MB.
        {
            "type": "object",
            "properties": {"a": {"$ref": "#"}, "b": {"$ref": "#"}, "c": {"$ref": "#"}},
            "required": ["a", "b", "c"],
        },
        {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
        {
            "$defs": {
                "a": {
                    "type": "object",
                    "properties": {"b": {"$ref": "#/$defs/b"}},
                    "required": ["b"],
                },
                "b": {
                    "type": "object",
                    "properties": {"a": {"$ref": "#/$defs/a"}},
                    "required": ["a"],
                },
            },
            "$ref": "#/$defs/a",
        },
        {"anyOf": [{"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}]},
    ],
)
def test_required_recursion_without_a_way_out_is_refused_with_the_fix(schema: Json) -> None:
    with pytest.raises(SchemaError) as caught:
        generate_json(schema, random.Random(0))
    message = caught.value.message
    assert "no finite value" in message
    assert "optional" in message and "null" in message and "anyOf" in message


@pytest.mark.parametrize(
    "schema",
    [
        {"allOf": [{"$ref": "#"}]},
        {"$ref": "#"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {
            "$defs": {
                "a": {"allOf": [{"$ref": "#/$defs/b"}, {"type": "object"}]},
                "b": {"allOf": [{"$ref": "#/$defs/a"}]},
            },
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/a"}},
        },
        {"anyOf": [{"$ref": "#/anyOf/0"}]},
    ],
)
def test_ref_and_allof_cycles_are_refused_not_recursed_into(schema: Json) -> None:
    with pytest.raises(SchemaError, match="itself"):
        generate_json(schema, random.Random(0))


def test_allof_reached_twice_without_a_cycle_is_fine() -> None:
    schema: Json = {
        "$defs": {
            "base": {
                "type": "object",
                "properties": {"id": {"type": "integer"}},
                "required": ["id"],
            },
            "mid": {"allOf": [{"$ref": "#/$defs/base"}], "required": ["name"]},
        },
        "allOf": [{"$ref": "#/$defs/base"}, {"$ref": "#/$defs/mid"}],
        "properties": {"name": {"type": "string"}},
    }
    for value in assert_valid_for_seeds(schema):
        assert {"id", "name"} <= set(value)


# --- hostile and malformed schemas --------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "array", "minItems": 300_000}, "'minItems' is 300000"),
        ({"type": "object", "minProperties": 100_000}, "'minProperties' is 100000"),
        ({"type": "string", "minLength": 10**9}, "'minLength' is 1000000000"),
        (
            {"type": "array", "minItems": 1000, "items": {"type": "array", "minItems": 1000}},
            "JSON values",
        ),
        (nested_allof(1000), "nested more than"),
        ({"properties": {"x": {"$ref": "#/$defs/missing"}}}, "points to nothing"),
        ({"$ref": "https://example.com/schema.json"}, "only local references"),
        ({"$ref": "#anchor"}, "anchor"),
        ({"type": "string", "pattern": "a{1000000}"}, "more than 4096 characters"),
        ({"type": "string", "pattern": "^(?=a)a$"}, "lookahead"),
        ({"type": "string", "pattern": "(" * 300 + ")" * 300}, "64 deep"),
        ({"type": "string", "pattern": "([a-z]"}, "not a valid regular expression"),
        ({"type": "string", "pattern": "a" * 5000}, "at most 1000"),
        ({"type": "string", "pattern": "(){4000000000}x{5000}"}, "characters"),
        ({"type": "thing"}, "not a JSON Schema type"),
        ({"type": "object", "properties": {"a": 3}}, "must be an object or a boolean"),
        ({"$dynamicRef": "#meta"}, "not supported"),
        ({"type": "number", "minimum": 1e300, "multipleOf": 1e-300}, "too extreme"),
        ({"type": "integer", "minimum": 10**400}, "too large"),
        (
            {"allOf": [{"enum": [[i] for i in range(3000)]}, {"enum": [[i] for i in range(3000)]}]},
            "steps",
        ),
    ],
)
def test_hostile_or_malformed_schema_is_refused_with_a_clear_message(
    schema: Json, message: str
) -> None:
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace("'", "'")):
        generate_json(schema, random.Random(0))


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (False, "'false' schema"),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "'false' schema"),
        ({"enum": []}, "'enum' is empty"),
        ({"anyOf": []}, "no branch"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "'minItems' is above 'maxItems'"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "'minLength' is above"),
        (
            {"type": "object", "required": ["x"], "additionalProperties": False},
            "required property 'x'",
        ),
    ],
)
def test_schema_without_any_valid_value_is_refused(schema: Any, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        generate_json(schema, random.Random(0))


@pytest.mark.parametrize(
    "schema",
    [
        nested_allof(50),
        {"enum": list(range(200_000))},
        {"allOf": [{"enum": list(range(100_000))}, {"enum": list(range(50_000, 150_000))}]},
        {"type": "string", "pattern": "^(a+)+$"},  # catastrophic to match, easy to generate
        {"type": "string", "pattern": "(.*a){20}"},
        {"type": "string", "pattern": "^(){100000}x$"},
        # 200 optional self-references: drawn freely at the top, small further down.
        {"type": "object", "properties": {f"p{i}": {"$ref": "#"} for i in range(200)}},
        {
            "type": ["array", "null"],
            "minItems": 1000,
            "items": {"$ref": "#"},
        },
    ],
)
def test_hostile_but_satisfiable_schema_gets_a_valid_value(schema: Json) -> None:
    assert_valid_for_seeds(schema, seeds=3)


def test_every_limit_is_enforced() -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(50)}}
    rng = random.Random(0)
    with pytest.raises(SchemaError, match="subschemas"):
        generate_json(wide, rng, limits=SchemaLimits(max_schema_nodes=10))
    with pytest.raises(SchemaError, match="steps"):
        generate_json(wide, rng, limits=SchemaLimits(max_work=20))
    required = {**wide, "required": list(wide["properties"])}
    with pytest.raises(SchemaError, match="JSON values"):
        generate_json(required, rng, limits=SchemaLimits(max_values=20))
    with pytest.raises(SchemaError, match="characters"):
        generate_json(required, rng, limits=SchemaLimits(max_chars=40))
    deep = {"type": "object", "properties": {"a": {"$ref": "#"}}}
    assert depth_of(generate_json(deep, rng, limits=SchemaLimits(max_depth=2))) <= 2
    with pytest.raises(SchemaError, match="levels deep"):
        generate_json(nested_allof(5), rng, limits=SchemaLimits(max_depth=3))
    with pytest.raises(SchemaError, match="at most 5"):
        generate_json({"type": "array", "minItems": 6}, rng, limits=SchemaLimits(max_items=5))


def test_past_half_the_budget_the_rest_is_drawn_small_and_stays_valid() -> None:
    schema = {
        "type": "array",
        "minItems": 40,
        "maxItems": 40,
        "items": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
            "required": ["a"],
        },
    }
    value = generate_json(schema, random.Random(0), limits=SchemaLimits(max_values=100))
    validator(schema).validate(value)
    assert all(set(item) == {"a"} for item in value[-10:]), "late items leave optional parts out"


def test_lone_surrogates_in_the_schema_come_back_as_they_were() -> None:
    schema = {
        "type": "object",
        "properties": {"\ud800key": {"enum": ["\udfff"]}},
        "required": ["\ud800key"],
    }
    assert generate_json(schema, random.Random(0)) == {"\ud800key": "\udfff"}
