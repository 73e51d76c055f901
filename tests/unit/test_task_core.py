"""Task spec validation, transitions and the state lattice (galaxy/tasks/core.py)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy.gossip.replica import Lattice, Replica
from galaxy.tasks import core as tc

T0 = 1_700_000_000_000


def spec(**kw) -> tc.TaskSpec:
    body = {"command": ["true"], **kw}
    return tc.parse_spec(body)[0]


# ---- parsing ---------------------------------------------------------------------------------

def test_a_full_submission_parses_with_every_field():
    s, owner = tc.parse_spec({
        "command": ["python", "-c", "print(42)"], "env": {"A": "1"},
        "resources": {"cpu": 0.5, "memory_mb": 512, "gpu": 1}, "timeout_s": 60, "max_retries": 3,
        "priority": 5, "constraints": {"labels": {"zone": "a"}, "min_trust": "medium"}, "price": 7,
        "input": "a" * 64, "name": "job", "owner": "alice"})
    assert s.argv == ("python", "-c", "print(42)") and s.shell == ""
    assert (s.cpu, s.memory_mb, s.gpu, s.timeout_s, s.max_retries, s.priority) == (0.5, 512, 1, 60.0, 3, 5)
    assert s.labels == {"zone": "a"} and s.min_trust == "medium" and s.price == 7 and owner == "alice"
    assert tc.TaskSpec.from_value(s.to_value()) == s


def test_a_string_command_is_a_shell_command_and_defaults_apply():
    s, owner = tc.parse_spec({"command": "echo hi | wc -c"})
    assert s.shell == "echo hi | wc -c" and s.argv == () and owner == ""
    assert (s.cpu, s.memory_mb, s.gpu, s.max_retries, s.timeout_s) == (1.0, 256, 0, 2, 0.0)


@pytest.mark.parametrize("body, field, words", [
    ({}, "command", "required"),
    ({"command": []}, "command", "empty"),
    ({"command": ["true"], "env": {"GALAXY_TASK_ID": "x"}}, "env.GALAXY_TASK_ID", "set by Galaxy"),
    ({"command": ["true"], "resources": {"cpu": 0}}, "resources.cpu", "between 0.01"),
    ({"command": ["true"], "resources": {"memory_mb": 0}}, "resources.memory_mb", "between 1"),
    ({"command": "   "}, "command", "empty"),
    ({"command": 5}, "command", "list of strings"),
    ({"command": ["a", 3]}, "command[1]", "string"),
    ({"command": [""]}, "command[0]", "empty"),
    ({"command": ["x" * 9000]}, "command[0]", "longer"),
    ({"command": ["true"], "bogus": 1}, "bogus", "unknown field"),
    ({"command": ["true"], "resources": {"cpus": 1}}, "resources.cpus", "unknown field"),
    ({"command": ["true"], "resources": {"cpu": -1}}, "resources.cpu", "between"),
    ({"command": ["true"], "resources": {"cpu": float("nan")}}, "resources.cpu", "number"),
    ({"command": ["true"], "resources": {"memory_mb": 1.5}}, "resources.memory_mb", "whole number"),
    ({"command": ["true"], "resources": {"gpu": True}}, "resources.gpu", "whole number"),
    ({"command": ["true"], "resources": {"gpu": 65}}, "resources.gpu", "between"),
    ({"command": ["true"], "timeout_s": "60"}, "timeout_s", "number"),
    ({"command": ["true"], "max_retries": 11}, "max_retries", "between"),
    ({"command": ["true"], "priority": 1000}, "priority", "between"),
    ({"command": ["true"], "env": {"1A": "x"}}, "env", "bad variable name"),
    ({"command": ["true"], "env": {"A": 1}}, "env.A", "string"),
    ({"command": ["true"], "env": []}, "env", "object"),
    ({"command": ["true"], "constraints": {"min_trust": "max"}}, "constraints.min_trust", "one of"),
    ({"command": ["true"], "constraints": {"labels": {"a b": "x"}}}, "constraints.labels", "bad label"),
    ({"command": ["true"], "constraints": {"labels": {"zone": "a=b"}}}, "constraints.labels.zone", "no node can have"),
    ({"command": ["true"], "constraints": {"labels": {"zone": "a\x1bb"}}}, "constraints.labels.zone", "no node can"),
    ({"command": ["true"], "constraints": {"labels": {"zone": "x" * 129}}}, "constraints.labels.zone", "no node can"),
    ({"command": ["true"], "input": "xyz"}, "input", "sha256"),
    ({"command": ["true"], "owner": "Bob!"}, "owner", "letter"),
    ({"command": ["true"], "price": -1}, "price", "between"),
    ([1, 2], "", "object"),
])
def test_bad_submissions_name_the_field_and_why(body, field, words):
    with pytest.raises(tc.SpecError) as e:
        tc.parse_spec(body)
    assert e.value.field == field and words in e.value.message


def test_a_maximal_task_document_fits_one_replicated_document():
    s = spec(env={f"V{i}": "x" * 100 for i in range(60)}, name="n" * 128,
             constraints={"labels": {f"l{i:02d}" + "k" * 60: "v" * 128 for i in range(32)}})
    t = tc.new_task("t-" + "0" * 16, s, "alice", "n-1", T0)
    for a in range(s.max_retries + 1):
        t = tc.schedule(t, "n-" + "x" * 60, 10**9, T0)
        t = tc.start(t, t.node, t.attempt, T0)
        t = tc.finish(t, t.node, t.attempt, tc.FAILED, 1, "r" * 5000, T0)
    r = Replica("n-1", {tc.TASK_TYPE: Lattice(lambda d: tc.rank(d.value))})
    r.put(T0, tc.TASK_TYPE, t.id, t.to_value())      # raises when too large


def test_a_batch_lists_each_spec_once_splits_by_size_and_reads_back_as_pending_tasks():
    from galaxy.gossip.replica import VALUE_BYTES_MAX, pack_value
    env = {f"V{i}": "x" * 100 for i in range(60)}
    small, bigs = spec(), [spec(env=env, name=f"job{i}") for i in range(40)]
    tasks = [tc.new_task(f"t-{i:016x}", bigs[i] if i % 2 else small, "alice" if i < 3 else "b" * 63, "n-1", T0)
             for i in range(40)]
    values = tc.batch_values(tasks, VALUE_BYTES_MAX)
    assert len(values) > 1                               # 20 big specs (~6.5 KB each) need several
    for v in values:
        assert len(pack_value(v)) <= VALUE_BYTES_MAX     # each fits one replicated document
        assert len(v["specs"]) <= 5                      # each distinct spec stored once per document
        assert len({json.dumps(x, sort_keys=True) for x in v["specs"]}) == len(v["specs"])
    back = [t for v in values for t in tc.batch_tasks(v)]
    assert back == tasks                                 # the same pending tasks, in order
    one = tc.batch_values([tasks[0]] * 1000, VALUE_BYTES_MAX)
    assert len(one) == 1 and len(one[0]["specs"]) == 1 and len(pack_value(one[0])) < 30_000


@pytest.mark.parametrize("bad", [
    {"tasks": [["t-" + "0" * 16, "alice", 1]]},          # names a spec the batch lacks
    {"tasks": [["x-1", "alice", 0]]},                     # not a task id
    {"tasks": [["t-" + "0" * 16, 7, 0]]},                 # owner not a str
    {"submitted_ms": "now"},
    {"specs": [{"argv": ["true"]}]},                      # a spec missing fields
    {"tasks": "all"},
])
def test_a_malformed_batch_is_refused(bad):
    v = {**tc.batch_values([tc.new_task("t-" + "0" * 16, spec(), "alice", "n-1", T0)], 30_000)[0], **bad}
    with pytest.raises((KeyError, TypeError, ValueError)):
        tc.batch_tasks(v)


def test_an_assignment_carries_scheduled_tasks_of_one_node_and_reads_back_the_same():
    from galaxy.gossip.replica import VALUE_BYTES_MAX, pack_value
    env = {f"V{i}": "x" * 100 for i in range(60)}
    tasks = [tc.schedule(tc.new_task(f"t-{i:016x}", spec(env=env, name=f"j{i % 7}"), "alice", "n-1", T0),
                         "n-2", 3, T0 + i) for i in range(40)]
    values = tc.assign_values(tasks, VALUE_BYTES_MAX)
    assert len(values) > 1 and all(v["node"] == "n-2" for v in values)
    for v in values:
        assert len(pack_value(v)) <= VALUE_BYTES_MAX
        assert len({json.dumps(x, sort_keys=True) for x in v["specs"]}) == len(v["specs"])
    assert [t for v in values for t in tc.assigned_tasks(v)] == tasks
    v = values[0]
    for bad in ({**v, "node": "n-3"},                                       # not the node it names
                _entry_with(v, STATE_AT, "succeeded"),                      # not an assignment
                _entry_with(v, tc.ENTRY_SPEC_AT, 99),
                _entry_with(v, tc.ENTRY_SPEC_AT, "0"),
                _entry_with(v, ATTEMPT_AT, 2),                              # breaks the invariants
                {**v, "tasks": [v["tasks"][0][:tc.ENTRY_SPEC_AT]]},          # fields missing
                {**v, "tasks": [7]}):
        with pytest.raises((KeyError, TypeError, ValueError, AssertionError)):
            tc.assigned_tasks(bad)
    assert tc.assigned_tasks(_older_layout(v, tc.assigned_tasks(v))) == tc.assigned_tasks(v)
    assert tc.rank_of(tasks[0]) == tc.rank(tasks[0].to_value())



def test_a_result_carries_tasks_ended_on_its_node_and_reads_back_the_same():
    from galaxy.gossip.replica import VALUE_BYTES_MAX, pack_value
    env = {f"V{i}": "x" * 100 for i in range(60)}
    tasks = []
    for i in range(40):
        t = tc.schedule(tc.new_task(f"t-{i:016x}", spec(env=env, name=f"j{i % 7}", max_retries=0), "alice", "n-1", T0),
                        "n-2", 3, T0)
        t = tc.start(t, "n-2", 1, T0 + 1)
        outcome = (tc.SUCCEEDED, tc.FAILED, tc.TIMED_OUT)[i % 3]
        tasks.append(tc.finish(t, "n-2", 1, outcome, 0 if i % 3 == 0 else 1, "why", T0 + 2 + i))
    values = tc.result_values(tasks, VALUE_BYTES_MAX, "n-2")
    assert len(values) > 1 and all(v["node"] == "n-2" for v in values)
    for v in values:
        assert len(pack_value(v)) <= VALUE_BYTES_MAX
    assert [t for v in values for t in tc.ended_tasks(v)] == tasks
    v = values[0]
    running = tc.start(tc.schedule(tc.new_task("t-" + "f" * 16, spec(), "alice", "n-1", T0), "n-2", 3, T0), "n-2", 1, T0)
    for bad in ({**v, "node": "n-3"},                                       # ended elsewhere
                {**v, "tasks": [{**running.to_value(), "spec": 0}]},        # not ended (older layout)
                {**v, "tasks": [tc._entry(running, 0)]},                    # not ended
                _entry_with(v, tc.ENTRY_SPEC_AT, 99),
                _entry_with(v, ATTEMPT_AT, 2)):                             # breaks the invariants
        with pytest.raises((KeyError, TypeError, ValueError, AssertionError)):
            tc.ended_tasks(bad)
    assert tc.ended_tasks(_older_layout(v, tc.ended_tasks(v))) == tc.ended_tasks(v)
    # a later release's entry may carry more fields, each attempt too: read as far as known
    longer = [*v["tasks"][0], "later"]
    longer[tc.ENTRY_SPEC_AT + 1] = [[*a, "later"] for a in longer[tc.ENTRY_SPEC_AT + 1]]
    assert tc.ended_tasks({**v, "tasks": [longer]}) == tc.ended_tasks(v)[:1]


STATE_AT, ATTEMPT_AT = 4, 5

_plain = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
                      lambda kids: st.lists(kids, max_size=16) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                      max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(_plain, max_size=3), st.integers(0, 14), st.sampled_from(["assign", "result"]),
       st.sampled_from(sorted(spec().to_value())), _plain)
def test_any_entry_a_peer_sends_reads_back_or_raises_what_the_index_catches(entries, at, kind, spec_field,
                                                                            spec_value):
    """The index drops a bundle whose reader raises KeyError, TypeError, ValueError or
    AssertionError (a document no writer here made); nothing else may escape."""
    ended = tc.finish(tc.start(tc.schedule(tc.new_task("t-" + "e" * 16, spec(), "alice", "n-1", T0), "n-2", 3, T0),
                               "n-2", 1, T0), "n-2", 1, tc.SUCCEEDED, 0, "", T0)
    v = (tc.result_values if kind == "result" else lambda ts, n, _: tc.assign_values(ts, n))(
        [ended if kind == "result" else tc.schedule(tc.new_task("t-" + "e" * 16, spec(), "alice", "n-1", T0),
                                                    "n-2", 3, T0)], 30_000, "n-2")[0]
    mutated = [list(v["tasks"][0])]
    if entries:
        mutated[0][at] = entries[0]
    mutated += entries[1:]
    specs = [{**v["specs"][0], spec_field: spec_value}] if len(entries) == 2 else v["specs"]
    read = tc.ended_tasks if kind == "result" else tc.assigned_tasks
    try:
        tasks = read({**v, "specs": specs, "tasks": mutated})
    except (KeyError, TypeError, ValueError, AssertionError):
        return
    for t in tasks:             # what the index and the scheduler do with each task read
        tc.rank_of(t), tc.view(t)
        s = t.spec
        assert s.cpu + s.memory_mb + s.gpu + s.priority + s.max_retries + s.price + s.timeout_s >= -1e300


def _entry_with(v: dict, at: int, value) -> dict:
    """``v`` with its first entry's field ``at`` changed to ``value`` (and no other entry)."""
    e = list(v["tasks"][0])
    e[at] = value
    return {**v, "tasks": [e]}


