"""SWIM membership: dissemination, bandwidth, false positives (simulated) and detection (real).

Usage: python benchmarks/gossip.py [--seeds 5] [--trials 20] [--fp-minutes 10] [--quick]
                                   [--out benchmarks/results/gossip.json]

Simulated (galaxy.sim, LAN profile, latency 1-5 ms, deterministic per seed):
* convergence of one update (``update_self`` on one node) for N = 10, 100, 1000: the
  number of hops on the longest infection path ("rounds") and the simulated time until
  every node holds it, against the log2(N) rounds of an ideal push epidemic;
* bytes sent per node per second in steady state at N = 100 and 1000, over one full
  push-pull period, every datagram encoded by the real wire codec (UDP payload bytes);
* false positives at 0/5/10 % loss (N = 50): suspicions of live nodes and deaths of
  live nodes, per node-hour.
Real processes (``galaxy up`` on loopback, 10 nodes, tests/cluster.py's profile, whose
failure detector settings are the LAN defaults): kill -9 a node, time until every
survivor has logged it dead (from the nodes' JSON logs), p50/p99 over ``--trials``;
and a document PUT through /v1/kv on one node (a different one each trial): time from
sending the PUT until the last of the 10 nodes serves it, p50/p99 over ``--doc-trials``.
Arrival is seen by polling every node at once (one keep-alive connection each, a GET
every ``POLL_GAP_MS`` until that node serves the value), so a time is late by at most
the gap plus one GET (~1-2 ms).  ``--only docs`` runs just that and merges it into the
JSON already written.  Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from galaxy import wire  # noqa: E402
from galaxy.config import Config  # noqa: E402
from galaxy.gossip.membership import detection_bound_ms, suspicion_timeouts  # noqa: E402
from galaxy.messages import DEAD, SUSPECT, RaftView  # noqa: E402
from galaxy.sim import MeshSim, addr_of, nid  # noqa: E402
from benchmarks.stats import exit_on_sigterm  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

LAN = Config.lan()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "max": max(xs) if xs else float("nan"),
            "mean": statistics.fmean(xs) if xs else float("nan")}


# ---------------------------------------------------------------------------- simulated

class _Tracked:
    """A node of the simulation that notes when (and at which hop) it first holds ``term``."""

    def __init__(self, core, sim: MeshSim, probe: dict) -> None:
        self.core = core
        self.sim = sim
        self.probe = probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def receive(self, now_ms: int, src, msg):
        p = self.probe
        me = self.core.me().id
        had = me in p["hop"]
        out = self.core.receive(now_ms, src, msg)
        if not had and p["term"] and self.core.get(p["origin"]).record.raft.term == p["term"]:
            sender = p["by_addr"].get(src)
            p["hop"][me] = p["hop"].get(sender, 0) + 1
            p["at"][me] = now_ms
        return out


def convergence(n: int, seed: int) -> dict:
    sim = MeshSim(seed, LAN)
    sim.record_events = False
    sim.start_mesh(n)
    probe: dict = {"term": 0, "origin": nid(0), "hop": {}, "at": {}, "by_addr": {addr_of(i): nid(i) for i in range(n)}}
    for i in range(n):
        sim.net.nodes[addr_of(i)] = _Tracked(sim.node(i), sim, probe)
    sim.run(3_000)
    t0 = sim.now_ms
    probe["term"] = 42
    probe["hop"][nid(0)] = 0
    probe["at"][nid(0)] = t0
    sim.call(0, lambda now: sim.net.nodes[addr_of(0)].core.update_self(now, raft=RaftView(term=42, leader=nid(0))))
    sim.run_until(lambda: len(probe["hop"]) == n, 60_000, step_ms=5)
    return {"rounds": max(probe["hop"].values()), "ms": max(probe["at"].values()) - t0}


def bandwidth(n: int, seed: int) -> dict:
    codec = wire.Codec(LAN.cluster, [wire.parse_key(wire.generate_key())], nid(0), frame_max_bytes=LAN.frame_max_bytes)
    sizes: dict[int, tuple[Any, int]] = {}

    def size_of(msg: Any) -> int:
        hit = sizes.get(id(msg))
        if hit is not None and hit[0] is msg:
            return hit[1]
        size = len(codec.encode(msg, 1_700_000_000_000))
        if len(sizes) > 100_000:
            sizes.clear()
        sizes[id(msg)] = (msg, size)
        return size

    sim = MeshSim(seed, LAN, size_of=size_of)
    sim.record_events = False
    sim.start_mesh(n)
    sim.run(5_000)
    by_type: dict[str, int] = {}
    sim.net.on_send = lambda src, dst, msg, size: by_type.__setitem__(type(msg).__name__,
                                                                         by_type.get(type(msg).__name__, 0) + size)
    bytes0 = sim.net.stats["bytes"]
    scale = 1 if n <= 32 else 1 + math.ceil(math.log2(n) - 5)
    window_ms = LAN.push_pull_interval_ms * scale       # one full push-pull period
    sim.run(window_ms)
    total = sim.net.stats["bytes"] - bytes0
    per = total / n / (window_ms / 1000)
    return {"bytes_per_node_s": round(per), "window_s": window_ms / 1000,
            "by_type_per_node_s": {k: round(v / n / (window_ms / 1000)) for k, v in sorted(by_type.items())}}


def false_positives(loss: float, seeds: int, minutes: float, n: int = 50) -> dict:
    """Every node is alive throughout: each suspicion and each death is a false positive.

    A suspicion spreads to every observer; an *episode* is one member's suspicions (at
    any observer) less than 10 s apart, counted once."""
    episodes = events = deaths = 0
    for seed in range(seeds):
        sim = MeshSim(seed, LAN, loss=loss)
        sim.start_mesh(n)
        sim.run(int(minutes * 60_000))
        last: dict[str, int] = {}
        for t, _, member, _, new in sim.events:
            if new == SUSPECT:
                events += 1
                if t - last.get(member, -10**9) > 10_000:
                    episodes += 1
                last[member] = t
            elif new == DEAD:
                deaths += 1
    node_hours = seeds * n * minutes / 60
    return {"loss": loss, "nodes": n, "node_hours": node_hours, "suspicion_episodes": episodes,
            "suspect_events": events, "dead_events": deaths,
            "suspicions_per_node_hour": episodes / node_hours, "dead_per_node_hour": deaths / node_hours}


# ---------------------------------------------------------------------------- real

def member_events(log_text: str) -> list[tuple[float, str, str, str]]:
    out = []
    for line in log_text.splitlines():
        if '"event": "member"' in line:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            out.append((d["ts"], d["member"], d["old"], d["new"]))
    return out


def start_mesh(c: Cluster, prefix: str, n: int) -> None:
    """n real nodes on loopback (3 voters, the rest workers), each seeing all n alive."""
    first = c.add(f"{prefix}0")
    for i in range(1, n):
        c.add(f"{prefix}{i}", join=[first.gossip_addr], extra=["--role", "worker"] if i >= 3 else [])
    for name in c.procs:
        c.start(name)
    names = set(c.procs)
    for p in c.procs.values():
        c.wait(lambda p=p: set(c.members_view(p)) == names and set(c.members_view(p).values()) == {"alive"}
               or None, 60, f"{p.name} sees {n} alive")


def real_detection(trials: int, n: int = 10) -> dict:
    times: list[float] = []
    with Cluster() as c:
        start_mesh(c, "r", n)
        for t in range(trials):
            victim = f"r{1 + t % (n - 1)}"            # never the seed, so restarts rejoin through it
            survivors = [p for p in c.procs.values() if p.name != victim]
            t0 = time.time()
            c.kill9(victim)

            def all_dead():
                stamps = []
                for p in survivors:
                    ts = [e[0] for e in member_events(p.log_text()) if e[1] == victim and e[3] == DEAD and e[0] >= t0]
                    if not ts:
                        return None
                    stamps.append(ts[0])
                return max(stamps)

            last = c.wait(all_dead, 30, f"{victim} dead on all survivors", poll_s=0.05)
            times.append(last - t0)
            c.start(victim)
            c.wait(lambda: all(c.members_view(p).get(victim) == "alive" for p in c.procs.values()) or None, 60,
                   f"{victim} back")
    return summary(times)


POLL_GAP_MS = 2        # between one node's polls: fine resolution without starving 10 nodes of CPU


async def _doc_trials(urls: list[str], trials: int, token: str) -> list[float]:
    import aiohttp

    times: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=2),
                                     headers={"Authorization": f"Bearer {token}"}) as http:
        async def serves(url: str, key: str, value: int) -> float:
            while True:
                async with http.get(f"{url}/v1/kv/{key}") as r:
                    if r.status == 200 and (await r.json())["value"] == value:
                        return time.monotonic()
                await asyncio.sleep(POLL_GAP_MS / 1000)

        for t in range(trials):
            key = f"bench/doc-{t}"
            writer = urls[t % len(urls)]
            t0 = time.monotonic()
            pollers = [asyncio.create_task(serves(u, key, t)) for u in urls]
            async with http.put(f"{writer}/v1/kv/{key}", json=t) as r:
                assert r.status == 200, await r.text()
            arrived = await asyncio.wait_for(asyncio.gather(*pollers), 30)
            times.append((max(arrived) - t0) * 1000)
            await asyncio.sleep(0.2)          # let the last rumour rounds die down
    return times


def real_doc_spread(trials: int, n: int = 10) -> dict:
    with Cluster() as c:
        start_mesh(c, "d", n)
        times = asyncio.run(_doc_trials([p.url for p in c.procs.values()], trials, c.admin_token()))
    return {**summary(times), "unit": "ms"}


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--fp-minutes", type=float, default=10.0)
    ap.add_argument("--doc-trials", type=int, default=100)
    ap.add_argument("--only", choices=["docs"], help="run one part and merge it into --out")
    ap.add_argument("--quick", action="store_true", help="small runs, for a smoke test")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gossip.json"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.trials, args.fp_minutes, args.doc_trials = 2, 3, 1.0, 10
    if args.only == "docs":
        with open(args.out) as f:
            out = json.load(f)
        out["real_doc_to_all_10_ms"] = real_doc_spread(args.doc_trials)
        _finish(out, args.out)
        return
    started = time.monotonic()
    out: dict[str, Any] = {"profile": {f.name: getattr(LAN, f.name) for f in dataclasses.fields(LAN)
                                       if f.name in ("probe_interval_ms", "probe_timeout_ms", "indirect_checks",
                                                     "suspicion_mult", "suspicion_max_mult", "retransmit_mult",
                                                     "gossip_interval_ms", "gossip_fanout", "push_pull_interval_ms",
                                                     "awareness_max")}}
    conv = {}
    for n in (10, 100, 1000):
        runs = [convergence(n, seed) for seed in range(args.seeds if n < 1000 else max(1, args.seeds // 2))]
        conv[n] = {"rounds": summary([r["rounds"] for r in runs]), "ms": summary([r["ms"] for r in runs]),
                   "ideal_rounds": math.ceil(math.log2(n))}
        print(f"convergence N={n}: {conv[n]['rounds']['p50']} hops, {conv[n]['ms']['p50']:.0f} ms", flush=True)
    out["convergence"] = conv
    bw = {n: bandwidth(n, 1) for n in (100, 1000)}
    for n, b in bw.items():
        print(f"bandwidth N={n}: {b['bytes_per_node_s']} B/node/s {b['by_type_per_node_s']}", flush=True)
    out["bandwidth"] = bw
    fp = [false_positives(loss, args.seeds, args.fp_minutes) for loss in (0.0, 0.05, 0.10)]
    for f in fp:
        print(f"false positives at {f['loss']:.0%}: {f}", flush=True)
    out["false_positives"] = fp
    det = {n: detection_bound_ms(LAN, n) for n in (10, 100, 1000)}
    out["detection_bound_ms"] = det
    out["suspicion_timeouts_ms"] = {n: suspicion_timeouts(LAN, n) for n in (10, 100, 1000)}
    out["real_kill9_dead_everywhere_s"] = real_detection(args.trials)
    out["real_doc_to_all_10_ms"] = real_doc_spread(args.doc_trials)
    out["wall_s"] = round(time.monotonic() - started, 1)
    _finish(json.loads(json.dumps(out, default=str)), args.out)


def _finish(out: dict, path: str) -> None:
    """Print the table (from JSON-shaped results: keys are strings) and write the file."""
    conv, bw, fp = out["convergence"], out["bandwidth"], out["false_positives"]
    rows = [("metric", "value")]
    for n in ("10", "100", "1000"):
        c = conv[n]
        rows.append((f"update to all, N={n}", f"{c['rounds']['p50']} hops (ideal log2 N = {c['ideal_rounds']}), "
                                              f"{c['ms']['p50'] / 1000:.2f} s sim (p99 {c['ms']['p99'] / 1000:.2f} s)"))
    for n, b in bw.items():
        rows.append((f"bytes/node/s, N={n}", f"{b['bytes_per_node_s']} (over {b['window_s']:.0f} s incl. push-pull)"))
    for f in fp:
        rows.append((f"false positives, {f['loss']:.0%} loss", f"{f['dead_events']} deaths, "
                                                             f"{f['suspicions_per_node_hour']:.2f} suspicions per "
                                                             f"node-hour ({f['node_hours']:.1f} node-h, N=50)"))
    r = out["real_kill9_dead_everywhere_s"]
    rows.append(("kill -9 -> dead on all 9 survivors (real, 10 nodes)",
                 f"p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s, max {r['max']:.2f} s (n={r['n']})"))
    d = out.get("real_doc_to_all_10_ms")
    if d:
        rows.append(("KV PUT -> served by all 10 nodes (real, loopback)",
                     f"p50 {d['p50']:.0f} ms, p99 {d['p99']:.0f} ms, max {d['max']:.0f} ms (n={d['n']}; "
                     "Serf user event: 351 ms p50)"))
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
