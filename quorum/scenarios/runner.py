"""The scenario runner: runs scenarios by name and renders their reports (imported on
use by ``quorum.scenarios``, since the clients pull in the openai SDK)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

import trio
from rich.console import Console
from rich.table import Table

from quorum.scenarios.env import (
    MissingTool,
    Options,
    ScenarioError,
    ScenarioResult,
    open_env,
    partition_method,
)
from quorum.scenarios.library import SCENARIOS, Scenario

__all__ = ["SCENARIOS", "MissingTool", "Options", "ScenarioResult", "main", "run"]

console = Console(highlight=False)


def _options(args: argparse.Namespace) -> Options:
    return Options(
        trials=args.trials,
        quick=args.quick,
        netns=args.netns,
        target=args.target,
        clients=args.clients,
        compose_file=args.compose_file,
        seed=args.seed,
    )


async def _run(scenario: Scenario, options: Options) -> ScenarioResult:
    kind = "compose" if options.target == "compose" else ("netns" if options.netns else "local")
    preset = "compose configs" if options.target == "compose" else options.preset
    result = ScenarioResult(scenario.name, kind, preset)
    started = trio.current_time()
    if options.target == "compose" and not scenario.compose:
        result.failures += 1
        result.notes.append(
            f"{scenario.name} needs configs this run writes (warm-up, small slots, keys): "
            "run it with --target local"
        )
        return result
    partition = partition_method(options) if scenario.partitions else None
    env_notes: list[str] = []
    try:
        async with open_env(
            options,
            routing=scenario.routing,
            mock=scenario.mock(options.quick),
            scenario_backend=scenario.backend(options.quick),
            start=scenario.start,
            partition=partition,
            nodes_dir=scenario.nodes_dir,
            keys=scenario.keys(options.quick),
        ) as env:
            env_notes = env.notes
            if env.target.kind != kind:
                result.target = env.target.kind
            try:
                await scenario.run(env, result)
            except ScenarioError as exc:
                result.failures += 1
                result.notes.append(f"scenario error: {exc}")
            env.keep = not result.passed
    except ScenarioError as exc:
        result.failures += 1
        result.notes.append(f"cluster error: {exc}")
    result.notes = env_notes + result.notes
    result.seconds = trio.current_time() - started
    return result


def run(name: str, options: Options) -> ScenarioResult:
    """Run one scenario to its end (blocking) and return its result. Raises
    ``MissingTool`` before starting anything when the machine lacks what it needs."""
    scenario = SCENARIOS[name]
    missing = scenario.missing()
    if missing is not None:
        raise MissingTool(missing)
    return trio.run(_run, scenario, options)


def render(result: ScenarioResult) -> None:
    verdict = "[green]PASS" if result.passed else "[red]FAIL"
    table = Table(
        title=f"{result.name} — {result.target}, {result.preset}: {result.trials} trial(s), "
        f"{result.failures} failure(s), {result.seconds:.0f} s"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for name, value, want in result.figures:
        table.add_row(name, value, want)
    for what, ok in result.checks:
        table.add_row(what, "yes" if ok else "[red]no", "yes")
    console.print(table)
    for note in result.notes:
        console.print(f"  · {note}", markup=False)
    console.print(f"{result.name}: {verdict}")


def render_summary(results: Sequence[ScenarioResult]) -> None:
    table = Table(title="scenarios")
    for col in ("scenario", "target", "trials", "failures", "seconds", "result"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.name,
            r.target,
            str(r.trials),
            str(r.failures),
            f"{r.seconds:.0f}",
            "[green]PASS" if r.passed else "[red]FAIL",
        )
    console.print(table)


def list_scenarios() -> None:
    table = Table(title="scenarios (quorum scenario NAME, or python scenarios/NAME.py)")
    table.add_column("name")
    table.add_column("what")
    table.add_column("script")
    for s in SCENARIOS.values():
        table.add_row(s.name, s.summary, s.script)
    console.print(table)


def _needs_root(options: Options) -> None:
    if options.netns and os.geteuid() != 0:
        console.print("[yellow]--netns needs root: falling back to loopback")


def main(args: argparse.Namespace) -> int:
    """``quorum scenario``: the exit status (0 PASS, 1 FAIL, 2 usage or a missing tool:
    one line on stderr saying what to install)."""
    if args.list or not args.name:
        list_scenarios()
        return 0 if args.list else 2
    options = _options(args)
    _needs_root(options)
    names = list(SCENARIOS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        console.print(f"[red]no scenario {unknown[0]!r}; quorum scenario --list shows them")
        return 2
    results = []
    for name in names:
        try:
            result = run(name, options)
        except MissingTool as exc:
            print(f"quorum scenario {name}: {exc}", file=sys.stderr)
            return 2
        render(result)
        results.append(result)
    if len(results) > 1:
        render_summary(results)
    return 0 if all(r.passed for r in results) else 1


def quick(options: Options) -> Options:
    return replace(options, quick=True)
