"""Re-forming the Raft group after a majority of voters is lost for good (pure).

Theory of operation
-------------------
Raft cannot elect a coordinator without a majority of its voters.  When that majority is
gone for good (disks dead, machines burnt), ``galaxy recover`` re-forms the group from the
survivors.  Three steps, all pure here, carried out by ``recover_runner.py``:

1. **Facts.**  Every survivor reports what it knows (``Facts``): its Raft log's last
   (term, index), commit index, current term, the ledger's sequence number in its own log
   and in its published view, and the Raft position of those ledger entries.
2. **Plan.**  ``propose()`` picks the most complete survivor — the highest
   (last log term, last log index), as a Raft vote would — and computes what choosing
   each survivor would lose (``Loss``): log entries the most complete one has and it does
   not, and the ledger sequence numbers its log cannot hold.  It refuses unsafe plans
   (``Refused``): a coordinator exists, the survivors are still a majority (Raft elects
   by itself; something else is wrong), or the mesh already shows ledger entries that no
   survivor's log holds (re-forming would fork the ledger).
3. **Order.**  Every survivor gets the same ``Order``: a new *recovery epoch* (above every
   survivor's), the new group's voters, the chosen node, the chosen node's log position
   as seen by the plan, and a starting term above every term any survivor has heard of
   (terms fence coordinator decisions, so they must never go back).  ``check_order()``
   is each node's gate: it refuses a stale or mixed order (another plan for the same
   epoch), a chosen node whose log moved since the plan, a node whose log is more
   complete than the chosen one's (unless forced), and a term not above its own.
   Applying the same order twice is a no-op (``DONE``).

Which ledger entries a log holds, exactly: a published ledger entry was committed in the
old group at Raft (index i, term t).  A survivor's log holds it iff its last entry has
term >= t and index >= i (Leader Completeness: every leader of a later term had it, and
log matching carries it to whoever holds a later entry from such a leader).

Invariants: ``propose`` chooses among survivors with Raft state only; the chosen one
loses nothing that another survivor holds; the order's epoch and term are strictly above
every survivor's; ``plan_id`` is a function of the order's content, so two different
orders for one epoch are told apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

VOTERS_MAX = 64                 # survivors in one order; far above any Raft group
ID_CHARS_MAX = 128
ADDR_CHARS_MAX = 300
INT_MAX = 2**62
APPLY = "apply"
DONE = "done"


class Refused(Exception):
    """A plan or an order that must not be carried out; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Point:
    """A ledger entry's place: its ledger ``seq`` and the Raft (index, term) that committed it."""

    seq: int = 0
    index: int = 0
    term: int = 0


@dataclass(frozen=True, slots=True)
class Facts:
    node_id: str
    raft_addr: str
    voter: bool                 # runs Raft with a log (a candidate for the new group)
    epoch: int                  # recovery epoch it runs in (0: never recovered)
    plan_id: str                # the last order it applied ("" none)
    voters: tuple[str, ...]     # the Raft configuration it knows (node ids)
    term: int                   # current Raft term
    last_log_term: int
    last_log_index: int
    commit_index: int
    known_term: int             # highest term it heard of (its own, gossip, task fences)
    ledger: Point               # last ledger entry applied from its own log
    published: Point            # last ledger entry in its view (published to the mesh)
    ledger_hash: str            # hash of its ledger view
    tasks: int                  # tasks in its task table
    has_coordinator: bool       # it knows a live coordinator right now
    coordinator: str = ""

    @property
    def log_pos(self) -> tuple[int, int]:
        return self.last_log_term, self.last_log_index

    def holds(self, p: Point) -> bool:
        """This node's log holds ledger entry ``p`` (module docstring)."""
        return p.seq == 0 or (self.last_log_term >= p.term and self.last_log_index >= p.index)

    def to_json(self) -> dict:
        return {"node_id": self.node_id, "raft_addr": self.raft_addr, "voter": self.voter, "epoch": self.epoch,
                "plan_id": self.plan_id, "voters": list(self.voters), "term": self.term,
                "last_log_term": self.last_log_term, "last_log_index": self.last_log_index,
                "commit_index": self.commit_index, "known_term": self.known_term,
                "ledger": _point_json(self.ledger), "published": _point_json(self.published),
                "ledger_hash": self.ledger_hash, "tasks": self.tasks, "has_coordinator": self.has_coordinator,
                "coordinator": self.coordinator}

    @classmethod
    def from_json(cls, doc: object) -> Facts:
        d = _obj(doc, "facts")
        return cls(
            node_id=_str(d, "node_id", ID_CHARS_MAX), raft_addr=_str(d, "raft_addr", ADDR_CHARS_MAX, empty=True),
            voter=_bool(d, "voter"), epoch=_int(d, "epoch"), plan_id=_str(d, "plan_id", 64, empty=True),
            voters=_strs(d, "voters"), term=_int(d, "term"), last_log_term=_int(d, "last_log_term"),
            last_log_index=_int(d, "last_log_index"), commit_index=_int(d, "commit_index"),
            known_term=_int(d, "known_term"), ledger=_point(d, "ledger"), published=_point(d, "published"),
            ledger_hash=_str(d, "ledger_hash", 200, empty=True), tasks=_int(d, "tasks"),
            has_coordinator=_bool(d, "has_coordinator"),
            coordinator=_str(d, "coordinator", ID_CHARS_MAX, empty=True) if "coordinator" in d else "")


