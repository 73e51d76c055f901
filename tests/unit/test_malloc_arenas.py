"""A node's address space stays small however many threads it has run (cap_malloc_arenas).

Under ``ulimit -v`` (1 GiB on some CI machines) glibc's per-thread arenas, 64 MB of
address space each, were enough to make a process fail with MemoryError."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import sys, threading
if sys.argv[1] == "capped":
    from galaxy.node import cap_malloc_arenas
    cap_malloc_arenas()
barrier = threading.Barrier(9)
def work():
    keep = [bytes(1 << 16) for _ in range(4)]    # malloc'd (too big for pymalloc)
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
barrier.wait()                                   # all 8 alive and allocating at once
for line in open("/proc/self/status"):
    if line.startswith("VmPeak:"):
        print(int(line.split()[1]) >> 10)        # MB
for t in threads:
    t.join()
"""


def _peak_mb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=60, check=True, env=env).stdout
    return int(out)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's arenas")
def test_threads_do_not_each_reserve_an_arena() -> None:
    capped, free = _peak_mb("capped"), _peak_mb("uncapped")
    # Uncapped, 8 concurrent allocating threads get ~8 arenas (64 MB each) on 2+ cores
    # (glibc allows 8 per core): the cap must save most of that.
    assert free - capped > 300, (capped, free)
