"""Governance rules: what a request may send and what an answer may say (issue #14).

::

    [[policies]]
    name = "no-emails"       # 1-64 of [A-Za-z0-9._-]: a metrics label
    detect = "email"         # a built-in: "email", "credit_card", "phone", "ipv4"
    # regex = "forbidden"    # or a regex (exactly one of detect / regex) ...
    # max_match_chars = 9    # ... with the bound of its matches (required for a regex)
    # region = "US"          # detect = "phone" only: the region of numbers without "+"
    on = "both"              # "input", "output" or "both" (the default)
    action = "block"         # "block" (the default) or "redact"
    include_reasoning = false  # output only: also filter reasoning text

On input (``Policies.scan_input``, ``screen_chat``, ``screen_completion``) a ``block`` is a
400 ``invalid_request_error`` with code ``content_policy_violation`` that names the policy
and never the matched text; a ``redact`` replaces each match with ``[REDACTED:<detect>]``
(``[REDACTED:<name>]`` for a regex) and the request goes on.

On output (``OutputFilter``, one per stream and per text field: the content, each tool
call's arguments, the reasoning when a policy includes it) the rules see the text as the
client will, across chunk boundaries: a match split over any number of deltas is caught,
and no character of a blocked match reaches the client, because the filter emits a
character only once no match can still begin at or before it. A block ends the stream
(the caller sends ``finish_reason: "content_filter"``); a redaction's replacement is emitted
once the match is complete.

Detectors (each a candidate pattern, then a check of the candidate; ``Detector.spans``):

========================  ==========================================================  =====
``detect``                what matches                                                reach
========================  ==========================================================  =====
``email``                 heuristic: ``local@domain`` within RFC 5321's lengths (local   254
                          part <= 64, address <= 254), the domain's labels checked,
                          the top-level label letters only
``credit_card``           13-19 digits, bare or grouped by spaces or dashes (4-4-4-4,     24
                          4-4-4-4-3, 4-6-5, 4-6-4): the shape is a heuristic, each
                          candidate is Luhn-checked (ISO/IEC 7812-1, annex B)
``phone``                 runs of digits and ``+ ( ) . - /`` and spaces, each checked     32
                          by Google's libphonenumber (``phonenumbers.PhoneNumberMatcher``,
                          leniency VALID, numbers without "+" read in ``region``); no
                          vanity numbers (1-800-FLOWERS), no extensions
``ipv4``                  dotted quads validated by ``ipaddress.IPv4Address`` (no        17
                          leading zeros); a version string "1.2.3.4" matches too
a ``regex``               Python ``re`` syntax; every repetition bounded            computed
========================  ==========================================================  =====

"Reach" is the most characters an attempt to match at a position reads from there (the
longest match plus any lookahead): ``quorum.gateway.regex_bounds.measure`` computes it from
the pattern, so a regex's ``max_match_chars`` is checked, not trusted. Matches are taken
left to right without overlap; where two policies match at the same position, a block wins
over a redaction, then the longer match, then the policy listed first.

Latency the output filter adds: it holds back at most ``reach - 1`` trailing characters of
a field (the largest reach among the policies that apply to it), and only those from the
first position where a match could still begin, or where an attempt still needs to see
more (``regex_bounds.prefix_matcher``: the idea of PCRE's partial matching). In prose, an
email rule holds back the word being written (it could be a local part) and releases it at
the next space; a card, phone or IPv4 rule holds back a trailing run of digits; a match is
decided, and its replacement emitted, by the first character that cannot extend it. At
about 4 characters a token, holding ``h`` characters delays them by ``h / 4`` tokens, each
one ITL: the bound for an email rule, 253 characters, is 63 tokens (0.95 s at a 15 ms ITL),
reached only while one 253-character address is being written; an email-like word without
"@" is held for at most 64 characters (the longest local part). ``finish`` releases the
end of the field. ``OutputFilter.held`` says how much is held now.

Measured (10,500 characters of English with numbers, fed 4 characters a delta, all four
built-ins and a regex on one filter): held mean 2.6 characters, p99 8, max 17 (under one
token on average); about 19 us of CPU a delta. An input scan of 105,000 characters with the
same rules: 23 ms. Adversarial text costs more: random groups of digits under the phone
rule, about 50 us a character (libphonenumber checks each group's start).

No I/O here: configuration comes from ``quorum.config``, the request path calls in.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quorum.errors import InvalidRequest
from quorum.gateway.regex_bounds import RegexBounds, Unbounded, measure, prefix_matcher

__all__ = [
    "CREDIT_CARD",
    "EMAIL",
    "IPV4",
    "MAX_MATCH_CHARS",
    "Detector",
    "DuplicatePolicy",
    "FilterStep",
    "OutputFilter",
    "Policies",
    "Policy",
    "PolicyViolation",
    "TextKind",
    "Verdict",
    "detector",
    "luhn_ok",
    "phone",
]

MAX_MATCH_CHARS: Final = 1024
"""The largest ``max_match_chars`` a regex policy may declare: the output filter may hold back
one character less than this (about 256 tokens)."""

POLICY_CODE: Final = "content_policy_violation"


# --- detectors ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detector:
    """Finds matches of one rule in a text, the same way whether the text is whole or still
    arriving.

    ``pattern``: the candidates; an attempt at a position is ``pattern.search`` finding a
    candidate there. ``check``: given a candidate's text, the length of the match it holds
    (a match always begins where its candidate does, and may end earlier), or None; absent,
    every candidate is a match. ``bounds``: ``measure(pattern)``; an attempt at ``i`` reads
    ``text[i - bounds.behind : i + bounds.ahead]`` and nothing else (``check`` reads only
    the candidate). ``prefix``: ``prefix_matcher(pattern)``, or None to treat every position
    as a possible beginning. ``label``: the ``<...>`` of a redaction's ``[REDACTED:<...>]``.
    """

    pattern: re.Pattern[str]
    bounds: RegexBounds
    prefix: re.Pattern[str] | None
    label: str
    check: Callable[[str], int | None] | None = None

    @classmethod
    def of(
        cls, pattern: re.Pattern[str], label: str, check: Callable[[str], int | None] | None
    ) -> Detector:
        """A detector for ``pattern``; raises ``Unbounded`` (``ValueError``) as ``measure``."""
        return cls(pattern, measure(pattern), prefix_matcher(pattern), label, check)

    def first(self, text: str, start: int, limit: int | None = None) -> tuple[int, int | None]:
        """The first match that begins in ``[start, limit)`` (``limit`` None: anywhere), as
        ``(begin, end)``, indices into ``text``. When there is none, ``(i, None)``: ``i`` is
        where the first candidate at or after ``limit`` begins, or ``len(text)``."""
        i = start
        while (m := self.pattern.search(text, i)) is not None:
            begin = m.start()
            if limit is not None and begin >= limit:
                return begin, None
            if self.check is None:
                return begin, m.end()
            length = self.check(m.group())
            if length:  # never an empty match: the filter must move on
                return begin, begin + length
            i = begin + 1
        return len(text), None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Every match in the whole ``text``, left to right, without overlap: ``[(begin,
        end), ...]`` as indices (``text[begin:end]`` is the match)."""
        out: list[tuple[int, int]] = []
        i = 0
        while True:
            begin, end = self.first(text, i)
            if end is None:
                return out
            out.append((begin, end))
            i = end


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` (decimal digits only, any script's) pass the Luhn check
    (ISO/IEC 7812-1, annex B): from the right, every second digit doubled (minus 9 above 9),
    the sum a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cuts(candidate: str, separators: str) -> list[int]:
    """Where ``candidate`` may end, longest first: its end, and before each separator that
    follows a digit (a card or a phone number followed by another group of digits)."""
    inner = [
        k
        for k in range(1, len(candidate))
        if candidate[k] in separators and candidate[k - 1].isdigit()
    ]
    return [len(candidate), *reversed(inner)]


_EMAIL_PATTERN: Final = re.compile(
    r"(?<![\w.%+\-])[\w%+\-][\w.%+\-]{0,63}@[A-Za-z0-9\-][A-Za-z0-9.\-]{2,188}"
)
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")
_TLD: Final = re.compile(r"[A-Za-z]{2,63}")


def _email_length(candidate: str) -> int | None:
    # The domain, less trailing dots (the end of a sentence); then the longest run of
    # labels that makes a domain: at least two, each a DNS label, the last letters only.
    at = candidate.index("@")
    labels = candidate[at + 1 :].rstrip(".").split(".")
    for k in range(len(labels), 1, -1):
        if all(_LABEL.fullmatch(x) for x in labels[:k]) and _TLD.fullmatch(labels[k - 1]):
            return at + 1 + len(".".join(labels[:k]))
    return None


_CARD_PATTERN: Final = re.compile(
    r"(?<!\w)(?:\d{13,19}"
    r"|\d{4}(?:[ \-]\d{4}){2}[ \-]\d{1,4}(?:[ \-]\d{1,3})?"
    r"|\d{4}[ \-]\d{6}[ \-]\d{4,5})(?!\w)"
)


def _card_length(candidate: str) -> int | None:
    for end in _cuts(candidate, " -"):
        digits = candidate[:end].replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return end
    return None


_IPV4_PATTERN: Final = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")


def _ipv4_length(candidate: str) -> int | None:
    try:
        ipaddress.IPv4Address(candidate)
    except ValueError:
        return None
    return len(candidate)


_PHONE_PATTERN: Final = re.compile(r"(?<![\w+(])(?:\+\(?|\()?\d[\d ().\-/]{5,27}\d(?!\w)")
_PHONE_SEPARATORS: Final = " ().-/"


_PHONE_MAX_DIGITS: Final = 17
"""E.164's 15 digits, plus two for a trunk or international prefix ("1", "00")."""


@functools.lru_cache(maxsize=4096)
def _phone_length(candidate: str, region: str) -> int | None:
    # The longest cut of the candidate in which libphonenumber's matcher finds a valid
    # number beginning where the candidate does. The matcher costs 50-300 us a call, most on
    # text that holds no number (it searches inside it); parse + is_valid_number (~30 us)
    # first turns away the cuts that cannot be a valid number. Cached: the filter may ask
    # again after a later delta.
    for end in _cuts(candidate, _PHONE_SEPARATORS):
        cut = candidate[:end]
        if sum(ch.isdigit() for ch in cut) > _PHONE_MAX_DIGITS:
            continue
        try:
            if not phonenumbers.is_valid_number(phonenumbers.parse(cut, region)):
                continue
        except phonenumbers.NumberParseException:
            continue
        for m in phonenumbers.PhoneNumberMatcher(cut, region, leniency=phonenumbers.Leniency.VALID):
            if m.start == 0:
                return int(m.end)
            break
    return None


EMAIL: Final = Detector.of(_EMAIL_PATTERN, "email", _email_length)
"""The email detector (a heuristic; see the module's table)."""
CREDIT_CARD: Final = Detector.of(_CARD_PATTERN, "credit_card", _card_length)
"""The card number detector: grouped or bare 13-19 digits, Luhn-checked."""
IPV4: Final = Detector.of(_IPV4_PATTERN, "ipv4", _ipv4_length)
"""The IPv4 address detector: dotted quads that ``ipaddress`` accepts."""


@functools.lru_cache(maxsize=64)
def phone(region: str = "US") -> Detector:
    """The phone number detector for ``region`` (a region code ``phonenumbers`` knows, as in
    ``phonenumbers.SUPPORTED_REGIONS``: numbers written without "+" are read as that
    region's)."""
    return Detector.of(_PHONE_PATTERN, "phone", functools.partial(_phone_length, region=region))


# --- configuration -----------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compiled(regex: str) -> tuple[re.Pattern[str], RegexBounds]:
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ValueError(f"the regex does not compile: {exc}") from None
    try:
        bounds = measure(pattern)
    except Unbounded as exc:
        raise ValueError(f"the regex cannot be used on a stream: {exc}") from None
    if bounds.min_chars == 0 or pattern.fullmatch(""):
        raise ValueError(
            "the regex can match the empty string (it would match everywhere): make at least "
            "one character required"
        )
    return pattern, bounds


class Policy(BaseModel):
    """One ``[[policies]]`` table (see the module's docstring).

    ``name``: 1 to 64 letters, digits, ``.``, ``_`` or ``-`` (a metrics label). Exactly one
    of ``detect`` (a built-in detector) and ``regex`` (Python ``re`` syntax, compiled here;
    it may not match the empty string and every repetition must be bounded). For a regex,
    ``max_match_chars`` (1..``MAX_MATCH_CHARS``) is required: the most characters an attempt
    reads from where a match begins, lookahead included (``\\b`` reads one past the match,
    ``$`` two); it must be at least what ``regex_bounds.measure`` computes (the error says
    that figure), and the output filter holds back by the computed figure, so at most
    ``max_match_chars - 1`` characters. ``region``: for ``detect = "phone"`` only. ``on``:
    which direction the rule applies to. ``action``: ``block`` or ``redact``.
    ``include_reasoning``: on output, also filter reasoning text (not allowed with ``on =
    "input"``).

    Raises pydantic's ``ValidationError``, each message saying what to fix.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    detect: Literal["email", "credit_card", "phone", "ipv4"] | None = None
    regex: Annotated[str, Field(min_length=1)] | None = None
    max_match_chars: Annotated[int, Field(ge=1, le=MAX_MATCH_CHARS)] | None = None
    region: str = "US"
    on: Literal["input", "output", "both"] = "both"
    action: Literal["block", "redact"] = "block"
    include_reasoning: bool = False

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, regex: str | None) -> str | None:
        if regex is not None:
            _compiled(regex)
        return regex

    @model_validator(mode="after")
    def _one_detector(self) -> Policy:
        if (self.detect is None) == (self.regex is None):
            raise ValueError(
                "give exactly one of detect (email, credit_card, phone, ipv4) and regex"
            )
        if self.regex is not None:
            _, bounds = _compiled(self.regex)
            if self.max_match_chars is None:
                raise ValueError(
                    "a regex needs max_match_chars, the most characters a match attempt reads "
                    "from where the match begins (its longest match plus any lookahead): "
                    f"{bounds.ahead} for this regex"
                )
            if self.max_match_chars < bounds.ahead:
                raise ValueError(
                    f"max_match_chars is {self.max_match_chars}, but this regex reads up to "
                    f"{bounds.ahead} characters from where a match begins (matches of up to "
                    f"{bounds.max_chars}, plus lookahead): raise max_match_chars to "
                    f"{bounds.ahead} or bound the regex more tightly"
                )
        elif self.max_match_chars is not None:
            raise ValueError(
                "max_match_chars is for a regex; a built-in detector has its own bound"
            )
        if "region" in self.model_fields_set and self.detect != "phone":
            raise ValueError('region applies to detect = "phone" only')
        if self.region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(
                f"region {self.region!r} is not a region code phonenumbers knows (such as "
                '"US", "GB", "DE")'
            )
        if self.include_reasoning and self.on == "input":
            raise ValueError('include_reasoning applies to output; this policy is on = "input"')
        return self


def detector(policy: Policy) -> Detector:
    """The detector ``policy`` names: a built-in, or one made from its regex."""
    if policy.detect == "email":
        return EMAIL
    if policy.detect == "credit_card":
        return CREDIT_CARD
    if policy.detect == "ipv4":
        return IPV4
    if policy.detect == "phone":
        return phone(policy.region)
    assert policy.regex is not None  # Policy's validator: exactly one of the two
    return _regex_detector(policy.regex, policy.name)


@functools.lru_cache(maxsize=256)
def _regex_detector(regex: str, name: str) -> Detector:
    pattern, bounds = _compiled(regex)
    return Detector(pattern, bounds, prefix_matcher(pattern), name)


class PolicyViolation(InvalidRequest):
    """400 ``content_policy_violation``: an input policy blocked the request. ``policy``:
    the name of the policy that blocked (for metrics; the message names it too, never the
    matched text)."""

    def __init__(self, message: str, *, policy: str, param: str) -> None:
        super().__init__(message, param=param, code=POLICY_CODE)
        self.policy = policy


class DuplicatePolicy(ValueError):
    """Two policies share a name. ``index``: position of the second in the sequence given
    to ``Policies``."""

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class TextKind(StrEnum):
    """The text fields of an answer an ``OutputFilter`` watches, one filter per field (and
    per tool call for ``TOOL_ARGUMENTS``)."""

    CONTENT = "content"
    TOOL_ARGUMENTS = "tool_arguments"  # a tool call's function.arguments
    REASONING = "reasoning"  # reasoning_content: only policies with include_reasoning


@dataclass(frozen=True, slots=True)
class _Rule:
    policy: Policy
    detector: Detector
    replacement: str
    blocks: bool

    @classmethod
    def of(cls, policy: Policy) -> _Rule:
        d = detector(policy)
        return cls(policy, d, f"[REDACTED:{d.label}]", policy.action == "block")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What input policies made of a request's texts.

    ``texts``: the texts, in the order given, with redactions applied. ``redacted``: the
    name of the policy behind each replacement, in order (one entry per match).
    """

    texts: tuple[str, ...]
    redacted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FilterStep:
    """What an ``OutputFilter`` lets out after one ``feed`` or ``finish``.

    ``text``: the characters the client may have now, redactions applied (possibly "").
    ``block``: the policy that blocked, on the step where it fired, else None; ``text``
    then ends just before the match, and the caller ends the stream with
    ``finish_reason: "content_filter"``. ``redacted``: the policies whose replacement is in
    ``text``, in order (one entry per match).
    """

    text: str
    block: Policy | None = None
    redacted: tuple[Policy, ...] = ()


_TRIM_AT: Final = 4096
"""Characters already emitted that the filter's buffer keeps before dropping them (beyond
the lookbehind the rules need): dropping is a copy, so it is done in batches."""


class OutputFilter:
    """The output policies on one text field of one stream (see the module's docstring).

    ``OutputFilter(policies)``: the policies to apply, in configured order (their ``on``
    and ``include_reasoning`` are not looked at here: ``Policies.output_filter`` chooses).
    ``feed(delta)`` and then ``finish()`` each return a ``FilterStep``. The concatenation of
    every step's ``text`` is the same however the field's text is split into deltas: the
    text with every match redacted, or, when a block fires, the text before the blocking
    match (redactions before it applied). After a block, ``feed`` and ``finish`` return
    empty steps. A filter without rules lets every delta through at once.

    Holdback: after a ``feed``, at most ``holdback`` characters are held (``held``), where
    ``holdback`` is the largest reach among the rules less one; ``finish`` releases the rest.
    Cost: each character is examined by each rule's candidate pattern about once, plus a
    prefix test over the held characters at each ``feed``.
    """

    __slots__ = ("_base", "_blocked", "_buf", "_context", "_cursor", "_done", "_pos", "_rules")

    def __init__(self, policies: Iterable[Policy]) -> None:
        self._rules = tuple(_Rule.of(p) for p in policies)
        self._buf = ""  # the text from absolute offset _base on
        self._base = 0
        self._pos = 0  # absolute offset of the first character not yet emitted
        # Per rule: no match of it begins in [_pos, _cursor[i]) (absolute offsets).
        self._cursor = [0] * len(self._rules)
        # Kept before _pos: what lookbehind and \b read. measure counts "^" as reading the
        # character before, so a trimmed buffer's first index (where "^" would match) is
        # never where an attempt begins.
        self._context = max((r.detector.bounds.behind for r in self._rules), default=0)
        self._blocked: Policy | None = None
        self._done = False

    @property
    def holdback(self) -> int:
        """The most characters a ``feed`` may leave held."""
        return max((r.detector.bounds.ahead for r in self._rules), default=1) - 1

    @property
    def held(self) -> int:
        """Characters fed and not yet emitted (nor dropped by a block)."""
        return 0 if self._blocked else self._base + len(self._buf) - self._pos

    @property
    def blocked(self) -> Policy | None:
        """The policy that blocked this field, or None."""
        return self._blocked

    def feed(self, text: str) -> FilterStep:
        """Take the next delta ``text``; returns what may be emitted now."""
        if self._blocked is not None or self._done:
            return FilterStep("")
        if not self._rules:
            return FilterStep(text)
        self._buf += text
        return self._step(final=False)

    def finish(self) -> FilterStep:
        """The field's text has ended: returns the rest, every match now decided."""
        if self._blocked is not None or self._done:
            return FilterStep("")
        self._done = True
        return self._step(final=True)

    def _event(self, i: int, final: bool) -> tuple[int, int | None]:
        """Rule ``i`` from ``_pos`` on: ``(begin, end)`` of its first match when that is
        decided, else ``(hold, None)``: none of its matches begins before ``hold``, and one
        may still begin there (absolute offsets)."""
        rule, buf, base = self._rules[i], self._buf, self._base
        det = rule.detector
        n = len(buf)
        pos = self._pos - base
        start = max(pos, self._cursor[i] - base)
        if final:
            begin, end = det.first(buf, start)
            self._cursor[i] = base + begin
            return base + begin, None if end is None else base + end
        # An attempt at j has read all it can, and its outcome is final, when j + ahead <= n;
        # from there on, until ``could``: the first position whence an attempt may read past
        # the text (the text to its end may still grow into a match, or a lookahead near the
        # end reads past it).
        could = max(pos, n - det.bounds.ahead + 1)
        prefix = det.prefix
        if prefix is not None:
            found = prefix.search(buf, could)  # matches at n at the latest (empty prefix)
            could = found.start() if found is not None else n
        begin, end = det.first(buf, start, could)
        if end is not None:
            self._cursor[i] = base + begin
            return base + begin, base + end
        self._cursor[i] = base + max(start, could)
        return base + could, None

    def _step(self, final: bool) -> FilterStep:
        out: list[str] = []
        redacted: list[Policy] = []
        rules = self._rules
        while True:
            hold = self._base + len(self._buf)
            best: tuple[int, bool, int, int] | None = None  # begin, redacts, -length, rule
            best_end = 0
            for i in range(len(rules)):
                begin, end = self._event(i, final)
                if end is None:
                    hold = min(hold, begin)
                else:
                    key = (begin, not rules[i].blocks, begin - end, i)
                    if best is None or key < best:
                        best, best_end = key, end
            if best is None or best[0] >= hold:
                out.append(self._text(self._pos, hold))
                self._pos = hold
                break
            begin, rule = best[0], rules[best[3]]
            out.append(self._text(self._pos, begin))
            if rule.blocks:
                self._blocked = rule.policy
                self._buf = ""
                return FilterStep("".join(out), block=rule.policy, redacted=tuple(redacted))
            out.append(rule.replacement)
            redacted.append(rule.policy)
            self._pos = best_end
        keep = self._pos - self._context - self._base
        if keep > _TRIM_AT:
            self._buf = self._buf[keep:]
            self._base += keep
        return FilterStep("".join(out), redacted=tuple(redacted))

    def _text(self, start: int, stop: int) -> str:
        return self._buf[start - self._base : stop - self._base]


class Policies:
    """The configured policies, ready for the request path.

    ``Policies(policies)``: raises ``DuplicatePolicy`` (a ``ValueError``) when two share a
    name. ``scan_input``, ``screen_chat`` and ``screen_completion`` apply the policies with
    ``on`` "input" or "both" to a request; ``output_filter`` makes the filter for one text
    field of an answer from those with ``on`` "output" or "both".
    """

    __slots__ = ("_input", "_output", "_policies")

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._policies = tuple(policies)
        seen: set[str] = set()
        for i, p in enumerate(self._policies):
            if p.name in seen:
                raise DuplicatePolicy(
                    f"the name {p.name!r} is already used by another policy (each policy "
                    "needs its own name: it is a metrics label)",
                    index=i,
                )
            seen.add(p.name)
        self._input = tuple(p for p in self._policies if p.on in ("input", "both"))
        self._output = tuple(p for p in self._policies if p.on in ("output", "both"))
        for p in self._policies:
            detector(p)  # built now, not on the first request

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The policies, in configured order."""
        return self._policies

    @property
    def names(self) -> tuple[str, ...]:
        """The policies' names: the bounded set of a metrics label."""
        return tuple(p.name for p in self._policies)

    def __len__(self) -> int:
        return len(self._policies)

    def __repr__(self) -> str:
        return f"Policies({list(self.names)!r})"

    def scan_input(self, texts: Iterable[str], *, param: str = "messages") -> Verdict:
        """Apply the input policies to ``texts`` (each scanned on its own: no match spans
        two). Returns the ``Verdict``; raises ``PolicyViolation`` (an ``InvalidRequest``:
        400, code ``content_policy_violation``, ``param`` as given) naming the first policy
        that blocks, never the matched text."""
        out: list[str] = []
        redacted: list[str] = []
        for text in texts:
            f = OutputFilter(self._input)
            a, b = f.feed(text), f.finish()
            block = a.block or b.block
            if block is not None:
                raise PolicyViolation(
                    f"The request was refused by the content policy '{block.name}'.",
                    policy=block.name,
                    param=param,
                )
            out.append(a.text + b.text)
            redacted.extend(p.name for p in (*a.redacted, *b.redacted))
        return Verdict(tuple(out), tuple(redacted))

    def screen_chat(
        self, body: Mapping[str, Any], *, redacted: list[str] | None = None
    ) -> dict[str, Any]:
        """Apply the input policies to a chat completions body: each message's string
        ``content`` and each ``{"type": "text"}`` part's ``text``. Returns a new body with
        redactions applied (objects it did not change are shared with ``body``, which is
        never modified); raises ``InvalidRequest`` as ``scan_input`` (``param``
        ``messages``). Other fields (tool call arguments, names) are not scanned.
        ``redacted``: when given, extended with the name of the policy behind each
        replacement (``Verdict.redacted``)."""
        messages = body.get("messages")
        if not self._input or not isinstance(messages, list):
            return dict(body)
        slots: list[tuple[int, int | None]] = []  # (message, part or None)
        texts: list[str] = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                slots.append((i, None))
                texts.append(content)
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if (
                        isinstance(part, Mapping)
                        and part.get("type") == "text"
                        and isinstance(part.get("text"), str)
                    ):
                        slots.append((i, j))
                        texts.append(part["text"])
        verdict = self.scan_input(texts, param="messages")
        if redacted is not None:
            redacted.extend(verdict.redacted)
        new_messages = list(messages)
        for (i, slot), old, new in zip(slots, texts, verdict.texts, strict=True):
            if new == old:
                continue
            message = dict(new_messages[i])
            if slot is None:
                message["content"] = new
            else:
                parts = list(message["content"])
                parts[slot] = {**parts[slot], "text": new}
                message["content"] = parts
            new_messages[i] = message
        return {**body, "messages": new_messages}

    def screen_completion(
        self, body: Mapping[str, Any], *, redacted: list[str] | None = None
    ) -> dict[str, Any]:
        """Apply the input policies to a (legacy) completions body's ``prompt``: a string, or
        the strings of a list (token ids are not text and are not scanned). Returns a new
        body; raises ``InvalidRequest`` as ``scan_input`` (``param`` ``prompt``).
        ``redacted``: as for ``screen_chat``."""
        prompt = body.get("prompt")
        if not self._input:
            return dict(body)
        if isinstance(prompt, str):
            verdict = self.scan_input([prompt], param="prompt")
            if redacted is not None:
                redacted.extend(verdict.redacted)
            return {**body, "prompt": verdict.texts[0]}
        if isinstance(prompt, list):
            where = [k for k, x in enumerate(prompt) if isinstance(x, str)]
            verdict = self.scan_input([prompt[k] for k in where], param="prompt")
            if redacted is not None:
                redacted.extend(verdict.redacted)
            new = list(prompt)
            for k, text in zip(where, verdict.texts, strict=True):
                new[k] = text
            return {**body, "prompt": new}
        return dict(body)

    def output_filter(self, kind: TextKind) -> OutputFilter:
        """A new filter for one field of one answer: the output policies, and for
        ``TextKind.REASONING`` only those with ``include_reasoning``."""
        policies = self._output
        if kind is TextKind.REASONING:
            policies = tuple(p for p in policies if p.include_reasoning)
        return OutputFilter(policies)

    def holdback(self, kind: TextKind) -> int:
        """The most characters ``output_filter(kind)`` may hold back after a delta."""
        return self.output_filter(kind).holdback
