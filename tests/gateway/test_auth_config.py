"""The ``[auth]`` table in a node config: inline keys, a keys file beside the config, and
one-line errors that name the file and the field to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from quorum.config import ConfigError, NodeConfig
from quorum.gateway.keys import Role, digest

NODE = '[node]\nname = "a"\n'


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def key_table(name: str, key: str, header: str = "[[auth.keys]]", **more: str) -> str:
    lines = [header, f'name = "{name}"', f'sha256 = "{digest(key)}"']
    lines += [f"{k} = {v}" for k, v in more.items()]
    return "\n".join(lines) + "\n"


def test_no_auth_table_is_an_open_node(tmp_path: Path) -> None:
    config = NodeConfig.from_toml(write(tmp_path / "n.toml", NODE))
    assert config.auth is None and config.open_metrics is False


def test_inline_keys_become_api_keys(tmp_path: Path) -> None:
    text = NODE + "[auth]\nopen_metrics = true\n"
    text += key_table("team-a", "ka", models='["mock-chat"]', requests_per_minute="60",
                      tokens_per_minute="20000", max_concurrent="8")  # fmt: skip
    text += key_table("ops", "kb", role='"admin"')
    config = NodeConfig.from_toml(write(tmp_path / "n.toml", text))
    assert config.auth is not None and config.open_metrics is True
    assert config.auth.names == ("team-a", "ops")
    a = config.auth.authenticate("Bearer ka")
    assert (a.name, a.role, a.models) == ("team-a", Role.USER, frozenset({"mock-chat"}))
    assert (a.requests_per_minute, a.tokens_per_minute, a.max_concurrent) == (60, 20000, 8)
    assert config.auth.authenticate("Bearer kb").is_admin


def test_open_metrics_defaults_to_false(tmp_path: Path) -> None:
    config = NodeConfig.from_toml(write(tmp_path / "n.toml", NODE + key_table("a", "k")))
    assert config.auth is not None and config.open_metrics is False


def test_keys_file_is_relative_to_the_node_config_and_adds_to_inline_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not the config's directory
    write(tmp_path / "conf" / "secrets" / "keys.toml", key_table("file-key", "kf", "[[keys]]"))
    path = write(
        tmp_path / "conf" / "n.toml",
        NODE + '[auth]\nkeys_file = "secrets/keys.toml"\n' + key_table("inline", "ki"),
    )
    config = NodeConfig.from_toml(path)
    assert config.auth is not None and config.auth.names == ("inline", "file-key")
    assert config.auth.authenticate("Bearer kf").name == "file-key"


def test_keys_file_alone_is_enough_and_may_be_absolute(tmp_path: Path) -> None:
    keys = write(tmp_path / "elsewhere" / "keys.toml", key_table("only", "k", "[[keys]]"))
    path = write(tmp_path / "n.toml", NODE + f'[auth]\nkeys_file = "{keys}"\n')
    config = NodeConfig.from_toml(path)
    assert config.auth is not None and config.auth.names == ("only",)


def test_keys_file_strings_name_environment_variables(tmp_path: Path) -> None:
    write(tmp_path / "keys.toml", '[[keys]]\nname = "$(TEAM)"\nsha256 = "${SHA}"\n')
    path = write(tmp_path / "n.toml", NODE + '[auth]\nkeys_file = "keys.toml"\n')
    config = NodeConfig.from_toml(path, environ={"TEAM": "team-a", "SHA": digest("k")})
    assert config.auth is not None and config.auth.authenticate("Bearer k").name == "team-a"
    with pytest.raises(ConfigError, match=r"keys\.toml: keys\[0\]\.sha256: .*SHA is not set"):
        NodeConfig.from_toml(path, environ={"TEAM": "team-a"})


A = digest("ka")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[auth]\n", "n.toml: auth: no key configured: add a key with `quorum keys new NAME`"),
        ("[auth]\nopen_metrics = true\n", "n.toml: auth: no key configured"),
        (
            key_table("a", "ka") + key_table("a", "kb"),
            "n.toml: auth.keys[1].name: the name 'a' is already used by another key",
        ),
        (
            key_table("a", "ka") + key_table("b", "ka"),
            "n.toml: auth.keys[1].sha256: the same digest as key 'a'",
        ),
        (
            '[[auth.keys]]\nname = "team a"\nsha256 = "' + A + '"\n',
            "n.toml: auth.keys[0].name: a key's name is 1 to 64 letters, digits, '-', '_' or "
            "'.', got 'team a'",
        ),
        (
            '[[auth.keys]]\nname = "a"\nsha256 = "xyz"\n',
            "n.toml: auth.keys[0].sha256: expected the key's sha256 as 64 hex characters",
        ),
        ('[[auth.keys]]\nname = "a"\n', "n.toml: auth.keys[0].sha256: missing (required)"),
        (
            '[[auth.keys]]\nname = "a"\nsha256 = "' + A + '"\nrole = "root"\n',
            "n.toml: auth.keys[0].role: expected 'user' or 'admin', got 'root'",
        ),
        (
            '[[auth.keys]]\nname = "a"\nsha256 = "' + A + '"\nrpm = 5\n',
            "n.toml: auth.keys[0].rpm: unknown key",
        ),
        (
            '[[auth.keys]]\nname = "a"\nsha256 = "' + A + '"\nmax_concurrent = 0\n',
            "n.toml: auth.keys[0].max_concurrent: expected greater than or equal to 1, got 0",
        ),
        (
            '[[auth.keys]]\nname = "a"\nsha256 = "' + A + '"\nmodels = "m"\n',
            "n.toml: auth.keys[0].models: expected a valid list, got 'm'",
        ),
        ('[auth]\nopen_metrics = "yes"\n', "n.toml: auth.open_metrics: expected a valid boolean"),
        ("[auth]\nkey = 1\n", "n.toml: auth.key: unknown key"),
        (
            '[auth]\nkeys_file = "missing.toml"\n',
            "n.toml: auth.keys_file: cannot read {dir}/missing.toml: No such file or directory",
        ),
    ],
)
def test_bad_auth_is_one_line_naming_file_and_field(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path / "n.toml", NODE + text)
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}/n.toml: ")
    assert line.format(dir=tmp_path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("keys_text", "line"),
    [
        ("[[keys]\n", "keys.toml: not valid TOML"),
        ('[[keys]]\nname = "f"\nsha256 = "nope"\n', "keys.toml: keys[0].sha256: expected the key"),
        (
            key_table("f", "kf", "[[keys]]") + key_table("g", "kg", "[[keys]]") + "[x]\n",
            "keys.toml: x: unknown key",
        ),
        (
            key_table("f", "kf", "[[keys]]") + key_table("inline", "kg", "[[keys]]"),
            "keys.toml: keys[1].name: the name 'inline' is already used by another key",
        ),
        (
            key_table("f", "ki", "[[keys]]"),
            "keys.toml: keys[0].sha256: the same digest as key 'inline'",
        ),
        ("[[auth.keys]]\n", "keys.toml: auth: unknown key"),  # the file's tables are [[keys]]
    ],
)
def test_bad_keys_file_is_one_line_naming_that_file_and_field(
    tmp_path: Path, keys_text: str, line: str
) -> None:
    write(tmp_path / "keys.toml", keys_text)
    path = write(
        tmp_path / "n.toml", NODE + '[auth]\nkeys_file = "keys.toml"\n' + key_table("inline", "ki")
    )
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}/keys.toml: ") and line in message
    assert "\n" not in message


def test_an_empty_keys_file_and_no_inline_key_names_both_places(tmp_path: Path) -> None:
    write(tmp_path / "keys.toml", "")
    path = write(tmp_path / "n.toml", NODE + '[auth]\nkeys_file = "keys.toml"\n')
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(path)
    assert str(info.value) == (
        f"{path}: auth (and its keys_file {tmp_path}/keys.toml): no key configured: "
        "add a key with `quorum keys new NAME`"
    )
