"""The resume point (``quorum_resume``) that an entry node sends with a forwarded request:
its JSON shape, and the bounds a serving node checks before doing anything with it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from quorum.backends.base import MAX_RESUME_COUNT, MAX_RESUME_TEXT_CHARS, Resume


def test_resume_json_carries_tool_calls_and_reads_back() -> None:
    resume = Resume(7, {"content": "One,", "reasoning": "count"}, tool_calls=3)
    wire = resume.as_json()
    assert wire == {"events": 7, "tool_calls": 3, "text": {"content": "One,", "reasoning": "count"}}
    assert Resume.from_json(json.loads(json.dumps(wire))) == resume


def test_resume_json_without_tool_calls_means_none_were_delivered() -> None:
    assert Resume.from_json({"events": 2, "text": {"content": "a"}}).tool_calls == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tool_calls", -1),
        ("tool_calls", True),
        ("tool_calls", "1"),
        ("tool_calls", 1.0),
        ("tool_calls", None),
        ("tool_calls", MAX_RESUME_COUNT + 1),
        ("events", MAX_RESUME_COUNT + 1),
        ("events", 10**30),
        ("events", -1),
    ],
)
def test_resume_json_refuses_counts_out_of_range(key: str, value: Any) -> None:
    fields = {"events": 1, "text": {}, key: value}
    with pytest.raises(ValueError, match=rf"quorum_resume\.{key} must be an integer from 0 to"):
        Resume.from_json(fields)


def test_resume_json_accepts_counts_at_the_maximum() -> None:
    resume = Resume.from_json({"events": MAX_RESUME_COUNT, "tool_calls": MAX_RESUME_COUNT})
    assert resume.events == resume.tool_calls == MAX_RESUME_COUNT


def test_resume_json_refuses_text_over_the_size_limit() -> None:
    half = "x" * (MAX_RESUME_TEXT_CHARS // 2)
    with pytest.raises(ValueError, match=r"quorum_resume\.text holds"):
        Resume.from_json({"events": 1, "text": {"content": half, "reasoning": half}})


def test_resume_stays_frozen_and_slotted() -> None:
    resume = Resume(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resume.tool_calls = 2  # type: ignore[misc]
    assert not hasattr(resume, "__dict__")
