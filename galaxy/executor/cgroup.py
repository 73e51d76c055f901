"""Attempt cgroups: every process an attempt starts, found and killed wherever it went,
and the memory limit of the whole task.

A process group is left by ``setsid``; an environment is cleared by ``env -i``; a cgroup is
left only by a process that writes to a cgroup file itself.  Two pools of cgroups, each
under ``galaxy-<hash of the executor's root>-<pid>-<random>`` in the node's own cgroup (so
several nodes on one host, or a node and its dead predecessor's guardian, never touch each
other's), each made only where the node can make them (root, or a delegated subtree):

* **attempt cgroups** (cgroup v2, ``cgroup.kill``: Linux 5.14+).  No controller is
  enabled: membership and ``cgroup.kill`` need none, so a v2 mount without controllers
  serves.  When the leader has exited -- or the attempt timed out or was cancelled -- one
  ``write`` of ``1`` to ``cgroup.kill`` SIGKILLs every member at once, daemons and double
  forks included.
* **memory cgroups** (the cgroup v1 ``memory`` controller), for an attempt with a memory
  limit: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap is
  accounted) bounds the *resident* memory of the whole task, children included, where
  ``RLIMIT_AS`` bounds each process's address space.  The kernel's OOM killer ends a
  process of the task at the limit, which ``memory.oom_control``'s ``oom_kill`` count
  tells for sure.  (A v2 memory controller would need the node's own cgroup to delegate
  it; not done yet.)

The leader is moved into its cgroups right after its spawn (one ``write`` of its pid to
each ``cgroup.procs``, kept open; then the same for the children it already forked), so
everything it forks from then on is a member.  Cgroups are reused (a ``mkdir`` of a memory
cgroup can take milliseconds): cost ~60-85 us of node CPU per attempt (moves, the walk of
the leader's children, the kill, the OOM count).  If the node dies, its guardian kills
every cgroup's members and removes them; a node restarted on the same root empties what
is left before it makes its own.  A cgroup that cannot be joined (removed by hand) leaves
the pool, and its attempt runs without it (``RLIMIT_AS`` for its memory).

Limit: a process forked in the microseconds between the leader's exec and the move, and
whose parent exited before the walk, stays outside (the environment sweep after a timeout
or cancel still looks for it); memory the leader touched in those microseconds is not
counted.  Where no cgroup can be made (``open`` returns None) the executor falls back to
the process group with that sweep, and to ``RLIMIT_AS``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time

log = logging.getLogger("galaxy.executor")

KILL_ROUNDS = 250              # a dying cgroup is killed again at most this often,
KILL_ROUND_S = 0.002           # this far apart (SIGKILLed processes take a moment to exit)
PEAK_SLACK_BYTES = 1 << 20     # a memory cgroup's peak this close to its limit: it was reached


def own_dir(controller: str = "") -> str | None:
    """This process's own cgroup directory: in the cgroup v2 hierarchy (``controller``
    empty), or in the v1 hierarchy of that controller; None if there is none mounted here."""
    mount = path = None
    root = "/"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _, options = (right.split(" ") + ["", ""])[:3]
                if (fstype == "cgroup2" and not controller) or (
                        fstype == "cgroup" and controller and controller in options.strip().split(",")):
                    fields = left.split(" ")
                    root, mount = fields[3], fields[4]     # what of the hierarchy is mounted, where
                    break
        with open("/proc/self/cgroup") as f:
            for ln in f:
                _, names, p = ln.rstrip("\n").split(":", 2)
                if (not controller and not names) or (controller and controller in names.split(",")):
                    path = p
                    break
    except (OSError, ValueError):
        return None
    if mount is None or path is None:
        return None
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]             # a container's view: only its own subtree is mounted
    d = os.path.normpath(mount + "/" + path.lstrip("/"))
    return d if os.path.isdir(d) else None


def _parent_name(root_dir: str) -> str:
    return "galaxy-" + hashlib.sha256(os.path.realpath(root_dir).encode()).hexdigest()[:16]


def move(procs_fds: list[int], pid: int) -> bool:
    """Write ``pid`` to each ``cgroup.procs`` open at ``procs_fds`` (one per hierarchy),
    then the children it already forked, theirs too: a child forked after its parent moved
    is born inside.  False if ``pid`` could not be moved (it has exited already, say).
    Only the main thread's children are looked at (a command just exec'd has no other
    thread yet)."""
    todo = [pid]
    moved = False
    while todo:
        p = todo.pop()
        data = str(p).encode()
        try:
            for fd in procs_fds:
                os.write(fd, data)
        except OSError:
            continue
        moved = moved or p == pid
        try:
            fd = os.open(f"/proc/{p}/task/{p}/children", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            todo.extend(int(c) for c in os.read(fd, 65_536).split())
        except OSError:
            pass
        finally:
            os.close(fd)
    return moved


def remove_tree(parent: str) -> bool:
    """SIGKILL every member of ``parent`` and of every cgroup under it, then remove them,
    deepest first (a task may have made cgroups inside its own: a nested node, a container
    runtime), ``parent`` last: True if it is gone.  For ``close``, for a restarted node
    cleaning up after a crash, and for the guardian (which imports this module alone: it
    must need nothing but the standard library)."""
    try:
        names = [e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return not os.path.exists(parent)
    for name in names:
        _kill_one(f"{parent}/{name}")
    for name in names:
        remove_tree(f"{parent}/{name}")
    return _rmdir_when_empty(parent)


def _kill_one(d: str) -> None:
    """SIGKILL the members of cgroup ``d``: ``cgroup.kill`` (v2), else each pid listed (v1)."""
    try:
        fd = os.open(f"{d}/cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            with open(f"{d}/cgroup.procs") as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return
    except OSError:
        return
    try:
        os.write(fd, b"1")
    except OSError:
        pass
    finally:
        os.close(fd)


def _rmdir_when_empty(d: str) -> bool:
    """rmdir ``d``, killing its members again while they die (bounded): True if removed."""
    for _ in range(KILL_ROUNDS):
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                return False
        _kill_one(d)
        time.sleep(KILL_ROUND_S)
    return False


class Cgroup:
    """One cgroup of a pool, its ``cgroup.procs`` kept open (and, on v2, ``cgroup.kill``);
    a memory one also knows its limit and the OOM kills it has seen."""

    __slots__ = ("path", "procs_fd", "_kill_fd", "_oom_fd", "_peak_fd", "_usage_fd", "limit",
                 "oom_seen")

    def __init__(self, path: str, v2: bool) -> None:
        os.mkdir(path, 0o700)
        self.path = path
        self.procs_fd = self._kill_fd = self._oom_fd = self._peak_fd = self._usage_fd = -1
        self.limit = 0
        self.oom_seen = 0
        try:
            self.procs_fd = os.open(f"{path}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            if v2:
                self._kill_fd = os.open(f"{path}/cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
            elif os.path.exists(f"{path}/memory.oom_control"):
                ro = os.O_RDONLY | os.O_CLOEXEC
                self._oom_fd = os.open(f"{path}/memory.oom_control", ro)
                self._peak_fd = os.open(f"{path}/memory.max_usage_in_bytes", os.O_RDWR | os.O_CLOEXEC)
                self._usage_fd = os.open(f"{path}/memory.usage_in_bytes", ro)
                # The limit is on memory, swap included: where swap is not accounted
                # (no memsw files) a task over its limit would swap on instead of ending.
                with contextlib.suppress(OSError):
                    _write(f"{path}/memory.swappiness", 0)
        except OSError:
            self.close()
            raise

    def kill(self) -> None:
        """SIGKILL every member: one write on v2 (new forks included), each pid on v1."""
        if self._kill_fd < 0:
            _kill_one(self.path)
            return
        try:
            os.write(self._kill_fd, b"1")
        except OSError:
            pass

    def set_limit(self, limit_bytes: int) -> None:
        """Its memory limit (and swap's, where swap is accounted); OSError if the kernel
        refuses it (EBUSY: more is in use than the new limit and cannot be reclaimed)."""
        if limit_bytes == self.limit:
            return
        # memsw may never be below the memory limit: raise it first, lower it last.
        names = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
        for name in (names if not self.limit or limit_bytes < self.limit else names[::-1]):
            try:
                _write(f"{self.path}/{name}", limit_bytes)
            except FileNotFoundError:
                continue             # no swap accounting
        self.limit = limit_bytes

    def oom_kills(self) -> int:
        """How many of its members the kernel's OOM killer has ended, ever (a ``pread`` of
        the file kept open: the kernel writes it anew at offset 0; kernel 4.13+)."""
        try:
            text = os.pread(self._oom_fd, 512, 0)
            at = text.index(b"\noom_kill ") + 10
            return int(text[at:text.index(b"\n", at)])
        except (OSError, ValueError):
            return 0

    def peak(self) -> int:
        """The most bytes charged to it since ``start``."""
        try:
            return int(os.pread(self._peak_fd, 64, 0))
        except (OSError, ValueError):
            return 0

    def usage(self) -> int:
        """Bytes charged to it now (pages of earlier attempts included: page cache, tmpfs)."""
        try:
            return int(os.pread(self._usage_fd, 64, 0))
        except (OSError, ValueError):
            return 0

    def start(self) -> None:
        """Before an attempt: the OOM kills so far are not its own, nor is the peak."""
        self.oom_seen = self.oom_kills()
        with contextlib.suppress(OSError):
            os.write(self._peak_fd, b"0")

    def oom_killed(self) -> bool:
        """After an attempt: the OOM killer ended one of its processes *at this cgroup's
        limit*.  A kill for the machine's or the node's own shortage counts in oom_kill
        too, but then this cgroup's usage never reached its limit (within a page per CPU
        of charge batching)."""
        return (self.oom_kills() > self.oom_seen
                and self.peak() >= self.limit - PEAK_SLACK_BYTES)

    def empty(self) -> bool:
        try:
            with open(f"{self.path}/cgroup.procs", "rb") as f:
                return not f.read(1)
        except OSError:
            return True

    def close(self) -> None:
        """Close its files; rmdir if empty (else ``remove_tree`` removes it later)."""
        for fd in (self.procs_fd, self._kill_fd, self._oom_fd, self._peak_fd, self._usage_fd):
            if fd >= 0:
                os.close(fd)
        self.procs_fd = self._kill_fd = self._oom_fd = self._peak_fd = self._usage_fd = -1
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


def _write(path: str, value: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


class Cgroups:
    """A pool of cgroups under one parent of this executor's own, in the cgroup v2
    hierarchy (``controller=""``: attempt cgroups) or in the v1 hierarchy of a controller
    (``"memory"``: memory limits)."""

    def __init__(self, parent: str, controller: str) -> None:
        self.parent = parent
        self.controller = controller
        self._free: list[Cgroup] = []
        self._made = 0
        self._closed = False

    @classmethod
    def open(cls, root_dir: str, controller: str = "") -> Cgroups | None:
        """The pool for the executor at ``root_dir``, or None where no such cgroup can be
        made here.  A parent left by a crashed predecessor (same root) is emptied first."""
        base = own_dir(controller)
        if base is None:
            return None
        # A parent per incarnation: a predecessor's guardian, still emptying its own after
        # a kill -9, never touches ours.  Its parent (same root, so the same prefix) is
        # emptied and removed here too; only one executor at a time uses a root.
        prefix = _parent_name(root_dir) + "-"
        with contextlib.suppress(OSError):
            for e in os.scandir(base):
                if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False):
                    remove_tree(e.path)
        parent = f"{base}/{prefix}{os.getpid()}-{os.urandom(3).hex()}"
        pool = cls(parent, controller)
        try:
            os.makedirs(parent, 0o700, exist_ok=True)
            probe = Cgroup(f"{parent}/probe-{os.getpid()}", not controller)
            try:
                if controller == "memory":
                    probe.set_limit(1 << 30)
            finally:
                probe.close()
        except OSError as e:
            log.info("no %s cgroup of its own for the executor (%s): %s",
                     controller or "v2", e.strerror or e,
                     "memory limits are RLIMIT_AS" if controller else "escapees are found by their environment")
            return None
        finally:
            # Made again with the first attempt's cgroup: a node that never runs a task
            # (and so never starts the guardian that cleans up after a kill -9) leaves none.
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        return pool

    def take(self, limit_bytes: int = 0) -> Cgroup | None:
        """A cgroup for a new attempt, with that memory limit if one is given (None if
        none can be had now).  One from the pool first (made once, reused: a mkdir of a
        memory cgroup can take milliseconds)."""
        while self._free:
            cg = self._free.pop()
            # Pages an earlier attempt left charged here (files in tmpfs, page cache, the
            # last of its dying processes) would count against this one: past half its
            # limit, a fresh cgroup instead.
            if limit_bytes and cg.usage() > limit_bytes // 2:
                cg.kill()
                cg.close()
                continue
            try:
                if limit_bytes:
                    cg.set_limit(limit_bytes)
                    cg.start()
                return cg
            except OSError:
                cg.kill()
                cg.close()           # still charged with more than the new limit: a new one
        self._made += 1
        try:
            os.makedirs(self.parent, 0o700, exist_ok=True)
            cg = Cgroup(f"{self.parent}/{self._made}", not self.controller)
        except OSError as e:
            log.warning("cannot make cgroup %s/%d: %s", self.parent, self._made, e)
            return None
        try:
            if limit_bytes:
                cg.set_limit(limit_bytes)
                cg.start()
        except OSError as e:
            log.warning("cannot limit cgroup %s: %s", cg.path, e)
            cg.close()
            return None
        return cg

    def give(self, cg: Cgroup) -> None:
        """Back to the pool, after ``cg.kill()``.  Its members may still be exiting (a
        SIGKILL takes a moment); the next attempt's end kills them again, which costs
        nothing, where a check that it is empty would cost a read per attempt.  (Without a
        v2 cgroup the caller checks a v1 one is empty: a kill there is a pass over its pids,
        which a forking process can outrun.)  After ``close``: closed, not pooled."""
        if self._closed:
            cg.close()
        else:
            self._free.append(cg)

    def close(self) -> None:
        """Kill every member of every cgroup here and remove them all."""
        self._closed = True
        for cg in self._free:
            cg.close()
        self._free.clear()
        if not remove_tree(self.parent):
            log.warning("cgroup %s still has members", self.parent)
