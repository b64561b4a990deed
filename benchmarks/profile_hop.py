"""Where a forwarding hop spends its CPU: py-spy flame graphs of both nodes under load.

    python3 -m pip install py-spy                  # once; sampling another pid needs root
    python benchmarks/profile_hop.py               # c=1 and c=64, 15 s each at 200 Hz (~1.5 min)
    python benchmarks/profile_hop.py --seconds 5   # quicker, noisier
    python benchmarks/profile_hop.py --summarize   # only read the SVGs already written

The same two nodes as ``compare_hop.py`` (a serving node with the zero-latency mock
``mock-zero``, and an entry node that serves nothing and forwards to it), started with
``quorum.launch`` on free 127.0.0.1 ports. At each concurrency, streamed requests go to the
entry node (``quorum.bench.run_bench``, in this process): first ``--seconds`` without
profiling, then ``--seconds`` while two ``py-spy record`` runs, one per node pid, sample both
at once. Each run prints its req/s and the CPU that each node, the load generator and py-spy
used (``/proc/<pid>/stat``), as a share of one core. Written to ``--out`` (default
``benchmarks/profiles/``): ``entry-c1.svg``, ``serving-c1.svg``, ``entry-c64.svg``,
``serving-c64.svg``.

Then, from each SVG's own sample counts (the ``fg:x``/``fg:w`` py-spy gives every box), it
prints the self time of the top functions; the samples by layer (the package of the innermost
frame, passing over contextlib and such helpers: hypercorn/h11, quart, trio, json, quorum's
modules); and the samples inside trio by their nearest caller outside it. Samples in
``epoll_wait`` and in an idle worker thread are counted apart as "waiting" (py-spy keeps some
of them although it drops idle threads), and each layer is also given as a share of the rest.

The load generator shares the machine's cores with both nodes and both samplers; the figures
say where each node's time goes, not how fast it could go alone.
"""

from __future__ import annotations

import argparse
import bisect
import html
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare_hop import MODEL, node_config, wait_forwarder_knows

from quorum.bench import BenchConfig, Report, run_bench
from quorum.launch import NodeCluster, NodeStartError, write_nodes

CONCURRENCIES = (1, 64)
SETTLE_S = 2.0  # traffic runs this long before the samplers start, and after they stop


# --- recording ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spy:
    """One ``py-spy record`` of ``pid`` into ``svg``, its output appended to ``log``;
    ``title`` replaces the SVG's (py-spy's command line, with this machine's paths)."""

    pid: int
    svg: Path
    log: Path
    title: str


