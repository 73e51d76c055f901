"""Messages between nodes: one frozen dataclass per type.

Theory of operation: every message a node sends to another is one of these classes and
is turned into bytes only by ``galaxy.wire``.  Each class has a ``TAG``; tags are only
ever appended (never reused or renumbered), so an old node can name what it does not
understand.  Fields are plain values (str, int, float, bool, bytes), tuples of them,
``dict[str, str]`` or nested dataclasses from this module, so the wire codec can check
every field's type and size from the annotations alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

# Member states, in the order a later judgement at one incarnation overrides an earlier.
ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
MEMBER_STATES = (ALIVE, SUSPECT, DEAD, LEFT)

# Node roles (DESIGN.md §2).
ROLES = ("auto", "coordinator", "standby", "worker")


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: float = 0.0           # cores offered
    memory_mb: int = 0
    gpu: int = 0
    free_cpu: float = 0.0
    free_memory_mb: int = 0
    free_gpu: int = 0
    load_1m: float = 0.0       # what the machine is doing, tasks or not (psutil; refreshed every few s)
    cpu_percent: float = 0.0
    memory_available_mb: int = 0
    task_memory_max_mb: int = 0  # the largest memory limit a task can get here (the node's hard ulimit -v); 0: no cap


@dataclass(frozen=True, slots=True)
class RaftView:
    """What one node knows of the Raft group (gossiped so that non-voters know too)."""

    term: int = 0
    leader: str = ""                     # node id of the leader this node follows; "" = none
    voters: tuple[str, ...] = ()         # node ids in the Raft configuration, as this node knows it
    invited: tuple[str, ...] = ()        # (leader only) spares asked to start Raft before being added
    raft_state: str = "none"             # none | starting | follower | candidate | leader | leaving
    epoch: int = 0                       # recovery epoch of the group (galaxy recover; docs/recover.md)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member as gossiped.  ``(incarnation, heartbeat)`` orders versions of a record."""

    id: str
    incarnation: int
    heartbeat: int
    state: str                           # one of MEMBER_STATES
    host: str
    gossip_port: int
    http_port: int
    raft_port: int
    role: str
    version: str
    cluster: str
    started_ms: int                      # wall clock when this incarnation started
    resources: Resources = field(default_factory=Resources)
    labels: dict[str, str] = field(default_factory=dict)
    raft: RaftView = field(default_factory=RaftView)
    owner: str = ""                      # the account paid for work done here ("" = none)
    runtime: str = ""                    # container runtime found on the machine ("" = none: trust low)
    tls: bytes = b""                     # SHA-256 of the HTTPS certificate peers pin; b"" = plain HTTP


@dataclass(frozen=True, slots=True)
class Beacon:
    """UDP broadcast beacon: 'a node of this cluster listens for gossip here'."""

    TAG: ClassVar[int] = 1
    cluster: str
    node_id: str
    host: str
    gossip_port: int


@dataclass(frozen=True, slots=True)
class Gossip:
    """Membership push; ``want_reply`` asks the receiver to push its table back (join)."""

    TAG: ClassVar[int] = 2
    members: tuple[MemberRecord, ...]
    want_reply: bool = False


# ---- SWIM failure detection (tags 3..19) -------------------------------------------------
# Liveness claims ride on every SWIM message; records (alive, left) come from the member
# itself, rumors (suspect, dead) from the others.  ``seq`` numbers are the sender's own.


@dataclass(frozen=True, slots=True)
class Rumor:
    """A claim by node ``by`` that member ``id`` is suspect or dead at ``incarnation``."""

    id: str
    incarnation: int
    state: str                           # suspect | dead
    by: str                              # the accuser (Lifeguard counts independent ones)


