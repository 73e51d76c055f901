"""Settled ledger transfers per second and settle latency, with group commit into Raft.

Usage: python benchmarks/ledger.py [--seconds 5] [--rate 5000] [--concurrency 1,64,256]
                                   [--skip-mesh] [--out benchmarks/results/ledger.json]

Measured in one run, on loopback, three voters everywhere:
* mesh: three real `galaxy up` processes.  Transfers go over HTTP to the coordinator and
  are settled when the answer carries the ledger's result (applied through Raft on a
  quorum).  The route is POST /v1/transfers (bearer token) when this build has it, else
  the node-to-node route POST /v1/internal/commands with the Transfer's wire bytes,
  signed with the cluster key -- the same Coordinator.submit behind it, without the
  ledger service's pending-document step.
* in-process: three real HardenedSyncObj voters (Coordinators running the ledger) in this
  process, transfers through Coordinator.submit on the leader: the Raft + apply cost
  without HTTP.  All three voters share this process's GIL, so it is pessimistic.
* baseline: bare pysyncobj (3 SyncObj in one process, a @replicated counter, password
  set, memory journal): the blocking call rate with its default batching and with
  batching off, and the rate of 1,000 pipelined calls.
Each load runs closed-loop (N clients, each sends its next transfer when the previous
settles) and open-loop (transfers sent at --rate per second for --seconds; latency from the
scheduled send time, so a stall is not hidden).  Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.stats import pct, write_json  # noqa: E402
from galaxy import wire  # noqa: E402
from galaxy.config import Config  # noqa: E402
from galaxy.consensus import commands as commands_mod  # noqa: E402
from galaxy.consensus import coordinator as coordinator_mod  # noqa: E402
from galaxy.consensus.coordinator import Coordinator  # noqa: E402
from galaxy.ledger.core import Ledger  # noqa: E402
from galaxy.messages import Mint, OpenAccount, Transfer  # noqa: E402
from galaxy.settings import ClusterSettings  # noqa: E402
from galaxy.store import Store  # noqa: E402
from tests.cluster import Cluster, free_ports  # noqa: E402

ACCOUNTS = 20
FUNDS = 10**12                       # nobody runs dry: every transfer settles as applied
SUBMIT_TIMEOUT_MS = 10_000
Submit = Callable[[Transfer], Awaitable[dict]]


def summary(lat_ms: list[float], settled: int, errors: int, elapsed_s: float, **extra) -> dict:
    return {"settled": settled, "errors": errors, "seconds": round(elapsed_s, 3),
            "per_s": round(settled / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "p50_ms": round(pct(lat_ms, 50), 2), "p99_ms": round(pct(lat_ms, 99), 2),
            "max_ms": round(max(lat_ms), 2) if lat_ms else float("nan"), **extra}


class Load:
    """Transfers among ACCOUNTS with fresh keys; counts settled ones and their latency."""

    def __init__(self, submit: Submit, tag: str) -> None:
        self._submit = submit
        self._tag = tag
        self._n = 0

    def _next(self) -> Transfer:
        k = self._n
        self._n += 1
        return Transfer(f"{self._tag}-{k}", f"acct{k % ACCOUNTS}", f"acct{(k + 7) % ACCOUNTS}", 1, "admin", k)

    async def _one(self, lat: list[float], errors: list[str], t_sched: float) -> None:
        try:
            r = await self._submit(self._next())
            if r.get("ok"):
                lat.append((time.perf_counter() - t_sched) * 1000)
            else:
                errors.append(str(r.get("error")))
        except Exception as e:          # counted, reported; the run goes on
            errors.append(type(e).__name__ + ":" + str(getattr(e, "code", "")))

    async def closed(self, clients: int, seconds: float) -> dict:
        lat: list[float] = []
        errors: list[str] = []
        t0 = time.perf_counter()
        stop = t0 + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                await self._one(lat, errors, time.perf_counter())
        await asyncio.gather(*(client() for _ in range(clients)))
        return summary(lat, len(lat), len(errors), time.perf_counter() - t0, clients=clients,
                       error_kinds=sorted(set(errors))[:5])

    async def open(self, rate: float, seconds: float) -> dict:
        lat: list[float] = []
        errors: list[str] = []
        tasks: set[asyncio.Task] = set()
        total = int(rate * seconds)
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - t0) * rate) + 1)
            while sent < due:
                t = asyncio.create_task(self._one(lat, errors, t0 + sent / rate))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.001)
        while tasks:
            await asyncio.gather(*list(tasks))
        return summary(lat, len(lat), len(errors), time.perf_counter() - t0, offered_per_s=rate,
                       error_kinds=sorted(set(errors))[:5])


async def setup_accounts(submit_any: Callable[[object], Awaitable[dict]]) -> None:
    for i in range(ACCOUNTS):
        for cmd in (OpenAccount(f"bench-open-{i}", f"acct{i}", "user", "", 0),
                    Mint(f"bench-mint-{i}", f"acct{i}", FUNDS, "admin", 0)):
            r = await submit_any(cmd)
            if not r.get("ok") and r.get("error") != "exists":
                raise RuntimeError(f"setup: {r}")


async def run_loads(load: Load, concurrency: list[int], rate: float, seconds: float) -> dict:
    out: dict = {"closed": [], "open": None}
    for c in concurrency:
        out["closed"].append(await load.closed(c, seconds))
    out["open"] = await load.open(rate, seconds)
    return out


# ----------------------------------------------------------------------------- in-process
def bench_in_process(concurrency: list[int], rate: float, seconds: float) -> dict:
    cfg = dataclasses.replace(Config.local(), bind="127.0.0.1")
    root = tempfile.mkdtemp(prefix="galaxy-bench-ledger-")
    ports = free_ports(3)
    names = ["v0", "v1", "v2"]
    coords: dict[str, Coordinator] = {}
    stores: list[Store] = []
    try:
        for i, name in enumerate(names):
            store = Store(os.path.join(root, name))
            stores.append(store)
            store.put("raft.member", "1")
            c = Coordinator(cfg=cfg, node_id=name, raft_host="127.0.0.1", raft_port=ports[i],
                            data_dir=os.path.join(root, name), secret=wire.derive_secret(bytes(32), "raft"),
                            store=store, machines=lambda: [ClusterSettings(), Ledger()])
            c._start(tuple(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i))
            coords[name] = c
        deadline = time.monotonic() + 30
        while not [c for c in coords.values() if c.is_coordinator()]:
            if time.monotonic() > deadline:
                raise RuntimeError("no leader")
            time.sleep(0.02)
        leader = next(c for c in coords.values() if c.is_coordinator())

        async def go() -> dict:
            await setup_accounts(lambda cmd: leader.submit(cmd, SUBMIT_TIMEOUT_MS))
            load = Load(lambda tx: leader.submit(tx, SUBMIT_TIMEOUT_MS), "inproc")
            return await run_loads(load, concurrency, rate, seconds)
        out = asyncio.run(go())
        out["submit_stats"] = leader.status()["submit"]
        out["fsyncs_leader"] = leader.status()["fsyncs"]
        return out
    finally:
        for c in coords.values():
            c.stop()
        for s in stores:
            s.close()
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- mesh
def bench_mesh(concurrency: list[int], rate: float, seconds: float) -> dict:
    import aiohttp

    from galaxy.api.internal import AUTH_HEADER, COMMANDS_PATH, InternalAuth, new_nonce

    with Cluster(env={"GALAXY_ADMIN_PASSWORD": ADMIN_PASSWORD}) as c:
        c.start_mesh("abc")
        leader, _term = c.wait_leader(timeout_s=30)
        url = c.procs[leader].url
        auth = InternalAuth(wire.derive_secret(wire.parse_key(c.key), "http-internal"), 60_000)

        async def go() -> dict:
            conn = aiohttp.TCPConnector(limit=1024)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:
                async def submit(cmd) -> dict:
                    body = wire.encode_command(cmd)
                    headers = {AUTH_HEADER: auth.header("bench", int(time.time() * 1000), "POST", COMMANDS_PATH,
                                                        body, new_nonce()),
                               "Content-Type": "application/octet-stream"}
                    async with session.post(url + COMMANDS_PATH, data=body, headers=headers) as resp:
                        answer = await resp.json(content_type=None)
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}: {answer}")
                        return answer["result"]
                await setup_accounts(submit)
                out = await run_loads(Load(submit, "mesh"), concurrency, rate, seconds)
                out["route"] = COMMANDS_PATH
                out["api"] = await api_loads(session, url, concurrency, rate, seconds)
                return out
        out = asyncio.run(go())
        # the nodes may still be spreading the load's documents: wait longer than usual
        out["leader_status"] = (c.procs[leader].try_get("/v1/status", 20) or {}).get("raft", {})
        out["leader_changes"] = {p.name: ((p.try_get("/v1/status", 20) or {}).get("raft") or {}).get("leader_changes")
                                 for p in c.running()}
        return out


ADMIN_PASSWORD = "bench-admin-password-1"


async def api_loads(session, url: str, concurrency: list[int], rate: float, seconds: float) -> dict:
    """The user's route: POST /v1/transfers with the admin's bearer token (admins are not
    rate-limited).  Settled = the 202 answer says ``settled`` (the ledger service writes the
    pending document first, then submits, then waits until its own view shows the entry)."""
    async def post(path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.post(url + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)
    deadline = time.monotonic() + 30
    while True:
        status, answer = await post("/v1/auth/token", {"name": "admin", "password": ADMIN_PASSWORD})
        if status == 200:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"sign-in as admin: HTTP {status} {answer}")
        await asyncio.sleep(0.2)
    token = answer["token"]

    async def setup(path: str, body: dict, ok: tuple[int, ...]) -> None:
        # the previous phase may have overloaded the leader into an election: retry 503s
        deadline = time.monotonic() + 30
        while True:
            status, answer = await post(path, body, token)
            if status in ok:
                return
            if status != 503 or time.monotonic() > deadline:
                raise RuntimeError(f"{path} {body}: HTTP {status} {answer}")
            await asyncio.sleep(0.2)
    for i in range(ACCOUNTS):
        await setup("/v1/accounts", {"name": f"user{i}", "password": "bench-user-password-1"}, (201, 409))
        await setup("/v1/mint", {"to": f"user{i}", "amount": FUNDS}, (200,))

    async def submit(tx: Transfer) -> dict:
        status, answer = await post("/v1/transfers", {"from": tx.src.replace("acct", "user"),
                                                      "to": tx.dst.replace("acct", "user"), "amount": tx.amount,
                                                      "idempotency_key": tx.key}, token)
        if status != 202:
            raise RuntimeError(f"HTTP {status}: {answer}")
        return {"ok": answer.get("state") == "settled", "error": answer.get("state")}
    out = await run_loads(Load(submit, "api"), concurrency, rate, seconds)
    out["route"] = "/v1/transfers"
    return out


# ----------------------------------------------------------------------------- bare pysyncobj
def bench_pysyncobj(seconds: float) -> dict:
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Counter(SyncObj):
        def __init__(self, me: str, others: list[str], batch: bool) -> None:
            super().__init__(me, others, SyncObjConf(password="bench-secret", appendEntriesUseBatch=batch,
                                                     dynamicMembershipChange=False))
            self.value = 0

        @replicated
        def inc(self) -> int:
            self.value += 1
            return self.value

    out: dict = {}
    for batch in (True, False):
        ports = free_ports(3)
        addrs = [f"127.0.0.1:{p}" for p in ports]
        objs = [Counter(a, [o for o in addrs if o != a], batch) for a in addrs]
        try:
            deadline = time.monotonic() + 30
            while not any(o._isLeader() for o in objs):
                if time.monotonic() > deadline:
                    raise RuntimeError("bare pysyncobj elected no leader")
                time.sleep(0.02)
            lead = next(o for o in objs if o._isLeader())
            lat: list[float] = []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < min(seconds, 3.0):
                t = time.perf_counter()
                lead.inc(sync=True, timeout=5)
                lat.append((time.perf_counter() - t) * 1000)
            blocking = summary(lat, len(lat), 0, time.perf_counter() - t0)
            # 1,000 calls in flight at once (callbacks): what pysyncobj's pipeline can do
            n, done_lat, done = 1000, [], threading.Event()
            lock = threading.Lock()
            t0 = time.perf_counter()

            def cb(_res, _err, t=0.0) -> None:
                with lock:
                    done_lat.append((time.perf_counter() - t0) * 1000)
                    if len(done_lat) == n:
                        done.set()
            for _ in range(n):
                lead.inc(callback=cb)
            done.wait(30)
            pipelined = summary(done_lat, len(done_lat), n - len(done_lat), time.perf_counter() - t0)
            out["batching_on" if batch else "batching_off"] = {"blocking": blocking, "pipelined_1000": pipelined}
        finally:
            for o in objs:
                o.destroy()
            for o in objs:
                o._SyncObj__thread.join(5) if hasattr(o, "_SyncObj__thread") else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--concurrency", default="1,64,256")
    ap.add_argument("--skip-mesh", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ledger.json"))
    args = ap.parse_args()
    concurrency = [int(x) for x in args.concurrency.split(",")]

    result: dict = {"settings": {"seconds": args.seconds, "rate": args.rate, "concurrency": concurrency,
                                 "batch_commands_max": commands_mod.BATCH_COMMANDS_MAX,
                                 "batch_pack_bytes_max": commands_mod.BATCH_PACK_BYTES_MAX,
                                 "batches_in_flight_max": coordinator_mod.BATCHES_IN_FLIGHT_MAX},
                    "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                "load_average_at_start": os.getloadavg()}}
    result["pysyncobj"] = bench_pysyncobj(args.seconds)
    result["in_process"] = bench_in_process(concurrency, args.rate, args.seconds)
    if not args.skip_mesh:
        result["mesh"] = bench_mesh(concurrency, args.rate, args.seconds)

    rows: list[tuple[str, dict]] = []
    for mode in ("batching_on", "batching_off"):
        r = result["pysyncobj"][mode]
        rows.append((f"bare pysyncobj {mode.replace('_', ' ')}: blocking", r["blocking"]))
        rows.append((f"bare pysyncobj {mode.replace('_', ' ')}: 1000 pipelined", r["pipelined_1000"]))
    for where in ("in_process", "mesh"):
        if where not in result:
            continue
        runs = [("galaxy Coordinator.submit", result[where])] if where == "in_process" else \
            [("galaxy mesh /v1/internal/commands", result[where]), ("galaxy mesh /v1/transfers", result[where]["api"])]
        for label, got in runs:
            for r in got["closed"]:
                rows.append((f"{label}: {r['clients']} clients", r))
            r = got["open"]
            rows.append((f"{label}: open {r['offered_per_s']:.0f}/s", r))
    print(f"{'measurement':56} {'settled':>8} {'err':>5} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in rows:
        print(f"{name:56} {r['settled']:>8} {r['errors']:>5} {r['per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    print(f"group commit (in-process leader): {result['in_process']['submit_stats']}")
    if "mesh" in result:
        print(f"group commit (mesh leader): {result['mesh']['leader_status'].get('submit')}; leader changes "
              f"seen per node: {result['mesh']['leader_changes']} (1 = only the first election)")
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(f"load average at start / end: {result['machine']['load_average_at_start']} / "
          f"{result['machine']['load_average_at_end']} ({os.cpu_count()} cpus, shared)")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
