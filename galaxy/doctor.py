"""`galaxy doctor`: the checks a troubleshooting guide makes by hand, each with its fix.

Theory of operation: every check is a function of the node's ``Config`` (the same flags,
env and file as `galaxy up`) that returns one ``Check``: ok, warn or fail, what was
seen, and what to do.  A node running on this data dir (its ``runtime.json`` names a
live pid) is examined through its HTTP API; otherwise the checks say what `galaxy up`
would run into.  Nothing here changes the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from galaxy import wire
from galaxy.config import Config

OK, WARN, FAIL = "ok", "warn", "fail"
DISK_FREE_MIN_BYTES = 1 << 30          # below 1 GiB the store and task outputs run out soon
CLOCK_SKEW_WARN_MS = 500               # HLC and replay windows tolerate this much; more is trouble
PEER_TIMEOUT_S = 1.0
PEERS_CHECKED_MAX = 32


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def running_node(cfg: Config) -> dict | None:
    """The runtime.json of a live node on this data dir, else None."""
    try:
        with open(os.path.join(cfg.data_dir, "runtime.json"), encoding="utf-8") as f:
            doc = json.load(f)
        os.kill(int(doc["pid"]), 0)
        return doc
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _get(url: str, timeout_s: float = PEER_TIMEOUT_S, token: str | None = None) -> Any:
    # the caller's sign-in token, if any: reads need one when the mesh sets anonymous_read false
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def _port_free(host: str, port: int, kind: int) -> str | None:
    """None when (host, port) can be bound now, else the reason."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def check_ports(cfg: Config, node: dict | None) -> list[Check]:
    wanted = [("http", cfg.http_port, socket.SOCK_STREAM), ("gossip", cfg.gossip_port, socket.SOCK_DGRAM),
              ("raft", cfg.raft_port, socket.SOCK_STREAM)]
    if node is not None:
        out = []
        for name, port, _ in wanted:
            actual = {"http": int(node["http"].rsplit(":", 1)[1]), "gossip": node["gossip_port"],
                      "raft": node["raft_port"]}[name]
            out.append(Check(f"{name} port", OK, f"node {node['id']} (pid {node['pid']}) listens on {actual}"))
        return out
    out = []
    for name, port, kind in wanted:
        problem = _port_free(cfg.bind, port, kind)
        if problem:
            out.append(Check(f"{name} port", FAIL, f"{cfg.bind}:{port} is taken ({problem})",
                             f"stop what uses it (ss -lntup | grep {port}) or pick another: "
                             f"--{name}-port N (0 = any free port)"))
        else:
            out.append(Check(f"{name} port", OK, f"{cfg.bind}:{port} is free"))
    return out


def _routes() -> list[tuple[int, int]]:
    """IPv4 routes as (destination, mask) integers, from /proc/net/route (host byte order)."""
    out = []
    try:
        with open("/proc/net/route", encoding="ascii") as f:
            next(f)
            for line in f:
                parts = line.split()
                out.append((int(parts[1], 16), int(parts[7], 16)))
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    return out


def check_multicast(cfg: Config) -> Check:
    if not cfg.mdns:
        return Check("multicast route", OK, "mDNS is off (--no-mdns); not needed")
    group = int.from_bytes(socket.inet_aton("224.0.0.251"), "little")
    if any(group & mask == dest & mask for dest, mask in _routes()):
        return Check("multicast route", OK, "a route covers 224.0.0.251 (mDNS)")
    return Check("multicast route", WARN, "no route covers 224.0.0.251: mDNS may not leave this host",
                 "ip route add 224.0.0.0/4 dev <lan interface>, or use --join HOST:PORT")


def check_key(cfg: Config) -> Check:
    if cfg.cluster_key:
        source, read = "the cluster_key setting", lambda: cfg.cluster_key
    else:
        path = cfg.cluster_key_file or os.path.join(cfg.data_dir, "cluster.key")
        if not cfg.cluster_key_file and not os.path.exists(path):
            return Check("cluster key", WARN, f"no key yet ({path} does not exist)",
                         "the first `galaxy up` writes one; to join an existing mesh give its key: "
                         "--cluster-key-file FILE or GALAXY_CLUSTER_KEY")
        source = path

        def read() -> str:
            with open(path, encoding="utf-8") as f:
                return f.read()
    try:
        key = wire.parse_key(read())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return Check("cluster key", FAIL, f"cannot use the key from {source}: {e}",
                     "run `galaxy keygen > cluster.key` on one machine and copy that file to all of them")
    return Check("cluster key", OK, f"readable from {source} (fingerprint {wire.key_fingerprint(key)})")


