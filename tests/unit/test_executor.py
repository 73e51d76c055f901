"""Executor with real subprocesses: exit codes, bad commands, process groups, timeout and
cancel reaching grandchildren, parent-death kill, memory limit, output cap, progress, clean
environment, input/output archives, idempotent start, orphan reaping.

Each test runs its coroutine on a fresh loop (several under both asyncio and uvloop,
which the node uses), waits on conditions with deadlines, and closes its Executor, which
kills whatever it started; pids a test saw are killed again at the end as a safety net.
"""

from __future__ import annotations

import asyncio
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest
import uvloop

from galaxy.clock import SystemClock
from galaxy.executor import ExecSpec, Executor, Result
from galaxy.executor.cgroup import Cgroups
from galaxy.executor.resources import probe

pytestmark = pytest.mark.timeout(60)

WORKTREE = Path(__file__).resolve().parents[2]
PY = sys.executable


def _run(kind: str, coro: Awaitable) -> object:
    return uvloop.run(coro) if kind == "uvloop" else asyncio.run(coro)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def stray() -> list[int]:
    """Pids a test learned of; killed at teardown in case an assertion failed first."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _until_sync(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ex(tmp_path: Path, **kw) -> Executor:
    return Executor(tmp_path / "tasks", clock=SystemClock(), **kw)


def _have_cgroups() -> bool:
    with tempfile.TemporaryDirectory() as d:
        pool = Cgroups.open(d)
        if pool is not None:
            pool.close()
        return pool is not None


def _have_memory_cgroups() -> bool:
    with tempfile.TemporaryDirectory() as d:
        pool = Cgroups.open(d, "memory")
        if pool is not None:
            pool.close()
        return pool is not None


HAVE_CGROUPS = _have_cgroups()
needs_cgroups = pytest.mark.skipif(not HAVE_CGROUPS, reason="no cgroup v2 the executor can write to")
needs_memory_cgroups = pytest.mark.skipif(not _have_memory_cgroups(),
                                          reason="no cgroup v1 memory hierarchy the executor can write to")


async def _one(tmp_path: Path, spec: ExecSpec, **kw) -> tuple[Executor, Result]:
    ex = _ex(tmp_path, **kw)
    try:
        return ex, await asyncio.wait_for(ex.start(spec).wait(), 30)
    finally:
        await ex.close()


# ---- attempt directories and work slots -------------------------------------------------
def test_an_attempt_without_output_leaves_no_directory_and_its_slot_is_reused(tmp_path: Path, loop_kind: str) -> None:
    async def main() -> None:
        stale = tmp_path / "tasks" / ".spare" / "s-0"
        stale.mkdir(parents=True)               # an older version's spares: removed at start
        ex = _ex(tmp_path)
        assert not stale.exists()
        try:
            a = ex.start(ExecSpec("t-0", 1, shell='test -d "$TMPDIR" && test -d out && test "$PWD" = "$HOME"'))
            r = await a.wait()
            assert r.state == "succeeded", r
            assert not (tmp_path / "tasks/t-0").exists()          # nothing kept: no directory
            assert a._work in ex._free_slots                       # the slot is back in the pool
            assert os.listdir(a._work) == [] or sorted(os.listdir(a._work)) == ["out", "tmp"]
            # with one in flight every start takes the oldest free slot: all get used
            seen = set()
            for i in range(1, len(ex._free_slots) + 2):
                b = ex.start(ExecSpec(f"t-{i}", 1, argv=("true",)))
                seen.add(b._work)
                assert (await b.wait()).state == "succeeded"
            assert a._work in seen and len(ex._free_slots) == 4
            assert ex._slots_made == 4                            # no directory made since start
        finally:
            await ex.close()
        assert not (tmp_path / "tasks" / ".work").exists()
    _run(loop_kind, main())


# What a task may do to its work dir; after each, no later attempt may see a trace of it.
DIRTY = [
    "touch tmp/x", "mkdir tmp/d", "touch f", "touch .hidden", "echo r > out/r",
    "mkdir -p out/sub", "chmod 755 tmp", "chmod 500 .", "chmod 700 out && chmod g+s out",
    "rmdir out", "rm -r tmp && ln -s /tmp tmp", "rm -r tmp && touch tmp", "mkfifo tmp/p",
    "touch tmp/gone && rm tmp/gone",   # empty again: may be reused, and is clean
]
# Run in each slot after a dirty attempt: fails unless the work dir is exactly fresh.
CHECK = ('test "$(ls -A)" = "$(printf \'out\\ntmp\')" && test -z "$(ls -A tmp)$(ls -A out)" '
         '&& test ! -L tmp && test ! -L out && test -d tmp && test -d out '
         '&& test "$(stat -c %a . tmp out)" = "$(printf \'700\\n700\\n700\')" && touch tmp/ok out/ok2 '
         '&& rm tmp/ok out/ok2')


def test_reused_slots_never_show_a_previous_attempts_files(tmp_path: Path) -> None:
    async def main() -> None:
        ex = _ex(tmp_path, drain_ms=300, cgroups=False)     # an escapee must be able to outlive it
        try:
            n = 0
            for cmd in DIRTY:
                n += 1
                dirty = ex.start(ExecSpec(f"d-{n}", 0, shell=cmd))
                rd = await dirty.wait()
                assert rd.state == "succeeded", (cmd, rd)
                if cmd.startswith("touch tmp/gone"):
                    assert dirty._work in ex._free_slots, cmd
                else:
                    assert not os.path.exists(dirty._work), cmd      # removed before wait() returned
                    assert dirty._work not in ex._free_slots, cmd
                for _ in range(len(ex._free_slots)):               # every slot in the pool
                    n += 1
                    r = await ex.start(ExecSpec(f"c-{n}", 0, shell=CHECK)).wait()
                    assert r.state == "succeeded", (cmd, r)
            assert (await ex.start(ExecSpec("o", 0, shell="echo r > out/r")).wait()).output_archive
            # An escapee holding the pipes past the leader: its slot is never handed out again,
            # so its late write lands in a removed directory, not in a later attempt's.  (This
            # one clears its environment too, so the sweep at the attempt's end misses it.)
            done = tmp_path / "esc-done"
            esc = ex.start(ExecSpec("esc", 0, shell=(
                f"setsid env -i sh -c 'sleep 0.8; touch late tmp/late; touch {done}' & sleep 0.2")))
            await esc.wait()
            assert esc._escaped and not os.path.exists(esc._work)
            deadline = time.monotonic() + 10
            while not done.exists():                    # checks run while it writes
                assert time.monotonic() < deadline, "the escapee never finished"
                n += 1
                r = await ex.start(ExecSpec(f"c-{n}", 0, shell=CHECK)).wait()
                assert r.state == "succeeded", r
            for _ in range(len(ex._free_slots)):       # and once more in every slot after
                n += 1
                assert (await ex.start(ExecSpec(f"c-{n}", 0, shell=CHECK)).wait()).state == "succeeded"
            assert not list((tmp_path / "tasks").rglob("late"))
        finally:
            await ex.close()
    asyncio.run(main())


def test_a_slot_removed_from_under_the_executor_fails_one_attempt_clearly_then_heals(tmp_path: Path) -> None:
    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            victim = ex._free_slots[0]
            shutil.rmtree(victim)
            r = await ex.start(ExecSpec("a", 0, argv=("true",))).wait()
            assert r.state == "failed" and r.reason.startswith(f"cannot enter work dir {victim}"), r
            assert victim not in ex._free_slots and len(ex._free_slots) == 4    # replaced
            for i in range(5):
                assert (await ex.start(ExecSpec(f"b-{i}", 0, argv=("true",))).wait()).state == "succeeded"
        finally:
            await ex.close()
    asyncio.run(main())


RMTREE_CHECK = """
import os, shutil, stat, sys
{source}
root = sys.argv[1] + "/slot"
os.makedirs(root + "/tmp/deep/er")
open(root + "/tmp/deep/er/f", "w").close()
os.chmod(root + "/tmp/deep/er", 0o500); os.chmod(root + "/tmp/deep", 0); os.chmod(root, 0o500)
_rmtree(root)
print("gone" if not os.path.lexists(root) else "left")
"""


def test_a_slot_its_task_made_unwritable_is_still_removed(tmp_path: Path) -> None:
    # Only a non-root user is stopped by the modes; as root, run it as nobody.
    import inspect
    from galaxy.executor.runner import _rmtree
    code = RMTREE_CHECK.format(source=inspect.getsource(_rmtree))
    kw: dict = {}
    python, where = PY, str(tmp_path)
    if os.geteuid() == 0:
        python = "/usr/bin/python3"          # readable by nobody, unlike a venv under /root
        if not os.access(python, os.X_OK):
            pytest.skip("root without a system python to run as nobody")
        where = tempfile.mkdtemp()           # pytest's tmp_path is not reachable for nobody
        os.chown(where, 65534, 65534)
        kw = {"user": 65534, "group": 65534, "extra_groups": []}
    try:
        out = subprocess.run([python, "-c", code, where], capture_output=True, text=True,
                             timeout=30, **kw)
    finally:
        if where != str(tmp_path):
            shutil.rmtree(where)
    assert out.stdout.strip() == "gone", out


def test_a_progress_fifo_or_directory_does_not_block_and_is_cleaned(tmp_path: Path) -> None:
    async def main() -> None:
        ex = _ex(tmp_path, progress_poll_ms=20)
        try:
            for i, cmd in enumerate(['mkfifo "$GALAXY_PROGRESS_FILE"; sleep 0.2',
                                     'mkdir "$GALAXY_PROGRESS_FILE"; touch "$GALAXY_PROGRESS_FILE/x"',
                                     'echo 42 > "$GALAXY_PROGRESS_FILE"']):
                a = ex.start(ExecSpec(f"p-{i}", 0, shell=cmd))
                r = await asyncio.wait_for(a.wait(), 10)
                assert r.state == "succeeded", r
            assert a.progress == 42
            assert os.listdir(tmp_path / "tasks/.progress") == []
        finally:
            await ex.close()
    asyncio.run(main())


# ---- exit codes and bad commands ---------------------------------------------------------
def test_exit_codes_logs_and_results(tmp_path: Path, loop_kind: str) -> None:
    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            ok = ex.start(ExecSpec("ok", 1, argv=(PY, "-c", "print('hello')")))
            bad = ex.start(ExecSpec("bad", 1, shell="echo oops >&2; exit 3"))
            assert sorted(ex.running()) == [("bad", 1), ("ok", 1)]
            r_ok, r_bad = await ok.wait(), await bad.wait()
            assert (r_ok.state, r_ok.exit_code, r_ok.signal, r_ok.reason) == \
                ("succeeded", 0, None, "exit code 0")
            assert (r_bad.state, r_bad.exit_code, r_bad.reason) == ("failed", 3, "exit code 3")
            assert ex.log_path("ok", 1, "stdout").read_bytes() == b"hello\n"
            assert ex.log_path("bad", 1, "stderr").read_bytes() == b"oops\n"
            assert (r_ok.stdout_bytes, r_bad.stderr_bytes) == (6, 5)
            assert r_ok.started_ms <= r_ok.ended_ms and ok.done and ex.running() == []
            assert ex.get("ok", 1) is ok
        finally:
            await ex.close()
        ex2 = _ex(tmp_path)           # a restart reads both results back from the journal
        try:
            assert ex2.get("bad", 1).result == r_bad and ex2.get("ok", 1).result == r_ok
        finally:
            await ex2.close()
    _run(loop_kind, main())


def test_bad_commands_fail_with_a_clear_reason(tmp_path: Path) -> None:
    not_exec = tmp_path / "script.sh"
    not_exec.write_text("#!/bin/sh\necho hi\n")
    not_exec.chmod(0o644)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01\x02 not a program")
    garbage.chmod(0o755)
    cases = [
        (ExecSpec("a", 0, argv=("no-such-command-xyz",)), "command not found: no-such-command-xyz"),
        (ExecSpec("b", 0, argv=(str(not_exec),)), f"not executable: {not_exec}"),
        (ExecSpec("c", 0, argv=(str(tmp_path),)), f"not executable: {tmp_path}"),
        (ExecSpec("d", 0), "argv/shell: exactly one of them must be given (empty command)"),
        (ExecSpec("e", 0, argv=("",)), "argv: empty command"),
        (ExecSpec("f", 0, shell="no-such-command-xyz"), "exit code 127 (command not found)"),
        (ExecSpec("g", 0, argv=(str(garbage),)), f"not an executable format: {garbage}"),
        (ExecSpec("../escape", 0, argv=("true",)), "task_id: must be"),
        # with a memory limit: the same reasons come out
        (ExecSpec("h", 0, argv=("no-such-command-xyz",), memory_mb=100),
         "command not found: no-such-command-xyz"),
        (ExecSpec("i", 0, argv=(str(not_exec),), memory_mb=100), f"not executable: {not_exec}"),
        (ExecSpec("j", 0, argv=(str(garbage),), memory_mb=100), f"not an executable format: {garbage}"),
        # a limit smaller than the program's own mappings: said so, not "command not found"
        # (of a program still running when the limit is set: one that ends within
        # microseconds of its exec is not limited, docs/executor.md)
        (ExecSpec("k", 0, argv=("sleep", "5"), memory_mb=1), "memory limit 1 MB is too small to load the program"),
        (ExecSpec("l", 0, shell="sleep 5", memory_mb=1), "memory limit 1 MB is too small to load the program"),
    ]

    async def main() -> None:
        ex = _ex(tmp_path, cgroups=False)       # memory limits by RLIMIT_AS
        try:
            for spec, reason in cases:
                r = await ex.start(spec).wait()    # never raises
                assert r.state == "failed" and r.reason.startswith(reason), (spec, r)
                assert r.signal is None
        finally:
            await ex.close()
        assert not (tmp_path / "escape").exists()
    asyncio.run(main())


def test_each_attempt_is_its_own_session_and_group(tmp_path: Path) -> None:
    code = "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"

    async def main() -> None:
        ex, r = await _one(tmp_path, ExecSpec("grp", 0, argv=(PY, "-c", code)))
        pid, pgid, sid = map(int, ex.log_path("grp", 0, "stdout").read_text().split())
        assert r.state == "succeeded" and pid == pgid == sid == r.pid
        assert pgid != os.getpgid(0) and sid != os.getsid(0)
    asyncio.run(main())


# ---- timeout and cancel reach the whole group --------------------------------------------
# The background grandchild ignores SIGTERM, so only the group SIGKILL can end it.
GRANDCHILD = "(trap '' TERM; exec sleep 300) & echo $!; sleep 300"


def _first_pid(path: Path) -> int | None:
    text = path.read_text() if path.exists() else ""     # the log file comes with the first byte
    return int(text.split()[0]) if text.strip() else None


def test_timeout_kills_the_group_including_grandchildren(tmp_path: Path, loop_kind: str,
                                                         stray: list[int]) -> None:
    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            t0 = time.monotonic()
            a = ex.start(ExecSpec("slow", 0, shell=GRANDCHILD, timeout_ms=500))
            stray.append(a.pid)
            r = await asyncio.wait_for(a.wait(), 20)
            elapsed_s = time.monotonic() - t0
            grandchild = _first_pid(ex.log_path("slow", 0, "stdout"))
            assert grandchild is not None
            stray.append(grandchild)
            assert (r.state, r.reason) == ("timed_out", "killed after timeout of 0.5 s")
            assert r.exit_code is None and r.signal == signal.SIGTERM
            assert 0.5 <= elapsed_s < 3.0, elapsed_s
            await _until(lambda: _gone(grandchild) and _gone(a.pid), 5, "group gone")
        finally:
            await ex.close()
    _run(loop_kind, main())


def test_cancel_kills_the_group_and_escalates_to_sigkill(tmp_path: Path, stray: list[int]) -> None:
    async def main() -> None:
        ex = _ex(tmp_path, kill_grace_ms=300)
        try:
            a = ex.start(ExecSpec("c1", 0, shell=GRANDCHILD))
            # This leader ignores SIGTERM too: cancel must escalate after the grace.
            b = ex.start(ExecSpec("c2", 0, shell="trap '' TERM; echo ready; while :; do sleep 0.05; done"))
            stray.extend([a.pid, b.pid])
            out_a, out_b = ex.log_path("c1", 0, "stdout"), ex.log_path("c2", 0, "stdout")
            await _until(lambda: _first_pid(out_a) is not None and out_b.read_text(), 10, "start")
            grandchild = _first_pid(out_a)
            stray.append(grandchild)
            a.cancel()
            b.cancel()
            ra, rb = await asyncio.wait_for(asyncio.gather(a.wait(), b.wait()), 20)
            assert (ra.state, ra.reason, ra.signal) == ("cancelled", "cancelled", signal.SIGTERM)
            assert (rb.state, rb.signal) == ("cancelled", signal.SIGKILL)
            await _until(lambda: all(map(_gone, (a.pid, b.pid, grandchild))), 5, "groups gone")
            a.cancel()        # after the end: a no-op
            assert (await a.wait()) is ra
        finally:
            await ex.close()
    asyncio.run(main())


@pytest.mark.parametrize("why", ["timed_out", "cancelled"])
def test_a_timeout_or_a_cancel_also_kills_what_left_the_group(tmp_path: Path, loop_kind: str, why: str,
                                                              stray: list[int]) -> None:
    """A daemon the task started in a session of its own (its pipes closed, so nothing else
    gives it away) dies with the attempt: it still carries the attempt's environment.
    (Without cgroups: the environment sweep is what finds it.)"""
    async def main() -> None:
        ex = _ex(tmp_path, cgroups=False)
        try:
            a = ex.start(ExecSpec("esc", 0, shell="setsid sleep 300 >/dev/null 2>&1 & echo $!; exec sleep 300",
                                  timeout_ms=1000 if why == "timed_out" else 0))
            out = ex.log_path("esc", 0, "stdout")
            await _until(lambda: len(_pids(out)) == 1, 10, "the escapee's pid")
            (escapee,) = _pids(out)
            stray.append(escapee)
            await _until(lambda: _sid(escapee) == escapee, 10, "escapee in a session of its own")
            if why == "cancelled":
                a.cancel()
            assert (await asyncio.wait_for(a.wait(), 30)).state == why
            await _until(lambda: _gone(escapee), 10, "the escapee swept")
        finally:
            await ex.close()
    _run(loop_kind, main())


@needs_cgroups
@pytest.mark.parametrize("how", ["succeeded", "timed_out", "cancelled"])
def test_what_left_the_group_and_cleared_its_environment_dies_with_the_attempt(
        tmp_path: Path, loop_kind: str, how: str, stray: list[int]) -> None:
    """In the attempt's cgroup, a double-forked daemon in a session of its own, with an
    empty environment and its pipes closed, still ends with the attempt -- however it
    ends -- and the executor's cgroups are gone after close."""
    async def main() -> None:
        ex = _ex(tmp_path)
        assert ex._cgroups is not None
        parent = ex._cgroups.parent
        try:
            tail = "sleep 300" if how != "succeeded" else "sleep 2"
            a = ex.start(ExecSpec("esc", 0, shell=(
                "sleep 0.3; (setsid env -i sleep 300 >/dev/null 2>&1 & echo $!) ; " + tail),
                timeout_ms=1500 if how == "timed_out" else 0))
            out = ex.log_path("esc", 0, "stdout")
            await _until(lambda: len(_pids(out)) == 1, 10, "the escapee's pid")
            (escapee,) = _pids(out)
            stray.append(escapee)
            await _until(lambda: _sid(escapee) == escapee and psutil.Process(escapee).environ() == {},
                         10, "escapee in a session of its own, with an empty environment")
            if how == "cancelled":
                a.cancel()
            r = await asyncio.wait_for(a.wait(), 30)
            assert r.state == how, r
            await _until(lambda: _gone(escapee), 5, "the escapee killed with its attempt")
            # The next attempt runs in a cgroup of the pool too (what it forks after its
            # first microseconds is inside).
            b = ex.start(ExecSpec("next", 0, shell="sleep 0.05; cat /proc/self/cgroup"))
            assert (await b.wait()).state == "succeeded"
            (v2,) = [ln for ln in ex.log_path("next", 0, "stdout").read_text().splitlines() if ln.startswith("0::")]
            assert f"/{os.path.basename(parent)}/" in v2, v2
        finally:
            await ex.close()
        assert not os.path.exists(parent)
    _run(loop_kind, main())


