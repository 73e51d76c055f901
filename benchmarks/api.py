"""HTTP API latency under load: /v1/status and /metrics of a real node next to a bare aiohttp handler.

Usage: python benchmarks/api.py [--requests 6000] [--concurrency 200] [--rounds 3]
                                [--wrk-seconds 5] [--out benchmarks/results/api.json]

Measured on loopback in one run, against processes this script starts and ends:
* ``bare``: an aiohttp hello-world handler (one route, no middleware) served by the same
  aiohttp version, event loop (uvloop) and listen backlog as a node — the floor for any
  aiohttp handler;
* ``/healthz``, ``/v1/status`` and ``/metrics`` of a real one-node ``galaxy up`` (Raft,
  gossip and the control loop running beside the HTTP server, as in production).

Two load generators, each keeping ``--concurrency`` requests in flight on as many
keep-alive connections (opened during a warm-up, so no handshake is timed):

* ``aiohttp``: a Python client (uvloop) with a semaphore of ``--concurrency`` workers,
  timing every request from send to the last body byte.  Targets take turns over
  ``--rounds`` rounds so that drift of the machine hits them alike.  On 2 cores this
  client saturates near the bare server's rate, so for cheap targets it measures the
  client as much as the server.  The target is judged on this one, as the issue asks.
* ``wrk`` (when installed: ``apt-get install wrk``), ``--wrk-seconds`` per target: a C
  client that saturates the *server*, so latency is queue length x service time and the
  ratio to bare is the ratio of per-request CPU cost.  Reported, not judged.

Target: p99 of /v1/status and /metrics within 3x of the bare handler's (aiohttp client).
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp  # noqa: E402

from galaxy.api.app import LISTEN_BACKLOG  # noqa: E402
from tests.cluster import Cluster, free_ports  # noqa: E402
from benchmarks.stats import exit_on_sigterm, pct  # noqa: E402

BARE_SERVER = r"""
import asyncio, sys
from aiohttp import web

async def hello(request):
    return web.Response(text="hello, world")

async def main(port, backlog):
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=backlog).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

try:
    import uvloop
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
except ImportError:
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""

BARE = "bare aiohttp hello"
JUDGED = ("/v1/status", "/metrics")
TARGET_RATIO_MAX = 3.0
REQUEST_TIMEOUT_S = 30


def summary(lat_s: list[float], wall_s: float, errors: int) -> dict:
    ms = [x * 1000 for x in lat_s]
    return {"n": len(ms), "errors": errors, "p50_ms": round(pct(ms, 50), 3), "p90_ms": round(pct(ms, 90), 3),
            "p99_ms": round(pct(ms, 99), 3), "max_ms": round(max(ms), 3) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
            "rps": round(len(ms) / wall_s, 1) if wall_s > 0 else None}


async def load(session: aiohttp.ClientSession, url: str, requests: int,
               concurrency: int) -> tuple[list[float], float, int]:
    """``requests`` GETs of ``url``, ``concurrency`` in flight; (latencies s, wall s, errors)."""
    lat: list[float] = []
    errors = 0
    left = requests

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if ok:
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, time.perf_counter() - t0, errors


async def aiohttp_runs(targets: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    samples: dict[str, list[float]] = {t: [] for t in targets}
    walls = {t: 0.0 for t in targets}
    errors = {t: 0 for t in targets}
    for r in range(args.rounds):
        for name, url in targets.items():
            connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
            timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                # warm-up on the same session: every connection is open before timing starts
                await load(session, url, max(args.warmup, args.concurrency), args.concurrency)
                lat, wall, err = await load(session, url, args.requests, args.concurrency)
            samples[name] += lat
            walls[name] += wall
            errors[name] += err
            print(f"  aiohttp round {r + 1}/{args.rounds} {name}: p99 {pct(lat, 99) * 1000:.2f} ms", flush=True)
    return {name: summary(samples[name], walls[name], errors[name]) for name in targets}


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def wrk_run(wrk: str, url: str, concurrency: int, seconds: int) -> dict:
    out = subprocess.run([wrk, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout",
                          f"{REQUEST_TIMEOUT_S}s", url], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    dist = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, re.M))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not dist or not rps:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return {"p50_ms": _ms(dist["50"]), "p90_ms": _ms(dist["90"]), "p99_ms": _ms(dist["99"]),
            "rps": float(rps.group(1)),
            "errors": (int(errors.group(1)) if errors else 0) + (sum(map(int, sock.groups())) if sock else 0)}


