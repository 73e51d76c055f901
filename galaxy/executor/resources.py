"""Resource probe: what this machine has and how busy it is, for membership gossip.

Theory of operation
-------------------
``probe()`` reads psutil (cpu count and percent, load average, memory) and, when an
``nvidia-smi`` binary is on PATH, the GPU list (parsed by the pure
``core.parse_nvidia_smi``).  It is synchronous: without GPUs it takes well under a
millisecond; with ``nvidia-smi`` it may take tens to hundreds of milliseconds, so a
runner that calls it periodically should use ``asyncio.to_thread(probe)``.

``cpu_percent`` is psutil's system-wide figure *since the previous call* in this process
(the first call reports 0.0): probing at a steady interval therefore yields the average
over that interval, which is what a scheduler wants, not a spike.

Invariants: every number is finite and non-negative; ``gpu`` == ``len(gpus)``; a failing
``nvidia-smi`` (missing, hung past ``gpu_timeout_s``, garbage) means zero GPUs, never an
exception.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess

import psutil

from galaxy.executor.core import parse_nvidia_smi

GPU_QUERY = "index,name,memory.total,memory.used,utilization.gpu"
GPU_TIMEOUT_S = 5.0          # nvidia-smi can stall on a wedged driver; zero GPUs beats a hang


def probe_gpus(timeout_s: float = GPU_TIMEOUT_S) -> list[dict[str, object]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def task_memory_max_mb() -> int:
    """The largest memory limit a task can be given on this machine, in MiB; 0 when there is
    no cap.  A task's limit is ``RLIMIT_AS``, which no process can raise above the node's own
    hard limit (``ulimit -v``, systemd ``LimitAS=``): a task asking for more could never start
    here, so the scheduler must not send it (gossiped as ``Resources.task_memory_max_mb``)."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return 0 if hard == resource.RLIM_INFINITY else max(1, hard >> 20)


def probe(*, gpus: bool = True) -> dict[str, object]:
    vm = psutil.virtual_memory()
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:
        load1 = load5 = load15 = 0.0
    gpu_list = probe_gpus() if gpus else []
    return {
        "cpu_count": psutil.cpu_count(logical=True) or 1,
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "memory_total_mb": vm.total // (1024 * 1024),
        "memory_available_mb": vm.available // (1024 * 1024),
        "gpu": len(gpu_list),
        "gpus": gpu_list,
    }
