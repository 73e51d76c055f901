"""The executor's attempt journal: one append-only file instead of a file per attempt.

Theory of operation
-------------------
``root/.journal`` holds one line per event, each appended with a single ``write`` on an
``O_APPEND`` descriptor (no thread, no rename, ~1 us):

    S <task_id> <attempt>            the attempt is about to be spawned
    R <task_id> <attempt> <json>     it ended: its ``Result`` (before any waiter hears of it)
    F <task_id> <attempt>            forgotten (``Executor.remove``)

Task ids are ``[a-z0-9-]`` and JSON escapes newlines, so a line is never ambiguous.  At
load, a line the previous incarnation did not finish writing (a crash mid-``write``) is cut
off, and the index is rebuilt: ``started`` is every S without a later R or F (an attempt
that was running when the node died: an orphan), and ``results`` maps every R to its
(offset, length) in the file, so memory per remembered result is a few dozen bytes and
``load`` is one ``pread``.

Like ``result.json`` before it, the journal is not fsynced: the task table in the store is
the durable record; the journal lets a restarted node report an attempt that ended (or was
running) while the node went down, and keeps an attempt number from running twice.

Compaction.  Every attempt leaves one dead line (its S), ``F`` kills an R, and results
beyond ``results_max`` (the oldest first) are to be dropped: the bound on what a node
remembers (the tasks layer records a result within moments of the end; an attempt's logs
live in its own directory).  When the lines a compaction would drop number at least
``COMPACT_RECORDS_MIN`` and at least the lines it would keep, the kept lines are rewritten
to ``.journal.tmp`` and renamed over the journal: O(kept) work once per at least as many
appends, so O(1) amortised, and the file never exceeds twice the larger of the two.

Invariants (``_check``):

* ``started`` and ``results`` are disjoint;
* ``records >= len(started) + len(results)`` (every live entry is one line in the file),
  and after each append ``records < 2 * max(compact_records_min, len(started) + results_max)``
  or a compaction failed (retried after as many appends again);
* every offset + length lies within ``size``, the file's length, which only this object
  changes (one writer: ``Executor`` takes an ``flock`` on ``root/.lock``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("galaxy.executor")

Key = tuple[str, int]

RESULTS_MAX = 8_192               # results remembered; older ones are dropped at compaction
COMPACT_RECORDS_MIN = 4_096       # dead lines before a compaction is worth its O(live) cost


class Journal:
    """Attempt starts and results, appended to one file; see the module docstring."""

    def __init__(self, path: str, *, results_max: int = RESULTS_MAX,
                 compact_records_min: int = COMPACT_RECORDS_MIN) -> None:
        if results_max < 1 or compact_records_min < 1:
            raise ValueError("results_max and compact_records_min must be >= 1")
        self.path = path
        self.results_max = results_max
        self.compact_records_min = compact_records_min
        self.started: set[Key] = set()
        self.results: dict[Key, tuple[int, int]] = {}
        self.records = 0
        self.size = 0
        self.compactions = 0
        self._retry_at_records = 0
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._load()
        except BaseException:
            os.close(self._fd)
            raise

    # ---- load ---------------------------------------------------------------------------
    def _load(self) -> None:
        data = _read_all(self._fd)
        end = data.rfind(b"\n") + 1
        if end < len(data):           # a torn last line: cut it, or the next append joins it
            os.ftruncate(self._fd, end)
            log.warning("journal %s: dropped a torn last line (%d bytes)", self.path, len(data) - end)
        self._index(data[:end])
        self._check()

    def _index(self, data: bytes) -> None:
        self.started.clear()
        self.results.clear()
        self.records = 0
        pos = 0
        n = len(data)
        while pos < n:
            nl = data.index(b"\n", pos)
            self.records += 1
            self._apply(data, pos, nl)
            pos = nl + 1
        self.size = n

    def _apply(self, data: bytes, start: int, nl: int) -> None:
        kind = data[start:start + 2]
        head_end = nl
        if kind == b"R ":
            sp = data.find(b" ", start + 2, nl)
            head_end = data.find(b" ", sp + 1, nl) if sp >= 0 else -1
            if head_end < 0:
                return
        try:
            task, attempt = data[start + 2:head_end].decode("ascii").split(" ")
            key = (task, int(attempt))
        except ValueError:              # garbage: counted as a dead line, otherwise ignored
            return
        if kind == b"S ":
            self.results.pop(key, None)
            self.started.add(key)
        elif kind == b"R ":
            self.started.discard(key)
            self.results.pop(key, None)          # re-insert: dict order is age order
            self.results[key] = (head_end + 1, nl - head_end - 1)
        elif kind == b"F ":
            self.started.discard(key)
            self.results.pop(key, None)

    # ---- writes -------------------------------------------------------------------------
    def start(self, key: Key) -> None:
        """Record that ``key`` is about to run (raises OSError if it cannot be recorded)."""
        self._append(f"S {key[0]} {key[1]}\n".encode())
        self.results.pop(key, None)
        self.started.add(key)

    def result(self, key: Key, result_json: str) -> None:
        """Record how ``key`` ended (raises OSError if it cannot be recorded)."""
        head = f"R {key[0]} {key[1]} ".encode()
        body = result_json.encode()
        offset = self._append(head + body + b"\n") + len(head)
        self.started.discard(key)
        self.results.pop(key, None)
        self.results[key] = (offset, len(body))
        self._maybe_compact()

    def forget(self, key: Key) -> None:
        if key not in self.results and key not in self.started:
            return
        self._append(f"F {key[0]} {key[1]}\n".encode())
        self.started.discard(key)
        self.results.pop(key, None)
        self._maybe_compact()

    def load(self, key: Key) -> str | None:
        """The JSON of ``key``'s result, or None when the journal has none."""
        where = self.results.get(key)
        if where is None:
            return None
        offset, length = where
        return os.pread(self._fd, length, offset).decode()

    def _append(self, line: bytes) -> int:
        if self._fd < 0:
            raise OSError("journal closed")
        offset = self.size
        try:
            n = os.write(self._fd, line)
        except OSError:
            self._truncate(offset)
            raise
        if n != len(line):              # disk full mid-line: take the fragment back
            self._truncate(offset)
            raise OSError(f"short write to {self.path} (disk full?)")
        self.size += n
        self.records += 1
        return offset

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            pass

    # ---- compaction ---------------------------------------------------------------------
    @property
    def dead_records(self) -> int:
        return self.records - len(self.started) - len(self.results)

    def _maybe_compact(self) -> None:
        # What a compaction would keep; it pays when it drops at least as many lines, so
        # its O(records) cost is spread over as many appends, and the file stays within
        # 2 * max(compact_records_min, kept) lines.
        keep = len(self.started) + min(len(self.results), self.results_max)
        if self.records - keep >= max(self.compact_records_min, keep) \
                and self.records >= self._retry_at_records:
            if not self.compact():       # e.g. disk full: retry after as many appends again
                self._retry_at_records = self.records + max(self.compact_records_min, keep)

    def compact(self) -> bool:
        """Rewrite the journal with its live lines only (and at most ``results_max`` results);
        False when that failed (the journal is then unchanged)."""
        if self._fd < 0:
            return False
        data = os.pread(self._fd, self.size, 0)
        drop = max(0, len(self.results) - self.results_max)
        parts = [f"S {t} {a}\n".encode() for t, a in sorted(self.started)]
        pos = sum(map(len, parts))
        results: dict[Key, tuple[int, int]] = {}
        for i, ((t, a), (offset, length)) in enumerate(self.results.items()):
            if i < drop:
                continue
            head = len(t) + len(str(a)) + 4          # "R <task> <attempt> ", all ASCII
            parts.append(data[offset - head:offset + length + 1])    # the whole line, as is
            results[(t, a)] = (pos + head, length)
            pos += head + length + 1
        out = b"".join(parts)
        tmp = self.path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(out)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            new_fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot compact %s: %s", self.path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        os.close(self._fd)
        self._fd = new_fd
        self.results = results          # offsets computed above: no re-parse of the file
        self.records = len(self.started) + len(results)
        self.size = len(out)
        self.compactions += 1
        self._retry_at_records = 0
        self._check()
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check(self) -> None:
        assert not (self.started & self.results.keys())
        assert self.records >= len(self.started) + len(self.results)
        # O(live): only after load and compaction, which are O(live) themselves.
        assert all(o + n <= self.size for o, n in self.results.values())


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