@dataclass(frozen=True, slots=True)
class Order:
    """What every survivor is told; the same for all of them."""

    epoch: int
    term: int                                   # the new group's first term (above every survivor's)
    chosen: str
    voters: tuple[tuple[str, str], ...]          # (node id, raft addr), sorted by id
    chosen_log: tuple[int, int]                  # the chosen node's (last log term, index) in the plan

    @property
    def plan_id(self) -> str:
        body = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(body).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "term": self.term, "chosen": self.chosen,
                "voters": [[i, a] for i, a in self.voters], "chosen_log": list(self.chosen_log)}

    @classmethod
    def from_json(cls, doc: object) -> Order:
        d = _obj(doc, "order")
        unknown = set(d) - {"epoch", "term", "chosen", "voters", "chosen_log"}
        if unknown:
            raise ValueError(f"order: unknown field(s) {', '.join(sorted(unknown))}")
        raw = d.get("voters")
        if not isinstance(raw, list) or not 0 < len(raw) <= VOTERS_MAX:
            raise ValueError(f"order.voters: a list of 1 to {VOTERS_MAX} [node id, raft addr] pairs")
        voters = []
        for v in raw:
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and x for x in v)
                    and len(v[0]) <= ID_CHARS_MAX and len(v[1]) <= ADDR_CHARS_MAX):
                raise ValueError("order.voters: each voter is [node id, raft addr]")
            voters.append((v[0], v[1]))
        log_pos = d.get("chosen_log")
        if not (isinstance(log_pos, list) and len(log_pos) == 2 and all(_is_int(x) for x in log_pos)):
            raise ValueError("order.chosen_log: [last log term, last log index]")
        order = cls(epoch=_int(d, "epoch"), term=_int(d, "term"), chosen=_str(d, "chosen", ID_CHARS_MAX),
                    voters=tuple(sorted(voters)), chosen_log=(log_pos[0], log_pos[1]))
        order.check()
        return order

    def check(self) -> None:
        ids = [i for i, _ in self.voters]
        addrs = [a for _, a in self.voters]
        if len(set(ids)) != len(ids) or len(set(addrs)) != len(addrs):
            raise ValueError("order.voters: node ids and raft addrs must be unique")
        if self.chosen not in ids:
            raise ValueError("order.chosen: must be one of the voters")
        if self.epoch < 1 or self.term < 1:
            raise ValueError("order: epoch and term must be >= 1")


@dataclass(frozen=True, slots=True)
class Loss:
    node_id: str
    log_entries: int            # entries the most complete survivor has beyond this one's log (at least)
    ledger_from: int            # ledger seqs ledger_from..ledger_to would be lost; none when from > to
    ledger_to: int

    @property
    def ledger_seqs(self) -> int:
        return max(0, self.ledger_to - self.ledger_from + 1)

    def describe(self) -> str:
        if self.log_entries == 0 and self.ledger_seqs == 0:
            return "nothing"
        parts = [f"{self.log_entries} log entr{'y' if self.log_entries == 1 else 'ies'}"]
        if self.ledger_seqs:
            parts.append(f"ledger seqs {self.ledger_from}..{self.ledger_to}")
        return " / ".join(parts)


