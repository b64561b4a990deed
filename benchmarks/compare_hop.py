"""The cost of a forwarding hop, measured against a direct request and against nginx.

    python benchmarks/compare_hop.py            # full run, concurrency 1, 64, 256 (~3-4 min)
    python benchmarks/compare_hop.py --quick    # fewer requests (under a minute)

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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from quorum.bench import BenchConfig, Report, run_bench
from quorum.launch import (
    NodeCluster,
    NodeStartError,
    ServerProcess,
    free_port,
    peak_rss_kb,
    write_nodes,
)

MODEL = "mock-zero"
console = Console(highlight=False, width=max(132, shutil.get_terminal_size().columns))

# (concurrency, measured requests, warm-up requests)
FULL = ((1, 400, 20), (64, 1600, 128), (256, 2048, 512))
QUICK = ((1, 60, 5), (64, 400, 64), (256, 768, 256))
TARGET_ADDED_TTFT_MS = 0.5  # DESIGN.md: forwarding hop, added TTFT at concurrency 1
TARGET_THROUGHPUT = 0.8  # DESIGN.md: forward vs direct at concurrency 64


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


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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
    rss: dict[str, int | None] = {}
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
        console.print(
            f"mock backend: ttft_ms=0 itl_ms=0, {args.output_tokens} output tokens, "
            f"{args.prompt_tokens} prompt tokens; {os.cpu_count()} CPUs; nodes: serving "
            f"pid {serving.pid}, forwarding pid {forwarding.pid}"
            + (f", nginx pid {nginx_pids(nginx)}" if nginx else "")
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
                report = await run_bench(config)
                results[concurrency, name] = report
                console.print(
                    f"  c={concurrency:<4} {name:<8} {report.completed} ok, "
                    f"{report.failed} failed, {report.req_per_s:8.1f} req/s "
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
    print_results(results, list(paths), rss, plan, time.monotonic() - began)
    if args.json:
        Path(args.json).write_text(  # noqa: ASYNC240 - once, after the measurements
            json.dumps(
                {f"{c}/{name}": r.as_json() for (c, name), r in results.items()} | {"rss_kb": rss},
                indent=2,
            )
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r.failed == 0 for r in results.values()) else 1


def print_results(
    results: dict[tuple[int, str], Report],
    names: list[str],
    rss: dict[str, int | None],
    plan: tuple[tuple[int, int, int], ...],
    elapsed: float,
) -> None:
    table = Table(title="forwarding hop vs direct vs nginx (zero-latency mock, 127.0.0.1)")
    for col in (
        "conc",
        "path",
        "ok",
        "failed",
        "TTFT p50 ms",
        "E2E p50 ms",
        "req/s",
        "tokens/s",
        "req/s ÷ direct",
        "+TTFT p50 ms",
        "+E2E p50 ms",
    ):
        table.add_column(col, justify="left" if col == "path" else "right")
    for concurrency, _, _ in plan:
        base = results[concurrency, "direct"]
        for name in names:
            r = results[concurrency, name]
            ttft = r.ttft_ms.p50 if r.ttft_ms else None
            e2e = r.e2e_ms.p50 if r.e2e_ms else None
            base_ttft = base.ttft_ms.p50 if base.ttft_ms else None
            base_e2e = base.e2e_ms.p50 if base.e2e_ms else None
            ratio = r.req_per_s / base.req_per_s if base.req_per_s else 0.0
            added = (
                ""
                if name == "direct" or ttft is None or base_ttft is None
                else f"{ttft - base_ttft:+.2f}"
            )
            added_e2e = (
                ""
                if name == "direct" or e2e is None or base_e2e is None
                else f"{e2e - base_e2e:+.2f}"
            )
            table.add_row(
                str(concurrency),
                name,
                str(r.completed),
                str(r.failed),
                ms(ttft),
                ms(e2e),
                f"{r.req_per_s:.1f}",
                f"{r.output_tok_per_s:.0f}",
                "" if name == "direct" else f"{ratio:.2f}",
                added,
                added_e2e,
                end_section=name == names[-1],
            )
    console.print(table)
    mem = Table(title="peak RSS (VmHWM)")
    mem.add_column("process")
    mem.add_column("MiB", justify="right")
    for name, kb in rss.items():
        mem.add_row(name, "-" if kb is None else f"{kb / 1024:.1f}")
    console.print(mem)
    c1 = [c for c, _, _ in plan if c == 1]
    c64 = [c for c, _, _ in plan if c == 64]
    if c1:
        d, f = results[1, "direct"], results[1, "forward"]
        if d.ttft_ms and f.ttft_ms:
            added = f.ttft_ms.p50 - d.ttft_ms.p50
            ok = "[green]met" if added <= TARGET_ADDED_TTFT_MS else "[red]missed"
            console.print(
                f"target: forwarding hop adds ≤ {TARGET_ADDED_TTFT_MS} ms median TTFT "
                f"at concurrency 1: {added:.2f} ms, {ok}"
            )
    if c64:
        ratio = results[64, "forward"].req_per_s / max(results[64, "direct"].req_per_s, 1e-9)
        ok = "[green]met" if ratio >= TARGET_THROUGHPUT else "[red]missed"
        console.print(
            f"target: throughput through a forwarding node ≥ {TARGET_THROUGHPUT}x "
            f"direct at concurrency 64: {ratio:.2f}x, {ok}"
        )
    console.print(f"whole run {elapsed:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write every report as JSON")
    args = parser.parse_args()
    try:
        return trio.run(run, args)
    except RuntimeError as exc:
        console.print(f"[red]compare_hop: {exc}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
