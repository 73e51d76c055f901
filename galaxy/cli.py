"""The ``galaxy`` command line (also ``python -m galaxy``).

Theory of operation: the CLI is a thin shell over three things.

* ``galaxy up`` turns the flags the user actually gave into a ``flags`` mapping (argparse
  ``default=SUPPRESS``, so an absent flag never masks an env variable or the TOML file),
  lets ``config.load`` merge flags > ``GALAXY_*`` env > file > defaults and validate, and
  hands the ``Config`` to ``galaxy.node.run_node``.  A config error is one line on stderr
  and exit status 2, before anything binds a port.
* ``galaxy dev`` supervises N real ``galaxy up`` processes on loopback (see ``DevMesh``).
* Client commands (``status``, ``members``, ``leader``) make one HTTP call through
  ``galaxy.client`` and render the JSON with rich; ``--json`` prints the JSON instead.
  Every failure is one line ``galaxy: …`` on stderr and exit status 1.

Exit statuses: 0 success, 1 runtime failure (unreachable node, HTTP error, a node that
failed), 2 usage or configuration error.

Heavy or not-yet-needed modules (``galaxy.node``, ``galaxy.wire``, ``galaxy.config``)
are imported inside the commands, so ``galaxy status`` starts fast and ``--help`` works
whatever state the rest of the package is in.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import secrets
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from galaxy import __version__
from galaxy.client import DEFAULT_ADDR, Client, ClientError

PROG = "galaxy"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _fail(message: str, status: int = EXIT_FAIL) -> int:
    print(f"{PROG}: error: {message}" if status == EXIT_USAGE else f"{PROG}: {message}",
          file=sys.stderr)
    return status


# ---------------------------------------------------------------------------------------
# galaxy up

# (flag, config field, metavar, help).  Values stay strings: config.load parses and
# validates every source the same way, so `--http-port x` and `GALAXY_HTTP_PORT=x`
# fail with the same message naming the field.
_UP_VALUE_FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("--node-id", "node_id", "ID", "node id (default: generated once, kept in the data dir)"),
    ("--role", "role", "ROLE", "auto | coordinator | standby | worker (default auto)"),
    ("--cluster", "cluster", "NAME", "cluster name (default galaxy)"),
    ("--bind", "bind", "ADDR", "address to listen on (default 0.0.0.0)"),
    ("--advertise", "advertise", "ADDR",
     "address peers should use (default: first non-loopback IPv4)"),
    ("--http-port", "http_port", "PORT", "HTTP API port (default 8000; 0 = pick a free one)"),
    ("--gossip-port", "gossip_port", "PORT", "gossip UDP+TCP port (default 7946)"),
    ("--raft-port", "raft_port", "PORT", "Raft TCP port (default 7947)"),
    ("--broadcast-port", "broadcast_port", "PORT", "UDP broadcast beacon port (default 37021)"),
    ("--data-dir", "data_dir", "DIR", "state directory (default $XDG_DATA_HOME/galaxy)"),
    ("--cluster-key", "cluster_key", "KEY",
     "cluster key (visible in ps; prefer GALAXY_CLUSTER_KEY or --cluster-key-file)"),
    ("--cluster-key-file", "cluster_key_file", "PATH", "file holding the cluster key"),
    ("--token", "token", "JOIN_TOKEN", "one-time join token instead of the cluster key"),
    ("--tls", "tls", "MODE", "off | auto: serve HTTPS with a self-signed certificate kept in the data dir"),
    ("--tls-cert", "tls_cert", "FILE", "serve HTTPS with this PEM certificate (with --tls-key)"),
    ("--tls-key", "tls_key", "FILE", "the certificate's PEM private key"),
    ("--voters", "voters", "N", "size of the Raft voter group (default 3)"),
    ("--cpu", "cpu", "N", "CPUs offered to tasks (default: what the machine has)"),
    ("--memory", "memory_mb", "SIZE", "memory offered to tasks, e.g. 512M, 8G (default: all)"),
    ("--gpu", "gpu", "N", "GPUs offered to tasks"),
    ("--owner", "owner", "ACCOUNT", "account credited for work this node does"),
    ("--log-format", "log_format", "FORMAT", "text | json (default text)"),
    ("--log-level", "log_level", "LEVEL", "debug | info | warning | error (default info)"),
)

# Fields that `galaxy dev` sets for each child itself; inherited GALAXY_* variables for
# them must not leak in (a GALAXY_JOIN meant for a real mesh would make the dev mesh join it).
_DEV_OWNED_FIELDS = frozenset({
    "node_id", "role", "cluster", "bind", "advertise", "http_port", "gossip_port",
    "raft_port", "broadcast_port", "data_dir", "join", "cluster_key", "cluster_key_file",
    "token", "voters", "mdns", "broadcast", "tls", "tls_cert", "tls_key",
})
_DEV_DROPPED_ENV = frozenset({"GALAXY_ADDR", "GALAXY_CONFIG", "GALAXY_PROFILE"})


def _add_up_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="run a node in the foreground (join or found a mesh)",
                       description="Run a Galaxy node in the foreground until SIGINT/SIGTERM. "
                                   "Every flag is also an env variable: --http-port <-> "
                                   "GALAXY_HTTP_PORT. Precedence: flags > env > --config "
                                   "file > defaults.",
                       argument_default=argparse.SUPPRESS)
    _add_node_flags(p)
    p.set_defaults(func=cmd_up)


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    """The node's settings, shared by `up` and `doctor` (which checks what `up` would use)."""
    for flag, dest, metavar, help_text in _UP_VALUE_FLAGS:
        p.add_argument(flag, dest=dest, metavar=metavar, help=help_text)
    p.add_argument("--join", dest="join", metavar="HOST:PORT[,...]", action="append",
                   help="seed gossip addresses (repeatable or comma-separated)")
    p.add_argument("--no-mdns", dest="mdns", action="store_const", const=False,
                   help="do not use mDNS discovery")
    p.add_argument("--no-broadcast", dest="broadcast", action="store_const", const=False,
                   help="do not send or listen for UDP broadcast beacons")
    p.add_argument("--label", dest="labels", metavar="K=V", action="append",
                   help="node label for task constraints (repeatable)")
    p.add_argument("--config", dest="config", metavar="FILE.toml",
                   help="TOML file with any Config field (env: GALAXY_CONFIG)")


