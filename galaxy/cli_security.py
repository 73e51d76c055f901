"""CLI commands for join tokens and the keyring (docs/security.md).

    galaxy token create [--ttl 5m] [--role worker|coordinator]
    galaxy keyring list | install KEY | use KEY [--force] | remove KEY
    galaxy tls pins | forget ADDR        (this machine's pinned node certificates)

Theory of operation: each command is one HTTP call to any node (``galaxy.client``) with
the caller's sign-in token (``GALAXY_API_TOKEN``, or the one ``galaxy login`` kept), and
a plain rendering.  ``token create`` prints the token alone on its last line, so scripts
can take it with ``tail -1``.  KEY may be given as ``-`` to read it from stdin, which
keeps it out of ``ps`` and shell history.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from galaxy.cli import EXIT_OK, EXIT_USAGE, _add_client_parser, _print_json
from galaxy.cli_config import _call

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)?$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}


def parse_ttl_ms(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 5m, 2h")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def cmd_token_create(args: argparse.Namespace) -> int:
    code, data = _call(args, "POST", "/v1/join/tokens", {"ttl_ms": args.ttl, "role": args.role})
    if code != EXIT_OK:
        return code
    if args.json:
        _print_json(data)
        return EXIT_OK
    print(f"# one-time join token, role {data['role']}, valid {args.ttl // 1000} s; seeds "
          f"{', '.join(data['seeds'])}\n# on the new machine: galaxy up --token TOKEN", file=sys.stderr)
    print(data["token"], flush=True)
    return EXIT_OK


def cmd_keyring_list(args: argparse.Namespace) -> int:
    code, data = _call(args, "GET", "/v1/keyring")
    if code != EXIT_OK:
        return code
    if args.json:
        _print_json(data)
        return EXIT_OK
    print(f"keyring version {data['version']} on {data['node']}: primary {data['primary']}")
    members = data.get("members") or {}
    for fp in data["installed"]:
        having = sum(1 for v in members.values() if fp in (v.get("installed") or []))
        primary = sum(1 for v in members.values() if v.get("primary") == fp)
        print(f"  {fp}  installed on {having}/{len(members)} members, primary on {primary}")
    for node_id, v in sorted(members.items()):
        if "error" in v:
            print(f"  {node_id}: no answer ({v['error']})")
    return EXIT_OK


def _key_arg(text: str) -> str:
    return sys.stdin.readline().strip() if text == "-" else text


def _change(op: str):
    def run(args: argparse.Namespace) -> int:
        body = {"op": op, "key": _key_arg(args.key)}
        if getattr(args, "force", False):
            body["force"] = True
        code, data = _call(args, "POST", "/v1/keyring", body)
        if code != EXIT_OK:
            return code
        if args.json:
            _print_json(data)
        else:
            here = "applied here" if data.get("applied_here") else "not yet applied on this node"
            print(f"{op} {data['fingerprint']}: keyring version {data['version']} ({here}); "
                  f"installed {', '.join(data['installed'])}")
        return EXIT_OK
    return run


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("token", help="one-time join tokens: create",
                       description="A token lets one new machine join with `galaxy up --token TOKEN`.")
    t.set_defaults(func=lambda _args: (t.print_help(), EXIT_USAGE)[1])
    ta = t.add_subparsers(dest="token_action", metavar="ACTION")
    c = _add_client_parser(ta, "create", "print a new one-time join token", cmd_token_create)
    c.add_argument("--ttl", type=parse_ttl_ms, default=5 * 60_000, help="how long it is valid (default 5m)")
    c.add_argument("--role", choices=("worker", "coordinator"), default="coordinator",
                   help="worker: the new node never votes; coordinator: it may (default)")

    k = sub.add_parser("keyring", help="rotate the cluster key: list, install, use, remove",
                       description="Keys every node accepts, and the primary one they send with (docs/security.md).")
    k.set_defaults(func=lambda _args: (k.print_help(), EXIT_USAGE)[1])
    ka = k.add_subparsers(dest="keyring_action", metavar="ACTION")
    _add_client_parser(ka, "list", "installed keys (fingerprints) on every member", cmd_keyring_list)
    for op, help_text in (("install", "accept KEY everywhere (KEY or - for stdin; make one with galaxy keygen)"),
                          ("use", "send with KEY everywhere (it must be installed on every member)"),
                          ("remove", "forget KEY everywhere (not the primary one)")):
        p = _add_client_parser(ka, op, help_text, _change(op))
        p.add_argument("key", metavar="KEY")
        if op == "use":
            p.add_argument("--force", action="store_true", help="even if some member has not installed it")

    tl = sub.add_parser("tls", help="certificates this CLI pinned: pins, forget ADDR",
                        description="Self-signed node certificates are pinned on first use in "
                                    "~/.config/galaxy/known_nodes.json (docs/security.md).")
    tl.set_defaults(func=lambda _args: (tl.print_help(), EXIT_USAGE)[1])
    tla = tl.add_subparsers(dest="tls_action", metavar="ACTION")
    tla.add_parser("pins", help="list the pinned addresses and fingerprints").set_defaults(func=cmd_tls_pins)
    f = tla.add_parser("forget", help="drop the pin of ADDR (after the node's certificate was replaced)")
    f.add_argument("addr", metavar="ADDR", help="https://HOST:PORT as pinned")
    f.set_defaults(func=cmd_tls_forget)


def cmd_tls_pins(args: argparse.Namespace) -> int:
    from galaxy import client_tls
    pins = client_tls.load_pins()
    for addr, entry in sorted(pins.items()):
        print(f"{addr}  SHA256 {entry['sha256']}")
    if not pins:
        print(f"no pins in {client_tls.known_nodes_path()}", file=sys.stderr)
    return EXIT_OK


def cmd_tls_forget(args: argparse.Namespace) -> int:
    from galaxy import client_tls
    from galaxy.cli import _fail
    from galaxy.client import ClientError, normalize_addr
    try:
        addr = normalize_addr(args.addr)
    except ClientError as err:
        return _fail(err.message, EXIT_USAGE)
    if not client_tls.forget(addr):
        return _fail(f"no pin for {addr} in {client_tls.known_nodes_path()}")
    print(f"forgot the pinned certificate of {addr}; the next connection pins the one it is shown")
    return EXIT_OK
