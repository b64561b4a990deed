"""The direction of imports between Quorum's parts, as pyproject.toml's import-linter
contracts state it (wire/sse/errors → backends → routing → api/node → cli; gossip on its
own)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_imports_follow_the_layers() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