async def record(pyspy: str, spy: Spy, seconds: int, rate: int, failures: list[str]) -> None:
    """``py-spy record`` of ``spy.pid`` for ``seconds`` at ``rate`` Hz into ``spy.svg``.
    Appends a line to ``failures`` when py-spy exits with an error or has not finished
    ``seconds + 30`` s later; py-spy is ended by its own pid whatever happens."""
    argv = [
        pyspy, "record", "--pid", str(spy.pid), "--duration", str(seconds),
        "--rate", str(rate), "--format", "flamegraph", "--output", str(spy.svg),
    ]  # fmt: skip
    with spy.log.open("ab") as out:
        process = await trio.lowlevel.open_process(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    status: int | None = None
    try:
        with trio.move_on_after(seconds + 30):
            status = await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.kill()
                await process.wait()
    if status != 0:
        tail = spy.log.read_text(errors="replace").strip().splitlines()[-2:]
        why = "did not finish in time" if status is None else f"exited with {status}"
        failures.append(f"py-spy on pid {spy.pid} {why}: {' / '.join(tail)}")
        return
    svg = spy.svg.read_text()
    title = html.escape(spy.title)
    spy.svg.write_text(TITLE.sub(lambda m: m[1] + title + m[2], svg, count=1))


TITLE = re.compile(r'(<text id="title"[^>]*>)[^<]*(</text>)')


async def load_and_record(
    url: str,
    concurrency: int,
    args: argparse.Namespace,
    pids: list[int],
    spies: list[Spy],
    failures: list[str],
) -> Report:
    """Streamed requests to ``url`` at ``concurrency`` for ``args.seconds + 2 * SETTLE_S``;
    the ``spies`` (none: a run without profiling) record for ``args.seconds``, starting
    ``SETTLE_S`` in. Prints the CPU each of ``pids``, this process and py-spy used."""
    report: list[Report] = []
    config = BenchConfig(
        url=url, model=MODEL, concurrency=concurrency, requests=1_000_000,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
        duration_s=args.seconds + 2 * SETTLE_S, timeout_s=30.0, seed=args.seed,
    )  # fmt: skip

    async def traffic() -> None:
        report.append(await run_bench(config))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(traffic)
        await trio.sleep(SETTLE_S)
        before, began, cores = cpu_seconds(pids), trio.current_time(), all_cores()
        if not spies:
            await trio.sleep(args.seconds)
        async with trio.open_nursery() as samplers:
            for spy in spies:
                samplers.start_soon(record, args.pyspy, spy, args.seconds, args.rate, failures)
        after, wall = cpu_seconds(pids), trio.current_time() - began
        (busy_ticks, ticks), (busy_ticks0, ticks0) = all_cores(), cores
        machine = (busy_ticks - busy_ticks0) / max(ticks - ticks0, 1)
    names = ["entry node", "serving node", "load generator", "py-spy"][: len(pids) + 2]
    busy = ", ".join(
        f"{name} {(b - a) / wall:.0%}" for name, a, b in zip(names, before, after, strict=True)
    )
    r = report[0]
    print(
        f"  c={concurrency:<3} {'profiled' if spies else 'unprofiled':<10} "
        f"{r.completed} ok, {r.failed} failed, {r.req_per_s:.0f} req/s; "
        f"CPU (share of one core): {busy}; all cores {machine:.0%} busy"
    )
    return r


def cpu_seconds(pids: list[int]) -> list[float]:
    """User + system CPU seconds so far of each pid (``/proc/<pid>/stat``), of this process
    (the load generator), and of its children that have been reaped (py-spy)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tick)  # utime, stime: fields 14, 15
    times = os.times()
    return [*out, times.user + times.system, times.children_user + times.children_system]


def all_cores() -> tuple[int, int]:
    """Busy (not idle, not iowait) and total jiffies of all cores so far (``/proc/stat``)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


# --- reading a py-spy flame graph -----------------------------------------------------------

FRAME = re.compile(
    r'<g><title>(?P<title>[^<]*)</title><rect [^>]*?y="(?P<y>[\d.]+)"[^>]*?'
    r'fg:x="(?P<x>\d+)" fg:w="(?P<w>\d+)"'
)
SAMPLES = re.compile(r"\s*\([\d,]+ samples?, [\d.]+%\)$")
LABEL = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


@dataclass
class Frame:
    """One box of the flame graph: ``func`` in ``file`` (py-spy's short path), ``w``
    samples from sample ``x`` on, ``own`` of them with this frame innermost."""

    func: str
    file: str
    depth: float  # the box's y; one row is one call level
    x: int
    w: int
    own: int = 0
    parent: Frame | None = None


def read_frames(svg: Path) -> tuple[int, list[Frame]]:
    """Total samples, and every frame but the root with its parent and self samples, from
    the ``fg:x``/``fg:w`` (first sample, samples) that py-spy's SVG gives each box."""
    frames, total, root_y = [], 0, 0.0
    for m in FRAME.finditer(svg.read_text()):
        title = SAMPLES.sub("", html.unescape(m["title"]))
        if title == "all":
            total, root_y = int(m["w"]), float(m["y"])
            continue
        label = LABEL.match(title)
        func, file = (label["func"], label["file"]) if label else (title, "")
        frames.append(Frame(func, file, float(m["y"]), int(m["x"]), int(m["w"])))
    rows: dict[float, list[Frame]] = {}
    for f in frames:
        rows.setdefault(f.depth, []).append(f)
    order = sorted(rows, key=lambda y: abs(y - root_y))  # from the root outwards
    for row in rows.values():
        row.sort(key=lambda f: f.x)
    for outer, inner in itertools.pairwise(order):
        starts = [f.x for f in rows[outer]]
        for f in rows[inner]:
            parent = rows[outer][bisect.bisect_right(starts, f.x) - 1]
            f.parent = parent
            parent.own -= f.w
    for f in frames:
        f.own += f.w
    return total, frames


# (layer, prefixes of py-spy's file name) in order; the first match names the layer. A
# sample counts for the layer of its innermost frame, passing over the helpers in NEUTRAL
# (a context manager's __exit__ counts for whoever used it).
WAITING = {("EpollIOManager.get_events", "trio/_core/_io_epoll.py"),
           ("WorkerThread._work", "trio/_core/_thread_cache.py")}  # fmt: skip
# fmt: off
LAYERS = (
    ("HTTP server (hypercorn, h11)", ("hypercorn/", "h11/", "quorum/server.py")),
    ("ASGI app (quart, quorum/api.py)", ("quart/", "quart_trio/", "werkzeug/", "quorum/api")),
    ("node-to-node channel (msgpack frames)",
        ("quorum/channel", "quorum/routing/channel", "msgpack/")),
    ("SSE parsing (quorum/sse.py)", ("quorum/sse",)),
    ("relay: per-event bookkeeping (routing/relay.py)", ("quorum/routing/relay",)),
    ("routing: dispatch, select, headers, membership",
        ("quorum/routing/", "quorum/gateway/", "quorum/backends/headers")),
    ("mock generation", ("quorum/backends/mock", "quorum/backends/schema_values")),
    ("chunk encoding (quorum/wire.py)", ("quorum/wire",)),
    ("JSON (stdlib json)", ("json/",)),
    ("metrics", ("prometheus_client/", "quorum/metrics", "quorum/stats")),
    ("quorum, other", ("quorum/",)),
    ("trio: socket send/recv", ("trio/_socket", "trio/_highlevel_socket")),
    ("trio: scheduling, cancel scopes, channels", ("trio/", "outcome/", "<attrs generated")),
    ("httpx/httpcore", ("httpx/", "httpcore/")),
)
# fmt: on
NEUTRAL = (
    "contextlib",
    "<frozen abc>",
    "typing.py",
    "<string>",
    "functools",
    "enum.py",
    "dataclasses",
    "threading.py",
    "abc.py",
    "<frozen _collections_abc>",
)  # fmt: skip


def layer_of(f: Frame) -> str:
    if (f.func, f.file) in WAITING:
        return "waiting: epoll_wait, idle worker thread"
    node: Frame | None = f
    while node is not None and node.file.startswith(NEUTRAL):
        node = node.parent
    file = node.file if node is not None else f.file
    for name, prefixes in LAYERS:
        if file.startswith(prefixes):
            return name
    return "other (stdlib, C)"


def trio_caller(f: Frame) -> str:
    """For a sample spent in trio: the nearest caller outside trio (and NEUTRAL), as
    "func (file)"; "trio's run loop" for the loop's own work (between tasks)."""
    node: Frame | None = f
    while node is not None and node.file.startswith((*TRIO, *NEUTRAL)):
        if node.file == "trio/_core/_run.py" and node.func in ("run", "unrolled_run"):
            return "trio's run loop"
        node = node.parent
    return "trio's run loop" if node is None else f"{node.func} ({node.file})"


TRIO = ("trio/", "outcome/", "<attrs generated")


@dataclass(frozen=True)
class Profile:
    name: str
    samples: int
    functions: list[tuple[str, int]]  # "func (file)", self samples; most first
    layers: list[tuple[str, int]]
    trio_callers: list[tuple[str, int, int]]  # caller, samples in trio, of them in sockets


def summarize(name: str, svg: Path) -> Profile:
    total, frames = read_frames(svg)
    functions: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    callers: Counter[str] = Counter()
    socket: Counter[str] = Counter()
    for f in frames:
        if f.own:
            functions[f"{f.func} ({f.file})"] += f.own
            layer = layer_of(f)
            layers[layer] += f.own
            if layer.startswith("trio"):
                caller = trio_caller(f)
                callers[caller] += f.own
                socket[caller] += f.own if "socket" in layer else 0
    if sum(layers.values()) != total:
        print(f"  note: {name}: self samples add to {sum(layers.values())}, not {total}")
    return Profile(
        name, total, functions.most_common(), layers.most_common(),
        [(caller, n, socket[caller]) for caller, n in callers.most_common()],
    )  # fmt: skip


def print_profile(p: Profile, top: int) -> None:
    waiting = sum(n for name, n in p.layers if name.startswith("waiting"))
    work = max(p.samples - waiting, 1)
    print(f"\n{p.name}: {p.samples} samples, {waiting} of them waiting")
    print("  by layer (innermost frame's package): share of samples, share of the rest")
    for name, n in p.layers:
        rest = "" if name.startswith("waiting") else f"{n / work:6.1%}"
        print(f"    {n / p.samples:6.1%} {rest:>6}  {name}")
    print(f"  top {top} functions by self time:")
    for name, n in p.functions[:top]:
        print(f"    {n / p.samples:6.1%}  {name}")
    print("  samples inside trio, by the nearest caller outside it (of them: socket calls)")
    for name, n, sock in p.trio_callers[:6]:
        print(f"    {n / p.samples:6.1%} ({sock / p.samples:5.1%})  {name}")


# --- the run --------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="quorum-profile-"))
    configs = {
        "hop-serving": node_config("hop-serving", output_tokens=args.output_tokens),
        "hop-forwarding": node_config("hop-forwarding", output_tokens=None),
    }
    nodes = NodeCluster(write_nodes(tmp, configs, membership="static"))
    serving, entry = nodes.nodes["hop-serving"], nodes.nodes["hop-forwarding"]
    reports: dict[int, Report] = {}
    failures: list[str] = []
    try:
        await nodes.start_all()
        await nodes.wait_ready(30.0)
        await wait_forwarder_knows(entry.url, "hop-serving")
        assert serving.pid is not None and entry.pid is not None
        print(
            f"{os.cpu_count()} CPUs; entry node pid {entry.pid}, serving node pid "
            f"{serving.pid}; {args.output_tokens} output tokens; {args.seconds:.0f} s at "
            f"{args.rate} Hz per recording"
        )
        warm = BenchConfig(
            url=entry.url, model=MODEL, concurrency=64, requests=512, warmup=0,
            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
            duration_s=20.0, timeout_s=30.0, seed=args.seed,
        )  # fmt: skip
        await run_bench(warm)
        for c in CONCURRENCIES:
            spies = []
            for name, pid in (("entry", entry.pid), ("serving", serving.pid)):
                title = (
                    f"{name} node, c={c}, forwarded streams of {args.output_tokens} tokens: "
                    f"py-spy {args.seconds:.0f} s at {args.rate} Hz (benchmarks/profile_hop.py)"
                )
                spies.append(Spy(pid, out / f"{name}-c{c}.svg", tmp / f"{name}.log", title))
            pids = [entry.pid, serving.pid]
            await load_and_record(entry.url, c, args, pids, [], failures)
            reports[c] = await load_and_record(entry.url, c, args, pids, spies, failures)
            if failures:
                print("profile_hop: " + "; ".join(failures))
                return 1
    except NodeStartError as exc:
        print(f"profile_hop: nodes did not start: {exc}")
        return 1
    finally:
        await nodes.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r.failed == 0 for r in reports.values()) else 1


