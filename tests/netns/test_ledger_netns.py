"""The ledger under faults, on five hosts (network namespaces).

1,000 transfers among 20 accounts are sent at every node at once (a driver per host,
talking to its own node) while the coordinator is killed (-9) twice and two hosts are cut
off for a while.  After heal: total supply unchanged, no negative balance, each
idempotency key applied at most once (every balance equals what the settled transfers
say it should be), nothing pending, and the same (applied_seq, hash) on every node.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.cluster import REPO, Cluster, Proc

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

HOSTS = 5
ACCOUNTS = 20
START_BALANCE = 1000
PER_HOST = 200
ADMIN_PASSWORD = "chaos-admin-password"

_POST = ("import sys, json, urllib.request, urllib.error\n"
         "h = {'Content-Type': 'application/json'}\n"
         "if sys.argv[3]: h['Authorization'] = 'Bearer ' + sys.argv[3]\n"
         "r = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='POST', headers=h)\n"
         "try:\n    print(urllib.request.urlopen(r, timeout=20).read().decode())\n"
         "except urllib.error.HTTPError as e:\n    print(e.read().decode()); sys.exit(3)\n")
_GET = ("import sys, urllib.request\n"
        "r = urllib.request.Request(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
        "print(urllib.request.urlopen(r, timeout=20).read().decode())\n")


def post(lab, i: int, p: Proc, path: str, body: dict, token: str = "") -> dict:
    out = lab.run(i, [sys.executable, "-c", _POST, p.url + path, json.dumps(body), token], timeout=40)
    assert out.returncode == 0, (path, out.stdout, out.stderr)
    return json.loads(out.stdout)


def get(lab, i: int, p: Proc, path: str, token: str) -> dict:
    out = lab.run(i, [sys.executable, "-c", _GET, p.url + path, token], timeout=40)
    assert out.returncode == 0, (path, out.stdout, out.stderr)
    return json.loads(out.stdout)


def test_transfers_survive_coordinator_kills_and_a_partition(netlab, tmp_path) -> None:
    lab = netlab(HOSTS)
    with Cluster(env={"GALAXY_ADMIN_PASSWORD": ADMIN_PASSWORD}) as c:
        seed = f"{lab.host_ip(1)}:7946"
        procs = {i: c.add_in_lab(lab, i, f"h{i}", join=[] if i == 1 else [seed],
                                 extra=["--cpu", "1", "--memory", "512M"]) for i in lab.hosts}
        for p in procs.values():
            c.start(p.name)
        c.wait_leader(timeout_s=60)
        c.wait(lambda: all(len((p.try_get("/v1/status") or {}).get("voters", [])) == 3 for p in c.running())
               or None, 60, "three voters")
        c.wait(lambda: all((p.try_get("/v1/status") or {}).get("ledger", {}).get("accounts") == 1
                           for p in c.running()) or None, 60, "the admin account everywhere")
        token = post(lab, 1, procs[1], "/v1/auth/token", {"name": "admin", "password": ADMIN_PASSWORD})["token"]
        names = [f"acct{i:02d}" for i in range(ACCOUNTS)]
        for n in names:
            post(lab, 1, procs[1], "/v1/accounts", {"name": n, "password": "password-" + n, "role": "user"}, token)
            post(lab, 1, procs[1], "/v1/mint", {"to": n, "amount": START_BALANCE}, token)
        supply = ACCOUNTS * START_BALANCE

        outdir = str(tmp_path)        # the drivers' answers (each host's process writes its own file)
        drivers = [lab.popen(i, [sys.executable, "-m", "tests.netns.ledger_driver", procs[i].url, token, str(i),
                                 str(PER_HOST), str(ACCOUNTS), os.path.join(outdir, f"h{i}.jsonl")],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
                   for i in lab.hosts]

        # faults while the drivers run: two coordinator kills, and two hosts cut off meanwhile
        leader, _ = c.wait_leader(timeout_s=30)
        c.kill9(leader)
        c.wait_leader(timeout_s=60, procs=[p for p in procs.values() if p.name != leader], exclude=leader)
        c.start(leader)
        minority = [4, 5]
        for i in minority:
            lab.cut(i)
        majority = [p for i, p in procs.items() if i not in minority]
        leader2, _ = c.wait_leader(timeout_s=60, procs=majority)
        c.kill9(leader2)
        c.wait_leader(timeout_s=60, procs=[p for p in majority if p.name != leader2], exclude=leader2)
        c.start(leader2)
        c.wait_leader(timeout_s=60, procs=majority)
        for i in minority:
            lab.heal(i)
        for d in drivers:
            d.wait(timeout=300)

        answers = []
        for i in lab.hosts:
            with open(os.path.join(outdir, f"h{i}.jsonl")) as f:
                answers += [json.loads(line) for line in f if line.strip()]
        acked = {(a["from"], a["key"]) for a in answers if a["status"] == 202}
        assert len(acked) >= PER_HOST * 2, f"only {len(acked)} of {len(answers)} transfers were acknowledged"

        def settled_everywhere():
            views = {}
            for p in c.running():
                st = (p.try_get("/v1/status", timeout_s=5) or {}).get("ledger", {})
                views[p.name] = (st.get("applied_seq"), st.get("hash"), st.get("pending"))
            one = set(views.values())
            return len(views) == HOSTS and len(one) == 1 and next(iter(one))[2] == 0 and views
        c.wait(settled_everywhere, 180, "one ledger (seq, hash) everywhere, nothing pending", poll_s=1.0)

        # every transfer that was stored has an outcome (acknowledged ones must have been
        # stored); balances are exactly what the settled ones say, so no key moved money twice
        expected = dict.fromkeys(names, START_BALANCE)
        settled_docs: dict[str, list] = {}
        firsts = {}
        for a in answers:
            firsts.setdefault((a["from"], a["key"]), a)
        for key, a in sorted(firsts.items()):
            tx_id = f"tx:{a['from']}:{a['key']}"
            out = lab.run(1, [sys.executable, "-c", _GET, f"{procs[1].url}/v1/transfers/{tx_id}", token], timeout=40)
            if out.returncode != 0:
                assert key not in acked, f"acknowledged transfer {tx_id} is unknown: {out.stdout} {out.stderr}"
                continue
            t = json.loads(out.stdout)
            assert t["state"] in ("settled", "rejected"), t
            if t["state"] == "settled":
                expected[a["from"]] -= a["amount"]
                expected[a["to"]] += a["amount"]
                for who in (a["from"], a["to"]):
                    settled_docs.setdefault(who, []).append(t)
        total = 0
        for n in names:
            acct = get(lab, 1, procs[1], f"/v1/accounts/{n}", token)
            if acct["balance"] + acct["held"] != expected[n]:
                history = get(lab, 1, procs[1], f"/v1/accounts/{n}/history?limit=1000", token)
                assert False, (n, acct, expected[n], settled_docs.get(n), history)
            assert acct["balance"] >= 0
            total += acct["balance"] + acct["held"]
        assert total == supply == procs[1].get("/v1/status")["ledger"]["total_supply"]