def _older_layout(v: dict, tasks) -> dict:
    """``v`` as releases before entries were lists wrote it: each entry the task's value."""
    return {**v, "tasks": [{**t.to_value(), "spec": e[tc.ENTRY_SPEC_AT]} for t, e in zip(tasks, v["tasks"])]}

# ---- transitions -------------------------------------------------------------------------------

def test_happy_path_pending_scheduled_running_succeeded():
    t = tc.new_task("t-1", spec(), "alice", "n-a", T0)
    assert t.state == tc.PENDING and t.attempt == 0
    t = tc.schedule(t, "n-b", 3, T0 + 1)
    assert (t.state, t.attempt, t.node, t.term) == (tc.SCHEDULED, 1, "n-b", 3)
    t = tc.start(t, "n-b", 1, T0 + 2)
    t = tc.set_progress(t, "n-b", 1, 140, T0 + 3)
    assert t.progress == 100
    t = tc.finish(t, "n-b", 1, tc.SUCCEEDED, 0, "exit code 0", T0 + 4)
    assert (t.state, t.node, t.exit_code, t.attempts[0].state) == (tc.SUCCEEDED, "", 0, tc.SUCCEEDED)
    assert tc.Task.from_value(t.to_value()) == t
    for step in (lambda: tc.schedule(t, "n-b", 3, T0), lambda: tc.cancel(t, T0),
                 lambda: tc.lost(t, "gone", T0), lambda: tc.finish(t, "n-b", 1, tc.FAILED, 1, "", T0)):
        with pytest.raises(tc.Refused):
            step()


