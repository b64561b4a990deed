"""Governance rules: the ``[[policies]]`` table refuses what it cannot enforce, the
detectors find what they say, input is blocked or redacted without echoing a match, and the
output filter gives the same text however the answer is split into deltas, never letting a
character of a blocked match out and never holding back more than its bound."""

from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydantic import ValidationError

from quorum.errors import InvalidRequest
from quorum.gateway.policy import (
    CREDIT_CARD,
    EMAIL,
    IPV4,
    DuplicatePolicy,
    FilterStep,
    OutputFilter,
    Policies,
    Policy,
    TextKind,
    detector,
    luhn_ok,
    phone,
)

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "quorum-hypothesis")

PROPERTY = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


def policy(**fields: Any) -> Policy:
    return Policy.model_validate(fields)


def content_filter(*policies: Policy) -> OutputFilter:
    return Policies(policies).output_filter(TextKind.CONTENT)


def stream(f: OutputFilter, deltas: list[str]) -> tuple[str, list[FilterStep]]:
    steps = [f.feed(d) for d in deltas]
    steps.append(f.finish())
    return "".join(s.text for s in steps), steps


# --- the table -----------------------------------------------------------------------------


def test_built_in_and_regex_policies_validate_with_defaults() -> None:
    p = policy(name="no-emails", detect="email")
    assert (p.on, p.action, p.include_reasoning) == ("both", "block", False)
    r = policy(name="word", regex="forbidden", max_match_chars=9, on="output", action="redact")
    assert r.regex == "forbidden"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"name": "x"}, "exactly one of detect"),
        ({"name": "x", "detect": "email", "regex": "a", "max_match_chars": 1}, "exactly one"),
        ({"name": "x", "regex": "(unclosed", "max_match_chars": 9}, "does not compile"),
        ({"name": "x", "regex": "a|", "max_match_chars": 9}, "empty string"),
        ({"name": "x", "regex": r"\b(?:word)?", "max_match_chars": 9}, "empty string"),
        ({"name": "x", "regex": r"\d+", "max_match_chars": 9}, "bound every repetition"),
        ({"name": "x", "regex": "forbidden"}, "needs max_match_chars.*9 for this regex"),
        ({"name": "x", "regex": r"\bforbidden\b", "max_match_chars": 9}, "raise .* to 10"),
        ({"name": "x", "regex": "a", "max_match_chars": 2000}, "less than or equal to 1024"),
        ({"name": "x", "detect": "email", "max_match_chars": 300}, "own bound"),
        ({"name": "x", "detect": "ssn"}, "detect"),
        ({"name": "x", "detect": "email", "region": "GB"}, "phone"),
        ({"name": "x", "detect": "phone", "region": "XX"}, "not a region code"),
        ({"name": "x", "detect": "email", "on": "input", "include_reasoning": True}, "output"),
        ({"name": "x", "detect": "email", "on": "sideways"}, "on"),
        ({"name": "x", "detect": "email", "action": "warn"}, "action"),
        ({"name": "x", "detect": "email", "colour": "red"}, "Extra inputs"),
        ({"name": "has space", "detect": "email"}, "pattern"),
        ({"name": "x" * 65, "detect": "email"}, "at most 64"),
        ({"name": "x", "detect": "email", "include_reasoning": "yes"}, "boolean"),
    ],
)  # fmt: skip
def test_a_policy_it_cannot_enforce_is_refused_saying_why(
    fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        policy(**fields)


def test_a_policy_is_frozen() -> None:
    p = policy(name="x", detect="email")
    with pytest.raises(ValidationError):
        p.action = "redact"  # type: ignore[misc]


def test_two_policies_may_not_share_a_name() -> None:
    with pytest.raises(DuplicatePolicy) as caught:
        Policies([policy(name="a", detect="email"), policy(name="a", detect="ipv4")])
    assert caught.value.index == 1


# --- detectors -----------------------------------------------------------------------------


def found(d: Any, text: str) -> list[str]:
    return [text[a:b] for a, b in d.spans(text)]


def test_email_detector_finds_addresses_and_leaves_the_sentence_end() -> None:
    text = "mail john.doe@example.com. or <ops+x@mail.example.org>; not x@y.c nor a@b"
    assert found(EMAIL, text) == ["john.doe@example.com", "ops+x@mail.example.org"]


def test_card_detector_takes_luhn_valid_numbers_bare_or_grouped() -> None:
    text = (
        "amex 3782 822463 10005, visa 4111-1111-1111-1111, bare 4111111111111111, "
        "bad 4111 1111 1111 1112, with expiry 4111 1111 1111 1111 12/25, "
        "too long 41111111111111111111111"
    )
    assert found(CREDIT_CARD, text) == [
        "3782 822463 10005",
        "4111-1111-1111-1111",
        "4111111111111111",
        "4111 1111 1111 1111",
    ]


def test_luhn_check() -> None:
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")
    assert luhn_ok("4111111111111111")


def test_phone_detector_uses_libphonenumber_in_the_policy_region() -> None:
    text = "call (650) 253-0000 or +44 20 7946 0958, on 2024-01-15, 202 555 0143 2 times"
    assert found(phone("US"), text) == ["(650) 253-0000", "+44 20 7946 0958", "202 555 0143"]
    assert found(phone("US"), "ring 020 7946 0958") == []
    assert found(phone("GB"), "ring 020 7946 0958") == ["020 7946 0958"]


def test_ipv4_detector_takes_only_valid_dotted_quads() -> None:
    text = "host 192.168.0.1. not 256.1.1.1, 01.2.3.4 or 1.2.3.4.5; v 10.0.0.255"
    assert found(IPV4, text) == ["192.168.0.1", "10.0.0.255"]


def test_built_in_bounds_are_the_documented_ones() -> None:
    reach = {d.label: d.bounds.ahead for d in (EMAIL, CREDIT_CARD, IPV4, phone())}
    assert reach == {"email": 254, "credit_card": 24, "ipv4": 17, "phone": 32}
    assert detector(policy(name="w", regex=r"\bword\b", max_match_chars=50)).bounds.ahead == 5


# --- input ---------------------------------------------------------------------------------


def test_an_input_block_is_a_400_naming_the_policy_not_the_text() -> None:
    ps = Policies([policy(name="no-cards", detect="credit_card", on="input")])
    with pytest.raises(InvalidRequest) as caught:
        ps.scan_input(["fine", "my card is 4111 1111 1111 1111"])
    err = caught.value
    assert (err.status, err.code, err.param) == (400, "content_policy_violation", "messages")
    assert "no-cards" in err.message
    assert "4111" not in str(err.body())


def test_input_redaction_replaces_each_match_and_says_which_policy() -> None:
    ps = Policies(
        [
            policy(name="mails", detect="email", action="redact"),
            policy(name="word", regex="(?i)secret", max_match_chars=6, action="redact"),
        ]
    )
    verdict = ps.scan_input(["a@b.com and c@d.org", "Secret!", "nothing"])
    assert verdict.texts == (
        "[REDACTED:email] and [REDACTED:email]",
        "[REDACTED:word]!",
        "nothing",
    )
    assert verdict.redacted == ("mails", "mails", "word")


def test_a_block_anywhere_wins_over_redactions() -> None:
    ps = Policies(
        [
            policy(name="mails", detect="email", action="redact"),
            policy(name="word", regex="forbidden", max_match_chars=9),
        ]
    )
    with pytest.raises(InvalidRequest, match="'word'"):
        ps.scan_input(["a@b.com", "then forbidden"])


def test_policies_apply_only_in_their_direction() -> None:
    ps = Policies(
        [
            policy(name="in", regex="alpha", max_match_chars=5, on="input", action="redact"),
            policy(name="out", regex="omega", max_match_chars=5, on="output", action="redact"),
        ]
    )
    assert ps.scan_input(["alpha omega"]).texts == ("[REDACTED:in] omega",)
    out, _ = stream(ps.output_filter(TextKind.CONTENT), ["alpha omega"])
    assert out == "alpha [REDACTED:out]"


def test_screen_chat_redacts_string_contents_and_text_parts_in_a_new_body() -> None:
    ps = Policies([policy(name="mails", detect="email", action="redact")])
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "I am a@b.com"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "and c@d.org"},
                    {"type": "image_url", "image_url": {"url": "http://x/a@b.com"}},
                ],
            },
        ],
    }
    before = copy.deepcopy(body)
    out = ps.screen_chat(body)
    assert body == before
    assert out["messages"][0] is body["messages"][0]
    assert out["messages"][1]["content"] == "I am [REDACTED:email]"
    assert out["messages"][2]["content"][0]["text"] == "and [REDACTED:email]"
    assert out["messages"][2]["content"][1] == before["messages"][2]["content"][1]


