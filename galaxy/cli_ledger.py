"""CLI commands for the token ledger: account create, login, logout, balance, transfer, history, mint, burn.

Theory of operation: each command is one or two HTTP calls (``galaxy.client``) and a short
rendering; the node authenticates, authorises and validates everything.  What is the CLI's
own is sign-in state: ``galaxy login`` keeps the bearer token in the user's config dir,

    $XDG_CONFIG_HOME/galaxy/token.json   (default ~/.config/galaxy/token.json)
    {"tokens": {"http://host:port": {"token", "account", "expires_at_ms"}}}

keyed by the node address it was obtained from, and every client command (``_client()``
in ``galaxy.cli``) sends the token for its ``--addr``.  ``GALAXY_API_TOKEN`` in the environment
overrides the file (scripts and CI, like ``GH_TOKEN`` for gh).  It is not ``GALAXY_TOKEN``:
that is ``galaxy up``'s one-time *join* token (config field ``token``), and one variable
meaning both would hand a node a bearer token to join with, or a server a join token.

Invariants:

* The token file is created with mode 0600 inside a 0700 directory and replaced
  atomically (write a temp file, fsync, rename), so it is never world-readable and never
  half-written; an unreadable or malformed file counts as "signed in nowhere".
* A password is read with getpass (twice, to confirm, for a new one) or as one line from
  stdin with ``--password-stdin``; it is never a command-line argument (``ps``, shell
  history) and never printed.  Neither is a token.
* ``galaxy transfer`` always sends an idempotency key (random unless ``--key``) and prints
  it first, so a transfer whose answer was lost can be retried with the same key and
  moves money at most once.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import secrets
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from galaxy.cli import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, _add_client_parser, _client, _console, _esc, _fail,
                        _positive_int, _print_json)
from galaxy.client import Client, ClientError, normalize_addr
from galaxy.user_files import config_path, read_table, write_private

TOKEN_ENV = "GALAXY_API_TOKEN"
TOKEN_FILE = "token.json"
TOKENS_MAX = 64                 # addresses remembered; the oldest sign-in goes first
TOKEN_FILE_BYTES_MAX = 1 << 20


# ---------------------------------------------------------------- the token file

def token_path(env: Any = None) -> Path:
    return config_path(TOKEN_FILE, env)


def load_tokens(path: Path | None = None) -> dict[str, dict]:
    tokens = read_table(path or token_path(), "tokens", TOKEN_FILE_BYTES_MAX)
    return {a: e for a, e in tokens.items() if isinstance(e.get("token"), str)}


def _save_tokens(tokens: dict[str, dict], path: Path | None = None) -> Path:
    newest = sorted(tokens.items(), key=lambda kv: kv[1].get("signed_in_at_ms", 0))[-TOKENS_MAX:]
    return write_private(path or token_path(), {"tokens": dict(newest)})


def save_token(addr: str, token: str, account: str, expires_at_ms: int, path: Path | None = None) -> Path:
    tokens = load_tokens(path)
    tokens[normalize_addr(addr)] = {"token": token, "account": account, "expires_at_ms": expires_at_ms,
                                    "signed_in_at_ms": int(time.time() * 1000)}
    return _save_tokens(tokens, path)


def forget_token(addr: str, path: Path | None = None) -> bool:
    tokens = load_tokens(path)
    if tokens.pop(normalize_addr(addr), None) is None:
        return False
    _save_tokens(tokens, path)
    return True


def stored_entry(addr: str, path: Path | None = None) -> dict | None:
    try:
        return load_tokens(path).get(normalize_addr(addr))
    except ClientError:
        return None


def client_token(addr: str) -> str | None:
    """The token a client command sends to ``addr``: ``GALAXY_API_TOKEN``, else the stored one."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    entry = stored_entry(addr)
    return entry["token"] if entry else None


def token_account(token: str | None) -> str | None:
    """The account a token names (read, not verified: only the node can verify it)."""
    try:
        payload = token.split(".")[1]               # type: ignore[union-attr]
        sub = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]
    except (AttributeError, IndexError, ValueError, KeyError, TypeError):
        return None
    return sub if isinstance(sub, str) else None


# ---------------------------------------------------------------- helpers

def _read_password(args: argparse.Namespace, confirm: bool) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise ValueError("--password-stdin: no password on standard input")
        return password
    password = getpass.getpass("password: ")
    if confirm and getpass.getpass("password again: ") != password:
        raise ValueError("the two passwords differ")
    if not password:
        raise ValueError("no password given")
    return password