def test_failures_retry_until_attempts_run_out():
    t = tc.new_task("t-1", spec(max_retries=1), "alice", "n-a", T0)
    t = tc.start(tc.schedule(t, "n-b", 1, T0), "n-b", 1, T0)
    t = tc.finish(t, "n-b", 1, tc.FAILED, 3, "exit code 3", T0)
    assert (t.state, t.attempt, t.exit_code) == (tc.PENDING, 1, 3)
    t = tc.schedule(t, "n-c", 1, T0)
    running = tc.view(tc.start(t, "n-c", 2, T0))       # the retry's own: nothing of attempt 1's end
    assert (running["exit_code"], running["reason"], running["attempts"][0]["exit_code"]) == (None, "", 3)
    t = tc.lost(t, "node n-c was declared dead", T0)
    assert t.state == tc.FAILED and t.attempts[-1].state == tc.LOST and "dead" in t.reason
    with pytest.raises(tc.Refused):
        tc.schedule(t, "n-b", 1, T0)


def test_a_cancel_once_asked_shows_after_the_end_too():
    t = tc.new_task("t-1", spec(), "alice", "n-a", T0)
    assert tc.view(tc.cancel(t, T0))["cancel_requested"]                       # cancelled while pending
    t = tc.cancel(tc.start(tc.schedule(t, "n-b", 1, T0), "n-b", 1, T0), T0)
    assert tc.view(t)["cancel_requested"]
    for outcome in (tc.CANCELLED, tc.SUCCEEDED):                              # killed, or it ended first
        assert tc.view(tc.finish(t, "n-b", 1, outcome, 0, "", T0))["cancel_requested"]


