"""Listing tasks: one page of ``GET /v1/tasks`` on a node that knows many tasks.

Usage: python benchmarks/listing.py [--tasks 100000] [--calls 20] [--out benchmarks/results/listing.json]

A real single-node task service (real replica, store and executor; the unit tests' SoloNode)
is given ``--tasks`` task documents, 98 % of them ended, 2 % pending, 10 % of them owned by
bob, as a busy mesh holds a week of them.  For each filter, one page of 100 as the
dashboard (once a second) and ``galaxy tasks`` ask: ``TaskService.list`` against, in the
same run, the way it listed before ``galaxy/tasks/order.py``: filter every stored task on
its stored value, sort them all, then parse the page.  The two must return the same ids.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.stats import write_json  # noqa: E402
from galaxy.tasks import core as tc  # noqa: E402
from tests.unit.test_tasks_api import SoloNode  # noqa: E402

T0 = 1_700_000_000_000


def sort_everything(svc, *, state: str = "", owner: str = "", node: str = "", limit: int = 100,
                    after: str = "") -> list[str]:
    """The listing before the kept order: every stored task filtered and sorted per page."""
    rows = []
    for doc in svc.replica.items(tc.TASK_TYPE):
        v = doc.value
        if (state and svc._order.state(doc.key) != state) or (owner and v["owner"] != owner) or (
                node and v["node"] != node and not any(a["node"] == node for a in v["attempts"])):
            continue
        rows.append((-v["submitted_ms"], doc.key))
    rows.sort()
    keys = [k for _, k in rows]
    if after:
        keys = keys[keys.index(after) + 1:] if after in keys else []
    return [t.id for t in (svc.get(k) for k in keys[:limit]) if t is not None]


async def build(n: int) -> SoloNode:
    node = SoloNode(tempfile.mkdtemp(prefix="galaxy-bench-listing-"))
    svc = node.tasks
    spec, _ = tc.parse_spec({"command": ["true"]})
    for i in range(n):
        t = tc.new_task(f"t-{i:016x}", spec, "bob" if i % 10 == 0 else "alice", "n-solo", T0 + i)
        if i % 50:
            t = tc.schedule(t, "n-solo", 1, t.submitted_ms + 1)
            t = tc.finish(tc.start(t, "n-solo", 1, t.submitted_ms + 2), "n-solo", 1, tc.SUCCEEDED, 0, "",
                          t.submitted_ms + 3)
        svc.replica.put(t.submitted_ms, tc.TASK_TYPE, t.id, t.to_value())
        svc._index(t.id)
    return node


def timed_ms(fn, calls: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(calls):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "listing.json"))
    args = ap.parse_args()
    t = time.perf_counter()
    node = asyncio.run(build(args.tasks))
    print(f"{args.tasks:,} tasks indexed in {time.perf_counter() - t:.1f} s")
    try:
        rows = measure(node.tasks, args)
    finally:
        node.store.close()
        shutil.rmtree(node.cfg.data_dir, ignore_errors=True)
    write_json(args.out, {"tasks": args.tasks, "calls": args.calls, "rows": rows})
    return 0


def measure(svc, args: argparse.Namespace) -> list[dict]:
    cases = {"newest": {}, "state=pending": {"state": "pending"}, "state=succeeded": {"state": "succeeded"},
             "owner=bob (10 %)": {"owner": "bob"}, "owner=nobody": {"owner": "nobody"},
             "node=n-x (none)": {"node": "n-x"}, "after the middle": {"after": f"t-{args.tasks // 2:016x}"}}
    rows = []
    print(f"{'page of 100':<20} {'list() ms':>10} {'sort all ms':>12} {'x faster':>9}")
    for name, kw in cases.items():
        ms, page = timed_ms(lambda: [x.id for x in svc.list(**kw)], args.calls)
        base_ms, base = timed_ms(lambda: sort_everything(svc, **kw), max(3, args.calls // 4))
        assert page == base, (name, page[:3], base[:3])
        rows.append({"case": name, "list_ms": round(ms, 3), "sort_all_ms": round(base_ms, 3), "n": len(page)})
        print(f"{name:<20} {ms:>10.2f} {base_ms:>12.2f} {base_ms / max(ms, 1e-3):>8.0f}x")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
