"""``quorum scenario real-model``: kill -9 of a node serving greedy streams of SmolLM2 in
llama.cpp, in quick mode on real node processes, loses and repeats no character; without
llama.cpp it stops before starting anything, with one line naming the install command."""

from __future__ import annotations

import re

import pytest

from quorum.scenarios import Options, library
from quorum.scenarios import run as run_scenario
from quorum.scenarios.env import MissingTool
from quorum.scenarios.library import SCENARIOS
from tests.helpers import needs_llamacpp

# The openai SDK's nested async generators are finalized by GC under trio (test_scenarios.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'openai\\.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpx2\\.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore2\\.:ResourceWarning"),
]


@pytest.mark.slow
@needs_llamacpp
def test_real_model_resumes_killed_streams_without_losing_or_repeating_text() -> None:
    result = run_scenario("real-model", Options(quick=True))
    figures = {name: value for name, value, _ in result.figures}
    assert result.passed, (result.figures, result.checks, result.notes)
    assert int(figures["streams on the killed node at the kill"]) > 0
    assert figures["lost characters (resumed streams)"] == "0"
    assert figures["duplicated characters (resumed streams)"] == "0"
    assert figures["lost / duplicated characters (streams not killed)"] == "0 / 0"


def test_without_llamacpp_the_scenario_names_what_to_install_before_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(library, "xllamacpp_installed", lambda: False)
    missing = library.llamacpp_missing()
    assert missing is not None and "pip install -e '.[llamacpp]'" in missing
    assert SCENARIOS["real-model"].missing is library.llamacpp_missing
    with pytest.raises(MissingTool, match=re.escape(missing)):
        run_scenario("real-model", Options(quick=True))  # raises before any process starts
