"""Tasks end to end: submit -> running latency, command throughput, scheduler rate, baselines.

Usage: python benchmarks/tasks.py [--latency-tasks 200] [--tasks 2000] [--rounds 3] [--clients 8]
                                  [--batch 50] [--py-spy DIR] [--out benchmarks/results/tasks.json]

Run it from an environment with the ``bench`` extra (``pip install -e '.[bench]'``: Dask
distributed and Ray) to get the baselines; without them their rows say "not installed".
Measured on loopback in one run, against processes this script starts and ends:

* ``galaxy``: a real 3-node mesh (``galaxy up``, local profile) offering ``--cpu 2,1,1``
  (4 slots for tasks needing 1 cpu).
  - latency: ``--latency-tasks`` tasks one at a time, each POSTed to a random node.  The
    task is ``bash -c 'echo $EPOCHREALTIME > "$MARK"'``: its first action writes the wall
    clock, compared with ``time.time()`` taken just before the POST on the same machine
    (both CLOCK_REALTIME), so "running" means the command itself is executing, after
    placement, assignment and spawn.  submit -> 202 (which already includes the durable
    two-node acknowledgement) is reported separately.  The per-phase breakdown comes from
    the task documents' own ms timestamps (accepted, scheduled, started, ended).
  - throughput: ``--tasks`` tasks of ``true`` submitted by ``--clients`` concurrent
    keep-alive clients to random nodes; from just before the first POST to the latest
    ``ended_at`` among the tasks' attempts (as recorded by the workers).  A second row,
    ``galaxy batch<N>``, does the same with ``--batch`` tasks per POST (a batch
    submission: one durable two-node acknowledgement per POST).
* ``raw spawn``: ``subprocess.run(["true"])`` with 4 in flight (4 threads) in this
  process: the machine's physical limit.  Its latency row spawns the same probe.
* ``ray``: ``ray.init(num_cpus=2)``, a remote function running the same command (object
  store 100 MB: the workload moves no data).
* ``dask``: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, likewise.
  Both run with ``MALLOC_ARENA_MAX=2``, as Galaxy's nodes cap their arenas: under an
  address-space limit (1 GiB on some machines) Ray cannot start otherwise.
  Both run in a child process of this script (so their threads and teardown stay out of
  the others' measurements), driven over a line protocol.
* Each system runs alone: a round measures raw spawn, then starts a mesh, measures Galaxy
  and stops it, then starts, measures and stops Ray, then Dask (an idle neighbour's
  daemons cost a system ~15% here).  Rounds interleave, so drift of the shared machine hits
  all alike.  Every row also reports the CPU per task of the system's own processes and
  of the commands they reaped.  For them two
  starts are reported: the command's first action (comparable with Galaxy's) and the
  Python function's first line.  Neither makes a submission durable.
* ``scheduler``: ``benchmarks/scheduler.py``'s synthetic 1,000 nodes x 10,000 pending
  tasks (spread), one ``plan()`` call and in rounds of ``PLACEMENTS_MAX``.

Targets: Galaxy throughput >= Ray's in the same run and >= 0.5x raw spawn; submit ->
running p50 < 10 ms.  ``--py-spy DIR`` also records every node during the first
throughput round (py-spy must be installed; speedscope JSON files in DIR).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from benchmarks import scheduler as sched_bench  # noqa: E402
from benchmarks.stats import exit_on_sigterm, pct  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

PROBE = 'echo $EPOCHREALTIME > "$MARK"'     # bash builtin: no fork between start and stamp
NODE_CPUS = {"a": "2", "b": "1", "c": "1"}
RAW_INFLIGHT = 4
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")
LATENCY_TARGET_MS = 10.0
RAW_RATIO_TARGET = 0.5
WAIT_TIMEOUT_S = 300.0
# The submission limiters (per address and per account, 50/s after a burst of 200) guard a
# node against one flooding client; the benchmark's clients are one account at 127.0.0.1
# and measure the task path, so the nodes it starts lift both.
NODE_ENV = {"GALAXY_SUBMIT_RATE_PER_S": "1000000", "GALAXY_SUBMIT_BURST": "1000000",
            "GALAXY_SUBMIT_ACCOUNT_RATE_PER_S": "1000000", "GALAXY_SUBMIT_ACCOUNT_BURST": "1000000"}

# ---------------------------------------------------------------------------------- baselines
# One child process per framework; reads commands on stdin, answers one JSON line each.
BASELINE_CHILD = r"""
import json, os, subprocess, sys, time

