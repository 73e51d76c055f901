"""Executor runner: runs task attempts as process groups, on the asyncio loop.

Theory of operation
-------------------
``Executor.start(spec)`` makes ``root/<task_id>/<attempt>/`` with ``work/`` (the cwd,
``HOME``; ``work/tmp`` is ``TMPDIR``; ``work/out/`` is archived at the end) by renaming a
spare tree into place (spares are made in batches on a thread under ``root/.spare``, so
the loop pays one ``rename`` instead of four ``mkdir``s; mkdirs when none is ready), then spawns
the command at once with ``subprocess.Popen`` (or, with an input archive, after unpacking
it in a thread).  The child, before ``exec``:

* calls ``setsid()`` (``start_new_session``): the attempt is its own session and process
  group, whose id is the leader's pid, so one ``killpg`` reaches every descendant that
  did not leave the group;
* (``death_guard="pdeathsig"`` only) sets ``PR_SET_PDEATHSIG = SIGKILL``, ``RLIMIT_AS``
  (``memory_mb``) and ``RLIMIT_CORE = 0`` in a ``preexec_fn``.

Surviving the node's death.  The default ``death_guard="guardian"`` starts, once per
executor, a tiny helper process (``python -I -S``, its own session, ignoring
INT/TERM/HUP) whose stdin is a pipe from the node.  The node writes ``+pgid`` after each
spawn and ``-pgid`` before reaping each leader.  When the node dies, even by ``kill -9``,
the kernel closes the pipe; the guardian reads EOF and ``killpg(SIGKILL)``s every group
still registered: the leader *and its descendants* (PDEATHSIG reaches only the leader).
It also keeps ``preexec_fn`` off the spawn path: Python must then ``fork()`` the whole
node instead of ``vfork()``, which costs ~2 ms per task in a small process and ~10 ms in
a 150 MB one, with the event loop blocked throughout.  In this mode the memory limit is
set by ``/bin/sh -c 'ulimit -v N && exec "$@"'`` (one extra exec, only when a limit is
asked for) and ``RLIMIT_CORE`` by ``prlimit`` right after the spawn.  A guardian that
dies (someone killed it) is restarted on the next write and told every live group.

The runner watches the attempt without threads or child watchers: the two pipes and a
pidfd are registered with ``loop.add_reader``, so the same code runs under asyncio and
uvloop.  When the pidfd turns readable the leader has exited but is *not yet reaped*, so
its pid still pins the process-group id: the runner ``killpg(SIGKILL)``s the rest of the
group first and only then reaps the leader.  That ordering is what makes the group kill
safe against pid reuse.  Output still buffered in the pipes is drained for at most
``drain_ms`` (a process that escaped the group may hold them open), then the result is
classified (``core.classify``), then on one thread hop ``work/out`` archived,
``result.json`` written atomically and ``work/`` removed, and only then are ``wait()``ers
woken (persist before report; ``work/`` is gone when ``wait()`` returns).

Timeout and cancel: ``killpg(SIGTERM)``, then ``killpg(SIGKILL)`` after ``kill_grace_ms``
if the leader still lives; the leader's exit kills the rest of the group at once anyway.
The first reason to kill wins (a task cancelled after its timeout fired stays timed out).

Invariants:

* at most one ``Attempt`` per (task_id, attempt) in this process; ``start`` on a pair that
  already ran (in memory or with a ``result.json`` on disk) returns that attempt, so an
  attempt number never runs twice on one node;
* at most ``running_max`` attempts run and ``attempts_max`` are remembered in memory
  (older finished ones are dropped and reloaded from ``result.json`` on ``get``);
* every result a waiter sees is already in ``result.json`` (renamed into place; not
  fsynced: the task table in the store is the durable record, this file lets a restarted
  node report an attempt that ended while the node was down);
* once an attempt is done its leader is reaped and its group has been sent SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import psutil

from galaxy.executor import core
from galaxy.executor.core import ExecSpec, Result

log = logging.getLogger("galaxy.executor")

STREAMS = ("stdout", "stderr")
READ_CHUNK_BYTES = 64 * 1024
RUNNING_MAX = 256                 # far above what the scheduler places on one machine
SPARE_DIRS_MIN = 4                # attempt trees kept ready (made on a thread) so a start renames one
SPARE_DIRS_BATCH = 16             # made per refill: one thread hop for many starts
SPARE_DIR = ".spare"              # under root_dir; not a task id, so retention and reaping skip it
ATTEMPTS_MAX = 4096               # remembered in memory; older ones live in result.json
KILL_GRACE_MS = 1000              # SIGTERM -> SIGKILL: time for a leader to clean up
DRAIN_MS = 2000                   # pipe drain after exit; only an escapee makes it wait
PROGRESS_POLL_MS = 500            # progress file poll; a progress bar needs no more
ARCHIVE_MEMBERS_MAX = 100_000     # input archive members
ARCHIVE_BYTES_MAX = 4 << 30       # input archive unpacked size, and out/ archived size
PROGRESS_FILE_BYTES_MAX = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUARDIAN = "guardian"             # death_guard: a helper process kills our groups (default)
PDEATHSIG = "pdeathsig"           # death_guard: prctl in preexec_fn (costs a full fork)

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


def _check_command(argv0: str, path: str, cwd: Path) -> str:
    """What Popen's exec would say about ``argv0``, for when a shell execs it instead."""
    if "/" in argv0:
        target = cwd / argv0
        if not target.exists():
            return f"command not found: {argv0}"
        if not target.is_file() or not os.access(target, os.X_OK):
            return f"not executable: {argv0}"
        return ""
    return "" if shutil.which(argv0, path=path) else f"command not found: {argv0}"


