"""`galaxy doctor`'s address-space and isolation checks (the others: tests/proc/test_doctor.py)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from galaxy import doctor

PROBE = """
import json, resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))       # lowering needs no privilege
from galaxy.doctor import check_address_space
c = check_address_space()
print(json.dumps([c.status, c.detail, c.fix]))
"""


def test_a_hard_address_space_cap_is_a_warning_that_names_it_and_the_fix() -> None:
    cap = 900 << 20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY and hard < cap:
        pytest.skip("this process is capped below the probe's cap already")
    out = subprocess.run([sys.executable, "-c", PROBE, str(cap)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    status, detail, fix = json.loads(out)
    assert status == "warn" and "capped at 900 MiB" in detail and "ulimit -v" in detail
    assert "--memory 900M or less" in fix and "LimitAS=infinity" in fix


def test_no_cap_is_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    inf = resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda what: (inf, inf))
    c = doctor.check_address_space()
    assert c.status == "ok" and "no ulimit -v" in c.detail


def test_isolation_says_what_this_machine_gives_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    from galaxy.executor import cgroup
    def ours() -> set[str]:
        return {f"{d}/{n}" for d in filter(None, (cgroup.own_dir(), cgroup.own_dir("memory")))
                for n in os.listdir(d) if n.startswith("galaxy-")}
    before = ours()
    real = doctor.check_isolation()
    assert real.name == "task isolation" and real.status in ("ok", "warn")
    assert ours() <= before          # the probes' cgroups were removed again
    monkeypatch.setattr(cgroup, "own_dir", lambda controller="": None)   # a machine without cgroups
    c = doctor.check_isolation()
    assert c.status == "warn" and "cleared environment can outlive it" in c.detail
    assert "memory limits are RLIMIT_AS" in c.detail and "Delegate=yes" in c.fix
