"""Settled ledger transfers per second and settle latency, with group commit into Raft.

Usage: python benchmarks/ledger.py [--seconds 5] [--rate 5000] [--concurrency 1,64,256]
                                   [--parts pysyncobj,inproc,bare,internal,api,batch] [--skip-mesh]
                                   [--batch-sizes 10,100] [--batch-clients 2,8,32]
                                   [--profile DIR] [--out benchmarks/results/ledger.json]

Measured in one run, on loopback, three voters everywhere:
* mesh (``api``): three real `galaxy up` processes.  Transfers are POSTed to
  /v1/transfers (admin bearer token) at the coordinator, then round robin at all three
  nodes; settled when the 202 answer says ``settled`` (sequenced through Raft, applied,
  and shown by the accepting node's view).  A 503 ``overloaded`` (load shed) counts as an
  error.  ``--profile DIR``: py-spy records every node during the all-nodes run.
* mesh (``batch``): the same mesh, POST /v1/transfers/batch with N transfers per request
  (``--batch-sizes``), C clients each sending its next batch when the last one is answered
  (``--batch-clients``), at the coordinator, then round robin at all three nodes.  A
  transfer's settle latency is its batch's request latency; settled = items answered
  ``settled``.  The trade-off: bigger batches cost less CPU per transfer, and each
  client waits for the whole batch.
* mesh (``internal``): the node-to-node route POST /v1/internal/commands at the
  coordinator with the Transfer's wire bytes, signed with the cluster key: the same
  Coordinator.submit without the ledger service.
  Every mesh run reports the elections it caused (the rise of the highest Raft term) and
  the mesh's CPU time per settled transfer (steadier than rates on a shared machine).
* ``bare``: aiohttp alone on this machine: a trivial JSON handler in its own process
  (uvloop, as `galaxy up`), the same client and bodies -- the ceiling of any HTTP row.
* in-process (``inproc``): three real HardenedSyncObj voters (Coordinators running the
  ledger) in this process, transfers through Coordinator.submit on the leader: the Raft +
  apply cost without HTTP.  All three voters share this process's GIL, so it is pessimistic.
* baseline (``pysyncobj``): bare pysyncobj (3 SyncObj in one process, a @replicated
  counter, password set, memory journal): the blocking call rate with its default batching
  and with batching off, and the rate of 1,000 pipelined calls.
Each load runs closed-loop (N clients, each sends its next transfer when the previous
settles) and open-loop (transfers sent at --rate per second for --seconds; latency from the
scheduled send time, so a stall is not hidden).  Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.stats import exit_on_sigterm, pct, write_json  # noqa: E402
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
            errors.append(type(e).__name__ + ":" + str(getattr(e, "code", "") or e)[:60])

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


async def run_loads(load: Load, concurrency: list[int], rate: float, seconds: float,
                    wrap: Callable[[Awaitable[dict]], Awaitable[dict]] | None = None, open_loop: bool = True) -> dict:
    wrap = wrap or (lambda r: r)
    out: dict = {"closed": [], "open": None}
    for c in concurrency:
        out["closed"].append(await wrap(load.closed(c, seconds)))
    if open_loop:
        out["open"] = await wrap(load.open(rate, seconds))
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
def mesh_terms(c: Cluster) -> dict[str, int]:
    """Each node's Raft term: a rise during a load is an election (load shed too late)."""
    return {p.name: int(((p.try_get("/v1/status", 10) or {}).get("leader") or {}).get("term") or 0)
            for p in c.running()}