PROBE = sys.argv[2]
OBJECT_STORE_BYTES = 100 << 20

def run_true(_=None):
    subprocess.run(["true"], check=True)

def probe(mark):
    t_fn = time.time()
    subprocess.run(["bash", "-c", PROBE], env={"MARK": mark, "PATH": os.environ["PATH"]}, check=True)
    return t_fn

kind = sys.argv[1]
if kind == "ray":
    import ray
    # The workload moves no data: a small object store (Ray's default maps 30 % of RAM,
    # which a capped address space refuses)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=OBJECT_STORE_BYTES)
    r_true, r_probe = ray.remote(run_true), ray.remote(probe)
    version = ray.__version__
    def batch(n):
        ray.get([r_true.remote() for _ in range(n)])
    def one(mark):
        t0 = time.time()
        t_fn = ray.get(r_probe.remote(mark))
        return t0, t_fn
    def close():
        ray.shutdown()
else:
    import dask, distributed
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    version = dask.__version__
    def batch(n):
        client.gather(client.map(run_true, range(n), pure=False))
    def one(mark):
        t0 = time.time()
        t_fn = client.submit(probe, mark, pure=False).result()
        return t0, t_fn
    def close():
        client.close(); cluster.close()

batch(50)   # warm up: workers started, functions shipped
print(json.dumps({"ready": True, "version": version}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "throughput":
        t0 = time.perf_counter()
        batch(cmd["n"])
        print(json.dumps({"n": cmd["n"], "seconds": time.perf_counter() - t0}), flush=True)
    elif cmd["op"] == "latency":
        out = []
        for mark in cmd["marks"]:
            t0, t_fn = one(mark)
            with open(mark) as f:
                out.append([t0, t_fn, float(f.read())])
        print(json.dumps({"samples": out}), flush=True)
    else:
        break
close()
"""


class Baseline:
    """A Ray or Dask child process, or the reason it could not start."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.error: str | None = None
        self.version = ""
        self.proc: subprocess.Popen | None = None
        try:
            __import__({"ray": "ray", "dask": "distributed"}[kind])
        except ImportError:
            self.error = "not installed (pip install -e '.[bench]')"
            return
        # Two malloc arenas per process, as Galaxy's nodes have (cap_malloc_arenas): without
        # it Ray's workers cannot map their object store under an address-space limit.
        self.proc = subprocess.Popen([sys.executable, "-c", BASELINE_CHILD, kind, PROBE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
        hello = self._read()
        if hello is None:
            self.error = f"did not start (exit {self.proc.poll()})"
        else:
            self.version = hello["version"]

    def _read(self) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def ask(self, cmd: dict) -> dict | None:
        if self.error or self.proc is None or self.proc.stdin is None:
            return None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if out is None:
            self.error = f"died (exit {self.proc.poll()})"
        return out

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds of every live process of this framework (the driver and its
        descendants: Ray's GCS, raylet and workers; Dask's scheduler and workers), and of
        the children they reaped (the commands)."""
        own = reaped = 0.0
        try:
            procs = [psutil.Process(self.proc.pid)] if self.proc is not None else []
            procs += procs[0].children(recursive=True) if procs else []
        except psutil.Error:
            return own, reaped
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            own += t.user + t.system
            reaped += t.children_user + t.children_system
        return own, reaped

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)


def raw_throughput(n: int, inflight: int = RAW_INFLIGHT) -> float:
    """Tasks/s of subprocess.run(["true"]) with ``inflight`` at a time."""
    left = [n]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            subprocess.run(["true"], check=True)

    threads = [threading.Thread(target=worker) for _ in range(inflight)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - t0)


def raw_latency(marks: list[str]) -> list[float]:
    out = []
    for mark in marks:
        t0 = time.time()
        subprocess.run(["bash", "-c", PROBE], env={"MARK": mark, "PATH": os.environ["PATH"]}, check=True)
        with open(mark) as f:
            out.append((float(f.read()) - t0) * 1000)
    return out


# ---------------------------------------------------------------------------------- galaxy
def start_mesh(c: Cluster) -> None:
    first = None
    for name, cpu in NODE_CPUS.items():
        p = c.add(name, join=[first.gossip_addr] if first else None, extra=["--cpu", cpu, "--memory", "4G"])
        first = first or p
    for name in NODE_CPUS:
        c.start(name)
    c.wait_leader(timeout_s=30)
    c.wait(lambda: all(len(c.members_view(p)) == len(NODE_CPUS) for p in c.running()) or None, 30,
           "3 members everywhere")
    c.wait(lambda: all((p.try_get("/readyz") or {}).get("ready") for p in c.running()) or None, 30, "ready")


# The mesh's admin token (every submission needs one), set once the mesh is up; sent by every session.
AUTH: dict[str, str] = {}


async def post_task(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url + "/v1/tasks", json=body) as r:
        doc = await r.json()
        if r.status != 202:
            raise RuntimeError(f"submit refused: {r.status} {doc}")
        return doc


async def get_json(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as r:
        r.raise_for_status()
        return await r.json()


async def galaxy_latency(urls: list[str], n: int, marks_dir: str, rng: random.Random) -> list[dict]:
    """n probes one at a time; per task: ms from just before POST to 202, to the command's stamp, and phases."""
    out = []
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for i in range(n):
            url = rng.choice(urls)
            mark = os.path.join(marks_dir, f"g{i}")
            body = {"command": ["bash", "-c", PROBE], "env": {"MARK": mark}, "resources": {"cpu": 1}}
            t0 = time.time()
            doc = await post_task(session, url, body)
            t_ack = time.time()
            deadline = time.monotonic() + 30
            while not os.path.exists(mark) or os.path.getsize(mark) == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {doc['id']} never ran")
                await asyncio.sleep(0.0005)       # client-side only; the stamp is the task's own
            with open(mark) as f:
                t_run = float(f.read())
            while True:                          # let it finish so the next probe starts on an idle mesh
                t = await get_json(session, f"{url}/v1/tasks/{doc['id']}")
                if t["state"] in TERMINAL:
                    break
                await asyncio.sleep(0.005)
            a = t["attempts"][-1]
            out.append({"ack_ms": (t_ack - t0) * 1000, "run_ms": (t_run - t0) * 1000,
                        "accepted_ms": t["submitted_ms"] - t0 * 1000,
                        "scheduled_ms": a["scheduled_at"] * 1000 - t0 * 1000,
                        "started_ms": a["started_at"] * 1000 - t0 * 1000,
                        "ended_ms": a["ended_at"] * 1000 - t0 * 1000,
                        "accepted_by": t["accepted_by"], "ran_on": a["node"], "acked_by": doc["acknowledged_by"]})
    return out


async def all_tasks(session: aiohttp.ClientSession, url: str) -> list[dict]:
    out, after = [], ""
    while True:
        page = await get_json(session, f"{url}/v1/tasks?limit=1000" + (f"&after={after}" if after else ""))
        out += page["tasks"]
        after = page["next"]
        if not after:
            return out


async def galaxy_throughput(urls: list[str], n: int, clients: int, rng: random.Random, batch: int = 0,
                            command: tuple[str, ...] = ("true",), on_done: Callable[[], Any] = lambda: None) -> dict:
    """n `true` tasks from ``clients`` concurrent submitters; first POST -> last attempt's end.
    ``batch`` > 0: each POST carries up to that many tasks (one durable acknowledgement).
    ``on_done()`` is called once they all ended, before they are listed for the phases."""
    connector = aiohttp.TCPConnector(limit=clients * len(urls))
    async with aiohttp.ClientSession(connector=connector, headers=AUTH) as session:
        before = (await get_json(session, urls[0] + "/v1/status"))["tasks"]
        done_before = sum(before.get(s, 0) for s in TERMINAL)
        ids: list[str] = []
        acks: list[float] = []
        left = [n]

        spec = {"command": list(command), "resources": {"cpu": 1}}

        async def submitter() -> None:
            while left[0] > 0:
                k = min(left[0], batch) if batch else 1
                left[0] -= k
                t = time.perf_counter()
                if batch:
                    doc = await post_task(session, rng.choice(urls), {"tasks": [spec] * k})
                    ids.extend(x["id"] for x in doc["tasks"])
                else:
                    doc = await post_task(session, rng.choice(urls), spec)
                    ids.append(doc["id"])
                acks.append(time.perf_counter() - t)

        t0 = time.time()
        await asyncio.gather(*(submitter() for _ in range(clients)))
        t_submitted = time.time()
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:
            counts = (await get_json(session, urls[0] + "/v1/status"))["tasks"]
            if sum(counts.get(s, 0) for s in TERMINAL) - done_before >= n:
                on_done()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tasks not terminal after {WAIT_TIMEOUT_S}s: {counts}")
            await asyncio.sleep(0.05)
        mine = set(ids)
        tasks = [t for t in await all_tasks(session, urls[0]) if t["id"] in mine]
    states = {}
    for t in tasks:
        states[t["state"]] = states.get(t["state"], 0) + 1
    t_end = max(t["attempts"][-1]["ended_at"] for t in tasks)
    sched = [t["attempts"][0]["scheduled_at"] * 1000 - t["submitted_ms"] for t in tasks]
    start = [t["attempts"][0]["started_at"] * 1000 - t["attempts"][0]["scheduled_at"] * 1000 for t in tasks]
    run = [t["attempts"][0]["ended_at"] * 1000 - t["attempts"][0]["started_at"] * 1000 for t in tasks]
    return {"n": n, "seconds": t_end - t0, "per_s": n / (t_end - t0), "submit_seconds": t_submitted - t0,
            "states": states, "retried": sum(len(t["attempts"]) > 1 for t in tasks),
            "submit_ack_ms_p50": pct(acks, 50) * 1000, "submit_ack_ms_p99": pct(acks, 99) * 1000,
            "accepted_to_scheduled_ms_p50": pct(sched, 50), "scheduled_to_started_ms_p50": pct(start, 50),
            "started_to_ended_ms_p50": pct(run, 50),
            "per_node": {k: sum(t["attempts"][-1]["node"] == k for t in tasks) for k in NODE_CPUS}}


def node_cpu_s(c: Cluster) -> dict[str, tuple[float, float]]:
    """CPU seconds (user + system) of each node process, and of its reaped children (the tasks)."""
    out = {}
    for p in c.running():
        t = psutil.Process(p.popen.pid).cpu_times()
        out[p.name] = (t.user + t.system, t.children_user + t.children_system)
    return out


def with_cpu(c: Cluster, n: int, round_fn: Callable[[Callable[[], Any]], dict]) -> dict:
    """``round_fn(on_done)``'s result, with each node's CPU per task until it calls
    ``on_done()`` (every task ended; not the listing of them that follows, which only the
    benchmark does): its own process (``node_cpu_ms_per_task``) and its reaped tasks
    (``task_cpu_ms_per_task``); and the mesh's in all, this client included
    (``cpu_ms_per_task``: own, tasks)."""
    cpu0, me0 = node_cpu_s(c), self_cpu_s()
    end: list[tuple] = []
    res = round_fn(lambda: end.append((node_cpu_s(c), self_cpu_s())))
    cpu1, me1 = end[0] if end else (node_cpu_s(c), self_cpu_s())
    res["node_cpu_ms_per_task"] = {k: round((cpu1[k][0] - cpu0[k][0]) * 1000 / n, 2) for k in cpu1}
    res["task_cpu_ms_per_task"] = {k: round((cpu1[k][1] - cpu0[k][1]) * 1000 / n, 2) for k in cpu1}
    mesh0 = (sum(x[0] for x in cpu0.values()) + me0[0], sum(x[1] for x in cpu0.values()))
    mesh1 = (sum(x[0] for x in cpu1.values()) + me1[0], sum(x[1] for x in cpu1.values()))
    res["cpu_ms_per_task"] = per_task_ms(mesh1, mesh0, n)
    return res


def self_cpu_s() -> tuple[float, float]:
    """CPU seconds of this process (every thread), and of the children it reaped."""
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def per_task_ms(after: tuple[float, float], before: tuple[float, float], n: int) -> tuple[float, float]:
    return tuple((a - b) * 1000 / n for a, b in zip(after, before))    # type: ignore[return-value]


def py_spy_start(c: Cluster, out_dir: str, seconds: int) -> list[subprocess.Popen]:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        print("  py-spy not installed: no profile", flush=True)
        return []
    os.makedirs(out_dir, exist_ok=True)
    return [subprocess.Popen([exe, "record", "--pid", str(p.popen.pid), "--duration", str(seconds), "--rate", "250",
                              "--format", "speedscope", "--nonblocking", "--output",
                              os.path.join(out_dir, f"{p.name}.speedscope.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in c.running()]


# ---------------------------------------------------------------------------------- report
def lat_summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p90_ms": round(pct(ms, 90), 3),
            "p99_ms": round(pct(ms, 99), 3), "max_ms": round(max(ms), 3) if ms else None}


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-tasks", type=int, default=200)
    # as many as the ray/dask rounds run: the same workload for every system
    ap.add_argument("--tasks", type=int, default=2000, help="galaxy tasks per throughput round")
    ap.add_argument("--baseline-tasks", type=int, default=2000, help="ray/dask tasks per throughput round")
    ap.add_argument("--raw-tasks", type=int, default=4000, help="raw spawns per throughput round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8, help="concurrent galaxy submitters")
    ap.add_argument("--batch", type=int, default=50,
                    help="also a galaxy row submitting this many tasks per POST (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--py-spy", default="", help="record every node during the first galaxy round into this dir")
    ap.add_argument("--node-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the galaxy nodes, e.g. GALAXY_GOSSIP_INTERVAL_MS=20 (experiments)")
    ap.add_argument("--no-baselines", action="store_true", help="galaxy and raw spawn only (profiling)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tasks.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    marks = tempfile.mkdtemp(prefix="galaxy-bench-marks-")
    batch_row = f"galaxy batch{args.batch}"
    tput: dict[str, list[float]] = {"raw spawn": [], "galaxy": [], **({batch_row: []} if args.batch else {}),
                                    "ray": [], "dask": []}
    lat: dict[str, dict] = {}
    detail: dict = {}
    kinds = () if args.no_baselines else ("ray", "dask")
    errors: dict[str, str] = {}
    versions: dict[str, str] = {}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in tput}
    try:
        for r in range(args.rounds):
            # Each system runs alone: another's daemons idling next to it cost it ~15 % here
            # (docs/benchmarks.md, seventh session).  Rounds interleave, so drift hits all alike.
            c0 = self_cpu_s()
            tput["raw spawn"].append(raw_throughput(args.raw_tasks))
            cpu["raw spawn"].append(per_task_ms(self_cpu_s(), c0, args.raw_tasks))
            if r == 0:
                lat["raw spawn"] = {"submit_to_running": lat_summary(
                    raw_latency([os.path.join(marks, f"r{i}") for i in range(args.latency_tasks)]))}
            with Cluster(env={**NODE_ENV, **dict(kv.split("=", 1) for kv in args.node_env)}) as c:
                print(f"round {r + 1}/{args.rounds}: starting a 3-node galaxy mesh ...", flush=True)
                start_mesh(c)
                AUTH["Authorization"] = f"Bearer {c.admin_token()}"
                urls = [p.url for p in c.procs.values()]
                run = asyncio.new_event_loop().run_until_complete
                run(galaxy_throughput(urls, 40, args.clients, rng))            # warm-up: every node has run tasks
                if r == 0:
                    galaxy_latency_row(c, urls, run, args.latency_tasks, marks, rng, lat, detail)
                spies = py_spy_start(c, args.py_spy, 30) if args.py_spy and r == 0 else []
                res = with_cpu(c, args.tasks, lambda done: run(galaxy_throughput(urls, args.tasks, args.clients, rng,
                                                                                  on_done=done)))
                for s in spies:
                    s.send_signal(2)     # SIGINT: py-spy writes what it has
                for s in spies:
                    s.wait(timeout=60)
                detail.setdefault("galaxy_rounds", []).append(res)
                tput["galaxy"].append(res["per_s"])
                cpu["galaxy"].append(res["cpu_ms_per_task"])
                if args.batch:
                    res = with_cpu(c, args.tasks, lambda done: run(galaxy_throughput(
                        urls, args.tasks, args.clients, rng, batch=args.batch, on_done=done)))
                    detail.setdefault("galaxy_batch_rounds", []).append(res)
                    tput[batch_row].append(res["per_s"])
                    cpu[batch_row].append(res["cpu_ms_per_task"])
                if r == args.rounds - 1:
                    detail["galaxy_node_stats"] = {p.name: p.try_get("/v1/status", timeout_s=5) for p in c.running()}
            for kind in kinds:
                if kind in errors:
                    continue
                b = Baseline(kind)
                try:
                    if b.error is None and r == 0:
                        got = b.ask({"op": "latency", "marks": [os.path.join(marks, f"{kind}{i}")
                                                                for i in range(args.latency_tasks)]})
                        if got:
                            s = got["samples"]
                            lat[kind] = {"submit_to_running": lat_summary([(x[2] - x[0]) * 1000 for x in s]),
                                         "submit_to_function": lat_summary([(x[1] - x[0]) * 1000 for x in s])}
                    c0 = b.cpu_s()
                    got = b.ask({"op": "throughput", "n": args.baseline_tasks})
                    if got:
                        tput[kind].append(got["n"] / got["seconds"])
                        cpu[kind].append(per_task_ms(b.cpu_s(), c0, args.baseline_tasks))
                    versions[kind] = b.version
                finally:
                    b.close()
                if b.error:
                    errors[kind] = b.error
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]:,.0f}/s" for k, v in tput.items() if len(v) > r), flush=True)
    finally:
        shutil.rmtree(marks, ignore_errors=True)
    for kind in ("ray", "dask"):
        if args.no_baselines:
            errors[kind] = "skipped"
        elif kind not in tput or not tput[kind]:
            errors.setdefault(kind, "no result")

    print("\nscheduler: 1,000 nodes x 10,000 pending (spread), benchmarks/scheduler.py's cluster", flush=True)
    nodes, pending = sched_bench.cluster(random.Random(0), 1_000, 10_000)
    sched = {"one_call": sched_bench.one_call(nodes, pending, "spread"),
             "rounds": sched_bench.rounds(nodes, pending, "spread")}

    raw = statistics.median(tput["raw spawn"])
    rows = {}
    for name in tput:
        galaxy = name.startswith("galaxy")
        rate = statistics.median(tput[name]) if tput[name] else None
        own = statistics.median(x[0] for x in cpu[name]) if cpu[name] else None
        cmd = statistics.median(x[1] for x in cpu[name]) if cpu[name] else None
        rows[name] = {"per_s_median": rate, "per_s_rounds": [round(x, 1) for x in tput[name]],
                      "vs_raw": round(rate / raw, 3) if rate else None,
                      "slots": 4 if galaxy else {"raw spawn": RAW_INFLIGHT, "ray": 2, "dask": 2}[name],
                      "durable": galaxy, "error": errors.get(name), "version": versions.get(name),
                      "cpu_ms_per_task": {"system": round(own, 3) if own is not None else None,
                                          "command": round(cmd, 3) if cmd is not None else None},
                      **lat.get(name, {})}
    ray_rate = rows["ray"]["per_s_median"]
    g = rows["galaxy"]
    ok_tput = g["per_s_median"] >= RAW_RATIO_TARGET * raw and (ray_rate is None or g["per_s_median"] >= ray_rate)
    ok_lat = g["submit_to_running"]["p50_ms"] < LATENCY_TARGET_MS
    gb = rows.get(batch_row)
    ok_batch = gb is not None and gb["per_s_median"] >= RAW_RATIO_TARGET * raw and (
        ray_rate is None or gb["per_s_median"] >= ray_rate)

    print(f"\ncommand tasks on loopback, {os.cpu_count()} cores; throughput median of {args.rounds} interleaved "
          f"rounds; latency over {args.latency_tasks} sequential probes")
    print(f"{'system':<14} {'slots':>5} {'tasks/s':>8} {'x raw':>6} {'start p50':>10} {'start p99':>10} "
          f"{'202 p50':>8} {'202 p99':>8} {'fn p50':>7} {'cpu/task':>9} {'cmd cpu':>8} {'durable':>8}")
    for name, r in rows.items():
        if r["error"]:
            print(f"{name:<14} {r['error']}")
            continue
        s, a, f = r.get("submit_to_running", {}), r.get("submit_to_202", {}), r.get("submit_to_function", {})
        print(f"{name:<14} {r['slots']:>5} {fmt(r['per_s_median'], ',.0f'):>8} {fmt(r['vs_raw'], '.2f'):>6} "
              f"{fmt(s.get('p50_ms'), '.2f'):>10} {fmt(s.get('p99_ms'), '.2f'):>10} {fmt(a.get('p50_ms'), '.2f'):>8} "
              f"{fmt(a.get('p99_ms'), '.2f'):>8} {fmt(f.get('p50_ms'), '.2f'):>7} "
              f"{fmt(r['cpu_ms_per_task']['system'], '.2f'):>9} {fmt(r['cpu_ms_per_task']['command'], '.2f'):>8} "
              f"{'yes' if r['durable'] else 'no':>8}")
    print("(start: just before submit -> the command's first action; fn: -> the framework's Python function "
          "begins; 202: the durable two-node acknowledgement; cpu/task: ms of CPU per task of the system's "
          "own processes (Galaxy: its nodes and this client; Ray, Dask: every process of theirs, driver "
          "included), cmd cpu: of the `true` processes it reaped"
          + (f"; {batch_row}: {args.batch} tasks per POST, one durable acknowledgement each)" if args.batch else ")"))
    ph = detail["galaxy_latency_phases_p50_ms"]
    print("galaxy phases, p50 ms after the POST began: " + ", ".join(f"{k[:-3]} {v}" for k, v in ph.items()))
    for path, s in detail["galaxy_latency_by_path"].items():
        print(f"  {path:<44} n={s['n']:<4} start p50 {s['p50_ms']:.2f} ms")
    last = detail["galaxy_rounds"][-1]
    print(f"galaxy throughput round: submit {last['submit_seconds']:.2f} s, 202 p50 {last['submit_ack_ms_p50']:.1f} ms, "
          f"accepted->scheduled p50 {last['accepted_to_scheduled_ms_p50']:.0f} ms, scheduled->started p50 "
          f"{last['scheduled_to_started_ms_p50']:.0f} ms; states {last['states']}; per node {last['per_node']}")
    print(f"  node CPU ms per task (node process / its tasks): "
          + ", ".join(f"{k} {v} / {last['task_cpu_ms_per_task'][k]}" for k, v in last["node_cpu_ms_per_task"].items()))
    if args.batch:
        lb = detail["galaxy_batch_rounds"][-1]
        print(f"{batch_row} round: submit {lb['submit_seconds']:.2f} s, 202 p50 {lb['submit_ack_ms_p50']:.1f} ms "
              f"per POST, accepted->scheduled p50 {lb['accepted_to_scheduled_ms_p50']:.0f} ms, scheduled->started "
              f"p50 {lb['scheduled_to_started_ms_p50']:.0f} ms; states {lb['states']}; per node {lb['per_node']}")
        print(f"  node CPU ms per task (node process / its tasks): "
              + ", ".join(f"{k} {v} / {lb['task_cpu_ms_per_task'][k]}" for k, v in lb["node_cpu_ms_per_task"].items()))
    print(f"scheduler 1000x10000 spread: one call {sched['one_call']['per_s']:,.0f} placements/s "
          f"({sched['one_call']['placements']} in {sched['one_call']['seconds'] * 1000:.0f} ms); rounds "
          f"{sched['rounds']['per_s']:,.0f}/s (call p50 {sched['rounds']['call_ms_p50']:.1f} ms)")
    print(f"targets: throughput >= Ray's and >= {RAW_RATIO_TARGET}x raw -> {'met' if ok_tput else 'NOT met'}"
          + (f" (one task per POST); {'met' if ok_batch else 'NOT met'} ({batch_row})" if args.batch else "")
          + f"; submit->running p50 < {LATENCY_TARGET_MS:g} ms -> {'met' if ok_lat else 'NOT met'}")

    doc = {"benchmark": "tasks", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_avg_1m": os.getloadavg()[0]},
           "params": {k: v for k, v in vars(args).items() if k not in ("out", "py_spy")},
           "target": {"latency_p50_ms_max": LATENCY_TARGET_MS, "raw_ratio_min": RAW_RATIO_TARGET,
                      "throughput_met": ok_tput, "throughput_met_batch": ok_batch if args.batch else None,
                      "latency_met": ok_lat},
           "systems": rows, "scheduler_1000x10000_spread": sched, "galaxy_detail": detail}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0 if ok_tput and ok_lat else 1


def galaxy_latency_row(c: Cluster, urls: list[str], run: Callable, n: int, marks: str, rng: random.Random,
                       lat: dict, detail: dict) -> None:
    print(f"latency: {n} probes one at a time", flush=True)
    g = run(galaxy_latency(urls, n, marks, rng))
    lat["galaxy"] = {"submit_to_running": lat_summary([x["run_ms"] for x in g]),
                     "submit_to_202": lat_summary([x["ack_ms"] for x in g])}
    detail["galaxy_latency_phases_p50_ms"] = {
        k: round(pct([x[k] for x in g], 50), 2)
        for k in ("accepted_ms", "ack_ms", "scheduled_ms", "started_ms", "run_ms", "ended_ms")}
    leader, _ = c.wait_leader()
    detail["galaxy_latency_by_path"] = by_path(g, leader)


def by_path(samples: list[dict], leader: str) -> dict[str, dict]:
    """Latency split by the path the task took: did the coordinator accept it, get the DocPut, run it?"""
    groups: dict[str, list[float]] = {}
    for x in samples:
        key = ("accepted by coordinator" if x["accepted_by"] == leader else
               "DocPut to coordinator" if x["acked_by"] == leader else "coordinator learns by gossip")
        key += ", ran there" if x["ran_on"] == leader else ", ran on another node"
        groups.setdefault(key, []).append(x["run_ms"])
    return {k: {"n": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)} for k, v in sorted(groups.items())}


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