def test_a_stale_attempt_cannot_record_its_result():
    t = tc.new_task("t-1", spec(), "alice", "n-a", T0)
    t = tc.start(tc.schedule(t, "n-b", 1, T0), "n-b", 1, T0)
    t = tc.schedule(tc.lost(t, "n-b dead", T0), "n-c", 2, T0)
    for step in (lambda: tc.finish(t, "n-b", 1, tc.SUCCEEDED, 0, "", T0),
                 lambda: tc.start(t, "n-b", 1, T0), lambda: tc.set_progress(t, "n-b", 1, 5, T0)):
        with pytest.raises(tc.Refused):
            step()


def test_cancel_before_and_while_running():
    t = tc.new_task("t-1", spec(), "alice", "n-a", T0)
    assert tc.cancel(t, T0).state == tc.CANCELLED
    r = tc.start(tc.schedule(t, "n-b", 1, T0), "n-b", 1, T0)
    c = tc.cancel(r, T0)
    assert c.state == tc.RUNNING and c.cancel
    ended = tc.finish(c, "n-b", 1, tc.FAILED, None, "killed", T0)
    assert ended.state == tc.CANCELLED                    # no retry once cancel is asked
    s = tc.cancel(tc.schedule(t, "n-b", 1, T0), T0)
    with pytest.raises(tc.Refused):
        tc.start(s, "n-b", 1, T0)
    assert tc.lost(s, "node gone", T0).state == tc.CANCELLED