def report_all(out: Path, top: int) -> int:
    """Print the summary of every SVG in ``out``; 1 (said in one line) when one is missing."""
    for c in CONCURRENCIES:
        for name in ("entry", "serving"):
            svg = out / f"{name}-c{c}.svg"
            if not svg.is_file():
                print(f"profile_hop: no {svg}: run without --summarize first")
                return 1
            print_profile(summarize(f"{name} node, c={c}", svg), top)
            print(f"    ({svg}, {svg.stat().st_size / 1024:.0f} KiB)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--seconds", type=int, default=15, help="per recording")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10, help="functions listed per profile")
    parser.add_argument("--out", default=str(here / "profiles"), help="where the SVGs go")
    parser.add_argument("--summarize", action="store_true", help="only read existing SVGs")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 120 or not 1 <= args.rate <= 1000:
        parser.error("--seconds must be 1-120 and --rate 1-1000")
    out = Path(args.out)
    if args.summarize:
        return report_all(out, args.top)
    args.pyspy = shutil.which("py-spy")
    if args.pyspy is None:
        print("profile_hop: py-spy is not installed: python3 -m pip install py-spy")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    try:
        status = trio.run(run, args)
    except RuntimeError as exc:
        print(f"profile_hop: {exc}")
        return 1
    return report_all(out, args.top) if status == 0 else status


if __name__ == "__main__":
    sys.exit(main())
