"""Whole nodes on several real hosts (network namespaces on one bridge), default ports, no seeds.

Discovery by mDNS only, then by UDP broadcast only: each alone forms one mesh with one
coordinator.  A host with another cluster key never joins.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from galaxy import wire
from galaxy.config import Config
from tests.cluster import Cluster

pytestmark = pytest.mark.netns



def lab_node(cluster: Cluster, lab, i: int, name: str, extra: list[str], env: dict | None = None):
    # LAN discovery needs the LAN bootstrap window (mDNS probing alone takes ~1.2 s)
    env = {"GALAXY_BOOTSTRAP_WINDOW_MS": str(Config.lan().bootstrap_window_ms), **(env or {})}
    return cluster.add_in_lab(lab, i, name, discovery=True, extra=["--cpu", "2", "--memory", "1G", *extra],
                              env=env)


def form_mesh(netlab, extra: list[str]) -> None:
    lab = netlab(3)
    with Cluster() as cluster:
        for i in lab.hosts:
            lab_node(cluster, lab, i, f"h{i}", extra)
        for name in cluster.procs:
            cluster.start(name)
        leader, term = cluster.wait_leader(timeout_s=60)
        for p in cluster.running():
            cluster.wait(lambda p=p: set(cluster.members_view(p).values()) == {"alive"} and
                         len(cluster.members_view(p)) == 3 or None, 30, f"{p.name} sees 3 alive members")
        members = cluster.procs["h1"].get("/v1/members")["members"]
        assert {m["addr"] for m in members} == {f"{lab.host_ip(i)}:7946" for i in lab.hosts}
        assert all(m["resources"]["cpu"] == 2 and m["resources"]["memory_mb"] == 1024 for m in members)
        cluster.wait(lambda: all(len((p.try_get("/v1/status") or {}).get("voters", [])) == 3
                                 for p in cluster.running()) or None, 60, "3 voters")
        assert cluster.agreed_leader() is not None


def test_three_hosts_form_one_mesh_by_mdns_only(netlab):
    form_mesh(netlab, ["--no-broadcast"])


def test_three_hosts_form_one_mesh_by_broadcast_only(netlab):
    form_mesh(netlab, ["--no-mdns"])


def test_host_with_another_key_never_joins(netlab):
    lab = netlab(4)
    with Cluster() as cluster:
        for i in (1, 2, 3):
            lab_node(cluster, lab, i, f"h{i}", [])
        lab_node(cluster, lab, 4, "stranger", [], env={"GALAXY_CLUSTER_KEY": wire.generate_key()})
        for name in cluster.procs:
            cluster.start(name)
        members = [cluster.procs[f"h{i}"] for i in (1, 2, 3)]
        cluster.wait_leader(timeout_s=60, procs=members)
        stranger = cluster.procs["stranger"]
        # the stranger hears the others' beacons and cannot read them
        cluster.wait(lambda: (stranger.try_get("/v1/status") or {}).get("wire", {}).get("unknown_key", 0) >= 3
                     or None, 30, "foreign frames dropped and counted")
        for p in members:
            assert "stranger" not in cluster.members_view(p)
        assert set(cluster.members_view(stranger)) == {"stranger"}
        cluster.wait(lambda: (stranger.try_get("/v1/leader") or {}).get("leader") == "stranger" or None, 30,
                     "the stranger, alone, founds its own group")


def test_lab_processes_are_reaped(netlab):
    lab = netlab(1)
    p = lab.popen(1, [sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL)
    lab.close()
    assert p.poll() is not None
