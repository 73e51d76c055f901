"""Executor runner: runs task attempts as process groups, on the asyncio loop.

Theory of operation
-------------------
Layout under ``root_dir`` (names starting with "." are never task ids, so the tasks
layer's retention and orphan reaping skip them)::

    .journal                 one line per attempt start / result / removal (journal.py)
    .lock                    flock: one Executor per root
    .work/<boot>-<n>/        a work *slot*: the cwd and HOME of one attempt at a time,
        tmp/                 its TMPDIR
        out/                 archived to <task>/<attempt>/out.tar.gz at the end
    .progress/<task>.<n>     $GALAXY_PROGRESS_FILE of a running attempt
    <task_id>/<attempt>/     made with the first thing worth keeping: stdout, stderr,
                             out.tar.gz (a task that prints nothing and leaves out/
                             empty never gets one)

The common attempt costs no directory operation at all.  ``Executor.start(spec)``
appends ``S task attempt`` to the journal (one ``write``), takes a free work slot, and
spawns the command at once with ``subprocess.Popen`` (or, with an input archive, after
unpacking it into the slot on a thread), stdin ``/dev/null`` and stdout/stderr pipes made
here (no file objects).  The child, before ``exec``:

* calls ``setsid()`` (``start_new_session``): the attempt is its own session and process
  group, whose id is the leader's pid, so one ``killpg`` reaches every descendant that
  did not leave the group;
* (``death_guard="pdeathsig"`` only) sets ``PR_SET_PDEATHSIG = SIGKILL``, ``RLIMIT_AS``
  (``memory_mb``, where no memory cgroup can be had) and ``RLIMIT_CORE = 0`` in a
  ``preexec_fn``.

Right after the spawn the leader (and what it already forked) is moved into the attempt's
cgroups where the executor can make them (cgroup.py): a v2 one that ``cgroup.kill`` empties
at the leader's exit, whatever left the group, and a v1 memory one that holds the memory
limit of the whole task (then no ``RLIMIT_AS``).

Work slots are reused.  When an attempt ends, its slot goes back to the pool only if it is
exactly as it was handed out: ``work/`` holds nothing but ``tmp/`` and ``out/``, both
empty real directories (not links), all three with the mode they were made with (a
``scandir`` of each and three ``lstat``s, ~20 us) -- and only if nothing outside the
group held the pipes open past the leader's exit (an escapee, see below).  Otherwise the
slot is archived (``out/``), removed and replaced on one thread hop.  So the next attempt
in a slot starts in an empty directory whatever the previous one did, and a directory
that ever held anything is never handed out again.

Surviving the node's death.  The default ``death_guard="guardian"`` starts, once per
executor, a tiny helper process (``python -I -S``, its own session, ignoring
INT/TERM/HUP) whose stdin is a pipe from the node that never carries data.  The node
appends ``+pgid`` after each spawn and ``-pgid`` before reaping each leader to a registry
file (a write that wakes no one; rewritten with the live groups when it grows).  When the
node dies, even by ``kill -9``, the kernel closes the pipe; the guardian reads EOF, then
the registry, and ``killpg(SIGKILL)``s every group still registered: the leader *and its descendants* (PDEATHSIG reaches only the leader).
It also keeps ``preexec_fn`` off the spawn path: Python must then ``fork()`` the whole
node instead of ``vfork()``, which costs ~2 ms per task in a small process and ~10 ms in
a 150 MB one, with the event loop blocked throughout.  In this mode ``RLIMIT_CORE`` and the
memory limit (``RLIMIT_AS``) are set by ``prlimit`` right after the spawn, and the runner
then checks that nothing went past the limit before it held (``_limit_memory``: the peak
virtual size of the leader and of any child it already forked; one that did is killed and
reads "memory limit N MB is too small to load the program").  (An extra ``/bin/sh`` exec
to set the limit before the command's ``exec`` doubled the spawn cost: 1,650 vs 2,900
spawns/s.)  A guardian that dies (someone killed it) is restarted at the next spawn;
the registry already names every live group.

The runner watches the attempt without threads or child watchers: the two pipes and a
pidfd go into one epoll set of the executor's (``_Watcher``: one ``epoll_ctl`` each way
instead of uvloop's eight syscalls per ``add_reader``/``remove_reader`` pair), which is
itself watched with ``loop.add_reader``, so the same code runs under asyncio and uvloop.
When the pidfd turns readable the leader has exited but is *not yet reaped*, so
its pid still pins the process-group id: the runner ``killpg(SIGKILL)``s the rest of the
group first and only then reaps the leader.  That ordering is what makes the group kill
safe against pid reuse.  Output still buffered in the pipes is drained for at most
``drain_ms`` (a process that escaped the group may hold them open), then the result is
classified (``core.classify``) and appended to the journal, and only then are
``wait()``ers woken (persist before report).  All of that runs on the loop when the slot
is clean; the archive and removals, when there are any, on one thread hop before it.

Timeout and cancel: ``killpg(SIGTERM)``, then ``killpg(SIGKILL)`` after ``kill_grace_ms``
if the leader still lives; the leader's exit kills the rest of the group at once anyway.
The first reason to kill wins (a task cancelled after its timeout fired stays timed out).
Once such an attempt has ended (or one whose pipes an escapee held), ``_sweep`` kills on a
thread every process still carrying its ``GALAXY_PROGRESS_FILE``: what left the group.

Invariants:

* at most one ``Attempt`` per (task_id, attempt) in this process; ``start`` on a pair that
  already ran (in memory or in the journal) returns that attempt, and one the journal saw
  start but never end (the node died) is recorded failed/interrupted instead of run, so an
  attempt number never runs twice on one node;
* the journal's S line is written before the spawn, its R line before any waiter wakes;
* at most ``running_max`` attempts run, ``attempts_max`` are remembered in memory (older
  finished ones are reloaded from the journal on ``get``) and ``results_max`` in the
  journal;
* a slot is in the pool or used by exactly one running attempt, never both; a slot in the
  pool is empty (``_slot_clean`` held when it went back);
* once an attempt is done its leader is reaped and its group has been sent SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import logging
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from galaxy.executor import cgroup, core
from galaxy.executor.cgroup import Cgroup, Cgroups
from galaxy.executor.core import ExecSpec, Result
from galaxy.executor.journal import RESULTS_MAX, Journal

log = logging.getLogger("galaxy.executor")

STREAMS = ("stdout", "stderr")
READ_CHUNK_BYTES = 64 * 1024
RUNNING_MAX = 256                 # far above what the scheduler places on one machine
ATTEMPTS_MAX = 4096               # remembered in memory; older ones live in the journal
SLOTS_INITIAL = 4                 # work slots made by the constructor; more on demand
WORK_DIR = ".work"                # slots; under root_dir, never a task id
PROGRESS_DIR = ".progress"        # progress files of running attempts
JOURNAL_FILE = ".journal"
LOCK_FILE = ".lock"
LEGACY_SPARE_DIR = ".spare"       # made by earlier versions; removed at start
KILL_GRACE_MS = 1000              # SIGTERM -> SIGKILL: time for a leader to clean up
DRAIN_MS = 2000                   # pipe drain after exit; only an escapee makes it wait
PROGRESS_POLL_MS = 500            # progress file poll; a progress bar needs no more
ARCHIVE_MEMBERS_MAX = 100_000     # input archive members
ARCHIVE_BYTES_MAX = 4 << 30       # input archive unpacked size, and out/ archived size
PROGRESS_FILE_BYTES_MAX = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUARDIAN = "guardian"             # death_guard: a helper process kills our groups (default)
PDEATHSIG = "pdeathsig"           # death_guard: prctl in preexec_fn (costs a full fork)
CGROUP_MISSES_MAX = 3             # attempts in a row that could not join cgroups: stop using them
COMMAND_TTL_MS = 1000             # a command found in PATH is looked up again after this long
COMMANDS_MAX = 1024               # (command, PATH) pairs remembered
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
_PROGRESS_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC   # a fifo must not block the loop

_PR_SET_PDEATHSIG = 1
try:  # resolved in the parent: the child between fork and exec must not load libraries
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
except (OSError, AttributeError):  # not Linux: no parent-death signal
    _prctl = None


def _preexec(parent_pid: int, memory_bytes: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: only async-signal-safe-ish work here."""
    def run() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            # The parent may have died before prctl: then no signal will ever come.
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    return run


