"""Attempt cgroups: every process an attempt starts, found and killed, wherever it went.

A process group is left by ``setsid``; an environment is cleared by ``env -i``; a cgroup is
left only by a process that writes to a cgroup file itself.  Where the node can make
cgroups of its own (cgroup v2, ``cgroup.kill``: Linux 5.14+, root or a delegated
subtree), each running attempt gets one, taken from a pool:

    <the node's cgroup>/galaxy-<hash of the executor's root>/<n>

The leader is moved in right after its spawn (one ``write`` of its pid to
``cgroup.procs``, kept open), so everything it forks from then on is a member.  When the
leader has exited -- or the attempt timed out or was cancelled -- one ``write`` of ``1``
to ``cgroup.kill`` SIGKILLs every member at once, daemons and double forks included, and
the cgroup goes back to the pool.  No controller is enabled: membership and
``cgroup.kill`` need none, so this works as well under a cgroup v2 mount with no
controllers (the memory limit stays ``RLIMIT_AS``).  If the node dies, its guardian
kills every cgroup's members and removes them; a node restarted on the same root empties
what is left before it makes its own.  Cost: ~45 us of node CPU per attempt (the move,
the walk of the leader's children, the kill).

Limit: a process forked in the microseconds between the leader's exec and the move, and
whose parent exited before the walk, stays outside (the environment sweep after a timeout
or cancel still looks for it).  Without a usable cgroup v2 (``open`` returns None) the
executor falls back to the process group and that sweep alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time

log = logging.getLogger("galaxy.executor")

KILL_ROUNDS = 250              # a dying cgroup is killed again at most this often,
KILL_ROUND_S = 0.002           # this far apart (SIGKILLed processes take a moment to exit)


def _v2_dir() -> str | None:
    """This process's own cgroup v2 directory, or None (no v2 mount, or not in one)."""
    mount = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    mount = left.split(" ")[4]
                    break
        with open("/proc/self/cgroup") as f:
            path = next((ln[3:].strip() for ln in f if ln.startswith("0::")), None)
    except OSError:
        return None
    if mount is None or path is None:
        return None
    d = os.path.normpath(mount + "/" + path.lstrip("/"))
    return d if os.path.isdir(d) else None


def kill_tree(parent: str) -> None:
    """SIGKILL every member of every cgroup under ``parent`` (for a guardian, or for a
    restarted node cleaning up after a crash), then remove those that emptied."""
    try:
        names = [e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for name in names:
        _kill_one(f"{parent}/{name}")
    for name in names:
        _rmdir_when_empty(f"{parent}/{name}")


def _kill_one(d: str) -> None:
    try:
        fd = os.open(f"{d}/cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
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
    """One attempt's cgroup: ``add(pid)`` after the spawn, ``kill()`` at the end."""

    __slots__ = ("path", "_procs", "_kill")

    def __init__(self, path: str) -> None:
        os.mkdir(path, 0o700)
        self.path = path
        try:
            self._procs = os.open(f"{path}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            self._kill = os.open(f"{path}/cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self.close()
            raise

    def add(self, pid: int) -> bool:
        """Move ``pid`` in, then the children it already forked (theirs too): a child forked
        after its parent moved is born inside.  False if ``pid`` could not be moved (it
        has exited already, say).  Only the main thread's children are looked at (a
        command just exec'd has no other thread yet)."""
        todo = [pid]
        moved = False
        while todo:
            p = todo.pop()
            try:
                os.write(self._procs, str(p).encode())
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

    def kill(self) -> None:
        """SIGKILL every member (the kernel does it in one call; new forks included)."""
        try:
            os.write(self._kill, b"1")
        except OSError:
            pass

    def close(self) -> None:
        """Close the files; rmdir if empty (else it stays for ``kill_tree`` to remove)."""
        for name in ("_procs", "_kill"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


class Cgroups:
    """The pool of attempt cgroups under one parent of this executor's own."""

    def __init__(self, parent: str) -> None:
        self.parent = parent
        self._free: list[Cgroup] = []
        self._made = 0

    @classmethod
    def open(cls, root_dir: str) -> Cgroups | None:
        """The pool for the executor at ``root_dir``, or None where no cgroup can be made
        here.  A parent left by a crashed predecessor (same root) is emptied first."""
        base = _v2_dir()
        if base is None:
            return None
        name = "galaxy-" + hashlib.sha256(os.path.realpath(root_dir).encode()).hexdigest()[:16]
        parent = f"{base}/{name}"
        if os.path.isdir(parent):
            kill_tree(parent)
        try:
            os.makedirs(parent, 0o700, exist_ok=True)
            probe = Cgroup(f"{parent}/probe-{os.getpid()}")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rmdir(parent)
            log.info("no cgroup of its own for the executor (%s): escapees are found by "
                     "their environment", e.strerror or e)
            return None
        pool = cls(parent)
        probe.close()
        return pool

    def take(self) -> Cgroup | None:
        """An empty cgroup for a new attempt (None if one cannot be made now)."""
        if self._free:
            return self._free.pop()
        self._made += 1
        try:
            return Cgroup(f"{self.parent}/{self._made}")
        except OSError as e:
            log.warning("cannot make cgroup %s/%d: %s", self.parent, self._made, e)
            return None

    def give(self, cg: Cgroup) -> None:
        """After ``cg.kill()``: back to the pool.  Its members may still be dying (SIGKILL
        is delivered, the exit takes a moment); the next attempt's end kills them again,
        which costs nothing, and checking ``populated`` here would cost a read per task."""
        self._free.append(cg)

    def close(self) -> None:
        """Kill every member of every cgroup here and remove them all."""
        for cg in self._free:
            cg.close()
        self._free.clear()
        kill_tree(self.parent)
        if not _rmdir_when_empty(self.parent):
            log.warning("cgroup %s still has members", self.parent)
