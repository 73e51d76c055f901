"""Who forms the Raft group: bootstrap, growth, replacement and retirement (pure).

Theory of operation
-------------------
Only the Raft leader changes the group, one server at a time, through Raft itself, so
every node agrees on the voters by construction.  The choices it makes are a pure
function of what gossip says (``PeerInfo``) and of its own Raft state (``Local``), which
``plan()`` turns into actions for the adapter to carry out.

* **Bootstrap without split brain** (like Consul's ``bootstrap_expect``): a node with no
  Raft state founds a one-node group only when no member it knows has a group, the
  discovery window (``bootstrap_window_ms``) has passed since it started, and it has the
  smallest id among the eligible members it sees.  ``voters == 1`` with no peer and no
  seed skips the window.  If two groups are founded anyway (two halves that could not see
  each other), the one whose smallest voter id is larger retires when they meet.
* **Growth:** while the group has fewer than ``voters`` members, the leader invites the
  eligible spare with the smallest id.  The spare starts Raft (without campaigning) and
  says so by gossip; only then does the leader add it, so the new quorum is reachable the
  moment the change is appended.  A spare that runs this group's Raft already (its view
  lists the leader; a voter that came back at another address, or was replaced while
  away) ignores invitations, and is added as it is: it catches up as any lagging voter.
* **Leaving:** a voter that stops gracefully first gossips ``raft_state`` ``leaving``
  (handing leadership over if it leads) and keeps running Raft until the leader has
  removed it.  The leader removes such a voter at once and never takes it back in as a
  spare.  Removing it while it still acks matters when two voters are left: Raft needs a
  majority of the configuration to commit the removal, and once the leaver has gone the
  survivor alone is not one (it could neither remove it nor elect itself).
* **Replacement:** a voter that left is removed at once; one dead for longer than
  ``voter_replace_after_ms`` is removed, and growth then brings a spare in.  One change at
  a time keeps a quorum through any sequence of single failures.  The group knows its
  voters by address, gossip by id: a voter that came back at another address (its host
  renumbered, ``--raft-port`` changed) is alive under its id while its old address stays
  in the group, claimed by nobody.  So an address whose voter the leader saw and which
  is now alive elsewhere is removed at once (growth then adds it back at its new
  address), and one that no member has claimed for ``voter_replace_after_ms`` (a voter
  gossip forgot, or whose id the leader never learned) as a dead voter is.  Without this
  such an address stayed for good: the group lost a voter's worth of fault tolerance, and
  when a majority came back elsewhere no leader could be elected (``galaxy recover``).
* **Retirement:** a node running Raft that a newer leader no longer lists (it was
  replaced while it was away) stops Raft, forgets its Raft state and becomes a spare.
* **Recovery epochs** (``galaxy recover``, docs/recover.md): a group re-formed from the
  survivors of a lost majority runs in a higher epoch.  A node of an older epoch that
  sees a live leader of a newer one forgets its Raft state (it was a lost voter, or a
  survivor the order missed) and is invited back as a new spare, adopting the leader's
  epoch when it starts; an older-epoch group always retires when it meets a newer one.

Invariants: at most one membership change is requested per plan; a node never adds or
removes itself; workers never take part.
"""

from __future__ import annotations

from dataclasses import dataclass

from galaxy.messages import ALIVE, DEAD, LEFT, RaftView

ELIGIBLE_ROLES = ("auto", "coordinator", "standby")
RUNNING_STATES = ("starting", "follower", "candidate", "leader")
LEAVING = "leaving"          # raft_state of a voter that is stopping: remove it, never add it back


@dataclass(frozen=True, slots=True)
class PeerInfo:
    id: str
    state: str               # local judgement: alive / suspect / dead / left
    role: str
    raft_addr: str           # "host:raft_port"
    raft: RaftView
    silent_ms: int           # how long since this node last heard from it


