"""The cost of a forwarding hop, measured against a direct request and against nginx.

    python benchmarks/compare_hop.py            # full run, concurrency 1, 64, 256 (~1 min)
    python benchmarks/compare_hop.py --quick    # fewer requests (~20 s)

One zero-latency mock backend (``ttft_ms = 0``, ``itl_ms = 0``, a fixed output length, 4096
slots) on a serving node; the same streamed requests reach it three ways:

- **direct**: to the serving node;
- **forward**: to a second Quorum node that serves no model and has the first as its peer, so
  it forwards and relays the bytes;
- **nginx**: through nginx as a plain reverse proxy (one worker, ``proxy_buffering off``,
  HTTP/1.1 keepalive upstream). Installed with ``apt-get install -y nginx`` when missing and
  running as root; skipped, and said so, when it cannot be.

Every process is started with ``quorum.launch`` on a free 127.0.0.1 port from temporary
configs and ended by its own pid. The load generator is ``quorum.bench.run_bench`` in this
process: on a small machine it shares the CPU with the nodes, which the figures include.
Paths are interleaved at each concurrency so that drift affects them alike.

What it prints, besides each path's TTFT, E2E and req/s at each concurrency:

- the TTFT a forward and nginx add at concurrency 1, at p50 and at p99 (the path's
  percentile minus direct's, same run, in ms);
- req/s ÷ direct's req/s, for forward and for nginx, at concurrency 64 and 256;
- CPU seconds per 1,000 requests (= CPU ms per request) of each process that carried a
  phase: user + system time (``utime + stime`` of ``/proc/<pid>/stat``, every thread) read
  before and after the phase, divided by the requests sent in it (warm-up included, since it
  ran inside that window): the forwarding node for what it relayed, the serving node on every
  path, nginx (master and workers) for what it proxied, and this process (the load generator);
  the clock tick is ``1/CLK_TCK`` s (10 ms at the usual 100), so a short phase's figure is coarse;
- peak RSS (VmHWM) of every process;
- the same added TTFT at concurrency 1 through a second client that costs next to nothing
  (``raw_ttft_ms``: blocking keep-alive sockets in a worker thread, the paths taking turns
  in blocks of 50 requests, first byte of the first content delta): ``quorum.bench`` parses
  every event with httpx and SSE in Python, and on a small machine that client's own CPU
  competes with the processes it measures, more so when two Python nodes are busy (a
  forward) than when nginx is;
- issue #13's targets, each met or missed: a forward adds ≤ 0.5 ms median TTFT at
  concurrency 1, or at most nginx's added median TTFT + 0.3 ms in the same run (judged for
  each client); forward req/s ÷ direct ≥ 0.9 at concurrency 64 and at 256.

``--json PATH`` writes every report (``"<concurrency>/<path>"``), ``"rss_kb"``, and those
figures under ``"summary"`` (see ``summarize``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quorum.bench import BenchConfig, Report, request_body, run_bench
from quorum.launch import (
    NodeCluster,
    NodeStartError,
    ServerProcess,
    free_port,
    peak_rss_kb,
    write_nodes,
)
from quorum.stats import percentile

MODEL = "mock-zero"
console = Console(highlight=False, width=max(132, shutil.get_terminal_size().columns))

# (concurrency, measured requests, warm-up requests); c=1 has enough requests for its p99 to
# lie between the 10th and 11th largest (full) or the 2nd and 3rd (quick)
FULL = ((1, 1000, 20), (64, 1600, 128), (256, 2048, 512))
QUICK = ((1, 200, 5), (64, 400, 64), (256, 768, 256))
# issue #13's targets
TARGET_ADDED_TTFT_MS = 0.5  # a forward's added median TTFT at concurrency 1, in ms ...
TARGET_OVER_NGINX_MS = 0.3  # ... or at most nginx's added median TTFT + this, same run
TARGET_THROUGHPUT = 0.9  # forward req/s ÷ direct req/s, at concurrency 64 and at 256
THROUGHPUT_AT = (64, 256)
RAW_WARMUP = 50  # requests per path before the raw client's figures count
RAW_BLOCK = 50  # the raw client's requests to one path back to back
CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat counts CPU time in these ticks per s


def node_config(name: str, *, output_tokens: int | None) -> dict[str, Any]:
    """A node serving the zero-latency mock (``output_tokens`` given) or nothing (a pure
    forwarder); addresses and peers are ``NodeCluster``'s."""
    config: dict[str, Any] = {"node": {"name": name}}
    if output_tokens is not None:
        config["backends"] = [
            {
                "model": MODEL, "kind": "mock", "ttft_ms": 0, "itl_ms": 0, "slots": 4096,
                "queue": 4096, "output_tokens": [output_tokens, output_tokens],
            }
        ]  # fmt: skip
    return config


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream quorum {{
        server 127.0.0.1:{upstream};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://quorum;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def find_nginx() -> tuple[str | None, str]:
    """nginx's path, installing Debian's package when missing; else None and why."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "nginx is not installed and this is not a root Debian shell"
    console.print("nginx is missing: apt-get install -y nginx")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "nginx"]):
        try:
            subprocess.run(cmd, env=env, check=True, timeout=300, capture_output=True)
        except (subprocess.SubprocessError, OSError) as exc:
            return None, f"apt-get could not install nginx: {exc}"
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    return (path, "") if os.access(path, os.X_OK) else (None, "nginx did not install")


def nginx_process(binary: str, tmp: Path, port: int, upstream: int) -> ServerProcess:
    """nginx on 127.0.0.1:``port`` in front of 127.0.0.1:``upstream``, its files under
    ``tmp``; ready when ``/health`` (the node's, through it) answers."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, upstream=upstream))
    argv = [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")]
    return ServerProcess("nginx", f"http://127.0.0.1:{port}", argv, log_path=tmp / "nginx.log")


def nginx_pids(nginx: ServerProcess) -> list[int]:
    """The master and its workers."""
    pid = nginx.pid
    if pid is None:
        return []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def cpu_s(pids: list[int]) -> float | None:
    """User + system CPU seconds used so far by ``pids`` together (each with all its threads;
    ``utime`` and ``stime``, fields 14 and 15 of ``/proc/<pid>/stat``, in ``CLK_TCK`` ticks);
    None when any of them is gone or there are none."""
    total = 0
    for pid in pids:
        try:
            # the command name, field 2, is in parentheses and may hold spaces
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            return None
    return total / CLK_TCK if pids else None


async def wait_forwarder_knows(url: str, serving: str, timeout_s: float = 15.0) -> None:
    """Until the forwarding node lists ``MODEL`` on ``serving`` (its peer poll ran)."""
    async with httpx.AsyncClient(timeout=2.0) as client:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    data = (await client.get(url + "/v1/models")).json()["data"]
                    if any(m["id"] == MODEL and serving in m["quorum_nodes"] for m in data):
                        return
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                await trio.sleep(0.1)


# a content delta that is not empty: the role chunk's "content": "" is not a token
_CONTENT = re.compile(rb'"content": ?"(?!")')


def raw_request(url: str, body: bytes) -> bytes:
    """A streamed chat request to ``url``'s node as HTTP/1.1 bytes, keep-alive."""
    host = url.split("//", 1)[1]
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % (host.encode(), len(body))
    ) + body


def raw_first_content_s(sock: socket.socket, request: bytes) -> tuple[float, bool]:
    """Send ``request`` on ``sock`` and read its chunked answer to the end; seconds from the
    send to the first read that holds a non-empty content delta, and whether the
    connection stays open (no ``connection: close``: hypercorn closes one after
    ``keep_alive_max_requests``). Raises ``RuntimeError`` for an answer that is not a 200
    with content, ``OSError`` (a timeout too) for the connection."""
    sent = time.perf_counter()
    sock.sendall(request)
    first: float | None = None
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        more = sock.recv(65536)
        if not more:
            raise RuntimeError("the node closed the connection mid-answer")
        if first is None and _CONTENT.search(data[-16:] + more):
            first = time.perf_counter() - sent
        data += more
    if not data.startswith(b"HTTP/1.1 200") or first is None:
        raise RuntimeError(f"not a streamed answer with content: {data[:120]!r}")
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return first, b"\r\nconnection: close" not in head


def raw_ttft_ms(
    urls: dict[str, str],
    bodies: list[bytes],
    warmup: int,
    *,
    block: int = RAW_BLOCK,
    timeout_s: float = 10.0,
) -> dict[str, list[float]]:
    """Concurrency 1 through the leanest client at hand: one blocking keep-alive socket per
    path (``TCP_NODELAY``). The bodies go in blocks of ``block``, each block to every path
    back to back (as ``quorum.bench`` sends a phase), the path that goes first rotating
    from block to block; per path, the TTFT in ms of each body after the first ``warmup``
    (``raw_first_content_s``). Blocking: run it in a worker thread. Every read and write
    has ``timeout_s``.

    Why blocks: sent to the paths in turn request by request, each path's processes idle
    while the others answer, and a forward, which wakes two Python processes, pays several
    times what nginx pays for waking up (benchmarks/README.md)."""
    names = list(urls)
    socks: dict[str, socket.socket] = {}
    ttft: dict[str, list[float]] = {name: [] for name in names}

    def connect(url: str) -> socket.socket:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    try:
        for name, url in urls.items():
            socks[name] = connect(url)
        for start in range(0, len(bodies), block):
            turn = (start // block) % len(names)
            for name in names[turn:] + names[:turn]:
                for i in range(start, min(start + block, len(bodies))):
                    request = raw_request(urls[name], bodies[i])
                    seconds, keep = raw_first_content_s(socks[name], request)
                    if not keep:
                        socks[name].close()
                        socks[name] = connect(urls[name])
                    if i >= warmup:
                        ttft[name].append(seconds * 1000)
    finally:
        for sock in socks.values():
            sock.close()
    return ttft


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# The processes that carry a path's requests (the load generator carries every path); a
# process's CPU per 1,000 requests is given for these only.
CARRIERS = {
    "direct": ("serving node",),
    "forward": ("forwarding node", "serving node"),
    "nginx": ("nginx", "serving node"),
}
LOAD_GENERATOR = "load generator"


async def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="quorum-hop-"))
    os.chmod(tmp, 0o755)
    configs = {
        "hop-serving": node_config("hop-serving", output_tokens=args.output_tokens),
        "hop-forwarding": node_config("hop-forwarding", output_tokens=None),
    }
    nodes = NodeCluster(write_nodes(tmp, configs, membership="static"))
    serving, forwarding = nodes.nodes["hop-serving"], nodes.nodes["hop-forwarding"]
    nginx: ServerProcess | None = None
    nginx_bin, why = find_nginx()
    paths = {"direct": serving.url, "forward": forwarding.url}
    results: dict[tuple[int, str], Report] = {}
    cpu: dict[tuple[int, str], dict[str, float | None]] = {}
    sent: dict[tuple[int, str], int] = {}
    rss: dict[str, int | None] = {}
    raw: dict[str, list[float]] = {}
    began = time.monotonic()
    try:
        await nodes.start_all()
        await nodes.wait_ready(30.0)
        await wait_forwarder_knows(forwarding.url, "hop-serving")
        if nginx_bin is not None:
            upstream = int(serving.url.rsplit(":", 1)[1])
            nginx = nginx_process(nginx_bin, tmp / "nginx", free_port(), upstream)
            try:
                await nginx.start()
                await nginx.wait_ready(10.0)
                paths["nginx"] = nginx.url
            except (NodeStartError, OSError) as exc:
                log = tmp / "nginx" / "nginx-error.log"
                why = f"nginx did not start: {exc}; " + (
                    log.read_text()[-500:] if log.exists() else "no error log"
                )
                await nginx.stop()
                nginx = None
        if "nginx" not in paths:
            console.print(f"[yellow]nginx column skipped: {why}")
        # whose CPU time is read around each phase: pids known now (nginx's workers too)
        pids = {
            "serving node": [serving.pid] if serving.pid else [],
            "forwarding node": [forwarding.pid] if forwarding.pid else [],
            LOAD_GENERATOR: [os.getpid()],
        }
        if nginx is not None:
            pids["nginx"] = nginx_pids(nginx)
        console.print(
            f"mock backend: ttft_ms=0 itl_ms=0, {args.output_tokens} output tokens, "
            f"{args.prompt_tokens} prompt tokens; {os.cpu_count()} CPUs; nodes: serving "
            f"pid {serving.pid}, forwarding pid {forwarding.pid}"
            + (f", nginx pid {pids['nginx']}" if nginx else "")
            + f"; load generator pid {os.getpid()}"
        )
        for concurrency, count, warmup in plan:
            for name, url in paths.items():
                config = BenchConfig(
                    url=url,
                    model=MODEL,
                    concurrency=concurrency,
                    requests=count,
                    warmup=warmup,
                    prompt_tokens=args.prompt_tokens,
                    output_tokens=args.output_tokens,
                    duration_s=120.0,
                    timeout_s=60.0,
                    seed=args.seed,
                )
                t = time.monotonic()
                before = {proc: cpu_s(p) for proc, p in pids.items()}
                report = await run_bench(config)
                after = {proc: cpu_s(p) for proc, p in pids.items()}
                results[concurrency, name] = report
                cpu[concurrency, name] = {
                    proc: None if (b := before[proc]) is None or (a := after[proc]) is None
                    else a - b
                    for proc in pids
                }  # fmt: skip
                # the warm-up ran inside the same CPU window, so it counts as sent
                sent[concurrency, name] = warmup + report.completed + report.failed
                console.print(
                    f"  c={concurrency:<4} {name:<8} {report.completed} ok, "
                    f"{report.failed} failed, {report.req_per_s:8.1f} req/s "
                    f"({time.monotonic() - t:.1f} s)"
                )
        # concurrency 1 again, through the lean client (module docstring)
        body_config = BenchConfig(
            url=serving.url,
            model=MODEL,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            seed=args.seed,
        )
        count = plan[0][1]
        bodies = [request_body(body_config, 1_000_000 + i) for i in range(RAW_WARMUP + count)]
        t = time.monotonic()
        raw = await trio.to_thread.run_sync(raw_ttft_ms, paths, bodies, RAW_WARMUP)
        console.print(
            f"  c=1    raw client, {count} requests per path (+{RAW_WARMUP} warm-up) "
            f"({time.monotonic() - t:.1f} s)"
        )
        rss = {
            "serving node": serving.peak_rss_kb(),
            "forwarding node": forwarding.peak_rss_kb(),
        }
        if nginx is not None:
            for i, pid in enumerate(nginx_pids(nginx)):
                rss["nginx master" if i == 0 else f"nginx worker {i}"] = peak_rss_kb(pid)
    finally:
        if nginx is not None:
            await nginx.stop()
        await nodes.close()
    names = list(paths)
    summary = summarize(results, names, plan, cpu, sent, rss, raw)
    print_results(results, names, plan, summary, time.monotonic() - began)
    if args.json:
        Path(args.json).write_text(  # noqa: ASYNC240 - once, after the measurements
            json.dumps(
                {f"{c}/{name}": r.as_json() for (c, name), r in results.items()}
                | {"rss_kb": rss, "summary": summary},
                indent=2,
            )
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r.failed == 0 for r in results.values()) else 1


def summarize(
    results: dict[tuple[int, str], Report],
    names: list[str],
    plan: tuple[tuple[int, int, int], ...],
    cpu: dict[tuple[int, str], dict[str, float | None]],
    sent: dict[tuple[int, str], int],
    rss: dict[str, int | None],
    raw: dict[str, list[float]],
) -> dict[str, Any]:
    """The run's headline figures, as written under ``"summary"`` by ``--json``; phases are
    keyed ``"<concurrency>/<path>"``, missing figures are None.

    - ``added_ttft_ms``: per concurrency and path other than direct, ``{"p50", "p99"}``: that
      percentile of the path's TTFT minus the same percentile of direct's, in ms.
    - ``raw_ttft_ms`` and ``raw_added_ttft_ms``: the same at concurrency 1 through the lean
      client (``raw``: TTFTs in ms per path, from ``raw_ttft_ms``), TTFT per path and added
      per path other than direct.
    - ``req_per_s_vs_direct``: per concurrency and path, its req/s ÷ direct's req/s.
    - ``cpu_s``: per phase and process, user + system CPU seconds over the phase (warm-up
      included); ``requests``: per phase, the requests sent in it (warm-up included).
    - ``cpu_s_per_1000_requests``: per phase, 1000 * ``cpu_s`` ÷ ``requests`` for the
      processes that carried that path's requests (``CARRIERS``) and the load generator.
    - ``peak_rss_kb``: per process, VmHWM in KiB.
    - ``targets``: issue #13's, each ``{"target", "measured", "met"}`` (``met`` None when
      not measured in this run)."""
    added: dict[str, dict[str, dict[str, float | None]]] = {}
    ratios: dict[str, dict[str, float | None]] = {}
    for concurrency, _, _ in plan:
        base = results[concurrency, "direct"]
        added[str(concurrency)] = {}
        ratios[str(concurrency)] = {}
        for name in names:
            r = results[concurrency, name]
            ratios[str(concurrency)][name] = (
                r.req_per_s / base.req_per_s if base.req_per_s else None
            )
            if name == "direct":
                continue
            mine, theirs = r.ttft_ms, base.ttft_ms
            added[str(concurrency)][name] = (
                {"p50": mine.p50 - theirs.p50, "p99": mine.p99 - theirs.p99}
                if mine is not None and theirs is not None
                else {"p50": None, "p99": None}
            )
    per_1000: dict[str, dict[str, float | None]] = {}
    for (concurrency, name), used in cpu.items():
        n = sent[concurrency, name]
        per_1000[f"{concurrency}/{name}"] = {
            proc: None if s is None or n == 0 else s / n * 1000
            for proc, s in used.items()
            if proc in CARRIERS[name] or proc == LOAD_GENERATOR
        }
    raw_ttft = {
        name: {"p50": percentile(v, 50), "p99": percentile(v, 99)} if v else None
        for name, v in raw.items()
    }
    raw_added: dict[str, dict[str, float | None]] = {}
    base_raw = raw_ttft.get("direct")
    for name in names[1:]:
        mine_raw = raw_ttft.get(name)
        raw_added[name] = {
            q: None if mine_raw is None or base_raw is None else mine_raw[q] - base_raw[q]
            for q in ("p50", "p99")
        }
    targets = [
        ttft_target(added.get("1", {}), "quorum.bench's client"),
        ttft_target(raw_added, "the lean client"),
    ]
    for concurrency in THROUGHPUT_AT:
        ratio = ratios.get(str(concurrency), {}).get("forward")
        targets.append(
            {
                "target": f"forward req/s ÷ direct req/s ≥ {TARGET_THROUGHPUT} at concurrency "
                f"{concurrency}",
                "measured": "not measured" if ratio is None else f"{ratio:.2f}",
                "met": None if ratio is None else ratio >= TARGET_THROUGHPUT,
            }
        )
    return {
        "added_ttft_ms": added,
        "raw_ttft_ms": raw_ttft,
        "raw_added_ttft_ms": raw_added,
        "req_per_s_vs_direct": ratios,
        "cpu_s": {f"{c}/{name}": used for (c, name), used in cpu.items()},
        "requests": {f"{c}/{name}": n for (c, name), n in sent.items()},
        "cpu_s_per_1000_requests": per_1000,
        "peak_rss_kb": rss,
        "targets": targets,
    }


def ttft_target(added: dict[str, dict[str, float | None]], client: str) -> dict[str, Any]:
    """Issue #13's TTFT target, judged on ``added`` (added TTFT per path at concurrency 1,
    ``{"p50", "p99"}`` in ms) as measured through ``client``."""
    fwd = (added.get("forward") or {}).get("p50")
    ngx = (added.get("nginx") or {}).get("p50")
    if fwd is None:
        measured, met = "not measured", None
    else:
        limit = TARGET_ADDED_TTFT_MS
        if ngx is not None:
            limit = max(limit, ngx + TARGET_OVER_NGINX_MS)
        measured = f"{fwd:+.2f} ms" + (
            "; no nginx in this run"
            if ngx is None
            else f"; nginx {ngx:+.2f} ms, so ≤ {limit:.2f} ms in this run"
        )
        met = fwd <= limit
    return {
        "target": f"a forward adds ≤ {TARGET_ADDED_TTFT_MS} ms median TTFT at concurrency 1, "
        f"or ≤ nginx's added median TTFT + {TARGET_OVER_NGINX_MS} ms in the same run "
        f"({client})",
        "measured": measured,
        "met": met,
    }


def print_results(
    results: dict[tuple[int, str], Report],
    names: list[str],
    plan: tuple[tuple[int, int, int], ...],
    summary: dict[str, Any],
    elapsed: float,
) -> None:
    table = Table(title="forwarding hop vs direct vs nginx (zero-latency mock, 127.0.0.1)")
    for col in (
        "conc",
        "path",
        "ok",
        "failed",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "E2E p50 ms",
        "req/s",
        "tokens/s",
        "req/s ÷ direct",
        "+TTFT p50 ms",
        "+TTFT p99 ms",
        "+E2E p50 ms",
    ):
        table.add_column(col, justify="left" if col == "path" else "right")
    for concurrency, _, _ in plan:
        base = results[concurrency, "direct"]
        added = summary["added_ttft_ms"][str(concurrency)]
        for name in names:
            r = results[concurrency, name]
            e2e = r.e2e_ms.p50 if r.e2e_ms else None
            base_e2e = base.e2e_ms.p50 if base.e2e_ms else None
            ratio = summary["req_per_s_vs_direct"][str(concurrency)][name]
            plus = added.get(name, {})
            table.add_row(
                str(concurrency),
                name,
                str(r.completed),
                str(r.failed),
                ms(r.ttft_ms.p50 if r.ttft_ms else None),
                ms(r.ttft_ms.p99 if r.ttft_ms else None),
                ms(e2e),
                f"{r.req_per_s:.1f}",
                f"{r.output_tok_per_s:.0f}",
                "" if name == "direct" else ms(ratio),
                "" if name == "direct" else signed(plus.get("p50")),
                "" if name == "direct" else signed(plus.get("p99")),
                ""
                if name == "direct" or e2e is None or base_e2e is None
                else f"{e2e - base_e2e:+.2f}",
                end_section=name == names[-1],
            )
    console.print(table)
    lean = Table(
        title="concurrency 1 through the lean client (blocking sockets, paths in turn in blocks)"
    )
    for col in ("path", "TTFT p50 ms", "TTFT p99 ms", "+TTFT p50 ms", "+TTFT p99 ms"):
        lean.add_column(col, justify="left" if col == "path" else "right")
    for name in names:
        ttft = summary["raw_ttft_ms"].get(name) or {}
        plus = summary["raw_added_ttft_ms"].get(name, {})
        lean.add_row(
            name,
            ms(ttft.get("p50")),
            ms(ttft.get("p99")),
            "" if name == "direct" else signed(plus.get("p50")),
            "" if name == "direct" else signed(plus.get("p99")),
        )
    console.print(lean)
    procs = ["forwarding node", "serving node", *(["nginx"] if "nginx" in names else [])]
    load = Table(
        title="CPU seconds per 1,000 requests (user + system, /proc/<pid>/stat, warm-up "
        "included), by the processes that carried them"
    )
    for col in ("conc", "path", "requests", *procs, LOAD_GENERATOR):
        load.add_column(col, justify="left" if col == "path" else "right")
    for concurrency, _, _ in plan:
        for name in names:
            key = f"{concurrency}/{name}"
            used = summary["cpu_s_per_1000_requests"][key]
            load.add_row(
                str(concurrency),
                name,
                str(summary["requests"][key]),
                *(ms(used[p]) if p in used else "" for p in (*procs, LOAD_GENERATOR)),
                end_section=name == names[-1],
            )
    console.print(load)
    rss: dict[str, int | None] = summary["peak_rss_kb"]
    mem = Table(title="peak RSS (VmHWM)")
    mem.add_column("process")
    mem.add_column("MiB", justify="right")
    for name, kb in rss.items():
        mem.add_row(name, "-" if kb is None else f"{kb / 1024:.1f}")
    console.print(mem)
    hop = Table(title="the hop in one table: forward and nginx, each against direct, same run")
    hop.add_column("figure")
    for name in names[1:]:
        hop.add_column(name, justify="right")
    c1 = summary["added_ttft_ms"].get("1", {})
    for q in ("p50", "p99"):
        hop.add_row(
            f"added TTFT {q} at concurrency 1 (ms)",
            *(signed((c1.get(n) or {}).get(q)) for n in names[1:]),
        )
    raw_added = summary["raw_added_ttft_ms"]
    for q in ("p50", "p99"):
        hop.add_row(
            f"added TTFT {q} at concurrency 1, lean client (ms)",
            *(signed((raw_added.get(n) or {}).get(q)) for n in names[1:]),
        )
    for concurrency in THROUGHPUT_AT:
        ratios = summary["req_per_s_vs_direct"].get(str(concurrency), {})
        hop.add_row(
            f"req/s ÷ direct at concurrency {concurrency}", *(ms(ratios.get(n)) for n in names[1:])
        )
    proxy = {"forward": "forwarding node", "nginx": "nginx"}
    for concurrency, _, _ in plan:
        hop.add_row(
            f"CPU s per 1,000 requests relayed at concurrency {concurrency}",
            *(
                ms(summary["cpu_s_per_1000_requests"][f"{concurrency}/{n}"].get(proxy[n]))
                for n in names[1:]
            ),
        )
    nginx_kb = [kb for name, kb in rss.items() if name.startswith("nginx")]
    peak_kb = {
        "forward": rss.get("forwarding node"),
        "nginx": sum(kb for kb in nginx_kb if kb is not None)
        if nginx_kb and None not in nginx_kb
        else None,
    }
    hop.add_row(
        "peak RSS of the proxy (MiB; nginx: master + workers)",
        *("-" if (kb := peak_kb[n]) is None else f"{kb / 1024:.1f}" for n in names[1:]),
    )
    console.print(hop)
    for target in summary["targets"]:
        met = target["met"]
        verdict = "[yellow]not measured" if met is None else "[green]met" if met else "[red]missed"
        console.print(f"target: {target['target']}: {target['measured']}, {verdict}")
    console.print(f"whole run {elapsed:.0f} s")


def signed(value: float | None) -> str:
    """A difference in ms with its sign; "-" when unknown."""
    return "-" if value is None else f"{value:+.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json",
        metavar="PATH",
        help='also write every report, and the figures above under "summary", as JSON',
    )
    args = parser.parse_args()
    try:
        return trio.run(run, args)
    except RuntimeError as exc:
        console.print(f"[red]compare_hop: {exc}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
