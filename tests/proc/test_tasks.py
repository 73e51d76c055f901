"""Tasks end to end on real node processes: submit anywhere, run, logs, cancel, drain, chaos."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from tests.cluster import REPO, Cluster

TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")


def post(p, path: str, body=None, timeout_s: float = 10.0, token=True) -> tuple[int, dict]:
    """POST as the mesh's admin (or with ``token``: None for none)."""
    status, doc = p.call("POST", path, body, token=token, timeout_s=timeout_s)
    return status, doc or {}


def submit(p, command, **kw) -> dict:
    status, body = post(p, "/v1/tasks", {"command": command, **kw})
    assert status == 202, body
    return body


def task_on(p, task_id: str) -> dict | None:
    return p.try_get(f"/v1/tasks/{task_id}", timeout_s=2.0)


def wait_state(c: Cluster, p, task_id: str, states=TERMINAL, timeout_s: float = 30.0) -> dict:
    return c.wait(lambda: (t := task_on(p, task_id)) and t["state"] in states and t, timeout_s,
                  f"task {task_id} in {states}", poll_s=0.05)


def text(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode()


def cli(p, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "GALAXY_ADDR": p.url, "NO_COLOR": "1",
           "GALAXY_API_TOKEN": p.token_fn(True)}
    return subprocess.run([sys.executable, "-m", "galaxy", *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s)


def mesh(c: Cluster, names: str, cpu: str = "2") -> None:
    c.start_mesh(names, extra=["--cpu", cpu, "--memory", "4G"])


@pytest.fixture
def three():
    with Cluster() as c:
        mesh(c, "abc")
        yield c


def test_a_task_submitted_anywhere_runs_and_every_node_shows_its_result_and_logs(three):
    c = three
    a, b, cc = (c.procs[n] for n in "abc")
    t = submit(b, ["python3", "-c", "import sys; print('hello from', sys.argv[1]); sys.stderr.write('err\\n')",
                   "galaxy"], resources={"cpu": 0.5, "memory_mb": 128})
    assert t["state"] == "pending" and t["acknowledged_by"] in ("a", "c")
    done = wait_state(c, b, t["id"])
    assert done["state"] == "succeeded" and done["exit_code"] == 0 and done["progress"] == 100
    assert len(done["attempts"]) == 1 and done["attempts"][0]["node"] in "abc"
    for p in (a, cc):     # every node knows the outcome
        assert wait_state(c, p, t["id"])["state"] == "succeeded"
    ran_on = done["attempts"][0]["node"]
    other = next(p for p in (a, b, cc) if p.name != ran_on)
    assert text(f"{other.url}/v1/tasks/{t['id']}/logs") == "hello from galaxy\n"     # forwarded
    assert text(f"{other.url}/v1/tasks/{t['id']}/logs?stream=stderr") == "err\n"
    listed = a.get("/v1/tasks?state=succeeded")
    assert [x["id"] for x in listed["tasks"]] == [t["id"]] and listed["counts"]["succeeded"] == 1
    assert a.get("/v1/status")["tasks"]["succeeded"] == 1


def test_cli_submit_wait_returns_the_exit_code_and_shows_the_task(three):
    c = three
    a = c.procs["a"]
    r = cli(a, "submit", "--retries", "0", "--wait", "--", "sh", "-c", "echo out; exit 3")
    assert r.returncode == 3, r.stderr
    task_id = r.stderr.strip().splitlines()[0]
    shown = cli(a, "task", task_id)
    assert shown.returncode == 0 and "failed" in shown.stdout and "exit code 3" in shown.stdout
    assert cli(a, "logs", task_id).stdout == "out\n"
    r = cli(a, "submit", "--wait", "--shell", "echo $GREETING", "--env", "GREETING=hi")
    assert r.returncode == 0, r.stderr
    listed = cli(a, "tasks", "--json")
    assert {t["state"] for t in json.loads(listed.stdout)["tasks"]} == {"failed", "succeeded"}
    bad = cli(a, "submit", "--cpu", "-1", "--", "true")
    assert bad.returncode == 1 and "resources.cpu" in bad.stderr


def test_timeout_retries_then_fails_and_cancel_kills_a_running_task(three):
    c = three
    a, b = c.procs["a"], c.procs["b"]
    slow = submit(a, ["sleep", "30"], timeout_s=0.5, max_retries=1)
    t = wait_state(c, a, slow["id"], timeout_s=30)
    assert t["state"] == "timed_out" and [x["state"] for x in t["attempts"]] == ["timed_out", "timed_out"]
    long = submit(b, "echo started; sleep 60")
    wait_state(c, a, long["id"], states=("running",))
    status, body = post(a, f"/v1/tasks/{long['id']}/cancel")
    assert status == 202
    t = wait_state(c, b, long["id"], timeout_s=15)
    assert t["state"] == "cancelled"
    status, body = post(a, f"/v1/tasks/{long['id']}/cancel")
    assert status == 409 and body["error"] == "conflict"


def test_a_retry_runs_on_another_node_than_the_one_its_attempt_failed_on(tmp_path):
    """A program installed on node b only: the first attempt goes to a (equal nodes: the
    smaller id) and fails there; the retry avoids a, and so finds b."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    prog = bin_dir / "galaxy-test-only-on-b"
    prog.write_text("#!/bin/sh\necho ran\n")
    prog.chmod(0o755)
    with Cluster() as c:
        c.start_mesh("abc", extra=["--cpu", "2", "--memory", "4G"],
                     env={"b": {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}})
        a = c.procs["a"]
        t = wait_state(c, a, submit(a, [prog.name], max_retries=2)["id"], timeout_s=60)
        nodes = [x["node"] for x in t["attempts"]]
        assert t["state"] == "succeeded" and t["node"] == "b", t
        assert len(set(nodes)) == len(nodes) and "not found" in t["attempts"][0]["reason"], t


def test_bad_submissions_are_refused_with_the_field_named(three):
    a = three.procs["a"]
    for body, words in [({"command": []}, "command"), ({"command": ["true"], "resources": {"gpu": -1}}, "gpu"),
                        ({"command": ["true"], "colour": "red"}, "colour"), ([1], "object")]:
        status, err = post(a, "/v1/tasks", body)
        assert status == 400 and err["error"] == "bad_request" and words in err["message"], err
    status, err = post(a, "/v1/tasks/t-0000000000000000/cancel")
    assert status == 404
    assert a.get("/v1/tasks")["tasks"] == []


def sign_up(p, name: str, role: str = "user") -> str:
    """Open an account (as the admin) and sign it in; its token."""
    password = f"{name}-password-1"
    status, body = post(p, "/v1/accounts", {"name": name, "password": password, "role": role})
    assert status == 201, body
    status, body = post(p, "/v1/auth/token", {"name": name, "password": password}, token=None)
    assert status == 200, body
    return body["token"]


def test_tasks_belong_to_their_submitter_who_pays_and_alone_may_cancel(three):
    c = three
    a, b = c.procs["a"], c.procs["b"]
    alice, bob = sign_up(a, "alice"), sign_up(a, "bob")
    assert post(a, "/v1/mint", {"to": "alice", "amount": 10})[0] == 200
    # nothing changes without a token
    status, body = post(b, "/v1/tasks", {"command": ["true"]}, token=None)
    assert status == 401 and body["error"] == "unauthorized"
    assert post(b, "/v1/nodes/c/drain", {"draining": True}, token=None)[0] == 401
    # alice's task is hers, and its price is held from her account (on another node than she signed in at)
    status, t = post(b, "/v1/tasks", {"command": ["sleep", "60"], "price": 4, "resources": {"cpu": 0.1}},
                     token=alice)
    assert status == 202 and t["owner"] == "alice", t
    account = c.wait(lambda: (s := a.call("GET", "/v1/accounts/alice", token=alice))[0] == 200
                     and s[1]["held"] == 4 and s[1], 20, "alice's price held")
    assert account["balance"] == 6
    status, body = post(b, "/v1/tasks", {"command": ["true"], "owner": "alice"}, token=bob)
    assert status == 403 and "needs role admin" in body["message"]
    assert [x["id"] for x in a.get("/v1/tasks?owner=alice")["tasks"]] == [t["id"]]
    # bob may neither cancel it nor drain a node; alice may cancel it
    wait_state(c, a, t["id"], states=("running",))
    status, body = post(a, f"/v1/tasks/{t['id']}/cancel", token=bob)
    assert status == 403 and body["error"] == "forbidden", body
    status, body = post(a, "/v1/nodes/c/drain", {"draining": True}, token=bob)
    assert status == 403 and "operator" in body["message"]
    assert task_on(a, t["id"])["state"] == "running"
    assert post(a, f"/v1/tasks/{t['id']}/cancel", token=alice)[0] == 202
    assert wait_state(c, b, t["id"], timeout_s=20)["state"] == "cancelled"


def test_a_task_that_fits_no_node_waits_and_says_why(three):
    c = three
    a = c.procs["a"]
    t = submit(a, ["true"], resources={"cpu": 64})
    leader, _ = c.wait_leader()
    for p in c.procs.values():      # only the coordinator plans; the others ask it
        waiting = c.wait(lambda: (x := task_on(p, t["id"])) and x.get("waiting"), 20, f"a waiting reason at {p.name}")
        assert "cpu" in waiting, (p.name, waiting)
        assert task_on(p, t["id"])["state"] == "pending"
    other = next(p for p in c.procs.values() if p.name != leader)
    assert "waiting" not in task_on(other, t["id"] + "?here=1")       # what it knows itself: no plan
    # `galaxy submit --wait` shows it while it waits
    env = {**os.environ, "PYTHONPATH": REPO, "GALAXY_ADDR": other.url, "NO_COLOR": "1", "COLUMNS": "200",
           "GALAXY_API_TOKEN": other.token_fn(True)}
    with subprocess.Popen([sys.executable, "-m", "galaxy", "submit", "--cpu", "64", "--wait", "--", "true"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as w:
        try:
            w.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        w.kill()
        err = w.stderr.read()
    assert "pending: no node has 64 cpu" in err or "never fits" in err, err


def test_input_archive_travels_to_the_worker_and_is_checked(three, tmp_path):
    import io
    import tarfile
    c = three
    a = c.procs["a"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"payload-42\n"
        info = tarfile.TarInfo("data.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "in.tar.gz"
    archive.write_bytes(buf.getvalue())
    r = cli(a, "submit", "--file", str(archive), "--json", "--", "cat", "data.txt")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    # more tasks on the same archive, in one batch and each filling most of a node (1.5 of 2
    # cpus) for a second: spread places them on the other nodes too, which fetch it from a
    # (one at a time, each could end before the next is planned, and all run on a)
    more = {"command": ["sh", "-c", "sleep 1; cat data.txt"], "input": first["input"], "resources": {"cpu": 1.5}}
    status, body = post(a, "/v1/tasks", {"tasks": [more] * 3})
    assert status == 202, body
    ids = [first["id"]] + [t["id"] for t in body["tasks"]]
    ran_on = set()
    for task_id in ids:
        t = wait_state(c, a, task_id)
        assert t["state"] == "succeeded", t
        ran_on.add(t["attempts"][-1]["node"])
        assert text(f"{a.url}/v1/tasks/{task_id}/logs") == "payload-42\n"
    assert len(ran_on) >= 2
    status, err = post(a, "/v1/tasks", {"command": ["true"], "input": "0" * 64})
    assert status == 400 and "input" in err["message"]


def test_drain_moves_no_new_work_there_and_the_node_leaves(three):
    c = three
    a, b, cc = (c.procs[n] for n in "abc")
    status, body = post(a, "/v1/nodes/c/drain", {"draining": True})
    assert status == 202
    ids = [submit(a, ["true"], resources={"cpu": 0.1})["id"] for _ in range(6)]
    for task_id in ids:
        t = wait_state(c, a, task_id)
        assert t["state"] == "succeeded" and t["attempts"][-1]["node"] != "c"
    c.wait(lambda: not cc.alive() or None, 20, "the drained node to exit")
    assert cc.popen.returncode == 0
    c.wait(lambda: c.members_view(a).get("c") == "left" or None, 10, "c left")


def test_a_drained_node_whose_drain_was_undone_while_it_was_away_comes_back_and_works():
    """Its own copy of the drain flag is stale when it restarts: it must not leave on it."""
    with Cluster() as c:
        c.start_mesh("abc", extra=["--cpu", "2", "--memory", "4G"])
        a, cc = c.procs["a"], c.procs["c"]
        assert post(a, "/v1/nodes/c/drain", {"draining": True})[0] == 202
        c.wait(lambda: not cc.alive() or None, 30, "the drained node to exit")
        assert cc.popen.returncode == 0
        c.wait(lambda: c.members_view(a).get("c") == "left" or None, 10, "c left")
        assert post(a, "/v1/nodes/c/drain", {"draining": False})[0] == 202
        c.start("c")                             # with its data dir, which says "draining"
        c.wait(lambda: c.members_view(a).get("c") == "alive" or None, 30, "c back")
        # it takes work again: 8 tasks of a whole cpu each on 6 cpus reach c too
        ids = [submit(a, ["sleep", "0.5"], resources={"cpu": 1.5})["id"] for _ in range(8)]
        ran = {wait_state(c, a, task_id, timeout_s=60)["attempts"][-1]["node"] for task_id in ids}
        assert "c" in ran and cc.alive(), (ran, cc.log_text()[-2000:])


def test_chaos_200_tasks_with_the_coordinator_and_a_worker_killed(tmp_path):
    """Every acknowledged task ends in a terminal state; none is lost; no attempt runs twice at
    once.  200 submissions: 180 single tasks and 20 batches of 5 (280 tasks)."""
    rng = random.Random(7)
    marks = tempfile.mkdtemp(prefix="galaxy-marks-")
    try:
        with Cluster() as c:
            mesh(c, "abcd", cpu="2")
            names = list("abcd")
            acked: list[str] = []
            refused: list[str] = []
            killed_leader = killed_worker = False
            for i in range(200):
                if i == 60 and not killed_leader:
                    leader, _ = c.wait_leader()
                    c.kill9(leader)
                    killed_leader = leader
                if i == 80 and killed_leader:
                    c.start(killed_leader)
                if i == 120 and not killed_worker:
                    leader, _ = c.wait_leader(timeout_s=30)
                    worker = next(n for n in names if n not in (killed_leader, leader))
                    c.kill9(worker)
                    killed_worker = worker
                if i == 150 and killed_worker:
                    c.start(killed_worker)
                cmd = ("echo \"$GALAXY_ATTEMPT $(date +%s%N) start\" >> \"$MARKS/$GALAXY_TASK_ID\"; sleep 0.2; "
                       "echo \"$GALAXY_ATTEMPT $(date +%s%N) end\" >> \"$MARKS/$GALAXY_TASK_ID\"")
                spec = {"command": cmd, "env": {"MARKS": marks}, "resources": {"cpu": 0.5, "memory_mb": 64},
                        "max_retries": 3}
                # every tenth submission is a batch of 5 (stored as one batch document)
                body_sent = {"tasks": [spec] * 5} if i % 10 == 9 else spec
                # a client whose node is down or still starting tries another, as a real one would
                for name in rng.sample(names, len(names)):
                    p = c.procs[name]
                    try:
                        status, body = post(p, "/v1/tasks", body_sent, timeout_s=5)
                    except OSError as e:
                        refused.append(f"{p.name}: {e}")
                        continue      # the node died under us or is starting: not acknowledged
                    if status == 202:
                        acked.extend([t["id"] for t in body["tasks"]] if "tasks" in body_sent else [body["id"]])
                        break
                    refused.append(f"{p.name}: {status} {body}")
            assert len(acked) >= 250, refused
            # both killed nodes were started again: one that is down now died by itself
            died = {n: c.procs[n].log_text()[-3000:] for n in names if not c.procs[n].alive()}
            assert not died, died
            a = c.procs["a"]

            def all_terminal():
                listed = a.try_get("/v1/tasks?limit=1000", timeout_s=5)
                if listed is None:
                    return False    # a was restarted a moment ago and does not listen yet
                states = {t["id"]: t["state"] for t in listed["tasks"]}
                return all(states.get(t) in TERMINAL for t in acked) and states
            states = c.wait(all_terminal, 180, "every acknowledged task terminal", poll_s=1.0)
            assert not [t for t in acked if states[t] != "succeeded"], {t: states[t] for t in acked
                                                                       if states[t] != "succeeded"}
            for task_id in acked:
                with open(os.path.join(marks, task_id)) as f:
                    lines = [line.split() for line in f.read().splitlines()]
                t = a.get(f"/v1/tasks/{task_id}")
                won = str(t["attempts"][-1]["attempt"])
                assert [x[0] for x in lines if x[2] == "end"].count(won) == 1, (task_id, lines)
                # no two attempts of one task overlapped: each start follows the previous attempt's last line
                spans: dict[str, list[int]] = {}
                for attempt, ns, _ in lines:
                    spans.setdefault(attempt, []).append(int(ns))
                ordered = sorted(spans.values(), key=min)
                for x, y in zip(ordered, ordered[1:]):
                    assert max(x) <= min(y), (task_id, lines)
    finally:
        shutil.rmtree(marks, ignore_errors=True)


@pytest.mark.parametrize("batch", [False, True, "concurrent"], ids=["one_per_post", "batch", "concurrent_posts"])
def test_killing_the_accepting_node_right_after_its_202_loses_nothing(three, batch):
    c = three
    a, b, cc = (c.procs[n] for n in "abc")
    if batch == "concurrent":     # single POSTs at once: written together (group submission)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            ids = list(pool.map(lambda _: submit(b, ["sh", "-c", "sleep 1; echo done"],
                                                 resources={"cpu": 0.5})["id"], range(12)))
    elif batch:
        status, body = post(b, "/v1/tasks", {"tasks": [{"command": ["sh", "-c", "sleep 1; echo done"],
                                                        "resources": {"cpu": 0.5}}] * 5})
        assert status == 202, body
        ids = [t["id"] for t in body["tasks"]]
    else:
        ids = [submit(b, ["sh", "-c", "sleep 1; echo done"], resources={"cpu": 0.5})["id"] for _ in range(5)]
    c.kill9("b")
    for task_id in ids:
        t = wait_state(c, a, task_id, timeout_s=60)
        assert t["state"] == "succeeded", t
    c.start("b")        # and the restarted node serves them too, from its own disk and the others
    for task_id in ids:
        assert wait_state(c, b, task_id, timeout_s=30)["state"] == "succeeded"


def test_a_task_on_a_killed_worker_runs_again_elsewhere(three):
    c = three
    a, b, cc = (c.procs[n] for n in "abc")
    leader, _ = c.wait_leader()
    # pin it to a node that is not the coordinator, by filling the others' cpu first? Simpler: retry until
    # a task lands on a non-coordinator, then kill that node.
    for _ in range(10):
        t = submit(a, ["sh", "-c", "sleep 3; echo finished"], resources={"cpu": 0.5}, max_retries=2)
        running = wait_state(c, a, t["id"], states=("running",))
        if running["node"] != leader:
            break
    victim = running["node"]
    c.kill9(victim)
    survivor = next(p for p in (a, b, cc) if p.name != victim)
    done = wait_state(c, survivor, t["id"], timeout_s=60)
    assert done["state"] == "succeeded", done
    assert [x["state"] for x in done["attempts"]] == ["lost", "succeeded"]
    assert done["attempts"][0]["node"] == victim and done["attempts"][1]["node"] != victim
    assert "dead" in done["attempts"][0]["reason"]


def _spans(marks: str, task_id: str) -> dict[str, tuple[int, int]]:
    """attempt -> (start ns, end ns) from the lines a task wrote (``attempt ns start|end``)."""
    spans: dict[str, list[int]] = {}
    path = os.path.join(marks, task_id)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        for attempt, ns, _ in (line.split() for line in f.read().splitlines()):
            spans.setdefault(attempt, []).append(int(ns))
    return {a: (min(v), max(v)) for a, v in spans.items()}


MARKED = ("echo \"$GALAXY_ATTEMPT $(date +%s%N) start\" >> \"$MARKS/$GALAXY_TASK_ID\"; sleep {s}; "
          "echo \"$GALAXY_ATTEMPT $(date +%s%N) end\" >> \"$MARKS/$GALAXY_TASK_ID\"")


def test_worker_queues_run_back_to_back_never_more_than_fits_and_a_queued_task_can_be_cancelled(three):
    """cpu 2 per node and tasks of 2 cpu: each node runs one and queues up to two more
    (worker_queue_depth -1: its cores).  Queued tasks read scheduled with their node; a
    cancelled one never runs; no node ever runs two at once; the rest all succeed."""
    c = three
    a = c.procs["a"]
    marks = tempfile.mkdtemp(prefix="galaxy-marks-")
    try:
        ids = [submit(a, MARKED.format(s=0.6), env={"MARKS": marks}, resources={"cpu": 2, "memory_mb": 64})["id"]
               for _ in range(12)]

        def queued():     # a task scheduled on a node that is running another one: waiting in its queue
            tasks = {t["id"]: t for t in a.get("/v1/tasks?limit=1000")["tasks"] if t["id"] in ids}
            busy = {t["node"] for t in tasks.values() if t["state"] == "running"}
            waiting = [t for t in tasks.values() if t["state"] == "scheduled" and t["node"] in busy
                       and not _spans(marks, t["id"])]
            return waiting or None
        victim = c.wait(queued, 30, "a task waiting in a worker's queue")[-1]
        status, body = post(a, f"/v1/tasks/{victim['id']}/cancel")
        assert status == 202, body
        done = {i: wait_state(c, a, i, timeout_s=60) for i in ids}
        assert done[victim["id"]]["state"] == "cancelled" and not _spans(marks, victim["id"])
        assert all(t["state"] == "succeeded" for i, t in done.items() if i != victim["id"]), done
        per_node: dict[str, list[tuple[int, int]]] = {}
        for i, t in done.items():
            for attempt, span in _spans(marks, i).items():
                per_node.setdefault(t["attempts"][int(attempt) - 1]["node"], []).append(span)
        for node, spans in per_node.items():
            spans.sort()
            for x, y in zip(spans, spans[1:]):
                assert x[1] <= y[0], f"{node} ran two 2-cpu tasks at once: {x} {y}"
    finally:
        subprocess.run(["rm", "-rf", marks], check=False)


def test_queued_tasks_on_a_killed_worker_are_retried_and_a_draining_node_runs_its_queue(three):
    """Tasks queued on a node that dies are lost and retried elsewhere; tasks queued on a node
    being drained stay and run there before it leaves.  (The killed node comes back once its
    tasks are given up: with one of three gone and another leaving, Raft needs it.)"""
    c = three
    leader, _ = c.wait_leader()
    victim, drained = [n for n in "abc" if n != leader]
    p = c.procs[leader]
    marks = tempfile.mkdtemp(prefix="galaxy-marks-")
    try:
        ids = [submit(p, MARKED.format(s=2.5), env={"MARKS": marks}, max_retries=2,
                      resources={"cpu": 2, "memory_mb": 64})["id"] for _ in range(9)]

        def where() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for t in p.get("/v1/tasks?limit=1000")["tasks"]:
                if t["id"] in ids and t["state"] in ("scheduled", "running"):
                    out.setdefault(t["node"], []).append(t["id"])
            return out
        c.wait(lambda: (w := where()) and len(w.get(victim, [])) >= 2 and len(w.get(drained, [])) >= 2 or None,
               30, "queued work on both workers")
        status, _ = post(p, f"/v1/nodes/{drained}/drain", {"draining": True})
        assert status == 202
        w = where()
        on_drained, on_victim = w.get(drained, []), w.get(victim, [])
        c.kill9(victim)
        c.wait(lambda: all(any(a["state"] == "lost" for a in task_on(p, i)["attempts"]) for i in on_victim) or None,
               30, "the dead node's tasks given up")
        c.start(victim)
        done = {i: wait_state(c, p, i, timeout_s=90) for i in ids}
        assert all(t["state"] == "succeeded" for t in done.values()), done
        for i in on_victim:       # started there or only queued, the attempt on the dead node is given up:
            # lost (the coordinator), or failed by the restarted node itself, whichever won the tie
            states = [x["state"] for x in done[i]["attempts"]]
            assert states in (["lost", "succeeded"], ["failed", "succeeded"]), done[i]
            assert done[i]["attempts"][0]["node"] == victim
        for i in on_drained:      # what was queued on the draining node stays and runs there
            assert [(x["node"], x["state"]) for x in done[i]["attempts"]] == [(drained, "succeeded")], done[i]
        c.wait(lambda: not c.procs[drained].alive() or None, 30, "the drained node to exit")
        assert c.procs[drained].popen.returncode == 0
    finally:
        subprocess.run(["rm", "-rf", marks], check=False)


def test_cli_submit_count_sends_batches_each_acknowledged_by_another_node(three):
    c = three
    a = c.procs["a"]
    r = cli(a, "submit", "--count", "150", "--cpu", "0.1", "--memory", "16M", "--", "true")
    assert r.returncode == 0, r.stderr
    ids = r.stdout.split()
    assert len(ids) == 150 and len(set(ids)) == 150
    for task_id in ids:      # each on another node's disk too: b and c know them all at once
        assert task_on(c.procs["b"], task_id) is not None or task_on(c.procs["c"], task_id) is not None
    for task_id in ids:
        assert wait_state(c, a, task_id, timeout_s=120)["state"] == "succeeded"
    r = cli(a, "submit", "--count", "2", "--wait", "--", "true")
    assert r.returncode == 2 and "--wait" in r.stderr


def test_a_long_backlog_behind_tasks_no_node_can_take_all_runs_and_the_rest_say_why():
    """More pending tasks than a plan between full ones looks at (TaskService._top_pending),
    the oldest of them needing a label no node has: the others are not stuck behind them."""
    lifted = {"GALAXY_SUBMIT_BURST": "10000", "GALAXY_SUBMIT_ACCOUNT_BURST": "10000"}   # 480 at once
    with Cluster(env=lifted) as c:
        mesh(c, "abc")
        _long_backlog(c)


def _long_backlog(c: Cluster) -> None:
    a, b = c.procs["a"], c.procs["b"]
    nowhere = {"command": ["true"], "resources": {"cpu": 0.5}, "constraints": {"labels": {"zone": "nowhere"}}}
    status, body = post(a, "/v1/tasks", {"tasks": [nowhere] * 80})
    assert status == 202, body
    stuck = [t["id"] for t in body["tasks"]]
    ids = []
    for i in range(4):
        status, body = post(b if i % 2 else a, "/v1/tasks", {"tasks": [{"command": ["true"], "resources": {"cpu": 0.5}}] * 100})
        assert status == 202, body
        ids += [t["id"] for t in body["tasks"]]
    for task_id in ids:
        assert wait_state(c, a, task_id, timeout_s=120)["state"] == "succeeded"
    leader = c.procs[c.wait_leader()[0]]
    for task_id in stuck:
        t = c.wait(lambda: (x := task_on(leader, task_id)) and x.get("waiting") and x, 20, "a waiting reason")
        assert t["state"] == "pending" and "zone=nowhere" in t["waiting"], t


def _capped_popen(cap_bytes: int):
    """Start a node the way `ulimit -v` would: a hard address-space cap on it and its tasks."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))      # lowering needs no privilege
    return lambda argv, **kw: subprocess.Popen(argv, preexec_fn=cap, **kw)


def test_tasks_go_only_where_a_hard_ulimit_v_lets_them_have_their_memory():
    """A node under a hard address-space cap cannot give a task a larger memory limit: the
    scheduler knows its cap (gossiped) and sends such tasks elsewhere, or says why they wait."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY and hard < 1000 << 20:
        pytest.skip(f"this machine caps address space at {hard >> 20} MiB, below the test's caps")
    with Cluster() as c:
        extra = ["--cpu", "2", "--memory", "8G"]
        a = c.add("a", extra=extra, popen=_capped_popen(1000 << 20))
        c.add("b", join=[a.gossip_addr], extra=extra, popen=_capped_popen(900 << 20))
        c.start("a")
        c.start("b")
        c.wait(lambda: len(c.members_view(a)) == 2 and len(c.members_view(c.procs["b"])) == 2, 30, "2 members")
        b = c.procs["b"]
        nodes = {m["id"]: m for m in c.wait(lambda: b.try_get("/v1/members"), 10, "members")["members"]}
        assert nodes["a"]["resources"]["task_memory_max_mb"] == 1000
        assert nodes["b"]["resources"]["task_memory_max_mb"] == 900
        # more than b's cap, within a's: every one runs on a, however busy a and idle b
        ids = [t["id"] for t in post(b, "/v1/tasks", {"tasks": [{"command": ["sleep", "0.2"],
                                                                "resources": {"cpu": 1, "memory_mb": 950}}] * 4})[1]["tasks"]]
        small = submit(b, ["true"], resources={"cpu": 0.5, "memory_mb": 64})
        for task_id in ids:
            done = wait_state(c, b, task_id, timeout_s=60)
            assert done["state"] == "succeeded" and [x["node"] for x in done["attempts"]] == ["a"], done
        assert wait_state(c, b, small["id"])["state"] == "succeeded"
        # more than any cap: it waits, and says which cap
        big = submit(b, ["true"], resources={"cpu": 0.5, "memory_mb": 1200})
        leader = c.procs[c.wait_leader()[0]]
        t = c.wait(lambda: (x := task_on(leader, big["id"])) and x.get("waiting") and x, 20, "a waiting reason")
        assert t["state"] == "pending" and "at most 1000 MB" in t["waiting"] and "ulimit -v" in t["waiting"], t
