"""The walking mesh with real `galaxy up` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from galaxy.client import Client
from tests.cluster import REPO, Cluster, free_ports, http_json


@pytest.fixture
def cluster():
    with Cluster() as c:
        yield c


def start_three(cluster: Cluster) -> None:
    a = cluster.add("a")
    cluster.add("b", join=[a.gossip_addr])
    cluster.add("c", join=[a.gossip_addr])
    for name in "abc":
        cluster.start(name)


def voters_everywhere(cluster: Cluster, n: int):
    def cond():
        views = [p.try_get("/v1/status") for p in cluster.running()]
        if all(v and len(v["voters"]) == n for v in views):
            return views[0]["voters"]
        return None
    return cond


def test_three_nodes_join_elect_fail_over_rejoin_and_leave(cluster):
    start_three(cluster)
    leader, term = cluster.wait_leader(timeout_s=30)
    cluster.wait(voters_everywhere(cluster, 3), 30, "3 voters on every node")
    # the smallest id founds; the others say they joined
    assert "galaxy: founded a new mesh" in cluster.procs["a"].log_text()
    assert "galaxy: joined the mesh (" in cluster.wait(
        lambda: "galaxy: joined" in cluster.procs["c"].log_text() and cluster.procs["c"].log_text(), 10, "c joined")
    for p in cluster.running():
        assert cluster.wait(lambda p=p: cluster.members_view(p) == {"a": "alive", "b": "alive", "c": "alive"} or None,
                            15, f"{p.name} lists 3 alive members")
        assert p.get("/healthz") == {"ok": True}
        assert p.get("/readyz")["ready"] is True
        status = p.get("/v1/status")
        assert status["leader"]["leader"] == leader and status["members"]["alive"] == 3

    # kill -9 the coordinator: the two survivors agree on a new one with a higher term
    cluster.kill9(leader)
    survivors = cluster.running()
    new_leader, new_term = cluster.wait_leader(timeout_s=20, procs=survivors, exclude=leader, min_term=term + 1)
    assert new_leader != leader and new_term > term
    for p in survivors:
        history = cluster.wait(lambda p=p: (h := p.get("/v1/status")["leader_history"]) and
                               h[-1]["leader"] == new_leader and h, 10, f"{p.name}'s leader history")
        assert [(e["leader"], e["term"]) for e in history[-2:]] == [(leader, term), (new_leader, new_term)]

    # restart it: same id and data dir, rejoins as a follower without deposing anyone
    cluster.start(leader)
    back = cluster.procs[leader]
    got = cluster.wait(lambda: cluster.agreed_leader() if len(cluster.leaders()) == 3 else None, 30,
                       "the restarted node follows the current coordinator")
    assert got == (new_leader, new_term), "a rejoining node must not force an election"
    assert back.get("/v1/status")["node"]["id"] == leader
    assert leader in back.get("/v1/status")["voters"]

    # graceful stop of a follower: peers see `left`, not `dead`
    follower = next(n for n in "abc" if n != new_leader)
    assert cluster.stop(follower) == 0
    rest = cluster.running()
    for p in rest:
        cluster.wait(lambda p=p: cluster.members_view(p).get(follower) == "left" or None, 15,
                     f"{p.name} sees {follower} left")
    assert cluster.agreed_leader(rest) is not None


def test_single_node_founds_its_own_mesh_and_prints_next_command(cluster):
    solo = cluster.add("solo", extra=["--voters", "1"])
    cluster.start("solo")
    leader, term = cluster.wait_leader(timeout_s=20)
    assert leader == "solo" and term >= 1
    out = cluster.wait(lambda: "founded a new mesh" in solo.log_text() and solo.log_text(), 10, "ready banner")
    assert f"galaxy up --join 127.0.0.1:{solo.gossip_port}" in out
    runtime = json.load(open(os.path.join(solo.data_dir, "runtime.json")))
    assert runtime["id"] == "solo" and runtime["http"] == solo.url
    assert cluster.stop("solo") == 0
    assert not os.path.exists(os.path.join(solo.data_dir, "runtime.json"))


def test_cli_tables_and_json_against_a_live_mesh(cluster):
    start_three(cluster)
    leader, term = cluster.wait_leader(timeout_s=30)
    addr = cluster.procs["b"].url
    env = {**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "galaxy", *args, "--addr", addr], capture_output=True,
                              text=True, env=env, timeout=30)

    got = json.loads(cli("leader", "--json").stdout)
    assert (got["leader"], got["term"]) == (leader, term)
    members = cli("members")
    assert members.returncode == 0 and all(n in members.stdout for n in "abc") and "alive" in members.stdout
    status = cli("status")
    assert status.returncode == 0 and leader in status.stdout
    assert json.loads(cli("status", "--json").stdout)["node"]["id"] == "b"

    # --watch redraws until Ctrl-C
    watch = subprocess.Popen([sys.executable, "-m", "galaxy", "status", "--watch", "0.2", "--addr", addr],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        cluster.wait(lambda: watch.poll() is None and len(cluster.leaders()) == 3, 5, "watching")
        deadline = time.monotonic() + 10
        seen = ""
        while time.monotonic() < deadline and seen.count("coordinator") < 2:
            seen += watch.stdout.readline()
        assert seen.count("coordinator") >= 2, seen
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 130


def _dev_up(tmp_path, env) -> tuple[subprocess.Popen, list[str]]:
    """`galaxy dev --nodes 3` on a kept data dir, once its nodes agree on a coordinator."""
    dev = subprocess.Popen([sys.executable, "-m", "galaxy", "dev", "--nodes", "3", "--data-dir", str(tmp_path / "mesh")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    urls: list[str] = []
    try:
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline and len(urls) < 3:
            line = dev.stdout.readline()
            if not line:
                break
            lines.append(line)
            urls += [w for w in line.split() if w.startswith("http://127.0.0.1:")]
        assert len(urls) >= 3, "".join(lines)

        def agreed():
            try:
                views = {(d["leader"], d["term"]) for d in (http_json(u + "/v1/leader") for u in urls[:3])}
            except OSError:
                return None
            return views.pop() if len(views) == 1 and None not in next(iter(views)) else None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not agreed():
            time.sleep(0.05)
        assert agreed(), "dev mesh nodes do not agree on a coordinator"
    except BaseException:
        os.killpg(dev.pid, signal.SIGKILL)
        dev.wait(timeout=10)
        raise
    return dev, urls[:3]


def test_galaxy_dev_runs_a_three_node_mesh_stops_it_on_ctrl_c_and_starts_it_again(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("GALAXY_ADMIN_PASSWORD", None)
    dev, urls = _dev_up(tmp_path, env)
    try:
        mesh = tmp_path / "mesh"
        pids = [json.load(open(os.path.join(mesh, d, "runtime.json")))["pid"]
                for d in os.listdir(mesh) if os.path.exists(os.path.join(mesh, d, "runtime.json"))]
        assert len(pids) == 3
        # the local user is signed in as the throw-away mesh's admin: ledger commands just work
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (tmp_path / "config" / "galaxy" / "token.json").exists():
            time.sleep(0.05)
        balance = subprocess.run([sys.executable, "-m", "galaxy", "balance", "--addr", urls[0]], env=env,
                                 capture_output=True, text=True, timeout=30)
        assert balance.returncode == 0 and "admin" in balance.stdout, (balance.stdout, balance.stderr)
        ran = subprocess.run([sys.executable, "-m", "galaxy", "submit", "--wait", "--addr", urls[1], "--", "true"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, (ran.stdout, ran.stderr)
        task_id = ran.stderr.split()[0]      # with --wait the id goes to stderr
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait(timeout=30) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(timeout=10)
    # the same data dir again: the nodes come back where they were (the Raft group knows
    # them by address), elect a coordinator, and have kept what the mesh stored
    dev, again = _dev_up(tmp_path, env)
    try:
        assert again == urls
        got = subprocess.run([sys.executable, "-m", "galaxy", "task", task_id, "--addr", urls[2]],
                             env=env, capture_output=True, text=True, timeout=30)
        assert got.returncode == 0 and "succeeded" in got.stdout, (got.stdout, got.stderr)
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait(timeout=30) == 0
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(timeout=10)


def test_node_with_another_key_never_joins(cluster):
    a = cluster.add("a", extra=["--voters", "1"])
    cluster.start("a")
    cluster.wait_leader(timeout_s=20)
    from galaxy import wire
    cluster.add("x", join=[a.gossip_addr], env={"GALAXY_CLUSTER_KEY": wire.generate_key()})
    cluster.start("x")
    x = cluster.procs["x"]
    cluster.wait(lambda: (x.try_get("/v1/status") or {}).get("wire", {}).get("unknown_key", 0) +
                 (a.try_get("/v1/status") or {}).get("wire", {}).get("unknown_key", 0) >= 2 or None,
                 15, "frames with the foreign key dropped and counted")
    assert set(cluster.members_view(a)) == {"a"}
    assert set(cluster.members_view(x)) == {"x"}


def test_bad_config_is_one_clear_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "GALAXY_HTTP_PORT": "nope"}
    r = subprocess.run([sys.executable, "-m", "galaxy", "up", "--data-dir", str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 2
    assert "http_port" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ports_zero_are_picked_and_advertised(cluster):
    p = cluster.add("z", extra=["--voters", "1"], ports=(0, 0, 0))
    cluster.start("z")
    runtime_path = os.path.join(p.data_dir, "runtime.json")
    cluster.wait(lambda: os.path.exists(runtime_path), 20, "runtime.json")
    runtime = json.load(open(runtime_path))
    p.http_port = int(runtime["http"].rsplit(":", 1)[1])
    assert runtime["gossip_port"] > 0 and runtime["raft_port"] > 0 and p.http_port > 0
    cluster.wait_leader(timeout_s=20)


def test_the_raft_port_is_held_from_startup_and_a_taken_one_is_a_clear_error(cluster):
    """A spare binds Raft only once invited to vote; until then its port must stay its own
    (another program, or the next test node, took it once, and the invite then timed out
    forever), and a port already taken must stop the node at once, saying which."""
    a = cluster.add("a", extra=["--voters", "1"])
    b = cluster.add("b", extra=["--voters", "1"], join=[f"127.0.0.1:{a.gossip_port}"])
    cluster.start("a")
    cluster.start("b")
    cluster.wait(lambda: len(cluster.members_view(b)) == 2 or None, 30, "b joined as a spare")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            s.bind(("127.0.0.1", b.raft_port))
    # a peer connecting before b's Raft runs is closed at once, so it retries soon
    with socket.create_connection(("127.0.0.1", b.raft_port), timeout=10) as early:
        assert early.recv(1) == b""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        c = cluster.add("c", ports=(free_ports(1)[0], free_ports(1)[0], port))
        cluster.start("c")
        assert c.popen.wait(timeout=30) != 0
    assert f"Raft port 127.0.0.1:{port} cannot be used" in open(c.log_path).read()


def test_graceful_stop_of_the_coordinator_hands_over_and_shows_left(cluster):
    start_three(cluster)
    cluster.wait(voters_everywhere(cluster, 3), 30, "3 voters on every node")
    leader, term = cluster.wait_leader(timeout_s=30)
    assert cluster.stop(leader) == 0
    rest = cluster.running()
    new_leader, new_term = cluster.wait_leader(timeout_s=10, procs=rest, exclude=leader, min_term=term + 1)
    for p in rest:
        cluster.wait(lambda p=p: cluster.members_view(p).get(leader) == "left" or None, 10,
                     f"{p.name} sees {leader} left")
    # a voter that left is removed from the group at once (no spare to bring in)
    cluster.wait(lambda: all(sorted((p.try_get("/v1/status") or {}).get("voters", [])) ==
                             sorted(q.name for q in rest) for p in rest) or None, 20, "the left voter removed")
    assert '"event": "leader_transfer"' in cluster.procs[leader].log_text()


def test_a_voter_back_on_another_raft_port_replaces_its_old_address_so_a_second_loss_keeps_a_quorum(cluster):
    """The Raft group knows its voters by address, gossip by id.  A voter killed and started
    again on another Raft port (a renumbered host) used to leave its old address in the
    group for good, claimed by nobody: with one more voter lost, no quorum remained.  Now
    the leader removes the old address and adds the voter back at its new one, so losing
    another voter afterwards still leaves two of three, and changes still commit."""
    start_three(cluster)
    cluster.wait(voters_everywhere(cluster, 3), 30, "3 voters on every node")
    leader, term = cluster.wait_leader(timeout_s=30)
    moved, other = [n for n in "abc" if n != leader]
    p, lead = cluster.procs[moved], cluster.procs[leader]
    old = f"{p.host}:{p.raft_port}"
    cluster.kill9(moved)
    [port] = free_ports(1)
    p.args[p.args.index("--raft-port") + 1] = str(port)
    p.raft_port = port
    new = f"{p.host}:{port}"
    cluster.start(moved)

    def replaced():
        cfg = ((lead.try_get("/v1/status") or {}).get("raft") or {}).get("config")
        return cfg if cfg and new in cfg and old not in cfg and len(cfg) == 3 else None
    cluster.wait(replaced, 60, f"{moved}'s old Raft address {old} replaced by {new} in the leader's configuration")
    got = cluster.wait(lambda: cluster.agreed_leader() if len(cluster.leaders()) == 3 else None, 30,
                       f"{moved} follows the coordinator again")
    assert got[0] == leader
    assert '"event": "raft_remove"' in lead.log_text() and old in lead.log_text()

    cluster.kill9(other)
    res = Client(lead.url, token=cluster.admin_token()).request(
        "PATCH", "/v1/config", body={"set": {"gossip_fanout": 4}})
    assert res["ok"], res
    cluster.wait(lambda: all(((q.try_get("/v1/config/gossip_fanout") or {}).get("value") == 4)
                             for q in cluster.running()) or None, 15, "the change applied on both survivors")


def test_restarted_node_finds_its_mesh_from_remembered_peers_without_seeds(cluster):
    start_three(cluster)
    cluster.wait(voters_everywhere(cluster, 3), 30, "3 voters on every node")
    leader, term = cluster.wait_leader(timeout_s=30)
    follower = next(n for n in "bc" if n != leader)
    cluster.kill9(follower)
    p = cluster.procs[follower]
    i = p.args.index("--join")
    del p.args[i:i + 2]                 # no seed, no mDNS, no broadcast: only the store
    cluster.start(follower)
    got = cluster.wait(lambda: cluster.agreed_leader() if len(cluster.leaders()) == 3 else None, 30,
                       "the restarted node rejoins from its remembered peers")
    assert got == (leader, term)
    cluster.wait(lambda: cluster.members_view(p) == {"a": "alive", "b": "alive", "c": "alive"} or None, 15,
                 "all alive as seen by the restarted node")