def test_refence_raises_the_term_of_a_scheduled_assignment_only():
    t = tc.schedule(tc.new_task("t-1", spec(), "alice", "n-a", T0), "n-b", 3, T0)
    assert tc.refence(t, 4, T0).term == 4 and tc.refence(t, 4, T0).attempts[-1].term == 4
    with pytest.raises(tc.Refused):
        tc.refence(t, 3, T0)


# ---- the lattice across replicas -------------------------------------------------------------

def replicas(n: int) -> list[Replica]:
    return [Replica(f"n-{i}", {tc.TASK_TYPE: Lattice(lambda d: tc.rank(d.value))}) for i in range(n)]


def winner(r: Replica, key: str = "t-1") -> tc.Task:
    return tc.Task.from_value(r.get(tc.TASK_TYPE, key).value)


def test_concurrent_terminal_beats_running_and_cancel_beats_progress():
    a, b = replicas(2)
    t = tc.start(tc.schedule(tc.new_task("t-1", spec(), "u", "n-0", T0), "n-1", 1, T0), "n-1", 1, T0)
    for r in (a, b):
        r.put(T0, tc.TASK_TYPE, "t-1", t.to_value())
    da = a.put(T0 + 5, tc.TASK_TYPE, "t-1", tc.cancel(t, T0 + 5).to_value())
    db = b.put(T0 + 9, tc.TASK_TYPE, "t-1", tc.set_progress(t, "n-1", 1, 50, T0 + 9).to_value())
    a.merge(T0 + 10, [db])
    b.merge(T0 + 10, [da])
    assert winner(a).cancel and winner(b).cancel
    dc = b.put(T0 + 11, tc.TASK_TYPE, "t-1", tc.finish(winner(b), "n-1", 1, tc.CANCELLED, None, "cancelled",
                                                       T0 + 11).to_value())
    a.merge(T0 + 12, [dc])
    assert winner(a).state == winner(b).state == tc.CANCELLED


