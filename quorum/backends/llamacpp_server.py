"""The llama.cpp server process behind a ``llamacpp`` backend (``quorum.backends.llamacpp``):
``python -m quorum.backends.llamacpp_server --model FILE ...``.

It loads the GGUF model into llama.cpp's own OpenAI-compatible HTTP server (``xllamacpp``,
prebuilt CPU wheels) on a free port of 127.0.0.1, writes one line to stdout,
``{"url": "http://127.0.0.1:PORT"}``, and serves until its stdin reaches end of file: the node
that started it holds the other end of that pipe, so the server ends with the node however
the node ends (``kill -9`` included), and never outlives it. It ignores SIGINT and SIGTERM,
which a terminal's Ctrl-C or a service manager sends to the node's whole process group: the
node drains first, and its streams need the server until then. llama.cpp's log goes to
stderr (errors and warnings only, unless ``--verbosity``). A model that cannot be loaded ends
it with status 1 and one line on stderr saying why.

It is a process of its own, not a thread of the node, because llama.cpp loads the model with
Python's GIL held (``xllamacpp.Server`` blocks the interpreter for the whole load: measured
0.54 s for SmolLM2-135M; longer for larger models), which would stall the node's event loop,
its gossip included, and because a crash in llama.cpp then costs the model, not the node.

Only the standard library and ``xllamacpp`` are imported, so that it starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m quorum.backends.llamacpp_server")
    parser.add_argument("--model", required=True, help="the GGUF file")
    parser.add_argument("--alias", required=True, help="the model name the server answers to")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for generation")
    parser.add_argument("--parallel", type=int, default=2, help="sequences decoded at once")
    parser.add_argument("--ctx", type=int, default=2048, help="context tokens, all slots")
    parser.add_argument("--ubatch", type=int, default=16, help="tokens per forward pass")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template file")
    parser.add_argument("--verbosity", type=int, default=1, help="llama.cpp's log verbosity")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Load, announce the URL, serve until stdin closes; the exit status."""
    args = _arguments(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    try:
        import xllamacpp  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        print(
            "llama.cpp server: the xllamacpp package is not installed: "
            "pip install -e '.[llamacpp]'",
            file=sys.stderr,
        )
        return 1
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx
    params.n_ubatch = args.ubatch
    params.n_batch = max(params.n_batch, args.ubatch)
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_threads_http = args.parallel + 2  # the node sends at most `parallel` at once
    params.cache_ram_mib = 0  # no host-memory prompt cache (8 GiB by default)
    params.verbosity = args.verbosity
    if args.chat_template is not None:
        with open(args.chat_template, encoding="utf-8") as file:
            params.chat_template = file.read()
    try:
        server = xllamacpp.Server(params)
    except RuntimeError as exc:
        print(f"llama.cpp server: cannot load {args.model}: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps({"url": server.listening_address}), flush=True)
        os.dup2(2, 1)  # anything else written to stdout goes to the log
        while sys.stdin.buffer.read(4096):
            pass  # the node writes nothing: this waits for end of file
    finally:
        del server  # llama.cpp's destructor stops the HTTP server and the main loop
    return 0


if __name__ == "__main__":
    sys.exit(main())