@dataclass(frozen=True, slots=True)
class Proposal:
    order: Order
    losses: tuple[Loss, ...]                    # one per candidate, the chosen one first
    excluded: tuple[tuple[str, str], ...]       # (node id, why) of survivors left out


def most_complete(candidates: list[Facts]) -> Facts:
    """The highest (last log term, last log index); ties go to the smaller node id."""
    return max(candidates, key=lambda f: (f.log_pos, _neg(f.node_id)))


def losses(candidates: list[Facts], points: list[Point]) -> dict[str, Loss]:
    """What choosing each candidate would lose, relative to everything the survivors know."""
    best = most_complete(candidates)
    top = max([p.seq for p in points] + [f.ledger.seq for f in candidates] + [0])
    out = {}
    for f in candidates:
        kept = max([p.seq for p in points if f.holds(p)] + [f.ledger.seq, 0])
        out[f.node_id] = Loss(f.node_id, max(0, best.last_log_index - f.last_log_index), kept + 1, top)
    return out


def propose(facts: list[Facts], *, others: list[Point] = (), chosen: str | None = None,
            force: bool = False) -> Proposal:
    """The order to re-form the group from ``facts`` (the survivors), or Refused.

    ``others``: ledger points published to members that are not candidates (non-voters
    see the ledger too).  ``chosen`` overrides the choice (refused when less complete than
    another survivor, unless ``force``).  ``force`` also skips the "a coordinator exists"
    and "the survivors are a majority" refusals; it never allows forking the ledger."""
    ids = [f.node_id for f in facts]
    if len(set(ids)) != len(ids):
        raise Refused("the same node answered twice: give each survivor once")
    if len(facts) > VOTERS_MAX:
        raise Refused(f"at most {VOTERS_MAX} survivors")
    live = [f for f in facts if f.has_coordinator]
    if live and not force:
        raise Refused(f"{live[0].node_id} sees a live coordinator ({live[0].coordinator or '?'}): "
                      "there is nothing to recover (--force to re-form anyway)")
    candidates = [f for f in facts if f.voter and f.raft_addr]
    excluded = tuple((f.node_id, "not running Raft now (no log, or it started a moment ago: re-run to include "
                                 "it); it joins the new group later as a spare")
                     for f in facts if f not in candidates)
    if not candidates:
        raise Refused("no survivor holds a Raft log: nothing to re-form the group from")
    best = most_complete(candidates)
    pick = best
    if chosen is not None:
        named = [f for f in candidates if f.node_id == chosen]
        if not named:
            raise Refused(f"{chosen} is not among the survivors with a Raft log: "
                          f"{', '.join(sorted(f.node_id for f in candidates))}")
        pick = named[0]
        if pick.log_pos < best.log_pos and not force:
            raise Refused(f"{chosen}'s log (term {pick.last_log_term}, index {pick.last_log_index}) is behind "
                          f"{best.node_id}'s (term {best.last_log_term}, index {best.last_log_index}); "
                          "choose the most complete one, or --force to lose the difference")
    # The group as the chosen survivor knew it: survivors that are still a majority of it
    # can elect by themselves, so the trouble is elsewhere (network, keys, clocks).
    group = set(pick.voters)
    alive_in_group = group & {f.node_id for f in candidates}
    if group and len(alive_in_group) > len(group) / 2 and not force:
        raise Refused(f"{len(alive_in_group)} of the {len(group)} voters answered — a majority, so Raft can "
                      "elect a coordinator by itself; check their network and logs (--force to re-form anyway)")
    points = [f.published for f in facts] + [f.ledger for f in facts] + list(others)
    newest = max(points, key=lambda p: p.seq)
    holder = max(candidates, key=lambda f: f.holds(newest))
    if not holder.holds(newest):
        kept = max([p.seq for p in points if best.holds(p)] + [best.ledger.seq, 0])
        raise Refused(f"ledger seqs {kept + 1}..{newest.seq} were committed and published to the mesh, but no "
                      "survivor's Raft log holds them (they were only on the lost voters); re-forming would fork "
                      "the ledger.  Bring back one of the lost voters' data dirs, even read-only, and re-run")
    if not pick.holds(newest):
        raise Refused(f"{pick.node_id}'s log does not hold ledger seq {newest.seq}, which the mesh already shows; "
                      f"choose {best.node_id}")
    loss = losses(candidates, points)
    epoch = max(f.epoch for f in facts) + 1
    term = max([f.term for f in facts] + [f.known_term for f in facts] + [f.last_log_term for f in facts]) + 1
    order = Order(epoch=epoch, term=term, chosen=pick.node_id,
                  voters=tuple(sorted((f.node_id, f.raft_addr) for f in candidates)), chosen_log=pick.log_pos)
    order.check()
    ordered = [loss[pick.node_id]] + [loss[f.node_id] for f in sorted(candidates, key=lambda f: f.node_id)
                                      if f is not pick]
    return Proposal(order=order, losses=tuple(ordered), excluded=excluded)


