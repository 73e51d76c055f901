"""The task commands of the CLI (galaxy/cli_tasks.py) against a scripted client: what a user
reads and the exit codes, with no node behind them."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from galaxy import cli, cli_tasks
from galaxy.client import ClientError

TASK_ID = "t-0123456789abcdef"


class ScriptedClient:
    """``get`` answers the task documents of ``states`` one per call (the last one for ever);
    ``stream`` answers the output of the attempt asked for, or raises its error."""

    def __init__(self, states: list[dict], logs: dict[int, Any]) -> None:
        self.states = states
        self.logs = logs
        self.streamed: list[dict] = []

    def get(self, path: str, query: Any = None) -> dict:
        assert path == f"/v1/tasks/{TASK_ID}"
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def stream(self, path: str, query: dict, timeout_s: Any = None, headers: dict | None = None) -> Any:
        assert path == f"/v1/tasks/{TASK_ID}/logs"
        self.streamed.append(dict(query))
        got = self.logs[query.get("attempt", 0)]
        if isinstance(got, ClientError):
            raise got
        if headers is not None:
            headers.update(self.headers)
        yield from got

    headers: dict[str, str] = {}


def _task(state: str, attempt: int, **kw: Any) -> dict:
    return {"id": TASK_ID, "state": state, "attempt": attempt, "node": "n-2" if attempt else None, **kw}


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_tasks, "WAIT_POLL_S", 0.001)


def _logs(monkeypatch: pytest.MonkeyPatch, client: ScriptedClient, *argv: str) -> int:
    monkeypatch.setattr(cli_tasks, "_client", lambda args: client)
    return cli.main(["logs", TASK_ID, *argv])


def test_logs_follow_waits_for_the_start_and_goes_through_every_retry(monkeypatch, capfdbinary) -> None:
    client = ScriptedClient([_task("pending", 0, waiting="no node has label zone=a"), _task("running", 1),
                             _task("pending", 1), _task("running", 2), _task("failed", 2, exit_code=3)],
                            {1: [b"run 1\n"], 2: [b"run ", b"2\n"]})
    assert _logs(monkeypatch, client, "-f") == 0
    out, err = capfdbinary.readouterr()
    assert out == b"run 1\nrun 2\n"
    assert [q["attempt"] for q in client.streamed] == [1, 2] and all(q["follow"] == 1 for q in client.streamed)
    assert err.decode().splitlines() == [
        f"galaxy: {TASK_ID} is pending (no node has label zone=a); waiting for it to start",
        f"galaxy: {TASK_ID}: attempt 2 on n-2"]


def test_logs_follow_skips_an_unreachable_attempt_and_exits_1(monkeypatch, capfdbinary) -> None:
    gone = ClientError("the attempt ran on n-2, which is dead: its logs are not reachable (HTTP 502)")
    client = ScriptedClient([_task("running", 1), _task("running", 2), _task("succeeded", 2, exit_code=0)],
                            {1: gone, 2: [b"ok\n"]})
    assert _logs(monkeypatch, client, "-f") == 1
    out, err = capfdbinary.readouterr()
    assert out == b"ok\n" and "which is dead" in err.decode() and "attempt 2 on n-2" in err.decode()


def test_logs_follow_of_a_task_that_never_ran_says_so(monkeypatch, capfdbinary) -> None:
    client = ScriptedClient([_task("cancelled", 0, reason="cancelled while pending")], {})
    assert _logs(monkeypatch, client, "-f") == 1
    assert f"task {TASK_ID} never ran (cancelled while pending)" in capfdbinary.readouterr().err.decode()


def test_logs_of_one_attempt_is_one_request(monkeypatch, capfdbinary) -> None:
    client = ScriptedClient([_task("running", 2)], {1: [b"first\n"]})
    assert _logs(monkeypatch, client, "-f", "--attempt", "1") == 0
    assert capfdbinary.readouterr().out == b"first\n" and client.streamed == [
        {"stream": "stdout", "follow": 1, "attempt": 1}]


@pytest.mark.parametrize("memory", ["5Q", "0", "-5M", "99999999T", ""])
def test_a_bad_memory_names_the_flag(memory: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["submit", f"--memory={memory}", "--", "true"]) == 2
    assert f"galaxy: error: --memory {memory!r}: must be a size" in capsys.readouterr().err


@pytest.mark.parametrize("shell", ["", "  "])
def test_an_empty_shell_command_is_a_usage_error(shell: str, capsys) -> None:
    assert cli.main(["submit", "--shell", shell]) == 2
    assert "--shell: the command is empty" in capsys.readouterr().err


@pytest.mark.parametrize("attempt", ["0", "-1", "x"])
def test_logs_of_attempt_zero_is_a_usage_error_not_the_last_attempt(attempt: str, capsys) -> None:
    assert cli.main(["logs", TASK_ID, f"--attempt={attempt}"]) == 2
    assert "--attempt" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-1", "1001"])
def test_tasks_limit_out_of_range_is_a_usage_error(limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tasks", "--limit", limit]) == 2
    assert f"--limit: must be between 1 and 1000, got {limit}" in capsys.readouterr().err


def _render(fn: Any, data: Any, **kw: Any) -> str:
    out = io.StringIO()
    fn(data, Console(file=out, width=200, no_color=True), **kw)
    return out.getvalue()


def test_a_task_shows_its_whole_spec() -> None:
    task = {**_task("pending", 0), "name": "nightly", "command": ["python", "job.py"], "owner": "alice",
            "accepted_by": "n-1", "submitted_ms": 1_700_000_000_000, "resources": {"cpu": 2, "memory_mb": 512, "gpu": 1},
            "timeout_s": 60.0, "max_retries": 2, "priority": 5, "price": 7, "input": "ab" * 32, "env": ["A", "B"],
            "constraints": {"labels": {"zone": "a"}, "min_trust": "medium"}, "attempts": []}
    text = _render(cli_tasks.render_task, task)
    for want in ("name       nightly", "at n-1", "cpu 2, memory 512M, gpu 1", "timeout    60 s", "priority   5",
                 "labels     zone=a", "min trust  medium", "input      " + "ab" * 32, "env        A, B",
                 "price      7"):
        assert want in text, want
    assert "timeout    none" in _render(cli_tasks.render_task, {**task, "timeout_s": 0.0})


def test_the_list_shows_names_when_there_are_some_and_says_whose_counts_follow_a_filter() -> None:
    row = {**_task("running", 1), "owner": "a", "submitted_ms": 0, "command": "true"}
    data = {"tasks": [{**row, "name": "nightly"}, {**row, "id": "t-1123456789abcdef", "name": ""}],
            "counts": {"running": 2, "failed": 1}}
    text = _render(cli_tasks.render_tasks, data)
    assert "name" in text.splitlines()[2] and "nightly" in text
    assert text.rstrip().endswith("running 2  failed 1")
    assert "in the whole mesh: running 2  failed 1" in _render(cli_tasks.render_tasks, data, filtered=True)
    assert "name" not in _render(cli_tasks.render_tasks, {"tasks": [row], "counts": {}}).splitlines()[2]


def test_an_id_or_node_is_one_segment_of_the_path_whatever_it_holds(monkeypatch) -> None:
    """A pasted id with a space or a '?' reaches the node as that id (which answers that it is
    no task id), not as a broken URL or another route."""
    paths: list[str] = []

    class Recording:
        def get(self, path: str, query: Any = None) -> dict:
            paths.append(path)
            raise ClientError("not a task id (HTTP 400)")

        post = get

    monkeypatch.setattr(cli_tasks, "_client", lambda args: Recording())
    for argv in (["task", "a b"], ["cancel", "t-?x"], ["drain", "dev 2?x=1"]):
        assert cli.main(argv) == 1
    assert paths == ["/v1/tasks/a%20b", "/v1/tasks/t-%3Fx/cancel", "/v1/nodes/dev%202%3Fx%3D1/drain"]


def test_control_characters_in_what_users_wrote_are_shown_not_sent_to_the_terminal() -> None:
    """A task's name, command and reason come from users: an ESC (a window title, an OSC 52
    clipboard write) or markup in them must reach the reader's terminal as text."""
    evil = "\x1b]0;pwned\x07[bold]x[/bold]\x9b31m\u202egnp.exe"
    task = {**_task("failed", 1), "name": evil, "command": ["echo", evil], "owner": "alice", "accepted_by": "n-1",
            "submitted_ms": 0, "resources": {}, "reason": evil,
            "attempts": [{"attempt": 1, "node": "n-1", "state": "failed", "term": 1, "reason": evil}]}
    for text in (_render(cli_tasks.render_task, task), _render(cli_tasks.render_tasks, {"tasks": [task], "counts": {}}),
                 cli_tasks.end_line(task)):
        assert not any(ord(ch) < 0x20 and ch != "\n" or 0x7f <= ord(ch) < 0xa0 for ch in text), repr(text)
        assert "\\x1b]0;pwned\\x07" in text and "\u202e" not in text and "\\u202egnp.exe" in text


