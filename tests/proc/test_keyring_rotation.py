"""Keyring rotation on a live 5-node mesh with writes flowing: no flap, no lost write.

Five real nodes on loopback share key K1; a writer PUTs a KV key every 50 ms, round
robin over the nodes.  Meanwhile an operator installs K2, makes it primary and removes
K1, through the HTTP routes of different members.  Checks: every node runs each step
(status ``keyring``); no member ever went suspect or dead in any node's log; every
acknowledged write is on every node; the primary can't be removed and a key that is not
installed can't be used; a 6th node started with only K2 joins; a member restarted
with its old K1 environment keeps the ring it stored (K2) and rejoins.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request

import pytest

from galaxy import keyring, wire
from tests.cluster import Cluster, http_call
from tests.proc.test_join_token import admin_token, post

pytestmark = pytest.mark.timeout(120)
WRITE_INTERVAL_S = 0.05


class Writer(threading.Thread):
    """PUTs a key every WRITE_INTERVAL_S as the admin; a token signed under a key the ring no
    longer holds is refused (401), so it tries the token of the other key then."""

    def __init__(self, procs, keys: list[str]) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.tokens = [admin_token(k) for k in keys]
        self.acked: list[str] = []
        self.failed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            p = self.procs[i % len(self.procs)]
            key = f"w/{i:05d}"
            try:
                for token in list(self.tokens):
                    status, _ = http_call(f"{p.url}/v1/kv/{key}", "PUT", i, token=token, timeout_s=2)
                    if status != 401:
                        break
                    self.tokens.append(self.tokens.pop(0))      # the other key's token first from now on
                if status == 200:
                    self.acked.append(key)
                else:
                    self.failed += 1
            except OSError:
                self.failed += 1
            i += 1
            self.halt.wait(WRITE_INTERVAL_S)


def flowing(c: Cluster, writer: Writer, phase: str, writes: int = 10) -> None:
    """Wait until the writer has had ``writes`` more writes acknowledged (traffic in this phase)."""
    start = len(writer.acked)
    c.wait(lambda: len(writer.acked) >= start + writes or None, 30, f"{writes} writes acknowledged {phase}")


def rings(procs) -> list:
    return [(p.try_get("/v1/status") or {}).get("keyring") for p in procs]


def test_rotation_live(tmp_path):
    with Cluster() as c:
        names = ["a", "b", "c", "d", "e"]
        a = c.add("a")
        for n in names[1:]:
            c.add(n, join=[a.gossip_addr])
        procs = [c.start(n) for n in names]
        c.wait_leader(timeout_s=30)
        bearer = admin_token(c.key)
        c.wait(lambda: post(a.url + "/v1/keyring", {"op": "install", "key": c.key}, bearer)[0] == 200, 20,
               "the admin account exists")
        c.wait(lambda: all(r and r["version"] > 0 for r in rings(procs)), 20, "every node runs the first ring")
        fp1 = wire.key_fingerprint(wire.parse_key(c.key))
        k2 = wire.generate_key()
        fp2 = keyring.fingerprint(k2)

        writer = Writer(procs, [c.key, k2])
        writer.start()
        try:
            flowing(c, writer, "before the rotation")
            # `use` before every node installed it is refused (not installed anywhere yet)
            status, body = post(procs[1].url + "/v1/keyring", {"op": "use", "key": k2}, bearer)
            assert status in (404, 409), body
            assert post(procs[1].url + "/v1/keyring", {"op": "install", "key": k2}, bearer)[0] == 200
            c.wait(lambda: all(r and r["installed"] == [fp1, fp2] for r in rings(procs)), 20, "K2 installed")
            flowing(c, writer, "with both keys installed")
            assert post(procs[2].url + "/v1/keyring", {"op": "use", "key": k2}, bearer)[0] == 200
            c.wait(lambda: all(r and r["primary"] == fp2 for r in rings(procs)), 20, "K2 primary")
            flowing(c, writer, "with K2 primary")
            status, body = post(procs[3].url + "/v1/keyring", {"op": "remove", "key": k2}, bearer)
            assert (status, body.get("error")) == (400, "primary"), body
            assert post(procs[3].url + "/v1/keyring", {"op": "remove", "key": c.key}, bearer)[0] == 200
            c.wait(lambda: all(r and r["installed"] == [fp2] for r in rings(procs)), 20, "K1 removed")
            flowing(c, writer, "after K1 was removed")
        finally:
            writer.halt.set()
            writer.join(timeout=10)

        assert writer.failed == 0, (len(writer.acked), writer.failed)
        want = set(writer.acked)

        def all_writes_everywhere():
            for p in procs:
                items = (p.try_get("/v1/kv?prefix=w/") or {}).get("items")
                if items is None or not want <= {it["key"] for it in items}:
                    return False
            return True
        c.wait(all_writes_everywhere, 20, "every acknowledged write on every node")

        logs = [json.loads(line) for p in procs for line in p.log_text().splitlines() if line.startswith("{")]
        flaps = [r for r in logs if r.get("event") == "member" and r.get("new") in ("suspect", "dead")]
        assert flaps == [], flaps[:3]
        wire_drops = {p.name: p.get("/v1/status")["wire"]["unknown_key"] for p in procs}
        assert all(n == 0 for n in wire_drops.values()), wire_drops
        for secret in (c.key, k2):
            assert all(secret not in p.log_text() for p in procs)

        # a node that only has K2 joins
        f = c.add("f", join=[a.gossip_addr], env={"GALAXY_CLUSTER_KEY": k2})
        c.start("f")
        c.wait(lambda: (f.try_get("/v1/status") or {}).get("members", {}).get("alive") == 6, 30, "f joined with K2")
        # f reaches every member over the node-signed internal route (K2 only) ...
        def listed():
            req = urllib.request.Request(f.url + "/v1/keyring", headers={"Authorization": f"Bearer {admin_token(k2)}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return json.loads(r.read())["members"]
            except urllib.error.HTTPError:
                return None      # 401 until f's ledger view has the admin account
        members = c.wait(listed, 20, "f lists the keyring")
        assert len(members) == 6 and all(v.get("installed") == [fp2] for v in members.values()), members
        # ... and its writes replicate (gossip and anti-entropy frames under K2)
        assert http_call(f.url + "/v1/kv/from-f", "PUT", 1, token=admin_token(k2))[0] == 200
        c.wait(lambda: all(p.try_get("/v1/kv/from-f") for p in procs), 20, "f's write everywhere")

        # a restart with the old key in the environment keeps the stored ring
        c.stop("e")
        c.start("e")
        e = c.procs["e"]
        c.wait(lambda: (e.try_get("/v1/status") or {}).get("members", {}).get("alive") == 6, 30, "e rejoined")
        assert e.get("/v1/status")["keyring"]["installed"] == [fp2]
        assert os.stat(os.path.join(e.data_dir, "keyring.json")).st_mode & 0o077 == 0
