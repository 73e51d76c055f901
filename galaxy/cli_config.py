"""CLI commands for cluster-wide settings: ``galaxy config list | get KEY | set KEY VALUE... | unset KEY...``.

Theory of operation: each command is one HTTP call to any node (``galaxy.client``) and a
rendering with rich.  The node validates (the value by its field's own rule, the key as
cluster-wide, not node-local) and commits the change through the coordinator; the CLI
passes the values as the text the user typed.
"""

from __future__ import annotations

import argparse
from typing import Any

from galaxy.cli import EXIT_OK, EXIT_USAGE, _add_client_parser, _client, _console, _esc, _fail, _print_json, _seg
from galaxy.client import ClientError


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        return EXIT_OK, _client(args).request(method, path, body=body)
    except ClientError as err:
        return _fail(err.message), None


def cmd_list(args: argparse.Namespace) -> int:
    code, data = _call(args, "GET", "/v1/config")
    if code != EXIT_OK:
        return code
    if args.json:
        _print_json(data)
        return EXIT_OK
    from rich.table import Table

    console = _console()
    table = Table(title=f"cluster settings, version {_esc(data.get('version'))} (as node {_esc(data.get('node'))} "
                        "runs them)", title_justify="left")
    for col in ("key", "value", "source"):
        table.add_column(col)
    for key, v in sorted((data.get("values") or {}).items()):
        source = v.get("source")
        table.add_row(_esc(key), _esc(v.get("value")), "[bold]cluster[/bold]" if source == "cluster" else _esc(source))
    console.print(table)
    for key, why in (data.get("not_applied") or {}).items():
        console.print(f"[yellow]not applied here: {_esc(key)}: {_esc(why)}[/yellow]")
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    code, data = _call(args, "GET", f"/v1/config/{_seg(args.key)}")
    if code != EXIT_OK:
        return code
    if args.json:
        _print_json(data)
    else:
        print(data.get("value"))
    return EXIT_OK


def _report(args: argparse.Namespace, data: Any, what: str) -> int:
    if args.json:
        _print_json(data)
        return EXIT_OK
    here = "applied here" if data.get("applied_here") else "not yet applied on this node"
    if not data.get("changed", True):
        here = "no change"
    _console().print(f"{what} (cluster settings version {_esc(data.get('version'))}; {here})")
    return EXIT_OK


def cmd_set(args: argparse.Namespace) -> int:
    pairs = list(args.pairs)
    if len(pairs) % 2:
        return _fail("set takes KEY VALUE pairs: galaxy config set KEY VALUE [KEY VALUE ...]", EXIT_USAGE)
    values = dict(zip(pairs[::2], pairs[1::2]))
    if len(values) == 1:
        (key, value), = values.items()
        code, data = _call(args, "PUT", f"/v1/config/{_seg(key)}", {"value": value})
    else:
        code, data = _call(args, "PATCH", "/v1/config", {"set": values})
    if code != EXIT_OK:
        return code
    settings = data.get("settings") or {}
    return _report(args, data, ", ".join(f"{k} = {settings.get(k, v)}" for k, v in values.items()))


def cmd_unset(args: argparse.Namespace) -> int:
    code, data = _call(args, "PATCH", "/v1/config", {"unset": list(args.keys)})
    if code != EXIT_OK:
        return code
    return _report(args, data, ", ".join(args.keys) + " unset: each node runs its own value")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("config", help="cluster-wide settings: list, get, set, unset",
                       description="Settings that must agree across the mesh, set once and applied live on every "
                                   "node (docs/config.md).  A cluster setting overrides a node's own value.")
    actions = p.add_subparsers(dest="config_action", metavar="ACTION")
    p.set_defaults(func=lambda _args: (p.print_help(), EXIT_USAGE)[1])
    _add_client_parser(actions, "list", "every cluster-wide key, its value here and where it comes from", cmd_list)
    g = _add_client_parser(actions, "get", "one setting's value on this node", cmd_get)
    g.add_argument("key")
    s = _add_client_parser(actions, "set", "set KEY to VALUE on every node (committed through the coordinator)",
                           cmd_set)
    s.add_argument("pairs", nargs="+", metavar="KEY VALUE")
    u = _add_client_parser(actions, "unset", "give KEY back to each node's own value", cmd_unset)
    u.add_argument("keys", nargs="+", metavar="KEY")
