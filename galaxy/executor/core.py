"""Executor core: the pure decisions about one task attempt.

Theory of operation
-------------------
The runner (``runner.py``) owns processes, pipes, timers and files; everything it has to
*decide* lives here and is a plain function of its inputs, so it is tested in
microseconds:

* ``validate(spec)`` says whether an ``ExecSpec`` may run at all, and if not which field
  is wrong and why (the runner records a failed start instead of raising).
* ``build_env`` makes the child's environment: a clean one (PATH, HOME, LANG, TMPDIR and
  the three ``GALAXY_*`` variables) plus ``spec.env``.  Nothing else of the node's
  environment leaks in (no cluster key, tokens, proxies).
* ``ProgressParser`` turns stdout bytes into progress values: whole lines
  ``GALAXY_PROGRESS <0-100>`` only; a line longer than ``PROGRESS_LINE_CHARS_MAX`` is
  skipped without being buffered, so a task that never prints a newline costs O(1) memory.
* ``StreamCap`` is the bookkeeping for one captured stream: the first ``limit_bytes``
  are written as they come; of what goes past them, the last ``end_bytes`` (a quarter of
  the limit, at most ``STREAM_END_BYTES_MAX``) are kept in memory and written at the end,
  after a line saying how many bytes were dropped in between (``closing``: where a run's
  errors usually are); and a small tail of everything seen is kept for ``classify`` (a
  MemoryError printed after the cap is still noticed).
* ``check_archive`` vets an input archive's member list before a byte is unpacked.
* ``classify`` turns how an attempt ended into (state, exit code, signal, reason).
* ``parse_nvidia_smi`` reads ``nvidia-smi --query-gpu`` CSV for resource reports.

Invariants:

* ``StreamCap``: ``kept_bytes <= limit_bytes``, ``kept_bytes <= seen_bytes`` and
  ``truncated == (seen_bytes > kept_bytes)``; ``len(tail) <= tail_bytes_max``.
* ``ProgressParser`` only ever reports integers in 0..100 and buffers at most
  ``PROGRESS_LINE_CHARS_MAX`` bytes.
* ``check_archive`` accepts only regular files, directories and links whose names and
  targets are relative and contain no ``..`` component.  Without ``..`` and without
  absolute targets, every path resolves downwards from the directory holding it, so no
  chain of links can lead out of the unpack directory (lexically normalising ``a/..``
  would be unsound once ``a`` is a link, which is why ``..`` is refused outright).
* ``classify`` returns a state in ``STATES``; ``exit_code`` and ``signal`` are never both
  set.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType

SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
STATES = (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)

# Why the runner killed an attempt ("" when it ended on its own).
KILL_TIMEOUT = "timeout"
KILL_CANCEL = "cancel"
KILL_CLOSE = "close"          # the node is stopping
KILL_ORPHAN = "orphan"        # found running after a node restart
KILL_MEMORY_START = "memory_start"   # past its memory limit before the limit was set

TASK_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
ARGV_ITEMS_MAX = 4096
ARGV_CHARS_MAX = 128 * 1024       # well under Linux's ARG_MAX with room for the env
ENV_ITEMS_MAX = 256
ENV_CHARS_MAX = 64 * 1024
ATTEMPT_MAX = 1_000_000
TIMEOUT_MS_MAX = 30 * 24 * 3_600_000          # a month; beyond that it is a service, not a task
MEMORY_MB_MAX = 16 * 1024 * 1024              # 16 TB; a typo guard, not a policy
OUTPUT_BYTES_MAX = 1 << 30                    # per stream; logs beyond 1 GB belong in out/
PROGRESS_LINE_CHARS_MAX = 64                  # "GALAXY_PROGRESS 100.0\n" with headroom
PROGRESS_PREFIX = b"GALAXY_PROGRESS"
STREAM_TAIL_BYTES_MAX = 4096                  # enough to spot "MemoryError" at the end
STREAM_END_BYTES_MAX = 64 * 1024              # the end of an output past its cap, kept besides its start
RESERVED_ENV = ("GALAXY_TASK_ID", "GALAXY_ATTEMPT", "GALAXY_PROGRESS_FILE")

# Shell convention: 126 = found but not executable, 127 = not found.
_SHELL_HINTS = {126: "not executable", 127: "command not found"}
_MEMORY_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"bad_alloc",
                   b"out of memory", b"Out of memory", b"cannot allocate")
_SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 6: "SIGABRT",
                 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE",
                 14: "SIGALRM", 15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ"}
# abort on a failed malloc, a fault on its NULL: what going past RLIMIT_AS may end in (a SIGKILL
# is not: the limit never sends one, so that one came from someone else, or the kernel's OOM killer)
_MEMORY_SIGNALS = (6, 7, 11)
# What the dynamic loader says when the address-space limit cannot even hold the program's
# libraries; the shell then exits 127, which would otherwise read as "command not found".
_LOADER_MARKERS = (b"failed to map segment", b"error while loading shared libraries")


@dataclass(frozen=True, slots=True)
class ExecSpec:
    task_id: str                       # [a-z0-9-]; a path component, so validated
    attempt: int
    argv: tuple[str, ...] = ()         # exactly one of argv / shell
    shell: str = ""                    # run with /bin/sh -c
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout_ms: int = 0                # 0 = none
    memory_mb: int = 0                 # 0 = none; a memory cgroup where possible, else RLIMIT_AS
    output_bytes_max: int = 1 << 20    # per stream; beyond it only the end is kept (StreamCap)
    input_archive: str = ""            # .tar / .tar.gz unpacked into work/ before start


@dataclass(frozen=True, slots=True)
class Result:
    state: str                 # one of STATES
    exit_code: int | None      # None when it never started or died of a signal
    signal: int | None
    reason: str                # for humans: "exit code 3", "killed after timeout of 5.0 s"
    started_ms: int            # wall clock; equal to ended_ms when it never started
    ended_ms: int
    stdout_bytes: int          # bytes in the stdout file (StreamCap.kept_bytes)
    stderr_bytes: int
    truncated: bool            # some output was dropped by the cap
    output_archive: str        # tar.gz of work/out/, "" when there was nothing
    interrupted: bool = False  # ended by the node (stop, restart), not the task or a user
    pid: int | None = None     # leader pid while it ran (for logs and debugging)

    def to_json(self) -> str:
        # Not asdict(): it deep-copies every field, and this runs once per attempt.  The
        # keys go in sorted, so the default encoder (no sort_keys: no encoder made per
        # call) writes what json.dumps(..., sort_keys=True) would.
        return json.dumps(dict(zip(_RESULT_KEYS, _result_values(self))))

    @classmethod
    def from_json(cls, text: str) -> Result:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("state") not in STATES:
            raise ValueError("not an executor result")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


_RESULT_FIELDS = tuple(Result.__dataclass_fields__)
_RESULT_KEYS = tuple(sorted(_RESULT_FIELDS))
_result_values = operator.attrgetter(*_RESULT_KEYS)


def validate(spec: ExecSpec) -> str:
    """Return "" when ``spec`` may run, else "<field>: <why>"."""
    if not isinstance(spec.task_id, str) or not TASK_ID_RE.fullmatch(spec.task_id):
        return "task_id: must be 1-128 of [a-z0-9-], not starting with '-'"
    if isinstance(spec.attempt, bool) or not isinstance(spec.attempt, int) \
            or not 0 <= spec.attempt <= ATTEMPT_MAX:
        return f"attempt: must be an integer in 0..{ATTEMPT_MAX}"
    if bool(spec.argv) == bool(spec.shell):
        return "argv/shell: exactly one of them must be given (empty command)"
    if spec.argv:
        if not isinstance(spec.argv, tuple) or not all(isinstance(a, str) for a in spec.argv):
            return "argv: must be a tuple of strings"
        if not spec.argv[0]:
            return "argv: empty command"
        if len(spec.argv) > ARGV_ITEMS_MAX or sum(len(a) for a in spec.argv) > ARGV_CHARS_MAX:
            return f"argv: too long (at most {ARGV_ITEMS_MAX} items, {ARGV_CHARS_MAX} chars)"
        if any("\0" in a for a in spec.argv):
            return "argv: contains a NUL character"
    else:
        if not isinstance(spec.shell, str) or not spec.shell.strip():
            return "shell: empty command"
        if len(spec.shell) > ARGV_CHARS_MAX:
            return f"shell: longer than {ARGV_CHARS_MAX} chars"
        if "\0" in spec.shell:
            return "shell: contains a NUL character"
    if len(spec.env) > ENV_ITEMS_MAX:
        return f"env: more than {ENV_ITEMS_MAX} variables"
    chars = 0
    for k, v in spec.env.items():
        if not isinstance(k, str) or not ENV_NAME_RE.fullmatch(k):
            return f"env: bad variable name {k!r}"
        if k in RESERVED_ENV:
            return f"env: {k} is set by the executor"
        if not isinstance(v, str) or "\0" in v:
            return f"env: value of {k} must be a string without NUL"
        chars += len(k) + len(v) + 2
    if chars > ENV_CHARS_MAX:
        return f"env: larger than {ENV_CHARS_MAX} chars"
    for name, value, hi in (("timeout_ms", spec.timeout_ms, TIMEOUT_MS_MAX),
                            ("memory_mb", spec.memory_mb, MEMORY_MB_MAX),
                            ("output_bytes_max", spec.output_bytes_max, OUTPUT_BYTES_MAX)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
            return f"{name}: must be an integer in 0..{hi}"
    if not isinstance(spec.input_archive, str) or "\0" in spec.input_archive:
        return "input_archive: must be a path"
    return ""


def build_env(spec: ExecSpec, *, path: str, work_dir: str, tmp_dir: str,
              progress_file: str, lang: str = "C.UTF-8") -> dict[str, str]:
    """The child's whole environment: a clean base, then ``spec.env`` (which may override
    PATH/HOME/LANG/TMPDIR but not the reserved GALAXY_* names, see ``validate``)."""
    env = {"PATH": path, "HOME": work_dir, "LANG": lang, "TMPDIR": tmp_dir}
    env.update(spec.env)
    env["GALAXY_TASK_ID"] = spec.task_id
    env["GALAXY_ATTEMPT"] = str(spec.attempt)
    env["GALAXY_PROGRESS_FILE"] = progress_file
    return env


def parse_progress(text: str | bytes) -> int | None:
    """A progress value 0..100 from ``"42"``, ``"42.5"``, ``"42%"``; clamped; else None."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    text = text.strip().removesuffix("%").strip()
    if not text or len(text) > 16 or not re.fullmatch(r"[+-]?\d+(\.\d*)?", text):
        return None
    value = float(text)
    return max(0, min(100, int(value)))


