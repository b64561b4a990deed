"""API keys: the Bearer check finds the right caller by digest, refuses everything else with
``invalid_api_key`` without echoing what was sent, and a disallowed model looks unknown."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest
from pydantic import ValidationError

from quorum.errors import ModelNotFound, Unauthorized
from quorum.gateway.keys import (
    ApiKey,
    ApiKeys,
    AuthTable,
    Caller,
    DuplicateKey,
    Role,
    digest,
    model_not_found,
    new_key,
)
from quorum.routing.select import Selector

KEY_A = "sk-quorum-team-a-secret"
KEY_B = "sk-quorum-ops-secret"


def keys() -> ApiKeys:
    return ApiKeys(
        [
            ApiKey(name="team-a", sha256=digest(KEY_A), models=["mock-chat"],
                   requests_per_minute=60, tokens_per_minute=20000, max_concurrent=8),
            ApiKey(name="ops", sha256=digest(KEY_B), role=Role.ADMIN),
        ]
    )  # fmt: skip


def test_new_key_has_the_prefix_and_256_random_bits() -> None:
    made = {new_key() for _ in range(50)}
    assert len(made) == 50
    for key in made:
        assert key.startswith("sk-quorum-")
        assert len(key) == len("sk-quorum-") + 43  # 32 bytes, URL-safe base64, no padding


def test_digest_is_the_hex_sha256_of_the_utf8_key() -> None:
    assert digest("sk-quorum-é") == hashlib.sha256("sk-quorum-é".encode()).hexdigest()
    assert len(digest("x")) == 64 and digest("x") == digest("x").lower()


def test_right_key_gives_its_caller_with_role_and_limits() -> None:
    caller = keys().authenticate(f"Bearer {KEY_A}")
    assert caller == Caller(
        name="team-a",
        role=Role.USER,
        models=frozenset({"mock-chat"}),
        requests_per_minute=60,
        tokens_per_minute=20000,
        max_concurrent=8,
    )
    assert not caller.is_admin


def test_a_key_matching_the_second_digest_is_that_caller() -> None:
    caller = keys().authenticate(f"Bearer {KEY_B}")
    assert caller.name == "ops" and caller.is_admin and caller.role is Role.ADMIN
    assert caller.models is None and caller.requests_per_minute is None


@pytest.mark.parametrize(
    "header", [f"bearer {KEY_A}", f"BEARER {KEY_A}", f"  Bearer   {KEY_A}  ", f"Bearer\t{KEY_A}"]
)
def test_scheme_in_any_case_and_surrounding_whitespace_are_accepted(header: str) -> None:
    assert keys().authenticate(header).name == "team-a"


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "send Authorization: Bearer <your key>"),
        ("", "send Authorization: Bearer <your key>"),
        ("   ", "send Authorization: Bearer <your key>"),
        ("Bearer", "must be `Bearer <your key>`"),
        ("Bearer    ", "must be `Bearer <your key>`"),
        (f"Basic {KEY_A}", "must be `Bearer <your key>`"),
        (KEY_A, "must be `Bearer <your key>`"),
        (f"Token {KEY_A}", "must be `Bearer <your key>`"),
        ("Bearer sk-quorum-wrong", "the key is not valid"),
        (f"Bearer {KEY_A}x", "the key is not valid"),
        (f"Bearer {KEY_A[:-1]}", "the key is not valid"),
        (f"Bearer {digest(KEY_A)}", "the key is not valid"),  # the digest is not the key
        (f"Bearer {KEY_A} {KEY_B}", "the key is not valid"),
        ("Bearer sk-quorum-\u00e9\udcff", "the key is not valid"),
    ],
)
def test_missing_malformed_or_wrong_credential_is_invalid_api_key(
    header: str | None, says: str
) -> None:
    with pytest.raises(Unauthorized) as info:
        keys().authenticate(header)
    error = info.value
    assert error.status == 401 and error.code == "invalid_api_key"
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert says in error.message
    presented = (header or "").split()[-1:] or [""]
    assert len(presented[0]) < 7 or presented[0] not in str(error.body())


def test_the_message_never_contains_the_presented_key() -> None:
    for header in ("Bearer sk-quorum-guess-0123456789", "Basic sk-quorum-guess-0123456789"):
        with pytest.raises(Unauthorized) as info:
            keys().authenticate(header)
        assert "guess" not in str(info.value.body()) and "guess" not in repr(info.value)


def test_every_digest_is_compared_whichever_key_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time in which key matched: compare_digest runs once per configured key, for
    the first key, the last and none."""
    many = [ApiKey(name=f"k{i}", sha256=digest(f"key-{i}")) for i in range(5)]
    api_keys = ApiKeys(many)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, expected in (("key-0", "k0"), ("key-4", "k4"), ("nope", None)):
        calls.clear()
        if expected is None:
            with pytest.raises(Unauthorized):
                api_keys.authenticate(f"Bearer {presented}")
        else:
            assert api_keys.authenticate(f"Bearer {presented}").name == expected
        assert len(calls) == 5
        assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls)