def check_order(order: Order, me: Facts, *, current_epoch: int, current_plan: str, force: bool) -> str:
    """A node's gate before it re-forms: APPLY, DONE (this order was applied already) or Refused."""
    if me.node_id not in {i for i, _ in order.voters}:
        raise Refused(f"this node ({me.node_id}) is not one of the order's voters")
    if order.epoch < current_epoch:
        raise Refused(f"stale order: this node already runs recovery epoch {current_epoch} (> {order.epoch})")
    if order.epoch == current_epoch:
        if order.plan_id == current_plan:
            return DONE
        raise Refused(f"another plan ({current_plan or 'the original group'}) already holds epoch {order.epoch} "
                      "here: every survivor must get the same order; re-run galaxy recover")
    if me.has_coordinator and not force:
        raise Refused(f"this node sees a live coordinator ({me.coordinator or '?'}): nothing to recover")
    if order.term <= me.term:
        raise Refused(f"the order's term {order.term} is not above this node's term {me.term}; re-run galaxy recover")
    if me.node_id == order.chosen:
        if not me.voter:
            raise Refused("the chosen node holds no Raft log")
        if me.log_pos != order.chosen_log:
            raise Refused(f"this node's log moved since the plan (now term {me.last_log_term}, index "
                          f"{me.last_log_index}; the plan saw {order.chosen_log}); re-run galaxy recover")
    elif me.voter and me.log_pos > order.chosen_log and not force:
        raise Refused(f"this node's log (term {me.last_log_term}, index {me.last_log_index}) is more complete than "
                      f"the chosen node's {order.chosen_log}: it would be discarded (--force to accept)")
    return APPLY


def raft_label(epoch: int) -> str:
    """The key-derivation label of the Raft transport key: nodes of different recovery
    epochs cannot exchange a single Raft message (an old voter coming back cannot disturb
    or be counted in the re-formed group)."""
    return "raft" if epoch == 0 else f"raft-epoch-{epoch}"


# ---------------------------------------------------------------- validation helpers

def _neg(node_id: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in node_id)


def _is_int(v: object) -> bool:
    return type(v) is int and 0 <= v <= INT_MAX


def _obj(doc: object, what: str) -> dict:
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: must be a JSON object")
    return doc


def _int(d: dict, key: str) -> int:
    v = d.get(key)
    if not _is_int(v):
        raise ValueError(f"{key}: a whole number from 0 to {INT_MAX}")
    return v


def _bool(d: dict, key: str) -> bool:
    v = d.get(key)
    if type(v) is not bool:
        raise ValueError(f"{key}: true or false")
    return v


def _str(d: dict, key: str, chars_max: int, empty: bool = False) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > chars_max or (not v and not empty) or not v.isprintable():
        raise ValueError(f"{key}: a string of {0 if empty else 1} to {chars_max} printable characters")
    return v


def _strs(d: dict, key: str) -> tuple[str, ...]:
    v = d.get(key)
    if not isinstance(v, list) or len(v) > VOTERS_MAX * 4 or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"{key}: a list of node ids")
    return tuple(v)


def _point(d: dict, key: str) -> Point:
    v = _obj(d.get(key), key)
    return Point(seq=_int(v, "seq"), index=_int(v, "index"), term=_int(v, "term"))


def _point_json(p: Point) -> dict:
    return {"seq": p.seq, "index": p.index, "term": p.term}
