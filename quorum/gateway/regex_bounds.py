"""What a regular expression can read: the facts a streaming filter needs to hold back as
few characters as is safe (``quorum.gateway.policy``).

For a pattern ``p`` and an attempt to match it at position ``i`` of a text, ``measure(p)``
says how many characters the attempt may read before ``i`` (``behind``: lookbehind, ``\\b``)
and from ``i`` on (``ahead``: the longest match plus any lookahead after it: ``\\b`` reads
one character past the match, ``$`` two). An attempt at ``i`` is therefore *settled* once
the text up to ``i + ahead`` is known: more text cannot change its outcome. Repetitions
without an upper bound (``+``, ``*``, ``{n,}``) make ``ahead`` infinite, and are refused with
``Unbounded``.

``prefix_matcher(p)`` builds a second pattern that matches, from a position to the end of
the text, every text on which an attempt there may still read past the end: the text can
still grow into a match of ``p``, or an assertion near the end (``(?=X)``, ``$``) reads past
it. Where it fails, the attempt's outcome is already final, so the streaming filter can
emit what no match begins at, and decide a match, without waiting for ``ahead``
characters. It is a superset (lookarounds and anchors are taken as true, and as reading
all they may; a back-reference as any text of its group's length): it may make the filter
wait when it need not, never the reverse. Its language is prefix-closed: once it fails at a
position, no later text makes it match there. The idea is PCRE's partial matching
(``PCRE2_PARTIAL_HARD``), which Python's ``re`` lacks.

Both read the pattern's parse tree from the standard library's ``re._parser`` (private, but
present in every Python this package supports: 3.11 and later). The idea of computing a
pattern's width from that tree is the standard library's own (``SubPattern.getwidth``); the
bounds here extend it with the characters lookarounds read.
"""

from __future__ import annotations

import re
import re._constants as sre  # type: ignore[import-not-found,unused-ignore]
import re._parser as sre_parse  # type: ignore[import-not-found,unused-ignore]
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["RegexBounds", "Unbounded", "measure", "prefix_matcher"]

_CHAR_OPS: Final = frozenset({sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN})
_ASSERTIONS: Final = frozenset({sre.ASSERT, sre.ASSERT_NOT, sre.AT})
_REPEATS: Final = frozenset({sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT})
_BEFORE_ONLY: Final = frozenset(
    {sre.AT_BEGINNING, sre.AT_BEGINNING_STRING, sre.AT_BEGINNING_LINE}
)  # ``^`` and ``\A`` count as reading the character before, which keeps a trimmed buffer's
# first index (not the text's start) out of every attempt's reach.
_BOTH_SIDES: Final = frozenset(
    {
        sre.AT_BOUNDARY,
        sre.AT_NON_BOUNDARY,
        sre.AT_UNI_BOUNDARY,
        sre.AT_UNI_NON_BOUNDARY,
        sre.AT_LOC_BOUNDARY,
        sre.AT_LOC_NON_BOUNDARY,
    }
)
_FLAG_LETTERS: Final = (
    (re.IGNORECASE, "i"),
    (re.MULTILINE, "m"),
    (re.DOTALL, "s"),
    (re.ASCII, "a"),
    (re.UNICODE, "u"),
)
_CATEGORIES: Final = {
    sre.CATEGORY_DIGIT: r"\d",
    sre.CATEGORY_NOT_DIGIT: r"\D",
    sre.CATEGORY_SPACE: r"\s",
    sre.CATEGORY_NOT_SPACE: r"\S",
    sre.CATEGORY_WORD: r"\w",
    sre.CATEGORY_NOT_WORD: r"\W",
}


