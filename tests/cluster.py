"""Real `galaxy up` processes for tests and benchmarks: start, query, kill -9, restart, clean up.

Every process is started by this module, tracked by pid, and ended by pid; every data dir
lives under one temp dir removed at ``close()``.  Waits poll a condition with a deadline;
nothing sleeps for a fixed time to "let things settle".

Every change to a mesh needs a bearer token (docs/security.md): the nodes start with
``GALAXY_ADMIN_PASSWORD=ADMIN_PASSWORD``, ``Cluster.admin_token()`` signs in once (the
token is good on every node) and ``Proc.call`` sends it.  ``Proc.get`` sends it too once
it exists, so polling keeps working after a test sets ``anonymous_read`` false.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from galaxy import wire
from galaxy.config import Config, profile_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GET a URL from inside a network namespace (the root namespace cannot reach lab addresses)
_FETCH = ("import sys, urllib.request; "
          "print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())")


# Node ports come from below the kernel's ephemeral range (32768-60999 here): a node
# restarted after kill -9 must get its port back, and an ephemeral port may meanwhile be
# the local end of some outgoing connection.
# A port handed out is not handed out again for a while: "free right now" is not enough,
# since a node binds its Raft port only once it is invited to vote, and the next node of
# the same mesh must not be given that port meanwhile.
PORT_RANGE = (20000, 32000)
_port_rng = random.Random()
_RECENT_PORTS = 3000
_recent: deque[int] = deque(maxlen=_RECENT_PORTS)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports, outside the ephemeral range, free for both TCP and UDP right now
    and not handed out by this function in its last few thousand answers."""
    ports: list[int] = []
    socks = []
    while len(ports) < n:
        port = _port_rng.randrange(*PORT_RANGE)
        if port in ports or port in _recent:
            continue
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            t.bind((host, port))
            u.bind((host, port))
        except OSError:
            t.close()
            u.close()
            continue
        socks += [t, u]
        ports.append(port)
    for s in socks:
        s.close()
    _recent.extend(ports)
    return ports


# Test probes of nodes serving `--tls auto`: the harness reads state, it does not check
# certificates (tests/proc/test_tls.py checks the pinning itself).
_UNVERIFIED_TLS = ssl._create_unverified_context()
ADMIN_PASSWORD = "test-mesh-admin-pw-5c1e"     # every test mesh's admin account (GALAXY_ADMIN_PASSWORD)
TOKEN_REFRESH_MS = 5 * 60_000                  # sign in again when the token has less left than this


def http_json(url: str, timeout_s: float = 1.0, token: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout_s, context=_UNVERIFIED_TLS) as r:
        return json.loads(r.read())


def http_call(url: str, method: str, body: Any = None, *, token: str | None = None, data: bytes | None = None,
              headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> tuple[int, Any]:
    """One request; (status, parsed JSON answer or None), whatever the status."""
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data if data is not None else (b"" if method != "GET" else None),
                                 method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=_UNVERIFIED_TLS) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


