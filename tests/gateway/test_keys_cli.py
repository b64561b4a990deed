"""`quorum keys new`: the key once, on its own line, then a table that pastes into [auth]
and matches it; a bad name is one line and status 2."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from quorum.cli import main
from quorum.config import NodeConfig
from quorum.gateway.keys import ApiKeys, AuthTable, Role, digest
from tests.helpers import ROOT


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["keys", "new", *args])
    out, err = capsys.readouterr()
    return status, out, err


def split(out: str) -> tuple[str, dict[str, Any]]:
    """The key line and the parsed TOML block after it."""
    key, blank, *block = out.splitlines()
    assert blank == ""
    return key, tomllib.loads("\n".join(block))


def test_prints_the_key_once_then_a_table_whose_digest_matches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, err = run(capsys, "team-a")
    assert status == 0
    key, data = split(out)
    assert key.startswith("sk-quorum-") and len(key) == len("sk-quorum-") + 43
    assert out.count(key) == 1 and key not in err
    table = AuthTable.model_validate(data["auth"])
    assert set(data) == {"auth"} and set(data["auth"]) == {"keys"}
    (entry,) = table.keys
    assert (entry.name, entry.role, entry.sha256) == ("team-a", Role.USER, digest(key))
    assert entry.models is None and entry.requests_per_minute is None
    assert ApiKeys(table.keys).authenticate(f"Bearer {key}").name == "team-a"
    assert len(err.strip().splitlines()) == 1 and "only this once" in err


def test_each_run_makes_a_new_key(capsys: pytest.CaptureFixture[str]) -> None:
    first = split(run(capsys, "a")[1])[0]
    second = split(run(capsys, "a")[1])[0]
    assert first != second


def test_role_models_and_quotas_go_into_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(
        capsys, "ops", "--role", "admin", "--models", "mock-chat, mock-reasoning",
        "--rpm", "60", "--tpm", "20000", "--max-concurrent", "8",
    )  # fmt: skip
    assert status == 0
    key, data = split(out)
    (entry,) = AuthTable.model_validate(data["auth"]).keys
    assert entry.role is Role.ADMIN
    assert entry.models == ["mock-chat", "mock-reasoning"]
    assert (entry.requests_per_minute, entry.tokens_per_minute, entry.max_concurrent) == (
        60,
        20000,
        8,
    )
    assert ApiKeys([entry]).authenticate(f"Bearer {key}").is_admin


def test_pasted_blocks_make_a_node_config_that_accepts_their_keys(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocks, keys = [], []
    for args in (["team-a", "--models", "mock-chat"], ["ops", "--role", "admin"]):
        out = run(capsys, *args)[1]
        key, _, block = out.split("\n", 2)
        keys.append(key)
        blocks.append(block)
    path = tmp_path / "n.toml"
    path.write_text('[node]\nname = "a"\n' + "".join(blocks))
    config = NodeConfig.from_toml(path)
    assert config.auth is not None and config.auth.names == ("team-a", "ops")
    team_a, ops = (config.auth.authenticate(f"Bearer {k}") for k in keys)
    assert team_a.name == "team-a" and team_a.may_use("mock-chat") and not team_a.may_use("x")
    assert ops.name == "ops" and ops.is_admin


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["team a"], "quorum keys new: NAME: a key's name is 1 to 64 letters"),
        (["x" * 65], "quorum keys new: NAME: a key's name is 1 to 64 letters"),
        (["a/b"], "quorum keys new: NAME: a key's name is 1 to 64 letters"),
        (["a", "--rpm", "0"], "quorum keys new: --rpm: expected greater than or equal to 1"),
        (["a", "--max-concurrent", "-1"], "quorum keys new: --max-concurrent: expected"),
        (["a", "--models", ","], "quorum keys new: --models: name at least one model"),
    ],
)
def test_a_bad_option_is_one_line_status_2_and_no_key(
    capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(line)
    assert "sk-quorum-" not in err


def test_bad_name_from_the_command_line_is_one_line_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quorum", "keys", "new", "team a"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "quorum keys new: NAME: a key's name is 1 to 64 letters, digits, '-', '_' or '.'"
    ]