def test_screen_chat_block_and_screen_completion() -> None:
    ps = Policies(
        [policy(name="ip", detect="ipv4"), policy(name="m", detect="email", action="redact")]
    )
    with pytest.raises(InvalidRequest) as caught:
        ps.screen_chat({"messages": [{"role": "user", "content": "ping 10.0.0.1"}]})
    assert caught.value.param == "messages"
    assert ps.screen_completion({"prompt": "to a@b.com"})["prompt"] == "to [REDACTED:email]"
    assert ps.screen_completion({"prompt": ["to a@b.com"]})["prompt"] == ["to [REDACTED:email]"]
    assert ps.screen_completion({"prompt": [1, 2, 3]})["prompt"] == [1, 2, 3]
    with pytest.raises(InvalidRequest) as caught:
        ps.screen_completion({"prompt": "10.0.0.1"})
    assert caught.value.param == "prompt"


# --- output --------------------------------------------------------------------------------


def test_a_word_split_across_deltas_is_blocked_with_nothing_of_it_emitted() -> None:
    f = content_filter(policy(name="word", regex="forbidden", max_match_chars=9))
    first = f.feed("this is forb")
    assert first.text == "this is " and first.block is None  # "forb" could become a match
    second = f.feed("idden, really")
    assert second.text == "" and second.block is not None and second.block.name == "word"
    assert f.feed(" more") == FilterStep("") and f.finish() == FilterStep("")
    assert f.blocked is not None and f.held == 0