def _limit_memory(pid: int, limit: int) -> str:
    """Set ``RLIMIT_AS`` on a just-exec'd leader, and on any child it already forked; ""
    if that held, else why not: one of them already went past ``limit`` (under the limit
    it would have failed), or the limit could not be set (a setuid program; a limit above
    the node's own hard limit).

    The limit is set after the exec (``prlimit``), not before it, so that the spawn stays a
    ``vfork()`` with no shell in between.  What ran in between is checked instead: a
    process's peak virtual size (``VmPeak``) covers every mapping it ever made, and a child
    forked after its parent's ``prlimit`` inherits the limit, so walking the children after
    each ``prlimit`` leaves out only a child that forked, and exited, in those microseconds.
    Children are listed per thread; a process whose status shows one thread (a command
    just exec'd) has only its pid to look at, and the listing of its threads is skipped.
    (Likewise a command that ends within microseconds of its exec is not limited at all: it
    had no time to use what the limit is about.)
    """
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            resource.prlimit(p, resource.RLIMIT_AS, (limit, limit))
            status = _read_proc(f"/proc/{p}/status")
            # One thread (the common case: a command just exec'd) has one tid, its pid; a
            # thread started since this read started after the prlimit, so it and what it
            # forks are under the limit already.  Only with more is the list read.
            tids = (p,) if _one_thread(status) else os.listdir(f"/proc/{p}/task")
        except (ProcessLookupError, FileNotFoundError):
            continue          # it has exited: nothing of it can run on
        except OSError as e:
            return f"could not set the memory limit of {limit >> 20} MB: {e.strerror or e}"
        at = status.find(b"\nVmPeak:")
        if at >= 0 and int(status[at + 8:status.index(b"kB", at)]) * 1024 > limit:
            return f"memory limit {limit >> 20} MB is too small to load the program"
        for tid in tids:
            try:
                todo.extend(int(c) for c in _read_proc(f"/proc/{p}/task/{tid}/children").split())
            except FileNotFoundError:
                continue      # that thread has exited (its children are its process's)
    return ""


def _one_thread(status: bytes) -> bool:
    """``/proc/PID/status`` says the process has exactly one thread."""
    at = status.find(b"\nThreads:")
    return at >= 0 and status[at + 9:status.index(b"\n", at + 9)].strip() == b"1"


def _read_proc(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 16_384)         # /proc/PID/status is ~1.5 KB
    finally:
        os.close(fd)


# The guardian: a small process that outlives the node just long enough to kill the
# process groups the node had running.  It blocks reading its stdin, a pipe from the node
# that never carries data; EOF (the node closed it, exited or was killed -9: the kernel
# closes the pipe either way) means "kill every group the registry file still lists",
# then empty and remove the attempt cgroups (``cgroup.remove_tree``, the node's own code:
# cgroup.py needs only the standard library, so it imports under ``-I -S``), then exit.  The node appends "+pgid" / "-pgid" lines to that file: a write that
# wakes nobody (a line down the pipe woke the guardian at every spawn and exit, and cost
# the node's loop ~90-180 us each on a busy machine).  Ignoring SIGINT/SIGTERM/SIGHUP
# keeps it alive for that moment when a terminal or a service manager signals the node's
# whole group or session.
_GUARDIAN_CODE = """
import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
if len(sys.argv) > 3:             # cgroups to clean up: cgroup.py, imported now (stdlib only)
    sys.path.insert(0, sys.argv[2])
    import cgroup
while True:
    try:
        if not os.read(0, 4096):
            break
    except InterruptedError:
        continue
groups = set()
try:
    with open(sys.argv[1], "rb") as f:
        for line in f.read().split(b"\\n"):
            try:
                (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
            except ValueError:
                pass
except OSError:
    pass
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
for parent in sys.argv[3:]:       # the attempt cgroups: everything in them, then they
    cgroup.remove_tree(parent)
"""
REGISTRY_LINES_MAX = 4096         # then the registry file is rewritten with the live groups only


