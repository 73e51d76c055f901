"""HTTPS on real node processes: an all-TLS mesh (``--tls auto``) and a mixed one.

The CLI runs as a subprocess with its own config dir, so its pins (known_nodes.json) are
the test's.  Node-to-node calls (logs forwarding, the internal command route, input
archives) cross between nodes and must pin the certificate each peer gossips.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from galaxy import join, tls
from tests.cluster import REPO, Cluster

pytestmark = pytest.mark.timeout(300)
TLS = ["--tls", "auto"]


def galaxy(cfg_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1", "XDG_CONFIG_HOME": str(cfg_home)}
    for var in ("GALAXY_ADDR", "GALAXY_TLS_FINGERPRINT", "GALAXY_CACERT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "galaxy", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def cli(cfg_home: Path, addr: str, *args: str) -> subprocess.CompletedProcess:
    return galaxy(cfg_home, *args, "--addr", addr)


def submit(cfg_home: Path, p, *args: str) -> str:
    out = galaxy(cfg_home, "submit", "--addr", p.url, "--json", "--cpu", "0.2", "--memory", "64M", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["id"]


def wait_done(c: Cluster, p, task_id: str) -> dict:
    return c.wait(lambda: (t := p.try_get(f"/v1/tasks/{task_id}", 2.0)) and t["state"] in (
        "succeeded", "failed", "timed_out", "cancelled") and t, 60, f"task {task_id} to end")


def cert_fp(p) -> str:
    der = x509.load_pem_x509_certificate(Path(p.data_dir, tls.CERT_FILE).read_bytes()).public_bytes(
        serialization.Encoding.DER)
    return tls.fingerprint_text(tls.cert_fingerprint(der))


def logs_everywhere(c: Cluster, cfg_home: Path, task_id: str, want: str) -> None:
    for p in c.running():         # where it did not run, the node forwards the request to where it did
        out = cli(cfg_home, p.url, "logs", task_id)
        assert out.returncode == 0 and out.stdout == want, (p.name, out.stdout, out.stderr)


def test_an_all_tls_mesh_works_and_the_cli_pins_each_node(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "cfg"
    with Cluster() as c:
        a = c.add("a", extra=[*TLS, "--label", "name=a"])
        for n in "bc":
            c.add(n, join=[a.gossip_addr], extra=[*TLS, "--label", f"name={n}"])
        w = c.add("w", join=[a.gossip_addr], extra=[*TLS, "--role", "worker", "--label", "name=w"])
        for n in "abcw":
            c.start(n)
        leader, _ = c.wait_leader(timeout_s=40)
        monkeypatch.setenv("GALAXY_API_TOKEN", c.admin_token())     # the CLI's calls sign in as the admin
        c.wait(lambda: all((s := p.try_get("/v1/status")) and len(s["voters"]) == 3 and s["members"]["alive"] == 4
                           for p in c.running()), 60, "3 voters and 4 alive members everywhere")
        follower = c.procs[next(n for n in "abc" if n != leader)]

        # every member is gossiped with its https URL; the banner shows the fingerprint
        members = w.get("/v1/members")["members"]
        assert {m["id"]: m["http"] for m in members} == {p.name: p.url for p in c.running()}
        assert all(p.url.startswith("https://") for p in c.running())
        assert f"SHA-256 fingerprint {cert_fp(a)}" in a.log_text()

        # the CLI trusts on first use: pins, says so once, then stays quiet
        first = cli(home, follower.url, "status", "--json")
        assert first.returncode == 0, first.stderr
        assert "self-signed" in first.stderr and cert_fp(follower) in first.stderr
        pins = home / "galaxy" / "known_nodes.json"
        assert json.loads(pins.read_text())["nodes"][follower.url]["sha256"] == cert_fp(follower)
        assert stat.S_IMODE(os.stat(pins).st_mode) == 0o600
        again = cli(home, follower.url, "status")
        assert again.returncode == 0 and "self-signed" not in again.stderr

        # a task submitted over https at a follower runs; its logs are forwarded between nodes
        task = submit(home, follower, "--", "python3", "-c", "print('over tls')")
        assert wait_done(c, follower, task)["state"] == "succeeded"
        logs_everywhere(c, home, task, "over tls\n")

        # the internal command route: the worker (no Raft) forwards its change to the coordinator
        out = cli(home, w.url, "config", "set", "gossip_fanout", "4")
        assert out.returncode == 0, out.stderr
        assert w.get("/v1/status")["config"]["commands"]["forwarded"] >= 1

        # plain HTTP to a TLS port, and a wrong explicit pin: clear refusals, no traceback
        plain = cli(home, follower.url.replace("https://", "http://"), "status")
        assert plain.returncode != 0 and f"use {follower.url}" in plain.stderr and "Traceback" not in plain.stderr
        wrong = cli(home, follower.url, "status", "--tls-fingerprint", "ab" * 32)
        assert wrong.returncode != 0 and "refusing" in wrong.stderr and "Traceback" not in wrong.stderr

        # node b restarts with a new certificate: peers take the new pin from gossip, the CLI refuses it
        b = c.procs["b"]
        old = cert_fp(b)
        cli(home, b.url, "status")                     # pinned before the change
        c.stop("b")
        for name in (tls.CERT_FILE, tls.KEY_FILE):
            os.unlink(os.path.join(b.data_dir, name))
        c.start("b")
        c.wait(lambda: os.path.exists(os.path.join(b.data_dir, tls.CERT_FILE)) and cert_fp(b) != old
               and (s := b.try_get("/v1/status")) and s["members"]["alive"] == 4, 60, "b back with a new cert")
        changed = cli(home, b.url, "status")
        assert changed.returncode != 0 and "CHANGED" in changed.stderr and "Traceback" not in changed.stderr
        assert f"galaxy tls forget {b.url}" in changed.stderr and cert_fp(b) in changed.stderr
        task_b = submit(home, a, "--label", "name=b", "--", "python3", "-c", "print('new cert')")
        assert wait_done(c, a, task_b)["attempts"][-1]["node"] == "b"
        out = cli(home, a.url, "logs", task_b)         # a -> b over https, pinned to b's new certificate
        assert out.returncode == 0 and out.stdout == "new cert\n", out.stderr
        forget = galaxy(home, "tls", "forget", b.url)
        assert forget.returncode == 0, forget.stderr
        repinned = cli(home, b.url, "status")
        assert repinned.returncode == 0 and cert_fp(b) in repinned.stderr


def _archive(tmp_path: Path) -> str:
    path = tmp_path / "input.tar"
    with tarfile.open(path, "w") as tar:
        data = b"input travelled\n"
        info = tarfile.TarInfo("data.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_mixed_mesh_one_tls_node_two_plain(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "cfg"
    with Cluster() as c:
        a = c.add("a", extra=[*TLS, "--label", "name=a"])
        for n in "bc":
            c.add(n, join=[a.gossip_addr], extra=["--label", f"name={n}"])
        for n in "abc":
            c.start(n)
        c.wait_leader(timeout_s=40)
        monkeypatch.setenv("GALAXY_API_TOKEN", c.admin_token())
        c.wait(lambda: all((s := p.try_get("/v1/status")) and s["members"]["alive"] == 3 for p in c.running()), 60,
               "3 alive members everywhere")
        assert {m["id"]: m["http"] for m in c.procs["b"].get("/v1/members")["members"]} == {
            "a": a.url, "b": c.procs["b"].url, "c": c.procs["c"].url}
        assert a.url.startswith("https://") and c.procs["b"].url.startswith("http://")
        archive = _archive(tmp_path)
        cat = ["--", "python3", "-c", "print(open('data.txt').read(), end='')"]
        # submitted at a plain node, runs on the TLS node: a fetches the input over http,
        # the plain nodes fetch its logs over https (pinned)
        t1 = submit(home, c.procs["b"], "--file", archive, "--label", "name=a", *cat)
        assert wait_done(c, c.procs["b"], t1)["state"] == "succeeded"
        logs_everywhere(c, home, t1, "input travelled\n")
        # submitted at the TLS node, runs on a plain one: the input is fetched from a over https
        t2 = submit(home, a, "--file", archive, "--label", "name=c", *cat)
        assert wait_done(c, a, t2)["state"] == "succeeded"
        logs_everywhere(c, home, t2, "input travelled\n")


def test_a_join_token_carries_the_seeds_certificate_pin(tmp_path: Path) -> None:
    from galaxy.client import Client, ClientError
    from tests.proc.test_join_token import admin_token
    home = tmp_path / "cfg"
    with Cluster(env={"XDG_CONFIG_HOME": str(home)}) as c:
        a = c.add("a", extra=TLS)
        c.start("a")
        c.wait_leader(timeout_s=30)
        def make_token() -> dict | None:
            try:
                return Client(a.url, token=admin_token(c.key), tls_fingerprint=cert_fp(a)).post(
                    "/v1/join/tokens", {"ttl_ms": 60_000})
            except ClientError:
                return None            # the admin account opens a moment after the coordinator
        made = c.wait(make_token, 20, "a token from the TLS node")
        (seed,) = join.parse(made["token"]).seeds
        assert seed.http == f"{a.url}#sha256={tls.parse_fingerprint(cert_fp(a)).hex()}"
        d = c.add("d", extra=["--token", made["token"], *TLS])
        d.env.pop("GALAXY_CLUSTER_KEY")                   # nothing but the token
        c.start("d")
        c.wait(lambda: (d.try_get("/v1/status") or {}).get("members", {}).get("alive") == 2, 40,
               "d joined through the https seed")
        assert not (home / "galaxy" / "known_nodes.json").exists()      # pinned by the token, not on first use