# ---- the node dies: PR_SET_PDEATHSIG, then reap_orphans after restart ----------------------
HELPER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from galaxy.clock import SystemClock
    from galaxy.executor import Executor, ExecSpec

    async def main():
        ex = Executor(Path(sys.argv[1]), clock=SystemClock(), death_guard=sys.argv[3])
        # Line 1: a setsid'd sleep that leaves the group; line 2: a grandchild in the group.
        a = ex.start(ExecSpec("victim", 0, shell=(
            "setsid sleep 300 & echo $!; (trap '' TERM; exec sleep 300) & echo $!; "
            "exec sleep 300")))
        quiet = ex.start(ExecSpec("quiet", 0, argv=("sleep", "300")))
        print(a.pid, quiet.pid, flush=True)
        await asyncio.sleep(3600)

    if sys.argv[2] == "uvloop":
        import uvloop; uvloop.run(main())
    else:
        asyncio.run(main())
""")


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("kind, guard", [("asyncio", "guardian"), ("uvloop", "guardian"),
                                         ("uvloop", "pdeathsig")])
def test_node_killed_9_kills_its_tasks_and_restart_reaps_escapees(
        tmp_path: Path, kind: str, guard: str, stray: list[int]) -> None:
    script = tmp_path / "helper.py"
    script.write_text(HELPER)
    root = tmp_path / "tasks"
    helper = subprocess.Popen([PY, str(script), str(root), kind, guard], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(WORKTREE)},
                              start_new_session=True)
    stray.append(helper.pid)
    try:
        leader, quiet = map(int, helper.stdout.readline().split())
        stray.extend([leader, quiet])
        out = root / "victim/0/stdout"
        _until_sync(lambda: len(_pids(out)) == 2, 10, "grandchild pids")
        escapee, grandchild = _pids(out)
        stray.extend([escapee, grandchild])
        # $! is printed at the fork: until setsid has run, the escapee is still in the group
        _until_sync(lambda: _sid(escapee) == escapee, 10, "escapee in a session of its own")
        assert not any(map(_gone, (leader, escapee, grandchild)))
        helper.kill()                   # SIGKILL: no cleanup code runs in the helper
        helper.wait(10)
        _until_sync(lambda: _gone(leader), 5, "task leader killed")
        _until_sync(lambda: _gone(quiet), 5, "quiet task killed")
        assert not (root / "quiet").exists()       # it kept nothing: only the journal knows it
        if guard == "guardian":         # the guardian kills the whole group
            _until_sync(lambda: _gone(grandchild), 5, "grandchild killed")
        if guard == "guardian" and HAVE_CGROUPS:   # and the attempt's cgroup
            _until_sync(lambda: _gone(escapee), 5, "escapee killed")
        else:
            assert not _gone(escapee)   # it left the group: the restart finds it

        async def restart() -> None:
            ex = Executor(root, clock=SystemClock())
            try:
                found = ex.reap_orphans()
                assert [(t, n, r.state, r.interrupted) for t, n, r in found] == \
                    [("quiet", 0, "failed", True), ("victim", 0, "failed", True)]
                await _until(lambda: _gone(escapee) and _gone(grandchild), 5, "swept")
                for i, name in enumerate(("quiet", "victim")):
                    again = ex.start(ExecSpec(name, 0, argv=("true",)))
                    assert again.done and again.result == found[i][2]   # never runs twice
                assert ex.reap_orphans() == []
            finally:
                await ex.close()
        asyncio.run(restart())
    finally:
        helper.stdout.close()
        if helper.poll() is None:
            helper.kill()
            helper.wait(10)


def test_a_killed_guardian_is_replaced(tmp_path: Path, stray: list[int]) -> None:
    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            a = ex.start(ExecSpec("g1", 0, argv=("sleep", "300")))
            stray.append(a.pid)
            first = ex._guardian.pid
            os.kill(first, signal.SIGKILL)
            await _until(lambda: _gone(first), 5, "guardian dead")
            b = ex.start(ExecSpec("g2", 0, argv=("true",)))
            assert (await b.wait()).state == "succeeded"
            second = ex._guardian.pid
            assert second != first and not _gone(second)
        finally:
            await ex.close()
        assert a.result.state == "cancelled" and _gone(second)
    asyncio.run(main())


def test_a_memory_limit_that_cannot_be_set_fails_the_attempt_not_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prlimit refuses a setuid program, or a limit above the node's own hard limit (not
    # reproducible as root): the attempt fails with the reason and is reaped.
    from galaxy.executor import runner as r
    real = r.resource.prlimit

    def refuse(pid, which, *limits):
        if which == r.resource.RLIMIT_AS and limits:
            raise PermissionError(1, "Operation not permitted")
        return real(pid, which, *limits)
    monkeypatch.setattr(r.resource, "prlimit", refuse)

    async def main() -> None:
        ex = _ex(tmp_path, cgroups=False)       # memory limits by RLIMIT_AS
        try:
            a = ex.start(ExecSpec("refused", 0, argv=("sleep", "30"), memory_mb=100))
            res = await a.wait()
            assert (res.state, res.reason) == ("failed", "could not set the memory limit of 100 MB: "
                                                         "Operation not permitted")
            assert _gone(a.pid)
            assert (await ex.start(ExecSpec("free", 0, argv=("true",))).wait()).state == "succeeded"
        finally:
            await ex.close()
    asyncio.run(main())


def test_a_registry_that_cannot_be_written_stops_the_guardian_not_the_node(tmp_path: Path,
                                                                         stray: list[int]) -> None:
    # Disk full: a guardian that could not be told of a reaped leader might kill a stranger
    # that got its id, so it is stopped (SIGKILL: it kills nothing) and attempts go on.
    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            a = ex.start(ExecSpec("one", 0, argv=("sleep", "30")))
            stray.append(a.pid)
            guardian = ex._guardian.pid
            os.close(ex._guardian._fd)                     # the next append fails (EBADF)
            ex._guardian._fd = os.open(os.devnull, os.O_RDONLY)
            b = ex.start(ExecSpec("two", 0, argv=("true",)))
            assert (await b.wait()).state == "succeeded"   # the node goes on
            _until_sync(lambda: _gone(guardian), 5, "guardian stopped")
            assert not _gone(a.pid)                        # and it killed nothing
            c = ex.start(ExecSpec("three", 0, argv=("true",)))   # a new guardian, a new registry
            assert (await c.wait()).state == "succeeded" and ex._guardian.pid not in (None, guardian)
        finally:
            await ex.close()
        assert a.result.state == "cancelled"
    asyncio.run(main())


def test_the_guardian_registry_stays_small_and_still_names_every_live_group(tmp_path: Path,
                                                                            stray: list[int]) -> None:
    from galaxy.executor import runner as r
    reg = tmp_path / "guardian.groups"
    g = r._Guardian(str(reg))
    g.ready()
    live = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stray.append(live.pid)
    g.add(live.pid)
    fake = 5_000_000              # above any pid_max: no process can have these ids
    for i in range(r.REGISTRY_LINES_MAX * 3):
        g.add(fake + i)
        g.discard(fake + i)
    assert reg.stat().st_size < 10 * r.REGISTRY_LINES_MAX        # rewritten, not grown for ever
    assert f"+{live.pid}\n" in reg.read_text()
    g.close()                     # EOF: the guardian kills what the registry still lists
    _until_sync(lambda: live.poll() is not None, 5, "the registered group killed")
    assert live.returncode == -signal.SIGKILL and not reg.exists()


# ---- memory, output cap, progress --------------------------------------------------------
@pytest.mark.parametrize("guard", ["guardian", "pdeathsig"])
def test_memory_limit(tmp_path: Path, guard: str) -> None:
    alloc = "import sys; b = bytearray(int(sys.argv[1]) << 20); print(len(b))"

    async def main() -> None:
        ex = _ex(tmp_path, death_guard=guard, cgroups=False)     # RLIMIT_AS
        try:
            big = ex.start(ExecSpec("big", 0, argv=(PY, "-c", alloc, "400"), memory_mb=150))
            small = ex.start(ExecSpec("small", 0, argv=(PY, "-c", alloc, "20"), memory_mb=150))
            rb, rs = await big.wait(), await small.wait()
            assert (rb.state, rb.exit_code) == ("failed", 1)
            assert rb.reason == "memory limit 150 MB exceeded (exit code 1)"
            assert b"MemoryError" in ex.log_path("big", 0, "stderr").read_bytes()
            assert rs.state == "succeeded"
        finally:
            await ex.close()
    asyncio.run(main())


@needs_memory_cgroups
@pytest.mark.parametrize("guard", ["guardian", "pdeathsig"])
def test_a_memory_cgroup_limits_the_resident_memory_of_the_whole_task_not_its_address_space(
        tmp_path: Path, guard: str) -> None:
    touch = "import sys; b = b'x' * (int(sys.argv[1]) << 20); print(len(b))"
    # 2 GB of address space, one page of it used: RLIMIT_AS would refuse it (JVMs, Go).
    reserve = "import mmap; m = mmap.mmap(-1, 2 << 30); m[0:1] = b'x'; print('reserved')"
    # Two processes of 60 MB each, at the same time: over 100 MB together, though each is under it.
    hold = touch + "; import time; time.sleep(1.5)"
    pair = (f"{PY} -c \"{hold}\" 60 & a=$!; {PY} -c \"{hold}\" 60 & b=$!; "
            "wait $a && wait $b")

    async def main() -> None:
        ex = _ex(tmp_path, death_guard=guard)
        assert ex._memcgs is not None
        parent = ex._memcgs.parent
        try:
            big = ex.start(ExecSpec("big", 0, argv=(PY, "-c", touch, "300"), memory_mb=100))
            small = ex.start(ExecSpec("small", 0, argv=(PY, "-c", touch, "20"), memory_mb=100))
            mapped = ex.start(ExecSpec("mapped", 0, argv=(PY, "-c", reserve), memory_mb=100))
            both = ex.start(ExecSpec("both", 0, shell=pair, memory_mb=100))
            rb, rs, rm, r2 = [await a.wait() for a in (big, small, mapped, both)]
            assert (rb.state, rb.signal) == ("failed", 9), rb
            assert rb.reason == ("killed by SIGKILL: memory limit 100 MB exceeded "
                                 "(the kernel ended a process of the task)"), rb
            assert rs.state == "succeeded", rs
            assert rm.state == "succeeded", rm
            assert ex.log_path("mapped", 0, "stdout").read_text() == "reserved\n"
            assert r2.state == "failed" and "memory limit 100 MB exceeded" in r2.reason, r2
            # Reused, not made again (a mkdir of a memory cgroup can take milliseconds); the
            # cgroup that saw an OOM kill does not report it again.
            made = {d.name for d in os.scandir(parent) if d.is_dir()}
            again = [ex.start(ExecSpec(f"again-{i}", 0, argv=("true",), memory_mb=100)) for i in range(4)]
            assert [(await a.wait()).state for a in again] == ["succeeded"] * 4
            assert {d.name for d in os.scandir(parent) if d.is_dir()} == made
        finally:
            await ex.close()
        assert not os.path.exists(parent)
    asyncio.run(main())


@needs_cgroups
def test_cgroups_a_task_made_inside_its_own_are_removed_with_it(tmp_path: Path, stray: list[int]) -> None:
    """A task may make cgroups (a nested node, a container runtime): closing the executor
    still kills everything and leaves no directory behind."""
    from galaxy.executor import cgroup
    with open("/proc/self/cgroup") as f:
        own = next(ln[3:].strip() for ln in f if ln.startswith("0::"))
    base = cgroup.own_dir()
    assert base is not None
    mount = base[:len(base) - len(own.rstrip("/"))] if own != "/" else base
    # (it checks it is in its attempt's cgroup first: never makes one anywhere else)
    nest = (f'sleep 0.3; p=$(sed -n "s/^0:://p" /proc/self/cgroup); '
            'case "$p" in */galaxy-*) ;; *) exit 3;; esac; '
            f'd="{mount}$p/nested"; '
            'mkdir "$d" && echo $$ > "$d/cgroup.procs" && echo $$ && exec sleep 300')

    async def main() -> None:
        ex = _ex(tmp_path)
        assert ex._cgroups is not None
        parent = ex._cgroups.parent
        a = ex.start(ExecSpec("nest", 0, shell=nest))
        out = ex.log_path("nest", 0, "stdout")
        try:
            await _until(lambda: len(_pids(out)) == 1, 10, "the task in its nested cgroup")
            (pid,) = _pids(out)
            stray.append(pid)
            assert [d for d, _, _ in os.walk(parent) if d.endswith("/nested")]
        finally:
            await ex.close()
        assert (await a.wait()).state == "cancelled"
        await _until(lambda: _gone(pid), 5, "the nested task killed")
        assert not os.path.exists(parent)
    asyncio.run(main())


@needs_cgroups
@needs_memory_cgroups
def test_an_attempt_whose_cgroups_are_gone_runs_with_rlimit_as_instead(tmp_path: Path) -> None:
    show = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)"

    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            first = ex.start(ExecSpec("first", 0, argv=(PY, "-c", show), memory_mb=100))
            assert (await first.wait()).state == "succeeded"
            # the memory cgroup holds the limit: no address-space cap
            assert ex.log_path("first", 0, "stdout").read_text().strip() != "100"
            for pool in (ex._cgroups, ex._memcgs):          # removed by hand, under the pool
                assert pool is not None
                for d in os.scandir(pool.parent):
                    if d.is_dir():
                        os.rmdir(d.path)
            second = ex.start(ExecSpec("second", 0, argv=(PY, "-c", show), memory_mb=100))
            assert (await second.wait()).state == "succeeded"
            assert ex.log_path("second", 0, "stdout").read_text().strip() == "100"
            third = ex.start(ExecSpec("third", 0, argv=(PY, "-c", show), memory_mb=100))
            assert (await third.wait()).state == "succeeded"          # new cgroups made
            assert ex.log_path("third", 0, "stdout").read_text().strip() != "100"
        finally:
            await ex.close()
    asyncio.run(main())


@needs_cgroups
def test_moves_refused_in_a_row_turn_cgroups_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a cgroup can be made but not joined, the executor stops trying after a few
    attempts (each of which ran with RLIMIT_AS) instead of making cgroups for every one."""
    from galaxy.executor import cgroup, runner
    monkeypatch.setattr(cgroup, "move", lambda fds, pid: False)
    show = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)"

    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            for i in range(runner.CGROUP_MISSES_MAX + 2):
                a = ex.start(ExecSpec(f"t{i}", 0, argv=(PY, "-c", show), memory_mb=100))
                assert (await a.wait()).state == "succeeded"
                assert ex.log_path(f"t{i}", 0, "stdout").read_text().strip() == "100"
            assert ex._cgroups is not None and ex._cgroups._made == runner.CGROUP_MISSES_MAX
        finally:
            await ex.close()
    asyncio.run(main())


