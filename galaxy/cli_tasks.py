"""CLI commands for tasks: submit, tasks, task, logs, cancel, drain.

Theory of operation: each command is one or a few HTTP calls (``galaxy.client``) and a
rendering with rich; the node validates everything (the CLI only turns flags into the
JSON body of ``POST /v1/tasks``).  ``submit --wait`` follows the task to its end and exits
with its exit code: 0 succeeded, the command's own code when it failed, 124 on timeout
(as ``timeout(1)``), 130 when cancelled, 1 when it failed without one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any

from galaxy.cli import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, PROG, _add_client_parser, _client, _console, _esc, _fail, _seg,
                        _mem, _num, _positive_int, _print_json, _styled)
from galaxy.client import Client, ClientError
from galaxy.config import parse_size_mb
from galaxy.tasks.core import TRUNCATED_HEADER

WAIT_RETRY_S = 1.0             # --wait: a node that does not answer is asked again this often
WAIT_POLL_S = 0.2
TASKS_LIMIT_MAX = 1000         # the node's LIST_LIMIT_MAX
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")
EXIT_TIMED_OUT, EXIT_CANCELLED = 124, 130
EXIT_INTERRUPTED = 130         # Ctrl-C, as for any command


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _body(args: argparse.Namespace) -> dict[str, Any]:
    command: Any = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.shell is not None:
        if command:
            raise ValueError("give either --shell 'CMD' or a command after --, not both")
        if not args.shell.strip():
            raise ValueError("--shell: the command is empty")
        command = args.shell
    elif not command:
        raise ValueError("no command: galaxy submit [flags] -- COMMAND [ARGS...]")
    try:
        memory_mb = parse_size_mb(args.memory)
    except ValueError as e:
        raise ValueError(f"--memory {args.memory!r}: {e}") from None
    body: dict[str, Any] = {"command": command,
                            "resources": {"cpu": args.cpu, "memory_mb": memory_mb, "gpu": args.gpu},
                            "max_retries": args.retries, "priority": args.priority}
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    env = _pairs(args.env, "--env")
    if env:
        body["env"] = env
    labels = _pairs(args.label, "--label")
    if labels or args.min_trust:
        body["constraints"] = {**({"labels": labels} if labels else {}),
                               **({"min_trust": args.min_trust} if args.min_trust else {})}
    for name in ("name", "owner"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    return body


SUBMIT_BATCH_MAX = 1000       # tasks per POST (the node's BATCH_MAX)
SUBMIT_COUNT_MAX = 100_000


def _submit_batch(client: Client, body: dict, args: argparse.Namespace) -> int:
    """``--count N``: N copies of the task, in batches (each all or nothing, one durable
    acknowledgement); prints the ids as each batch is acknowledged."""
    ids = []
    left = args.count
    while left:
        n = min(left, SUBMIT_BATCH_MAX)
        try:
            got = client.post("/v1/tasks", {"tasks": [body] * n})
        except ClientError as err:
            done = f" ({len(ids)} submitted before this)" if ids else ""
            return _fail(err.message + done)
        ids.extend(t["id"] for t in got["tasks"])
        if not args.json:
            print("\n".join(t["id"] for t in got["tasks"]), flush=True)
        left -= n
    if args.json:
        _print_json({"ids": ids})
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= SUBMIT_COUNT_MAX:
        return _fail(f"--count: must be between 1 and {SUBMIT_COUNT_MAX}", EXIT_USAGE)
    if args.count > 1 and args.wait:
        return _fail("--wait follows one task: use it without --count", EXIT_USAGE)
    try:
        body = _body(args)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    client = _client(args)
    try:
        if args.file:
            with open(args.file, "rb") as f:
                blob = client.upload("/v1/blobs", f, os.fstat(f.fileno()).st_size)
            body["input"] = blob["sha256"]
        if args.count > 1:
            return _submit_batch(client, body, args)
        task = client.post("/v1/tasks", body)
    except OSError as e:
        return _fail(f"--file: {e.strerror or e}: {args.file}", EXIT_USAGE)
    except ClientError as err:
        return _fail(err.message)
    if args.json and not args.wait:
        _print_json(task)
        return EXIT_OK
    if not args.wait:
        print(task["id"])
        return EXIT_OK
    print(task["id"], file=sys.stderr)
    try:
        return _wait(client, task["id"], args.json)
    except KeyboardInterrupt:        # the task is not cancelled: say so (130 is the shell's Ctrl-C code)
        print(f"{PROG}: stopped following {task['id']}; the task goes on (galaxy cancel {task['id']} stops it)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_code_for(task: dict) -> int:
    state = task.get("state")
    if state == "succeeded":
        return EXIT_OK
    if state == "timed_out":
        return EXIT_TIMED_OUT
    if state == "cancelled":
        return EXIT_CANCELLED
    code = task.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else EXIT_FAIL


def _wait(client: Client, task_id: str, as_json: bool) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = _console(sys.stderr)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        row = bar.add_task(task_id, total=100, state="pending")
        said = ""
        while True:
            try:
                task = client.get(f"/v1/tasks/{_seg(task_id)}")
            except ClientError as err:
                # the node may come back (or the client was pointed at one being restarted)
                bar.update(row, state=f"({err.message}; retrying)")
                if not console.is_terminal and err.message != said:
                    console.print(f"{_esc(task_id)}: {_esc(err.message)}; retrying every {WAIT_RETRY_S:g} s")
                    said = err.message
                time.sleep(WAIT_RETRY_S)
                continue
            now = (f"pending: {_esc(task['waiting'])}" if task.get("waiting")
                   else f"{_esc(task['state'])} on {_esc(task['node'])}" if task.get("node") else _esc(task["state"]))
            bar.update(row, completed=task.get("progress") or 0, state=now)
            if not console.is_terminal and now != said and task["state"] not in TERMINAL:
                console.print(f"{_esc(task_id)}: {now}")     # no bar in a log: each change on a line
                said = now
            if task["state"] in TERMINAL:
                break
            time.sleep(WAIT_POLL_S)
    if as_json:
        _print_json(task)
    else:
        console.print(end_line(task))
    return exit_code_for(task)


def end_line(task: dict) -> str:
    """``t-…: failed (exit code 7)``, with the reason when it says more than the exit code."""
    code = task.get("exit_code")
    reason = task.get("reason") or ""
    said = f" (exit code {code})" if code is not None else ""
    more = reason and task.get("state") != "succeeded" and reason not in (f"exit code {code}", task.get("state"))
    return f"{_esc(task.get('id'))}: {_styled(task.get('state'))}{said}" + (f" — {_esc(reason)}" if more else "")


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _command_text(command: Any, chars_max: int | None = 48) -> str:
    """A shell command as given; an argv quoted as a shell would need it (shown whole, or
    cut to ``chars_max`` for a table)."""
    text = command if isinstance(command, str) else shlex.join(map(str, command or []))
    return text if chars_max is None or len(text) <= chars_max else text[:chars_max - 1] + "…"


def render_tasks(data: Any, console: Any, filtered: bool = False) -> None:
    """The table; then the whole mesh's counts by state (``filtered``: the table shows only
    some of them, so the line says whose counts they are)."""
    from rich.table import Table

    now = time.time()
    tasks = data.get("tasks", [])
    named = any(t.get("name") for t in tasks)
    table = Table(title="tasks", title_justify="left")
    for col in ("id", *(("name",) if named else ()), "state", "node", "attempt", "progress", "exit", "owner",
                "age", "command"):
        table.add_column(col)
    for t in tasks:
        progress = f"{t['progress']}%" if t.get("progress") is not None else "-"
        table.add_row(_esc(t["id"]), *((_esc(t.get("name") or ""),) if named else ()), _styled(t["state"]),
                      _esc(t.get("node")), _num(t.get("attempt")), progress,
                      _num(t.get("exit_code")), _esc(t.get("owner")), _ago(max(0, now - t["submitted_ms"] / 1000)),
                      _esc(_command_text(t.get("command"))))
    console.print(table)
    counts = data.get("counts") or {}
    line = "  ".join(f"{_styled(s)} {n}" for s, n in counts.items() if n) or "no tasks"
    console.print(f"in the whole mesh: {line}" if filtered else line)
    if data.get("next"):
        console.print(f"[dim]more: --after {_esc(data['next'])}[/dim]")


def render_task(t: Any, console: Any) -> None:
    from rich.table import Table

    info = Table(show_header=False, box=None)
    info.add_column(style="bold")
    info.add_column()
    res = t.get("resources", {})
    cons = t.get("constraints") or {}
    labels = cons.get("labels") if isinstance(cons, dict) else None
    rows = [("id", _esc(t["id"]))]
    if t.get("name"):
        rows.append(("name", _esc(t["name"])))
    rows += [("state", _styled(t["state"])), ("node", _esc(t.get("node"))),
             ("command", _esc(_command_text(t.get("command"), None))), ("owner", _esc(t.get("owner"))),
             ("submitted", _submitted(t)),
             ("resources", f"cpu {_num(res.get('cpu'))}, memory {_mem(res.get('memory_mb'))}, gpu {_num(res.get('gpu'))}"),
             ("timeout", f"{_num(t['timeout_s'])} s" if t.get("timeout_s") else "none"),
             ("retries", _num(t.get("max_retries"))), ("priority", _num(t.get("priority")))]
    if isinstance(labels, dict) and labels:
        rows.append(("labels", _esc(", ".join(f"{k}={v}" for k, v in labels.items()))))
    if isinstance(cons, dict) and cons.get("min_trust") not in (None, "low"):
        rows.append(("min trust", _esc(cons["min_trust"])))
    if t.get("input"):
        rows.append(("input", _esc(t["input"])))
    if t.get("env"):
        rows.append(("env", _esc(", ".join(map(str, t["env"])))))
    if t.get("price"):
        rows.append(("price", _num(t["price"])))
    rows += [("progress", f"{t['progress']}%" if t.get("progress") is not None else "-"),
             ("exit code", _num(t.get("exit_code")))]
    if t.get("reason") and t["state"] != "succeeded":
        rows.append(("reason", _esc(t["reason"])))
    if t.get("waiting"):
        rows.append(("waiting", f"[yellow]{_esc(t['waiting'])}[/yellow]"))
    if t.get("cancel_requested") and t["state"] != "cancelled":     # still ending, or it ended first
        rows.append(("cancel", "[yellow]requested[/yellow]" if t["state"] not in TERMINAL else "requested too late"))
    for k, v in rows:
        info.add_row(k, v)
    console.print(info)
    if t.get("attempts"):
        table = Table(title="attempts", title_justify="left")
        for col in ("#", "node", "state", "term", "started", "ended", "exit", "reason"):
            table.add_column(col)
        for a in t["attempts"]:
            table.add_row(_num(a["attempt"]), _esc(a["node"]), _styled(a["state"]), _num(a["term"]),
                          _clock(a.get("started_at")), _clock(a.get("ended_at")), _num(a.get("exit_code")),
                          _esc(a.get("reason") or ""))
        console.print(table)


def _submitted(t: dict) -> str:
    ms = t.get("submitted_ms")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
            if isinstance(ms, (int, float)) and not isinstance(ms, bool) else "-")
    return f"{when} at {_esc(t['accepted_by'])}" if t.get("accepted_by") else when


def _clock(seconds: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds)) if seconds else "-"


def cmd_tasks(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= TASKS_LIMIT_MAX:
        return _fail(f"--limit: must be between 1 and {TASKS_LIMIT_MAX}, got {args.limit}", EXIT_USAGE)
    query = {k: v for k, v in (("state", args.state), ("owner", args.owner), ("node", args.node),
                               ("after", args.after)) if v}
    filtered = bool(query)
    query["limit"] = args.limit
    try:
        data = _client(args).get("/v1/tasks", query)
    except ClientError as err:
        return _fail(err.message)
    if args.json:
        _print_json(data)
    else:
        render_tasks(data, _console(), filtered=filtered)
    return EXIT_OK


def cmd_task(args: argparse.Namespace) -> int:
    try:
        data = _client(args).get(f"/v1/tasks/{_seg(args.id)}")
    except ClientError as err:
        return _fail(err.message)
    if args.json:
        _print_json(data)
    else:
        render_task(data, _console())
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"stream": "stderr" if args.stderr else "stdout", "follow": int(args.follow)}
    client = _client(args)
    if args.follow and not args.attempt:
        return _follow_logs(client, args.id, query)
    if args.attempt:
        query["attempt"] = args.attempt
    try:
        _copy_logs(client, args.id, query)
    except ClientError as err:
        return _fail(err.message)
    return EXIT_OK


def _copy_logs(client: Client, task_id: str, query: dict[str, Any]) -> None:
    out = sys.stdout.buffer
    headers: dict[str, str] = {}
    for chunk in client.stream(f"/v1/tasks/{_seg(task_id)}/logs", query,
                               timeout_s=None if query.get("follow") else 30.0, headers=headers):
        out.write(chunk)
        out.flush()
    if headers.get(TRUNCATED_HEADER):
        attempt = headers.get("X-Galaxy-Attempt") or query.get("attempt") or ""
        print(f"{PROG}: {task_id}: the output of attempt {attempt} went past task_output_bytes_max: "
              "its middle was dropped (a line in it says how much)", file=sys.stderr, flush=True)


def _follow_logs(client: Client, task_id: str, query: dict[str, Any]) -> int:
    """``logs -f`` without ``--attempt``: until the *task* ends, not its current attempt. It
    waits for a pending task to start, and goes on to each retry (a line on stderr says
    which attempt and node); an attempt whose node cannot be reached is skipped with an
    error line, and the exit code is then 1."""
    followed, waiting_said, failed = 0, False, False
    while True:
        try:
            t = client.get(f"/v1/tasks/{_seg(task_id)}")
        except ClientError as err:
            return _fail(err.message)
        current = t.get("attempt") or 0
        if current > followed:
            if followed:
                print(f"{PROG}: {task_id}: attempt {current} on {t.get('node') or '-'}", file=sys.stderr, flush=True)
            followed = current
            try:
                _copy_logs(client, task_id, {**query, "attempt": current})
            except ClientError as err:
                print(f"{PROG}: {err.message}", file=sys.stderr, flush=True)
                failed = True
            continue                 # the attempt ended: is the task over, or is there another?
        if t.get("state") in TERMINAL:
            if not followed:
                return _fail(f"task {task_id} never ran ({t.get('reason') or t.get('state')})")
            return EXIT_FAIL if failed else EXIT_OK
        if not followed and not waiting_said:
            why = f" ({t['waiting']})" if t.get("waiting") else ""
            print(f"{PROG}: {task_id} is {t.get('state')}{why}; waiting for it to start", file=sys.stderr, flush=True)
            waiting_said = True
        time.sleep(WAIT_POLL_S)


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        data = _client(args).post(f"/v1/tasks/{_seg(args.id)}/cancel")
    except ClientError as err:
        return _fail(err.message)
    if args.json:
        _print_json(data)
    else:
        print(f"{args.id}: {'cancelled' if data['state'] == 'cancelled' else 'cancel requested'}")
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    try:
        data = _client(args).post(f"/v1/nodes/{_seg(args.node)}/drain", {"draining": not args.undo})
    except ClientError as err:
        return _fail(err.message)
    if args.json:
        _print_json(data)
    elif args.undo:
        print(f"{args.node}: takes tasks again")
    else:
        print(f"{args.node}: draining — no new tasks; it leaves the mesh once its running tasks end")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = _add_client_parser(sub, "submit", "submit a task; prints its id", cmd_submit)
    p.add_argument("--cpu", type=float, default=1.0, help="cores (a float, default 1)")
    p.add_argument("--memory", default="256M", help="memory such as 512M or 2G (default 256M)")
    p.add_argument("--gpu", type=int, default=0, help="GPUs (default 0)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="kill it after this long")
    p.add_argument("--retries", type=int, default=2, help="attempts after the first (default 2)")
    p.add_argument("--priority", type=int, default=0, help="-100..100; higher runs first (default 0)")
    p.add_argument("--label", action="append", metavar="K=V", help="run only on nodes with this label")
    p.add_argument("--min-trust", choices=("low", "medium", "high"), default=None)
    p.add_argument("--env", action="append", metavar="K=V", help="environment variable for the task")
    p.add_argument("--file", metavar="PATH", help="input archive (.tar/.tar.gz) unpacked in the work dir")
    p.add_argument("--name", default=None, help="a name to recognise it by")
    p.add_argument("--owner", default=None, help="account the task belongs to (default: yours; another: admin)")
    p.add_argument("--shell", default=None, metavar="CMD", help="run CMD with /bin/sh -c instead of an argv")
    p.add_argument("--wait", action="store_true", help="follow it to the end; exit with its exit code")
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help="submit N copies as batches of up to 1000 (each all or nothing, one durable ack)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    p = _add_client_parser(sub, "tasks", "list tasks (newest first)", cmd_tasks)
    p.add_argument("--state", default=None)
    p.add_argument("--owner", default=None)
    p.add_argument("--node", default=None)
    p.add_argument("--limit", type=int, default=50, help=f"at most this many (1..{TASKS_LIMIT_MAX}, default 50)")
    p.add_argument("--after", default=None, help="page on after this task id")

    p = _add_client_parser(sub, "task", "one task: spec, state and attempts", cmd_task)
    p.add_argument("id")

    p = _add_client_parser(sub, "logs", "a task's output (from whichever node ran it)", cmd_logs)
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing until the task ends (through its retries; a pending task is waited for)")
    p.add_argument("--stderr", action="store_true", help="standard error instead of standard output")
    p.add_argument("--attempt", type=_positive_int, default=None, help="an earlier attempt (default: the last)")

    p = _add_client_parser(sub, "cancel", "cancel a task wherever it runs", cmd_cancel)
    p.add_argument("id")

    p = _add_client_parser(sub, "drain", "stop placing tasks on a node; it leaves once its tasks end", cmd_drain)
    p.add_argument("node")
    p.add_argument("--undo", action="store_true", help="let the node take tasks again")