class _Guardian:
    """The node side of the guardian: registers and unregisters process groups in the
    registry file at ``path`` (one per guardian: a restarted node's guardian may still be
    reading its predecessor's).

    A registry that cannot be written (disk full, I/O error) must not make the guardian
    kill a group whose leader was reaped since (its id may be a stranger's by then): the
    guardian is then stopped by SIGKILL, which it does not survive to act on, and the
    attempts run unguarded until a registry can be written again (``ready``); after a
    crash in between, the restarted node's ``reap_orphans`` still finds them."""

    def __init__(self, path: str, cgroups: tuple[str, ...] = ()) -> None:
        self._path = path
        self._cgroups = cgroups          # the attempt cgroups' parents: killed and removed too
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._groups: set[int] = set()
        self._lines = 0

    def ready(self) -> None:
        """Before a spawn: a guardian runs (started, or restarted if someone killed it)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            log.warning("executor guardian died; restarting it")
            self._proc.stdin.close()   # type: ignore[union-attr]
            self._proc = None
        try:
            if self._fd < 0:
                self._rewrite()
            # -I -S: no site, no user paths: a fast start (once) that nothing can hijack.
            self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARDIAN_CODE, self._path,
                                           os.path.dirname(cgroup.__file__), *self._cgroups],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True,
                                          close_fds=True)
        except OSError as e:
            self._broken(e)

    def _rewrite(self) -> None:
        """The registry as the live groups alone, replaced atomically (a guardian reading
        it sees the old file or the new one, each complete)."""
        tmp = self._path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, "".join(f"+{g}\n" for g in sorted(self._groups)).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lines = len(self._groups)

    def _write(self, line: str) -> None:
        if self._fd < 0:
            return                       # broken: no guardian reads it
        self._lines += 1
        try:
            if self._lines > REGISTRY_LINES_MAX and self._lines > 4 * len(self._groups):
                self._rewrite()
            else:
                os.write(self._fd, line.encode())
        except OSError as e:
            self._broken(e)

    def _broken(self, e: OSError) -> None:
        log.error("executor guardian registry %s: %s; attempts run unguarded until it can be written",
                  self._path, e)
        if self._proc is not None:
            self._proc.kill()            # SIGKILL: it dies without reading the registry
            self._proc.wait()
            self._proc.stdin.close()     # type: ignore[union-attr]
            self._proc = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def add(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._write(f"+{pgid}\n")

    def discard(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._write(f"-{pgid}\n")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()     # EOF: it kills what is left and exits
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class _Watcher:
    """One epoll set for the pipes and pidfds of every attempt, watched by the loop as a
    single fd (``add_reader`` once per loop, not three times per attempt).

    Under uvloop each ``add_reader`` costs five syscalls (libuv checks the fd is pollable
    with an epoll add and delete, sets it non-blocking, then registers it) and each
    ``remove_reader`` three, plus a handle object; here a watch is one ``epoll_ctl`` and
    an unwatch one more.  The set is level-triggered like the loop's own, so an fd left
    readable (a chunk still in a pipe) keeps the set readable and is served on the next
    turn.  ``unwatch`` must come before the fd is closed: a registration outlives
    ``close`` while another process still holds a copy of the fd (a concurrent fork), and
    it could then report a reused fd number.  Events of an fd unwatched during a batch
    are dropped for the rest of that batch for the same reason (its number may already
    name a new fd).  Without epoll (not Linux), each fd is given to the loop directly."""

    BATCH = 64

    def __init__(self) -> None:
        self._ep = select.epoll() if hasattr(select, "epoll") else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._gone: set[int] = set()

    def watch(self, loop: asyncio.AbstractEventLoop, fd: int, fn: Callable[[int], None]) -> None:
        """Call ``fn(fd)`` on the loop while ``fd`` is readable (or hung up)."""
        if self._ep is None:
            loop.add_reader(fd, fn, fd)
            self._handlers[fd] = fn
            self._loop = loop
            return
        if loop is not self._loop:
            self._attach(loop)
        self._ep.register(fd, select.EPOLLIN)
        self._handlers[fd] = fn

    def unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is None:
            return
        if self._ep is None:
            if self._loop is not None:
                self._loop.remove_reader(fd)
            return
        self._ep.unregister(fd)
        self._gone.add(fd)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._ep is not None
        self._detach()
        loop.add_reader(self._ep.fileno(), self._ready)
        self._loop = loop

    def _detach(self) -> None:
        if self._loop is not None and self._ep is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._ep.fileno())
        self._loop = None

    def _ready(self) -> None:
        assert self._ep is not None
        gone = self._gone
        gone.clear()
        handlers = self._handlers
        for fd, _ in self._ep.poll(0, self.BATCH):
            if fd in gone:
                continue
            fn = handlers.get(fd)
            if fn is None:
                continue
            try:
                fn(fd)
            except Exception:    # as the loop does for a reader: log, serve the others
                log.exception("executor: handler of fd %d failed", fd)

    def close(self) -> None:
        for fd in list(self._handlers):
            self.unwatch(fd)
        self._detach()
        if self._ep is not None:
            self._ep.close()


class _Commands:
    """Where in PATH a command name is, remembered for ``COMMAND_TTL_MS`` (as a shell's hash
    table, but for a second only: a command installed earlier in PATH is run within a
    second).  Popen, given a bare name, builds the list of candidates for every spawn,
    under a warnings filter that costs more than the rest of its preparation; given the
    file, it execs that.  The file is what ``execvpe`` would pick: the first executable
    regular file of that name along PATH.  A PATH with a relative entry (which the child
    would resolve in its work dir) is left to Popen, as is a name that is not found."""

    def __init__(self) -> None:
        self._found: dict[tuple[str, str], tuple[str, int]] = {}

    def find(self, name: str, path: str, now_ms: int) -> str | None:
        if "/" in name:
            return None
        key = (name, path)
        hit = self._found.get(key)
        if hit is not None and now_ms - hit[1] < COMMAND_TTL_MS:
            return hit[0]
        if not all(d.startswith("/") for d in path.split(os.pathsep)):
            return None
        found = shutil.which(name, path=path)
        if found is None:
            self._found.pop(key, None)
            return None
        if len(self._found) >= COMMANDS_MAX:
            self._found.clear()
        self._found[key] = (found, now_ms)
        return found


def _spawn_error(e: BaseException, argv0: str) -> str:
    if isinstance(e, OSError):
        if e.errno == errno.ENOENT:
            return f"command not found: {argv0}"
        if e.errno == errno.EACCES:
            return f"not executable: {argv0}"
        if e.errno == errno.ENOEXEC:
            return f"not an executable format: {argv0}"
        if e.errno == errno.ENOMEM:
            return f"could not start {argv0}: memory limit too small to start"
        return f"could not start {argv0}: {e.strerror or e}"
    return f"could not start {argv0}: {e}"


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass    # group already empty (or, after a reuse we could not see, not ours)




def _make_slot(work: str) -> None:
    """Make one work slot (``work``, ``work/tmp``, ``work/out``); nothing left on failure."""
    try:
        os.mkdir(work, 0o700)
        os.mkdir(work + "/tmp", 0o700)
        os.mkdir(work + "/out", 0o700)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _slot_clean(work: str, dir_mode: int) -> bool:
    """True when ``work`` is exactly as a fresh slot: only ``tmp/`` and ``out/`` in it, both
    empty, none of the three a link or of another mode (``dir_mode`` is ``st_mode`` of a
    fresh slot).  Anything else, or any error, says False: the slot is then replaced."""
    try:
        if os.lstat(work).st_mode != dir_mode:
            return False
        seen = 0
        with os.scandir(work) as it:
            for e in it:
                if e.name not in ("tmp", "out") or e.stat(follow_symlinks=False).st_mode != dir_mode:
                    return False
                seen += 1
        if seen != 2:
            return False
        for sub in ("/tmp", "/out"):
            with os.scandir(work + sub) as it:
                if next(it, None) is not None:
                    return False
        return True
    except OSError:
        return False


def _empty_dir(p: str) -> bool:
    try:
        with os.scandir(p) as it:
            return next(it, None) is None
    except OSError:
        return True


def _mkdir_p(d: str) -> None:
    """``<task>/<attempt>`` under the root: at most two mkdirs."""
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        try:
            os.mkdir(os.path.dirname(d), 0o700)
        except FileExistsError:
            pass
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def _size(p: str) -> int:
    try:
        return os.stat(p).st_size
    except OSError:
        return 0


def _rmtree(p: str) -> None:
    """``rmtree`` that also removes what a task made unwritable (``chmod 500 .``): on any
    error, give every directory in the tree back its owner's rwx and try once more."""
    failed: list[str] = []
    shutil.rmtree(p, onerror=lambda _f, path, _e: failed.append(path))
    if not failed or not os.path.lexists(p):
        return
    stack = [p]
    while stack:             # iterative: a task can nest directories deeper than recursion
        d = stack.pop()
        try:
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                continue
            os.chmod(d, 0o700)
            with os.scandir(d) as it:
                stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
    shutil.rmtree(p, ignore_errors=True)


