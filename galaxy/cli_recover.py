"""``galaxy recover``: re-form the coordinator group after a majority of voters is lost for good.

    galaxy recover [--addr URL] [--survivor URL ...] [--choose NODE] [--yes] [--force] [--json]

Theory of operation (docs/recover.md): one HTTP call per survivor, with the caller's admin
sign-in token (``GALAXY_API_TOKEN``, or the one ``galaxy login`` kept for ``--addr``; a
token signed by one node is valid on every node).

1. Survivors: the ``--survivor`` addresses, else every alive member ``--addr`` lists.
2. ``GET /v1/recover`` on each; the pure planner (``consensus.recover.propose``) picks the
   most complete log, computes what choosing each survivor would lose, and refuses unsafe
   plans (a live coordinator, survivors that are still a majority, a ledger fork).
3. The table, the proposal, and a confirmation (``--yes`` for scripts).
4. The order is checked on every survivor first (``dry_run``), then applied to the
   survivors whose logs are discarded and last to the chosen one, so no new group can
   elect a leader before all of them run in the new epoch.
5. Waits (bounded) until the new group has a coordinator, and says so.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from galaxy.cli import EXIT_OK, _console, _esc, _fail, _print_json
from galaxy.client import DEFAULT_ADDR, Client, ClientError
from galaxy.consensus import recover as recovery

WAIT_COORDINATOR_S = 60.0
POLL_S = 0.5
SURVIVORS_MAX = recovery.VOTERS_MAX


def _clients(args: argparse.Namespace) -> tuple[Client, list[Client]]:
    from galaxy.cli_ledger import client_token
    first = Client(args.addr)
    first.token = client_token(first.addr)
    urls = list(dict.fromkeys(args.survivor or []))
    if not urls:
        members = first.get("/v1/members")
        urls = [m["http"] for m in members.get("members", []) if m.get("state") == "alive"]
    urls = list(dict.fromkeys([first.addr, *(Client(u).addr for u in urls)]))[:SURVIVORS_MAX]
    return first, [Client(u, token=first.token) for u in urls]


def _gather(clients: list[Client]) -> tuple[list[tuple[recovery.Facts, Client]], list[tuple[str, str]]]:
    facts, silent = [], []
    for c in clients:
        try:
            facts.append((recovery.Facts.from_json(c.get("/v1/recover")), c))
        except (ClientError, ValueError) as e:
            silent.append((c.addr, getattr(e, "message", str(e))))
    return facts, silent


def _table(facts: list[recovery.Facts], proposal: recovery.Proposal | None, console: Any) -> None:
    from rich.table import Table

    losses = {loss.node_id: loss for loss in proposal.losses} if proposal else {}
    chosen = proposal.order.chosen if proposal else None
    table = Table(title="what each survivor knows", title_justify="left")
    for col in ("node", "epoch", "term", "last log (term, index)", "commit", "ledger seq (log / view)",
                "view hash", "tasks", "coordinator", "choosing it would lose"):
        table.add_column(col)
    for f in sorted(facts, key=lambda f: f.node_id):
        loss = losses.get(f.node_id)
        name = f"[bold]{_esc(f.node_id)}[/bold] (proposed)" if f.node_id == chosen else _esc(f.node_id)
        table.add_row(name, str(f.epoch), str(f.term), f"({f.last_log_term}, {f.last_log_index})" if f.voter else "no log",
                      str(f.commit_index), f"{f.ledger.seq} / {f.published.seq}", _esc(f.ledger_hash[:12]),
                      str(f.tasks), _esc(f.coordinator or "none"),
                      _esc(loss.describe()) if loss else "(not a candidate)")
    console.print(table)


def _confirm(order: recovery.Order) -> bool:
    others = [i for i, _ in order.voters if i != order.chosen]
    prompt = (f"Re-form the coordinator group from {len(order.voters)} survivor(s), keeping {order.chosen}'s log"
              + (f"; {', '.join(others)} discard theirs and catch up" if others else "")
              + f" (epoch {order.epoch}, term {order.term})?  Type yes: ")
    try:
        return input(prompt).strip().lower() == "yes"
    except EOFError:
        return False


def _send(clients: dict[str, Client], order: recovery.Order, *, force: bool, dry_run: bool) -> list[dict]:
    out = []
    ids = [i for i, _ in order.voters if i != order.chosen] + [order.chosen]    # the chosen one last
    for node_id in ids:
        answer = clients[node_id].post("/v1/recover", {"order": order.to_json(), "force": force, "dry_run": dry_run})
        out.append(answer)
    return out


def _wait_coordinator(client: Client, order: recovery.Order, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            leader = client.get("/v1/leader")
            if leader.get("leader") and int(leader.get("term") or 0) >= order.term:
                return leader
        except ClientError:
            pass
        time.sleep(POLL_S)
    return None


def cmd_recover(args: argparse.Namespace) -> int:
    try:
        first, clients = _clients(args)
    except ClientError as e:
        return _fail(e.message)
    answered, silent = _gather(clients)
    facts = [f for f, _ in answered]
    console = _console()
    for addr, why in silent:
        console.print(f"[yellow]no answer from {_esc(addr)}: {_esc(why)} (left out)[/yellow]")
    if not facts:
        return _fail("no survivor answered; give their addresses with --survivor URL")
    try:
        proposal = recovery.propose(facts, chosen=args.choose, force=args.force)
    except recovery.Refused as e:
        if args.json:
            _print_json({"refused": str(e), "facts": [f.to_json() for f in facts]})
        else:
            _table(facts, None, console)
        return _fail(f"refused: {e}")
    order = proposal.order
    if args.json:
        _print_json({"order": order.to_json(), "plan_id": order.plan_id, "facts": [f.to_json() for f in facts],
                     "losses": [{"node": x.node_id, "log_entries": x.log_entries, "ledger_from": x.ledger_from,
                                 "ledger_to": x.ledger_to} for x in proposal.losses]})
    else:
        _table(facts, proposal, console)
        for node_id, why in proposal.excluded:
            console.print(f"left out: {_esc(node_id)}: {_esc(why)}")
        console.print(f"proposed: keep [bold]{_esc(order.chosen)}[/bold]'s log; the new group is "
                      f"{', '.join(_esc(i) for i, _ in order.voters)} (recovery epoch {order.epoch}, plan "
                      f"{order.plan_id})")
    if not args.yes and not _confirm(order):
        return _fail("not confirmed; nothing was changed")
    by_id = {f.node_id: c for f, c in answered}
    try:
        _send(by_id, order, force=args.force, dry_run=True)
    except ClientError as e:
        return _fail(f"a survivor refused the plan, nothing was changed: {e.message}")
    try:
        answers = _send(by_id, order, force=args.force, dry_run=False)
    except ClientError as e:
        return _fail(f"applying the order failed part-way: {e.message}\n"
                     "run galaxy recover again: survivors that applied it are in the new epoch, the others follow")
    for a in answers:
        if not args.json:
            console.print(f"{_esc(a.get('node'))}: {_esc(a.get('result'))} ({_esc(a.get('role'))} its log)")
    leader = _wait_coordinator(by_id[order.chosen], order, args.wait)
    if leader is None:
        return _fail(f"the order was applied but no coordinator appeared within {args.wait:g} s; "
                     "check the survivors' logs (galaxy status)")
    if not args.json:
        console.print(f"coordinator {_esc(leader['leader'])} (term {leader['term']}): the mesh is back; new voters "
                      "join as spares over the next minute")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("recover", help="re-form the coordinator group after most voters are lost for good",
                       description="Shows what each surviving node knows and what choosing it would lose, then "
                                   "re-forms the Raft group from the survivors with the most complete log "
                                   "(docs/recover.md).  Needs an admin sign-in (galaxy login).")
    p.add_argument("--addr", default=os.environ.get("GALAXY_ADDR") or DEFAULT_ADDR,
                   help=f"a surviving node's HTTP address (env GALAXY_ADDR, default {DEFAULT_ADDR})")
    p.add_argument("--survivor", action="append", metavar="URL",
                   help="a survivor's HTTP address (repeat); default: every alive member --addr knows")
    p.add_argument("--choose", metavar="NODE", help="keep this node's log instead of the most complete one's")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true",
                   help="re-form even though a coordinator exists or the survivors are a majority, or keep a "
                        "less complete log")
    p.add_argument("--wait", type=float, default=WAIT_COORDINATOR_S, metavar="SECONDS",
                   help=f"how long to wait for the new coordinator (default {WAIT_COORDINATOR_S:g})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_recover)

