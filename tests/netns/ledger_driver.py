"""Transfer driver for the ledger chaos test: runs on one lab host, talks to one node.

``python -m tests.netns.ledger_driver URL TOKEN SEED COUNT ACCOUNTS OUT``: sends COUNT
transfers between ACCOUNTS accounts (acct00..) from THREADS threads, each with a fresh
idempotency key; one in ten is sent twice.  Every answer (or failure to get one) is a
JSON line in OUT: {"key", "from", "to", "amount", "status", "state"}.  Connection
errors are recorded as status 0: the node was cut off or down; such a transfer may or
may not have been stored (it was never acknowledged).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import urllib.error
import urllib.request

THREADS = 8


def send(url: str, token: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/transfers", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (OSError, ValueError) as e:
        return 0, {"error": type(e).__name__}


def main() -> None:
    url, token, seed, count, accounts, out = sys.argv[1:7]
    rng = random.Random(int(seed))
    names = [f"acct{i:02d}" for i in range(int(accounts))]
    plan = []
    for n in range(int(count)):
        src, dst = rng.sample(names, 2)
        body = {"from": src, "to": dst, "amount": rng.randint(1, 120), "idempotency_key": f"{seed}-{n}"}
        plan.append(body)
        if rng.random() < 0.1:
            plan.append(body)                      # a client retry: must not move money twice
    lock = threading.Lock()
    lines: list[str] = []

    def worker(k: int) -> None:
        for body in plan[k::THREADS]:
            status, answer = send(url, token, body)
            with lock:
                lines.append(json.dumps({"key": body["idempotency_key"], "from": body["from"], "to": body["to"],
                                         "amount": body["amount"], "status": status,
                                         "state": answer.get("state"), "id": answer.get("id")}))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
