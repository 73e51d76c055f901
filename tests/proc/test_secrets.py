"""Secrets stay secret and data stays private (issue 7), on real node processes.

* A mesh is run through typical operations (tasks with logs, KV, cluster settings, a node
  with the wrong key knocking, forged and real bearer tokens, bad requests); then every
  log any node wrote and every status/members/metrics/config body the test fetched is
  searched for the cluster key (its ``gk1-`` text and its raw, hex and base64 forms), the
  secrets derived from it, the admin password and every bearer token the test made.
* Every file and directory under each node's data dir is owner-only (0600/0700).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.error
import urllib.request

import pytest

from galaxy import auth, wire
from tests.cluster import Cluster
from tests.proc.test_hostile import ADMIN_PASSWORD, _request, start_mesh

pytestmark = pytest.mark.timeout(180)


def _forms(secret: bytes) -> list[bytes]:
    b64 = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return [secret, secret.hex().encode(), b64, b64.rstrip(b"="), url, url.rstrip(b"=")]


def _get(p, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(p.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(p, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(p.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def ran():
    """A mesh run through typical operations; yields (cluster, bodies, secrets)."""
    with Cluster() as c:
        start_mesh(c)
        a, b, cc = (c.procs[n] for n in "abc")
        key = wire.parse_key(c.key)
        bodies: list[bytes] = []
        tokens = [auth.issue_token(wire.derive_secret(key, "tokens"), "admin", int(1e12), b"12345678")[0],
                  auth.issue_token(wire.derive_secret(key, "tokens"), "nobody", 1, b"abcdefgh")[0]]
        admin = c.admin_token()
        # a task that runs and writes logs, on each node
        for p in (a, b, cc):
            st, body = _post(p, "/v1/tasks", json.dumps({"command": ["sh", "-c", "echo out; echo err >&2"],
                                                         "max_retries": 0}).encode(),
                             {"Authorization": f"Bearer {admin}"})
            assert st == 202, body
            bodies.append(body)
            task_id = json.loads(body)["id"]
            c.wait(lambda: json.loads(_get(p, f"/v1/tasks/{task_id}")[1])["state"] == "succeeded", 30,
                   f"task {task_id} done")
            bodies.append(_get(p, f"/v1/tasks/{task_id}/logs")[1])
        assert _request(a, "PUT", "/v1/kv/app/x", b'{"v": 1}') == 200
        assert _request(b, "PUT", "/v1/config/scheduler_policy", b'{"value": "binpack"}') == 200
        # bad requests, forged and real tokens, a bad key in an error
        for t in [*tokens, "gt1.forged.token", c.key]:
            for p in (a, b):
                bodies.append(_post(p, "/v1/internal/commands", b"{}", {"Authorization": f"Bearer {t}"})[1])
                bodies.append(_post(p, "/v1/tasks", json.dumps({"command": ["true"], "env": {"K": t[:60]},
                                                                "owner": t}).encode(),
                                    {"Authorization": f"Bearer {t}"})[1])
                bodies.append(_get(p, "/v1/status", {"Authorization": f"Bearer {t}"})[1])
        assert _request(a, "PUT", "/v1/config/http_body_max_bytes", json.dumps({"value": c.key}).encode()) == 400
        # a node with the wrong key knocks on the mesh
        wrong = c.add("w", join=[a.gossip_addr], env={"GALAXY_CLUSTER_KEY": wire.generate_key()})
        c.start("w")
        c.wait(lambda: (w := wrong.try_get("/v1/status")) and w, 20, "the wrong-key node serving")
        c.wait(lambda: ((a.try_get("/v1/status") or {}).get("wire") or {}).get("unknown_key", 0) > 0, 20,
               "the wrong-key node's frames refused")
        for p in (a, b, cc, wrong):
            for path in ("/v1/status", "/v1/members", "/metrics", "/v1/config", "/v1/leader", "/v1/tasks",
                         "/", "/v1/kv"):
                bodies.append(_get(p, path)[1])
        secrets = {"cluster key text": [c.key.encode(), c.key[len(wire.KEY_PREFIX):].encode()],
                   "cluster key": _forms(key),
                   "admin password": [ADMIN_PASSWORD.encode()]}
        for purpose in ("wire", "tokens", "raft", "http-internal"):
            secrets[f"secret derived for {purpose}"] = _forms(wire.derive_secret(key, purpose))
        for i, t in enumerate([*tokens, admin]):
            secrets[f"bearer token {i}"] = [t.encode(), t.split(".")[2].encode()]
        c.stop("w")
        for n in "abc":
            c.stop(n)
        yield c, bodies, secrets


def _files(root: str) -> list[str]:
    out = [root]
    for d, dirs, files in os.walk(root):
        out += [os.path.join(d, x) for x in dirs + files]
    return out


def test_no_secret_in_any_log_or_response(ran):
    c, bodies, secrets = ran
    haystacks = {f"response {i}": body for i, body in enumerate(bodies)}
    for p in c.procs.values():
        haystacks[f"{p.name}'s log"] = p.log_text().encode()
        for path in _files(p.data_dir):       # logs a node keeps in its data dir (task logs, ...)
            if os.path.isfile(path) and (path.endswith(".log") or "/logs/" in path or path.endswith(("stdout", "stderr"))):
                with open(path, "rb") as f:
                    haystacks[path] = f.read()
    assert len(haystacks) > 40
    found = [f"{what} in {where}" for where, hay in haystacks.items() for what, forms in secrets.items()
             if any(form in hay for form in forms)]
    assert not found, "\n".join(found)


def test_every_file_a_node_creates_is_owner_only(ran):
    c, _, _ = ran
    loose = []
    checked = 0
    for p in c.procs.values():
        for path in _files(p.data_dir):
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            checked += 1
            if st.st_mode & 0o077:
                loose.append(f"{oct(st.st_mode & 0o777)} {os.path.relpath(path, c.root)}")
    assert checked > 20
    assert not loose, "not owner-only:\n" + "\n".join(loose)