def mesh_cpu_s(c: Cluster) -> float:
    """CPU seconds the node processes have used (user + system, all threads)."""
    total = 0
    for p in c.running():
        with open(f"/proc/{p.popen.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])        # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


async def counted(c: Cluster, run: Awaitable[dict]) -> dict:
    """``run``, with the elections it caused (the rise of the highest term) and the mesh's
    CPU time per settled transfer (steadier than rates on a shared machine) added."""
    before = await asyncio.to_thread(mesh_terms, c)
    cpu_before = mesh_cpu_s(c)
    out = await run
    cpu = mesh_cpu_s(c) - cpu_before
    after = await asyncio.to_thread(mesh_terms, c)
    out["elections"] = max(after.values(), default=0) - max(before.values(), default=0)
    out["terms"] = {"before": before, "after": after}
    out["mesh_cpu_s"] = round(cpu, 2)
    out["cpu_ms_per_settled"] = round(1000 * cpu / out["settled"], 3) if out["settled"] else None
    return out


def py_spy(c: Cluster, out_dir: str, seconds: float, tag: str) -> list[subprocess.Popen]:
    """Record every node (collapsed stacks, `--format raw`) for ``seconds``; [] without py-spy."""
    exe = shutil.which("py-spy")
    if not out_dir or exe is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    return [subprocess.Popen([exe, "record", "--pid", str(p.popen.pid), "--duration", str(int(seconds)),
                              "--rate", "200", "--format", "raw", "--threads", "--nonblocking", "--output",
                              os.path.join(out_dir, f"{tag}-{p.name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in c.running()]


def bench_mesh(parts: set[str], concurrency: list[int], rate: float, seconds: float, profile_dir: str,
               batch_sizes: list[int] = (10, 100), batch_clients: list[int] = (2, 8, 32)) -> dict:
    import aiohttp

    from galaxy.api.internal import AUTH_HEADER, COMMANDS_PATH, InternalAuth, new_nonce

    with Cluster(env={"GALAXY_ADMIN_PASSWORD": ADMIN_PASSWORD}) as c:
        c.start_mesh("abc")
        leader, _term = c.wait_leader(timeout_s=30)
        url = c.procs[leader].url
        urls = [p.url for p in c.running()]
        auth = InternalAuth(wire.derive_secret(wire.parse_key(c.key), "http-internal"), 60_000)

        async def go() -> dict:
            conn = aiohttp.TCPConnector(limit=1024)
            out: dict = {}
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
                if "internal" in parts:
                    await setup_accounts(submit)
                    out["internal"] = await run_loads(Load(submit, "mesh"), concurrency, rate, seconds,
                                                      lambda r: counted(c, r))
                    out["internal"]["route"] = COMMANDS_PATH
                if "batch" in parts:
                    token = await api_setup(session, url)
                    for where, targets in (("leader", [url]), ("all", urls)):
                        rows = []
                        for size in batch_sizes:
                            load = BatchLoad(session, targets, token, size, f"batch-{where}-{size}")
                            for clients in batch_clients:
                                spies = []
                                if where == "all" and not rows:
                                    # py-spy records the first all-nodes batch row
                                    spies = py_spy(c, profile_dir, seconds, f"batch-all-{size}-{clients}")
                                row = await counted(c, load.closed(clients, seconds))
                                rows.append({**row, "batch": size})
                                for s in spies:
                                    await asyncio.to_thread(s.wait, seconds + 30)
                        out[f"batch_{where}"] = {"closed": rows, "open": None, "route": "/v1/transfers/batch"}
                if "api" in parts:
                    token = await api_setup(session, url)
                    for where, targets in (("leader", [url]), ("all", urls)):
                        load = Load(api_submit(session, targets, token), f"api-{where}")
                        levels = concurrency if where == "all" else [64]
                        spies: list[subprocess.Popen] = []

                        def wrap(run: Awaitable[dict], n: list[int] = [0]) -> Awaitable[dict]:
                            # py-spy records the busiest closed-loop level of the all-nodes run
                            n[0] += 1
                            if where == "all" and n[0] == len(levels):
                                spies.extend(py_spy(c, profile_dir, seconds, "api-all"))
                            return counted(c, run)
                        out[f"api_{where}"] = await run_loads(load, levels, rate, seconds, wrap,
                                                              open_loop=where == "all")
                        out[f"api_{where}"]["route"] = "/v1/transfers"
                        for s in spies:
                            s.wait(seconds + 30)
                return out
        out = asyncio.run(go())
        # the nodes may still be spreading the load's documents: wait longer than usual
        status = c.procs[leader].try_get("/v1/status", 20) or {}
        out["leader_status"] = status.get("raft", {})
        out["leader_docs"] = status.get("docs", {})
        out["leader_changes"] = {p.name: ((p.try_get("/v1/status", 20) or {}).get("raft") or {}).get("leader_changes")
                                 for p in c.running()}
        return out


ADMIN_PASSWORD = "bench-admin-password-1"


async def api_post(session, url: str, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def api_setup(session, url: str) -> str:
    """Sign in as admin and open and fund ACCOUNTS users; the admin's token."""
    deadline = time.monotonic() + 30
    while True:
        status, answer = await api_post(session, url, "/v1/auth/token", {"name": "admin", "password": ADMIN_PASSWORD})
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
            status, answer = await api_post(session, url, path, body, token)
            if status in ok:
                return
            if status != 503 or time.monotonic() > deadline:
                raise RuntimeError(f"{path} {body}: HTTP {status} {answer}")
            await asyncio.sleep(0.2)
    for i in range(ACCOUNTS):
        await setup("/v1/accounts", {"name": f"user{i}", "password": "bench-user-password-1"}, (201, 409))
        await setup("/v1/mint", {"to": f"user{i}", "amount": FUNDS}, (200,))
    return token


def api_submit(session, targets: list[str], token: str) -> Submit:
    """The user's route: POST /v1/transfers with the admin's bearer token (admins are not
    rate-limited), round robin over ``targets``.  Settled = the 202 answer says ``settled``.
    A 503/429 (load shed, Retry-After) counts as an error, not a settled transfer."""
    turn = itertools.count()

    async def submit(tx: Transfer) -> dict:
        target = targets[next(turn) % len(targets)]
        status, answer = await api_post(session, target, "/v1/transfers",
                                        {"from": tx.src.replace("acct", "user"), "to": tx.dst.replace("acct", "user"),
                                         "amount": tx.amount, "idempotency_key": tx.key}, token)
        if status != 202:
            if status in (429, 503):
                await asyncio.sleep(0.02)       # shed: a client backs off (Retry-After is in whole seconds)
            raise RuntimeError(f"HTTP {status}: {answer.get('error')}")
        return {"ok": answer.get("state") == "settled", "error": answer.get("state")}
    return submit


class BatchLoad:
    """Closed loop of POST /v1/transfers/batch: each client sends ``size`` fresh transfers
    among the funded users, waits for the answer, sends the next; round robin over
    ``targets``.  Every settled item's latency is its request's."""

    def __init__(self, session, targets: list[str], token: str, size: int, tag: str) -> None:
        self._session, self._targets, self._token, self._size, self._tag = session, targets, token, size, tag
        self._n = 0
        self._turn = itertools.count()

    def _next(self) -> dict:
        items = []
        for _ in range(self._size):
            k = self._n
            self._n += 1
            items.append({"from": f"user{k % ACCOUNTS}", "to": f"user{(k + 7) % ACCOUNTS}", "amount": 1,
                          "idempotency_key": f"{self._tag}-{k}"})
        return {"transfers": items}

    async def closed(self, clients: int, seconds: float) -> dict:
        lat: list[float] = []
        errors: list[str] = []
        requests = 0
        t0 = time.perf_counter()
        stop = t0 + seconds

        async def client() -> None:
            nonlocal requests
            while time.perf_counter() < stop:
                target = self._targets[next(self._turn) % len(self._targets)]
                t = time.perf_counter()
                try:
                    status, answer = await api_post(self._session, target, "/v1/transfers/batch", self._next(),
                                                    self._token)
                except Exception as e:          # counted, reported; the run goes on
                    errors.append(type(e).__name__)
                    continue
                ms = (time.perf_counter() - t) * 1000
                requests += 1
                if status != 202:
                    errors.extend([f"HTTP {status} {answer.get('error')}"] * self._size)
                    if status in (429, 503):
                        await asyncio.sleep(0.02)
                    continue
                for item in answer["transfers"]:
                    if item.get("state") == "settled":
                        lat.append(ms)
                    else:
                        errors.append(str(item.get("state")))
        await asyncio.gather(*(client() for _ in range(clients)))
        return summary(lat, len(lat), len(errors), time.perf_counter() - t0, clients=clients,
                       requests=requests, error_kinds=sorted(set(errors))[:5])


# ----------------------------------------------------------------------------- bare aiohttp
BARE_SERVER = """
import sys, uvloop
from aiohttp import web

async def transfer(request):
    body = await request.json()
    return web.json_response({"id": body.get("idempotency_key"), "state": "settled"}, status=202)

async def main():
    app = web.Application()
    app.router.add_post("/v1/transfers", transfer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

import asyncio
uvloop.run(main())
"""


def bench_bare_aiohttp(concurrency: list[int], seconds: float) -> dict:
    """What aiohttp alone does on this machine: a trivial JSON handler in its own process
    (uvloop, as `galaxy up`), POSTed the same bodies by the same client."""
    import aiohttp

    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare aiohttp server did not start")

        async def go() -> dict:
            conn = aiohttp.TCPConnector(limit=1024)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:
                return await run_loads(Load(api_submit(session, [f"http://127.0.0.1:{port}"], "x"), "bare"),
                                       concurrency, 0, seconds, open_loop=False)
        return asyncio.run(go())
    finally:
        server.terminate()
        server.wait(10)


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


PARTS = ("pysyncobj", "inproc", "bare", "internal", "api", "batch")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--concurrency", default="1,64,256")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    ap.add_argument("--skip-mesh", action="store_true", help="same as leaving internal, api and batch out of --parts")
    ap.add_argument("--batch-sizes", default="10,100", help="transfers per POST /v1/transfers/batch (batch part)")
    ap.add_argument("--batch-clients", default="2,8,32", help="closed-loop clients of the batch part")
    ap.add_argument("--profile", default="", help="py-spy every node during the api (all nodes) run and the first "
                    "all-nodes batch row into this dir")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ledger.json"))
    args = ap.parse_args()
    concurrency = [int(x) for x in args.concurrency.split(",")]
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(parts - set(PARTS))}")
    if args.skip_mesh:
        parts -= {"internal", "api", "batch"}
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    batch_clients = [int(x) for x in args.batch_clients.split(",")]

    result: dict = {"settings": {"seconds": args.seconds, "rate": args.rate, "concurrency": concurrency,
                                 "parts": sorted(parts),
                                 "batch_commands_max": commands_mod.BATCH_COMMANDS_MAX,
                                 "batch_pack_bytes_max": commands_mod.BATCH_PACK_BYTES_MAX,
                                 "batches_in_flight_max": coordinator_mod.BATCHES_IN_FLIGHT_MAX,
                                 "batch_sizes": batch_sizes, "batch_clients": batch_clients},
                    "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                "load_average_at_start": os.getloadavg()}}
    if "pysyncobj" in parts:
        result["pysyncobj"] = bench_pysyncobj(args.seconds)
    if "inproc" in parts:
        result["in_process"] = bench_in_process(concurrency, args.rate, args.seconds)
    if "bare" in parts:
        result["bare_aiohttp"] = bench_bare_aiohttp(concurrency, args.seconds)
    if parts & {"internal", "api", "batch"}:
        result["mesh"] = bench_mesh(parts, concurrency, args.rate, args.seconds, args.profile, batch_sizes,
                                    batch_clients)

    rows: list[tuple[str, dict]] = []
    for mode in ("batching_on", "batching_off"):
        if "pysyncobj" not in result:
            break
        r = result["pysyncobj"][mode]
        rows.append((f"bare pysyncobj {mode.replace('_', ' ')}: blocking", r["blocking"]))
        rows.append((f"bare pysyncobj {mode.replace('_', ' ')}: 1000 pipelined", r["pipelined_1000"]))
    runs = []
    if "in_process" in result:
        runs.append(("galaxy Coordinator.submit (3 voters, 1 process)", result["in_process"]))
    if "bare_aiohttp" in result:
        runs.append(("bare aiohttp POST (trivial JSON handler)", result["bare_aiohttp"]))
    mesh = result.get("mesh", {})
    for key, label in (("internal", "mesh /v1/internal/commands at the leader"),
                       ("api_leader", "mesh POST /v1/transfers at the leader"),
                       ("api_all", "mesh POST /v1/transfers at all 3 nodes")):
        if key in mesh:
            runs.append((label, mesh[key]))
    for key, label in (("batch_leader", "at the leader"), ("batch_all", "at all 3 nodes")):
        if key in mesh:
            for r in mesh[key]["closed"]:
                rows.append((f"mesh /v1/transfers/batch ({r['batch']} per request) {label}, {r['clients']} clients",
                             r))
    for label, got in runs:
        for r in got["closed"]:
            rows.append((f"{label}: {r['clients']} clients", r))
        if got.get("open"):
            r = got["open"]
            rows.append((f"{label}: open {r['offered_per_s']:.0f}/s", r))
    print(f"{'measurement':76} {'settled':>8} {'err':>6} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8} {'elect':>5} "
          f"{'cpu ms/tx':>9}")
    for name, r in rows:
        print(f"{name:76} {r['settled']:>8} {r['errors']:>6} {r['per_s']:>7.0f} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r.get('elections', '-'):>5} {r.get('cpu_ms_per_settled') or '-':>9}")
        if r.get("error_kinds"):
            print(f"{'':76} errors: {', '.join(r['error_kinds'])}")
    if "in_process" in result:
        print(f"group commit (in-process leader): {result['in_process']['submit_stats']}")
    if mesh:
        print(f"group commit (mesh leader): {mesh['leader_status'].get('submit')}; leader changes "
              f"seen per node: {mesh['leader_changes']} (1 = only the first election)")
        docs = mesh.get("leader_docs", {})
        print(f"documents committed by the mesh leader: {docs.get('versions_committed')} versions in "
              f"{docs.get('commits')} commits")
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(f"load average at start / end: {result['machine']['load_average_at_start']} / "
          f"{result['machine']['load_average_at_end']} ({os.cpu_count()} cpus, shared)")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