# The guardian: a small process that outlives the node just long enough to kill the
# process groups the node had running.  It reads "+pgid" / "-pgid" lines on stdin; EOF
# (the node closed it, exited or was killed -9: the kernel closes the pipe either way)
# means "kill every group still registered", then it exits.  Ignoring SIGINT/SIGTERM/
# SIGHUP keeps it alive for that moment when a terminal or a service manager signals the
# node's whole group or session.
_GUARDIAN_CODE = """
import os, signal
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
groups, buf = set(), b""
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    *lines, buf = (buf + chunk).split(b"\\n")
    for line in lines:
        try:
            (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
        except ValueError:
            pass
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
"""


class _Guardian:
    """The node side of the guardian: registers and unregisters process groups."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        # -I -S: no site, no user paths: a fast start (once) that nothing can hijack.
        self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARDIAN_CODE],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True,
                                      close_fds=True)
        if self._groups:      # a restarted guardian learns what its predecessor knew
            self._send("".join(f"+{g}\n" for g in sorted(self._groups)))

    def _send(self, text: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            os.write(self._proc.stdin.fileno(), text.encode())
        except BrokenPipeError:        # it died (killed by someone): start another
            log.warning("executor guardian died; restarting it")
            self._proc.stdin.close()
            self._proc.wait()
            self._proc = None
            self._ensure()

    def add(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._ensure()
        self._send(f"+{pgid}\n")

    def discard(self, pgid: int) -> None:
        self._groups.discard(pgid)
        if self._proc is not None:
            self._send(f"-{pgid}\n")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        if self._proc is None:
            return
        assert self._proc.stdin is not None
        self._proc.stdin.close()     # EOF: it kills what is left and exits
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _make_dirs(d: Path) -> None:
    # One mkdir per level, none failing: on a busy disk each costs a fraction of a ms.
    d.parent.mkdir(mode=0o700, exist_ok=True)
    for p in (d, d / "work", d / "work" / "tmp", d / "work" / "out"):
        p.mkdir(mode=0o700)


def _make_spares(spare_root: Path, first: int, n: int) -> list[Path]:
    """``n`` attempt directory trees (``work/tmp``, ``work/out``) ready to be renamed into
    place; runs on a thread.  A failure makes fewer (the caller falls back to mkdir)."""
    out = []
    try:
        spare_root.mkdir(mode=0o700, exist_ok=True)
        for i in range(first, first + n):
            d = spare_root / f"s-{i}"
            for p in (d, d / "work", d / "work" / "tmp", d / "work" / "out"):
                p.mkdir(mode=0o700)
            out.append(d)
    except OSError as e:
        log.warning("cannot prepare attempt directories in %s: %s", spare_root, e)
    return out


def _empty_dir(p: Path) -> bool:
    try:
        with os.scandir(p) as it:
            return next(it, None) is None
    except OSError:
        return True


def _remove_empty_work(work: Path) -> bool:
    """The common case without a thread: work/ holds only empty tmp/ and out/."""
    try:
        for sub in ("tmp", "out"):
            (work / sub).rmdir()
        work.rmdir()
        return True
    except FileNotFoundError:
        return not work.exists()
    except OSError:
        return False


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


def unpack_archive(archive: str, dest: Path, *, members_max: int = ARCHIVE_MEMBERS_MAX,
                   bytes_max: int = ARCHIVE_BYTES_MAX) -> str:
    """Unpack a .tar/.tar.gz into ``dest``; "" on success, else why not (nothing raised)."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = []
            for m in tf:
                members.append(m)
                if len(members) > members_max:
                    break
            why = core.check_archive(((m.name, _member_kind(m), m.linkname, m.size)
                                      for m in members),
                                     members_max=members_max, bytes_max=bytes_max)
            if why:
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

    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tf:
        for p in entries:
            tf.add(p, arcname=p.name, recursive=True, filter=regular_only)
    os.replace(tmp, archive)
    return str(archive)


