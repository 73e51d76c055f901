"""Overload on three real node processes: batches of 1,000 transfers flood all three nodes,
far past what the mesh settles, from many clients at once.  The nodes must shed the excess
(503 ``overloaded`` with ``Retry-After``, nothing stored) and keep settling the rest without
an election: no term changes while the flood lasts, settled answers keep coming in every
part of it, and afterwards everything accepted (``settled`` or ``pending``) is settled
exactly once, and every node shows the same ledger.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.cluster import Cluster
from tests.proc.test_ledger import call

pytestmark = pytest.mark.timeout(240)

FUNDS = 10**9
ITEMS = 1000                    # per request: the largest batch
SENDERS_PER_NODE = 6            # 18 clients x 1,000 items: about 10x what three nodes admit
FLOOD_S = 18.0
WINDOWS = 6                     # the flood in six parts: each must settle something


def body(sender: int, n: int) -> bytes:
    items = ",".join(f'{{"from":"alice","to":"bob","amount":1,"idempotency_key":"o-{sender}-{n}-{i}"}}'
                     for i in range(ITEMS))
    return f'{{"transfers":[{items}]}}'.encode()


def post(url: str, data: bytes, token: str) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + "/v1/transfers/batch", data=data, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def terms(c: Cluster) -> dict[str, int]:
    return {p.name: p.get("/v1/status", 10)["leader"]["term"] for p in c.running()}


def test_a_flood_of_batches_is_shed_without_an_election_and_what_was_accepted_settles() -> None:
    with Cluster() as c:
        c.start_mesh("abc")
        admin = c.admin_token()
        leader, _ = c.wait_leader(timeout_s=30)
        nodes = list(c.running())
        for name in ("alice", "bob"):
            status, answer, _ = call(nodes[0], "POST", "/v1/accounts", {"name": name, "password": "flood-pw-123"},
                                     admin)
            assert status == 201, answer
        status, answer, _ = call(nodes[0], "POST", "/v1/mint", {"to": "alice", "amount": FUNDS}, admin)
        assert status == 200, answer
        before = terms(c)
        assert len(set(before.values())) == 1, before

        lock = threading.Lock()
        accepted = 0                              # items answered settled or pending (stored)
        settled_at: list[float] = []              # when each settled answer arrived
        shed: list[tuple[int, dict, dict]] = []   # 503 answers
        other: list[str] = []                     # anything else: a failure
        t0 = time.monotonic()
        stop = t0 + FLOOD_S

        def sender(k: int) -> None:
            nonlocal accepted
            url = nodes[k % len(nodes)].url
            n = 0
            while time.monotonic() < stop:
                n += 1
                try:
                    status, answer, headers = post(url, body(k, n), admin)
                except OSError as e:
                    with lock:
                        other.append(f"{type(e).__name__}: {e}")
                    continue
                now = time.monotonic()
                with lock:
                    if status == 202:
                        states = [t["state"] for t in answer["transfers"]]
                        accepted += states.count("settled") + states.count("pending")
                        settled_at.extend([now] * states.count("settled"))
                        other.extend(f"item {s}" for s in set(states) - {"settled", "pending", "refused"})
                    elif status == 503:
                        shed.append((status, answer, headers))
                    else:
                        other.append(f"HTTP {status} {answer}")
                if status == 503:
                    time.sleep(0.05)      # a client backs off a little (Retry-After is whole seconds)

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(SENDERS_PER_NODE * len(nodes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert not other, other[:5]

        # the excess was shed at once, with a time to come back, and nothing of it stored
        assert shed, "the flood never met the admission limit: it was not a flood"
        assert all(a.get("error") == "overloaded" and int(h["Retry-After"]) >= 1 for _, a, h in shed), shed[:3]
        # no election, and the mesh kept settling all along
        assert terms(c) == before, (before, terms(c))
        assert c.wait_leader(timeout_s=5)[0] == leader
        third = FLOOD_S / WINDOWS
        per_window = [sum(1 for t in settled_at if t0 + i * third <= t < t0 + (i + 1) * third) for i in range(WINDOWS)]
        assert all(per_window), f"settled per sixth of the flood: {per_window}"
        print(f"accepted {accepted}, settled per sixth {per_window}, shed {len(shed)} requests")

        # everything accepted settles, exactly once, and every node agrees
        def bob_has_all(p) -> bool | None:
            got = call(p, "GET", "/v1/accounts/bob", token=admin)[1].get("balance")
            return got == accepted or None
        for p in nodes:
            c.wait(lambda: bob_has_all(p), 60, f"bob's balance on {p.name} is every accepted transfer")
        c.wait(lambda: len({(s["ledger"]["applied_seq"], s["ledger"]["hash"], s["ledger"]["pending"]) for s in
                            (p.get("/v1/status") for p in nodes)}) == 1 or None, 30, "every node agrees")
        summary = nodes[0].get("/v1/status")["ledger"]
        assert summary["total_supply"] == FUNDS and summary["pending"] == 0, summary
        assert terms(c) == before
