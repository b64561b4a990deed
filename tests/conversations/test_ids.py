"""Conversation ids: the owner carried in the id, and a strict parse of what clients send."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quorum.conversations.ids import MAX_ID_LEN, MAX_OWNER_BYTES, new_id, owner_of, valid_id

PATH_SAFE = re.compile(r"[A-Za-z0-9_.-]+")


def token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).rstrip(b"=").decode()


def test_new_id_is_prefix_random_and_owner() -> None:
    conversation_id = new_id("node-a")
    assert conversation_id.startswith("conv_")
    random_part, owner_part = conversation_id.removeprefix("conv_").split(".")
    assert len(random_part) == 24
    assert owner_part == token("node-a")
    assert PATH_SAFE.fullmatch(conversation_id)
    assert owner_of(conversation_id) == "node-a"
    assert valid_id(conversation_id)


def test_new_ids_differ() -> None:
    assert len({new_id("node-a") for _ in range(1000)}) == 1000


def test_one_spelling_per_owner() -> None:
    assert owner_of(f"conv_{'A' * 24}.bg") == "n"
    assert owner_of(f"conv_{'A' * 24}.bh") is None


def test_longest_owner_fits_the_bound() -> None:
    longest = "\U0001f600" * (MAX_OWNER_BYTES // 4)
    conversation_id = new_id(longest)
    assert len(conversation_id) == MAX_ID_LEN
    assert owner_of(conversation_id) == longest
    assert owner_of(new_id("n" * 128)) == "n" * 128  # the longest name gossip accepts


@pytest.mark.parametrize(
    "owner", ["", "node\n", "a\u0000b", "\ud800", "x" * (MAX_OWNER_BYTES + 1), "é" * 257]
)
def test_new_id_refuses_an_owner_no_node_could_have(owner: str) -> None:
    with pytest.raises(ValueError, match="printable UTF-8"):
        new_id(owner)


GOOD = new_id("node-a")
RANDOM = GOOD[5:29]
BELL = "node\u0007"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "conv_",
        GOOD[:-1] + "=",  # padding
        GOOD + "=",
        GOOD.replace("conv_", "CONV_"),
        GOOD.replace("conv_", "conv-"),
        GOOD.replace(".", ":"),
        GOOD.split(".")[0],  # no owner
        GOOD + ".x",
        GOOD + "\n",
        " " + GOOD,
        f"conv_{RANDOM[:-1]}.{token('node-a')}",  # 23 random characters
        f"conv_{RANDOM}A.{token('node-a')}",  # 25
        f"conv_{RANDOM[:-1]}+.{token('node-a')}",  # standard base64, not url-safe
        f"conv_{RANDOM}.bh",  # "n" (canonically "bg") with a non-zero unused bit
        f"conv_{RANDOM}.A",  # a length no byte string encodes to
        f"conv_{RANDOM}.{token(BELL)}",  # control character
        f"conv_{RANDOM}.__4",  # b"\xff\xfe": not UTF-8
        f"conv_{RANDOM}.{token('x' * (MAX_OWNER_BYTES + 1))}",  # too long
        f"conv_{RANDOM}.{token('n')}" + "A" * 10_000,
    ],
)
def test_valid_id_refuses_what_new_id_never_makes(text: str) -> None:
    assert not valid_id(text)
    assert owner_of(text) is None


@pytest.mark.parametrize("thing", [None, 42, b"conv_", ["conv_"], GOOD.encode()])
def test_valid_id_refuses_what_is_not_a_string(thing: object) -> None:
    assert not valid_id(thing)
    assert owner_of(thing) is None  # type: ignore[arg-type]


NAME_CHARACTERS = st.characters(
    codec="utf-8", categories=["L", "N", "P", "S"], include_characters=" "
)


@given(st.text(NAME_CHARACTERS, min_size=1, max_size=128))
def test_any_printable_node_name_round_trips(name: str) -> None:
    conversation_id = new_id(name)
    assert PATH_SAFE.fullmatch(conversation_id)
    assert len(conversation_id) <= MAX_ID_LEN
    assert owner_of(conversation_id) == name


@given(st.text(max_size=800))
def test_valid_id_never_raises_on_any_text(text: str) -> None:
    valid_id(text)
    owner_of(text)


@given(st.from_regex(r"conv_[A-Za-z0-9_-]{24}\.[A-Za-z0-9_-]{1,40}", fullmatch=True))
def test_every_accepted_id_is_the_one_new_id_would_spell(text: str) -> None:
    owner = owner_of(text)
    if owner is not None:
        assert text.endswith("." + token(owner))
