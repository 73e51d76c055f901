"""A voter that leaves (drain, graceful stop) on real node processes: the survivors keep a
coordinator, even when the one leaving is the coordinator and only two voters are left.

Raft needs a majority of the configuration to commit anything, removing a voter included.
With two voters, once one has gone the other is alone in a group of two and can neither
elect itself nor remove the one that left: it used to show the departed coordinator
forever and place no task.  So a leaving voter now has itself removed from the group
(handing leadership over first when it leads) before it stops Raft."""

from __future__ import annotations

import pytest

from tests.cluster import Cluster, Proc

TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")


@pytest.fixture
def cluster():
    with Cluster() as c:
        yield c


def drain(p: Proc, node_id: str) -> None:
    status, body = p.call("POST", f"/v1/nodes/{node_id}/drain", {"draining": True})
    assert status == 202, body


def runs_a_task(c: Cluster, p: Proc, timeout_s: float = 20.0) -> None:
    status, body = p.call("POST", "/v1/tasks", {"command": ["true"], "resources": {"cpu": 0.1}})
    assert status == 202, body
    task = c.wait(lambda: (t := p.try_get(f"/v1/tasks/{body['id']}", timeout_s=2.0)) and t["state"] in TERMINAL
                  and t, timeout_s, f"task {body['id']} ends on {p.name}", poll_s=0.05)
    assert task["state"] == "succeeded" and task["attempts"][-1]["node"] == p.name, task


def survivor_leads(c: Cluster, left: str, rest: list[Proc], term: int) -> tuple[str, int]:
    """Every survivor names a survivor as coordinator in a later term, lists only survivors
    as voters, and sees ``left`` as left; no warning about the coordinator."""
    leader, new_term = c.wait_leader(timeout_s=15, procs=rest, exclude=left, min_term=term + 1)
    names = sorted(p.name for p in rest)
    c.wait(lambda: all(sorted((p.try_get("/v1/status") or {}).get("voters", [])) == names for p in rest) or None,
           15, f"voters {names} everywhere")
    for p in rest:
        c.wait(lambda p=p: c.members_view(p).get(left) == "left" or None, 10, f"{p.name} sees {left} left")
        status = p.get("/v1/status")
        assert status["leader"]["leader"] == leader, status["leader"]
        assert not [w for w in status["warnings"] if w.startswith("no coordinator")], status["warnings"]
    return leader, new_term


def removed_before_stopping(p: Proc, c: Cluster) -> None:
    """The leaver's log says the group removed it (not that it gave up waiting).  On
    failure the others' logs come too: the coordinator's says why it did not remove it."""
    text = p.log_text()
    others = "\n".join(f"--- {q.name}:\n{q.log_text()[-4000:]}" for q in c.procs.values() if q is not p)
    assert '"how": "removed"' in text and '"event": "leave_timeout"' not in text, \
        f"--- {p.name}:\n{text[-3000:]}\n{others}"


@pytest.mark.parametrize("how", ["drained", "stopped"])
def test_the_coordinator_of_two_leaving_leaves_a_survivor_that_coordinates(cluster, how):
    c = cluster
    c.start_mesh("ab", extra=["--cpu", "2", "--memory", "4G"])
    leader, term = c.wait_leader(timeout_s=30)
    other = c.procs["b" if leader == "a" else "a"]
    if how == "drained":
        drain(other, leader)
        c.wait(lambda: not c.procs[leader].alive() or None, 20, f"the drained coordinator {leader} exits")
        assert c.procs[leader].popen.returncode == 0
    else:
        assert c.stop(leader) == 0          # SIGTERM: a graceful stop
    removed_before_stopping(c.procs[leader], c)
    survivor_leads(c, leader, [other], term)
    runs_a_task(c, other)


def test_draining_two_of_three_one_after_the_other_leaves_a_survivor_that_coordinates(cluster):
    c = cluster
    c.start_mesh("abc", extra=["--cpu", "2", "--memory", "4G"])
    leader, term = c.wait_leader(timeout_s=30)
    first = next(n for n in "abc" if n != leader)
    rest = [c.procs[n] for n in "abc" if n != first]
    drain(rest[0], first)
    c.wait(lambda: not c.procs[first].alive() or None, 20, f"the drained node {first} exits")
    removed_before_stopping(c.procs[first], c)
    leader, term = survivor_leads(c, first, rest, term - 1)
    last = next(p for p in rest if p.name != leader)
    drain(last, leader)
    c.wait(lambda: not c.procs[leader].alive() or None, 20, f"the drained coordinator {leader} exits")
    removed_before_stopping(c.procs[leader], c)
    survivor_leads(c, leader, [last], term)
    runs_a_task(c, last)


def test_a_voter_whose_only_peer_crashed_names_no_coordinator_and_warns(cluster):
    """kill -9 of the coordinator of two: the survivor has no quorum (nothing removed the
    crashed voter) and must say so, not keep naming the dead coordinator."""
    c = cluster
    c.start_mesh("ab")
    leader, _ = c.wait_leader(timeout_s=30)
    other = c.procs["b" if leader == "a" else "a"]
    c.wait(lambda: any(m["id"] == other.name and m["raft_state"] == "follower"
                       for m in (other.try_get("/v1/members") or {}).get("members", [])) or None,
           10, f"{other.name} follows {leader} in Raft")
    c.kill9(leader)
    status = c.wait(lambda: (s := other.try_get("/v1/status")) and s["leader"]["leader"] is None and s, 10,
                    f"{other.name} names no coordinator")
    assert any(w.startswith("no coordinator") for w in status["warnings"]), status["warnings"]
    assert other.get("/v1/leader")["leader"] is None