def test_memory_limit_reaches_children_forked_before_it_was_set() -> None:
    # The limit is set just after the exec: a child the command forked before that must
    # get it too, and a process already past it is reported (the caller kills it).
    from galaxy.executor.runner import _limit_memory
    p = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        _until_sync(lambda: len(psutil.Process(p.pid).children()) == 2, 10, "two children")
        kids = psutil.Process(p.pid).children()
        limit = 200 << 20
        assert _limit_memory(p.pid, limit) == ""
        for proc in (p.pid, *(k.pid for k in kids)):
            assert resource.prlimit(proc, resource.RLIMIT_AS) == (limit, limit)
        assert _limit_memory(p.pid, 1 << 20) == "memory limit 1 MB is too small to load the program"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()



def test_memory_limit_reaches_a_child_forked_by_a_second_thread() -> None:
    # A one-threaded process skips the listing of its threads (its only tid is its pid);
    # one with more threads still has every thread's children found and limited.
    from galaxy.executor.runner import _limit_memory, _one_thread, _read_proc
    code = ("import subprocess, sys, threading, time\n"
            "def fork():\n"
            "    subprocess.Popen(['sleep', '30'])\n"
            "    time.sleep(30)\n"
            "threading.Thread(target=fork, daemon=True).start()\n"
            "time.sleep(30)\n")
    p = subprocess.Popen([PY, "-c", code], start_new_session=True)
    try:
        _until_sync(lambda: len(psutil.Process(p.pid).children()) == 1, 10, "the thread's child")
        kid = psutil.Process(p.pid).children()[0]
        assert kid.ppid() == p.pid     # children of any thread show the process as parent
        assert not _one_thread(_read_proc(f"/proc/{p.pid}/status"))
        tids = {int(t) for t in os.listdir(f"/proc/{p.pid}/task")}
        assert len(tids) == 2 and kid.pid not in {
            int(c) for c in _read_proc(f"/proc/{p.pid}/task/{p.pid}/children").split()}
        limit = 900 << 20
        assert _limit_memory(p.pid, limit) == ""
        assert resource.prlimit(kid.pid, resource.RLIMIT_AS) == (limit, limit)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_one_thread_reads_the_threads_line_of_proc_status() -> None:
    from galaxy.executor.runner import _one_thread, _read_proc
    assert _one_thread(b"Name:\ttrue\nThreads:\t1\nSigQ:\t0/1\n")
    assert not _one_thread(b"Name:\tpy\nThreads:\t12\nSigQ:\t0/1\n")
    assert not _one_thread(b"Name:\tpy\nThreads:\t10\n")
    assert not _one_thread(b"Name:\tpy\n")          # unknown: the threads are listed
    status = _read_proc(f"/proc/{os.getpid()}/status")
    assert _one_thread(status) == (len(os.listdir(f"/proc/{os.getpid()}/task")) == 1)