@pytest.mark.parametrize("task, line", [
    (_task("failed", 3, exit_code=7, reason="exit code 7"), f"{TASK_ID}: failed (exit code 7)"),
    (_task("failed", 1, exit_code=1, reason="memory limit 64 MB exceeded (exit code 1)"),
     f"{TASK_ID}: failed (exit code 1) — memory limit 64 MB exceeded (exit code 1)"),
    (_task("timed_out", 1, reason="killed after timeout of 2.0 s"), f"{TASK_ID}: timed_out — killed after timeout of 2.0 s"),
    (_task("succeeded", 1, exit_code=0, reason="exit code 0"), f"{TASK_ID}: succeeded (exit code 0)"),
    (_task("cancelled", 1, reason="cancelled"), f"{TASK_ID}: cancelled"),
    (_task("cancelled", 0, reason="cancelled while pending"), f"{TASK_ID}: cancelled — cancelled while pending"),
])
def test_the_end_of_a_wait_says_the_reason_once(task: dict, line: str) -> None:
    assert _render(lambda d, c: c.print(cli_tasks.end_line(d)), task).strip() == line


def test_ctrl_c_while_waiting_says_the_task_goes_on(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    class Client:
        def post(self, path: str, body: Any) -> dict:
            return {"id": TASK_ID}

    def interrupted(*a: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_tasks, "_client", lambda args: Client())
    monkeypatch.setattr(cli_tasks, "_wait", interrupted)
    assert cli.main(["submit", "--wait", "--", "sleep", "9"]) == 130
    assert (f"stopped following {TASK_ID}; the task goes on (galaxy cancel {TASK_ID} stops it)"
            in capsys.readouterr().err)


def test_waiting_on_a_node_that_does_not_answer_says_so_in_a_log_and_goes_on(monkeypatch, capsys) -> None:
    class Client:
        answers: list[Any] = [ClientError("cannot reach http://n-1:8000: connection refused")] * 3 + [
            _task("succeeded", 1, exit_code=0)]

        def get(self, path: str, query: Any = None) -> dict:
            got = self.answers.pop(0)
            if isinstance(got, Exception):
                raise got
            return got

    monkeypatch.setattr(cli_tasks, "WAIT_RETRY_S", 0.001)
    assert cli_tasks._wait(Client(), TASK_ID, as_json=False) == 0     # stderr is not a terminal here
    err = capsys.readouterr().err
    assert err.count("connection refused; retrying every") == 1 and f"{TASK_ID}: succeeded" in err


def test_logs_say_when_the_output_went_past_the_cap(monkeypatch, capfdbinary) -> None:
    client = ScriptedClient([_task("succeeded", 1)], {0: [b"x" * 8]})
    client.headers = {"X-Galaxy-Attempt": "1", cli_tasks.TRUNCATED_HEADER: "1048576"}
    assert _logs(monkeypatch, client) == 0
    out = capfdbinary.readouterr()
    assert out.out == b"x" * 8
    assert (f"{TASK_ID}: the output of attempt 1 went past task_output_bytes_max: its middle was dropped "
            "(a line in it says how much)").encode() in out.err