def test_a_redaction_is_emitted_once_the_match_is_complete() -> None:
    f = content_filter(policy(name="m", detect="email", action="redact"))
    emitted = [f.feed(c).text for c in "write to jo@ex.com now"]
    # Nothing of the address comes out while it is being written; the replacement comes
    # with the character after it (until then, more letters could still extend the domain).
    assert emitted[len("write to ") : len("write to jo@ex.com")] == [""] * len("jo@ex.com")
    assert emitted[len("write to jo@ex.com")] == "[REDACTED:email] "
    assert "".join(emitted) + f.finish().text == "write to [REDACTED:email] now"


def test_prose_is_released_at_each_space_under_an_email_rule() -> None:
    f = content_filter(policy(name="m", detect="email", action="redact"))
    for word in "The quick brown fox jumps over the lazy dog".split():
        assert f.feed(word).text in ("", " ")
        assert f.held == len(word)  # a word could be the start of an address
        f.feed(" ")
        assert f.held == 0


@pytest.mark.parametrize(
    ("regex", "reach", "deltas", "expected"),
    [
        (r"(?<=x)yz$", 4, ["xyz\n", "k"], "xyz\nk"),  # "$" before a final newline
        (r"(?<=x)yz$", 4, ["xyz\n"], "x[REDACTED:r]\n"),
        (r"ab{1,3}(?!c)", 5, ["ab", "c"], "abc"),
        (r"\bforbidden\b", 10, ["forbidden", "s"], "forbiddens"),
        (r"\bforbidden\b", 10, ["forbidden", " "], "[REDACTED:r] "),
        (r"12(?=34)", 4, ["x12", "3", "4"], "x[REDACTED:r]34"),
        (r"12(?=34)", 4, ["x12", "3", "5"], "x1235"),
    ],
)
def test_a_match_that_depends_on_later_text_waits_for_it(
    regex: str, reach: int, deltas: list[str], expected: str
) -> None:
    f = content_filter(policy(name="r", regex=regex, max_match_chars=reach, action="redact"))
    assert stream(f, deltas)[0] == expected


def test_at_one_position_a_block_wins_over_a_longer_redaction() -> None:
    f = content_filter(
        policy(name="m", detect="email", action="redact"),
        policy(name="w", regex="jo@", max_match_chars=3),
    )
    out, _ = stream(f, ["hi jo@ex.com"])
    assert out == "hi " and f.blocked is not None and f.blocked.name == "w"


def test_a_long_stream_keeps_the_context_lookbehind_and_anchors_need() -> None:
    # The buffer drops emitted text in batches; what lookbehind reads must survive, and
    # the dropped text's end must not look like the start of the text to "^".
    f = content_filter(
        policy(name="lb", regex="(?<=x)yz", max_match_chars=2, action="redact"),
        policy(name="start", regex="^foo", max_match_chars=3, action="redact"),
    )
    out, _ = stream(f, ["foo", "x" * 5000, "yz", "a" * 5000, "foo"])
    assert out == "[REDACTED:start]" + "x" * 5000 + "[REDACTED:lb]" + "a" * 5000 + "foo"


def test_reasoning_is_filtered_only_by_policies_that_include_it() -> None:
    plain = Policies([policy(name="w", regex="secret", max_match_chars=6)])
    assert stream(plain.output_filter(TextKind.REASONING), ["a secret"])[0] == "a secret"
    assert plain.output_filter(TextKind.REASONING).holdback == 0
    wide = Policies([policy(name="w", regex="secret", max_match_chars=6, include_reasoning=True)])
    out, steps = stream(wide.output_filter(TextKind.REASONING), ["a sec", "ret"])
    assert out == "a " and steps[1].block is not None


