"""Coordinator failover, rejoin disruption, steady-state stability and join time.

Usage: python benchmarks/failover.py [--trials 20] [--steady-s 300] [--joins 5] [--out benchmarks/results/failover.json]

Measured on loopback with real processes, in the same run:
* galaxy (tuned LAN profile: Raft 300-600 ms election timeout, 50 ms heartbeat):
  kill -9 the coordinator -> every survivor's /v1/leader names the same new one.
* baseline: a bare pysyncobj 3-node group with default timeouts (0.4-1.4 s, 100 ms),
  each node serving its leader over HTTP, measured the same way.
* leader changes caused by restarting the killed node (must be 0: pre-vote).
* leader changes in a fault-free run of --steady-s seconds (must be 0).
* time from `galaxy up` to /readyz for a node joining a running mesh.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.cluster import Cluster, free_ports, http_json  # noqa: E402
from benchmarks.stats import exit_on_sigterm, pct, write_json  # noqa: E402

RAW_NODE = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pysyncobj import SyncObj, SyncObjConf
me, others, http_port = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
obj = SyncObj(me, others, SyncObjConf(password="bench-secret"))
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        leader = obj._getLeader()
        body = json.dumps({"leader": leader.address if leader else None, "term": obj.raftCurrentTerm}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", http_port), H).serve_forever()
"""


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99),
            "max": max(xs) if xs else float("nan"), "mean": statistics.fmean(xs) if xs else float("nan")}


def agreed(urls: list[str]) -> tuple[str, int] | None:
    views = set()
    for u in urls:
        try:
            d = http_json(u + "/v1/leader", 0.5)
        except OSError:
            return None
        views.add((d["leader"], d["term"]))
    if len(views) == 1:
        v = views.pop()
        return v if v[0] else None
    return None


def wait_for(cond, timeout_s: float, poll_s: float = 0.005):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise TimeoutError


def bench_galaxy(trials: int, steady_s: float, joins: int) -> dict:
    out: dict = {"failover_s": [], "rejoin_leader_changes": 0, "steady_leader_changes": None, "join_ready_s": []}
    with Cluster() as c:
        a = c.start_mesh("abc")[0]
        c.wait_leader(timeout_s=30)
        # steady state first: no faults, count leader changes
        if steady_s > 0:
            # start counting once every voter has itself observed the coordinator
            c.wait(lambda: all(p.get("/v1/status")["raft"]["leader_changes"] >= 1 for p in c.running()), 30,
                   "every voter observed the coordinator")
            before = {p.name: p.get("/v1/status")["raft"]["leader_changes"] for p in c.running()}
            lead0 = c.agreed_leader()
            time.sleep(steady_s)    # the benchmark's measurement window, not a wait for a condition
            after = {p.name: p.get("/v1/status")["raft"]["leader_changes"] for p in c.running()}
            out["steady_leader_changes"] = sum(after[n] - before[n] for n in before)
            out["steady_same_leader"] = c.agreed_leader() == lead0
            out["steady_leader_term"] = [lead0, c.agreed_leader()]
        for _ in range(trials):
            leader, term = c.wait_leader(timeout_s=30)
            survivors = [p for p in c.running() if p.name != leader]
            urls = [p.url for p in survivors]
            t0 = time.monotonic()
            c.kill9(leader)
            new = wait_for(lambda: (g := agreed(urls)) and g[0] != leader and g, 30)
            out["failover_s"].append(time.monotonic() - t0)
            c.start(leader)
            back = c.procs[leader]
            wait_for(lambda: back.try_get("/readyz", 0.5), 30, 0.02)
            all_urls = [p.url for p in c.running()]
            got = wait_for(lambda: agreed(all_urls), 30)
            if got != new:
                out["rejoin_leader_changes"] += 1
        for i in range(joins):
            name = f"j{i}"
            c.add(name, join=[a.gossip_addr], extra=["--role", "worker"])
            t0 = time.monotonic()
            p = c.start(name)
            wait_for(lambda: p.try_get("/readyz", 0.5), 30, 0.01)
            out["join_ready_s"].append(time.monotonic() - t0)
            c.stop(name)
    return out


def bench_raw(trials: int) -> dict:
    ports = free_ports(6)
    raft = [f"127.0.0.1:{p}" for p in ports[:3]]
    http = ports[3:]
    procs: dict[str, subprocess.Popen] = {}

    def start(i: int) -> None:
        procs[raft[i]] = subprocess.Popen(
            [sys.executable, "-c", RAW_NODE, raft[i], ",".join(r for r in raft if r != raft[i]), str(http[i])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def urls(exclude: str | None = None) -> list[str]:
        return [f"http://127.0.0.1:{http[i]}" for i in range(3) if raft[i] != exclude]

    out: dict = {"failover_s": []}
    try:
        for i in range(3):
            start(i)
        for _ in range(trials):
            leader, _term = wait_for(lambda: agreed(urls()), 60, 0.02)
            t0 = time.monotonic()
            procs[leader].send_signal(signal.SIGKILL)
            procs[leader].wait()
            wait_for(lambda: (g := agreed(urls(leader))) and g[0] != leader and g, 60)
            out["failover_s"].append(time.monotonic() - t0)
            start(raft.index(leader))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steady-s", type=float, default=300)
    ap.add_argument("--joins", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "failover.json"))
    args = ap.parse_args()
    galaxy = bench_galaxy(args.trials, args.steady_s, args.joins)
    raw = bench_raw(args.trials)
    result = {
        "galaxy_failover": summary(galaxy["failover_s"]),
        "pysyncobj_default_failover": summary(raw["failover_s"]),
        "galaxy_rejoin_leader_changes": galaxy["rejoin_leader_changes"],
        "galaxy_steady_leader_changes": galaxy["steady_leader_changes"],
        "galaxy_steady_seconds": args.steady_s,
        "galaxy_join_ready": summary(galaxy["join_ready_s"]),
        "raw": {"galaxy": galaxy, "pysyncobj": raw},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    rows = [("failover: galaxy (tuned)", result["galaxy_failover"]),
            ("failover: bare pysyncobj (defaults)", result["pysyncobj_default_failover"]),
            ("join -> /readyz: galaxy", result["galaxy_join_ready"])]
    print(f"{'measurement':40} {'n':>3} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'max s':>7}")
    for name, s in rows:
        print(f"{name:40} {s['n']:>3} {s['p50']:>7.3f} {s['p95']:>7.3f} {s['p99']:>7.3f} {s['max']:>7.3f}")
    print(f"leader changes caused by restarting the killed node: {galaxy['rejoin_leader_changes']} "
          f"of {args.trials} restarts")
    print(f"leader changes in {args.steady_s:.0f} s without faults: {galaxy['steady_leader_changes']}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