def _up_flags(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The flags the user gave, keyed by Config field, and the --config path (or None).

    Values are passed as typed: strings, a list for the repeatable --join/--label, False
    for --no-mdns/--no-broadcast.  config.load parses and validates them.
    """
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    return given, given.pop("config", None)


def _load_config(args: argparse.Namespace) -> Any:
    """The node Config from flags/env/file; raises ConfigError."""
    flags, config_file = _up_flags(args)
    config = importlib.import_module("galaxy.config")
    # config_file None lets config.load fall back to GALAXY_CONFIG.
    return config.load(flags, os.environ, config_file)


def cmd_up(args: argparse.Namespace) -> int:
    config = importlib.import_module("galaxy.config")
    try:
        cfg = _load_config(args)
        if cfg.tls_cert is not None:           # missing, unreadable or mismatched files: exit 2 too
            importlib.import_module("galaxy.tls").server_tls(cfg)
    except config.ConfigError as err:
        return _fail(str(err), EXIT_USAGE)
    node = importlib.import_module("galaxy.node")
    return int(node.run_node(cfg) or 0)


# ---------------------------------------------------------------------------------------
# galaxy doctor

_DOCTOR_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def cmd_doctor(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    if hasattr(args, "json"):
        del args.json
    config = importlib.import_module("galaxy.config")
    doctor = importlib.import_module("galaxy.doctor")
    try:
        cfg = _load_config(args)
    except config.ConfigError as err:
        return _fail(str(err), EXIT_USAGE)
    checks = doctor.run(cfg)
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        _print_json({"ok": not failed, "checks": doctor.as_json(checks)})
        return EXIT_FAIL if failed else EXIT_OK
    console = _console()
    for c in checks:
        console.print(f"[{_DOCTOR_STYLE[c.status]}]{c.status:>4}[/]  {_esc(c.name)}: {_esc(c.detail)}")
        if c.fix and c.status != "ok":
            console.print(f"      fix: {_esc(c.fix)}")
    bad = sum(c.status != "ok" for c in checks)
    console.print("all checks passed" if not bad else f"{bad} check(s) need attention")
    return EXIT_FAIL if failed else EXIT_OK


def _add_doctor_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check this machine and node, and say what to fix",
                       description="Checks ports, multicast route, cluster key, data dir, disk space, "
                                   "address-space limit, peers and clock skew for the node these flags "
                                   "describe (the same flags, env and file as `galaxy up`).",
                       argument_default=argparse.SUPPRESS)
    _add_node_flags(p)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)


# ---------------------------------------------------------------------------------------
# galaxy keygen

def cmd_keygen(args: argparse.Namespace) -> int:
    wire = importlib.import_module("galaxy.wire")
    print(wire.generate_key())
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# client commands

def _console(file: TextIO | None = None) -> Any:
    from rich.console import Console

    out = file or sys.stdout
    width = None
    if not (hasattr(out, "isatty") and out.isatty()) and not os.environ.get("COLUMNS"):
        width = 200      # piped output: do not fold tables at rich's default 80 columns
    # rich turns colour off when `out` is not a terminal and honours NO_COLOR itself;
    # passing no_color explicitly keeps that true whatever rich's version does.
    return Console(file=out, width=width, highlight=False,
                   no_color=True if os.environ.get("NO_COLOR") else None)


def _client(args: argparse.Namespace) -> Client:
    from galaxy.cli_ledger import client_token     # GALAXY_API_TOKEN, else the token `galaxy login` kept

    try:
        client = Client(args.addr, tls_fingerprint=getattr(args, "tls_fingerprint", None),
                        cacert=getattr(args, "cacert", None))
    except ClientError as err:
        raise SystemExit(_fail(err.message, EXIT_USAGE)) from None
    client.token = client_token(client.addr)
    return client


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _client_command(path: str, render: Callable[[Any, Any], None]) -> Callable[[argparse.Namespace], int]:
    def once(args: argparse.Namespace, console: Any) -> int:
        try:
            data = _client(args).get(path)
        except ClientError as err:
            return _fail(err.message)
        if args.json:
            _print_json(data)
        else:
            render(data, console)
        return EXIT_OK

    def run(args: argparse.Namespace) -> int:
        interval_s = getattr(args, "watch", None)
        if interval_s is None:
            return once(args, _console())
        # --watch: redraw every interval until Ctrl-C; a node that stops answering is
        # reported on the screen and retried, not fatal.
        console = _console()
        while True:
            with console.capture() as frame:
                try:
                    data = _client(args).get(path)
                    if args.json:
                        console.print(json.dumps(data, indent=2), markup=False, highlight=False)
                    else:
                        render(data, console)
                except ClientError as err:
                    console.print(f"{_esc(err.message)}  (retrying every {interval_s:g}s)")
            console.clear()
            console.print(frame.get(), end="", markup=False, highlight=False)
            console.print(f"[dim]{time.strftime('%H:%M:%S')}  every {interval_s:g}s, Ctrl-C to stop[/]")
            time.sleep(interval_s)
    return run


_STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim",
                "pending": "yellow", "scheduled": "cyan", "running": "blue",
                "succeeded": "green", "failed": "red", "timed_out": "red",
                "cancelled": "dim"}


# Control characters (C0, DEL, C1) shown as escapes: text a node serves came from users (a task's
# name, command, reason), and ESC would reach the reader's terminal (a title, the clipboard);
# and so are the invisible ones that reorder or hide what the line shows (bidi controls,
# zero widths, line and paragraph separators)
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))} | {
    c: f"\\u{c:04x}" for c in (0x61c, *range(0x200b, 0x2010), *range(0x2028, 0x202f), *range(0x2066, 0x206a), 0xfeff)}


def _seg(value: str) -> str:
    """A user's argument as one segment of a route's path ("a b", "t-?x" stay one segment)."""
    return urllib.parse.quote(value, safe="")


def _esc(value: Any) -> str:
    """Text from a node, for rich: its markup and control characters shown, not obeyed."""
    from rich.markup import escape

    return escape(("-" if value is None else str(value)).translate(_CONTROLS))


def _styled(value: Any) -> str:
    text = _esc(value)
    style = _STATE_STYLE.get(str(value))
    return f"[{style}]{text}[/{style}]" if style else text


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") or "0"
    if isinstance(value, int):
        return str(value)
    return _esc(value)


def _mem(mb: Any) -> str:
    if isinstance(mb, bool) or not isinstance(mb, (int, float)):
        return _num(mb)
    if abs(mb) >= 1024:
        return f"{mb / 1024:.1f}G"
    return f"{mb:.0f}M"


def _free_total(resources: Any, key: str, fmt: Callable[[Any], str]) -> str:
    if not isinstance(resources, Mapping):
        return "-"
    total = resources.get(key)
    free = resources.get("free")
    if isinstance(free, Mapping) and key in free:
        return f"{fmt(free.get(key))}/{fmt(total)}"
    return fmt(total)


def _task_cap(resources: Any) -> str:
    """" ≤1.0G" when the node caps each task's memory (its hard ulimit -v), else ""."""
    cap = resources.get("task_memory_max_mb") if isinstance(resources, Mapping) else None
    return f" ≤{_mem(cap)}" if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else ""


def _ago(last_heard: Any, now_ms: int) -> str:
    """``last_heard`` as "0.3s ago".

    Accepted forms: Unix epoch milliseconds (the API's form), Unix epoch seconds, or a
    small number of seconds already elapsed; a string is shown as-is.
    """
    if last_heard is None or isinstance(last_heard, bool):
        return "-"
    if not isinstance(last_heard, (int, float)):
        return _esc(last_heard)
    if last_heard >= 1e11:
        seconds = (now_ms - last_heard) / 1000
    elif last_heard >= 1e8:
        seconds = now_ms / 1000 - last_heard
    else:
        seconds = float(last_heard)
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s ago"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _addr(value: Any) -> str:
    if isinstance(value, Mapping):
        return _esc(" ".join(f"{k}={v}" for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return _esc(", ".join(str(v) for v in value))
    return _esc(value)


def render_members(data: Any, console: Any, now_ms: int | None = None) -> None:
    from rich.table import Table

    members = data.get("members") if isinstance(data, Mapping) else None
    if not isinstance(members, list):
        console.print("[red]unexpected answer: no members list[/red]")
        return
    if now_ms is None:
        server_now = data.get("now_ms")
        now_ms = server_now if isinstance(server_now, int) else time.time_ns() // 1_000_000
    capped = any(_task_cap(m.get("resources")) for m in members if isinstance(m, Mapping))
    table = Table(title=f"{len(members)} member{'s' if len(members) != 1 else ''}",
                  title_justify="left", header_style="bold", box=None,
                  padding=(0, 2, 0, 0), pad_edge=False,
                  caption="cpu, mem, gpu: free/total" + ("; ≤N: a task's memory cap (ulimit -v)" if capped else ""),
                  caption_justify="left")
    table.add_column("ID", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("ROLE")
    table.add_column("ADDR", no_wrap=True)
    table.add_column("INC", justify="right")
    table.add_column("CPU", justify="right")
    table.add_column("MEM", justify="right")
    table.add_column("GPU", justify="right")
    table.add_column("HEARD", justify="right")
    for m in members:
        if not isinstance(m, Mapping):
            continue
        res = m.get("resources")
        table.add_row(_esc(m.get("id")), _styled(m.get("state")), _esc(m.get("role")),
                      _addr(m.get("addr")), _num(m.get("incarnation")),
                      _free_total(res, "cpu", _num), _free_total(res, "memory_mb", _mem) + _task_cap(res),
                      _free_total(res, "gpu", _num), _ago(m.get("last_heard"), now_ms))
    console.print(table)


def _leader_line(leader: Any) -> str:
    if not isinstance(leader, Mapping):
        return "[red]unknown[/red]"
    term = _num(leader.get("term"))
    if not leader.get("leader"):
        return f"[yellow]none[/yellow] (term {term}; election in progress or no quorum)"
    http = leader.get("http")
    tail = f"  {_esc(http)}" if http else ""
    return f"[bold]{_esc(leader.get('leader'))}[/bold] (term {term}){tail}"


def render_leader(data: Any, console: Any) -> None:
    console.print(f"coordinator: {_leader_line(data)}")


def _counts(counts: Any) -> str:
    if not isinstance(counts, Mapping):
        return _esc(counts)
    if not counts:
        return "none"
    return " · ".join(f"{_num(v)} {_styled(k)}" for k, v in counts.items())


def _voters(voters: Any, leader_id: Any) -> str:
    if not isinstance(voters, list):
        return _esc(voters)
    names = []
    for v in voters:
        vid = v.get("id") if isinstance(v, Mapping) else v
        mark = " [bold](coordinator)[/bold]" if vid is not None and vid == leader_id else ""
        names.append(_esc(vid) + mark)
    return ", ".join(names) or "none"


def render_status(data: Any, console: Any) -> None:
    from rich.table import Table

    if not isinstance(data, Mapping):
        console.print("[red]unexpected answer: not an object[/red]")
        return
    node = data.get("node") if isinstance(data.get("node"), Mapping) else {}
    leader = data.get("leader")
    leader_id = leader.get("leader") if isinstance(leader, Mapping) else None
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    node_bits = [f"[bold]{_esc(node.get('id'))}[/bold]"]
    if node.get("role") is not None:
        node_bits.append(f"role {_esc(node.get('role'))}")
    if node.get("version") is not None:
        node_bits.append(f"v{_esc(node.get('version'))}")
    if node.get("http"):
        node_bits.append(_esc(node.get("http")))
    table.add_row("node", "  ".join(node_bits))
    if node.get("cluster") is not None:
        table.add_row("cluster", _esc(node.get("cluster")))
    table.add_row("coordinator", _leader_line(leader))
    if "voters" in data:
        table.add_row("voters", _voters(data.get("voters"), leader_id))
    if "members" in data:
        table.add_row("members", _counts(data.get("members")))
    if "tasks" in data:
        tasks = data.get("tasks")
        # only the states that have tasks: seven zeros would hide the one that matters
        shown = {k: v for k, v in tasks.items() if v} if isinstance(tasks, Mapping) else tasks
        table.add_row("tasks", _counts(shown))
    scheduler = data.get("scheduler")
    if isinstance(scheduler, Mapping):
        bits = [f"{_num(scheduler.get('waiting'))} waiting to be placed"]
        draining = scheduler.get("draining")
        if isinstance(draining, list) and draining:
            bits.append("draining " + ", ".join(_esc(d) for d in draining))
        table.add_row("scheduler", " · ".join(bits))
    ledger = data.get("ledger")
    if isinstance(ledger, Mapping):
        bits = []
        for key, label in (("applied_seq", "applied seq"), ("total_supply", "total supply"),
                           ("pending", "pending")):
            if key in ledger:
                bits.append(f"{label} {_num(ledger.get(key))}")
        if ledger.get("hash"):
            bits.append(f"hash {_esc(str(ledger.get('hash'))[:16])}")
        table.add_row("ledger", " · ".join(bits) or "-")
    if "conflicts_resolved" in data:
        table.add_row("conflicts", f"{_num(data.get('conflicts_resolved'))} resolved")
    config = data.get("config")
    if isinstance(config, Mapping):
        settings = config.get("settings") if isinstance(config.get("settings"), Mapping) else {}
        table.add_row("config", f"version {_num(config.get('version'))} · {len(settings)} cluster setting"
                                f"{'' if len(settings) == 1 else 's'}"
                                + (f" · [yellow]{len(config['not_applied'])} not applied here[/yellow]"
                                   if config.get("not_applied") else ""))
    warnings = data.get("warnings")
    if isinstance(warnings, list):
        for w in warnings:
            table.add_row("[yellow]warning[/yellow]", f"[yellow]{_esc(w)}[/yellow]")
    console.print(table)


def _add_client_parser(sub: Any, name: str, help_text: str,
                       func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--addr", default=os.environ.get("GALAXY_ADDR") or DEFAULT_ADDR,
                   help=f"node HTTP address (env GALAXY_ADDR, default {DEFAULT_ADDR})")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--tls-fingerprint", metavar="SHA256", default=os.environ.get("GALAXY_TLS_FINGERPRINT") or None,
                   help="trust the https node whose certificate has this SHA-256 (env GALAXY_TLS_FINGERPRINT)")
    p.add_argument("--cacert", metavar="FILE", default=os.environ.get("GALAXY_CACERT") or None,
                   help="verify the https node's certificate with this CA bundle (env GALAXY_CACERT)")
    p.set_defaults(func=func)
    return p


def _watch_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 3600 seconds, got {text}")
    return value


# ---------------------------------------------------------------------------------------
# galaxy dev

DEV_NODES_MAX = 32
DEV_READY_TIMEOUT_S = 60.0
DEV_STOP_TIMEOUT_S = 10.0
DEV_POLL_S = 0.2
DEV_SIGN_IN_TIMEOUT_S = 15.0   # the first coordinator opens the admin account within a second or two
DEV_PROGRESS_EVERY_S = 5.0
DEV_LOG_TAIL_LINES = 20
DEV_PORT_ATTEMPTS_MAX = 200
DEV_PREFERRED_HTTP_PORT = 8000
DEV_LAYOUT_FILE = "dev-mesh.json"      # in a kept --data-dir: each node's ports, taken again next run


@dataclasses.dataclass
class DevNode:
    name: str
    http_port: int
    gossip_port: int
    raft_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    gone: bool = False             # exited and already reported
    last_reason: str = "starting"
    tls: bool = False              # serves HTTPS with the certificate `--tls auto` keeps in its data dir

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def fingerprint(self) -> str | None:
        """The SHA-256 of the node's certificate (read from its data dir), once it has one."""
        from galaxy import tls
        try:
            pem = (self.data_dir / tls.CERT_FILE).read_bytes()
        except OSError:
            return None
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        try:
            der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        except ValueError:         # being written
            return None
        return tls.fingerprint_text(tls.cert_fingerprint(der))

    def client(self, timeout_s: float = 10.0) -> Client:
        """A client that trusts exactly this node's certificate (dev made it: no first-use prompt)."""
        return Client(self.url, timeout_s=timeout_s, tls_fingerprint=self.fingerprint() if self.tls else None)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "galaxy.log"


class _PortPicker:
    """Reserves distinct free loopback ports by holding them bound until ``release()``."""

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def _hold(self, kind: int, port: int) -> int | None:
        s = socket.socket(socket.AF_INET, kind)
        if kind == socket.SOCK_STREAM:
            # as the nodes' servers bind: a port whose last connections linger in TIME_WAIT
            # (the previous run's, on a kept data dir) is free for them, so it is free here
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            return None
        self._held.append(s)
        return int(s.getsockname()[1])

    def tcp(self, preferred: int = 0) -> int:
        if preferred:
            port = self._hold(socket.SOCK_STREAM, preferred)
            if port is not None:
                return port
        for _ in range(DEV_PORT_ATTEMPTS_MAX):
            port = self._hold(socket.SOCK_STREAM, 0)
            if port is not None:
                return port
        raise OSError("no free TCP port on 127.0.0.1")

    def tcp_and_udp(self, preferred: int = 0) -> int:
        """A port free for both TCP and UDP (gossip listens on both)."""
        if preferred and self._hold(socket.SOCK_STREAM, preferred) is not None \
                and self._hold(socket.SOCK_DGRAM, preferred) is not None:
            return preferred
        for _ in range(DEV_PORT_ATTEMPTS_MAX):
            port = self._hold(socket.SOCK_STREAM, 0)
            if port is not None and self._hold(socket.SOCK_DGRAM, port) is not None:
                return port
        raise OSError("no port free for both TCP and UDP on 127.0.0.1")

    def free_now(self, port: int) -> bool:
        return self._hold(socket.SOCK_STREAM, port) is not None

    def release(self) -> None:
        for s in self._held:
            s.close()
        self._held.clear()


def _local_profile_env() -> dict[str, str]:
    """GALAXY_<FIELD> for every field where Config.local() differs from the LAN profile."""
    config = importlib.import_module("galaxy.config")
    return config.profile_env(config.Config.local(), skip=_DEV_OWNED_FIELDS)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _child_env(cluster_key: str) -> dict[str, str]:
    owned = {f"GALAXY_{name.upper()}" for name in _DEV_OWNED_FIELDS} | _DEV_DROPPED_ENV
    env = {k: v for k, v in os.environ.items() if k not in owned}
    for key, value in _local_profile_env().items():
        env.setdefault(key, value)        # an explicit GALAXY_* tweak from the user wins
    env["GALAXY_CLUSTER_KEY"] = cluster_key   # env, not argv: argv is world-readable in ps
    # Children must run this very code even when the CLI runs from a source checkout.
    root = _package_root()
    installed = {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"         # logs reach galaxy.log as they happen
    return env


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGTERM if `galaxy dev` dies (even by kill -9)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG
        if os.getppid() != parent:        # the parent died before prctl took effect
            os._exit(1)

    return hook


def _tail(path: Path, lines: int = DEV_LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


class DevMesh:
    """Supervises N `galaxy up` processes on loopback: start, wait ready, watch, stop."""

    def __init__(self, nodes: int, data_dir: str | None, voters: int | None, cluster: str,
                 http_port: int | None, ready_timeout_s: float, out: TextIO, tls: bool = False) -> None:
        self.count = nodes
        self.tls = tls
        self.voters = voters
        self.cluster = cluster
        self.first_http_port = http_port
        self.ready_timeout_s = ready_timeout_s
        self.out = out
        self.keep_dir = data_dir is not None
        self.root = Path(data_dir).resolve() if data_dir else None
        self.nodes: list[DevNode] = []
        self.stop_requests = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- signals ---------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requests += 1
        if self.stop_requests > 1:        # a second Ctrl-C: stop waiting politely
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is None:
                    try:
                        n.proc.kill()
                    except OSError:
                        pass

    def run(self) -> int:
        previous: dict[int, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[sig] = signal.signal(sig, self._on_signal)
                except ValueError:        # not the main thread: the caller handles signals
                    pass
            return self._run()
        finally:
            self._stop_all()
            self._remove_temp_dir()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        try:
            self._prepare()
        except OSError as err:
            self.say(f"{PROG} dev: cannot prepare the mesh: {err}")
            return EXIT_FAIL
        self._start_all()
        if not any(n.proc for n in self.nodes):
            return EXIT_FAIL
        self._wait_ready()
        if self.stop_requests:
            return EXIT_OK
        if not self._alive():
            self.say(f"{PROG} dev: every node has exited; see the logs above")
            return EXIT_FAIL
        first = self.nodes[0]
        self._pin_certificates()
        self._sign_in(first)
        addr_hint = "" if first.http_port == DEV_PREFERRED_HTTP_PORT and not self.tls else f" --addr {first.url}"
        self.say(f"\ntry: galaxy status{addr_hint}   (or: galaxy members{addr_hint})")
        self.say("press Ctrl-C to stop the mesh")
        while not self.stop_requests:
            self._reap()
            if not self._alive():
                self.say(f"{PROG} dev: every node has exited; stopping")
                return EXIT_FAIL
            time.sleep(DEV_POLL_S)
        return EXIT_OK

    def _pin_certificates(self) -> None:
        """With --tls: pin each node's certificate for the CLI (replacing an older dev mesh's pin)."""
        if not self.tls:
            return
        from galaxy import client_tls, tls
        for n in self.nodes:
            fp = n.fingerprint()
            if fp is not None:
                client_tls.pin(n.url, tls.parse_fingerprint(fp))
        self.say(f"pinned the nodes' TLS certificates in {client_tls.known_nodes_path()}")

    def _sign_in(self, node: DevNode) -> None:
        """Sign the local user in as the mesh's admin (token stored for every node's address)."""
        from galaxy import cli_ledger
        deadline = time.monotonic() + DEV_SIGN_IN_TIMEOUT_S
        while time.monotonic() < deadline and not self.stop_requests:
            try:
                answer = node.client().post("/v1/auth/token", {"name": "admin", "password": self.admin_password})
            except ClientError as err:
                if err.status in (404, 405):   # a node without a ledger: nothing to sign in to
                    return
                time.sleep(0.2)          # the admin account is opened a moment after the coordinator
                continue
            for n in self.nodes:
                cli_ledger.save_token(n.url, answer["token"], "admin", answer.get("expires_at_ms", 0))
            self.say("signed in as admin of this mesh (galaxy balance, galaxy mint … work now)")
            return
        self.say("could not sign in as admin yet: run `galaxy login admin` later")

    # -- setup -----------------------------------------------------------------------
    def _prepare(self) -> None:
        wire = importlib.import_module("galaxy.wire")
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="galaxy-dev-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.cluster_key = self._cluster_key(wire)
        self.env = _child_env(self.cluster_key)
        # The throw-away mesh's admin password: the CLI signs the local user in with it, so
        # a newcomer's first `galaxy balance` or `galaxy mint` just works (DESIGN.md section 4).
        self.admin_password = self.env.setdefault("GALAXY_ADMIN_PASSWORD", secrets.token_urlsafe(16))
        picker = _PortPicker()
        layout = self._last_layout()
        try:
            for i in range(1, self.count + 1):
                name, data_dir = f"dev-{i}", self.root / f"dev-{i}"
                last = layout.get(name, {})
                if i == 1:
                    http = self._first_http(picker, last.get("http", 0))
                else:
                    http = picker.tcp(preferred=last.get("http", 0))
                node = DevNode(name=name, http_port=http, gossip_port=picker.tcp_and_udp(last.get("gossip_port", 0)),
                               raft_port=self._raft_port(picker, name, last.get("raft_port", 0)),
                               data_dir=data_dir, tls=self.tls)
                node.data_dir.mkdir(parents=True, exist_ok=True)
                self.nodes.append(node)
        finally:
            picker.release()               # the children bind them a moment later
        if self.keep_dir:
            self._save_layout()

    def _last_layout(self) -> dict[str, dict[str, int]]:
        """node name -> the ports it had in the last run on this kept data dir, to have again."""
        if not self.keep_dir:
            return {}
        assert self.root is not None
        try:
            doc = json.loads((self.root / DEV_LAYOUT_FILE).read_text())
            return {str(name): {k: int(v) for k, v in ports.items() if k in ("http", "gossip_port", "raft_port")}
                    for name, ports in doc["nodes"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _save_layout(self) -> None:
        assert self.root is not None
        doc = {"nodes": {n.name: {"http": n.http_port, "gossip_port": n.gossip_port, "raft_port": n.raft_port}
                         for n in self.nodes}}
        tmp = self.root / (DEV_LAYOUT_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.root / DEV_LAYOUT_FILE)

    @staticmethod
    def _raft_port(picker: _PortPicker, name: str, last: int) -> int:
        # The Raft group knows its members by address: a node of a kept data dir that came
        # back on another port would never be heard again, and no coordinator be elected.
        if not last:
            return picker.tcp()
        if not picker.free_now(last):
            raise OSError(f"{name}'s Raft port {last} (from the last run in this data dir) is in use; the mesh "
                          f"knows {name} by it: free it, or use another --data-dir")
        return last

    def _first_http(self, picker: _PortPicker, last: int = 0) -> int:
        if self.first_http_port is None:
            return picker.tcp(preferred=last or DEV_PREFERRED_HTTP_PORT)
        if self.first_http_port == 0:
            return picker.tcp()
        if not picker.free_now(self.first_http_port):
            raise OSError(f"HTTP port {self.first_http_port} is in use")
        return self.first_http_port

    def _cluster_key(self, wire: Any) -> str:
        # A kept data dir remembers its key: the nodes' stores are bound to it, so a
        # fresh key on restart would lock them out of their own state.
        assert self.root is not None
        key_path = self.root / "cluster.key"
        if self.keep_dir and key_path.exists():
            return key_path.read_text().strip()
        key = str(wire.generate_key())
        if self.keep_dir:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
        return key

    def _argv(self, node: DevNode) -> list[str]:
        argv = [sys.executable, "-m", "galaxy", "up",
                "--node-id", node.name, "--cluster", self.cluster,
                "--bind", "127.0.0.1", "--advertise", "127.0.0.1",
                "--http-port", str(node.http_port), "--gossip-port", str(node.gossip_port),
                "--raft-port", str(node.raft_port), "--data-dir", str(node.data_dir),
                "--no-mdns", "--no-broadcast"]
        if self.voters is not None:
            argv += ["--voters", str(self.voters)]
        if self.tls:
            argv += ["--tls", "auto"]
        if node is not self.nodes[0]:
            argv += ["--join", f"127.0.0.1:{self.nodes[0].gossip_port}"]
        return argv

    def _start_all(self) -> None:
        self.say(f"{PROG} dev: starting {self.count} node{'s' if self.count != 1 else ''} "
                 f"of cluster '{self.cluster}' in {self.root}")
        hook = _die_with_parent_hook()
        for node in self.nodes:
            if self.stop_requests:
                return
            argv = self._argv(node)
            try:
                with open(node.log_path, "ab") as log:
                    log.write(f"--- galaxy dev {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                              f"{' '.join(argv[1:])}\n".encode())
                    log.flush()
                    node.proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        env=self.env, cwd=node.data_dir,
                        # Own session: the terminal's Ctrl-C reaches only us, and we stop
                        # the children in order; the death signal covers our own crash.
                        start_new_session=True, preexec_fn=hook)
            except OSError as err:
                node.gone = True
                self.say(f"  {node.name}  could not start: {err}")
                continue
            self.say(f"  {node.name}  {node.url}  gossip 127.0.0.1:{node.gossip_port}  "
                     f"raft 127.0.0.1:{node.raft_port}  log {node.log_path}")

    # -- watching --------------------------------------------------------------------
    def _alive(self) -> list[DevNode]:
        return [n for n in self.nodes if n.proc is not None and not n.gone]

    def _reap(self) -> None:
        for node in self.nodes:
            if node.proc is None or node.gone:
                continue
            code = node.proc.poll()
            if code is None:
                continue
            node.gone = True
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            self.say(f"{PROG} dev: {node.name} {how}; the others keep running. "
                     f"Last lines of {node.log_path}:")
            for line in _tail(node.log_path):
                self.say(f"    {line}")

    def _wait_ready(self) -> None:
        self.say(f"waiting for the nodes to be ready (up to {self.ready_timeout_s:g}s)…")
        start = time.monotonic()
        deadline = start + self.ready_timeout_s
        next_progress = start + DEV_PROGRESS_EVERY_S
        while not self.stop_requests:
            self._reap()
            waiting = [n for n in self._alive() if not n.ready]
            if not waiting:
                break
            for node in waiting:
                self._probe(node, start)
            now = time.monotonic()
            if all(n.ready for n in self._alive()):
                break
            if now >= deadline:
                late = ", ".join(f"{n.name} ({n.last_reason})" for n in self._alive()
                                 if not n.ready)
                self.say(f"{PROG} dev: not ready after {self.ready_timeout_s:g}s: {late}; "
                         "leaving them running — check their logs")
                break
            if now >= next_progress:
                late = ", ".join(f"{n.name} ({n.last_reason})" for n in self._alive()
                                 if not n.ready)
                self.say(f"  still waiting ({now - start:.0f}s): {late}")
                next_progress = now + DEV_PROGRESS_EVERY_S
            time.sleep(DEV_POLL_S)
        ready = sum(1 for n in self.nodes if n.ready)
        if ready and not self.stop_requests:
            self.say(f"{ready} of {self.count} nodes ready")

    def _probe(self, node: DevNode, start: float) -> None:
        try:
            if node.tls and node.fingerprint() is None:
                raise ClientError("no certificate yet")
            node.client(timeout_s=1.0).get("/readyz")
        except ClientError as err:
            if err.status is None:
                node.last_reason = "starting"
            elif isinstance(err.body, Mapping) and err.body.get("reason"):
                node.last_reason = str(err.body["reason"])[:120]
            else:
                node.last_reason = f"HTTP {err.status}"
            return
        node.ready = True
        self.say(f"  {node.name} ready after {time.monotonic() - start:.1f}s")

    # -- teardown --------------------------------------------------------------------
    def _stop_all(self) -> None:
        running = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        if not running:
            return
        self.say(f"stopping {len(running)} node{'s' if len(running) != 1 else ''}…")
        for n in running:
            try:
                n.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            except OSError:
                pass
        deadline = time.monotonic() + DEV_STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(n.proc.poll() is None for n in running):  # type: ignore[union-attr]
            time.sleep(0.05)
        for n in running:
            assert n.proc is not None
            if n.proc.poll() is None:
                self.say(f"  {n.name} did not stop within {DEV_STOP_TIMEOUT_S:g}s; killing it")
                try:
                    n.proc.kill()
                except OSError:
                    pass
            try:
                n.proc.wait(timeout=DEV_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.say(f"  {n.name} (pid {n.proc.pid}) did not die")
        self.say("stopped")

    def _remove_temp_dir(self) -> None:
        if self.root is not None and not self.keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def cmd_dev(args: argparse.Namespace) -> int:
    if args.nodes > DEV_NODES_MAX:
        return _fail(f"--nodes: at most {DEV_NODES_MAX}, got {args.nodes}", EXIT_USAGE)
    mesh = DevMesh(nodes=args.nodes, data_dir=args.data_dir, voters=args.voters,
                   cluster=args.cluster, http_port=args.http_port,
                   ready_timeout_s=args.ready_timeout, out=sys.stdout, tls=args.tls)
    return mesh.run()


def _add_dev_parser(sub: Any) -> None:
    p = sub.add_parser("dev", help="run a whole local mesh on loopback, for trying it out",
                       description="Start N `galaxy up` processes on 127.0.0.1 that form one "
                                   "mesh (shared fresh cluster key, local timings). Ctrl-C "
                                   "stops them all.")
    p.add_argument("--nodes", type=_positive_int, default=3, metavar="N",
                   help="number of nodes (default 3)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="keep the nodes' state under DIR (default: a temp dir removed at exit)")
    p.add_argument("--voters", type=_positive_int, metavar="V", help="Raft voter group size")
    p.add_argument("--cluster", default="dev", metavar="NAME", help="cluster name (default dev)")
    p.add_argument("--http-port", type=_port, metavar="PORT",
                   help="first node's HTTP port (default 8000 when free; 0 = any free port)")
    p.add_argument("--tls", action="store_true",
                   help="nodes serve HTTPS with self-signed certificates (pinned for this CLI)")
    p.add_argument("--ready-timeout", type=float, default=DEV_READY_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long to wait for the nodes to be ready (default {DEV_READY_TIMEOUT_S:g})")
    p.set_defaults(func=cmd_dev)


# ---------------------------------------------------------------------------------------
# entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Galaxy: a peer-to-peer compute mesh.")
    parser.add_argument("--version", action="version", version=f"galaxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_up_parser(sub)
    _add_dev_parser(sub)
    status = _add_client_parser(sub, "status", "the cluster as a node sees it",
                                _client_command("/v1/status", render_status))
    status.add_argument("--watch", nargs="?", const=2.0, type=_watch_seconds, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    _add_client_parser(sub, "members", "every member of the mesh",
                       _client_command("/v1/members", render_members))
    _add_client_parser(sub, "leader", "the current coordinator (Raft leader)",
                       _client_command("/v1/leader", render_leader))
    from galaxy import cli_config, cli_ledger, cli_recover, cli_security, cli_tasks
    cli_tasks.add_parsers(sub)
    cli_ledger.add_parsers(sub)
    cli_config.add_parsers(sub)
    cli_security.add_parsers(sub)
    cli_recover.add_parsers(sub)
    _add_doctor_parser(sub)
    kg = sub.add_parser("keygen", help="print a new cluster key")
    kg.set_defaults(func=cmd_keygen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # `galaxy members | head`: the reader left; not an error
        try:                         # keep the interpreter's final flush from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
