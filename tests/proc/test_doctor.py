"""`galaxy doctor` names what is broken, and passes on a healthy mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.cluster import REPO, Cluster, free_ports


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "galaxy", "doctor", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1", **(env or {})}, timeout=60)


def test_doctor_names_a_taken_port_and_an_unusable_key(tmp_path):
    http, gossip, raft = free_ports(3)
    key = tmp_path / "cluster.key"
    key.write_text("not-a-key\n")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", http))
        squatter.listen()
        r = doctor("--data-dir", str(tmp_path / "data"), "--bind", "127.0.0.1", "--http-port", str(http),
                   "--gossip-port", str(gossip), "--raft-port", str(raft), "--cluster-key-file", str(key),
                   "--no-mdns")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"http port: 127.0.0.1:{http} is taken" in r.stdout
    assert "fix: stop what uses it" in r.stdout
    assert "cluster key: cannot use the key from" in r.stdout and "galaxy keygen" in r.stdout
    assert "gossip port" in r.stdout and "fail  gossip" not in r.stdout


def test_doctor_passes_on_a_running_mesh_and_sees_peers():
    with Cluster() as cluster:
        a = cluster.add("a")
        cluster.add("b", join=[a.gossip_addr])
        cluster.start("a")
        cluster.start("b")
        cluster.wait_leader(timeout_s=30)
        cluster.wait(lambda: len(cluster.members_view(a)) == 2 or None, 15, "a sees b")
        r = doctor(*a.args, "--json", env=a.env)
        out = json.loads(r.stdout)
        assert r.returncode == 0, out
        by_name = {c["name"]: c for c in out["checks"]}
        assert by_name["http port"]["status"] == "ok" and "listens" in by_name["http port"]["detail"]
        assert by_name["peer b"]["status"] == "ok"
        assert by_name["clock skew b"]["status"] == "ok"
        assert by_name["cluster key"]["status"] == "ok"
