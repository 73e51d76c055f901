"""Join tokens with real `galaxy up` processes: a machine with nothing but a token joins.

A 3-node mesh; a token made with the real CLI on one member; a 4th node started with
only ``--token`` (no key in its environment, none in its data dir) redeems it, stores
the key 0600 and becomes a member (capped to a worker by the token).  The same token
again, an expired one and an altered one are each refused with their reason, counted in
/v1/status ``join`` on the member that refused, and logged; no log shows the key or a
token.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from galaxy import auth, join, wire
from tests.cluster import REPO, Cluster

pytestmark = pytest.mark.timeout(90)


def admin_token(key: str) -> str:
    """A sign-in token of the ledger's admin account (any holder of the key can sign one)."""
    return auth.issue_token(wire.derive_secret(wire.parse_key(key), "tokens"), "admin",
                            int(time.time() * 1000), os.urandom(8))[0]


def post(url: str, body: dict, bearer: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def cli(proc, key: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1", "GALAXY_API_TOKEN": admin_token(key)}
    env.pop("GALAXY_ADDR", None)
    return subprocess.run([sys.executable, "-m", "galaxy", *argv, "--addr", proc.url],
                          capture_output=True, text=True, timeout=30, env=env)


def start_with_token(cluster: Cluster, name: str, token: str) -> object:
    p = cluster.add(name, extra=["--token", token, "--role", "auto"])
    p.env.pop("GALAXY_CLUSTER_KEY")           # nothing but the token
    return cluster.start(name)


def test_join_with_only_a_token(tmp_path):
    with Cluster() as c:
        a = c.add("a")
        for name in ("b", "c"):
            c.add(name, join=[a.gossip_addr])
        for name in ("a", "b", "c"):
            c.start(name)
        c.wait_leader(timeout_s=30)
        # the ledger opens the admin account once there is a coordinator
        c.wait(lambda: post(a.url + "/v1/join/tokens", {"ttl_ms": 60_000}, admin_token(c.key))[0] == 200,
               20, "the admin account exists")

        # without a bearer token, no token is made
        assert post(a.url + "/v1/join/tokens", {})[0] == 401

        made = cli(a, c.key, "token", "create", "--ttl", "2m", "--role", "worker")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        assert token.startswith(join.TOKEN_PREFIX)
        assert len(join.parse(token).seeds) == 3

        d = start_with_token(c, "d", token)
        c.wait(lambda: (d.try_get("/v1/status") or {}).get("members", {}).get("alive") == 4, 40,
               "d joined the mesh with the token")
        assert c.wait(lambda: all((p.try_get("/v1/status") or {}).get("members", {}).get("alive") == 4
                                  for p in (a, d)), 20, "every member sees 4")
        key_path = os.path.join(d.data_dir, "cluster.key")
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.join(d.data_dir, "keyring.json")).st_mode) == 0o600
        with open(key_path) as f:
            assert f.read().strip() == c.key
        assert d.get("/v1/status")["node"]["role"] == "worker"      # capped by the token

        # the same token again: refused as used (a new machine, so it does redeem)
        e = start_with_token(c, "e", token)
        assert e.popen.wait(timeout=30) == 2
        assert "already used" in e.log_text()

        # expired: signed with the real key, expired a moment ago
        key = wire.parse_key(c.key)
        seeds = join.parse(token).seeds
        expired = join.make(key, "galaxy", os.urandom(16), int(time.time() * 1000) - 1000, "worker", seeds)
        f = start_with_token(c, "f", expired)
        assert f.popen.wait(timeout=30) == 2
        assert "expired" in f.log_text()

        # altered: the role raised from worker to coordinator, the signature kept
        good = join.make(key, "galaxy", os.urandom(16), int(time.time() * 1000) + 60_000, "worker", seeds)
        raw = join._unb64(good[len(join.TOKEN_PREFIX):])
        altered = join.TOKEN_PREFIX + join._b64(raw.replace(b"\xa6worker", b"\xabcoordinator", 1))
        assert join.parse(altered).role == "coordinator"
        g = start_with_token(c, "g", altered)
        assert g.popen.wait(timeout=30) == 2
        assert "altered" in g.log_text()
        # a flipped bit in the signature
        h = start_with_token(c, "h", join.TOKEN_PREFIX + join._b64(raw[:-1] + bytes([raw[-1] ^ 1])))
        assert h.popen.wait(timeout=30) == 2
        assert "altered" in h.log_text()

        refused = {}
        for p in (a, c.procs["b"], c.procs["c"]):
            for reason, n in p.get("/v1/status")["join"]["refused"].items():
                refused[reason] = refused.get(reason, 0) + n
        assert refused["used"] >= 1 and refused["expired"] >= 1 and refused["altered"] >= 1, refused
        logs = "".join(p.log_text() for p in c.procs.values())
        assert "join_refused" in logs
        # secrets never in a log: neither the key nor any token
        for secret in (c.key, token, expired, good):
            assert secret not in logs