def test_output_cap_keeps_the_start_and_the_end_without_blocking(tmp_path: Path, loop_kind: str) -> None:
    # 10 MB on each stream, interleaved: a reader that stopped reading one pipe would
    # deadlock the task on a full pipe buffer.  Each keeps its first MiB and its last 64 KiB.
    code = ("import sys\nline = b'x' * 1023 + b'\\n'\nfor i in range(10 * 1024):\n"
            "    sys.stdout.buffer.write(line); sys.stderr.buffer.write(line)\n"
            "sys.stdout.buffer.write(b'GALAXY_PROGRESS 77\\n'); sys.stderr.buffer.write(b'the error\\n')\n")

    async def main() -> None:
        ex, r = await _one(tmp_path, ExecSpec("loud", 0, argv=(PY, "-c", code), timeout_ms=20_000))
        assert r.state == "succeeded" and r.truncated
        for s, last in (("stdout", b"GALAXY_PROGRESS 77\n"), ("stderr", b"the error\n")):
            data = ex.log_path("loud", 0, s).read_bytes()
            seen = 10 * (1 << 20) + len(last)
            marker = b"\n[galaxy: %d bytes of output dropped here]\n" % (seen - (1 << 20) - (64 << 10))
            assert data[:1 << 20] == (b"x" * 1023 + b"\n") * 1024
            assert data[1 << 20:(1 << 20) + len(marker)] == marker and data.endswith(b"\n" + last)
            assert len(data) == (1 << 20) + len(marker) + (64 << 10) == getattr(r, f"{s}_bytes")
        assert ex.get("loud", 0).progress == 77    # parsed beyond the cap
    _run(loop_kind, main())