@dataclass
class Proc:
    name: str
    data_dir: str
    http_port: int
    gossip_port: int
    raft_port: int
    args: list[str]
    env: dict[str, str]
    host: str = "127.0.0.1"
    popen: subprocess.Popen | None = None
    log_path: str = ""
    starts: int = 0
    extra_logs: list[str] = field(default_factory=list)
    popen_fn: Callable[..., subprocess.Popen] | None = None     # e.g. NetLab.popen bound to a host
    fetch: Callable[[str, float], Any] | None = None             # GET url -> JSON, where loopback cannot reach
    token_fn: Callable[[bool], str | None] | None = None         # (sign in if needed?) -> the admin's token

    @property
    def url(self) -> str:
        a = self.args
        tls = "--tls-cert" in a or any(x == "--tls" and a[i + 1:i + 2] == ["auto"] for i, x in enumerate(a))
        return f"{'https' if tls else 'http'}://{self.host}:{self.http_port}"

    @property
    def gossip_addr(self) -> str:
        return f"{self.host}:{self.gossip_port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def get(self, path: str, timeout_s: float = 1.0) -> Any:
        if self.fetch:
            return self.fetch(self.url + path, timeout_s)
        return http_json(self.url + path, timeout_s, self.token_fn(False) if self.token_fn else None)

    def call(self, method: str, path: str, body: Any = None, *, data: bytes | None = None, token: Any = True,
             headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> tuple[int, Any]:
        """A request as the mesh's admin (``token=True``), anonymously (None) or with a given token."""
        if token is True:
            token = self.token_fn(True) if self.token_fn else None
        return http_call(self.url + path, method, body, token=token, data=data, headers=headers,
                         timeout_s=timeout_s)

    def try_get(self, path: str, timeout_s: float = 1.0) -> Any | None:
        try:
            return self.get(path, timeout_s)
        except (OSError, urllib.error.URLError, ValueError, subprocess.SubprocessError):
            return None

    def log_text(self) -> str:
        out = []
        for p in [*self.extra_logs, self.log_path]:
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    out.append(f.read())
            except FileNotFoundError:
                pass
        return "".join(out)


class Cluster:
    """A mesh of real node processes on loopback (or, with ``popen``, inside namespaces)."""

    def __init__(self, *, key: str | None = None, env: dict[str, str] | None = None,
                 popen: Callable[..., subprocess.Popen] | None = None) -> None:
        self.root = tempfile.mkdtemp(prefix="galaxy-test-")
        self.key = key or wire.generate_key()
        self.env = {**os.environ, **profile_env(Config.local()), "GALAXY_CLUSTER_KEY": self.key,
                    "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "GALAXY_LOG_FORMAT": "json", "GALAXY_ADMIN_PASSWORD": ADMIN_PASSWORD, **(env or {})}
        self.env.pop("GALAXY_ADDR", None)
        self.env.pop("GALAXY_API_TOKEN", None)
        self._token: tuple[str, int] | None = None      # (admin token, expires_at_ms)
        self.procs: dict[str, Proc] = {}
        self._popen = popen or subprocess.Popen

    # ------------------------------------------------------------------ processes
    def add(self, name: str, *, host: str = "127.0.0.1", join: list[str] | None = None, extra: list[str] | None = None,
            env: dict[str, str] | None = None, discovery: bool = False, ports: tuple[int, int, int] | None = None,
            popen: Callable[..., subprocess.Popen] | None = None,
            fetch: Callable[[str, float], Any] | None = None) -> Proc:
        http, gossip, raft = ports or free_ports(3, host if host.startswith("127.") else "127.0.0.1")
        data = os.path.join(self.root, name)
        args = ["--node-id", name, "--data-dir", data, "--bind", host, "--advertise", host,
                "--http-port", str(http), "--gossip-port", str(gossip), "--raft-port", str(raft)]
        if not discovery:
            args += ["--no-mdns", "--no-broadcast"]
        if join:
            args += ["--join", ",".join(join)]
        args += extra or []
        proc = Proc(name, data, http, gossip, raft, args, {**self.env, **(env or {})}, host=host, popen_fn=popen,
                    fetch=fetch, token_fn=self._token_for)
        self.procs[name] = proc
        return proc

    def add_in_lab(self, lab: Any, i: int, name: str, **kw: Any) -> Proc:
        """A node on host i of a ``tests.netlab.NetLab``, on the default ports, queried from inside."""
        def fetch(url: str, timeout_s: float) -> Any:
            out = lab.run(i, [sys.executable, "-c", _FETCH, url, str(timeout_s)], capture_output=True, text=True,
                          timeout=timeout_s + 10)
            if out.returncode != 0:
                raise OSError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "fetch failed")
            return json.loads(out.stdout)
        return self.add(name, host=lab.host_ip(i), ports=(8000, 7946, 7947),
                        popen=lambda argv, **pkw: lab.popen(i, argv, **pkw), fetch=fetch, **kw)

    def start(self, name: str) -> Proc:
        p = self.procs[name]
        if p.alive():
            raise RuntimeError(f"{name} already running")
        os.makedirs(self.root, exist_ok=True)
        if p.log_path:
            p.extra_logs.append(p.log_path)
        p.starts += 1
        p.log_path = os.path.join(self.root, f"{name}.{p.starts}.log")
        with open(p.log_path, "wb") as log:
            p.popen = (p.popen_fn or self._popen)([sys.executable, "-m", "galaxy", "up", *p.args], stdout=log,
                                  stderr=subprocess.STDOUT, env=p.env, cwd=self.root, start_new_session=True)
        return p

    def kill9(self, name: str) -> None:
        p = self.procs[name]
        if p.alive():
            os.kill(p.popen.pid, signal.SIGKILL)
            p.popen.wait(timeout=10)

    def stop(self, name: str, timeout_s: float = 15.0) -> int:
        p = self.procs[name]
        if not p.alive():
            return p.popen.returncode if p.popen else 0
        os.kill(p.popen.pid, signal.SIGTERM)
        try:
            return p.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(p.popen.pid, signal.SIGKILL)
            p.popen.wait(timeout=10)
            raise

    def running(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.alive()]

    def close(self) -> None:
        for name, p in self.procs.items():
            if p.alive():
                try:
                    os.kill(p.popen.pid, signal.SIGKILL)
                    p.popen.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ sign-in
    def _token_for(self, sign_in: bool) -> str | None:
        if sign_in:
            return self.admin_token()
        return self._token[0] if self._token else None

    def admin_token(self, timeout_s: float = 30.0) -> str:
        """The mesh's admin token (good on every node), signing in at a running node when needed."""
        if self._token and self._token[1] - time.time() * 1000 > TOKEN_REFRESH_MS:
            return self._token[0]
        password = self.env.get("GALAXY_ADMIN_PASSWORD") or ADMIN_PASSWORD

        def sign_in() -> tuple[str, int] | None:
            for p in self.running():
                # the admin account is opened a moment after the first coordinator: each failed
                # attempt costs one of the per-name sign-in budget (burst 5), so ask only when
                # the ledger has applied something
                status = p.try_get("/v1/status", timeout_s=2.0)
                if not status or not (status.get("ledger") or {}).get("applied_seq"):
                    continue
                code, doc = http_call(p.url + "/v1/auth/token", "POST", {"name": "admin", "password": password})
                if code == 200:
                    return doc["token"], int(doc["expires_at_ms"])
            return None

        self._token = self.wait(sign_in, timeout_s, "signing in as the mesh's admin", poll_s=0.5)
        return self._token[0]

    def cli_env(self, **extra: str) -> dict[str, str]:
        """The environment for a `galaxy` client command acting as the mesh's admin."""
        return {**self.env, "GALAXY_API_TOKEN": self.admin_token(), "NO_COLOR": "1", **extra}

    # ------------------------------------------------------------------ conditions
    def wait(self, cond: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = cond()
            if last:
                return last
            for p in self.procs.values():
                if p.popen is not None and p.popen.poll() not in (None, 0, -9, -15):
                    raise AssertionError(f"{p.name} exited with {p.popen.returncode}:\n{p.log_text()[-3000:]}")
            time.sleep(poll_s)
        logs = "\n".join(f"--- {p.name}\n{p.log_text()[-2500:]}" for p in self.procs.values())
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last={last!r}\n{logs}")

    def leaders(self, procs: list[Proc] | None = None) -> dict[str, tuple[str | None, int] | None]:
        out = {}
        for p in procs or self.running():
            doc = p.try_get("/v1/leader", timeout_s=0.5)
            out[p.name] = (doc["leader"], doc["term"]) if doc else None
        return out

    def agreed_leader(self, procs: list[Proc] | None = None) -> tuple[str, int] | None:
        """(leader, term) when every given running node names the same live leader."""
        procs = procs or self.running()
        views = self.leaders(procs)
        vals = set(views.values())
        if len(vals) != 1:
            return None
        only = vals.pop()
        if only is None or only[0] is None or only[0] not in {p.name for p in procs}:
            return None
        return only

    def wait_leader(self, timeout_s: float = 20.0, procs: list[Proc] | None = None,
                    exclude: str | None = None, min_term: int = 0) -> tuple[str, int]:
        def cond():
            got = self.agreed_leader(procs)
            if got and got[0] != exclude and got[1] >= min_term:
                return got
            return None
        return self.wait(cond, timeout_s, f"one agreed leader (not {exclude}, term >= {min_term})")

    def start_mesh(self, names: str, extra: list[str] | None = None,
                   env: dict[str, dict[str, str]] | None = None) -> list[Proc]:
        """Nodes ``names`` on loopback, each joining the first (``env``: a node's own extra
        environment, by name); returns once they agree on a coordinator, all see each other,
        and min(3, n) voters run (so a kill leaves a quorum)."""
        procs: list[Proc] = []
        for n in names:
            procs.append(self.add(n, join=[procs[0].gossip_addr] if procs else None, extra=extra,
                                  env=(env or {}).get(n)))
        for n in names:
            self.start(n)
        self.wait_leader(timeout_s=30)
        self.wait(lambda: all(len(self.members_view(p)) == len(names) for p in self.running()) or None, 30,
                  f"{len(names)} members everywhere")
        voters = min(3, len(names))
        self.wait(lambda: all(len((p.try_get("/v1/status") or {}).get("voters", [])) == voters
                              for p in self.running()) or None, 60, f"{voters} voters everywhere")
        return procs

    def members_view(self, p: Proc) -> dict[str, str]:
        doc = p.try_get("/v1/members")
        return {m["id"]: m["state"] for m in doc["members"]} if doc else {}

    def observations(self) -> list[dict]:
        """Every `leader` event any incarnation of any node logged (JSON logs)."""
        out = []
        for p in self.procs.values():
            for line in p.log_text().splitlines():
                if '"event": "leader"' not in line:
                    continue
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                out.append({"observer": p.name, "term": doc["term"], "leader": doc["leader"],
                            "state": doc.get("raft_state")})
        return out
