"""`galaxy status` against a real 3-node loopback mesh: the JSON schema, the tables, clock skew.

One node's wall clock runs ``SKEW_MS`` ahead (a ``sitecustomize`` on its PYTHONPATH shifts
``time.time``/``time.time_ns`` in that process only; its monotonic clock is untouched), so
the other two must warn about it, the skewed one must see them behind, and the in-sync
pair must not warn about each other.  Every node's ``galaxy status --json`` must validate
against docs/status.schema.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jsonschema
import pytest

from tests.cluster import REPO, Cluster

pytestmark = pytest.mark.timeout(180)

SCHEMA_PATH = os.path.join(REPO, "docs", "status.schema.json")
SKEW_MS = 1500
# Loopback delay and a busy event loop only lower the estimate (galaxy/gossip/skew.py); a
# 2-core machine running other tests can stall a loop for tens of milliseconds.
SKEW_SLACK_MS = 150

SKEWED_SITE = textwrap.dedent(f"""
    # test only: this process's wall clock runs {SKEW_MS} ms ahead
    import time
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + {SKEW_MS / 1000!r}
    time.time_ns = lambda: _time_ns() + {SKEW_MS * 1_000_000}
""")


@pytest.fixture(scope="module")
def schema() -> dict:
    with open(SCHEMA_PATH) as f:
        doc = json.load(f)
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


def test_the_schema_rejects_what_it_must(schema):
    """The checker can fail: documents missing or mistyping contract fields are refused."""
    good = {
        "node": {"id": "a", "role": "auto", "version": "0.1.0", "http": "http://127.0.0.1:8000", "cluster": "galaxy",
                 "addr": "127.0.0.1:7946", "key_fingerprint": "ab12", "wall_ms": 1, "uptime_s": 0.5},
        "leader": {"leader": None, "term": 0, "http": None}, "voters": [],
        "members": {"alive": 1, "suspect": 0, "dead": 0, "left": 0},
        "tasks": {s: 0 for s in ("pending", "scheduled", "running", "succeeded", "failed", "timed_out", "cancelled")},
        "scheduler": {"submitted": 0, "scheduled": 0, "started": 0, "finished": 0, "lost": 0, "refenced": 0,
                      "fenced_out": 0, "stale_killed": 0, "waiting": 0, "draining": []},
        "ledger": {"applied_seq": 0, "hash": "", "total_supply": 0, "pending": 0}, "conflicts_resolved": 0,
        "docs": {"kv_keys": 0, "rumours_pending": 0, "repairs": 0}, "anti_entropy_repairs": 0,
        "leader_history": [], "raft": {"running": False, "member": False, "raft_addr": "127.0.0.1:7947",
                                       "commit_index": 0, "leader_changes": 0, "fsyncs": 0},
        "wire": {"ok": 0, "unauthenticated": 0, "replayed": 0, "stale": 0}, "warnings": [],
    }
    v = jsonschema.Draft202012Validator(schema)
    assert not list(v.iter_errors(good))
    bad = [
        ({**good, "tasks": {"pending": 0}}, "running"),
        ({**good, "leader": {"leader": 7, "term": 0, "http": None}}, "leader"),
        ({**good, "members": {**good["members"], "alive": -1}}, "-1"),
        ({**good, "warnings": [""]}, "warnings"),
        ({k: v for k, v in good.items() if k != "scheduler"}, "scheduler"),
        ({**good, "node": {**good["node"], "role": "boss"}}, "boss"),
    ]
    for doc, what in bad:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(doc)]
        assert errors and any(what in e for e in errors), (what, errors)


def test_status_schema_tables_and_clock_skew_on_a_real_mesh(schema, tmp_path):
    site = tmp_path / "skewed-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SKEWED_SITE)
    with Cluster() as cluster:
        a = cluster.add("a")
        cluster.add("b", join=[a.gossip_addr])
        cluster.add("c", join=[a.gossip_addr],
                    env={"PYTHONPATH": str(site) + os.pathsep + cluster.env["PYTHONPATH"]})
        for name in "abc":
            cluster.start(name)
        leader, _ = cluster.wait_leader(timeout_s=30)
        cluster.wait(lambda: all((s := p.try_get("/v1/status")) and s["members"]["alive"] == 3
                                 and len(s["voters"]) == 3 for p in cluster.running()),
                     30, "3 voters and 3 alive members on every node")

        env = {**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1", "COLUMNS": "200"}
        env.pop("GALAXY_ADDR", None)

        def cli(name: str, *args: str) -> subprocess.CompletedProcess:
            r = subprocess.run([sys.executable, "-m", "galaxy", *args, "--addr", cluster.procs[name].url],
                               capture_output=True, text=True, env=env, timeout=30)
            assert r.returncode == 0, r.stderr
            return r

        # clock skew: estimated from the frames peers send anyway, within a few gossip rounds
        def skews(name: str) -> dict[str, int | None]:
            return {m["id"]: m["clock_skew_ms"] for m in cluster.procs[name].get("/v1/members")["members"]}

        def sees(name: str, want: dict[str, int]) -> dict | None:
            got = skews(name)
            ok = all(got.get(k) is not None and want[k] - SKEW_SLACK_MS <= got[k] <= want[k] + 5 for k in want)
            return got if ok else None

        cluster.wait(lambda: sees("a", {"a": 0, "b": 0, "c": SKEW_MS}), 15, "a to see c's clock ahead", poll_s=0.2)
        cluster.wait(lambda: sees("b", {"a": 0, "c": SKEW_MS}), 15, "b to see c's clock ahead", poll_s=0.2)
        cluster.wait(lambda: sees("c", {"a": -SKEW_MS, "b": -SKEW_MS}), 15, "c to see the others behind",
                     poll_s=0.2)

        # a task nobody can run keeps the coordinator's scheduler waiting
        big = cluster.procs["a"].get("/v1/status")  # for the count of tasks before
        assert sum(big["tasks"].values()) == 0
        status, body = cluster.procs["b"].call("POST", "/v1/tasks", {"command": ["true"], "resources": {"cpu": 1000}})
        assert status == 202, body
        task_id = body["id"]
        cluster.wait(lambda: cluster.procs[leader].get("/v1/status")["scheduler"]["waiting"] == 1, 15,
                     "the coordinator to report the task as waiting")

        for name in "abc":
            doc = json.loads(cli(name, "status", "--json").stdout)
            errors = [f"{list(e.absolute_path)}: {e.message}"
                      for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
            assert not errors, f"{name}: {errors}"
            assert doc["node"]["id"] == name and doc["tasks"]["pending"] == 1
            warned = [w for w in doc["warnings"] if w.startswith("clock of")]
            if name == "c":
                assert sorted(w.split()[2] for w in warned) == ["a", "b"]
                assert all(" s behind" in w for w in warned), warned
            else:
                assert len(warned) == 1 and warned[0].startswith("clock of c is 1.") and " s ahead" in warned[0]

        text = cli(leader, "status").stdout
        assert "1 pending" in text and "1 waiting to be placed" in text, text
        assert "clock of" in text
        assert "0 succeeded" not in text, "only the states that have tasks are listed"
        assert cluster.procs["b"].call("POST", f"/v1/tasks/{task_id}/cancel")[0] == 202
