"""Microbenchmark: the CPU ``Store.put_docs`` costs per replicated document version.

Every node persists every version of every replicated document (task documents mostly)
through ``Store.put_docs``, on the docs runner's writer thread, with the rows of one loop
turn.  This script builds realistic task versions (three per task, as a task goes
pending -> scheduled -> running, each written by another node so the last vector clock has
three entries), interleaves them as tasks overlap in a busy mesh, and commits them in
batches of 5, 10 and 30 rows, a key's new version replacing the one stored before, as the
mesh does.  It reports the writer thread's CPU
(``time.thread_time``: user + system, so the fsync's kernel work counts) per row.

To compare with another version of ``galaxy/store.py`` in the same run (the machine is
noisy, so implementations alternate round by round), pass ``--baseline REV``: the file is
read with ``git show REV:galaxy/store.py`` and loaded as a separate module.

    python benchmarks/store_docs.py [--tasks 1000] [--in-flight 100] [--stored 5000]
                                    [--rounds 5] [--baseline main] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.stats import write_json  # noqa: E402
from galaxy import store as current_store  # noqa: E402
from galaxy.gossip.replica import Replica, to_wire  # noqa: E402
from galaxy.tasks import core as tc  # noqa: E402

BATCHES = (5, 10, 30)
NOW = 1_764_000_000_000


def task_versions(n: int, seed: int = 1) -> list[list[Any]]:
    """Three ``DocWire`` phases of ``n`` tasks: accepted at a, scheduled by c, started at b.

    Task ids are random, as ``galaxy/tasks/runner.py`` makes them, so that a batch's rows
    land on as many B-tree pages as they do in a node."""
    rnd = random.Random(seed)
    spec = tc.TaskSpec(argv=("python", "-c", "print(1)"), shell="", env={"A": "1"}, cpu=1.0,
                       memory_mb=256, gpu=0, timeout_s=3600.0, max_retries=1, priority=0,
                       labels={"pool": "x"}, min_trust=0, price=0, input="", name="")
    a, b, c = Replica("n-0a1b2c3d"), Replica("n-4e5f6071"), Replica("n-8293a4b5")
    phases: list[list[Any]] = [[], [], []]
    for i in range(n):
        now = NOW + i
        t = tc.new_task(f"t-{rnd.getrandbits(64):016x}", spec, "admin", a.node_id, now)
        d1 = a.put(now, "task", t.id, t.to_value())
        c.merge(now, [d1])
        t = tc.schedule(t, b.node_id, 3, now + 1)
        d2 = c.put(now + 1, "task", t.id, t.to_value())
        b.merge(now + 1, [d2])
        t = tc.start(t, b.node_id, 1, now + 2)
        d3 = b.put(now + 2, "task", t.id, t.to_value())
        for phase, d in zip(phases, (d1, d2, d3)):
            phase.append(to_wire(d))
    return phases


def task_stream(n: int, in_flight: int, seed: int = 1) -> list[Any]:
    """The versions of ``n`` tasks in the order a node commits them: task ``i`` is accepted at
    time ``i``, scheduled within ``in_flight/3`` and started within ``in_flight`` after that,
    so about ``in_flight`` tasks are between states at any time."""
    rnd = random.Random(seed)
    events = []
    for i, versions in enumerate(zip(*task_versions(n, seed))):
        t1 = i + rnd.uniform(0, in_flight / 3)
        for at, v in zip((i, t1, t1 + rnd.uniform(0, in_flight)), versions):
            events.append((at, v.vclock.__len__(), v))
    events.sort(key=lambda e: e[:2])
    return [e[2] for e in events]


def load_store_module(rev: str) -> ModuleType:
    """``galaxy/store.py`` as of git revision ``rev``, as its own module."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "-C", repo, "show", f"{rev}:galaxy/store.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"store_{rev}", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up
    exec(compile(src, f"{rev}:galaxy/store.py", "exec"), mod.__dict__)
    return mod


def run_once(mod: ModuleType, stored: list[Any], stream: list[Any], batch: int) -> tuple[float, float]:
    """Commit ``stream`` in batches of ``batch`` rows into a new store holding ``stored``
    already; (cpu, wall) us/row."""
    root = tempfile.mkdtemp(prefix="store-bench-")
    try:
        s = mod.Store(os.path.join(root, "node"))
        try:
            for i in range(0, len(stored), 500):
                s.put_docs(stored[i:i + 500])
            cpu = wall = 0.0
            rows = 0
            for i in range(0, len(stream), batch):
                # A key's newer version replaces its older one in the runner's batch.
                chunk = list({(v.doc_type, v.key): v for v in stream[i:i + batch]}.values())
                w0, c0 = time.perf_counter(), time.thread_time()
                s.put_docs(chunk)
                cpu += time.thread_time() - c0
                wall += time.perf_counter() - w0
                rows += len(chunk)
            assert len(s.load_docs()) == len(stored) + len(stream) // 3
        finally:
            s.close()
    finally:
        shutil.rmtree(root)
    return cpu / rows * 1e6, wall / rows * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000, help="tasks per run (3 versions each)")
    ap.add_argument("--in-flight", type=int, default=100, help="tasks between states at a time")
    ap.add_argument("--stored", type=int, default=5000, help="tasks already in the store")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    ap.add_argument("--baseline", metavar="REV", help="also measure galaxy/store.py as of this git revision")
    ap.add_argument("--out", default="benchmarks/results/store_docs.json")
    args = ap.parse_args()
    stream = task_stream(args.tasks, args.in_flight)
    stored = task_versions(args.stored, seed=2)[2]
    impls: dict[str, ModuleType] = {}
    if args.baseline:
        impls[args.baseline] = load_store_module(args.baseline)
    impls["worktree"] = current_store
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for batch in BATCHES:
            for name, mod in impls.items():
                results.setdefault((name, batch), []).append(run_once(mod, stored, stream, batch))
    print(f"put_docs, {args.tasks} tasks x 3 versions ({args.in_flight} in flight) into a store of "
          f"{args.stored}, median of {args.rounds} rounds (min in brackets)")
    print(f"{'store.py':<12} {'batch':>5} {'cpu us/row':>16} {'wall us/row':>16}")
    for (name, batch), xs in results.items():
        cpu = [x[0] for x in xs]
        wall = [x[1] for x in xs]
        print(f"{name:<12} {batch:>5} {statistics.median(cpu):>9.1f} [{min(cpu):>4.1f}]"
              f" {statistics.median(wall):>9.1f} [{min(wall):>4.1f}]")
    write_json(args.out, {"tasks": args.tasks, "in_flight": args.in_flight, "stored": args.stored,
                          "rounds": args.rounds, "us_per_row": [
                              {"store": name, "batch": batch, "cpu": [x[0] for x in xs], "wall": [x[1] for x in xs]}
                              for (name, batch), xs in results.items()]})


if __name__ == "__main__":
    main()
