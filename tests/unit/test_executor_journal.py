"""The executor's attempt journal (galaxy/executor/journal.py) on a real file: what a
reopen (a node restart) reads back, a torn last line, garbage, compaction and its bounds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from galaxy.executor.journal import Journal


def _j(tmp_path: Path, **kw) -> Journal:
    return Journal(str(tmp_path / ".journal"), **kw)


def test_starts_results_and_forgets_survive_a_reopen(tmp_path: Path) -> None:
    j = _j(tmp_path)
    j.start(("a", 1))
    j.start(("b", 1))
    j.result(("a", 1), '{"state": "succeeded"}')
    j.start(("c", 2))
    j.result(("c", 2), '{"x": "line\\nbreak"}')
    j.forget(("c", 2))
    j.forget(("zz", 9))                 # unknown: nothing written
    assert (j.started, j.load(("a", 1)), j.load(("c", 2))) == ({("b", 1)}, '{"state": "succeeded"}', None)
    records = j.records
    j.close()
    again = _j(tmp_path)
    assert again.started == {("b", 1)} and list(again.results) == [("a", 1)]
    assert again.load(("a", 1)) == '{"state": "succeeded"}' and again.records == records == 6
    assert (tmp_path / ".journal").read_bytes().count(b"\n") == 6
    again.close()
    with pytest.raises(OSError):
        again.start(("d", 1))


def test_a_torn_last_line_is_cut_so_the_next_append_stands_alone(tmp_path: Path) -> None:
    j = _j(tmp_path)
    j.start(("a", 1))
    j.close()
    with open(tmp_path / ".journal", "ab") as f:
        f.write(b'R a 1 {"state": "succ')          # the node died mid-write
    j = _j(tmp_path)
    assert j.started == {("a", 1)} and not j.results
    j.result(("a", 1), '{"state": "failed"}')
    j.close()
    j = _j(tmp_path)
    assert not j.started and j.load(("a", 1)) == '{"state": "failed"}'
    j.close()


def test_garbage_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / ".journal").write_bytes(b"S a 1\nnonsense\nR b\nS c x\nR d 2 {}\n\nX e 1\n")
    j = _j(tmp_path)
    assert j.started == {("a", 1)} and list(j.results) == [("d", 2)] and j.load(("d", 2)) == "{}"
    assert j.records == 7 and j.dead_records == 5
    j.close()


def test_compaction_is_amortised_and_keeps_the_newest_results(tmp_path: Path) -> None:
    j = _j(tmp_path, results_max=50, compact_records_min=20)
    j.start(("running", 1))
    sizes = []
    for i in range(1000):
        key = (f"t-{i}", 1)
        j.start(key)
        j.result(key, f'{{"i": {i}}}')
        if i % 7 == 0:
            j.forget((f"t-{i - 3}", 1))
        sizes.append(j.records)
        # the file, and so the results in it, within twice what a compaction keeps
        assert len(j.results) <= j.records < 2 * max(20, 50 + 1)
    assert j.compactions >= 10
    assert j.started == {("running", 1)}
    newest = list(j.results)[-1]
    assert newest == ("t-999", 1) and j.load(newest) == '{"i": 999}'
    kept = dict(j.results)
    j.close()
    j = _j(tmp_path, results_max=50, compact_records_min=20)
    assert j.started == {("running", 1)} and list(j.results) == list(kept)
    assert all(j.load(k) == f'{{"i": {int(k[0][2:])}}}' for k in kept)
    assert not (tmp_path / ".journal.tmp").exists()
    j.close()


def test_a_failed_compaction_keeps_the_old_journal(tmp_path: Path) -> None:
    j = _j(tmp_path, compact_records_min=4)
    for i in range(3):
        j.start((f"t-{i}", 1))
        j.result((f"t-{i}", 1), "{}")
    os.mkdir(tmp_path / ".journal.tmp")          # the rewrite cannot be made
    j.start(("t-9", 1))
    j.result(("t-9", 1), '{"last": 1}')          # would compact now: warns, keeps going
    assert j.compactions == 0 and j.load(("t-9", 1)) == '{"last": 1}'
    os.rmdir(tmp_path / ".journal.tmp")
    j.forget(("t-0", 1))                         # not retried at once (no O(n) per append)
    assert j.compactions == 0
    j.forget(("t-1", 1))
    j.forget(("t-2", 1))
    j.start(("t-10", 1))
    assert j.compactions == 0
    j.result(("t-10", 1), "{}")                 # as many appends later: retried
    assert j.compactions == 1 and list(j.results) == [("t-9", 1), ("t-10", 1)]
    j.close()
    j = _j(tmp_path)
    assert list(j.results) == [("t-9", 1), ("t-10", 1)] and j.records == 2
    j.close()


def test_bounds_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _j(tmp_path, results_max=0)