class ProgressParser:
    """Feed stdout chunks; get the progress values of complete ``GALAXY_PROGRESS`` lines."""

    __slots__ = ("_buf", "_skipping")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False    # inside a line too long to be a progress line

    def feed(self, chunk: bytes) -> list[int]:
        out: list[int] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if not self._skipping:
                if len(self._buf) + len(piece) > PROGRESS_LINE_CHARS_MAX:
                    self._buf.clear()
                    self._skipping = True
                else:
                    self._buf += piece
            if nl < 0:
                break
            if not self._skipping:
                value = self._line(bytes(self._buf))
                if value is not None:
                    out.append(value)
            self._buf.clear()
            self._skipping = False
            start = nl + 1
        self._check()
        return out

    @staticmethod
    def _line(line: bytes) -> int | None:
        line = line.strip()
        if not line.startswith(PROGRESS_PREFIX):
            return None
        rest = line[len(PROGRESS_PREFIX):]
        if rest[:1] not in (b" ", b"\t", b":", b"="):
            return None       # e.g. GALAXY_PROGRESSBAR
        return parse_progress(rest[1:])

    def _check(self) -> None:
        assert len(self._buf) <= PROGRESS_LINE_CHARS_MAX


def output_cut(kept_bytes: int, limit_bytes: int) -> bool:
    """Whether a stream's log of ``kept_bytes`` (``StreamCap.kept_bytes``) had its middle
    dropped: only then does it hold more than the limit and the end kept past it."""
    return kept_bytes > limit_bytes + min(limit_bytes // 4, STREAM_END_BYTES_MAX)


class StreamCap:
    """Bookkeeping for one captured stream: keep the first ``limit_bytes`` and the last
    ``end_bytes`` of what went past them; drop (and count) what lies between."""

    __slots__ = ("limit_bytes", "end_bytes", "seen_bytes", "kept_bytes", "_end", "_tail")

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.end_bytes = min(limit_bytes // 4, STREAM_END_BYTES_MAX)
        self.seen_bytes = 0
        self.kept_bytes = 0           # written to the log: the start, then what ``closing`` gave
        self._end = bytearray()       # the last end_bytes of what went past the limit
        self._tail = bytearray()

    @property
    def dropped_bytes(self) -> int:
        return max(0, self.seen_bytes - self.limit_bytes - self.end_bytes)

    @property
    def truncated(self) -> bool:
        return self.dropped_bytes > 0

    @property
    def tail(self) -> bytes:
        return bytes(self._tail)

    def accept(self, chunk: bytes) -> bytes:
        """Record ``chunk``; return the part of it to write to the log now."""
        self.seen_bytes += len(chunk)
        keep = chunk[:max(0, self.limit_bytes - self.kept_bytes)]
        self.kept_bytes += len(keep)
        if len(keep) < len(chunk) and self.end_bytes:
            self._end += chunk[len(keep):][-self.end_bytes:]
            del self._end[:-self.end_bytes]
        self._tail += chunk[-STREAM_TAIL_BYTES_MAX:]
        del self._tail[:-STREAM_TAIL_BYTES_MAX]
        self._check()
        return keep

    def closing(self) -> bytes:
        """What to write after the last chunk (once): the end kept past the limit, after a
        line saying how many bytes were dropped before it, if any were."""
        dropped = self.dropped_bytes
        out = (b"\n[galaxy: %d bytes of output dropped here]\n" % dropped if dropped else b"") + bytes(self._end)
        self._end = bytearray()
        self.kept_bytes += len(out)
        return out

    def _check(self) -> None:          # (while accepting: ``closing`` adds what follows the limit)
        assert 0 <= self.kept_bytes <= min(self.limit_bytes, self.seen_bytes)
        assert len(self._tail) <= STREAM_TAIL_BYTES_MAX and len(self._end) <= self.end_bytes


# Member kinds for check_archive (the runner maps tarfile's types onto these).
FILE, DIR, SYMLINK, HARDLINK, OTHER = "file", "dir", "symlink", "hardlink", "other"


def _downward(path: str) -> bool:
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\0" not in path


def check_archive(members: Iterable[tuple[str, str, str, int]], *, members_max: int,
                  bytes_max: int) -> str:
    """Vet (name, kind, linkname, size) members; "" if safe to unpack, else why not."""
    count = total = 0
    for name, kind, linkname, size in members:
        count += 1
        total += max(0, size)
        if count > members_max:
            return f"input archive: more than {members_max} members"
        if total > bytes_max:
            return f"input archive: unpacks to more than {bytes_max} bytes"
        if not _downward(name):
            return f"input archive: member {name!r} escapes the work dir (absolute or '..')"
        if kind in (SYMLINK, HARDLINK) and not _downward(linkname):
            return f"input archive: link {name!r} -> {linkname!r} escapes the work dir"
        if kind not in (FILE, DIR, SYMLINK, HARDLINK):
            return f"input archive: member {name!r} is a device, fifo or other special file"
    return ""


def signal_name(signum: int) -> str:
    return _SIGNAL_NAMES.get(signum, f"signal {signum}")


def classify(*, returncode: int | None, spawn_error: str = "", killed_for: str = "",
             timeout_ms: int = 0, memory_mb: int = 0, shell: bool = False,
             stderr_tail: bytes = b"", oom_killed: bool = False) -> tuple[str, int | None, int | None, str, bool]:
    """How an attempt ended -> (state, exit_code, signal, reason, interrupted).

    ``returncode`` follows subprocess: >= 0 an exit code, < 0 the negated signal, None
    when there never was a process.  A kill by the runner decides the state whatever the
    process did afterwards: a task that catches SIGTERM and exits 0 after a timeout still
    timed out.  ``oom_killed``: the kernel's OOM killer ended one of its processes at the
    limit of its memory cgroup (which the runner knows for sure, unlike ``RLIMIT_AS``).
    """
    exit_code = returncode if returncode is not None and returncode >= 0 else None
    sig = -returncode if returncode is not None and returncode < 0 else None
    if killed_for == KILL_TIMEOUT:
        return TIMED_OUT, exit_code, sig, f"killed after timeout of {timeout_ms / 1000:.1f} s", False
    if killed_for == KILL_CANCEL:
        return CANCELLED, exit_code, sig, "cancelled", False
    if killed_for == KILL_CLOSE:
        return CANCELLED, exit_code, sig, "node stopping: attempt killed", True
    if killed_for == KILL_ORPHAN:
        return FAILED, exit_code, sig, "node restarted while the attempt ran", True
    if killed_for == KILL_MEMORY_START:
        return (FAILED, None, None,
                spawn_error or f"memory limit {memory_mb} MB is too small to load the program", False)
    if returncode is None:
        return FAILED, None, None, spawn_error or "did not start", False
    if returncode == 0:
        return SUCCEEDED, 0, None, "exit code 0", False
    if oom_killed:
        what = f"killed by {signal_name(sig)}" if sig is not None else f"exit code {returncode}"
        return (FAILED, exit_code, sig,
                f"{what}: memory limit {memory_mb} MB exceeded (the kernel ended a process of the task)", False)
    memory_hit = memory_mb > 0 and any(m in stderr_tail for m in _MEMORY_MARKERS)
    if sig is not None:
        reason = f"killed by {signal_name(sig)}"
        if memory_mb > 0 and (memory_hit or sig in _MEMORY_SIGNALS):
            reason += f"; memory limit {memory_mb} MB probably exceeded"
        elif sig == 9:       # SIGKILL
            reason += " (by another process, or by the kernel with the machine out of memory)"
        return FAILED, None, sig, reason, False
    reason = f"exit code {returncode}"
    if memory_mb > 0 and any(m in stderr_tail for m in _LOADER_MARKERS):
        reason = f"memory limit {memory_mb} MB is too small to load the program ({reason})"
    elif memory_hit:
        reason = f"memory limit {memory_mb} MB exceeded ({reason})"
    elif shell and returncode in _SHELL_HINTS:
        reason += f" ({_SHELL_HINTS[returncode]})"
    return FAILED, returncode, None, reason, False


def parse_nvidia_smi(text: str) -> list[dict[str, object]]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu
    --format=csv[,noheader][,nounits]`` output into one dict per GPU.

    Tolerates a header line, unit suffixes ("MiB", "%") and "[N/A]"; a malformed line is
    skipped rather than failing the whole resource report.
    """
    gpus: list[dict[str, object]] = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 5 or cols[0].lower().startswith("index"):
            continue
        index = _leading_int(cols[0])
        if index is None:
            continue
        # A GPU name may itself contain commas; the last three columns are numbers.
        name = ", ".join(cols[1:-3])
        gpus.append({"index": index, "name": name,
                     "memory_total_mb": _leading_int(cols[-3]) or 0,
                     "memory_used_mb": _leading_int(cols[-2]) or 0,
                     "utilization_pct": _leading_int(cols[-1]) or 0})
        if len(gpus) >= 64:     # no machine has more; bounds a garbage input
            break
    return gpus


def _leading_int(text: str) -> int | None:
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else None