def _me(args: argparse.Namespace, name: str | None) -> str | None:
    return name or token_account(client_token(args.addr))


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None,
          query: dict | None = None) -> tuple[int, Any]:
    try:
        return EXIT_OK, _client(args).request(method, path, body=body, query=query)
    except ClientError as err:
        hint = " — sign in with: galaxy login" if err.status == 401 else ""
        return _fail(err.message + hint), None


def _post_and_say(args: argparse.Namespace, path: str, body: dict, say: Any) -> int:
    """POST ``body``; print the answer (``--json``) or ``say(answer)``."""
    code, data = _call(args, "POST", path, body)
    if code != EXIT_OK:
        return code
    if args.json:
        _print_json(data)
    else:
        print(say(data))
    return EXIT_OK


def _when(ms: Any) -> str:
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or ms <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# ---------------------------------------------------------------- commands

def cmd_account_create(args: argparse.Namespace) -> int:
    try:
        password = _read_password(args, confirm=True)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    return _post_and_say(args, "/v1/accounts", {"name": args.name, "password": password, "role": args.role},
                         lambda d: f"account {d.get('name', args.name)} created (role {d.get('role', args.role)})")


def cmd_login(args: argparse.Namespace) -> int:
    name = args.name
    if not name:
        entry = stored_entry(args.addr)
        name = entry.get("account") if entry else None
    if not name and not args.password_stdin and sys.stdin.isatty():
        name = input("name: ").strip()
    if not name:
        return _fail("which account? galaxy login NAME", EXIT_USAGE)
    try:
        password = _read_password(args, confirm=False)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    try:
        client = Client(args.addr, tls_fingerprint=getattr(args, "tls_fingerprint", None),
                        cacert=getattr(args, "cacert", None))
        data = client.post("/v1/auth/token", {"name": name, "password": password})
    except ClientError as err:
        return _fail(err.message)
    try:
        path = save_token(client.addr, data["token"], data.get("account", name), int(data["expires_at_ms"]))
    except OSError as e:
        return _fail(f"signed in, but could not store the token: {e.strerror or e}")
    if args.json:
        _print_json({k: v for k, v in data.items() if k != "token"} | {"token_file": str(path)})
    else:
        print(f"signed in to {client.addr} as {name} ({data.get('role', '?')}) until "
              f"{_when(data.get('expires_at_ms'))}; token kept in {path}")
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    try:
        addr = normalize_addr(args.addr)
    except ClientError as err:
        return _fail(err.message, EXIT_USAGE)
    if args.all:
        if not client_token(addr):
            return _fail(f"not signed in to {addr}")
        code, _ = _call(args, "POST", "/v1/auth/revoke", {})
        if code != EXIT_OK:
            return code
    forgot = forget_token(addr)
    if args.all:
        print(f"every token of this account is revoked; signed out of {addr}")
    elif forgot:
        print(f"signed out of {addr} (the token itself stays valid until it expires; --all revokes it)")
    else:
        print(f"was not signed in to {addr}")
    return EXIT_OK


def _read_account(args: argparse.Namespace, what: str, suffix: str = "",
                  query: dict | None = None) -> tuple[int | None, Any, str]:
    """GET /v1/accounts/NAME[suffix] for NAME or the signed-in account: (exit status, answer, name).

    The status is None when the caller should render the answer; otherwise the command is
    done (it failed, or ``--json`` printed the answer)."""
    name = _me(args, args.name)
    if not name:
        return _fail(f"whose {what}? galaxy {what} NAME (or galaxy login first)", EXIT_USAGE), None, ""
    code, data = _call(args, "GET", f"/v1/accounts/{urllib.parse.quote(name, safe='')}{suffix}", query=query)
    if code == EXIT_OK and args.json:
        _print_json(data)
    return (None if code == EXIT_OK and not args.json else code), data, name


def cmd_balance(args: argparse.Namespace) -> int:
    code, data, _ = _read_account(args, "balance")
    if code is not None:
        return code
    from rich.table import Table

    table = Table(title=f"account {_esc(data.get('name'))} ({_esc(data.get('role'))})", title_justify="left")
    for col in ("balance", "held", "credit", "trust"):
        table.add_column(col, justify="right" if col != "trust" else "left")
    table.add_row(*(_esc(data.get(c, "-")) for c in ("balance", "held", "credit", "trust")))
    _console().print(table)
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    code, data, name = _read_account(args, "history", "/history", {"limit": args.limit})
    if code is not None:
        return code
    from rich.table import Table

    table = Table(title=f"history of {_esc(name)}, newest first", title_justify="left")
    for col in ("seq", "when", "what", "amount", "other", "balance"):
        table.add_column(col, justify="right" if col in ("seq", "amount", "balance") else "left")
    for h in data.get("history") or []:
        amount = h.get("amount")
        shown = f"{amount:+d}" if isinstance(amount, int) and not isinstance(amount, bool) else _esc(amount)
        table.add_row(_esc(h.get("seq")), _when(h.get("at_ms")), _esc(h.get("kind")), shown,
                      _esc(h.get("other") or "-"), _esc(h.get("balance")))
    _console().print(table)
    return EXIT_OK