def test_allowlist_admits_only_its_models_and_none_means_every_model() -> None:
    team_a = keys().authenticate(f"Bearer {KEY_A}")
    assert team_a.may_use("mock-chat") and not team_a.may_use("mock-reasoning")
    ops = keys().authenticate(f"Bearer {KEY_B}")
    assert ops.may_use("anything")


def test_a_disallowed_model_is_answered_as_an_unknown_model_byte_for_byte() -> None:
    with pytest.raises(ModelNotFound) as unknown:
        Selector("node-a", rng=random.Random(0)).order([], "secret-model")
    hidden = model_not_found("secret-model")
    assert isinstance(hidden, ModelNotFound) and hidden.status == 404
    assert hidden.body() == unknown.value.body()
    assert hidden.body()["error"]["code"] == "model_not_found"


def test_names_are_the_configured_names_in_order() -> None:
    assert keys().names == ("team-a", "ops")
    assert len(keys()) == 2
    assert KEY_A not in repr(keys()) and digest(KEY_A) not in repr(keys())


def test_two_keys_with_one_name_or_one_digest_are_refused() -> None:
    with pytest.raises(DuplicateKey, match="'team-a' is already used") as info:
        ApiKeys(
            [ApiKey(name="team-a", sha256=digest("1")), ApiKey(name="team-a", sha256=digest("2"))]
        )
    assert (info.value.index, info.value.field) == (1, "name")
    with pytest.raises(DuplicateKey, match="same digest as key 'x'") as info:
        ApiKeys([ApiKey(name="x", sha256=digest("1")), ApiKey(name="y", sha256=digest("1"))])
    assert (info.value.index, info.value.field) == (1, "sha256")


def test_no_key_at_all_is_refused() -> None:
    with pytest.raises(ValueError, match="quorum keys new NAME"):
        ApiKeys([])


@pytest.mark.parametrize("name", ["a", "team-a", "Team_A.v2", "x" * 64, "0"])
def test_names_of_letters_digits_dash_underscore_dot_up_to_64(name: str) -> None:
    assert ApiKey(name=name, sha256=digest("k")).name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "team a", "team/a", 'a"b', "é", "a\n", "a{b}"])
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="1 to 64 letters, digits"):
        ApiKey(name=name, sha256=digest("k"))


def test_sha256_in_upper_case_is_stored_in_lower_case() -> None:
    key = ApiKey(name="a", sha256=digest("k").upper())
    assert key.sha256 == digest("k")
    assert ApiKeys([key]).authenticate("Bearer k").name == "a"


@pytest.mark.parametrize(
    "sha256", ["", "abc", digest("k")[:-1], digest("k") + "0", "g" * 64, " " + digest("k")[1:]]
)
def test_a_sha256_that_is_not_64_hex_characters_is_refused(sha256: str) -> None:
    with pytest.raises(ValidationError, match="64 hex characters"):
        ApiKey(name="a", sha256=sha256)


@pytest.mark.parametrize(
    "extra",
    [
        {"role": "root"},
        {"models": []},
        {"models": [""]},
        {"requests_per_minute": 0},
        {"tokens_per_minute": -1},
        {"max_concurrent": "8"},
        {"max_concurrent": True},
        {"key": "sk-quorum-in-clear"},
    ],
)
def test_bad_fields_are_refused(extra: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ApiKey.model_validate({"name": "a", "sha256": digest("k"), **extra})


def test_auth_table_takes_toml_shaped_data() -> None:
    table = AuthTable.model_validate(
        {
            "open_metrics": True,
            "keys_file": "keys.toml",
            "keys": [{"name": "a", "sha256": digest("k"), "role": "admin", "models": ["m"]}],
        }
    )
    assert table.open_metrics and table.keys_file == "keys.toml"
    assert table.keys[0].role is Role.ADMIN and table.keys[0].models == ["m"]
    with pytest.raises(ValidationError):
        AuthTable.model_validate({"key": []})
