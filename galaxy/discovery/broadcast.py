"""UDP broadcast beacons: "a node of this cluster listens for gossip at HOST:PORT".

Theory of operation: one UDP socket bound to ``("0.0.0.0", port)`` with SO_REUSEADDR and
SO_REUSEPORT (several nodes on one machine share the port; Linux delivers a broadcast
datagram to every socket in the group) and SO_BROADCAST.  At start and then every
``interval_ms`` (times a uniform factor in [0.8, 1.2] from the injected rng, so nodes
started together drift apart) it sends one wire-encoded ``Beacon`` to the
subnet-directed broadcast address of every IPv4 interface that has one (re-read each
round, so interfaces that come and go are followed).  It never sends to 255.255.255.255:
on a machine without a default route that fails with ENETUNREACH.

Receiving: every datagram goes through ``codec.decode``; a ``DecodeError`` (wrong key,
tampered, replayed, ...) drops it and is counted in ``codec.stats``.  Beacons of other
clusters and our own (looped back by the kernel) are ignored; every other beacon
becomes ``on_peer(PeerSeen(beacon.host, beacon.gossip_port, beacon.node_id,
"broadcast"))``.  A beacon only hints at an address; the gossip handshake admits.

Failure handling: send errors (ENETUNREACH, EACCES, an interface gone) are logged at
debug and counted; they never end the loop.  An exception from ``on_peer`` is logged and
swallowed, so one bad consumer call cannot stop discovery.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from random import Random
from typing import Any

import psutil

from galaxy import wire
from galaxy.clock import Clock
from galaxy.discovery import PeerSeen
from galaxy.messages import Beacon

log = logging.getLogger(__name__)

JITTER_LOW, JITTER_HIGH = 0.8, 1.2
TARGETS_MAX = 64                 # broadcast addresses per round; more is a misconfigured host
UNSPECIFIED_HOSTS = ("", "0.0.0.0")


def broadcast_targets(port: int) -> list[tuple[str, int]]:
    """Subnet-directed broadcast addresses of every IPv4 interface, deduplicated."""
    seen: dict[str, None] = {}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.broadcast and a.broadcast != "255.255.255.255":
                seen.setdefault(a.broadcast, None)
    return [(b, port) for b in list(seen)[:TARGETS_MAX]]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: BroadcastBeacons) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._owner._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # asyncio reports a failed sendto() here rather than raising it.
        self._owner.stats["send_errors"] += 1
        log.debug("beacon socket error: %s", exc)


class BroadcastBeacons:
    def __init__(
        self,
        codec: wire.Codec,
        clock: Clock,
        cluster: str,
        node_id: str,
        host: str,
        gossip_port: int,
        port: int,
        interval_ms: int,
        on_peer: Callable[[PeerSeen], None],
        rng: Random,
    ) -> None:
        if not 0 <= port <= 65535 or not 1 <= gossip_port <= 65535:
            raise ValueError(f"bad port: beacon {port}, gossip {gossip_port}")
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
        self._codec = codec
        self._clock = clock
        self._cluster = cluster
        self._node_id = node_id
        self._beacon = Beacon(cluster=cluster, node_id=node_id, host=host, gossip_port=gossip_port)
        self._port = port
        self._interval_ms = interval_ms
        self._on_peer = on_peer
        self._rng = rng
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats: dict[str, int] = {
            "sent": 0, "send_errors": 0, "received": 0, "peers": 0,
            "ignored_self": 0, "ignored_cluster": 0, "ignored_type": 0, "ignored_invalid": 0,
        }

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with port 0)."""
        if self._transport is None:
            return self._port
        return self._transport.get_extra_info("sockname")[1]

    async def start(self) -> None:
        if self._transport is not None:
            raise RuntimeError("already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind(("0.0.0.0", self._port))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport
        self._send_round()                      # one at once: do not make peers wait a period
        self._task = asyncio.create_task(self._loop(), name="galaxy-beacons")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    async def _loop(self) -> None:
        while True:
            delay_ms = self._interval_ms * self._rng.uniform(JITTER_LOW, JITTER_HIGH)
            await asyncio.sleep(delay_ms / 1000)
            self._send_round()

    def _send_round(self) -> None:
        transport = self._transport
        if transport is None:
            return
        try:
            frame = self._codec.encode(self._beacon, self._clock.wall_ms())
            targets = broadcast_targets(self.port)
        except Exception:                     # a local bug or psutil failure: keep beaconing
            log.exception("cannot build a beacon round")
            return
        for target in targets:
            try:
                # asyncio reports most send errors to error_received instead of raising,
                # so "sent" counts attempts and "send_errors" the failures among them.
                transport.sendto(frame, target)
                self.stats["sent"] += 1
            except OSError as exc:
                self.stats["send_errors"] += 1
                log.debug("beacon to %s:%d failed: %s", target[0], target[1], exc)

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats["received"] += 1
        try:
            env = self._codec.decode(data, self._clock.wall_ms())
        except wire.DecodeError as exc:
            log.debug("beacon from %s dropped: %s", addr[0], exc.reason)
            return
        msg: Any = env.msg
        if not isinstance(msg, Beacon):
            self.stats["ignored_type"] += 1
            return
        if msg.cluster != self._cluster:
            self.stats["ignored_cluster"] += 1
            return
        if msg.node_id == self._node_id:
            self.stats["ignored_self"] += 1
            return
        if not 1 <= msg.gossip_port <= 65535:
            self.stats["ignored_invalid"] += 1
            return
        # A node that advertises no concrete address is reachable where the datagram came from.
        host = addr[0] if msg.host in UNSPECIFIED_HOSTS else msg.host
        self.stats["peers"] += 1
        try:
            self._on_peer(PeerSeen(host, msg.gossip_port, msg.node_id, "broadcast"))
        except Exception:
            log.exception("on_peer failed for beacon from %s", addr[0])
