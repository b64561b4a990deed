"""Failure scenarios on a real cluster: kill, stall, partition, drain and restart nodes while
stock OpenAI clients stream through it, then check what every client got.

::

    quorum scenario --list
    quorum scenario kill-mid-stream --trials 100
    quorum scenario partition --quick --netns
    python scenarios/flapping.py --quick

Each scenario starts ``python -m quorum node`` processes from ``nodes/*.toml`` (rewritten to
free loopback ports, or into network namespaces with ``--netns``), or acts on the
docker-compose cluster (``--target compose``), and prints a report; the exit status is 1
when it FAILs, 2 when the machine lacks what it needs (one line says what to install). They
need the ``openai`` package: ``pip install 'quorum[scenarios]'``. Parts: ``cluster``
(processes, namespaces), ``target`` (fault injection), ``clients`` (openai SDK clients, the
load balancer), ``env`` (options, results, what a scenario needs), ``library`` (the
scenarios), ``runner`` (runs them, prints reports).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SCENARIOS", "Options", "ScenarioResult", "add_arguments", "main", "run", "script"]


def add_arguments(parser: argparse.ArgumentParser, *, with_name: bool = True) -> None:
    """The options of ``quorum scenario`` (and of each ``scenarios/*.py`` script)."""
    if with_name:
        parser.add_argument(
            "name", nargs="?", help="a scenario (see --list), or 'all' to run every one"
        )
        parser.add_argument("--list", action="store_true", help="list the scenarios")
    parser.add_argument("--trials", type=int, default=None, help="trials (default per scenario)")
    parser.add_argument(
        "--quick", action="store_true", help="few trials, LOCAL gossip preset, short durations"
    )
    parser.add_argument(
        "--netns", action="store_true", help="each node in its own network namespace (root)"
    )
    parser.add_argument("--target", choices=("local", "compose"), default="local")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients")
    parser.add_argument(
        "--compose-file", type=Path, default=None, help="for --target compose (docker-compose.yml)"
    )
    parser.add_argument("--seed", type=int, default=0, help="varies prompts and seeds")


OPENAI_MISSING = (
    "quorum scenario: the scenarios drive the cluster with the openai package, which is not "
    "installed: python3 -m pip install 'quorum[scenarios]' (or -e '.[scenarios]' in a checkout)"
)


def main(args: argparse.Namespace) -> int:
    """``quorum scenario``: run what ``args`` names; the exit status (2, with one line
    saying how to install it, when the ``openai`` package is missing)."""
    try:
        from quorum.scenarios.runner import main as run_main
    except ModuleNotFoundError as exc:
        if exc.name != "openai":
            raise
        print(OPENAI_MISSING, file=sys.stderr)
        return 2
    return run_main(args)


def script(name: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scenarios/<name>.py``: the same options, the name fixed."""
    parser = argparse.ArgumentParser(prog=f"scenarios/{name.replace('-', '_')}.py")
    add_arguments(parser, with_name=False)
    args = parser.parse_args(argv)
    args.name, args.list = name, False
    return main(args)


def __getattr__(name: str) -> Any:
    # The runner (and with it the openai SDK) loads only when a scenario is used, so that
    # every other quorum command starts without it.
    if name in ("SCENARIOS", "Options", "ScenarioResult", "run", "quick"):
        from quorum.scenarios import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'quorum.scenarios' has no attribute {name!r}")