def test_tool_call_arguments_get_their_own_filter() -> None:
    ps = Policies([policy(name="m", detect="email", action="redact")])
    args = ps.output_filter(TextKind.TOOL_ARGUMENTS)
    out, _ = stream(args, ['{"to": "a@', 'b.com"}'])
    assert out == '{"to": "[REDACTED:email]"}'


def test_holdback_is_the_largest_reach_less_one() -> None:
    ps = Policies([policy(name="c", detect="credit_card"), policy(name="i", detect="ipv4")])
    assert ps.holdback(TextKind.CONTENT) == 23
    assert Policies().holdback(TextKind.CONTENT) == 0
    f = Policies().output_filter(TextKind.CONTENT)
    assert f.feed("anything") == FilterStep("anything")


# --- properties: any split gives the one-shot result -------------------------------------

RULES = {
    "redact-all": [
        policy(name="m", detect="email", action="redact"),
        policy(name="c", detect="credit_card", action="redact"),
        policy(name="p", detect="phone", action="redact"),
        policy(name="i", detect="ipv4", action="redact"),
        policy(name="w", regex=r"\bforbidden\b", max_match_chars=10, action="redact"),
    ],
    "block-word": [
        policy(name="m", detect="email", action="redact"),
        policy(name="w", regex="forbidden", max_match_chars=9),
    ],
    "block-card": [
        policy(name="i", detect="ipv4", action="redact"),
        policy(name="c", detect="credit_card"),
    ],
    "lookarounds": [
        policy(name="a", regex=r"ab{1,3}(?!c)", max_match_chars=5, action="redact"),
        policy(name="z", regex=r"(?<=x)yz$", max_match_chars=4, action="redact"),
        policy(name="q", regex=r"(?i)q\d{2}", max_match_chars=3),
        policy(name="d", regex=r"12(?=34)", max_match_chars=4, action="redact"),
    ],
}

PIECES = [
    "forbidden", "forb", "idden", "jo@ex.com", "a@b.co", "@", ".", "-", " ", "  ", "\n",
    "4111 1111 1111 1111", "4111", "1111", "(650) 253-0000", "650", "+1 ", "10.0.0.1",
    "256.", "ab", "b", "c", "abbbc", "xyz", "q1", "Q42", "7", "x", "y", "z", "é", "12", "34",
]  # fmt: skip


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(
        draw(st.lists(st.sampled_from(PIECES) | st.text("ab@.1 -x", max_size=3), max_size=25))
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


def one_shot(policies: list[Policy], text: str) -> tuple[str, str | None]:
    """The oracle: matches taken left to right over the whole text, without a filter."""
    rules = [(p, detector(p)) for p in policies if p.on != "input"]
    out, pos = [], 0
    while True:
        best = None
        for k, (p, d) in enumerate(rules):
            begin, end = d.first(text, pos)
            if end is not None:
                key = (begin, p.action != "block", begin - end, k)
                if best is None or key < best[0]:
                    best = (key, end)
        if best is None:
            out.append(text[pos:])
            return "".join(out), None
        (begin, _, _, k), end = best
        out.append(text[pos:begin])
        p, d = rules[k]
        if p.action == "block":
            return "".join(out), p.name
        out.append(f"[REDACTED:{d.label}]")
        pos = end


@pytest.mark.parametrize("rules", list(RULES))
@PROPERTY
@given(case=split_text())
def test_any_split_emits_the_one_shot_result_within_the_holdback(
    rules: str, case: tuple[str, list[str]]
) -> None:
    text, deltas = case
    policies = RULES[rules]
    f = content_filter(*policies)
    steps = []
    for d in deltas:
        steps.append(f.feed(d))
        assert f.held <= f.holdback
    steps.append(f.finish())
    out = "".join(s.text for s in steps)
    blocks = [s.block.name for s in steps if s.block is not None]
    expected, blocked_by = one_shot(policies, text)
    assert out == expected
    assert blocks == ([blocked_by] if blocked_by else [])
    whole = content_filter(*policies)
    assert whole.feed(text).text + whole.finish().text == expected


@PROPERTY
@given(case=split_text())
def test_no_character_of_a_blocked_match_is_emitted(case: tuple[str, list[str]]) -> None:
    text, deltas = case
    f = content_filter(policy(name="w", regex="forbidden", max_match_chars=9))
    out, steps = stream(f, deltas)
    if "forbidden" in text:
        assert out == text[: text.index("forbidden")]
        assert any(s.block is not None for s in steps)
    else:
        assert out == text