@dataclass(frozen=True, slots=True)
class Local:
    id: str
    role: str
    raft_addr: str
    running: bool            # a SyncObj exists in this process
    member: bool             # durably known to be (or to have been) a confirmed voter
    is_leader: bool          # leader with a fresh quorum lease
    term: int
    config: tuple[str, ...]  # Raft configuration (addresses), when running
    change_pending: bool     # a membership change is in flight
    uptime_ms: int
    has_seeds: bool
    seen_group: bool = False  # durably: this node has known a Raft group of its mesh
    epoch: int = 0           # recovery epoch this node's Raft state belongs to
    # config addresses whose voter this node has seen (gossip), as (address, node id)
    config_ids: tuple[tuple[str, str], ...] = ()
    # config addresses no member advertises, and for how long (ms) this node has seen so
    unclaimed_ms: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Found:
    """Start a one-node group."""


@dataclass(frozen=True, slots=True)
class Start:
    """Start Raft with these partner addresses (a spare invited in, or a voter restarting),
    in this recovery epoch."""
    partners: tuple[str, ...]
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Invite:
    node_id: str


@dataclass(frozen=True, slots=True)
class Add:
    node_id: str
    addr: str


@dataclass(frozen=True, slots=True)
class Remove:
    node_id: str
    addr: str


@dataclass(frozen=True, slots=True)
class Retire:
    reason: str


Action = Found | Start | Invite | Add | Remove | Retire


def eligible(role: str) -> bool:
    return role in ELIGIBLE_ROLES


def current_leader(peers: list[PeerInfo], me_view: RaftView | None = None, me_id: str = "") -> tuple[str, RaftView] | None:
    """The (id, view) of the node that says it leads in the highest (epoch, term), among live members."""
    best: tuple[str, RaftView] | None = None
    candidates = [(p.id, p.raft) for p in peers if p.state == ALIVE]
    if me_view is not None:
        candidates.append((me_id, me_view))
    for node_id, view in candidates:
        if view.raft_state == "leader" and (best is None or (view.epoch, view.term) > (best[1].epoch, best[1].term)):
            best = (node_id, view)
    return best


def plan(local: Local, peers: list[PeerInfo], *, voters: int, bootstrap_window_ms: int,
         voter_replace_after_ms: int) -> list[Action]:
    if not eligible(local.role):
        return []
    by_id = {p.id: p for p in peers}
    leader = current_leader(peers)
    if not local.running:
        return _plan_idle(local, peers, leader, by_id, voters, bootstrap_window_ms)
    if local.is_leader:
        return _plan_leader(local, peers, voters, voter_replace_after_ms)
    return _plan_follower(local, peers, leader)


def _group_ids(local: Local, peers: list[PeerInfo]) -> set[str]:
    addr_to_id = {p.raft_addr: p.id for p in peers} | {local.raft_addr: local.id}
    return {addr_to_id.get(a, a) for a in local.config} | {local.id}


def _older_group_wins(mine: set[str], view: RaftView) -> bool:
    """Two groups founded apart have met: the one with the smaller smallest voter id stays."""
    return bool(view.voters) and not mine & set(view.voters) and min(view.voters) < min(mine)


def _plan_idle(local: Local, peers: list[PeerInfo], leader: tuple[str, RaftView] | None,
               by_id: dict[str, PeerInfo], voters: int, window_ms: int) -> list[Action]:
    if leader is not None:
        _, view = leader
        if view.epoch > local.epoch and (local.member or local.config):
            return [Retire(f"the group was re-formed by galaxy recover (epoch {view.epoch}); this node's Raft "
                           "state is of an older epoch, so it joins again as a new spare")]
        if view.epoch < local.epoch:
            return []       # a leftover of an older group: never join it
        if local.id in view.invited or (local.id in view.voters and (local.member or view.epoch > 0)):
            # (a recovered group may list a survivor that lost its order: it starts empty
            # and catches up, without campaigning, like an invited spare)
            partners = {by_id[v].raft_addr for v in view.voters if v in by_id} | set(local.config)
            return [Start(tuple(sorted(partners - {local.raft_addr})), view.epoch)]
        return []
    if local.member:
        # A voter restarting with no leader in sight: rejoin with what it knew, once
        # discovery had its chance to show a newer configuration.
        # An unknown configuration must not turn into a group of one.
        if local.uptime_ms >= window_ms and local.config:
            return [Start(tuple(a for a in local.config if a != local.raft_addr), local.epoch)]
        return []
    live = [p for p in peers if p.state == ALIVE]
    if any(p.raft.raft_state in RUNNING_STATES or p.raft.voters for p in live):
        return []   # a group exists (or is forming); wait for its leader to invite us
    if local.seen_group:
        # It has known a group: one cut off from it must not found another (a group's log
        # holds the ledger; a second group would sequence money the first never sees).
        # It waits to be invited back; if the group is lost for good, `galaxy recover`.
        return []
    alone = not live and not local.has_seeds
    if local.uptime_ms < window_ms and not (voters == 1 and alone):
        return []
    eligible_ids = [p.id for p in live if eligible(p.role)] + [local.id]
    if min(eligible_ids) == local.id:
        return [Found()]
    return []