def _remove(p: str) -> None:
    """Remove a file or a tree, whatever it is; missing is fine."""
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError:
        _rmtree(p)


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.isreg():
        return core.FILE
    if m.isdir():
        return core.DIR
    if m.issym():
        return core.SYMLINK
    if m.islnk():
        return core.HARDLINK
    return core.OTHER


def unpack_archive(archive: str, dest: Path | None, *, members_max: int = ARCHIVE_MEMBERS_MAX,
                   bytes_max: int = ARCHIVE_BYTES_MAX) -> str:
    """Unpack a .tar/.tar.gz into ``dest`` (None: only check that it could be); "" on
    success, else why not (nothing raised)."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            members, total = [], 0
            for m in tf:        # stops as soon as the check below would fail: no bomb is read through
                members.append(m)
                total += max(0, m.size)
                if len(members) > members_max or total > bytes_max:
                    break
            why = core.check_archive(((m.name, _member_kind(m), m.linkname, m.size)
                                      for m in members),
                                     members_max=members_max, bytes_max=bytes_max)
            if why or dest is None:
                return why
            # tarfile's "data" filter is a second, independent fence (it also drops
            # set-uid bits and refuses links it cannot prove safe).
            tf.extractall(dest, members=members, filter="data")
    except FileNotFoundError:
        return f"input archive not found: {archive}"
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"input archive unreadable: {e}"
    return ""




def pack_out(out_dir: Path, archive: Path, *, bytes_max: int = ARCHIVE_BYTES_MAX) -> str:
    """tar.gz ``out_dir``'s contents (names relative to it) into ``archive``.

    Returns the archive path, or "" when out/ is missing or empty or larger than
    ``bytes_max`` (then nothing is kept; a partial result would look complete)."""
    out_dir, archive = Path(out_dir), Path(archive)
    try:
        entries = sorted(out_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return ""
    if not entries:
        return ""
    total = 0
    for p in out_dir.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
            if total > bytes_max:
                log.warning("out/ of %s exceeds %d bytes: not archived", out_dir, bytes_max)
                return ""

    def regular_only(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return ti if (ti.isreg() or ti.isdir() or ti.issym() or ti.islnk()) else None

    _mkdir_p(str(archive.parent))
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tf:
        for p in entries:
            tf.add(p, arcname=p.name, recursive=True, filter=regular_only)
    os.replace(tmp, archive)
    return str(archive)


class Attempt:
    """One run of one task: a process group, its pipes, its timers, then its Result."""

    def __init__(self, ex: Executor, spec: ExecSpec, on_progress: Callable[[int], None] | None,
                 attempt_dir: str) -> None:
        self.spec = spec
        self.progress: int | None = None
        self.pid: int | None = None
        self.result: Result | None = None
        self._ex = ex
        self._dir = attempt_dir          # <root>/<task>/<attempt>: made with the first file kept
        self._work = ""                  # cwd/HOME: a slot (or <dir>/work with keep_work_dir)
        self._progress_file = ""
        self._on_progress = on_progress
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._cg: Cgroup | None = None   # its cgroup (cgroup.py), if the executor has them
        self._mcg: Cgroup | None = None  # its memory limit's cgroup (v1), if it has one
        self._oom_killed = False         # the kernel's OOM killer ended one of its processes
        self._killed_for = ""
        self._spawn_error = ""
        self._escaped = False            # something outside the group held the pipes
        self._progress_seen = False      # the progress file existed at some poll
        self._file_progress: int | None = None   # the file's value at the last poll
        self._started_ms = ex._clock.wall_ms()
        # fd -> [name, log fd (-1 until the first byte), cap, progress parser or None]
        self._streams: dict[int, list] = {}
        self._caps = {s: core.StreamCap(spec.output_bytes_max) for s in STREAMS}
        self._timers: list[asyncio.TimerHandle] = []
        self._waiters: list[asyncio.Future[Result]] = []
        self._callbacks: list[Callable[[Result], Any]] = []
        self._finalizing = False
        self._task: asyncio.Task[None] | None = None

    # ---- public -------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.result is not None

    def cancel(self) -> None:
        self._kill(core.KILL_CANCEL, self._ex.kill_grace_ms)

    def on_done(self, fn: Callable[[Result], Any]) -> None:
        """Call ``fn(result)`` on a later turn of the loop once the attempt has ended (its
        result persisted, as ``wait()`` returns): what ``wait()`` does, without a task and
        a future per attempt."""
        if self.result is not None:
            asyncio.get_running_loop().call_soon(fn, self.result)
        else:
            self._callbacks.append(fn)

    async def wait(self) -> Result:
        if self.result is not None:
            return self.result
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    # ---- start --------------------------------------------------------------------
    def _begin(self) -> None:
        ex, spec = self._ex, self.spec
        try:
            if ex.keep_work_dir:         # the old layout, kept for debugging: <dir>/work stays
                _mkdir_p(self._dir)
                self._work = self._dir + "/work"
                _make_slot(self._work)
                self._progress_file = self._dir + "/progress"
            else:
                self._work = ex._take_slot()
                self._progress_file = f"{ex._progress_root}/{spec.task_id}.{spec.attempt}"
        except OSError as e:
            self._work = ""
            self._spawn_error = f"cannot make work dir: {e}"
            self._finalize()
            return
        if spec.input_archive:
            self._task = asyncio.get_running_loop().create_task(self._unpack_then_spawn())
        else:
            self._spawn()

    async def _unpack_then_spawn(self) -> None:
        why = await asyncio.to_thread(unpack_archive, self.spec.input_archive, Path(self._work),
                                      members_max=self._ex.archive_members_max,
                                      bytes_max=self._ex.archive_bytes_max)
        if why:
            self._spawn_error = why
            self._finalize()
        else:
            self._spawn()

    def _spawn(self) -> None:
        if self._killed_for:            # cancelled while the archive was unpacking
            self._finalize()
            return
        ex, spec, work = self._ex, self.spec, self._work
        argv = list(spec.argv) if spec.argv else ["/bin/sh", "-c", spec.shell]
        env = core.build_env(spec, path=ex.path, work_dir=work, tmp_dir=work + "/tmp",
                             progress_file=self._progress_file)
        # The memory limit: a cgroup where the executor can make one (resident memory of
        # the whole task), else RLIMIT_AS (address space, per process).
        memory = spec.memory_mb * 1024 * 1024
        if memory and ex._memcgs is not None and ex._cgroup_misses < CGROUP_MISSES_MAX:
            self._mcg = ex._memcgs.take(memory)
        rlimit = memory if self._mcg is None else 0
        if ex._cgroups is not None and ex._cgroup_misses < CGROUP_MISSES_MAX:
            self._cg = ex._cgroups.take()
        preexec = None
        if ex.death_guard == PDEATHSIG:
            preexec = _preexec(os.getpid(), rlimit)
        if ex.death_guard == GUARDIAN:
            ex._guardian.ready()
        # Our own pipes: Popen would wrap each end in a file object we never use.
        out_r, out_w = os.pipe()
        try:
            err_r, err_w = os.pipe()
        except OSError as e:
            os.close(out_r)
            os.close(out_w)
            self._spawn_error = _spawn_error(e, argv[0])
            self._finalize()
            return
        try:
            proc = subprocess.Popen(argv, stdin=ex._devnull, stdout=out_w, stderr=err_w, cwd=work,
                                    env=env, close_fds=True, start_new_session=True,
                                    preexec_fn=preexec,
                                    executable=ex._commands.find(argv[0], env["PATH"], ex._clock.now_ms()))
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            for fd in (out_r, err_r):
                os.close(fd)
            if isinstance(e, OSError) and e.filename == work:   # chdir, not exec (the slot was removed)
                self._spawn_error = f"cannot enter work dir {work}: {e.strerror}"
            else:
                self._spawn_error = _spawn_error(e, spec.argv[0] if spec.argv else "/bin/sh")
            self._finalize()
            return
        finally:
            os.close(out_w)
            os.close(err_w)
        self._proc, self.pid = proc, proc.pid
        late_rlimit = rlimit if ex.death_guard == GUARDIAN else 0   # (pdeathsig: set before the exec)
        fds = [c.procs_fd for c in (self._cg, self._mcg) if c is not None]
        if fds and not cgroup.move(fds, proc.pid):
            # A cgroup that went away under us (removed by hand), or moves refused although
            # mkdir was allowed: this attempt runs without them, with RLIMIT_AS for its
            # memory; the broken ones leave the pool, and after a few misses in a row the
            # executor stops using cgroups at all.
            ex._cgroup_misses += 1
            if ex._cgroup_misses == CGROUP_MISSES_MAX:
                log.error("cannot move attempts into cgroups (%d in a row); running them without",
                          CGROUP_MISSES_MAX)
            else:
                log.warning("cannot move %s/%s into its cgroups; it runs without them",
                            spec.task_id, spec.attempt)
            for c in (self._cg, self._mcg):
                if c is not None:
                    c.close()
            self._cg = self._mcg = None
            late_rlimit = memory
        elif fds:
            ex._cgroup_misses = 0
        if late_rlimit:
            why = _limit_memory(proc.pid, late_rlimit)
            if why:
                self._spawn_error = why
                self._kill(core.KILL_MEMORY_START, 0)
        if ex.death_guard == GUARDIAN:
            ex._guardian.add(proc.pid)
            try:    # a core dump would land in work/; the race only concerns the first µs
                resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))
            except OSError:
                pass
        self._started_ms = ex._clock.wall_ms()
        loop = asyncio.get_running_loop()
        watcher = ex._watcher
        for name, fd in (("stdout", out_r), ("stderr", err_r)):
            os.set_blocking(fd, False)
            parser = core.ProgressParser() if name == "stdout" else None
            self._streams[fd] = [name, -1, self._caps[name], parser]   # the file comes with the first byte
            watcher.watch(loop, fd, self._readable)
        try:
            self._pidfd = os.pidfd_open(proc.pid)
            watcher.watch(loop, self._pidfd, self._leader_exited)
        except (AttributeError, OSError):     # pre-5.3 kernel: poll instead
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            self._timers.append(loop.call_later(0.05, self._poll_exit))
        if spec.timeout_ms:
            self._timers.append(loop.call_later(spec.timeout_ms / 1000, self._kill,
                                                core.KILL_TIMEOUT, ex.kill_grace_ms))

    # ---- while running -------------------------------------------------------------
    def _readable(self, fd: int) -> None:
        entry = self._streams[fd]
        try:
            chunk = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_stream(fd)
            return
        keep = entry[2].accept(chunk)
        if keep:
            self._write_log(entry, keep)
        if entry[3] is not None:
            for value in entry[3].feed(chunk):
                self._set_progress(value)

    def _write_log(self, entry: list, data: bytes) -> None:
        name, log_fd = entry[0], entry[1]
        try:
            if log_fd < 0:
                path = f"{self._dir}/{name}"
                try:
                    log_fd = os.open(path, _LOG_FLAGS, 0o600)
                except FileNotFoundError:       # the attempt's first file: make its dir
                    _mkdir_p(self._dir)
                    log_fd = os.open(path, _LOG_FLAGS, 0o600)
                entry[1] = log_fd
            os.write(log_fd, data)
        except OSError as e:      # disk full: keep running, the cap still counts
            log.warning("cannot write %s of %s/%s: %s", name, self.spec.task_id, self.spec.attempt, e)

    def _close_stream(self, fd: int) -> None:
        entry = self._streams.pop(fd, None)
        if entry is None:
            return
        self._ex._watcher.unwatch(fd)
        os.close(fd)
        end = entry[2].closing()       # the end of an output that went past the cap
        if end:
            self._write_log(entry, end)
        if entry[1] >= 0:
            os.close(entry[1])
        if not self._streams and self._proc is not None and self._proc.returncode is not None:
            self._finalize()

    def _set_progress(self, value: int) -> None:
        if value == self.progress:
            return
        self.progress = value
        if self._on_progress is not None:
            try:
                self._on_progress(value)
            except Exception:   # a broken observer must not break the attempt
                log.exception("on_progress of %s/%s failed", self.spec.task_id, self.spec.attempt)

    def _poll_progress_file(self) -> None:
        if not self._progress_file:
            return
        try:
            fd = os.open(self._progress_file, _PROGRESS_FLAGS)
        except FileNotFoundError:
            return
        except OSError:               # a directory, no permission: still to be cleaned up
            self._progress_seen = True
            return
        self._progress_seen = True
        try:
            text = os.read(fd, PROGRESS_FILE_BYTES_MAX)
        except OSError:
            return
        finally:
            os.close(fd)
        value = core.parse_progress(text)
        # Only a change of the file counts: a file written once must not undo every later
        # GALAXY_PROGRESS line at each poll (the newest report of either kind wins).
        if value is not None and value != self._file_progress:
            self._file_progress = value
            self._set_progress(value)

    def _kill(self, reason: str, grace_ms: int) -> None:
        if self.result is not None or self._finalizing:
            return
        if self._killed_for and reason != core.KILL_CLOSE:
            return                       # the first reason stands
        self._killed_for = self._killed_for or reason
        if self._proc is None or self._proc.returncode is not None:
            return                       # not spawned yet: _spawn sees the flag
        if grace_ms <= 0:
            _killpg(self._proc.pid, signal.SIGKILL)
            return
        _killpg(self._proc.pid, signal.SIGTERM)
        self._timers.append(asyncio.get_running_loop().call_later(
            grace_ms / 1000, self._kill_hard))

    def _kill_hard(self) -> None:
        # Only while the leader is unreaped does its pid still name our group.
        if self._proc is not None and self._proc.returncode is None:
            _killpg(self._proc.pid, signal.SIGKILL)

    def _poll_exit(self) -> None:
        assert self._proc is not None
        if self._proc.returncode is None:
            try:
                exited = os.waitid(os.P_PID, self._proc.pid,
                                   os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                exited = True
            if not exited:
                self._timers.append(asyncio.get_running_loop().call_later(0.05, self._poll_exit))
                return
        self._leader_exited()

    def _leader_exited(self, _fd: int = -1) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        if self._pidfd >= 0:
            self._ex._watcher.unwatch(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        # The leader is a zombie: its pid still pins the group id, so this cannot hit a
        # stranger.  Whatever it left behind in the group dies with it, and in its cgroup
        # whatever left the group.
        _killpg(self._proc.pid, signal.SIGKILL)
        if self._cg is not None:
            self._cg.kill()
        elif self._mcg is not None:          # no v2 cgroup: the memory one has them too
            self._mcg.kill()
        if self._ex.death_guard == GUARDIAN:
            self._ex._guardian.discard(self._proc.pid)   # before the reap frees the id
        self._proc.wait()    # reaps at once: it has exited
        if not self._streams:
            self._finalize()
        else:
            self._timers.append(loop.call_later(self._ex.drain_ms / 1000, self._drain_expired))

    def _drain_expired(self) -> None:
        # Something outside the group (setsid) still holds our pipes; stop listening.  It
        # may also still write into the work dir: that slot is not reused.
        self._escaped = True
        for fd in list(self._streams):
            self._close_stream(fd)
        self._finalize()

    # ---- end ------------------------------------------------------------------------
    def _finalize(self) -> None:
        if self._finalizing:
            return
        self._finalizing = True
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        for fd in list(self._streams):
            self._close_stream(fd)
        ex = self._ex
        ran = self._proc is not None
        if ran:
            self._poll_progress_file()
        if self._mcg is not None:            # (its members were killed at the leader's exit)
            self._oom_killed = self._mcg.oom_killed()
            if self._cg is None and not self._mcg.empty():
                self._mcg.kill()             # v1 alone: a pass over pids, which a fork may outrun
                if not self._mcg.empty():
                    self._mcg.close()        # not pooled with a survivor in it
                    self._mcg = None
            if self._mcg is not None:
                ex._memcgs.give(self._mcg)  # type: ignore[union-attr]
            self._mcg = None
        if self._cg is not None:
            ex._cgroups.give(self._cg)      # type: ignore[union-attr]
            self._cg = None
        result = self._classify()
        if ran and (self._escaped or self._killed_for in (core.KILL_TIMEOUT, core.KILL_CANCEL)):
            ex._sweep_later(self._progress_file)     # what left the group goes too
        work, archive, drop_work = self._work, False, False
        if work and ex.keep_work_dir:
            archive = ran
        elif work:
            if (not self._escaped and not ex._closed and self._killed_for != core.KILL_CLOSE
                    and _slot_clean(work, ex._dir_mode)):
                ex._free_slots.append(work)          # empty, so there is no out/ to archive
            else:
                archive, drop_work = ran, True
        drop_progress = False
        if self._progress_seen:
            try:
                os.unlink(self._progress_file)
            except FileNotFoundError:
                pass
            except OSError:
                drop_progress = True                 # a directory: rmtree on the thread
        if archive or drop_work or drop_progress:
            # The disk work on one thread hop, off the loop; waiters wake after it, so the
            # work dir is already gone (or back in the pool) when wait() returns.
            asyncio.get_running_loop().create_task(
                self._finish_on_thread(result, archive, drop_work, drop_progress))
        else:
            self._store(result)

    def _classify(self) -> Result:
        spec, ex = self.spec, self._ex
        rc = self._proc.returncode if self._proc is not None else None
        spawn_error = self._spawn_error
        state, code, sig, reason, interrupted = core.classify(
            returncode=rc, spawn_error=spawn_error, killed_for=self._killed_for,
            timeout_ms=spec.timeout_ms, memory_mb=spec.memory_mb,
            shell=bool(spec.shell), oom_killed=self._oom_killed,
            stderr_tail=self._caps["stderr"].tail)
        ended_ms = ex._clock.wall_ms()
        out, err = self._caps["stdout"], self._caps["stderr"]
        return Result(state=state, exit_code=code, signal=sig, reason=reason,
                      started_ms=min(self._started_ms, ended_ms), ended_ms=ended_ms,
                      stdout_bytes=out.kept_bytes, stderr_bytes=err.kept_bytes,
                      truncated=out.truncated or err.truncated,
                      output_archive="", interrupted=interrupted, pid=self.pid)

    async def _finish_on_thread(self, result: Result, archive: bool, drop_work: bool,
                                drop_progress: bool) -> None:
        ex = self._ex
        replacement = ex._next_slot_name() if drop_work and not ex._closed else ""
        result, made = await asyncio.to_thread(self._disk_work, result, archive, drop_work,
                                               drop_progress, replacement)
        if made and not ex._closed:
            ex._free_slots.append(made)
        self._store(result)

    def _disk_work(self, result: Result, archive: bool, drop_work: bool, drop_progress: bool,
                   replacement: str) -> tuple[Result, str]:
        """On a thread: archive work/out, remove the used slot, make its replacement."""
        out = self._work + "/out"
        if archive and not _empty_dir(out):
            try:
                path = pack_out(Path(out), Path(self._dir) / "out.tar.gz",
                                bytes_max=self._ex.archive_bytes_max)
                result = dataclasses.replace(result, output_archive=path)
            except OSError as e:
                log.warning("cannot archive out/ of %s/%s: %s", self.spec.task_id,
                            self.spec.attempt, e)
        if drop_work:
            _rmtree(self._work)
        if drop_progress:
            _remove(self._progress_file)
        made = ""
        if replacement:
            try:
                _make_slot(replacement)
                made = replacement
            except OSError as e:
                log.warning("cannot make work slot %s: %s", replacement, e)
        return result, made

    def _store(self, result: Result) -> None:
        """Persist, then report: the journal line is written before any waiter wakes."""
        try:
            self._ex._journal.result((self.spec.task_id, self.spec.attempt), result.to_json())
        except OSError as e:
            log.error("cannot record the result of %s/%s: %s", self.spec.task_id,
                      self.spec.attempt, e)
        self.result = result
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(result)
        self._waiters.clear()
        if self._callbacks:
            loop = asyncio.get_running_loop()
            for fn in self._callbacks:
                loop.call_soon(fn, result)
            self._callbacks.clear()
        self._ex._finished(self)


class Executor:
    """Starts and tracks attempts under ``root_dir``; see the module docstring."""

    def __init__(self, root_dir: Path | str, *, clock, running_max: int = RUNNING_MAX,
                 attempts_max: int = ATTEMPTS_MAX, results_max: int = RESULTS_MAX,
                 kill_grace_ms: int = KILL_GRACE_MS, drain_ms: int = DRAIN_MS,
                 progress_poll_ms: int = PROGRESS_POLL_MS,
                 archive_members_max: int = ARCHIVE_MEMBERS_MAX,
                 archive_bytes_max: int = ARCHIVE_BYTES_MAX, keep_work_dir: bool = False,
                 path: str | None = None, death_guard: str = GUARDIAN, cgroups: bool = True) -> None:
        if death_guard not in (GUARDIAN, PDEATHSIG):
            raise ValueError(f"death_guard must be {GUARDIAN!r} or {PDEATHSIG!r}")
        self.death_guard = death_guard
        self.root_dir = Path(root_dir)
        self.root_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._root = str(self.root_dir)
        self._clock = clock
        self.running_max = running_max
        self.attempts_max = attempts_max
        self.kill_grace_ms = kill_grace_ms
        self.drain_ms = drain_ms
        self.progress_poll_ms = progress_poll_ms
        self.archive_members_max = archive_members_max
        self.archive_bytes_max = archive_bytes_max
        self.keep_work_dir = keep_work_dir
        # PATH is the one thing inherited from the node: tasks expect the machine's tools.
        self.path = path if path is not None else os.environ.get("PATH", DEFAULT_PATH)
        self._attempts: dict[tuple[str, int], Attempt] = {}
        self._running: dict[tuple[str, int], Attempt] = {}
        self._poll_handle: asyncio.TimerHandle | None = None
        self._to_sweep: set[str] = set()     # progress files of ended attempts whose escapees die next
        self._sweeper: asyncio.Task | None = None
        self._closed = False
        # One executor per root: a second one would empty the first one's slots.
        self._lock_fd = os.open(f"{self._root}/{LOCK_FILE}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise RuntimeError(f"another executor is using {self._root}") from None
        # One cgroup per running attempt where this machine lets us make them (cgroup.py);
        # a crashed predecessor's are emptied first.
        self._cgroups = Cgroups.open(self._root) if cgroups else None
        self._memcgs = Cgroups.open(self._root, "memory") if cgroups else None
        self._cgroup_misses = 0          # attempts in a row that could not join their cgroups
        self._guardian = _Guardian(str(self.root_dir / f"guardian-{os.getpid()}.groups"),
                                   tuple(p.parent for p in (self._cgroups, self._memcgs) if p is not None))
        # A crashed predecessor's registry: its guardian read it when the node died (what it
        # missed, reap_orphans finds from the journal).
        for old in self.root_dir.glob("guardian-*.groups*"):
            old.unlink(missing_ok=True)
        # Slots and progress files of an earlier run (or an older version's spares) are of
        # no use now: removed, and new slot names (a fresh boot prefix) cannot collide
        # with paths an escapee of that run may still hold.
        self._work_root = f"{self._root}/{WORK_DIR}"
        self._progress_root = f"{self._root}/{PROGRESS_DIR}"
        for d in (self._work_root, self._progress_root, f"{self._root}/{LEGACY_SPARE_DIR}"):
            _rmtree(d)
        os.mkdir(self._work_root, 0o700)
        os.mkdir(self._progress_root, 0o700)
        self._boot = os.urandom(4).hex()
        self._slots_made = 0
        self._free_slots: collections.deque[str] = collections.deque()
        for _ in range(SLOTS_INITIAL):
            self._free_slots.append(self._new_slot())
        # The mode a fresh directory gets here (0o700 less the umask): a slot with any
        # other mode was changed by its task and is not reused.
        self._dir_mode = os.lstat(self._free_slots[0]).st_mode
        self._journal = Journal(f"{self._root}/{JOURNAL_FILE}", results_max=results_max)
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._watcher = _Watcher()
        self._commands = _Commands()

    # ---- paths ----------------------------------------------------------------------
    def attempt_dir(self, task_id: str, attempt: int) -> Path:
        if not core.TASK_ID_RE.fullmatch(task_id) or not 0 <= int(attempt) <= core.ATTEMPT_MAX:
            raise ValueError(f"bad task id or attempt: {task_id!r}/{attempt!r}")
        return self.root_dir / task_id / str(int(attempt))

    def log_path(self, task_id: str, attempt: int, stream: str) -> Path:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}")
        return self.attempt_dir(task_id, attempt) / stream

    def progress_file(self, task_id: str, attempt: int) -> str:
        """The ``$GALAXY_PROGRESS_FILE`` an attempt gets (it exists only if the task made it)."""
        if self.keep_work_dir:
            return str(self.attempt_dir(task_id, attempt) / "progress")
        self.attempt_dir(task_id, attempt)            # validates
        return f"{self._progress_root}/{task_id}.{int(attempt)}"

    # ---- attempts -------------------------------------------------------------------
    def start(self, spec: ExecSpec, on_progress: Callable[[int], None] | None = None) -> Attempt:
        """Spawn ``spec`` now (sync; needs the running loop), or record why it cannot run.

        Never raises for a bad spec or command: the attempt comes back failed."""
        why = core.validate(spec)
        key = (spec.task_id, spec.attempt)
        if why and not (isinstance(spec.task_id, str) and core.TASK_ID_RE.fullmatch(spec.task_id)
                        and isinstance(spec.attempt, int) and 0 <= spec.attempt <= core.ATTEMPT_MAX):
            a = Attempt(self, spec, on_progress, "")   # no safe place on disk for it
            a.result = self._failed_now(why)
            return a
        existing = self.get(*key)
        if existing is not None:
            return existing
        a = Attempt(self, spec, on_progress, f"{self._root}/{spec.task_id}/{spec.attempt}")
        if self._closed:                 # nothing can be recorded any more
            a.result = self._failed_now("executor closed")
            self._remember(a)
            return a
        self._remember(a)
        self._running[key] = a
        if key in self._journal.started:
            # Started by an earlier incarnation of this node, never finished.
            self._sweep(self._progress_files(key))
            a._killed_for = core.KILL_ORPHAN
            a._finalize()
            return a
        if len(self._running) > self.running_max:
            why = f"executor full: {self.running_max} attempts running"
        if not why:
            try:
                self._journal.start(key)      # before the spawn: never run twice
            except OSError as e:
                why = f"cannot record the attempt: {e}"
        if why:
            a._spawn_error = why
            a._finalize()
        else:
            a._begin()
            self._arm_poll()
        return a

    def running(self) -> list[tuple[str, int]]:
        return list(self._running)

    def get(self, task_id: str, attempt: int) -> Attempt | None:
        key = (task_id, attempt)
        a = self._attempts.get(key)
        if a is not None:
            return a
        try:
            text = self._journal.load(key)
            if text is None:
                return None
            result = Result.from_json(text)
        except (ValueError, OSError, TypeError):
            return None
        a = Attempt(self, ExecSpec(task_id=task_id, attempt=attempt), None,
                    f"{self._root}/{task_id}/{attempt}")
        a.result = result
        return a

    def load_result(self, task_id: str, attempt: int) -> Result | None:
        a = self.get(task_id, attempt)
        return a.result if a is not None else None

    def kept_attempts(self) -> list[tuple[str, int]]:
        """Every (task_id, attempt) this executor keeps anything of: a result in the journal
        or a directory (logs, archive).  For retention: ``remove`` each one no longer needed."""
        keys = set(self._journal.results) | self._journal.started
        for task_id, attempt in self._attempt_dirs():
            keys.add((task_id, attempt))
        return sorted(keys - self._running.keys())

    def remove(self, task_id: str, attempt: int) -> None:
        """Forget a finished attempt and delete its directory (logs, archive)."""
        key = (task_id, attempt)
        if key in self._running:
            raise RuntimeError(f"{task_id}/{attempt} is still running")
        d = self.attempt_dir(task_id, attempt)
        self._attempts.pop(key, None)
        try:
            self._journal.forget(key)
        except OSError as e:
            log.warning("cannot record the removal of %s/%s: %s", task_id, attempt, e)
        shutil.rmtree(d, ignore_errors=True)

    async def close(self) -> None:
        """Kill every attempt this executor started, and wait (boundedly) for their ends."""
        if self._closed:
            return
        self._closed = True
        running = list(self._running.values())
        for a in running:
            a._kill(core.KILL_CLOSE, 0)
        if running:
            await asyncio.wait([asyncio.ensure_future(a.wait()) for a in running],
                               timeout=(self.drain_ms + 5000) / 1000)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._sweep({a._progress_file for a in running if a._progress_file} | self._to_sweep)
        if self._cgroups is not None:
            self._cgroups.close()
        if self._memcgs is not None:
            self._memcgs.close()
        self._guardian.close()
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        self._free_slots.clear()
        for d in (self._work_root, self._progress_root):
            _rmtree(d)
        self._journal.close()
        self._watcher.close()
        os.close(self._devnull)
        os.close(self._lock_fd)      # releases the flock

    def reap_orphans(self) -> list[tuple[str, int, Result]]:
        """After a restart: kill what a previous incarnation left running under root_dir and
        record those attempts as failed (interrupted).  Call before starting new attempts."""
        orphans = {k for k in self._journal.started if k not in self._running}
        # Directories of an older version (result.json per attempt): its results are taken
        # into the journal, and an attempt it left unfinished (a work/ without a result)
        # is an orphan.  A directory of this version has a journal line, or had one
        # trimmed long ago (then it is neither).
        for key in self._attempt_dirs():
            if key in self._journal.results or key in self._journal.started or key in self._running:
                continue
            d = f"{self._root}/{key[0]}/{key[1]}"
            try:
                with open(f"{d}/result.json") as f:
                    self._journal.result(key, Result.from_json(f.read()).to_json())
                continue
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError) as e:
                log.warning("unreadable result in %s: %s", d, e)
            if os.path.isdir(f"{d}/work"):
                orphans.add(key)
        found: list[tuple[str, int, Result]] = []
        progress_files: set[str] = set()
        for key in sorted(orphans):
            d = f"{self._root}/{key[0]}/{key[1]}"
            progress_files |= self._progress_files(key)
            now = self._clock.wall_ms()
            r = Result(state=core.FAILED, exit_code=None, signal=None,
                       reason="node restarted while the attempt ran", started_ms=now,
                       ended_ms=now, stdout_bytes=_size(f"{d}/stdout"),
                       stderr_bytes=_size(f"{d}/stderr"), truncated=False,
                       output_archive="", interrupted=True)
            try:
                self._journal.result(key, r.to_json())
            except OSError as e:
                log.error("cannot record the orphan %s/%s: %s", key[0], key[1], e)
            shutil.rmtree(f"{d}/work", ignore_errors=True)     # an older version's work dir
            found.append((key[0], key[1], r))
        self._sweep(progress_files)
        return found

    # ---- internals ------------------------------------------------------------------
    def _progress_files(self, key: tuple[str, int]) -> set[str]:
        # Both layouts: an earlier run may have had another keep_work_dir.
        return {f"{self._progress_root}/{key[0]}.{key[1]}", f"{self._root}/{key[0]}/{key[1]}/progress"}

    def _attempt_dirs(self) -> list[tuple[str, int]]:
        keys = []
        try:
            tasks = [e.name for e in os.scandir(self._root)
                     if core.TASK_ID_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        except OSError:
            return keys
        for task_id in tasks:
            try:
                with os.scandir(f"{self._root}/{task_id}") as it:
                    keys.extend((task_id, int(e.name)) for e in it
                                if e.name.isdigit() and len(e.name) <= 7)
            except OSError:
                continue
        return keys

    def _new_slot(self) -> str:
        work = self._next_slot_name()
        _make_slot(work)
        return work

    def _next_slot_name(self) -> str:
        self._slots_made += 1
        return f"{self._work_root}/{self._boot}-{self._slots_made}"

    def _take_slot(self) -> str:
        """A clean work slot: from the pool, else made now (three mkdirs)."""
        return self._free_slots.popleft() if self._free_slots else self._new_slot()

    def _failed_now(self, why: str) -> Result:
        now = self._clock.wall_ms()
        return Result(state=core.FAILED, exit_code=None, signal=None, reason=why,
                      started_ms=now, ended_ms=now, stdout_bytes=0, stderr_bytes=0,
                      truncated=False, output_archive="")

    def _remember(self, a: Attempt) -> None:
        self._attempts[(a.spec.task_id, a.spec.attempt)] = a
        if len(self._attempts) > self.attempts_max:
            # Oldest first (dicts keep insertion order); only running ones are skipped, so
            # this looks at most at running_max + 1 entries.
            for key, old in self._attempts.items():
                if old.done:
                    del self._attempts[key]
                    break

    def _finished(self, a: Attempt) -> None:
        self._running.pop((a.spec.task_id, a.spec.attempt), None)

    def _arm_poll(self) -> None:
        if self._poll_handle is None:
            self._poll_handle = asyncio.get_running_loop().call_later(
                self.progress_poll_ms / 1000, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        for a in list(self._running.values()):
            if a._proc is not None and not a._finalizing:
                a._poll_progress_file()
        if self._running:
            self._arm_poll()

    def _sweep_later(self, progress_file: str) -> None:
        """Sweep (below) the escapees of an attempt killed for its timeout or a cancel, or
        that held its pipes past its end: on a thread, several attempts in one pass."""
        self._to_sweep.add(progress_file)
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_pending(), name="executor-sweep")

    async def _sweep_pending(self) -> None:
        try:
            while self._to_sweep:
                files, self._to_sweep = self._to_sweep, set()
                await asyncio.to_thread(self._sweep, files)
        finally:
            self._sweeper = None

    @staticmethod
    def _sweep(progress_files: set[str]) -> None:
        """SIGKILL every process whose environment names one of these attempts.

        Catches what left the process group (setsid, daemonising) but kept the
        environment the executor gave it; a process that also cleared it escapes."""
        if not progress_files:
            return
        me = os.getpid()
        for p in psutil.process_iter():
            try:
                if p.pid != me and p.environ().get("GALAXY_PROGRESS_FILE") in progress_files:
                    p.kill()
            except (psutil.Error, OSError):
                continue