def test_progress_from_lines_and_file(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os, time
        print("GALAXY_PROGRESS 10", flush=True)
        print("GALAXY_PROGRESS banana", flush=True)
        print("GALAXY_PROGRESS 20", flush=True)
        time.sleep(0.3)
        with open(os.environ["GALAXY_PROGRESS_FILE"], "w") as f:
            f.write("55\\n")
        time.sleep(0.3)
    """)
    seen: list[int] = []

    async def main() -> None:
        ex = _ex(tmp_path, progress_poll_ms=50)
        try:
            a = ex.start(ExecSpec("prog", 0, argv=(PY, "-c", code)), on_progress=seen.append)
            r = await a.wait()
            assert r.state == "succeeded"
            assert seen == [10, 20, 55] and a.progress == 55
        finally:
            await ex.close()
    asyncio.run(main())


def test_a_stale_progress_file_does_not_undo_a_later_progress_line(tmp_path: Path) -> None:
    """The file is polled; it reports only when its own value changes, so a task that wrote
    the file once and then prints ``GALAXY_PROGRESS`` lines shows the newest of the two."""
    code = textwrap.dedent("""
        import os, time
        with open(os.environ["GALAXY_PROGRESS_FILE"], "w") as f:
            f.write("42\\n")
        time.sleep(0.3)
        print("GALAXY_PROGRESS 70", flush=True)
        time.sleep(0.4)
    """)
    seen: list[int] = []

    async def main() -> None:
        ex = _ex(tmp_path, progress_poll_ms=50)
        try:
            a = ex.start(ExecSpec("prog", 0, argv=(PY, "-c", code)), on_progress=seen.append)
            r = await asyncio.wait_for(a.wait(), 30)
            assert r.state == "succeeded", r.reason
            assert seen == [42, 70] and a.progress == 70
        finally:
            await ex.close()
    asyncio.run(main())



def test_the_fd_watcher_drops_events_of_an_fd_unwatched_in_the_same_batch(loop_kind: str) -> None:
    # Two readable pipes come back in one batch; the first handler unwatches and closes the
    # other and a new pipe takes its number: the stale event must not reach the new fd.
    from galaxy.executor.runner import _Watcher

    async def main() -> None:
        loop = asyncio.get_running_loop()
        w = _Watcher()
        calls: list[str] = []
        fds: dict[str, int] = {}
        a_r, a_w = os.pipe()
        b_r, b_w = os.pipe()
        extra: list[int] = []
        try:
            os.write(a_w, b"x")
            os.write(b_w, b"x")

            def first(fd: int) -> None:
                calls.append("first")
                other = b_r if fd == a_r else a_r
                w.unwatch(fd)
                w.unwatch(other)
                os.close(other)
                new_r, new_w = os.pipe()           # lowest free number: the one just closed
                extra.extend((new_r, new_w))
                fds["new"] = new_r
                fds["old"] = other
                w.watch(loop, new_r, lambda _fd: calls.append("new"))
            w.watch(loop, a_r, first)
            w.watch(loop, b_r, first)
            await _until(lambda: calls, 5, "a handler")
            await asyncio.sleep(0.05)              # a few more loop turns
            assert calls == ["first"] and fds["new"] == fds["old"]
            os.write(extra[1], b"y")               # the new fd still works
            await _until(lambda: "new" in calls, 5, "the new fd's handler")
        finally:
            w.close()
            for fd in (a_w, b_w, *extra, a_r if fds.get("old") != a_r else b_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
    _run(loop_kind, main())


def test_an_executor_serves_attempts_on_a_second_loop(tmp_path: Path, loop_kind: str) -> None:
    # The watcher follows the running loop: an executor made and used on one loop keeps
    # working on the next (its epoll set is re-attached, not lost).
    ex = _ex(tmp_path)

    async def first() -> None:
        r = await asyncio.wait_for(ex.start(ExecSpec("one", 0, shell="echo one")).wait(), 30)
        assert r.state == "succeeded"

    async def second() -> None:
        try:
            r = await asyncio.wait_for(ex.start(ExecSpec("two", 0, shell="echo two")).wait(), 30)
            assert r.state == "succeeded"
            assert ex.log_path("two", 0, "stdout").read_text() == "two\n"
        finally:
            await ex.close()
    _run(loop_kind, first())
    _run(loop_kind, second())


# ---- environment, archives ---------------------------------------------------------------
def test_environment_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALAXY_TEST_SECRET", "leak")

    async def main() -> None:
        ex = _ex(tmp_path, keep_work_dir=True)
        try:
            r = await ex.start(ExecSpec("env", 4, argv=("env",), env={"FOO": "bar"})).wait()
            assert r.state == "succeeded"
            env = dict(line.split("=", 1) for line in
                       ex.log_path("env", 4, "stdout").read_text().splitlines())
            work = tmp_path / "tasks/env/4/work"
            assert env == {"PATH": os.environ["PATH"], "HOME": str(work), "LANG": "C.UTF-8",
                           "TMPDIR": str(work / "tmp"), "FOO": "bar", "GALAXY_TASK_ID": "env",
                           "GALAXY_ATTEMPT": "4",
                           "GALAXY_PROGRESS_FILE": str(tmp_path / "tasks/env/4/progress")}
        finally:
            await ex.close()
    asyncio.run(main())


def _script(path: Path, text: str, mode: int = 0o755) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text + "\n")
    path.chmod(mode)


def test_a_command_is_found_along_path_as_exec_would_and_looked_up_again_after_a_second(tmp_path: Path) -> None:
    from galaxy.executor.runner import COMMAND_TTL_MS, _Commands
    first, second = tmp_path / "first", tmp_path / "second"
    path = f"{first}:{second}"
    _script(second / "tool", "echo second")
    _script(first / "tool", "echo not executable", mode=0o644)     # skipped, as execvpe skips it
    (first / "dir").mkdir()                                        # a directory is no command
    _script(second / "dir", "echo second")
    c = _Commands()
    assert c.find("tool", path, 0) == str(second / "tool")
    assert c.find("dir", path, 0) == str(second / "dir")
    _script(first / "tool", "echo first")                          # installed earlier in PATH
    assert c.find("tool", path, COMMAND_TTL_MS - 1) == str(second / "tool")
    assert c.find("tool", path, COMMAND_TTL_MS) == str(first / "tool")
    # left to Popen: a path, a name not found, a PATH with a relative entry (the work dir's)
    assert c.find("./tool", path, 0) is None and c.find("/bin/true", path, 0) is None
    assert c.find("no-such-tool", path, 0) is None
    assert c.find("tool", f"bin:{path}", 0) is None and c.find("tool", f":{path}", 0) is None


def test_a_command_installed_earlier_in_path_runs_within_seconds(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _script(second / "tool", "echo second")

    async def main() -> None:
        ex = _ex(tmp_path / "node", path=f"{first}:{second}")
        runs = iter(range(1, 1000))
        try:
            async def output() -> str:
                n = next(runs)
                r = await ex.start(ExecSpec("tool", n, argv=("tool",))).wait()
                assert r.state == "succeeded", r
                return ex.log_path("tool", n, "stdout").read_text()
            assert await output() == "second\n"
            _script(first / "tool", "echo first")
            deadline = time.monotonic() + 10
            while (seen := await output()) != "first\n":
                assert seen == "second\n" and time.monotonic() < deadline, seen
                await asyncio.sleep(0.05)
        finally:
            await ex.close()
    asyncio.run(main())


def _tar(path: Path, members: list[tuple[str, bytes | None, str]]) -> str:
    """members: (name, data for a file or None, symlink target or "")."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data, link in members:
            ti = tarfile.TarInfo(name)
            if link:
                ti.type, ti.linkname = tarfile.SYMTYPE, link
                tf.addfile(ti)
            else:
                ti.size = len(data or b"")
                tf.addfile(ti, io.BytesIO(data or b""))
    return str(path)


def test_input_archive_unpacked_and_escapes_refused(tmp_path: Path) -> None:
    good = _tar(tmp_path / "good.tar.gz", [("data/in.txt", b"payload", ""),
                                           ("link", None, "data/in.txt")])
    dotdot = _tar(tmp_path / "dotdot.tar.gz", [("../evil.txt", b"x", "")])
    absolute = _tar(tmp_path / "abs.tar.gz", [(str(tmp_path / "evil2.txt"), b"x", "")])
    symlink = _tar(tmp_path / "sym.tar.gz", [("l", None, str(tmp_path)), ("l/evil3.txt", b"x", "")])

    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            r = await ex.start(ExecSpec("in", 0, shell="cat data/in.txt link",
                                        input_archive=good)).wait()
            assert r.state == "succeeded", r
            assert ex.log_path("in", 0, "stdout").read_bytes() == b"payloadpayload"
            for i, (archive, why) in enumerate([(dotdot, "escapes"), (absolute, "escapes"),
                                                (symlink, "escapes"),
                                                (str(tmp_path / "none.tar"), "not found")]):
                r = await ex.start(ExecSpec(f"bad{i}", 0, argv=("true",),
                                            input_archive=archive)).wait()
                assert r.state == "failed" and why in r.reason and r.exit_code is None, r
        finally:
            await ex.close()
        assert not list(tmp_path.rglob("evil*"))
    asyncio.run(main())


def test_output_archive_of_work_out(tmp_path: Path) -> None:
    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            r = await ex.start(ExecSpec("out", 0, shell=(
                "mkdir -p out/sub && echo a > out/a.txt && echo b > out/sub/b.txt"))).wait()
            with tarfile.open(r.output_archive) as tf:
                names = sorted(tf.getnames())
                assert tf.extractfile("sub/b.txt").read() == b"b\n"
            assert names == ["a.txt", "sub", "sub/b.txt"]
            assert not (tmp_path / "tasks/out/0/work").exists()    # work dir cleaned up
            empty = await ex.start(ExecSpec("none", 0, argv=("true",))).wait()
            assert empty.output_archive == ""
        finally:
            await ex.close()
    asyncio.run(main())


# ---- bookkeeping ----------------------------------------------------------------------------
def test_start_is_idempotent_and_results_survive_a_restart(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    spec = ExecSpec("once", 1, shell=f"echo run >> {marker}")

    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            a = ex.start(spec)
            assert ex.start(spec) is a
            r = await a.wait()
        finally:
            await ex.close()
        ex2 = _ex(tmp_path)
        try:
            assert ex2.get("once", 1).result == r
            assert ex2.start(spec).result == r and ex2.running() == []
            assert ex2.get("once", 2) is None
        finally:
            await ex2.close()
        assert marker.read_text() == "run\n"
    asyncio.run(main())


def test_an_attempt_the_journal_saw_start_but_not_end_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    root = tmp_path / "tasks"
    root.mkdir()
    # What a node killed while two quiet attempts ran leaves behind: two S lines, no R.
    (root / ".journal").write_text("S t-a 1\nS t-b 1\nS t-c 1\nR t-c 1 ")   # and a torn line

    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            assert ex.get("t-a", 1) is None and ex.running() == []
            a = ex.start(ExecSpec("t-a", 1, shell=f"echo run >> {marker}"))   # without reap_orphans
            assert a.done and (a.result.state, a.result.interrupted) == ("failed", True)
            assert a.result.reason == "node restarted while the attempt ran"
            found = ex.reap_orphans()
            assert [(t, n) for t, n, _ in found] == [("t-b", 1), ("t-c", 1)]
            assert ex.start(ExecSpec("t-b", 1, shell=f"echo run >> {marker}")).result == found[0][2]
        finally:
            await ex.close()
        ex2 = _ex(tmp_path)
        try:
            assert ex2.reap_orphans() == []
            assert [ex2.get(k, 1).result.state for k in ("t-a", "t-b", "t-c")] == ["failed"] * 3
        finally:
            await ex2.close()
        assert not marker.exists()
    asyncio.run(main())


def test_an_older_versions_directories_are_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    old = Result(state="succeeded", exit_code=0, signal=None, reason="exit code 0", started_ms=1,
                 ended_ms=2, stdout_bytes=3, stderr_bytes=0, truncated=False, output_archive="")
    (root / "old/1").mkdir(parents=True)
    (root / "old/1/result.json").write_text(old.to_json())
    (root / "old/2/work/tmp").mkdir(parents=True)       # was running: a work dir, no result
    (root / "old/2/stdout").write_text("partial")
    (root / "new/1").mkdir(parents=True)                # logs only: its journal line is gone
    (root / "new/1/stdout").write_text("x")

    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            found = ex.reap_orphans()
            assert [(t, n, r.reason, r.stdout_bytes) for t, n, r in found] == \
                [("old", 2, "node restarted while the attempt ran", 7)]
            assert not (root / "old/2/work").exists()
            assert ex.get("old", 1).result == old and ex.get("new", 1) is None
            assert ex.kept_attempts() == [("new", 1), ("old", 1), ("old", 2)]
            ex.remove("old", 1)
            assert ex.get("old", 1) is None and not (root / "old/1").exists()
        finally:
            await ex.close()
        ex2 = _ex(tmp_path)                             # removals are in the journal too
        try:
            assert ex2.get("old", 1) is None and ex2.get("old", 2).result == found[0][2]
        finally:
            await ex2.close()
    asyncio.run(main())


def test_one_executor_per_root(tmp_path: Path) -> None:
    async def main() -> None:
        ex = _ex(tmp_path)
        with pytest.raises(RuntimeError, match="another executor"):
            _ex(tmp_path)
        assert (await ex.start(ExecSpec("still", 0, argv=("true",))).wait()).state == "succeeded"
        await ex.close()
        ex2 = _ex(tmp_path)                             # released by close
        await ex2.close()
    asyncio.run(main())


def test_removed_attempts_are_forgotten_and_memory_stays_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        ex = _ex(tmp_path, attempts_max=3)
        try:
            long = ex.start(ExecSpec("long", 0, argv=("sleep", "300")))
            for i in range(6):
                r = await ex.start(ExecSpec(f"s-{i}", 0, shell=f"echo {i}")).wait()
                assert r.state == "succeeded"
            assert len(ex._attempts) <= 4 and ex.get("long", 0) is long   # running ones stay
            assert ex.get("s-0", 0).result.stdout_bytes == 2              # reloaded from the journal
            ex.remove("s-0", 0)
            assert ex.get("s-0", 0) is None and not (tmp_path / "tasks/s-0/0").exists()
            with pytest.raises(RuntimeError):
                ex.remove("long", 0)
        finally:
            await ex.close()
    asyncio.run(main())


def test_close_kills_everything_and_limits_hold(tmp_path: Path, stray: list[int]) -> None:
    async def main() -> None:
        ex = _ex(tmp_path, running_max=2)
        a = ex.start(ExecSpec("l1", 0, argv=("sleep", "300")))
        b = ex.start(ExecSpec("l2", 0, argv=("sleep", "300")))
        full = await ex.start(ExecSpec("l3", 0, argv=("true",))).wait()
        assert full.state == "failed" and full.reason == "executor full: 2 attempts running"
        stray.extend([a.pid, b.pid])
        await ex.close()
        for x in (a, b):
            assert x.done and x.result.state == "cancelled" and x.result.interrupted
            assert x.result.signal == signal.SIGKILL
        await _until(lambda: _gone(a.pid) and _gone(b.pid), 5, "killed on close")
        assert ex.running() == []
        late = await ex.start(ExecSpec("l4", 0, argv=("true",))).wait()
        assert late.reason == "executor closed"
    asyncio.run(main())


def test_resource_probe() -> None:
    p = probe()
    assert p["cpu_count"] >= 1 and 0.0 <= p["cpu_percent"] <= 100.0
    assert len(p["load_avg"]) == 3
    assert 0 < p["memory_available_mb"] <= p["memory_total_mb"]
    assert p["gpu"] == len(p["gpus"])
    if not any(os.access(os.path.join(d, "nvidia-smi"), os.X_OK)
               for d in os.environ["PATH"].split(os.pathsep)):
        assert p["gpu"] == 0


def test_on_done_calls_back_once_after_the_result_is_persisted(tmp_path: Path) -> None:
    async def main() -> None:
        ex = _ex(tmp_path)
        try:
            got: list = []
            a = ex.start(ExecSpec("cb", 0, argv=("sh", "-c", "exit 3")))
            a.on_done(lambda r: got.append(("live", r.state, r.exit_code, ex.get("cb", 0).done)))
            res = await a.wait()
            await _until(lambda: got, 5, "the callback")
            assert got == [("live", "failed", 3, True)] and res.exit_code == 3
            a.on_done(lambda r: got.append(("late", r.exit_code)))    # already ended: still called
            bad = ex.start(ExecSpec("bad", 0, argv=("/no/such/program",)))   # ends inside start()
            bad.on_done(lambda r: got.append(("bad", r.state)))
            await _until(lambda: len(got) == 3, 5, "both callbacks")
            assert got[1:] == [("late", 3), ("bad", "failed")]
        finally:
            await ex.close()
    asyncio.run(main())