def check_data_dir(cfg: Config) -> list[Check]:
    path = cfg.data_dir
    probe = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".galaxy-doctor-"):
            pass
        writable = Check("data dir", OK, f"{path} is writable" if probe == path else f"{path} can be created")
    except OSError as e:
        writable = Check("data dir", FAIL, f"cannot write in {probe}: {e.strerror or e}",
                         f"fix the permissions of {probe} or choose another: --data-dir DIR")
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return [writable, Check("disk space", WARN, f"cannot read free space: {e}")]
    if free < DISK_FREE_MIN_BYTES:
        disk = Check("disk space", WARN, f"only {free >> 20} MiB free under {probe}",
                     "free some space or move --data-dir to a larger disk")
    else:
        disk = Check("disk space", OK, f"{free >> 30} GiB free under {probe}")
    return [writable, disk]


def check_address_space() -> Check:
    """A hard ``RLIMIT_AS`` (``ulimit -v``) caps every task's memory limit on this node: a
    task asking for more fails here (the limit cannot be raised), and programs that reserve
    large address ranges do not start at all."""
    from galaxy.executor.resources import task_memory_max_mb
    mib = task_memory_max_mb()
    if not mib:
        return Check("address space", OK, "no ulimit -v: tasks get the memory limit they ask for")
    return Check("address space", WARN,
                 f"every process here is capped at {mib} MiB of address space (a hard ulimit -v): tasks "
                 f"asking for more memory are not placed on this node, and programs that reserve large "
                 f"address ranges (JVMs, browsers, Ray) may not start",
                 f"lift the cap where the node is started (ulimit -v unlimited; systemd: LimitAS=infinity), "
                 f"or submit tasks with --memory {mib}M or less")


def check_isolation() -> Check:
    """Whether this node can make the cgroups that end every process a task started and
    bound its memory as a whole (galaxy/executor/cgroup.py), by making and removing one of
    each under a throwaway name."""
    from galaxy.executor.cgroup import Cgroups
    got = []
    with tempfile.TemporaryDirectory() as root:
        for controller in ("", "memory"):
            pool = Cgroups.open(root, controller)
            got.append(pool is not None)
            if pool is not None:
                pool.close()
    attempts, memory = got
    if attempts and memory:
        return Check("task isolation", OK, "cgroups: what a task starts ends with it, wherever it went, and "
                                           "its memory limit bounds the resident memory of the whole task")
    lacks = []
    if not attempts:
        lacks.append("a process a task starts in a session of its own with a cleared environment can "
                     "outlive it (no writable cgroup v2)")
    if not memory:
        lacks.append("memory limits are RLIMIT_AS: address space per process, which JVMs and Go programs "
                     "exceed far below their real use (no writable cgroup v1 memory hierarchy)")
    return Check("task isolation", WARN, "; ".join(lacks),
                 "run the node as root, or give its user a delegated cgroup (systemd: Delegate=yes)")


def check_peers(node: dict | None) -> list[Check]:
    if node is None:
        return [Check("peers", OK, "no node running on this data dir; start one to check its peers")]
    from galaxy.cli_ledger import client_token          # GALAXY_API_TOKEN, else what `galaxy login` kept
    token = client_token(node["http"])                   # a token is good on every node of its mesh
    try:
        me = _get(node["http"] + "/v1/members", token=token)["members"]
    except (OSError, ValueError, KeyError) as e:
        return [Check("peers", FAIL, f"the local node does not answer on {node['http']}: {e}",
                      "look at its log; restart it with `galaxy up`")]
    out = []
    skews = []
    for m in [m for m in me if m.get("id") != node["id"]][:PEERS_CHECKED_MAX]:
        if m.get("state") in ("left", "dead"):
            continue
        url = m.get("http") or ""
        t0 = time.time()
        try:
            status = _get(url + "/v1/status", token=token)
        except (OSError, ValueError, urllib.error.URLError) as e:
            out.append(Check(f"peer {m['id']}", FAIL, f"{url} unreachable: {e}",
                             "check the firewall between the machines (TCP http and raft ports, UDP gossip)"))
            continue
        t1 = time.time()
        remote_ms = status.get("node", {}).get("wall_ms")
        if isinstance(remote_ms, (int, float)):
            skews.append((m["id"], remote_ms - (t0 + t1) * 500, (t1 - t0) * 1000))
        out.append(Check(f"peer {m['id']}", OK, f"{url} answers ({(t1 - t0) * 1000:.0f} ms)"))
    if not out:
        out.append(Check("peers", WARN, "this node knows no live peer", "--join HOST:PORT of a member, "
                                                                         "or check discovery (galaxy members)"))
    for peer_id, skew_ms, rtt_ms in skews:
        if abs(skew_ms) > CLOCK_SKEW_WARN_MS + rtt_ms / 2:
            out.append(Check(f"clock skew {peer_id}", WARN, f"{skew_ms:+.0f} ms against this machine",
                             "run NTP (chrony or systemd-timesyncd) on every machine"))
        else:
            out.append(Check(f"clock skew {peer_id}", OK, f"{skew_ms:+.0f} ms (±{rtt_ms / 2:.0f})"))
    return out


def run(cfg: Config) -> list[Check]:
    node = running_node(cfg)
    return [*check_ports(cfg, node), check_multicast(cfg), check_key(cfg), *check_data_dir(cfg),
            check_address_space(), check_isolation(), *check_peers(node)]


def as_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
