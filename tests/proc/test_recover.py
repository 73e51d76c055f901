"""`galaxy recover` on real processes (loopback): five voters, three lost for good.

Transfers and tasks first; then kill -9 the coordinator and two more voters and never
bring them back.  No coordinator can exist (2 of 5).  The real CLI (`galaxy recover
--yes`) re-forms the group from the two survivors; the mesh has a coordinator again, the
ledger (seq, hash, balances) and the task table on both survivors are what the chosen
survivor had, and a new transfer settles.  Then a lost voter comes back with its old data
dir: it must not disturb the new group; it rejoins as a new spare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from galaxy.consensus import recover as recovery
from tests.cluster import REPO, Cluster

pytestmark = pytest.mark.timeout(300)

ADMIN_PASSWORD = "recover-admin-password"
NAMES = "abcde"


def call(url: str, method: str = "GET", body: dict | None = None, token: str = "") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def ok(url: str, method: str = "GET", body: dict | None = None, token: str = "") -> dict:
    status, doc = call(url, method, body, token)
    assert 200 <= status < 300, (url, status, doc)
    return doc


def state_of(p, token: str, accounts: list[str]) -> dict:
    """What the recovery must keep: ledger (seq, hash), balances, the task table."""
    ledger = ok(p.url + "/v1/status")["ledger"]
    balances = {n: ok(f"{p.url}/v1/accounts/{n}", token=token)["balance"] for n in accounts}
    tasks = ok(p.url + "/v1/tasks?limit=1000", token=token)["tasks"]
    return {"seq": ledger["applied_seq"], "hash": ledger["hash"], "balances": balances,
            "tasks": sorted((t["id"], t["state"]) for t in tasks)}


def test_recover_from_two_of_five_voters() -> None:
    with Cluster(env={"GALAXY_ADMIN_PASSWORD": ADMIN_PASSWORD}) as c:
        procs = []
        for n in NAMES:
            procs.append(c.add(n, join=[procs[0].gossip_addr] if procs else None,
                               extra=["--voters", "5", "--cpu", "1", "--memory", "512M"]))
        for p in procs:
            c.start(p.name)
        c.wait_leader(timeout_s=30)
        c.wait(lambda: all(len((p.try_get("/v1/status") or {}).get("voters", [])) == 5 for p in procs) or None,
               90, "five voters everywhere")
        c.wait(lambda: all((p.try_get("/v1/status") or {}).get("ledger", {}).get("accounts") == 1 for p in procs)
               or None, 60, "the admin account everywhere")
        a = procs[0]
        token = ok(a.url + "/v1/auth/token", "POST", {"name": "admin", "password": ADMIN_PASSWORD})["token"]
        accounts = ["alice", "bob"]
        for n in accounts:
            ok(a.url + "/v1/accounts", "POST", {"name": n, "password": "password-" + n, "role": "user"}, token)
            ok(a.url + "/v1/mint", "POST", {"to": n, "amount": 1000}, token)
        for k in range(5):
            ok(a.url + "/v1/transfers?wait=1", "POST",
               {"from": "alice", "to": "bob", "amount": 10 + k, "idempotency_key": f"pre-{k}"}, token)
        task_ids = [ok(a.url + "/v1/tasks", "POST", {"command": ["true"]}, token)["id"] for _ in range(3)]
        c.wait(lambda: all((ok(a.url + f"/v1/tasks/{t}", token=token)["state"] == "succeeded") for t in task_ids),
               60, "tasks succeeded")
        # each settled success adds 1 to its node's credit (100 by default): all three settled
        c.wait(lambda: sum(m["credit"] for m in ok(a.url + "/v1/members")["members"]) == 100 * len(procs) + 3, 30,
               "the tasks settled in the ledger")
        c.wait(lambda: len({json.dumps(state_of(p, token, accounts), sort_keys=True) for p in procs}) == 1, 30,
               "one ledger and task table everywhere")

        # lose the coordinator and two more voters for good
        leader, term = c.wait_leader(timeout_s=30)
        lost = [leader] + [p.name for p in procs if p.name != leader][:2]
        for name in lost:
            c.kill9(name)
        survivors = [p for p in procs if p.name not in lost]
        c.wait(lambda: all(not ok(p.url + "/v1/recover", token=token)["has_coordinator"] for p in survivors), 60,
               "the survivors see no coordinator")

        facts = [recovery.Facts.from_json(ok(p.url + "/v1/recover", token=token)) for p in survivors]
        chosen_id = recovery.propose(facts).order.chosen
        chosen = next(p for p in survivors if p.name == chosen_id)
        before = state_of(chosen, token, accounts)

        # a mutating call without an admin token is refused
        status, _ = call(chosen.url + "/v1/recover", "POST", {"order": {}})
        assert status == 401

        env = {**os.environ, "PYTHONPATH": REPO, "GALAXY_API_TOKEN": token, "NO_COLOR": "1"}
        out = subprocess.run([sys.executable, "-m", "galaxy", "recover", "--yes", "--addr", survivors[0].url],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "would lose" in out.stdout and chosen_id in out.stdout

        new_leader, new_term = c.wait_leader(timeout_s=30, procs=survivors)
        assert new_leader in {p.name for p in survivors} and new_term > term
        for p in survivors:
            assert state_of(p, token, accounts) == before, p.name
            assert ok(p.url + "/v1/recover", token=token)["epoch"] == 1

        # running it again: a coordinator exists, nothing to recover
        again = subprocess.run([sys.executable, "-m", "galaxy", "recover", "--yes", "--addr", survivors[0].url],
                               capture_output=True, text=True, env=env, timeout=60)
        assert again.returncode != 0 and "nothing to recover" in again.stderr, again.stdout + again.stderr

        # new transfers settle
        t = ok(chosen.url + "/v1/transfers?wait=1", "POST",
               {"from": "bob", "to": "alice", "amount": 7, "idempotency_key": "post-recover"}, token)
        assert t["state"] == "settled", t
        c.wait(lambda: len({json.dumps(ok(p.url + "/v1/status")["ledger"]["hash"]) for p in survivors}) == 1
               and ok(survivors[0].url + "/v1/status")["ledger"]["applied_seq"] == before["seq"] + 1, 30,
               "the new transfer on both survivors")

        # a lost voter comes back with its old state: it cannot disturb the new group and
        # rejoins as a new spare in the new epoch
        back = lost[1]
        c.start(back)
        c.wait(lambda: (ok(c.procs[back].url + "/v1/recover", token=token) if c.procs[back].try_get("/healthz")
                        else {}).get("epoch") == 1, 60, f"{back} in the new epoch")
        everyone = [*survivors, c.procs[back]]
        leader_after, term_after = c.wait_leader(timeout_s=30, procs=everyone)
        assert leader_after == new_leader and term_after == new_term
        c.wait(lambda: back in (ok(chosen.url + "/v1/status").get("voters") or []), 60, f"{back} a voter again")
        c.wait(lambda: ok(c.procs[back].url + "/v1/status")["ledger"]["hash"]
               == ok(chosen.url + "/v1/status")["ledger"]["hash"], 30, f"{back} has the ledger")