class Attempt:
    """One run of one task: a process group, its pipes, its timers, then its Result."""

    def __init__(self, ex: Executor, spec: ExecSpec, on_progress: Callable[[int], None] | None,
                 attempt_dir: Path | None) -> None:
        self.spec = spec
        self.progress: int | None = None
        self.pid: int | None = None
        self.result: Result | None = None
        self._ex = ex
        self._dir = attempt_dir
        self._on_progress = on_progress
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._killed_for = ""
        self._spawn_error = ""
        self._started_ms = ex._clock.wall_ms()
        self._streams: dict[int, tuple[str, object, int, core.StreamCap, core.ProgressParser | None]] = {}
        self._caps = {s: core.StreamCap(spec.output_bytes_max) for s in STREAMS}
        self._timers: list[asyncio.TimerHandle] = []
        self._waiters: list[asyncio.Future[Result]] = []
        self._finalizing = False
        self._task: asyncio.Task[None] | None = None

    # ---- public -------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.result is not None

    def cancel(self) -> None:
        self._kill(core.KILL_CANCEL, self._ex.kill_grace_ms)

    async def wait(self) -> Result:
        if self.result is not None:
            return self.result
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    # ---- start --------------------------------------------------------------------
    def _begin(self) -> None:
        if self.spec.input_archive:
            self._task = asyncio.get_running_loop().create_task(self._unpack_then_spawn())
        else:
            self._spawn()

    async def _unpack_then_spawn(self) -> None:
        assert self._dir is not None
        why = await asyncio.to_thread(unpack_archive, self.spec.input_archive, self._dir / "work",
                                      members_max=self._ex.archive_members_max,
                                      bytes_max=self._ex.archive_bytes_max)
        if why:
            self._spawn_error = why
            self._finalize()
        else:
            self._spawn()

    def _spawn(self) -> None:
        assert self._dir is not None
        if self._killed_for:            # cancelled while the archive was unpacking
            self._finalize()
            return
        spec, d = self.spec, self._dir
        argv = list(spec.argv) if spec.argv else ["/bin/sh", "-c", spec.shell]
        env = core.build_env(spec, path=self._ex.path, work_dir=str(d / "work"),
                             tmp_dir=str(d / "work" / "tmp"),
                             progress_file=str(d / "progress"))
        preexec = None
        if self._ex.death_guard == PDEATHSIG:
            preexec = _preexec(os.getpid(), spec.memory_mb * 1024 * 1024)
        elif spec.memory_mb:
            # No preexec_fn (it forces fork over vfork, see docs/executor.md): the limit is
            # set by a shell that then execs the command, so it holds from the first byte.
            why = _check_command(argv[0], env["PATH"], d / "work")
            if why:
                self._spawn_error = why
                self._finalize()
                return
            argv = ["/bin/sh", "-c", f'ulimit -v {spec.memory_mb * 1024} && exec "$@"',
                    "galaxy-memory-limit", *argv]
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=d / "work", env=env, close_fds=True, start_new_session=True,
                preexec_fn=preexec)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            self._spawn_error = _spawn_error(e, spec.argv[0] if spec.argv else "/bin/sh")
            self._finalize()
            return
        self._proc, self.pid = proc, proc.pid
        if self._ex.death_guard == GUARDIAN:
            self._ex._guardian.add(proc.pid)
            try:    # a core dump would land in work/; the race only concerns the first µs
                resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))
            except OSError:
                pass
        self._started_ms = self._ex._clock.wall_ms()
        loop = asyncio.get_running_loop()
        for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            assert pipe is not None
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            parser = core.ProgressParser() if name == "stdout" else None
            self._streams[fd] = (name, pipe, -1, self._caps[name], parser)   # the file comes with the first byte
            loop.add_reader(fd, self._readable, fd)
        try:
            self._pidfd = os.pidfd_open(proc.pid)
            loop.add_reader(self._pidfd, self._leader_exited)
        except (AttributeError, OSError):     # pre-5.3 kernel: poll instead
            self._timers.append(loop.call_later(0.05, self._poll_exit))
        if spec.timeout_ms:
            self._timers.append(loop.call_later(spec.timeout_ms / 1000, self._kill,
                                                core.KILL_TIMEOUT, self._ex.kill_grace_ms))

    # ---- while running -------------------------------------------------------------
    def _readable(self, fd: int) -> None:
        name, pipe, log_fd, cap, parser = self._streams[fd]
        try:
            chunk = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_stream(fd)
            return
        keep = cap.accept(chunk)
        if keep:
            try:
                if log_fd < 0:
                    assert self._dir is not None
                    log_fd = os.open(self._dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                    self._streams[fd] = (name, pipe, log_fd, cap, parser)
                os.write(log_fd, keep)
            except OSError as e:      # disk full: keep running, the cap still counts
                log.warning("cannot write %s of %s/%s: %s", name, self.spec.task_id,
                            self.spec.attempt, e)
        if parser is not None:
            for value in parser.feed(chunk):
                self._set_progress(value)

    def _close_stream(self, fd: int) -> None:
        entry = self._streams.pop(fd, None)
        if entry is None:
            return
        asyncio.get_running_loop().remove_reader(fd)
        entry[1].close()       # type: ignore[attr-defined]
        if entry[2] >= 0:
            os.close(entry[2])
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
        if self._dir is None:
            return
        try:
            with open(self._dir / "progress", "rb") as f:
                text = f.read(PROGRESS_FILE_BYTES_MAX)
        except OSError:
            return
        value = core.parse_progress(text)
        if value is not None:
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

    def _leader_exited(self) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        if self._pidfd >= 0:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        # The leader is a zombie: its pid still pins the group id, so this cannot hit a
        # stranger.  Whatever it left behind in the group dies with it.
        _killpg(self._proc.pid, signal.SIGKILL)
        if self._ex.death_guard == GUARDIAN:
            self._ex._guardian.discard(self._proc.pid)   # before the reap frees the id
        self._proc.wait()    # reaps at once: it has exited
        if not self._streams:
            self._finalize()
        else:
            self._timers.append(loop.call_later(self._ex.drain_ms / 1000, self._drain_expired))

    def _drain_expired(self) -> None:
        # Something outside the group (setsid) still holds our pipes; stop listening.
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
        if self._proc is not None:
            self._poll_progress_file()
        asyncio.get_running_loop().create_task(self._finish())

    async def _finish(self) -> None:
        assert self._dir is not None
        rc = self._proc.returncode if self._proc is not None else None
        state, code, sig, reason, interrupted = core.classify(
            returncode=rc, spawn_error=self._spawn_error, killed_for=self._killed_for,
            timeout_ms=self.spec.timeout_ms, memory_mb=self.spec.memory_mb,
            shell=bool(self.spec.shell) or (self.spec.memory_mb > 0 and
                                            self._ex.death_guard == GUARDIAN),
            stderr_tail=self._caps["stderr"].tail)
        ended_ms = self._ex._clock.wall_ms()
        result = Result(state=state, exit_code=code, signal=sig, reason=reason,
                        started_ms=min(self._started_ms, ended_ms), ended_ms=ended_ms,
                        stdout_bytes=self._caps["stdout"].kept_bytes,
                        stderr_bytes=self._caps["stderr"].kept_bytes,
                        truncated=self._caps["stdout"].truncated or self._caps["stderr"].truncated,
                        output_archive="", interrupted=interrupted, pid=self.pid)
        # The disk work (archive, result.json, removing work/) on one thread hop, off the
        # loop; the waiters are woken only after it, so work/ is gone when wait() returns.
        self._settle(await asyncio.to_thread(self._store_result, result, self._proc is not None))

    def _store_result(self, result: Result, ran: bool) -> Result:
        """On a thread: archive work/out, write result.json, remove work/."""
        assert self._dir is not None
        out = self._dir / "work" / "out"
        if ran and not _empty_dir(out):
            try:
                archive = pack_out(out, self._dir / "out.tar.gz", bytes_max=self._ex.archive_bytes_max)
                result = dataclasses.replace(result, output_archive=archive)
            except OSError as e:
                log.warning("cannot archive out/ of %s/%s: %s", self.spec.task_id,
                            self.spec.attempt, e)
        try:
            _write_atomic(self._dir / "result.json", result.to_json())
        except OSError as e:
            log.error("cannot write result of %s/%s: %s", self.spec.task_id, self.spec.attempt, e)
        if not self._ex.keep_work_dir and not _remove_empty_work(self._dir / "work"):
            shutil.rmtree(self._dir / "work", True)
        return result

    def _settle(self, result: Result) -> None:
        self.result = result
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(result)
        self._waiters.clear()
        self._ex._finished(self)


class Executor:
    """Starts and tracks attempts under ``root_dir``; see the module docstring."""

    def __init__(self, root_dir: Path, *, clock, running_max: int = RUNNING_MAX,
                 attempts_max: int = ATTEMPTS_MAX, kill_grace_ms: int = KILL_GRACE_MS,
                 drain_ms: int = DRAIN_MS, progress_poll_ms: int = PROGRESS_POLL_MS,
                 archive_members_max: int = ARCHIVE_MEMBERS_MAX,
                 archive_bytes_max: int = ARCHIVE_BYTES_MAX, keep_work_dir: bool = False,
                 path: str | None = None, death_guard: str = GUARDIAN) -> None:
        if death_guard not in (GUARDIAN, PDEATHSIG):
            raise ValueError(f"death_guard must be {GUARDIAN!r} or {PDEATHSIG!r}")
        self.death_guard = death_guard
        self._guardian = _Guardian()
        self.root_dir = Path(root_dir)
        self.root_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        self._closed = False
        # Attempt trees made ahead on a thread: a start renames one into place (one syscall
        # on the loop instead of four mkdirs).  Leftovers of an earlier run are removed.
        self._spare_root = self.root_dir / SPARE_DIR
        shutil.rmtree(self._spare_root, ignore_errors=True)
        self._spares: list[Path] = []
        self._spares_made = 0
        self._refilling: asyncio.Future | None = None

    # ---- paths ----------------------------------------------------------------------
    def attempt_dir(self, task_id: str, attempt: int) -> Path:
        if not core.TASK_ID_RE.fullmatch(task_id) or not 0 <= int(attempt) <= core.ATTEMPT_MAX:
            raise ValueError(f"bad task id or attempt: {task_id!r}/{attempt!r}")
        return self.root_dir / task_id / str(int(attempt))

    def log_path(self, task_id: str, attempt: int, stream: str) -> Path:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}")
        return self.attempt_dir(task_id, attempt) / stream

    # ---- attempts -------------------------------------------------------------------
    def start(self, spec: ExecSpec, on_progress: Callable[[int], None] | None = None) -> Attempt:
        """Spawn ``spec`` now (sync; needs the running loop), or record why it cannot run.

        Never raises for a bad spec or command: the attempt comes back failed."""
        why = core.validate(spec)
        if why and not (isinstance(spec.task_id, str) and core.TASK_ID_RE.fullmatch(spec.task_id)
                        and isinstance(spec.attempt, int) and 0 <= spec.attempt <= core.ATTEMPT_MAX):
            a = Attempt(self, spec, on_progress, None)   # no safe place on disk for it
            a.result = self._failed_now(why)
            return a
        key = (spec.task_id, spec.attempt)
        existing = self.get(*key)
        if existing is not None:
            return existing
        d = self.attempt_dir(*key)
        a = Attempt(self, spec, on_progress, d)
        if d.exists():
            # Started by an earlier incarnation of this node, never finished.
            self._remember(a)
            self._running[key] = a
            self._reap_dir(d)
            a._killed_for = core.KILL_ORPHAN
            a._finalize()
            return a
        if self._closed:
            why = "executor closed"
        elif len(self._running) >= self.running_max:
            why = f"executor full: {self.running_max} attempts running"
        try:
            self._place_dir(d)
        except OSError as e:
            why = why or f"cannot make work dir: {e}"
        self._remember(a)
        self._running[key] = a
        if why:
            a._spawn_error = why
            a._finalize()
        else:
            a._begin()
            self._arm_poll()
        return a

    def _place_dir(self, d: Path) -> None:
        """Make attempt dir ``d`` with its work tree: a spare renamed into place, else mkdirs."""
        d.parent.mkdir(mode=0o700, exist_ok=True)
        while self._spares:
            spare = self._spares.pop()
            try:
                os.rename(spare, d)
                break
            except OSError:
                shutil.rmtree(spare, ignore_errors=True)    # rare (removed under us): try the next
        else:
            _make_dirs(d)
        self._refill_spares()

    def _refill_spares(self) -> None:
        if len(self._spares) >= SPARE_DIRS_MIN or self._refilling is not None or self._closed:
            return
        first, self._spares_made = self._spares_made, self._spares_made + SPARE_DIRS_BATCH
        fut = self._refilling = asyncio.get_running_loop().run_in_executor(
            None, _make_spares, self._spare_root, first, SPARE_DIRS_BATCH)

        def done(f: asyncio.Future) -> None:
            self._refilling = None
            if not f.cancelled() and f.exception() is None:
                self._spares.extend(f.result())
        fut.add_done_callback(done)

    def running(self) -> list[tuple[str, int]]:
        return list(self._running)

    def get(self, task_id: str, attempt: int) -> Attempt | None:
        a = self._attempts.get((task_id, attempt))
        if a is not None:
            return a
        try:
            d = self.attempt_dir(task_id, attempt)
            result = Result.from_json((d / "result.json").read_text())
        except (ValueError, OSError, TypeError):
            return None
        a = Attempt(self, ExecSpec(task_id=task_id, attempt=attempt), None, d)
        a.result = result
        return a

    def load_result(self, task_id: str, attempt: int) -> Result | None:
        a = self.get(task_id, attempt)
        return a.result if a is not None else None

    def remove(self, task_id: str, attempt: int) -> None:
        """Forget a finished attempt and delete its directory (logs, archive, result)."""
        key = (task_id, attempt)
        if key in self._running:
            raise RuntimeError(f"{task_id}/{attempt} is still running")
        self._attempts.pop(key, None)
        shutil.rmtree(self.attempt_dir(task_id, attempt), ignore_errors=True)

    async def close(self) -> None:
        """Kill every attempt this executor started, and wait (boundedly) for their ends."""
        self._closed = True
        running = list(self._running.values())
        for a in running:
            a._kill(core.KILL_CLOSE, 0)
        if running:
            await asyncio.wait([asyncio.ensure_future(a.wait()) for a in running],
                               timeout=(self.drain_ms + 5000) / 1000)
        self._sweep({str(a._dir / "progress") for a in running if a._dir is not None})
        if self._refilling is not None:
            with contextlib.suppress(Exception):
                await self._refilling
        shutil.rmtree(self._spare_root, ignore_errors=True)
        self._spares.clear()
        self._guardian.close()
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None

    def reap_orphans(self) -> list[tuple[str, int, Result]]:
        """After a restart: kill what a previous incarnation left running under root_dir and
        record those attempts as failed (interrupted).  Call before starting new attempts."""
        found: list[tuple[str, int, Result]] = []
        progress_files: set[str] = set()
        for task_dir in sorted(self.root_dir.iterdir()) if self.root_dir.exists() else ():
            for d in sorted(task_dir.iterdir()) if task_dir.is_dir() else ():
                if not d.name.isdigit() or (d / "result.json").exists():
                    continue
                key = (task_dir.name, int(d.name))
                if key in self._running or not core.TASK_ID_RE.fullmatch(key[0]):
                    continue
                progress_files.add(str(d / "progress"))
                now = self._clock.wall_ms()
                r = Result(state=core.FAILED, exit_code=None, signal=None,
                           reason="node restarted while the attempt ran", started_ms=now,
                           ended_ms=now, stdout_bytes=self._size(d / "stdout"),
                           stderr_bytes=self._size(d / "stderr"), truncated=False,
                           output_archive="", interrupted=True)
                _write_atomic(d / "result.json", r.to_json())
                found.append((key[0], key[1], r))
        self._sweep(progress_files)
        return found

    # ---- internals ------------------------------------------------------------------
    def _failed_now(self, why: str) -> Result:
        now = self._clock.wall_ms()
        return Result(state=core.FAILED, exit_code=None, signal=None, reason=why,
                      started_ms=now, ended_ms=now, stdout_bytes=0, stderr_bytes=0,
                      truncated=False, output_archive="")

    def _remember(self, a: Attempt) -> None:
        self._attempts[(a.spec.task_id, a.spec.attempt)] = a
        if len(self._attempts) > self.attempts_max:
            for key, old in list(self._attempts.items()):
                if len(self._attempts) <= self.attempts_max:
                    break
                if old.done:
                    del self._attempts[key]

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

    def _reap_dir(self, d: Path) -> None:
        self._sweep({str(d / "progress")})

    @staticmethod
    def _size(p: Path) -> int:
        try:
            return p.stat().st_size
        except OSError:
            return 0

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
