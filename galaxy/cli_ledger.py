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
* ``galaxy transfer --file`` (CSV or JSON lines) checks the whole file before it sends
  anything, then sends it in batches of at most ``FILE_BATCH_MAX`` (POST
  /v1/transfers/batch).  A line without a key gets ``file-<sha256 of the file>-<line>``:
  the same file sent again — after a lost answer, a crash, or by mistake — pays nothing
  twice, and a changed file gets new keys.
"""

from __future__ import annotations

import argparse
import base64
import csv
import getpass
import hashlib
import json
import re
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from galaxy.cli import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, _add_client_parser, _client, _console, _esc, _fail,
                        _positive_int, _print_json, _seg)
from galaxy.client import Client, ClientError, normalize_addr
from galaxy.ledger.core import ACCOUNT_NAME, AMOUNT_MAX
from galaxy.user_files import config_path, read_table, write_private

TOKEN_ENV = "GALAXY_API_TOKEN"
TOKEN_FILE = "token.json"
TOKENS_MAX = 64                 # addresses remembered; the oldest sign-in goes first
TOKEN_FILE_BYTES_MAX = 1 << 20
FILE_BATCH_MAX = 1000           # lines per POST /v1/transfers/batch (the route's limit)
FILE_LINES_MAX = 100_000        # transfers in one --file
FILE_BYTES_MAX = 16 << 20
KEY_CHARS_MAX = 128
DERIVED_KEY = re.compile(r"file-[0-9a-f]{24}-[0-9]+")
FILE_RETRIES = 6                # a batch refused for load (429, 503 overloaded) is sent again, backing off


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
    code, data = _call(args, "GET", f"/v1/accounts/{_seg(name)}{suffix}", query=query)
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


def read_transfers(path: str) -> list[tuple[int, dict]]:
    """(line number, {from, to, amount, idempotency_key}) of every transfer in a .csv or .jsonl
    file; ValueError naming the file, line and field of the first bad one.  A missing key is
    derived from the file's bytes and the line (module docstring)."""
    kind = path.rsplit(".", 1)[-1].lower()
    if kind not in ("csv", "jsonl"):
        raise ValueError(f"{path}: a .csv or .jsonl file (from,to,amount[,idempotency_key])")
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_BYTES_MAX + 1)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    if len(raw) > FILE_BYTES_MAX:
        raise ValueError(f"{path}: larger than {FILE_BYTES_MAX} bytes; split it")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    digest = hashlib.sha256(raw).hexdigest()[:24]
    out: list[tuple[int, dict]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        if kind == "csv":
            cells = [c.strip() for c in next(csv.reader([line]))]
            if not out and cells and cells[0].lower() == "from":
                continue                                   # a header line
            if len(cells) not in (3, 4):
                raise ValueError(f"{where}: expected from,to,amount[,idempotency_key], got {len(cells)} fields")
            item: dict = dict(zip(("from", "to", "amount", "idempotency_key"), cells))
            if not re.fullmatch(r"[0-9]+", item["amount"]):
                raise ValueError(f"{where}: amount: a whole number from 1 to {AMOUNT_MAX}")
            item["amount"] = int(item["amount"])
            if item.get("idempotency_key") == "":
                del item["idempotency_key"]
        else:
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON ({e.__class__.__name__})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: a JSON object {{from, to, amount[, idempotency_key]}}")
            unknown = sorted(set(item) - {"from", "to", "amount", "idempotency_key"})
            missing = sorted({"from", "to", "amount"} - set(item))
            if unknown or missing:
                raise ValueError(f"{where}: " + (f"unknown field(s) {', '.join(map(repr, unknown))}" if unknown
                                                 else f"missing field(s): {', '.join(missing)}"))
        for field in ("from", "to"):
            if not isinstance(item[field], str) or not ACCOUNT_NAME.match(item[field]):
                raise ValueError(f"{where}: {field}: an account name (a lower-case letter, then up to 31 "
                                 "lower-case letters, digits, _ . -)")
        amount = item["amount"]
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= AMOUNT_MAX:
            raise ValueError(f"{where}: amount: a whole number from 1 to {AMOUNT_MAX}")
        key = item.setdefault("idempotency_key", f"file-{digest}-{number}")
        if not isinstance(key, str) or not 0 < len(key) <= KEY_CHARS_MAX or not key.isprintable():
            raise ValueError(f"{where}: idempotency_key: 1 to {KEY_CHARS_MAX} printable characters")
        out.append((number, item))
        if len(out) > FILE_LINES_MAX:
            raise ValueError(f"{path}: more than {FILE_LINES_MAX} transfers; split it")
    if not out:
        raise ValueError(f"{path}: no transfers in it")
    return out


def _send_batch(args: argparse.Namespace, items: list[dict]) -> list[dict]:
    """POST one batch; sent again (same keys: no double payment) while refused for load."""
    client = _client(args)
    for attempt in range(FILE_RETRIES + 1):
        try:
            answer = client.request("POST", "/v1/transfers/batch", body={"transfers": items},
                                    query={"wait": 1} if args.wait else None)
            results = answer.get("transfers") if isinstance(answer, dict) else None
            if not isinstance(results, list) or len(results) != len(items):
                raise ClientError(f"the node's answer does not list {len(items)} transfers")
            return results
        except ClientError as err:
            if err.status not in (429, 503) or err.code == "no_coordinator" or attempt == FILE_RETRIES:
                raise
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
    raise AssertionError("unreachable")


def _transfer_file(args: argparse.Namespace) -> int:
    try:
        lines = read_transfers(args.file)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    derived = [item["idempotency_key"] for _, item in lines if DERIVED_KEY.fullmatch(item["idempotency_key"])]
    if derived:
        print(f"{len(derived)} idempotency key(s) derived from the file ({derived[0].rsplit('-', 1)[0]}-LINE): "
              "sending this same file again pays nothing twice", file=sys.stderr)
    done: list[tuple[int, dict, dict]] = []
    failed: str | None = None
    for start in range(0, len(lines), FILE_BATCH_MAX):
        chunk = lines[start:start + FILE_BATCH_MAX]
        try:
            results = _send_batch(args, [item for _, item in chunk])
        except ClientError as err:
            hint = " — sign in with: galaxy login" if err.status == 401 else ""
            # the node names an item by its index in the batch: name the file's line instead
            message = re.sub(r"transfers\[([0-9]+)\]", lambda m: f"line {chunk[int(m.group(1))][0]}"
                             if int(m.group(1)) < len(chunk) else m.group(0), err.message)
            failed = f"lines {chunk[0][0]}-{lines[-1][0]} not sent: {message}{hint}"
            break
        done.extend((number, item, r if isinstance(r, dict) else {}) for (number, item), r in zip(chunk, results))
    if args.json:
        _print_json({"file": args.file, "sent": len(done), "unsent": len(lines) - len(done),
                     "error": failed, "transfers": [{"line": n, **r} for n, _, r in done]})
    else:
        _render_file_summary(args.file, done, len(lines))
    if failed:
        return _fail(failed + " (send the same file again: what settled is not paid twice)")
    bad = [r for _, _, r in done if r.get("state") not in ("settled", "pending")]
    return EXIT_FAIL if bad else EXIT_OK


def _render_file_summary(path: str, done: list[tuple[int, dict, dict]], total: int) -> None:
    from rich.table import Table

    console = _console()
    counts: dict[str, list[int]] = {}
    for _, item, r in done:
        c = counts.setdefault(str(r.get("state") or "?"), [0, 0])
        c[0] += 1
        c[1] += item["amount"]
    console.print(f"{_esc(path)}: {len(done)} of {total} transfers sent", soft_wrap=True)
    table = Table()
    for col in ("state", "transfers", "amount"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for state in ("settled", "rejected", "pending", "refused", *sorted(set(counts) - {"settled", "rejected",
                                                                                       "pending", "refused"})):
        if state in counts:
            table.add_row(state, str(counts[state][0]), str(counts[state][1]))
    if total > len(done):
        table.add_row("not sent", str(total - len(done)), "-")
    console.print(table)
    others = [(n, item, r) for n, item, r in done if r.get("state") != "settled"]
    if not others:
        return
    detail = Table(title="not settled", title_justify="left")
    for col in ("line", "from", "to", "amount", "state", "reason"):
        detail.add_column(col, justify="right" if col in ("line", "amount") else "left")
    for n, item, r in others:
        reason = r.get("reason") or ("settles when the coordinator sees it" if r.get("state") == "pending" else "-")
        detail.add_row(str(n), _esc(item["from"]), _esc(item["to"]), str(item["amount"]), _esc(r.get("state")),
                       _esc(reason))
    console.print(detail)


def cmd_transfer(args: argparse.Namespace) -> int:
    if args.file:
        if args.src or args.dst or args.amount or args.key:
            return _fail("--file takes the transfers from the file: no FROM TO AMOUNT or --key", EXIT_USAGE)
        return _transfer_file(args)
    if not (args.src and args.dst and args.amount):
        return _fail("galaxy transfer FROM TO AMOUNT, or galaxy transfer --file FILE", EXIT_USAGE)
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

    t = _add_client_parser(sub, "transfer", "move tokens from one account to another, or many from a file",
                           cmd_transfer)
    t.add_argument("src", metavar="FROM", nargs="?")
    t.add_argument("dst", metavar="TO", nargs="?")
    t.add_argument("amount", metavar="AMOUNT", type=_positive_int, nargs="?")
    t.add_argument("--key", help="idempotency key (default: a random one, printed); resend with it to retry")
    t.add_argument("--file", metavar="FILE", help="a .csv or .jsonl of from,to,amount[,idempotency_key]: sent in "
                                                  f"batches of {FILE_BATCH_MAX}; a line without a key gets one "
                                                  "derived from the file and line, so sending the same file "
                                                  "again pays nothing twice")
    t.add_argument("--wait", action="store_true", help="wait until the coordinator settles or rejects it")

    m = _add_client_parser(sub, "mint", "create tokens in an account (admin)", cmd_mint)
    m.add_argument("to", metavar="TO")
    m.add_argument("amount", metavar="AMOUNT", type=_positive_int)
    bu = _add_client_parser(sub, "burn", "destroy tokens from an account (admin)", cmd_burn)
    bu.add_argument("account", metavar="ACCOUNT")
    bu.add_argument("amount", metavar="AMOUNT", type=_positive_int)
