"""Executor cost per attempt against a bare Popen, in the same run.

Usage: python benchmarks/executor.py [--tasks 1000] [--inflight 4] [--rounds 3]
                                     [--root DIR] [--out benchmarks/results/executor.json]

Each row starts ``--tasks`` attempts of ``true`` with ``--inflight`` of them in flight, on
uvloop (the node's loop), and reports attempts per second and the parent's CPU per attempt
(``getrusage(RUSAGE_SELF)``: user + system, all threads; steadier than the rate on a shared
machine).  Rows:

* ``raw Popen``: ``subprocess.Popen(["true"], stdout=PIPE, stderr=PIPE,
  start_new_session=True, close_fds=True, env=..., cwd=...)`` + ``communicate()`` on
  ``--inflight`` threads: what spawning alone costs this process;
* ``executor``: ``Executor.start(ExecSpec(argv=("true",))).wait()``, no output;
* ``executor mem=512``: the same with ``memory_mb=512`` (``prlimit`` and a peak-size check after the exec);
* ``executor output``: ``sh -c 'echo hi; echo err >&2; echo x > out/r'``: both log files,
  an ``out/`` archive and a work dir that cannot be reused;
* ``executor timeout``: ``true`` with ``timeout_ms`` set (one timer armed and cancelled).

Every row runs ``--rounds`` times; the table shows the median (and the range of CPU ms).
The root defaults to a fresh directory under the system temp dir (the filesystem matters:
a ``mkdir`` costs ~30 us of CPU on ext4 here).  Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import uvloop  # noqa: E402

from benchmarks.stats import write_json  # noqa: E402
from galaxy.clock import SystemClock  # noqa: E402
from galaxy.executor import ExecSpec, Executor  # noqa: E402


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raw_popen(n: int, inflight: int, cwd: str) -> tuple[float, float]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def worker(k: int) -> None:
        for _ in range(k):
            p = subprocess.Popen(["true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True, close_fds=True, env=env, cwd=cwd)
            p.communicate()

    threads = [threading.Thread(target=worker, args=(n // inflight,)) for _ in range(inflight)]
    c0, t0 = _cpu_s(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
    done = n // inflight * inflight
    return done / dt, cpu * 1000 / done


def executor_run(n: int, inflight: int, root: str, make_spec) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        ex = Executor(root, clock=SystemClock())
        sem = asyncio.Semaphore(inflight)

        async def one(i: int) -> None:
            async with sem:
                r = await ex.start(make_spec(i)).wait()
                if r.state != "succeeded":
                    raise RuntimeError(f"attempt {i}: {r}")
        try:
            for i in range(8):                 # warm up: slots, guardian, imports
                await one(n + i)
            c0, t0 = _cpu_s(), time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
        finally:
            await ex.close()
        return n / dt, cpu * 1000 / n
    return uvloop.run(main())


ROWS = {
    "executor": lambda run, i: ExecSpec(f"{run}-{i}", 1, argv=("true",)),
    "executor mem=512": lambda run, i: ExecSpec(f"{run}-{i}", 1, argv=("true",), memory_mb=512),
    "executor output": lambda run, i: ExecSpec(
        f"{run}-{i}", 1, shell="echo hi; echo err >&2; echo x > out/r"),
    "executor timeout": lambda run, i: ExecSpec(f"{run}-{i}", 1, argv=("true",), timeout_ms=60_000),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", default="", help="parent of the executor roots (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "executor.json"))
    args = ap.parse_args()
    if args.tasks < args.inflight or args.inflight < 1 or args.rounds < 1:
        ap.error("need --tasks >= --inflight >= 1 and --rounds >= 1")
    base = tempfile.mkdtemp(prefix="galaxy-exbench-", dir=args.root or None)
    raw: dict[str, list[tuple[float, float]]] = {k: [] for k in ("raw Popen", *ROWS)}
    try:
        for rnd in range(args.rounds):
            raw["raw Popen"].append(raw_popen(args.tasks, args.inflight, base))
            for name, make in ROWS.items():
                root = os.path.join(base, f"r{rnd}-{name.replace(' ', '-').replace('=', '')}")
                run = f"r{rnd}"
                raw[name].append(executor_run(args.tasks, args.inflight, root,
                                              lambda i, make=make, run=run: make(run, i)))
                shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = {}
    print(f"{args.tasks} attempts of `true`, {args.inflight} in flight, uvloop, "
          f"{args.rounds} rounds (median; CPU = this process, all threads)")
    print(f"{'row':20s} {'attempts/s':>11s} {'CPU ms/attempt':>15s} {'CPU range':>15s}")
    for name, runs in raw.items():
        rates, cpus = [r for r, _ in runs], [c for _, c in runs]
        rows[name] = {"per_s_median": statistics.median(rates),
                      "cpu_ms_per_attempt_median": statistics.median(cpus),
                      "cpu_ms_per_attempt_min": min(cpus), "cpu_ms_per_attempt_max": max(cpus),
                      "raw": [{"per_s": r, "cpu_ms_per_attempt": c} for r, c in runs]}
        print(f"{name:20s} {statistics.median(rates):11.0f} {statistics.median(cpus):15.3f} "
              f"{min(cpus):7.3f}-{max(cpus):.3f}")
    write_json(args.out, {"tasks": args.tasks, "inflight": args.inflight, "rounds": args.rounds,
                          "load_avg_1m": os.getloadavg()[0], "rows": rows})


if __name__ == "__main__":
    main()
