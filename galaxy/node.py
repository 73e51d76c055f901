"""One Galaxy node: wires store, wire codec, gossip, discovery, consensus and HTTP together.

Theory of operation
-------------------
``Node.start()`` brings the layers up in dependency order (store -> codec -> gossip ->
consensus -> discovery -> HTTP) and ``Node.stop()`` takes them down in reverse, leaving
the mesh gracefully first (a coordinator hands leadership over, then the node gossips
``left``).  Between the two, one control loop runs every Raft heartbeat: it reads the
clock once, lets the consensus adapter act on what gossip says, and publishes this
node's Raft view and resources in its own member record.  No protocol decision is made
here; they live in ``gossip.membership`` and ``consensus.voters``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil

from galaxy import __version__, wire
from galaxy.clock import Clock, SystemClock
from galaxy.config import Config
from galaxy.consensus import voters as planner
from galaxy.consensus.coordinator import Coordinator
from galaxy.doctor import CLOCK_SKEW_WARN_MS, DISK_FREE_MIN_BYTES
from galaxy.gossip.skew import SkewEstimator
from galaxy.messages import ALIVE, DEAD, LEFT, MEMBER_STATES, SUSPECT, MemberRecord, Resources
from galaxy.store import PeerRow, Store
from galaxy.tls import fingerprint_text

log = logging.getLogger("galaxy.node")

KEY_FILE = "cluster.key"
RUNTIME_FILE = "runtime.json"
# Test-only switch: run stock pysyncobj (memory journal, no pre-vote) to show that the
# one-leader-per-term test catches the double vote.  Deliberately not a config field.
UNSAFE_RAFT_ENV = "_GALAXY_TEST_UNSAFE_RAFT"
KV_TYPE = "kv"                  # the document type behind /v1/kv (Consul-style key-value)
LEADER_HISTORY_MAX = 20        # leader changes kept for /v1/status and the dashboard
RESOURCE_PROBE_INTERVAL_MS = 5000   # load and available memory in the member record
# A leaving voter waits at most this many max election timeouts (6 s LAN) to be removed from
# the Raft group (Node._leave_raft); measured 0.35-0.76 s on loopback (2 voters, noisy machine).
LEAVE_RAFT_TIMEOUTS = 10


def new_node_id() -> str:
    return "n-" + os.urandom(4).hex()


def detect_advertise() -> str:
    """The first non-loopback IPv4 address of an interface that is up, else loopback."""
    stats = psutil.net_if_stats()
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "127.0.0.1"


def container_runtime() -> str:
    """The container runtime on this machine, if any (the seeds' trust rule: none -> low)."""
    return next((name for name in ("docker", "podman") if shutil.which(name)), "")


def hold_tcp_port(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port), to hold the Raft port.

    pysyncobj binds its port only when Raft starts, which for a new node is when the
    coordinator invites it to vote, seconds or hours after it came up. Held from startup,
    the port is known free (a taken one is an error now, not a silent retry loop later)
    and no other program can take it meanwhile. Peers that connect early are closed at the
    coordinator's next step (``Coordinator._refuse_early``); the hold is released just
    before pysyncobj binds.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as pysyncobj binds it
    try:
        s.bind((host, port))
        s.listen(8)
        s.setblocking(False)
    except OSError as e:
        s.close()
        raise SystemExit(f"galaxy: error: Raft port {host}:{port} cannot be used: {e.strerror or e}; "
                         f"choose another with --raft-port") from None
    return s


def free_port(host: str, udp_too: bool = False) -> int:
    """A TCP port free right now on ``host`` (and for UDP too, when asked).

    For the gossip port, whose number serves UDP and TCP at once: an ephemeral UDP port
    may be a taken TCP one.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no port free for both TCP and UDP on {host}")


def offered_resources(cfg: Config) -> Resources:
    cpu = cfg.cpu if cfg.cpu is not None else float(psutil.cpu_count() or 1)
    memory_mb = cfg.memory_mb if cfg.memory_mb is not None else psutil.virtual_memory().total // (1 << 20)
    if cfg.gpu is not None:
        gpu = cfg.gpu
    else:
        from galaxy.executor.resources import probe_gpus
        gpu = len(probe_gpus())
    from galaxy.executor.resources import task_memory_max_mb
    return Resources(cpu=cpu, memory_mb=memory_mb, gpu=gpu, free_cpu=cpu, free_memory_mb=memory_mb, free_gpu=gpu,
                     task_memory_max_mb=task_memory_max_mb())


class Node:
    def __init__(self, cfg: Config, clock: Clock | None = None, on_fatal=None) -> None:
        self.cfg = cfg
        self.clock = clock or SystemClock()
        self.failed = False                  # an invariant broke: the process exits non-zero
        self._on_fatal = on_fatal
        self.node_id = ""
        self.founded_key = False
        self._tasks: list[asyncio.Task] = []
        self._discovery: list[Any] = []
        self._http_runner = None
        self._stopping = False
        self._peers_dirty = False
        self.tasks: Any = None               # the TaskService, once started
        self._lease_seen: int | None = None  # the coordinator's lease as the task loop last heard of it
        self.leader_history: deque[dict] = deque(maxlen=LEADER_HISTORY_MAX)
        self.started_wall_ms = self.clock.wall_ms()
        self._next_probe_ms = 0
        self._probed: dict = {}
        self.skew = SkewEstimator()          # peers' wall clocks, from the frames they send

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
        self.store = Store(cfg.data_dir)
        self.node_id = cfg.node_id or self.store.node_id(new_node_id)
        if cfg.node_id and self.store.get("node_id") != cfg.node_id:
            self.store.put("node_id", cfg.node_id)
        from galaxy import logs
        logs.setup(self.node_id, cfg.log_format, cfg.log_level)
        from galaxy import keyring
        ring = keyring.load(cfg.data_dir) or keyring.Ring(0, (keyring.key_text(self._load_key()),))
        keys = [wire.parse_key(k) for k in ring.keys]       # the primary first (docs/security.md)
        key = keys[0]
        self.key_fingerprint = wire.key_fingerprint(key)
        previous = self.store.get("key_fingerprint")
        if previous not in (None, self.key_fingerprint):
            log.warning("this data dir last ran with another cluster key (%s, now %s): it will not hear its old "
                        "mesh", previous, self.key_fingerprint)
        self.store.put("key_fingerprint", self.key_fingerprint)
        self.codec = wire.Codec(cfg.cluster, keys, self.node_id, frame_max_bytes=cfg.frame_max_bytes,
                                replay_window_ms=cfg.replay_window_ms,
                                # frames captured before a restart cannot be replayed after it
                                replay_floor_ms=self.clock.wall_ms())
        self.host = cfg.advertise or (cfg.bind if cfg.bind not in ("0.0.0.0", "") else detect_advertise())
        from galaxy import tls
        from galaxy.config import ConfigError
        try:
            self.tls = tls.server_tls(cfg, hosts=(self.host, cfg.bind))
        except ConfigError as e:
            raise SystemExit(f"galaxy: error: {e}") from None
        # Peers' URLs and certificate pins, from their gossiped records (galaxy/tls.py).
        self.peers = tls.PeerTLS(lambda: (m.record for m in self.membership.members()))
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))

        from galaxy.gossip.membership import Membership
        from galaxy.gossip.runner import GossipRunner
        raft_hold = hold_tcp_port(cfg.bind, cfg.raft_port)
        raft_port = raft_hold.getsockname()[1]
        self._stored_incarnation = self.store.next_incarnation()
        me = MemberRecord(
            id=self.node_id, incarnation=self._stored_incarnation, heartbeat=0, state=ALIVE,
            host=self.host, gossip_port=cfg.gossip_port, http_port=cfg.http_port, raft_port=raft_port,
            role=cfg.role, version=__version__, cluster=cfg.cluster, started_ms=self.started_wall_ms,
            owner=cfg.owner or "", runtime=container_runtime(),
            resources=offered_resources(cfg), labels=dict(cfg.labels),
            tls=self.tls.fingerprint if self.tls else b"")
        self.membership = Membership(me, cfg, rng, self.clock.now_ms())
        self._member_views: dict[str, tuple[int, list]] = {}  # name -> (membership.changes, views)
        self.gossip = GossipRunner(self.membership, self.codec, self.clock, cfg.bind,
                                   cfg.gossip_port or free_port(cfg.bind, udp_too=True),
                                   on_events=self._on_member_events, on_fatal=self._fatal,
                                   on_message=self._on_gossip_message, on_frame=self._on_frame)
        await self.gossip.start()
        gossip_port = self.gossip.port

        # Replicated documents: rumours on the gossip UDP socket, push-pull anti-entropy
        # over TCP on the same port number (docs/gossip.md).
        from galaxy.gossip.docs import DocGossip
        from galaxy.gossip.docs_runner import DocsRunner
        from galaxy.gossip.replica import SYNC_FRAME_BYTES_MAX, Replica
        from galaxy.tasks.core import TASK_TYPE
        from galaxy.tasks.runner import TASK_RESOLVER
        from galaxy.settings import CONFIG_RESOLVER, CONFIG_TYPE
        from galaxy.ledger.runner import TRANSFER_RESOLVER, TRANSFER_TYPE
        self.replica = Replica(self.node_id, {TASK_TYPE: TASK_RESOLVER, CONFIG_TYPE: CONFIG_RESOLVER,
                                              TRANSFER_TYPE: TRANSFER_RESOLVER,
                                              keyring.KEYRING_TYPE: keyring.KEYRING_RESOLVER})
        self.sync_codec = sync_codec = wire.Codec(cfg.cluster, keys, self.node_id, frame_max_bytes=SYNC_FRAME_BYTES_MAX,
                                replay_window_ms=cfg.replay_window_ms, replay_floor_ms=self.clock.wall_ms())
        self.docs = DocsRunner(
            replica=self.replica, core=DocGossip(self.node_id, cfg, rng, self.clock.now_ms()), store=self.store,
            udp_codec=self.codec, tcp_codec=sync_codec, clock=self.clock, send_udp=self.gossip.send,
            live_peers=self._doc_peers, cluster=cfg.cluster, frame_max_bytes=cfg.frame_max_bytes,
            on_fatal=self._fatal)
        await self.docs.start(cfg.bind, gossip_port)

        from galaxy.executor import Executor
        from galaxy.tasks.blobs import Blobs
        from galaxy.tasks.runner import TaskService
        self.tasks = TaskService(
            cfg=cfg, node_id=self.node_id, clock=self.clock, docs=self.docs,
            executor=Executor(os.path.join(cfg.data_dir, "tasks"), clock=self.clock),
            blobs=Blobs(os.path.join(cfg.data_dir, "blobs"), cfg.input_bytes_max), store=self.store,
            members=self._task_members, lease_term=self._lease_term, known_term=self._known_term,
            coordinator_id=lambda: self.leader_history[-1]["leader"] if self.leader_history else None,
            on_fatal=self._fatal, on_drained=self._drained)

        # Replicated commands and cluster-wide settings (docs/config.md); the coordinator is
        # attached below, once it exists.
        from galaxy.api.internal import InternalAuth
        from galaxy.consensus.gateway import CommandGateway
        from galaxy.settings_runner import SettingsRunner
        self.internal_auth = InternalAuth(wire.derive_secret(key, "http-internal"), cfg.replay_window_ms)
        self.tasks.blobs.sign = self._signed_get
        self.commands = CommandGateway(node_id=self.node_id, coordinator=None, leader_http=lambda: self.leader()["http"],
                                       auth=self.internal_auth, clock=self.clock, ssl_for=self.peers.ssl_for)
        self.keyring = keyring.KeyringRunner(node_id=self.node_id, data_dir=cfg.data_dir, ring=ring,
                                             replica=self.replica, docs=self.docs, gateway=self.commands,
                                             coordinator=None, apply_keys=self._apply_keys)
        self.raft_fernet = keyring.RotatingFernet([wire.derive_secret(key, self._raft_label())])
        self.settings = SettingsRunner(node_id=self.node_id, base=cfg, replica=self.replica, docs=self.docs,
                                       gateway=self.commands, coordinator=None, apply_cfg=self._apply_settings)

        from galaxy.ledger.runner import LedgerService
        self.ledger = LedgerService(
            node_id=self.node_id, clock=self.clock, docs=self.docs, gateway=self.commands,
            coordinator=lambda: getattr(self, "coordinator", None), token_secret=wire.derive_secret(key, "tokens"),
            admin_password=cfg.admin_password, on_fatal=self._fatal,
            pending_per_account_max=cfg.transfers_pending_per_account_max)
        self.ledger.settled_tasks = self.tasks.unsettled
        self.ledger.forget_task = self.tasks.settled
        self.tasks.hold = self.ledger.hold
        self.tasks.trust_of = self._trust_of
        self._apply_keys(keys)
        from galaxy.join_runner import JoinService
        self.join = JoinService(node_id=self.node_id, cluster=cfg.cluster, clock=self.clock, keyring=self.keyring,
                                gateway=self.commands, seeds=self._join_seeds, timeout_ms=cfg.raft_call_timeout_ms * 2)

        from galaxy.api.app import make_app, serve
        self.tasks.blobs.ssl_for = self.peers.ssl_for
        self._http_runner, http_port = await serve(make_app(self), cfg.bind, cfg.http_port,
                                                   ssl_context=self.tls.context() if self.tls else None)
        self.gossip.update_self(gossip_port=gossip_port, http_port=http_port)
        self.http_url = self.peers.url_of(self.membership.me())

        from galaxy.settings import ClusterSettings
        loop = asyncio.get_running_loop()

        from galaxy.join import JoinNonces
        from galaxy.ledger.core import Ledger

        def settings_machines() -> list:
            return [ClusterSettings(), Ledger(), keyring.KeyringMachine(), JoinNonces()]

        self.coordinator = Coordinator(
            cfg=cfg, node_id=self.node_id, raft_host=self.host, raft_port=raft_port, raft_hold=raft_hold,
            data_dir=cfg.data_dir,
            secret=self.raft_fernet, store=self.store,
            safe=os.environ.get(UNSAFE_RAFT_ENV) != "1", machines=settings_machines,
            on_fatal=lambda exc: loop.call_soon_threadsafe(self._fatal, exc),
            on_epoch=lambda _epoch: self.raft_fernet.set_secrets(self._raft_secrets()))
        self.commands.coordinator = self.settings.coordinator = self.keyring.coordinator = self.coordinator

        from galaxy.discovery.seeds import SeedBackoff
        self.seeds = SeedBackoff(cfg.join, cfg.seed_retry_min_ms, cfg.seed_retry_max_ms, rng)
        await self._start_discovery(gossip_port, http_port, raft_port, rng)

        # Peers remembered from earlier runs are contacts too: a restarted node finds its
        # mesh again even with no seed and no multicast.
        for peer in self.store.peers():
            self.gossip.discovered(peer.host, peer.gossip_port)
        self._write_runtime(gossip_port, http_port, raft_port)
        await self.tasks.start()
        await self.ledger.start()
        self._tasks.append(asyncio.create_task(self._control_loop(), name="control"))
        self._print_banner(gossip_port, raft_port)

    async def _start_discovery(self, gossip_port: int, http_port: int, raft_port: int, rng: random.Random) -> None:
        cfg = self.cfg
        if cfg.mdns:
            from galaxy.discovery.mdns import MdnsDiscovery
            self._discovery.append(MdnsDiscovery(
                cfg.cluster, self.node_id, self.host, gossip_port, http_port, raft_port, cfg.role, __version__,
                self._on_peer))
        if cfg.broadcast:
            from galaxy.discovery.broadcast import BroadcastBeacons
            self._discovery.append(BroadcastBeacons(
                self.codec, self.clock, cfg.cluster, self.node_id, self.host, gossip_port, cfg.broadcast_port,
                cfg.beacon_interval_ms, self._on_peer, rng))
        for d in self._discovery:
            try:
                await d.start()
            except (OSError, ValueError) as e:
                log.warning("discovery %s unavailable: %s", type(d).__name__, e)

    def _on_peer(self, peer) -> None:
        if peer.node_id == self.node_id:
            return
        if peer.node_id and self.membership.get(peer.node_id) is not None:
            return      # already a member; gossip keeps it fresh
        self.gossip.discovered(peer.host, peer.gossip_port)

    def _remember_peers(self) -> None:
        """Keep the alive peers' addresses in the store (one transaction, on membership changes)."""
        wall_ms = self.clock.wall_ms()
        self.store.remember_peers(PeerRow(m.record.id, m.record.host, m.record.gossip_port, wall_ms)
                                  for m in self.membership.alive_peers())

    def _on_gossip_message(self, sender: str, addr: tuple[str, int], msg: Any) -> None:
        from galaxy.messages import DocAck, DocHave, DocPut, DocUpdate
        docs = getattr(self, "docs", None)
        if docs is None:
            return
        if isinstance(msg, DocUpdate):
            docs.on_update(sender, msg, addr)
        elif isinstance(msg, DocHave):
            docs.on_have(sender, msg)
        elif isinstance(msg, DocPut):
            docs.on_put(sender, addr, msg)
        elif isinstance(msg, DocAck):
            docs.on_ack(sender, msg)

    def _on_frame(self, sender: str, sent_ms: int, wall_ms: int) -> None:
        if sender != self.node_id:
            self.skew.observe(self.clock.now_ms(), sender, sent_ms, wall_ms)

    def _member_view(self, name: str, build: Callable[[], list]) -> list:
        """``build()``'s list of member views, built again only when the membership changed
        (they are asked for on every write and every worker step)."""
        changes = self.membership.changes
        hit = self._member_views.get(name)
        if hit is None or hit[0] != changes:
            hit = self._member_views[name] = (changes, build())
        return list(hit[1])

    def _doc_peers(self) -> list:
        """The live peers as document gossip sees them."""
        from galaxy.gossip.docs import Peer
        return self._member_view("doc_peers", lambda: [Peer(m.record.id, m.record.host, m.record.gossip_port)
                                                       for m in self.membership.alive_peers()])

    # ---------------------------------------------------------------- tasks
    def _signed_get(self, path: str) -> dict[str, str]:
        """Headers that sign a GET of ``path`` as this node (input archives fetched from a peer)."""
        from galaxy.api.internal import AUTH_HEADER, new_nonce
        return {AUTH_HEADER: self.internal_auth.header(self.node_id, self.clock.wall_ms(), "GET", path, b"",
                                                       new_nonce())}

    def _task_members(self) -> list:
        """The members as the task service sees them."""
        from galaxy.tasks.runner import MemberInfo
        return self._member_view("task_members", lambda: [
            MemberInfo(id=m.record.id, state=m.state, role=m.record.role, http=self.peers.url_of(m.record),
                       cpu=m.record.resources.cpu, memory_mb=m.record.resources.memory_mb,
                       memory_max_mb=m.record.resources.task_memory_max_mb,
                       gpu=m.record.resources.gpu, labels=dict(m.record.labels), owner=m.record.owner)
            for m in self.membership.members()])

    def _trust_of(self, node_id: str) -> str:
        from galaxy.ledger.core import trust
        m = self.membership.get(node_id)
        return trust(self.ledger.credit_of_node(node_id), isolated=bool(m is not None and m.record.runtime))

    def _lease_term(self) -> int | None:
        """The Raft term while this node holds the coordinator's lease, else None."""
        term = self.coordinator.term
        return term if self.coordinator.is_coordinator() else None

    def _known_term(self) -> int:
        """The highest Raft term this node knows of: its own Raft's, or one a member gossips
        (asked for at every worker step; the members' part is rebuilt only when they change)."""
        gossiped = self._member_view("raft_term", lambda: [
            max((m.record.raft.term for m in self.membership.members()), default=0)])[0]
        return max(self.coordinator.leader()[1], gossiped)

    def _drained(self) -> None:
        if self._on_fatal is not None:       # run_node's stop event: leave the mesh and exit 0
            self._on_fatal()

    def _publish_free_resources(self) -> None:
        """Gossip what is free after the attempts running here (the dashboard and status show it)."""
        offered = self.membership.me().resources
        used_cpu = used_mem = used_gpu = 0
        for t in self.tasks.running_here():
            used_cpu += t.spec.cpu
            used_mem += t.spec.memory_mb
            used_gpu += t.spec.gpu
        now_ms = self.clock.now_ms()
        if now_ms >= self._next_probe_ms:      # the machine's own load: cheap, but no need to gossip it often
            from galaxy.executor.resources import probe
            self._next_probe_ms = now_ms + RESOURCE_PROBE_INTERVAL_MS
            self._probed = probe(gpus=False)
        p = self._probed
        free = dataclasses.replace(
            offered, free_cpu=round(max(0.0, offered.cpu - used_cpu), 3),
            free_memory_mb=max(0, offered.memory_mb - used_mem), free_gpu=max(0, offered.gpu - used_gpu),
            load_1m=p["load_avg"][0], cpu_percent=round(p["cpu_percent"], 1),
            memory_available_mb=p["memory_available_mb"])
        if free != offered:
            self.gossip.update_self(resources=free)

    # ---------------------------------------------------------------- key-value documents
    def kv_get(self, key: str) -> dict | None:
        doc = self.replica.get(KV_TYPE, key)
        return None if doc is None else self._kv_view(doc)

    def kv_put(self, key: str, value: Any) -> dict:
        return self._kv_view(self.docs.put(KV_TYPE, key, value))

    def kv_delete(self, key: str) -> bool:
        if self.replica.get(KV_TYPE, key) is None:
            return False
        self.docs.delete(KV_TYPE, key)
        return True

    def kv_list(self, prefix: str = "", limit: int = 1000) -> list[dict]:
        docs = sorted((d for d in self.replica.items(KV_TYPE) if d.key.startswith(prefix)), key=lambda d: d.key)
        return [self._kv_view(d) for d in docs[:limit]]

    def _kv_view(self, doc) -> dict:
        return {"key": doc.key, "value": doc.value, "origin": doc.origin,
                "hlc": {"wall_ms": doc.hlc.wall_ms, "logical": doc.hlc.logical},
                "versions": len(self.replica.versions(KV_TYPE, doc.key))}

    def _on_member_events(self, events) -> None:
        if any(new == ALIVE for _, _, new in events):
            self._peers_dirty = True
        if self.tasks is not None:      # a dead node's attempts are given up, a drained one's left
            self.tasks.wake()
        for node_id, old, new in events:
            log.info("member %s: %s -> %s", node_id, old or "new", new,
                     extra={"event": "member", "member": node_id, "old": old, "new": new})

    async def _control_loop(self) -> None:
        interval_s = self.cfg.raft_heartbeat_ms / 1000
        announced = False
        while not self._stopping:
            try:
                now_ms = self.clock.now_ms()
                for host, port in self.seeds.due(now_ms):
                    self.gossip.discovered(host, port)
                self._mark_joined_seeds()
                self.coordinator.step(now_ms, self._peer_infos(now_ms), has_seeds=bool(self.cfg.join))
                self.settings.step()
                self.keyring.step()
                view = self.coordinator.view()
                if view != self.membership.me().raft:
                    self.gossip.update_self(raft=view)
                if self._peers_dirty:
                    self._peers_dirty = False
                    self._remember_peers()
                self._track_leader()
                self._track_lease()
                self._publish_free_resources()
                if self.membership.me().incarnation > self._stored_incarnation:
                    # a refutation raised it: the next run must start above it
                    self._stored_incarnation = self.store.next_incarnation(above=self.membership.me().incarnation)
                if not announced and self.ready()[0]:
                    announced = True
                    self._announce_ready()
            except Exception as e:
                self._fatal(e)
                return
            await asyncio.sleep(interval_s)

    def _track_lease(self) -> None:
        """Wake the task loop when this node gains or loses the coordinator's lease: it starts
        (or stops) scheduling now, not at its next tick."""
        lease = self._lease_term()
        if lease != self._lease_seen and self.tasks is not None:
            self._lease_seen = lease
            self.tasks.wake()

    def _track_leader(self) -> None:
        leader = self.leader()
        if leader["leader"] is None:
            return
        last = self.leader_history[-1] if self.leader_history else None
        if last is None or (last["leader"], last["term"]) != (leader["leader"], leader["term"]):
            self.leader_history.append({"term": leader["term"], "leader": leader["leader"],
                                        "at_ms": self.clock.wall_ms()})
            if not self.coordinator.running:   # voters log what Raft shows them (consensus logger)
                log.info("coordinator is %s (term %d)", leader["leader"], leader["term"],
                         extra={"event": "coordinator", "term": leader["term"], "leader": leader["leader"]})

    def _apply_keys(self, keys: list[bytes]) -> None:
        """A new keyring (galaxy/keyring.py): every user of the cluster key takes it now,
        accepting any installed key and sending with the first."""
        self.codec.set_keys(keys)
        self.sync_codec.set_keys(keys)
        self.internal_auth.set_secrets([wire.derive_secret(k, "http-internal") for k in keys])
        tokens = [wire.derive_secret(k, "tokens") for k in keys]
        self.ledger._secret, self.ledger.accepted_secrets = tokens[0], tuple(tokens)
        self._keys = keys
        self.raft_fernet.set_secrets(self._raft_secrets())
        self.key_fingerprint = wire.key_fingerprint(keys[0])
        self.store.put("key_fingerprint", self.key_fingerprint)

    def _raft_label(self) -> str:
        # the Raft transport key changes with the recovery epoch (docs/recover.md)
        from galaxy.consensus.recover import raft_label
        return raft_label(int(self.store.get("raft.epoch") or 0))

    def _raft_secrets(self) -> list[bytes]:
        return [wire.derive_secret(k, self._raft_label()) for k in self._keys]

    def _join_seeds(self) -> list:
        from galaxy.join import Seed
        me = self.membership.me()
        alive = [m.record for m in self.membership.alive_peers()]
        # an https seed carries its certificate pin in the token: the new machine has no key yet to
        # read it from gossip (galaxy/join_runner.py)
        return [Seed(r.host, r.gossip_port, self.peers.url_of(r) + (f"#sha256={r.tls.hex()}" if r.tls else ""))
                for r in [me, *alive]]

    def _apply_settings(self, cfg: Config) -> None:
        """New cluster-wide settings: every subsystem that reads one takes the new Config now."""
        self.cfg = cfg
        self.membership.reconfigure(cfg)
        self.docs.reconfigure(cfg)
        self.tasks.cfg = cfg
        self.tasks.blobs.bytes_max = cfg.input_bytes_max
        self.coordinator.reconfigure(cfg)

    def _fatal(self, exc: BaseException) -> None:
        """An invariant broke: stop rather than run on in a wrong state."""
        log.error("stopping the node: %s", exc, exc_info=exc, extra={"event": "fatal"})
        self.failed = True
        if self._on_fatal is not None:
            self._on_fatal()

    def _mark_joined_seeds(self) -> None:
        known = {(m.record.host, m.record.gossip_port) for m in self.membership.members() if m.record.id != self.node_id}
        for host, port in self.seeds.pending:
            if (host, port) in known:
                self.seeds.joined(host, port)
            else:
                # seeds may be given by name; a member answering from the resolved address counts
                with contextlib.suppress(OSError):
                    if (socket.gethostbyname(host), port) in known:
                        self.seeds.joined(host, port)

    def _peer_infos(self, now_ms: int) -> list[planner.PeerInfo]:
        return [
            planner.PeerInfo(id=m.record.id, state=m.state, role=m.record.role,
                             raft_addr=f"{m.record.host}:{m.record.raft_port}", raft=m.record.raft,
                             silent_ms=max(0, now_ms - m.last_heard_ms))
            for m in self.membership.members() if m.record.id != self.node_id
        ]

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("leaving the mesh", extra={"event": "leaving"})
        await self._leave_raft()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.ledger.stop()
        await self.tasks.stop()
        await self.docs.stop()
        await self.gossip.stop(leave=True)
        # the next run must gossip an incarnation above the one that just left
        self.store.next_incarnation(above=self.membership.me().incarnation)
        await asyncio.get_running_loop().run_in_executor(None, self.coordinator.stop)
        for d in self._discovery:
            with contextlib.suppress(Exception):
                await d.stop()
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.cfg.data_dir, RUNTIME_FILE))
        self.store.close()

    async def _leave_raft(self) -> None:
        """A voter leaving gracefully has itself removed from the Raft group before it stops
        Raft (handing leadership over first if it leads), so that the voters left keep a
        quorum: with two voters, the survivor alone could neither remove a departed one nor
        elect itself (docs/consensus.md "Who votes").  Bounded by ``LEAVE_RAFT_TIMEOUTS``
        election timeouts; then it stops anyway, as a crash would."""
        co = self.coordinator
        if not co.running:
            return
        co.begin_leave()
        self.gossip.update_self(raft=co.view())
        deadline = time.monotonic() + LEAVE_RAFT_TIMEOUTS * self.cfg.raft_max_timeout_ms / 1000
        while (how := co.leave_step(now_ms := self.clock.now_ms(), self._peer_infos(now_ms))) is None:
            if time.monotonic() >= deadline:
                log.warning("the coordinator group did not remove this voter in time; stopping anyway, as a "
                            "crash would (the other voters replace it after voter_replace_after_ms if they "
                            "keep a quorum)", extra={"event": "leave_timeout"})
                return
            self.gossip.update_self(raft=co.view())
            await asyncio.sleep(self.cfg.raft_heartbeat_ms / 1000)
        if how == "removed":
            log.info("removed from the coordinator group", extra={"event": "raft_left", "how": how})
        elif how == "last":
            log.info("no other voter stays: leaving the coordinator group as it is",
                     extra={"event": "raft_left", "how": how})

    # ---------------------------------------------------------------- key and files
    def _load_key(self) -> bytes:
        cfg = self.cfg
        try:
            if cfg.cluster_key:
                return wire.parse_key(cfg.cluster_key)
            path = cfg.cluster_key_file or os.path.join(cfg.data_dir, KEY_FILE)
            if cfg.cluster_key_file or os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    return wire.parse_key(f.read())
        except (OSError, ValueError) as e:
            raise SystemExit(f"galaxy: error: cluster key: {e}") from None
        text = wire.generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.founded_key = True
        return wire.parse_key(text)

    def _write_runtime(self, gossip_port: int, http_port: int, raft_port: int) -> None:
        doc = {"id": self.node_id, "pid": os.getpid(), "http": self.http_url, "gossip_port": gossip_port,
               "raft_port": raft_port, "cluster": self.cfg.cluster, "host": self.host}
        path = os.path.join(self.cfg.data_dir, RUNTIME_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(path + ".tmp", path)

    def _print_banner(self, gossip_port: int, raft_port: int) -> None:
        key_path = self.cfg.cluster_key_file or os.path.join(self.cfg.data_dir, KEY_FILE)
        lines = [
            f"galaxy {__version__}: node {self.node_id} up (cluster {self.cfg.cluster!r}, role {self.cfg.role})",
            f"  http    {self.http_url}",
        ]
        if self.tls:
            how = "new self-signed certificate" if self.tls.generated else "certificate"
            lines.append(f"  tls     {how} {self.tls.cert_path}")
            lines.append(f"          SHA-256 fingerprint {fingerprint_text(self.tls.fingerprint)}")
        lines += [
            f"  gossip  {self.host}:{gossip_port}    raft {self.host}:{raft_port}",
            f"  data    {self.cfg.data_dir}",
        ]
        if self.founded_key:
            lines.append(f"  key     new cluster key written to {key_path} (fingerprint {self.key_fingerprint})")
        lines += [
            "  next machine: copy the key file over, then run",
            f"      galaxy up --join {self.host}:{gossip_port} --cluster-key-file {os.path.basename(key_path)}",
            "    (or set GALAXY_CLUSTER_KEY to the file's content; on the same LAN --join is optional)",
        ]
        print("\n".join(lines), flush=True)

    def _announce_ready(self) -> None:
        leader = self.leader()
        members = len(self.membership.alive_peers()) + 1
        how = "founded a new mesh" if self.coordinator.founded else "joined the mesh"
        print(f"galaxy: {how} ({members} member{'s' if members > 1 else ''}); "
              f"coordinator {leader['leader']} (term {leader['term']})", flush=True)

    # ---------------------------------------------------------------- views for the API
    def leader(self) -> dict:
        leader_id, term = self.coordinator.leader()
        # Non-voters, and spares still waiting for the leader's first contact, know the
        # coordinator from gossip.
        if self.coordinator.view().raft_state in ("none", "starting"):
            found = planner.current_leader(self._peer_infos(self.clock.now_ms()))
            leader_id, term = (found[0], found[1].term) if found else (None, 0)
        http = None
        if leader_id is not None:
            m = self.membership.get(leader_id)
            if m is not None:
                http = self.peers.url_of(m.record)
        return {"leader": leader_id, "term": term, "http": http}

    def members(self) -> list[dict]:
        now_ms = self.clock.now_ms()
        out = []
        for m in self.membership.members():
            r = m.record
            res = r.resources
            out.append({
                "id": r.id, "state": m.state, "role": r.role, "addr": f"{r.host}:{r.gossip_port}",
                "http": self.peers.url_of(r), "raft": f"{r.host}:{r.raft_port}",
                "tls_fingerprint": fingerprint_text(r.tls) if r.tls else None,
                "incarnation": r.incarnation, "version": r.version,
                "resources": {"cpu": res.cpu, "memory_mb": res.memory_mb, "gpu": res.gpu,
                              "free": {"cpu": res.free_cpu, "memory_mb": res.free_memory_mb, "gpu": res.free_gpu},
                              "load_1m": res.load_1m, "cpu_percent": res.cpu_percent,
                              "memory_available_mb": res.memory_available_mb,
                              "task_memory_max_mb": res.task_memory_max_mb or None},
                "labels": dict(r.labels), "trust": self._trust_of(r.id), "credit": self.ledger.credit_of_node(r.id),
                "owner": r.owner or None, "runtime": r.runtime or None,
                "voter": r.id in self.coordinator.voters() if self.coordinator.running else r.raft.raft_state
                not in ("none", "starting"),
                "raft_state": r.raft.raft_state,
                "last_heard": 0.0 if r.id == self.node_id else round(max(0, now_ms - m.last_heard_ms) / 1000, 3),
                "clock_skew_ms": 0 if r.id == self.node_id else self.skew.skew_ms(now_ms, r.id),
            })
        return out

    def status(self) -> dict:
        members = self.members()
        counts = {s: 0 for s in MEMBER_STATES}
        for m in members:
            counts[m["state"]] = counts.get(m["state"], 0) + 1
        leader = self.leader()
        voters = self.coordinator.voters() if self.coordinator.running else sorted(
            m["id"] for m in members if m["raft_state"] in ("leader", "follower", "candidate"))
        warnings = []
        if leader["leader"] is None:
            warnings.append("no coordinator: the voters have no quorum or an election is running")
        if counts[SUSPECT]:
            warnings.append(f"{counts[SUSPECT]} member(s) suspect")
        if self.cfg.owner:
            from galaxy.tasks.runner import paid_owners
            if self.node_id not in paid_owners(self._task_members(), self.cfg.max_nodes_per_owner):
                warnings.append(f"owner {self.cfg.owner} already has {self.cfg.max_nodes_per_owner} nodes "
                                "(max_nodes_per_owner): work done here earns nothing")
        for m in members:
            skew_ms = m["clock_skew_ms"]
            if skew_ms is not None and abs(skew_ms) > CLOCK_SKEW_WARN_MS and m["state"] in (ALIVE, SUSPECT):
                warnings.append(f"clock of {m['id']} is {abs(skew_ms) / 1000:.1f} s "
                                f"{'ahead' if skew_ms > 0 else 'behind'}: run NTP on every machine")
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(self.cfg.data_dir).free
            if free < DISK_FREE_MIN_BYTES:
                warnings.append(f"disk low: {free >> 20} MiB free under {self.cfg.data_dir}")
        return {
            "node": {"id": self.node_id, "role": self.cfg.role, "version": __version__, "http": self.http_url,
                     "cluster": self.cfg.cluster, "addr": f"{self.host}:{self.gossip.port}",
                     "key_fingerprint": self.key_fingerprint, "wall_ms": self.clock.wall_ms(),
                     "uptime_s": round(
                         (self.clock.wall_ms() - self.started_wall_ms) / 1000, 1)},
            "leader": leader,
            "voters": voters,
            "members": counts,
            "tasks": self.tasks.counts(),
            "scheduler": {**self.tasks.stats, "waiting": len(self.tasks.waiting),
                          "draining": sorted(self.tasks.draining_nodes())},
            "ledger": self.ledger.summary(),
            "conflicts_resolved": self.replica.conflicts_resolved,
            "docs": {"kv_keys": len(self.replica.items(KV_TYPE)), "rumours_pending": self.docs.pending,
                     **self.docs.stats},
            "anti_entropy_repairs": self.docs.stats["repairs"],
            "leader_history": list(self.leader_history),
            "raft": self.coordinator.status(),
            "config": self.settings.status(),
            "wire": dict(self.codec.stats),
            "keyring": self.keyring.view(),
            "join": self.join.status(),
            "warnings": warnings,
        }

    def healthy(self) -> bool:
        return not self._stopping

    def ready(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "stopping"
        if self.leader()["leader"] is None:
            return False, "no coordinator known yet"
        return True, ""


# The garbage collector's thresholds for a node (CPython's are 700, 10, 10).  A busy node
# allocates fast: with a young generation of 700 objects, objects of requests in flight for
# a few milliseconds survive two young collections, count as long-lived, and trigger a full
# collection about every half second, which walks every container the node keeps (ledger,
# replica, indexes): 50-85 ms pauses of the event loop and the Raft thread, the p99 of
# settling (docs/ledger.md).  A young generation of 50,000 lets them die young (a young
# collection: < 10 ms under load), and full collections become rare.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """GC_THRESHOLDS, and what was built at start (modules, configuration, restored state)
    moved out of the collector's sight: it lives as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


MALLOC_ARENAS_MAX = 2


def cap_malloc_arenas() -> None:
    """At most MALLOC_ARENAS_MAX glibc malloc arenas for this process (from now on).

    glibc gives each thread that mallocs an arena of its own, up to 8 per core, and
    reserves 64 MB of address space for each: a process whose threads come and go (the
    node's commit and executor threads, the test process) reaches ~1 GiB of address
    space while using ~100 MB.  Under an address-space limit (``ulimit -v``; 1 GiB on some
    CI machines) that is an out-of-memory error.  Two arenas are plenty: the GIL keeps
    malloc contention low, and CPython's small objects come from its own allocator.
    Call it early: glibc fixes its limit once a process has more than 8 arenas.  An
    operator's own ``MALLOC_ARENA_MAX`` (or glibc tunables) wins.  No-op off glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ or "GLIBC_TUNABLES" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, MALLOC_ARENAS_MAX)


_M_ARENA_MAX = -8          # glibc's malloc.h


def run_node(cfg: Config) -> int:
    """``galaxy up`` in the foreground until SIGINT/SIGTERM; returns the exit code."""
    cap_malloc_arenas()
    if cfg.token:
        from galaxy.join_runner import JoinRefused, prepare
        try:
            cfg = prepare(cfg)
        except JoinRefused as e:
            print(f"galaxy: error: token: {e}", file=sys.stderr)
            return 2

    # Owner-only for everything the node creates under its data dir, whoever creates it
    # (pysyncobj's journal, task results, SQLite's side files): the store holds the key
    # fingerprint and peers, the journal the ledger.  Inherited by tasks, whose files are
    # then owner-only too.
    os.umask(0o077)

    async def main() -> int:
        stop = asyncio.Event()
        node = Node(cfg, on_fatal=stop.set)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await node.start()
        except OSError as e:
            print(f"galaxy: error: cannot start: {e}", file=sys.stderr)
            with contextlib.suppress(Exception):
                await node.stop()
            return 1
        tune_gc()
        await stop.wait()
        await node.stop()
        if node.failed:
            return 1
        print("galaxy: left the mesh", flush=True)
        return 0

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
