"""Pure scheduler throughput: placements per second of galaxy.scheduler.plan().

Usage: python benchmarks/scheduler.py [--seeds 5] [--quick] [--out benchmarks/results/scheduler.json]

A seeded synthetic cluster and backlog (mixed machine sizes, some GPUs, zone/arch labels,
trust levels, draining and standby nodes; tasks of 20 owners at 3 priorities with mixed
shapes, some with label or trust constraints).  Demand exceeds capacity, so every run
also exercises failing searches, held nodes and the waiting reasons.  For each size
(nodes x pending) and policy:
* one call: a single plan() over the whole backlog with placements_max = pending;
* rounds: plan() with the default placements_max (1,000), its assignments fed back as
  placed and its holds as held, until a call places nothing: placements / total time,
  and per-call latency (no task ends in between, so this is a burst being absorbed).
Every plan is re-verified with check_plan (outside the timed part).  Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.stats import pct, write_json  # noqa: E402
from galaxy.scheduler import (  # noqa: E402
    PLACEMENTS_MAX, Demand, NodeView, PendingTask, Placed, check_plan, plan,
)

SIZES = ((1_000, 10_000), (100, 1_000))
POLICIES = ("spread", "binpack")


def cluster(rng: random.Random, n_nodes: int, n_tasks: int) -> tuple[list[NodeView], list[PendingTask]]:
    nodes = []
    for i in range(n_nodes):
        cpu = rng.choice((2, 4, 8, 16, 32, 64))
        labels = {"zone": rng.choice("abcd")}
        if rng.random() < 0.3:
            labels["arch"] = "arm"
        nodes.append(NodeView(
            f"n-{i:05d}", float(cpu), cpu * rng.choice((2048, 4096)),
            rng.choice((1, 2, 4, 8)) if rng.random() < 0.2 else 0, labels,
            rng.choice(("low", "low", "medium", "high")), rng.random() < 0.05, rng.random() >= 0.02))
    tasks = []
    for i in range(n_tasks):
        r = rng.random()
        labels = {"zone": rng.choice("abcd")} if r < 0.15 else {"arch": "arm"} if r < 0.2 else {}
        tasks.append(PendingTask(
            f"t-{i:06d}", f"owner-{rng.randrange(20):02d}",
            Demand(rng.choice((0.25, 0.5, 1.0, 2.0, 4.0, 8.0)), rng.choice((128, 256, 512, 1024, 4096)),
                   1 if rng.random() < 0.1 else 0),
            rng.choice((0, 0, 0, 1, 2)), rng.randrange(1_000_000), labels,
            "medium" if rng.random() < 0.1 else "low"))
    return nodes, tasks


def one_call(nodes, tasks, policy: str) -> dict:
    t0 = time.perf_counter()
    p = plan(nodes, [], tasks, term=1, policy=policy, placements_max=len(tasks))
    dt = time.perf_counter() - t0
    check_plan(nodes, [], tasks, p, term=1, placements_max=len(tasks))
    return {"placements": len(p.assignments), "seconds": dt, "per_s": len(p.assignments) / dt}


def rounds(nodes, tasks, policy: str) -> dict:
    placed: list[Placed] = []
    pending = list(tasks)
    by_id = {t.id: t for t in tasks}
    calls_s: list[float] = []
    total = 0
    held: dict[str, str] = {}
    while True:
        t0 = time.perf_counter()
        p = plan(nodes, placed, pending, term=1, policy=policy, held=held)
        dt = time.perf_counter() - t0
        check_plan(nodes, placed, pending, p, term=1)
        held = dict(p.held)
        calls_s.append(dt)
        if not p.assignments:
            break
        total += len(p.assignments)
        done = {a.task_id for a in p.assignments}
        placed += [Placed(a.task_id, by_id[a.task_id].owner, a.node_id, by_id[a.task_id].demand)
                   for a in p.assignments]
        pending = [t for t in pending if t.id not in done]
    return {"placements": total, "calls": len(calls_s), "seconds": sum(calls_s),
            "per_s": total / sum(calls_s), "call_ms_p50": pct(calls_s, 50) * 1000,
            "call_ms_max": max(calls_s) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scheduler.json"))
    args = ap.parse_args()
    seeds = 1 if args.quick else args.seeds
    result: dict = {"placements_max_per_call": PLACEMENTS_MAX, "seeds": seeds, "runs": {},
                    "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    print(f"{'nodes x pending':16} {'policy':8} {'mode':7} {'placed':>7} {'placements/s':>13} "
          f"{'call p50 ms':>11} {'call max ms':>11}")
    for n_nodes, n_tasks in SIZES:
        for policy in POLICIES:
            runs: dict[str, list[dict]] = {"one_call": [], "rounds": []}
            for seed in range(seeds):
                nodes, tasks = cluster(random.Random(seed), n_nodes, n_tasks)
                runs["one_call"].append(one_call(nodes, tasks, policy))
                runs["rounds"].append(rounds(nodes, tasks, policy))
            name = f"{n_nodes}x{n_tasks}/{policy}"
            summary = {}
            for mode, rs in runs.items():
                s = {"placements_median": statistics.median(r["placements"] for r in rs),
                     "per_s_median": statistics.median(r["per_s"] for r in rs),
                     "per_s_min": min(r["per_s"] for r in rs), "raw": rs}
                if mode == "rounds":
                    s["call_ms_p50"] = statistics.median(r["call_ms_p50"] for r in rs)
                    s["call_ms_max"] = max(r["call_ms_max"] for r in rs)
                else:
                    s["call_ms_p50"] = s["call_ms_max"] = statistics.median(r["seconds"] for r in rs) * 1000
                summary[mode] = s
                print(f"{n_nodes:>5} x {n_tasks:<8} {policy:8} {mode:7} {s['placements_median']:>7.0f} "
                      f"{s['per_s_median']:>13,.0f} {s['call_ms_p50']:>11.1f} {s['call_ms_max']:>11.1f}")
            result["runs"][name] = summary
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