def test_a_deposed_coordinators_concurrent_assignment_loses_to_the_newer_term():
    a, b = replicas(2)
    t = tc.new_task("t-1", spec(), "u", "n-0", T0)
    old = a.put(T0 + 50, tc.TASK_TYPE, "t-1", tc.schedule(t, "n-x", 5, T0 + 50).to_value())
    new = b.put(T0, tc.TASK_TYPE, "t-1", tc.schedule(t, "n-y", 6, T0).to_value())
    a.merge(T0 + 60, [new])
    b.merge(T0 + 60, [old])
    assert winner(a).node == winner(b).node == "n-y"


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(5)), st.integers(2, 4))
def test_any_delivery_order_gives_every_replica_the_same_task_state(order, n):
    """Five concurrent writers, each applying a transition to the same base; delivered in any order."""
    base = tc.start(tc.schedule(tc.new_task("t-1", spec(), "u", "n-0", T0), "n-1", 4, T0), "n-1", 1, T0)
    writes = [
        tc.set_progress(base, "n-1", 1, 30, T0 + 1),
        tc.cancel(base, T0 + 2),
        tc.finish(base, "n-1", 1, tc.FAILED, 2, "exit code 2", T0 + 3),
        tc.lost(base, "n-1 dead", T0 + 4),
        tc.finish(base, "n-1", 1, tc.SUCCEEDED, 0, "exit code 0", T0 + 5),
    ]
    writers = replicas(len(writes))
    docs = []
    for r, w in zip(writers, writes):
        r.put(T0, tc.TASK_TYPE, "t-1", base.to_value())
    seed = writers[0].get(tc.TASK_TYPE, "t-1")
    for r, w in zip(writers, writes):
        r.merge(T0, [seed])
        docs.append(r.put(T0 + 10, tc.TASK_TYPE, "t-1", w.to_value()))
    readers = replicas(n)
    for i, r in enumerate(readers):
        perm = order[i:] + order[:i]
        for j in perm:
            r.merge(T0 + 20, [docs[j]])
    states = {(winner(r).state, winner(r).exit_code) for r in readers}
    assert states == {(tc.SUCCEEDED, 0)}


def test_rank_orders_the_lattice():
    t = tc.new_task("t-1", spec(), "u", "n-0", T0)
    s = tc.schedule(t, "n-1", 1, T0)
    r = tc.start(s, "n-1", 1, T0)
    retry = tc.finish(r, "n-1", 1, tc.FAILED, 1, "", T0)
    chain = [t, s, r, retry, tc.schedule(retry, "n-2", 1, T0), tc.cancel(r, T0),
             tc.finish(r, "n-1", 1, tc.SUCCEEDED, 0, "", T0)]
    ranks = [tc.rank(x.to_value()) for x in chain]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    for x, y in itertools.pairwise(chain):
        assert tc.rank(x.to_value()) < tc.rank(y.to_value())