def _newer_epoch(local: Local, peers: list[PeerInfo]) -> list[Action]:
    for p in peers:
        if p.state == ALIVE and p.raft.raft_state == "leader" and p.raft.epoch > local.epoch:
            return [Retire(f"the group was re-formed by galaxy recover (epoch {p.raft.epoch}, leader {p.id}); "
                           "this node joins it as a new spare")]
    return []


def _plan_leader(local: Local, peers: list[PeerInfo], voters: int, replace_after_ms: int) -> list[Action]:
    newer = _newer_epoch(local, peers)
    if newer:
        return newer
    mine = _group_ids(local, peers)
    for p in peers:
        if p.raft.epoch < local.epoch:
            continue        # an older epoch's leader retires when it sees ours
        if p.state == ALIVE and p.raft.raft_state == "leader" and _older_group_wins(mine, p.raft):
            return [Retire(f"two Raft groups met; the group of {min(p.raft.voters)} wins by rule")]
    if local.change_pending:
        return []
    addr_to_peer = {p.raft_addr: p for p in peers}
    by_id = {p.id: p for p in peers}
    owners = dict(local.config_ids)
    unclaimed = dict(local.unclaimed_ms)
    config = [a for a in local.config if a != local.raft_addr]
    for addr in config:
        p = addr_to_peer.get(addr)
        if p is None:
            owner = owners.get(addr)
            now = by_id.get(owner) if owner is not None else None
            if now is not None and now.state == ALIVE:
                return [Remove(owner, addr)]          # it is back at another address
            if unclaimed.get(addr, 0) >= replace_after_ms:
                return [Remove(owner or addr, addr)]
            continue
        if p.state == LEFT or p.raft.raft_state == LEAVING or (p.state == DEAD and p.silent_ms >= replace_after_ms):
            return [Remove(p.id, addr)]
    if len(local.config) >= voters:
        return []
    in_config = set(local.config)
    spares = sorted((p for p in peers if p.state == ALIVE and eligible(p.role) and p.raft_addr not in in_config
                     and p.raft.raft_state != LEAVING),
                    key=lambda p: p.id)
    if not spares:
        return []
    spare = spares[0]
    if spare.raft.raft_state == "starting" or (
            spare.raft.raft_state in ("follower", "candidate") and spare.raft.epoch == local.epoch
            and local.id in spare.raft.voters):
        # Started on our invitation, or running this group's Raft already (a voter back at
        # another address, or one replaced while away): reachable the moment it is added.
        # (One running another group's Raft is not taken in: it retires when the groups meet.)
        return [Add(spare.id, spare.raft_addr)]
    return [Invite(spare.id)]


def _plan_follower(local: Local, peers: list[PeerInfo], leader: tuple[str, RaftView] | None) -> list[Action]:
    newer = _newer_epoch(local, peers)
    if newer:
        return newer
    if leader is None:
        return []
    leader_id, view = leader
    if view.epoch < local.epoch:
        return []
    if leader_id == local.id or local.id in view.voters or local.id in view.invited:
        return []
    mine = _group_ids(local, peers)
    if _older_group_wins(mine, view):
        return [Retire(f"two Raft groups met; the group of {min(view.voters)} wins by rule")]
    if mine & set(view.voters) and view.term > local.term:
        return [Retire(f"leader {leader_id} (term {view.term}) no longer lists this node as a voter")]
    return []
