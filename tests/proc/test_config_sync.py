"""Cluster-wide settings with real `galaxy up` processes: set once, applied live everywhere.

Three voters and one worker (role worker: no Raft, so its changes are forwarded to the
coordinator over the authenticated internal route).  Checks: a change made on a follower
with the real CLI is applied on every node (status shows the version), live (the HTTP
body limit changes without a restart), survives kill -9 of the coordinator and a restart
of every node; a bad value and a node-local key are refused with the field named; the
worker can set and sees the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from galaxy.client import Client, ClientError
from tests.cluster import REPO, Cluster, http_call

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster():
    with Cluster() as c:
        yield c


def cli(proc, *argv: str, signed_in: bool = True, command: str = "config") -> subprocess.CompletedProcess:
    """`galaxy config ...` as the mesh's admin (GALAXY_API_TOKEN), or as nobody."""
    env = {**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1"}
    env.pop("GALAXY_ADDR", None)
    env.pop("GALAXY_API_TOKEN", None)
    if signed_in:
        env["GALAXY_API_TOKEN"] = proc.token_fn(True)
    return subprocess.run([sys.executable, "-m", "galaxy", *([command] if command else []), *argv, "--addr", proc.url],
                          capture_output=True, text=True, timeout=30, env=env)


def config_everywhere(cluster: Cluster, want: dict, procs=None):
    """(version) once every given node runs a config whose settings include ``want``, all at one version."""
    def cond():
        views = [p.try_get("/v1/status") for p in procs or cluster.running()]
        if not all(v and "config" in v for v in views):
            return None
        versions = {v["config"]["version"] for v in views}
        if len(versions) == 1 and all(all(v["config"]["settings"].get(k) == x for k, x in want.items())
                                      for v in views):
            return versions.pop()
        return None
    return cond


def put_raw(p, path: str, body: bytes) -> int:
    return p.call("PUT", path, data=body, timeout_s=5)[0]


def test_settings_sync_live_across_failover_restart_and_non_voters(cluster):
    a = cluster.add("a")
    for name in ("b", "c"):
        cluster.add(name, join=[a.gossip_addr])
    cluster.add("w", join=[a.gossip_addr], extra=["--role", "worker"])
    for name in ("a", "b", "c", "w"):
        cluster.start(name)
    leader, term = cluster.wait_leader(timeout_s=40)
    cluster.wait(lambda: all((s := p.try_get("/v1/status")) and len(s["voters"]) == 3 and s["members"]["alive"] == 4
                             for p in cluster.running()), 40, "3 voters and 4 alive members everywhere")
    follower = cluster.procs[next(n for n in "abc" if n != leader)]
    worker = cluster.procs["w"]

    # set on a follower, with the real CLI: applied on all four nodes at one version (signed in only)
    refused = cli(follower, "set", "gossip_fanout", "4", signed_in=False)
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr and "galaxy login" in refused.stderr
    out = cli(follower, "set", "gossip_fanout", "4")
    assert out.returncode == 0, out.stderr
    assert "gossip_fanout = 4" in out.stdout and "applied here" in out.stdout
    v1 = cluster.wait(config_everywhere(cluster, {"gossip_fanout": 4}), 15, "gossip_fanout=4 everywhere")
    assert v1 > 0
    got = json.loads(cli(worker, "get", "gossip_fanout", "--json").stdout)
    assert got["value"] == 4 and got["source"] == "cluster" and got["version"] == v1

    # applied live: a smaller HTTP body limit is enforced by every node without a restart
    body = json.dumps("x" * 3000).encode()
    assert all(put_raw(p, "/v1/kv/big", body) == 200 for p in cluster.running())
    assert cli(follower, "set", "http_body_max_bytes", "2048").returncode == 0
    cluster.wait(config_everywhere(cluster, {"http_body_max_bytes": 2048}), 15, "body limit everywhere")
    assert all(put_raw(p, "/v1/kv/big", body) == 413 for p in cluster.running())

    # refused: a bad value (field named), a broken relation (both fields named), a node-local key
    bad = cli(follower, "set", "probe_timeout_ms", "abc")
    assert bad.returncode != 0 and "probe_timeout_ms" in bad.stderr and "invalid_setting" in bad.stderr
    rel = cli(worker, "set", "probe_timeout_ms", "5000")
    assert rel.returncode != 0 and "probe_timeout_ms" in rel.stderr and "probe_interval_ms" in rel.stderr
    local = cli(follower, "set", "http_port", "9000")
    assert local.returncode != 0 and "http_port" in local.stderr and "node-local" in local.stderr
    admin = cluster.admin_token()
    with pytest.raises(ClientError) as err:
        Client(worker.url, token=admin).request("PUT", "/v1/config/data_dir", body={"value": "/tmp/x"})
    assert err.value.status == 400 and err.value.code == "node_local"

    # the worker (no Raft) sets: forwarded to the coordinator, seen everywhere, itself included
    res = Client(worker.url, token=admin).request("PATCH", "/v1/config", body={"set": {"scheduler_policy": "binpack"},
                                                                     "unset": ["http_body_max_bytes"]})
    assert res["ok"] and res["applied_here"] and res["version"] > v1
    assert worker.get("/v1/status")["config"]["commands"]["forwarded"] == 1
    v2 = cluster.wait(config_everywhere(cluster, {"scheduler_policy": "binpack", "gossip_fanout": 4}), 15,
                      "the worker's change everywhere")
    assert all("http_body_max_bytes" not in p.get("/v1/status")["config"]["settings"] for p in cluster.running())
    assert all(put_raw(p, "/v1/kv/big", body) == 200 for p in cluster.running())

    # anonymous_read false: reads need a token on every node at once (probes stay open); true again, live
    assert cli(follower, "set", "anonymous_read", "false").returncode == 0
    cluster.wait(config_everywhere(cluster, {"anonymous_read": False}), 15, "anonymous_read=false everywhere")
    for p in cluster.running():
        for path in ("/v1/status", "/v1/members", "/v1/leader", "/v1/tasks", "/v1/kv", "/metrics", "/v1/config"):
            status, doc = http_call(p.url + path, "GET")
            assert status == 401 and doc["error"] == "unauthorized", (p.name, path, status, doc)
            assert p.call("GET", path)[0] == 200, (p.name, path)
        assert http_call(p.url + "/healthz", "GET")[0] == 200 and http_call(p.url + "/readyz", "GET")[0] == 200
    anonymous = cli(worker, "status", signed_in=False, command="")
    assert anonymous.returncode != 0 and "HTTP 401" in anonymous.stderr, anonymous
    assert cli(worker, "status", command="").returncode == 0
    assert cli(worker, "set", "anonymous_read", "true").returncode == 0
    cluster.wait(lambda: all(http_call(p.url + "/v1/status", "GET")[0] == 200 for p in cluster.running()) or None,
                 15, "anonymous reads open again everywhere")
    v2 = cluster.wait(config_everywhere(cluster, {"anonymous_read": True}), 15, "anonymous_read=true everywhere")

    # kill -9 the coordinator: the settings stay, and the survivors take a new change
    cluster.kill9(leader)
    survivors = cluster.running()
    new_leader, _ = cluster.wait_leader(timeout_s=20, procs=[p for p in survivors if p.name != "w"], exclude=leader,
                                        min_term=term + 1)
    assert cluster.wait(config_everywhere(cluster, {"scheduler_policy": "binpack"}, survivors), 5, "kept") == v2
    res = Client(worker.url, token=admin).request("PUT", "/v1/config/task_default_timeout_s", body={"value": 120})
    assert res["ok"] and res["settings"]["task_default_timeout_s"] == 120.0
    # the killed node comes back and catches up (journal replay + the leader's log + gossip)
    cluster.start(leader)
    v3 = cluster.wait(config_everywhere(cluster, {"task_default_timeout_s": 120.0, "gossip_fanout": 4}), 30,
                      "the restarted node runs the latest version")
    assert v3 > v2

    # restart every node: the voters rebuild the state from their journals
    for p in list(cluster.running()):
        cluster.kill9(p.name)
    for name in ("a", "b", "c", "w"):
        cluster.start(name)
    cluster.wait_leader(timeout_s=40, procs=[cluster.procs[n] for n in "abc"])
    assert cluster.wait(config_everywhere(cluster, {"task_default_timeout_s": 120.0, "gossip_fanout": 4,
                                                    "scheduler_policy": "binpack"}), 30,
                        "the same settings after restarting every node") == v3
    listing = cli(worker, "list")
    assert listing.returncode == 0 and "scheduler_policy" in listing.stdout and f"version {v3}" in listing.stdout
