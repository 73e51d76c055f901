"""`galaxy recover` on five hosts (network namespaces): three voters lost for good.

Five nodes, all voters (``--voters 5``).  Ledger transfers and tasks; then kill -9 the
coordinator and two more voters, for good.  The two survivors cannot elect (2 of 5): no
coordinator.  The real CLI, run on a survivor's host, re-forms the group from them.
Then: a coordinator again, in a higher term; on both survivors the ledger's (seq, hash),
the balances and the task table are exactly what the chosen survivor had before; and a
new transfer settles.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from galaxy.consensus import recover as recovery
from tests.cluster import REPO, Cluster
from tests.netns.test_ledger_netns import get, post

pytestmark = [pytest.mark.netns, pytest.mark.timeout(400)]

HOSTS = 5
ADMIN_PASSWORD = "recover-admin-password"
ACCOUNTS = ["alice", "bob", "carol"]


def state_of(lab, i: int, p, token: str) -> dict:
    ledger = get(lab, i, p, "/v1/status", token)["ledger"]
    balances = {n: get(lab, i, p, f"/v1/accounts/{n}", token)["balance"] for n in ACCOUNTS}
    tasks = get(lab, i, p, "/v1/tasks?limit=1000", token)["tasks"]
    return {"seq": ledger["applied_seq"], "hash": ledger["hash"], "balances": balances,
            "tasks": sorted((t["id"], t["state"]) for t in tasks)}


def test_recover_after_losing_three_of_five_voters(netlab) -> None:
    lab = netlab(HOSTS)
    with Cluster(env={"GALAXY_ADMIN_PASSWORD": ADMIN_PASSWORD}) as c:
        seed = f"{lab.host_ip(1)}:7946"
        procs = {i: c.add_in_lab(lab, i, f"h{i}", join=[] if i == 1 else [seed],
                                 extra=["--voters", "5", "--cpu", "1", "--memory", "512M"]) for i in lab.hosts}
        host_of = {p.name: i for i, p in procs.items()}
        for p in procs.values():
            c.start(p.name)
        c.wait_leader(timeout_s=60)
        c.wait(lambda: all(len((p.try_get("/v1/status") or {}).get("voters", [])) == HOSTS for p in c.running())
               or None, 90, "five voters everywhere")
        c.wait(lambda: all((p.try_get("/v1/status") or {}).get("ledger", {}).get("accounts") == 1
                           for p in c.running()) or None, 60, "the admin account everywhere")
        token = post(lab, 1, procs[1], "/v1/auth/token", {"name": "admin", "password": ADMIN_PASSWORD})["token"]
        for n in ACCOUNTS:
            post(lab, 1, procs[1], "/v1/accounts", {"name": n, "password": "password-" + n, "role": "user"}, token)
            post(lab, 1, procs[1], "/v1/mint", {"to": n, "amount": 1000}, token)
        for k in range(12):
            src, dst = ACCOUNTS[k % 3], ACCOUNTS[(k + 1) % 3]
            i = 1 + k % HOSTS
            t = post(lab, i, procs[i], "/v1/transfers?wait=1",
                     {"from": src, "to": dst, "amount": 5 + k, "idempotency_key": f"pre-{k}"}, token)
            assert t["state"] == "settled", t
        tasks = [post(lab, i, procs[i], "/v1/tasks", {"command": ["true"]}, token)["id"] for i in (1, 2, 3)]
        c.wait(lambda: all(get(lab, 1, procs[1], f"/v1/tasks/{t}", token)["state"] == "succeeded" for t in tasks),
               60, "the tasks succeeded")
        # each settled success adds 1 to its node's credit (100 by default): all settled
        c.wait(lambda: sum(m["credit"] for m in get(lab, 1, procs[1], "/v1/members", token)["members"])
               == 100 * HOSTS + len(tasks), 60, "the tasks settled in the ledger")
        c.wait(lambda: len({json.dumps(state_of(lab, i, p, token), sort_keys=True) for i, p in procs.items()}) == 1,
               60, "one ledger and one task table everywhere", poll_s=0.5)

        # lose the coordinator and two more voters, for good
        leader, term = c.wait_leader(timeout_s=30)
        lost = [leader] + [p.name for p in procs.values() if p.name != leader][:2]
        for name in lost:
            c.kill9(name)
        survivors = [p for p in procs.values() if p.name not in lost]

        def facts(p) -> recovery.Facts:
            return recovery.Facts.from_json(get(lab, host_of[p.name], p, "/v1/recover", token))
        c.wait(lambda: not any(facts(p).has_coordinator for p in survivors), 60, "no coordinator", poll_s=0.5)
        assert all((p.try_get("/v1/leader", timeout_s=5) or {}).get("leader") in (None, *lost) for p in survivors)

        chosen_id = recovery.propose([facts(p) for p in survivors]).order.chosen
        chosen = c.procs[chosen_id]
        before = state_of(lab, host_of[chosen_id], chosen, token)

        # the real CLI, on a survivor's host, pointed at the other survivor
        runner, target = host_of[survivors[0].name], survivors[1]
        env = {**os.environ, "PYTHONPATH": REPO, "GALAXY_API_TOKEN": token, "NO_COLOR": "1"}
        out = lab.run(runner, [sys.executable, "-m", "galaxy", "recover", "--yes", "--addr", target.url],
                      capture_output=True, text=True, env=env, timeout=150, cwd=REPO)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{chosen_id} (proposed)" in out.stdout, out.stdout

        new_leader, new_term = c.wait_leader(timeout_s=60, procs=survivors)
        assert new_leader in {p.name for p in survivors} and new_term > term
        for p in survivors:
            assert state_of(lab, host_of[p.name], p, token) == before, p.name

        t = post(lab, host_of[chosen_id], chosen, "/v1/transfers?wait=1",
                 {"from": "alice", "to": "carol", "amount": 3, "idempotency_key": "after-recover"}, token)
        assert t["state"] == "settled", t

        def ledgers() -> set:
            return {(s["applied_seq"], s["hash"]) for s in
                    (get(lab, host_of[p.name], p, "/v1/status", token)["ledger"] for p in survivors)}
        c.wait(lambda: len(got := ledgers()) == 1 and next(iter(got))[0] == before["seq"] + 1, 30,
               "the new transfer on both survivors", poll_s=0.5)
