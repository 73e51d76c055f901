"""Pure tests of galaxy/executor/core.py: validation, env, progress, output cap, archive
vetting, classification and nvidia-smi parsing.  No processes, no files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from galaxy.executor import core
from galaxy.executor.core import ExecSpec, ProgressParser, Result, StreamCap

pytestmark = pytest.mark.timeout(30)


# ---- validate ------------------------------------------------------------------------
@pytest.mark.parametrize("spec, field", [
    (ExecSpec("t", 0, argv=("true",)), ""),
    (ExecSpec("t-1", 3, shell="echo hi"), ""),
    (ExecSpec("T", 0, argv=("true",)), "task_id"),
    (ExecSpec("../x", 0, argv=("true",)), "task_id"),
    (ExecSpec("-x", 0, argv=("true",)), "task_id"),
    (ExecSpec("", 0, argv=("true",)), "task_id"),
    (ExecSpec("t", -1, argv=("true",)), "attempt"),
    (ExecSpec("t", True, argv=("true",)), "attempt"),
    (ExecSpec("t", 0), "argv/shell"),
    (ExecSpec("t", 0, argv=("true",), shell="true"), "argv/shell"),
    (ExecSpec("t", 0, argv=("",)), "argv"),
    (ExecSpec("t", 0, argv=("a\0b",)), "argv"),
    (ExecSpec("t", 0, shell="   "), "shell"),
    (ExecSpec("t", 0, argv=("true",), env={"1X": "v"}), "env"),
    (ExecSpec("t", 0, argv=("true",), env={"GALAXY_TASK_ID": "v"}), "env"),
    (ExecSpec("t", 0, argv=("true",), env={"A": "x" * (core.ENV_CHARS_MAX + 1)}), "env"),
    (ExecSpec("t", 0, argv=("true",), timeout_ms=-1), "timeout_ms"),
    (ExecSpec("t", 0, argv=("true",), memory_mb=1.5), "memory_mb"),
    (ExecSpec("t", 0, argv=("true",), output_bytes_max=core.OUTPUT_BYTES_MAX + 1),
     "output_bytes_max"),
])
def test_validate_names_the_field(spec: ExecSpec, field: str) -> None:
    why = core.validate(spec)
    if field:
        assert why.startswith(field + ":"), why
    else:
        assert why == ""


def test_env_is_clean_base_plus_spec_env() -> None:
    spec = ExecSpec("t", 2, argv=("x",), env={"FOO": "1", "PATH": "/opt/bin"})
    env = core.build_env(spec, path="/usr/bin", work_dir="/w", tmp_dir="/w/tmp",
                         progress_file="/p")
    assert env == {"PATH": "/opt/bin", "HOME": "/w", "LANG": "C.UTF-8", "TMPDIR": "/w/tmp",
                   "FOO": "1", "GALAXY_TASK_ID": "t", "GALAXY_ATTEMPT": "2",
                   "GALAXY_PROGRESS_FILE": "/p"}


# ---- progress ------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("42", 42), (" 42\n", 42), ("42.9", 42), ("42%", 42), ("0", 0), ("100", 100),
    ("150", 100), ("-5", 0), ("+7", 7), ("", None), ("abc", None), ("nan", None),
    ("inf", None), ("1e3", None), ("4 2", None), (b"\xff", None), (b"77", 77),
    ("9" * 40, None),
])
def test_parse_progress(text: str | bytes, value: int | None) -> None:
    assert core.parse_progress(text) == value


def test_progress_lines_across_chunks_and_garbage() -> None:
    p = ProgressParser()
    assert p.feed(b"hello\nGALAXY_PRO") == []
    assert p.feed(b"GRESS 10\nGALAXY_PROGRESS 20\nGALAXY_PROGRESS x\n") == [10, 20]
    assert p.feed(b"GALAXY_PROGRESSBAR 5\n  GALAXY_PROGRESS 200  \r\n") == [100]
    assert p.feed(b"not GALAXY_PROGRESS 5\nGALAXY_PROGRESS 30") == []   # not yet a line
    assert p.feed(b"\n") == [30]


def test_progress_long_line_is_skipped_without_buffering() -> None:
    p = ProgressParser()
    assert p.feed(b"GALAXY_PROGRESS 5" + b" " * 10_000) == []
    assert p.feed(b"x" * 100_000) == []
    assert p.feed(b"\nGALAXY_PROGRESS 6\n") == [6]


@given(st.lists(st.binary(max_size=200), max_size=30))
def test_progress_parser_never_leaves_range(chunks: list[bytes]) -> None:
    p = ProgressParser()
    for c in chunks:
        assert all(0 <= v <= 100 for v in p.feed(c))


@given(st.lists(st.integers(0, 100), max_size=20), st.integers(1, 17))
def test_progress_any_chunking_gives_same_values(values: list[int], step: int) -> None:
    data = b"".join(b"noise\nGALAXY_PROGRESS %d\n" % v for v in values)
    p = ProgressParser()
    got = [v for i in range(0, len(data), step) for v in p.feed(data[i:i + step])]
    assert got == values


# ---- output cap ------------------------------------------------------------------------
@given(st.integers(0, 5000), st.lists(st.binary(max_size=3000), max_size=20))
def test_stream_cap_keeps_the_start_as_it_comes_and_the_end_at_the_close(limit: int, chunks: list[bytes]) -> None:
    cap = StreamCap(limit)
    now = b"".join(cap.accept(c) for c in chunks)
    everything = b"".join(chunks)
    assert now == everything[:limit] and cap.seen_bytes == len(everything)
    end = min(limit // 4, core.STREAM_END_BYTES_MAX)
    dropped = max(0, len(everything) - limit - end)
    assert cap.truncated == (dropped > 0) and cap.tail == everything[-core.STREAM_TAIL_BYTES_MAX:]
    written = now + cap.closing()
    if dropped:
        assert written == (everything[:limit] + b"\n[galaxy: %d bytes of output dropped here]\n" % dropped
                           + everything[len(everything) - end:])
    else:
        assert written == everything
    assert cap.kept_bytes == len(written) and cap.truncated == (dropped > 0)


# ---- archives --------------------------------------------------------------------------
F, D, S, H, O = core.FILE, core.DIR, core.SYMLINK, core.HARDLINK, core.OTHER


@pytest.mark.parametrize("members, bad", [
    ([("a.txt", F, "", 3), ("d", D, "", 0), ("d/b", F, "", 1)], ""),
    ([("d/link", S, "b", 0), ("d/hard", H, "d/b", 0)], ""),
    ([("/etc/passwd", F, "", 1)], "escapes"),
    ([("../x", F, "", 1)], "escapes"),
    ([("a/../../x", F, "", 1)], "escapes"),
    ([("a/../b", F, "", 1)], "escapes"),         # refused even though it stays inside
    ([("l", S, "/etc", 0)], "escapes"),
    ([("l", S, "../..", 0)], "escapes"),
    ([("l", H, "/etc/passwd", 0)], "escapes"),
    ([("dev", O, "", 0)], "special"),
    ([("", F, "", 0)], "escapes"),
])
def test_check_archive(members: list[tuple[str, str, str, int]], bad: str) -> None:
    why = core.check_archive(members, members_max=10, bytes_max=100)
    assert (bad in why and why) if bad else why == ""


def test_check_archive_limits() -> None:
    many = [(f"f{i}", F, "", 1) for i in range(11)]
    assert "more than 10 members" in core.check_archive(many, members_max=10, bytes_max=100)
    big = [("a", F, "", 60), ("b", F, "", 60)]
    assert "more than 100 bytes" in core.check_archive(big, members_max=10, bytes_max=100)


# ---- classify --------------------------------------------------------------------------
@pytest.mark.parametrize("kw, expect", [
    (dict(returncode=0), ("succeeded", 0, None, "exit code 0", False)),
    (dict(returncode=3), ("failed", 3, None, "exit code 3", False)),
    (dict(returncode=127, shell=True),
     ("failed", 127, None, "exit code 127 (command not found)", False)),
    (dict(returncode=126, shell=True), ("failed", 126, None, "exit code 126 (not executable)", False)),
    (dict(returncode=127), ("failed", 127, None, "exit code 127", False)),
    (dict(returncode=-11), ("failed", None, 11, "killed by SIGSEGV", False)),
    (dict(returncode=None, spawn_error="command not found: foo"),
     ("failed", None, None, "command not found: foo", False)),
    (dict(returncode=-15, killed_for="timeout", timeout_ms=5000),
     ("timed_out", None, 15, "killed after timeout of 5.0 s", False)),
    (dict(returncode=0, killed_for="timeout", timeout_ms=250),
     ("timed_out", 0, None, "killed after timeout of 0.2 s", False)),
    (dict(returncode=-9, killed_for="cancel"), ("cancelled", None, 9, "cancelled", False)),
    (dict(returncode=None, killed_for="cancel"), ("cancelled", None, None, "cancelled", False)),
    (dict(returncode=-9, killed_for="close"),
     ("cancelled", None, 9, "node stopping: attempt killed", True)),
    (dict(returncode=None, killed_for="orphan"),
     ("failed", None, None, "node restarted while the attempt ran", True)),
    (dict(returncode=1, memory_mb=256, stderr_tail=b"...\nMemoryError\n"),
     ("failed", 1, None, "memory limit 256 MB exceeded (exit code 1)", False)),
    (dict(returncode=1, stderr_tail=b"MemoryError\n"), ("failed", 1, None, "exit code 1", False)),
    (dict(returncode=127, memory_mb=1, shell=True, stderr_tail=b"/bin/sh: error while loading shared libraries: "
          b"libc.so.6: failed to map segment from shared object\n"),
     ("failed", 127, None, "memory limit 1 MB is too small to load the program (exit code 127)", False)),
    (dict(returncode=127, shell=True), ("failed", 127, None, "exit code 127 (command not found)", False)),
    (dict(returncode=-6, memory_mb=64),
     ("failed", None, 6, "killed by SIGABRT; memory limit 64 MB probably exceeded", False)),
    (dict(returncode=-9, memory_mb=64),      # RLIMIT_AS never sends SIGKILL: no guess about the limit
     ("failed", None, 9, "killed by SIGKILL (by another process, or by the kernel with the machine out of memory)",
      False)),
])
def test_classify(kw: dict, expect: tuple) -> None:
    got = core.classify(**kw)
    assert got == expect
    assert got[0] in core.STATES and not (got[1] is not None and got[2] is not None)


def test_result_json_round_trip_and_rejects_garbage() -> None:
    r = Result(state="failed", exit_code=3, signal=None, reason="exit code 3", started_ms=1,
               ended_ms=2, stdout_bytes=4, stderr_bytes=5, truncated=True, output_archive="/a")
    assert Result.from_json(r.to_json()) == r
    with pytest.raises(ValueError):
        Result.from_json('{"state": "exploded"}')
    with pytest.raises(ValueError):
        Result.from_json("[]")


# ---- nvidia-smi --------------------------------------------------------------------------
SMI_WITH_HEADER_AND_UNITS = """\
index, name, memory.total [MiB], memory.used [MiB], utilization.gpu [%]
0, NVIDIA GeForce RTX 3090, 24576 MiB, 1024 MiB, 37 %
1, Tesla V100-SXM2-16GB, 16160 MiB, 0 MiB, 0 %
"""
SMI_NOUNITS = "0, NVIDIA A100-SXM4-80GB, 81920, 4, 100\n"


def test_parse_nvidia_smi() -> None:
    assert core.parse_nvidia_smi(SMI_WITH_HEADER_AND_UNITS) == [
        {"index": 0, "name": "NVIDIA GeForce RTX 3090", "memory_total_mb": 24576,
         "memory_used_mb": 1024, "utilization_pct": 37},
        {"index": 1, "name": "Tesla V100-SXM2-16GB", "memory_total_mb": 16160,
         "memory_used_mb": 0, "utilization_pct": 0}]
    assert core.parse_nvidia_smi(SMI_NOUNITS)[0]["memory_total_mb"] == 81920
    assert core.parse_nvidia_smi("0, Odd, Name, 100, [N/A], [N/A]\n") == [
        {"index": 0, "name": "Odd, Name", "memory_total_mb": 100, "memory_used_mb": 0,
         "utilization_pct": 0}]
    assert core.parse_nvidia_smi("") == []
    assert core.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate\n") == []
