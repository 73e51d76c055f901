"""SeedBackoff: parsing and the retry schedule, driven by a fake now_ms."""

from __future__ import annotations

import random

import pytest

from galaxy.discovery.seeds import DUE_NOW_MS, SEEDS_MAX, SeedBackoff, parse_addr


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("10.0.0.1:7946", ("10.0.0.1", 7946)),
        (" node-a.lan:1 ", ("node-a.lan", 1)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
        ("localhost:7946", ("localhost", 7946)),
    ],
)
def test_parse_ok(entry: str, expected: tuple[str, int]) -> None:
    assert parse_addr(entry) == expected


@pytest.mark.parametrize(
    "entry",
    ["10.0.0.1", "10.0.0.1:", ":7946", "host:0", "host:65536", "host:-1", "host:abc",
     "fe80::1:7946", "[nope]:7946", "a b:1", "", "host:７"],
)
def test_parse_bad_names_entry(entry: str) -> None:
    with pytest.raises(ValueError) as exc:
        SeedBackoff(["10.0.0.9:1", entry], 200, 10_000, random.Random(1))
    assert repr(entry) in str(exc.value)


def test_constructor_checks() -> None:
    with pytest.raises(TypeError):
        SeedBackoff("10.0.0.1:1", 200, 10_000, random.Random(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SeedBackoff([], 0, 10, random.Random(1))
    with pytest.raises(ValueError):
        SeedBackoff([], 20, 10, random.Random(1))
    with pytest.raises(ValueError):
        SeedBackoff([f"h{i}:1" for i in range(SEEDS_MAX + 1)], 1, 10, random.Random(1))


def test_duplicates_collapse() -> None:
    b = SeedBackoff(["a:1", " a:1", "b:2"], 200, 10_000, random.Random(1))
    assert b.seeds == (("a", 1), ("b", 2))
    assert b.due(0) == [("a", 1), ("b", 2)]


def test_no_seeds_never_due() -> None:
    b = SeedBackoff([], 200, 10_000, random.Random(1))
    assert b.due(0) == []
    assert b.next_deadline_ms() is None


def test_first_contact_is_immediate_then_backoff_grows_to_cap() -> None:
    b = SeedBackoff(["a:1"], 200, 10_000, random.Random(7))
    assert b.next_deadline_ms() == DUE_NOW_MS
    now, delays = 1_000, []
    assert b.due(now) == [("a", 1)]
    for _ in range(15):
        deadline = b.next_deadline_ms()
        assert deadline is not None and deadline > now
        assert b.due(deadline - 1) == []            # not a millisecond early
        delays.append(deadline - now)
        now = deadline
        assert b.due(now) == [("a", 1)]
    # attempt n waits in [max(min, .8 b), min(max, 1.2 b)], b = min(max, 200 * 2**(n-1))
    for n, d in enumerate(delays, start=1):
        base = min(10_000, 200 * 2 ** (n - 1))
        assert max(200, 0.8 * base) - 1 <= d <= min(10_000, 1.2 * base) + 1, (n, d)
    assert all(d <= 10_000 for d in delays)
    assert delays[-5:] != [10_000] * 5                # jitter survives at the cap


def test_late_poll_returns_once() -> None:
    b = SeedBackoff(["a:1"], 200, 10_000, random.Random(3))
    assert b.due(0) == [("a", 1)]
    assert b.due(1_000_000) == [("a", 1)]           # overdue: once, not once per missed slot
    assert b.due(1_000_000) == []


def test_joined_stops_retries_and_reset_restarts() -> None:
    b = SeedBackoff(["a:1", "b:2"], 100, 1_000, random.Random(5))
    assert b.due(0) == [("a", 1), ("b", 2)]
    b.joined("a", 1)
    b.joined("zzz", 9)                               # unknown: ignored
    assert b.pending == (("b", 2),)
    seen: list[tuple[str, int]] = []
    for now in range(0, 20_000, 50):
        seen += b.due(now)
    assert ("a", 1) not in seen and seen.count(("b", 2)) >= 15
    b.joined("b", 2)
    assert b.next_deadline_ms() is None
    assert b.due(10**9) == []
    b.reset()
    assert b.next_deadline_ms() == DUE_NOW_MS
    assert b.due(20_000) == [("a", 1), ("b", 2)]
    d = b.next_deadline_ms()
    assert d is not None and 20_100 <= d <= 20_120    # attempt counter restarted too


def test_same_seed_same_schedule() -> None:
    def run(seed: int) -> list[int]:
        b = SeedBackoff(["a:1"], 200, 10_000, random.Random(seed))
        out, now = [], 0
        for _ in range(10):
            b.due(now)
            now = b.next_deadline_ms() or 0
            out.append(now)
        return out

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_core_is_pure() -> None:
    """STYLE rule 1: the schedule imports no clock, randomness, sockets or event loop."""
    import ast
    import inspect

    import galaxy.discovery.seeds as mod

    tree = ast.parse(inspect.getsource(mod))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not _type_checking_only(tree, node):
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "time", "random", "socket", "os"}, imported


def _type_checking_only(tree: object, node: object) -> bool:
    import ast

    assert isinstance(tree, ast.Module)
    return any(isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "TYPE_CHECKING"
               and node in list(ast.walk(stmt)) for stmt in tree.body)
