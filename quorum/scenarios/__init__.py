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
when it FAILs. Parts: ``cluster`` (processes, namespaces), ``target`` (fault injection),
``clients`` (openai SDK clients, the load balancer), ``env`` (options, results), ``library``
(the scenarios).
"""

from __future__ import annotations

import argparse
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


def main(args: argparse.Namespace) -> int:
    """``quorum scenario``: run what ``args`` names; the exit status."""
    from quorum.scenarios.runner import main as run_main

    return run_main(args)


def __getattr__(name: str) -> Any:
    # The runner (and with it the openai SDK) loads only when a scenario is used, so that
    # every other quorum command starts without it.
    if name in ("SCENARIOS", "Options", "ScenarioResult", "run", "script", "quick"):
        from quorum.scenarios import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'quorum.scenarios' has no attribute {name!r}")