def wrk_runs(wrk: str, targets: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    out = {}
    for name, url in targets.items():
        wrk_run(wrk, url, args.concurrency, 1)                 # warm-up
        out[name] = wrk_run(wrk, url, args.concurrency, args.wrk_seconds)
        print(f"  wrk {name}: p99 {out[name]['p99_ms']:.2f} ms", flush=True)
    return out


def add_ratios(results: dict[str, dict]) -> None:
    bare_p99 = results[BARE]["p99_ms"]
    for r in results.values():
        r["p99_vs_bare"] = round(r["p99_ms"] / bare_p99, 2) if bare_p99 else None


def print_table(title: str, results: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'target':<20} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8} {'p99/bare':>9} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:<20} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['rps']:>8.0f} "
              f"{r['p99_vs_bare']:>9.2f} {r['errors']:>7}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6000, help="timed requests per target per round")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1000, help="untimed requests per target per round")
    ap.add_argument("--wrk-seconds", type=int, default=5, help="per target; 0 skips wrk")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "api.json"))
    args = ap.parse_args()

    bare_port = free_ports(1)[0]
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port), str(LISTEN_BACKLOG)],
                            stdout=subprocess.PIPE, start_new_session=True)
    wrk = shutil.which("wrk") if args.wrk_seconds > 0 else None
    try:
        with Cluster() as cluster:
            node = cluster.add("a")
            cluster.start("a")
            cluster.wait(lambda: (node.try_get("/readyz") or {}).get("ready"), 30, "the node to be ready")
            assert bare.stdout is not None and bare.stdout.readline().strip() == b"ready"
            targets = {BARE: f"http://127.0.0.1:{bare_port}/",
                       "/healthz": node.url + "/healthz",
                       "/v1/status": node.url + "/v1/status",
                       "/metrics": node.url + "/metrics"}
            sizes = {}
            for path in ("/v1/status", "/metrics"):
                with urllib.request.urlopen(node.url + path, timeout=5) as r:
                    sizes[path] = len(r.read())
            try:
                import uvloop
                results = uvloop.run(aiohttp_runs(targets, args))
            except ImportError:
                results = asyncio.run(aiohttp_runs(targets, args))
            wrk_results = wrk_runs(wrk, targets, args) if wrk else None
    finally:
        os.killpg(bare.pid, signal.SIGKILL)
        bare.wait(timeout=10)

    add_ratios(results)
    ok = all(results[t]["p99_vs_bare"] is not None and results[t]["p99_vs_bare"] <= TARGET_RATIO_MAX
             for t in JUDGED)
    print_table(f"aiohttp client: {args.concurrency} concurrent, {args.rounds} x {args.requests} requests per "
                f"target (loopback, {os.cpu_count()} cores)", results)
    if wrk_results:
        add_ratios(wrk_results)
        print_table(f"wrk (server-bound): {args.concurrency} connections, {args.wrk_seconds} s per target",
                    wrk_results)
    print(f"\nbody bytes: /v1/status {sizes['/v1/status']}, /metrics {sizes['/metrics']}")
    print(f"target: /v1/status and /metrics p99 within {TARGET_RATIO_MAX:g}x of bare (aiohttp client) -> "
          f"{'met' if ok else 'NOT met'}")

    doc = {"benchmark": "api", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "aiohttp": aiohttp.__version__},
           "params": {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
                      "warmup": args.warmup, "wrk_seconds": args.wrk_seconds if wrk else 0},
           "body_bytes": sizes,
           "target": {"p99_vs_bare_max": TARGET_RATIO_MAX, "judged_on": "aiohttp", "met": ok},
           "aiohttp": results, "wrk": wrk_results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
