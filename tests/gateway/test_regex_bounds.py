"""What a regex can read: the bounds the output filter's holdback rests on, and the prefix
test that lets it release characters no match can begin at."""

from __future__ import annotations

import re

import pytest

from quorum.gateway.regex_bounds import RegexBounds, Unbounded, measure, prefix_matcher


@pytest.mark.parametrize(
    ("regex", "bounds"),
    [
        ("forbidden", RegexBounds(9, 9, 9, 0)),
        (r"\bforbidden\b", RegexBounds(9, 9, 10, 1)),  # \b reads one on each side
        ("foo$", RegexBounds(3, 3, 5, 0)),  # $ also matches before a final "\n"
        (r"(?<=ab)c", RegexBounds(1, 1, 1, 2)),
        (r"(?i)x{2,5}(?=yz)", RegexBounds(2, 5, 7, 0)),
        (r"(a|bc)\1", RegexBounds(1, 4, 4, 0)),  # a back-reference: up to its group's length
        ("^foo", RegexBounds(3, 3, 3, 1)),  # "^" counts the character before as read
        (r"\d{3}-\d{4}", RegexBounds(8, 8, 8, 0)),
    ],
)
def test_measure_reports_match_length_and_what_lookaround_reads(
    regex: str, bounds: RegexBounds
) -> None:
    assert measure(re.compile(regex)) == bounds


@pytest.mark.parametrize("regex", ["a+", r"\w*@x", "x{2,}", "(?:ab)+c"])
def test_unbounded_repetition_is_refused(regex: str) -> None:
    with pytest.raises(Unbounded, match="bound every repetition"):
        measure(re.compile(regex))


def test_a_zero_width_repetition_is_bounded() -> None:
    assert measure(re.compile(r"a(?:\b)*")).max_chars == 1


@pytest.mark.parametrize(
    ("regex", "text", "first"),
    [
        ("forbidden", "xx forb", 3),  # "forb" may still become "forbidden"
        ("forbidden", "xx forbx", 8),  # nothing can begin before the end
        ("forbidden", "xx forbidden", 3),  # a whole match is a prefix of itself
        (r"\bforbidden\b", "a forbidd", 2),  # lookarounds are taken as true
        (r"(?i)SECRET\d{2}", "the secr", 4),  # flags carry over
        (r"\d{3}-\d{4}", "call 555-", 5),
        (r"\d{3}-\d{4}", "call 555-x", 10),
        (r"(a|bc)\1", "zb", 1),
        (r"12(?=34)", "x123", 1),  # the lookahead still reads past the end
        (r"12(?=34)", "x1235", 5),
        ("yz$", "yz\n", 0),  # "$" before a final newline: the end may not be the end
    ],
)
def test_prefix_matcher_finds_where_an_outcome_is_not_yet_final(
    regex: str, text: str, first: int
) -> None:
    matcher = prefix_matcher(re.compile(regex))
    assert matcher is not None
    found = matcher.search(text)
    assert found is not None and found.start() == first


def test_prefix_matcher_is_a_superset_of_every_matchs_prefixes() -> None:
    pattern = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
    matcher = prefix_matcher(pattern)
    assert matcher is not None
    for text in ["10.0.0.1", "192.168.100.200", "1.2.3.4"]:
        for k in range(len(text) + 1):
            assert matcher.match(text[:k]) is not None