@dataclass(frozen=True, slots=True)
class Ping:
    """SWIM probe; only the node named ``target`` answers (with ``Ack(seq)``)."""

    TAG: ClassVar[int] = 3
    seq: int
    target: str
    members: tuple[MemberRecord, ...] = ()
    rumors: tuple[Rumor, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    """Indirect probe: please ping ``target`` at ``host:port`` and forward its ack (or a Nack)."""

    TAG: ClassVar[int] = 4
    seq: int
    target: str
    host: str
    port: int
    members: tuple[MemberRecord, ...] = ()
    rumors: tuple[Rumor, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    TAG: ClassVar[int] = 5
    seq: int
    members: tuple[MemberRecord, ...] = ()
    rumors: tuple[Rumor, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """From an indirect prober: the target did not answer me in time (but I am reachable)."""

    TAG: ClassVar[int] = 6
    seq: int


@dataclass(frozen=True, slots=True)
class Spread:
    """A gossip round's piggyback without a probe."""

    TAG: ClassVar[int] = 7
    members: tuple[MemberRecord, ...] = ()
    rumors: tuple[Rumor, ...] = ()


@dataclass(frozen=True, slots=True)
class Sync:
    """Full state (push-pull, join); ``members[0]`` is the sender's own record."""

    TAG: ClassVar[int] = 8
    members: tuple[MemberRecord, ...]
    rumors: tuple[Rumor, ...] = ()
    want_reply: bool = False


SWIM_TYPES: tuple[type, ...] = (Ping, PingReq, Ack, Nack, Spread, Sync)

# ---- replicated documents and anti-entropy (tags 20..39) ---------------------------------
# Documents travel as versions: one DocWire per version, a key's concurrent versions
# (siblings) as several.  Values are msgpack bytes (the writer's encoding, hashed and stored
# as is), since wire fields cannot carry arbitrary nested data.  See galaxy/gossip/replica.py.


@dataclass(frozen=True, slots=True)
class DocWire:
    """One version of a replicated document."""

    doc_type: str
    key: str
    value: bytes                         # msgpack of the value (of None for a tombstone)
    deleted: bool
    vclock: dict[str, int]               # node id -> counter (all > 0)
    hlc_wall_ms: int
    hlc_logical: int
    origin: str                          # the writer; also the HLC's node


@dataclass(frozen=True, slots=True)
class DigestNode:
    """The sender's view of one node of the key-hash tree (16 children per level).

    Inner: ``hashes`` holds the 16 children's 8-byte XOR aggregates.  Leaf (``hashes`` empty):
    ``entries`` lists every key below as 8-byte key hash + 8-byte version hash.
    """

    depth: int
    prefix: int                          # the top 4*depth bits of the key hashes below
    hashes: bytes = b""
    entries: bytes = b""


@dataclass(frozen=True, slots=True)
class DocUpdate:
    """Push of changed documents (gossip, UDP); each key's versions are its sender's full set."""

    TAG: ClassVar[int] = 20
    docs: tuple[DocWire, ...]
    also: tuple[str, ...] = ()           # the other members the sender pushed these to at once


@dataclass(frozen=True, slots=True)
class DocSync:
    """One step of push-pull anti-entropy (TCP): digest nodes, versions sent, key hashes wanted.

    An empty DocSync means "nothing more from me"; ``more`` says the sender has work left
    that did not fit this frame, so the receiver answers (if need be with an empty DocSync).
    """

    TAG: ClassVar[int] = 21
    nodes: tuple[DigestNode, ...] = ()
    docs: tuple[DocWire, ...] = ()
    want: bytes = b""                    # 8-byte key hashes whose versions the sender asks for
    more: bool = False


@dataclass(frozen=True, slots=True)
class DocPut:
    """A write that needs a durable copy on another node (a task submission): the receiver
    merges and persists the versions, then answers ``DocAck`` with the same ``req_id``."""

    TAG: ClassVar[int] = 22
    req_id: int
    docs: tuple[DocWire, ...]


@dataclass(frozen=True, slots=True)
class DocAck:
    """The versions of ``DocPut(req_id)`` are on the sender's disk."""

    TAG: ClassVar[int] = 23
    req_id: int


@dataclass(frozen=True, slots=True)
class DocHave:
    """The sender holds these versions (a DocUpdate's, by 16-byte version id): its rumours
    need not reach the sender again.  Not a durability ack (that is DocAck)."""

    TAG: ClassVar[int] = 24
    vids: bytes


REPLICA_TYPES: tuple[type, ...] = (DocUpdate, DocSync, DocPut, DocAck, DocHave)

# ---- ledger entries (tags 60..79) ----------------------------------------------------------
# Commands of the Raft log applied by galaxy/ledger/core.py; every one carries an
# idempotency ``key`` and the wall time ``at_ms`` at which a node accepted the request.


@dataclass(frozen=True, slots=True)
class OpenAccount:
    TAG: ClassVar[int] = 60
    key: str
    name: str
    role: str
    password_hash: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Mint:
    TAG: ClassVar[int] = 61
    key: str
    to: str
    amount: int
    by: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Burn:
    TAG: ClassVar[int] = 62
    key: str
    account: str
    amount: int
    by: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Transfer:
    TAG: ClassVar[int] = 63
    key: str
    src: str
    dst: str
    amount: int
    by: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Hold:
    """Escrow a task's price from its submitter when the task is accepted."""

    TAG: ClassVar[int] = 64
    key: str
    task_id: str
    account: str
    amount: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class TaskSettle:
    """A task ended: pay its hold to the node's owner on success, else refund; move credit."""

    TAG: ClassVar[int] = 65
    key: str
    task_id: str
    node_id: str
    node_owner: str
    succeeded: bool
    at_ms: int


@dataclass(frozen=True, slots=True)
class SetAccount:
    """Change an account's role or password, or revoke its tokens issued before a time."""

    TAG: ClassVar[int] = 66
    key: str
    name: str
    role: str = ""
    password_hash: str = ""
    tokens_valid_after_ms: int = 0
    at_ms: int = 0


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How one task ended, for ``TaskSettleBatch``."""

    task_id: str
    node_id: str
    node_owner: str
    succeeded: bool


@dataclass(frozen=True, slots=True)
class TaskSettleBatch:
    """Many ``TaskSettle``s in one log entry: the coordinator settles what ended since its
    last sweep at once, so a busy mesh spends one Raft round trip per sweep, not per task."""

    TAG: ClassVar[int] = 67
    key: str
    outcomes: tuple[TaskOutcome, ...]
    at_ms: int


LEDGER_TYPES: tuple[type, ...] = (OpenAccount, Mint, Burn, Transfer, Hold, TaskSettle, SetAccount, TaskSettleBatch)

MESSAGE_TYPES: tuple[type, ...] = (Beacon, Gossip, *SWIM_TYPES, *REPLICA_TYPES)

# ---- replicated commands (tags 40..59) ----------------------------------------------------
# Entries of the Raft log, applied by every voter's state machines in log order
# (galaxy/consensus/commands.py).  They never travel as gossip frames: ``wire.encode_command``
# turns them into versioned bytes without the AES envelope (pysyncobj's transport is already
# encrypted and the log is local).  Tags share the append-only numbering of the messages.


@dataclass(frozen=True, slots=True)
class ConfigSet:
    """Change cluster-wide settings (galaxy/settings.py): ``values`` maps a setting to its new
    value as text (parsed by galaxy/config.py's rule for that field); ``unset`` gives keys
    back to each node's own value.  Applied all at once or not at all."""

    TAG: ClassVar[int] = 40
    values: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    by: str = ""                         # the node that accepted the request (for logs)


@dataclass(frozen=True, slots=True)
class CommandBatch:
    """Many commands in one log entry (group commit, galaxy/consensus/coordinator.py): each item
    is the ``wire.encode_command`` bytes of one command.  Applied in order, each as if it were
    its own entry (galaxy/consensus/commands.py); the entry's result lists theirs."""

    TAG: ClassVar[int] = 41
    commands: tuple[bytes, ...] = ()


COMMAND_TYPES: tuple[type, ...] = (ConfigSet, *LEDGER_TYPES, CommandBatch)

# ---- security commands (tags 80..89): keyring rotation and join tokens -------------------------


@dataclass(frozen=True, slots=True)
class KeyringChange:
    """Install, use (make primary) or remove a cluster key everywhere (galaxy/keyring.py).
    ``base`` is the proposer's running ring, primary first: it seeds an empty machine."""

    TAG: ClassVar[int] = 80
    op: str
    key: str
    base: tuple[str, ...] = ()
    by: str = ""


@dataclass(frozen=True, slots=True)
class JoinUse:
    """Spend a join token's nonce (galaxy/join.py): the first entry for a nonce wins, every
    later one is refused, on every voter.  ``now_ms`` (the redeeming member's wall clock)
    prunes spent nonces whose token has expired, deterministically."""

    TAG: ClassVar[int] = 81
    nonce: str
    expires_ms: int
    now_ms: int
    by: str = ""


SECURITY_TYPES: tuple[type, ...] = (KeyringChange, JoinUse)
COMMAND_TYPES = (*COMMAND_TYPES, *SECURITY_TYPES)