class Unbounded(ValueError):
    """The pattern's matches (or what an attempt reads) have no upper length, or it uses a
    construct whose reach cannot be bounded. The message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class RegexBounds:
    """What an attempt to match at position ``i`` may read, in characters.

    ``min_chars``: the shortest match (0: the pattern can match the empty string).
    ``max_chars``: the longest match. ``ahead``: the attempt reads at most up to ``i +
    ahead`` (exclusive), so ``ahead >= max_chars``. ``behind``: it reads at most back to
    ``i - behind``.
    """

    min_chars: int
    max_chars: int
    ahead: int
    behind: int


@dataclass(frozen=True, slots=True)
class _Shape:
    # Consumed characters (lo..hi) and the offsets read, relative to where the node starts:
    # [first, last) with first <= 0.
    lo: int
    hi: int
    first: int
    last: int

    def then(self, other: _Shape) -> _Shape:
        return _Shape(
            self.lo + other.lo,
            self.hi + other.hi,
            min(self.first, self.lo + other.first),
            max(self.last, self.hi + other.last),
        )

    def either(self, other: _Shape) -> _Shape:
        return _Shape(
            min(self.lo, other.lo),
            max(self.hi, other.hi),
            min(self.first, other.first),
            max(self.last, other.last),
        )


_EMPTY = _Shape(0, 0, 0, 0)
_CHAR = _Shape(1, 1, 0, 1)


class _Walker:
    """One pass over a parse tree; remembers each group's longest match for
    back-references."""

    def __init__(self) -> None:
        self.groups: dict[int, int] = {}

    def seq(self, items: Any) -> _Shape:
        shape = _EMPTY
        for op, av in items:
            shape = shape.then(self.item(op, av))
        return shape

    def item(self, op: Any, av: Any) -> _Shape:
        if op in _CHAR_OPS:
            return _CHAR
        if op is sre.SUBPATTERN:
            group, _add, _del, sub = av
            shape = self.seq(sub)
            if group is not None:
                self.groups[group] = shape.hi
            return shape
        if op is sre.ATOMIC_GROUP:
            return self.seq(av)
        if op is sre.BRANCH:
            shapes = [self.seq(alt) for alt in av[1]]
            out = shapes[0]
            for s in shapes[1:]:
                out = out.either(s)
            return out
        if op in _REPEATS:
            low, high, sub = av
            inner = self.seq(sub)
            if high == sre.MAXREPEAT:
                if inner.hi > 0:
                    raise Unbounded(
                        "it can match text of any length ('+', '*' or '{n,}'): bound every "
                        "repetition (e.g. '{1,40}') so that the output filter's holdback is "
                        "bounded"
                    )
                return _Shape(0, 0, min(0, inner.first), max(0, inner.last))
            if high == 0:
                return _EMPTY
            return _Shape(
                low * inner.lo,
                high * inner.hi,
                min(0, inner.first),
                max((high - 1) * inner.hi + inner.last, high * inner.hi),
            )
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            direction, sub = av
            inner = self.seq(sub)
            if direction > 0:
                shape = _Shape(0, 0, min(0, inner.first), max(0, inner.last))
            else:  # lookbehind: Python requires a fixed width, and starts it that far back
                shape = _Shape(0, 0, min(0, inner.first - inner.hi), max(0, inner.last - inner.hi))
            return shape
        if op is sre.AT:
            if av in _BEFORE_ONLY:
                return _Shape(0, 0, -1, 0)
            if av in _BOTH_SIDES:
                shape = _Shape(0, 0, -1, 1)
            elif av is sre.AT_END:  # end, or a final "\n" before the end
                shape = _Shape(0, 0, 0, 2)
            else:  # \Z, and $ under MULTILINE
                shape = _Shape(0, 0, 0, 1)
            return shape
        if op is sre.GROUPREF:
            if av not in self.groups:
                raise Unbounded("it refers to a group before the group has been matched")
            return _Shape(0, self.groups[av], 0, self.groups[av])
        if op is sre.GROUPREF_EXISTS:
            _group, yes, no = av
            shape = self.seq(yes)
            return shape.either(self.seq(no) if no is not None else _EMPTY)
        raise Unbounded(f"it uses a construct whose reach is not known here ({op})")


def _tree(pattern: re.Pattern[str]) -> Any:
    return sre_parse.parse(pattern.pattern, pattern.flags)


def measure(pattern: re.Pattern[str]) -> RegexBounds:
    """The bounds of ``pattern`` (a compiled ``str`` pattern).

    Raises ``Unbounded`` (a ``ValueError``, its message a clause to follow "the regex ...")
    when a repetition has no upper bound or the pattern uses a construct not known here.
    """
    walker = _Walker()
    shape = walker.seq(_tree(pattern))
    return RegexBounds(
        min_chars=shape.lo,
        max_chars=shape.hi,
        ahead=max(shape.last, 1),
        behind=-shape.first,
    )


def _flags(add: int, remove: int) -> str:
    plus = "".join(letter for flag, letter in _FLAG_LETTERS if add & flag)
    minus = "".join(letter for flag, letter in _FLAG_LETTERS if remove & flag)
    return plus + (f"-{minus}" if minus else "")


def _char(code: int) -> str:
    return f"\\U{code:08x}"


class _Writer:
    """Writes, from a parse tree, the pattern without its lookarounds (``full``) and the
    pattern of its prefixes (``prefix``)."""

    def __init__(self, walker: _Walker) -> None:
        self.walker = walker  # has been over the whole tree: knows each group's width
        self.groups = walker.groups

    def full(self, items: Any) -> str:
        return "".join(self.full_item(op, av) for op, av in items)

    def full_item(self, op: Any, av: Any) -> str:
        if op is sre.LITERAL:
            return _char(av)
        if op is sre.NOT_LITERAL:
            return f"[^{_char(av)}]"
        if op is sre.ANY:
            return "."
        if op is sre.IN:
            return self._set(av)
        if op is sre.SUBPATTERN:
            _group, add, remove, sub = av
            return f"(?{_flags(add, remove)}:{self.full(sub)})"
        if op is sre.ATOMIC_GROUP:
            return f"(?:{self.full(av)})"
        if op is sre.BRANCH:
            return "(?:" + "|".join(self.full(alt) for alt in av[1]) + ")"
        if op in _REPEATS:
            low, high, sub = av
            text = self.full(sub)
            if high == sre.MAXREPEAT:  # only over zero-width items (``measure`` refused others)
                return ""
            return f"(?:{text}){{{low},{high}}}"
        if op in _ASSERTIONS:
            return ""
        if op is sre.GROUPREF:
            return f"(?s:.){{0,{self.groups.get(av, 0)}}}"
        if op is sre.GROUPREF_EXISTS:
            _group, yes, no = av
            return f"(?:{self.full(yes)}|{self.full(no) if no is not None else ''})"
        raise Unbounded(f"it uses a construct not known here ({op})")

    def prefix(self, items: Any) -> str:
        # prefix(x1 x2 .. xn) = prefix(x1) | x1 prefix(x2 .. xn); every prefix may be empty.
        # An assertion that reads at most its own position adds nothing: leave it out.
        items = [(op, av) for op, av in items if op not in _ASSERTIONS or self._reads(op, av) > 1]
        if not items:
            return ""
        (op, av), rest = items[0], items[1:]
        head_prefix = self.prefix_item(op, av)
        if not rest:
            return head_prefix
        head = self.full_item(op, av)
        return f"(?:{head}{self.prefix(rest)}|{head_prefix})"

    def prefix_item(self, op: Any, av: Any) -> str:
        if op in _CHAR_OPS:
            return f"(?:{self.full_item(op, av)})?"
        if op is sre.GROUPREF:  # any text up to the group's length: already prefix-closed
            return self.full_item(op, av)
        if op in _ASSERTIONS:
            # It may read past the text's end while fewer characters than it reads are left.
            return f"(?s:.){{0,{self._reads(op, av) - 1}}}"
        if op is sre.SUBPATTERN:
            _group, add, remove, sub = av
            return f"(?{_flags(add, remove)}:{self.prefix(sub)})"
        if op is sre.ATOMIC_GROUP:
            return f"(?:{self.prefix(av)})"
        if op is sre.BRANCH:
            return "(?:" + "|".join(self.prefix(alt) for alt in av[1]) + ")"
        if op in _REPEATS:
            _low, high, sub = av
            if high == sre.MAXREPEAT or high == 0:
                return ""
            # A prefix of x{low,high} is some whole copies of x, then a prefix of one more.
            return f"(?:{self.full(sub)}){{0,{high - 1}}}{self.prefix(sub)}"
        if op is sre.GROUPREF_EXISTS:
            _group, yes, no = av
            return f"(?:{self.prefix(yes)}|{self.prefix(no) if no is not None else ''})"
        raise Unbounded(f"it uses a construct not known here ({op})")

    def _reads(self, op: Any, av: Any) -> int:
        """How far an assertion reads from its position: up to there + this (exclusive)."""
        return self.walker.item(op, av).last

    def _set(self, items: Any) -> str:
        parts = []
        for op, av in items:
            if op is sre.NEGATE:
                parts.append("^")
            elif op is sre.LITERAL:
                parts.append(_char(av))
            elif op is sre.RANGE:
                parts.append(f"{_char(av[0])}-{_char(av[1])}")
            elif op is sre.CATEGORY and av in _CATEGORIES:
                parts.append(_CATEGORIES[av])
            else:
                raise Unbounded(f"it uses a character class not known here ({op} {av})")
        return "[" + "".join(parts) + "]"


def prefix_matcher(pattern: re.Pattern[str]) -> re.Pattern[str] | None:
    """A pattern that matches, from a position to the end of the text (``\\Z``), every text
    on which an attempt to match ``pattern`` at that position may still read past the end
    (a superset; see the module's docstring). ``search(text, i)`` then finds the first
    position at or after ``i`` whose outcome is not yet final (``len(text)`` if none).

    None when it cannot be built (a construct not known here, or a pattern nested too deep
    to compile): the caller then treats every position as a possible beginning.
    """
    try:
        tree = _tree(pattern)
        walker = _Walker()
        walker.seq(tree)
        text = _Writer(walker).prefix(tree)
        return re.compile(f"(?:{text})\\Z", pattern.flags & ~re.VERBOSE)
    except (Unbounded, re.error, RecursionError, OverflowError):
        return None