def cmd_transfer(args: argparse.Namespace) -> int:
    key = args.key or f"cli-{secrets.token_hex(12)}"
    if not args.key:
        print(f"idempotency key {key} (to retry safely: galaxy transfer {args.src} {args.dst} {args.amount} "
              f"--key {key})", file=sys.stderr)
    code, data = _call(args, "POST", "/v1/transfers",
                       {"from": args.src, "to": args.dst, "amount": args.amount, "idempotency_key": key},
                       query={"wait": 1} if args.wait else None)
    if code != EXIT_OK:
        return code
    if args.json:
        _print_json(data)
    state = data.get("state")
    if state == "rejected":
        if not args.json:
            print(f"rejected: {data.get('reason') or 'no reason given'} (transfer {data.get('id')})", file=sys.stderr)
        return EXIT_FAIL
    if not args.json:
        if state == "settled":
            seq = f" at ledger seq {data['seq']}" if data.get("seq") else ""
            print(f"settled: {args.amount} from {args.src} to {args.dst}{seq} (transfer {data.get('id')})")
        else:
            print(f"{state}: accepted as transfer {data.get('id')}; it settles when the coordinator sees it "
                  f"(galaxy balance, or retry with --key {key} --wait)")
    return EXIT_OK


def cmd_mint(args: argparse.Namespace) -> int:
    return _post_and_say(args, "/v1/mint", {"to": args.to, "amount": args.amount},
                         lambda d: f"minted {args.amount} to {args.to}; balance now {d.get('balance')}")


def cmd_burn(args: argparse.Namespace) -> int:
    return _post_and_say(args, "/v1/burn", {"account": args.account, "amount": args.amount},
                         lambda d: f"burned {args.amount} from {args.account}; balance now {d.get('balance')}")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("account", help="ledger accounts: create",
                       description="Ledger accounts (docs/ledger.md).  An operator creates users; an admin creates "
                                   "operators and admins.")
    actions = p.add_subparsers(dest="account_action", metavar="ACTION")
    p.set_defaults(func=lambda _args: (p.print_help(), EXIT_USAGE)[1])
    c = _add_client_parser(actions, "create", "open an account (asks for its password twice)", cmd_account_create)
    c.add_argument("name")
    c.add_argument("--role", default="user", choices=("user", "operator", "admin"))
    c.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")

    lg = _add_client_parser(sub, "login", "sign in and keep a token for this node address", cmd_login)
    lg.add_argument("name", nargs="?", help="account (default: the last one signed in here)")
    lg.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
    lo = _add_client_parser(sub, "logout", "forget the token kept for this node address", cmd_logout)
    lo.add_argument("--all", action="store_true", help="also revoke every token of the account, everywhere")

    b = _add_client_parser(sub, "balance", "an account's balance, held amount, credit and trust", cmd_balance)
    b.add_argument("name", nargs="?", help="account (default: the signed-in one)")
    h = _add_client_parser(sub, "history", "an account's money movements, newest first", cmd_history)
    h.add_argument("name", nargs="?", help="account (default: the signed-in one)")
    h.add_argument("--limit", type=_positive_int, default=50, help="at most this many entries (default 50)")

    t = _add_client_parser(sub, "transfer", "move tokens from one account to another", cmd_transfer)
    t.add_argument("src", metavar="FROM")
    t.add_argument("dst", metavar="TO")
    t.add_argument("amount", metavar="AMOUNT", type=_positive_int)
    t.add_argument("--key", help="idempotency key (default: a random one, printed); resend with it to retry")
    t.add_argument("--wait", action="store_true", help="wait until the coordinator settles or rejects it")

    m = _add_client_parser(sub, "mint", "create tokens in an account (admin)", cmd_mint)
    m.add_argument("to", metavar="TO")
    m.add_argument("amount", metavar="AMOUNT", type=_positive_int)
    bu = _add_client_parser(sub, "burn", "destroy tokens from an account (admin)", cmd_burn)
    bu.add_argument("account", metavar="ACCOUNT")
    bu.add_argument("amount", metavar="AMOUNT", type=_positive_int)
