"""The ledger over HTTP and the CLI on three real node processes: sign-in, accounts, mint,
transfers that settle once and show the same balances (and ledger hash) on every node, and
every refusal the issue names with its status — wrong password, forged, expired and revoked
tokens, a user moving someone else's money or minting, and rate-limited sign-in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Any

import pytest

from galaxy import auth, wire
from tests.cluster import REPO, Cluster

ALICE_PW = "alice-pw-1234"
BOB_PW = "bob-pw-56789"


def call(p, method: str, path: str, body: Any = None, token: str | None = None,
         timeout_s: float = 15.0) -> tuple[int, dict, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(p.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers


def login(p, name: str, password: str) -> str:
    status, body, _ = call(p, "POST", "/v1/auth/token", {"name": name, "password": password})
    assert status == 200, body
    return body["token"]


@pytest.fixture(scope="module")
def mesh():
    with Cluster() as c:
        c.env.pop("GALAXY_ADMIN_PASSWORD")       # this test reads the random one the first node prints
        first = None
        for n in "abc":
            # node c signs in slowly, so the rate limit shows within a few attempts
            env = {"GALAXY_LOGIN_BURST": "2", "GALAXY_LOGIN_RATE_PER_MIN": "1"} if n == "c" else None
            p = c.add(n, join=[first.gossip_addr] if first else None, env=env)
            first = first or p
        for n in "abc":
            c.start(n)
        c.wait_leader(timeout_s=30)
        c.wait(lambda: all(len(c.members_view(p)) == 3 for p in c.running()) or None, 20, "3 members everywhere")
        printed = c.wait(lambda: next((m.group(1) for p in c.running() for m in
                                       [re.search(r"admin account's password is (\S+)", p.log_text())] if m), None),
                         30, "the admin password printed once")
        a, b, _ = (c.procs[n] for n in "abc")
        admin = c.wait(lambda: call(a, "POST", "/v1/auth/token", {"name": "admin", "password": printed})[1]
                       .get("token"), 20, "admin can sign in")
        for name, pw in (("alice", ALICE_PW), ("bob", BOB_PW)):
            status, body, _ = call(a, "POST", "/v1/accounts", {"name": name, "password": pw}, admin)
            assert status == 201, body
        status, body, _ = call(b, "POST", "/v1/mint", {"to": "alice", "amount": 100}, admin)
        assert status == 200 and body["balance"] == 100, body
        yield c, admin


def balances_everywhere(c: Cluster, admin: str) -> list[dict]:
    return [{n: call(p, "GET", f"/v1/accounts/{n}", token=admin)[1].get("balance") for n in ("alice", "bob")}
            for p in c.running()]


def test_transfers_settle_once_and_every_node_agrees(mesh) -> None:
    c, admin = mesh
    a, b, cc = (c.procs[n] for n in "abc")
    alice = c.wait(lambda: call(b, "POST", "/v1/auth/token", {"name": "alice", "password": ALICE_PW})[1]
                   .get("token"), 20, "alice can sign in on b (her account reached b)")
    t = {"from": "alice", "to": "bob", "amount": 30, "idempotency_key": "pay-bob-once"}
    status, first, _ = call(cc, "POST", "/v1/transfers?wait=1", t, alice)
    assert status == 202 and first["state"] == "settled", first
    for p in (a, b, cc, a):          # the same key, anywhere, any number of times: one movement
        status, again, _ = call(p, "POST", "/v1/transfers?wait=1", t, alice)
        assert status == 202 and again["id"] == first["id"] and again["state"] == "settled", again
    want = {"alice": 70, "bob": 30}
    c.wait(lambda: all(v == want for v in balances_everywhere(c, admin)) or None, 20, "the same balances everywhere")
    c.wait(lambda: len({json.dumps(p.get("/v1/status")["ledger"], sort_keys=True) for p in c.running()}) == 1
           or None, 20, "the same ledger summary (seq, hash, supply) everywhere")
    ledger = a.get("/v1/status")["ledger"]
    assert ledger["total_supply"] == 100
    status, state, _ = call(b, "GET", f"/v1/transfers/{first['id']}", token=alice)
    assert status == 200 and state["state"] == "settled"
    status, body, _ = call(a, "POST", "/v1/transfers?wait=1", {**t, "amount": 1000, "idempotency_key": "too-much"},
                           alice)
    assert status == 202 and body["state"] == "rejected" and body.get("reason"), body
    status, body, _ = call(a, "GET", "/v1/accounts/alice/history?limit=5", token=alice)
    assert status == 200 and [h["amount"] for h in body["history"]][:2] == [-30, 100], body


def test_refusals_have_the_right_status(mesh) -> None:
    c, admin = mesh
    a, b, cc = (c.procs[n] for n in "abc")
    bob = c.wait(lambda: call(a, "POST", "/v1/auth/token", {"name": "bob", "password": BOB_PW})[1].get("token"),
                 20, "bob can sign in")
    status, body, _ = call(a, "POST", "/v1/auth/token", {"name": "bob", "password": "not-bobs-password"})
    assert (status, body["message"]) == (401, "wrong name or password")
    status, body, _ = call(a, "POST", "/v1/transfers", {"from": "alice", "to": "bob", "amount": 1,
                                                       "idempotency_key": "steal"}, bob)
    assert status == 403, body
    status, body, _ = call(b, "POST", "/v1/mint", {"to": "bob", "amount": 1_000}, bob)
    assert status == 403 and "admin" in body["message"], body
    status, body, _ = call(b, "POST", "/v1/accounts", {"name": "mallory", "password": "mallory-pw-1"}, bob)
    assert status == 403, body

    secret = wire.derive_secret(wire.parse_key(c.key), "tokens")
    now_ms = int(__import__("time").time() * 1000)
    head, payload, _ = bob.split(".")
    forged = {
        "bad signature": f"{head}.{payload}.{auth._b64(b'0' * 32)}",
        "another cluster": auth.issue_token(b"x" * 32, "admin", now_ms, b"n")[0],
        "expired": auth.issue_token(secret, "bob", now_ms - auth.TOKEN_TTL_MS - 1000, b"n")[0],
    }
    for what, token in forged.items():
        for p in (a, cc):
            status, body, headers = call(p, "GET", "/v1/accounts/bob", token=token)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (what, body)
    assert call(a, "GET", "/v1/accounts/bob")[0] == 401

    # revoking from one node: bob's tokens stop working on every node
    assert call(cc, "GET", "/v1/accounts/bob", token=bob)[0] == 200
    status, body, _ = call(b, "POST", "/v1/auth/revoke", {}, bob)
    assert status == 200, body
    c.wait(lambda: all(call(p, "GET", "/v1/accounts/bob", token=bob)[0] == 401 for p in c.running()) or None,
           20, "the revoked token refused everywhere")
    assert call(b, "GET", "/v1/accounts/bob", token=login(b, "bob", BOB_PW))[0] == 200


def test_sign_in_is_rate_limited(mesh) -> None:
    c, _ = mesh
    cc = c.procs["c"]
    codes = [call(cc, "POST", "/v1/auth/token", {"name": "alice", "password": "guess-guess"}) for _ in range(3)]
    assert [s for s, _, _ in codes] == [401, 401, 429], codes
    assert int(codes[2][2]["Retry-After"]) >= 1
    # the right password is refused too while the bucket is empty: guessing cannot go faster
    assert call(cc, "POST", "/v1/auth/token", {"name": "alice", "password": ALICE_PW})[0] == 429


def test_the_cli_signs_in_and_every_command_sends_the_token(mesh) -> None:
    c, _ = mesh
    b = c.procs["b"]
    with tempfile.TemporaryDirectory() as cfg_home:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GALAXY_")},
               "PYTHONPATH": REPO, "GALAXY_ADDR": b.url, "XDG_CONFIG_HOME": cfg_home, "NO_COLOR": "1"}

        def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "galaxy", *args], input=stdin, capture_output=True,
                                  text=True, env=env, timeout=60)

        r = cli("login", "alice", "--password-stdin", stdin=ALICE_PW + "\n")
        assert r.returncode == 0 and "as alice (user)" in r.stdout, r.stderr
        assert ALICE_PW not in r.stdout + r.stderr
        token_file = os.path.join(cfg_home, "galaxy", "token.json")
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        r = cli("balance", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["name"] == "alice", r.stderr
        r = cli("transfer", "alice", "bob", "1", "--wait")
        assert r.returncode == 0 and "settled" in r.stdout and "idempotency key" in r.stderr, r.stderr
        r = cli("mint", "alice", "5")
        assert r.returncode == 1 and "HTTP 403" in r.stderr
        r = cli("logout", "--all")
        assert r.returncode == 0, r.stderr
        r = cli("balance", "alice")
        assert r.returncode == 1 and "HTTP 401" in r.stderr
