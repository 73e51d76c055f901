"""mDNS / DNS-SD discovery with python-zeroconf's asyncio API (IPv4 only).

Theory of operation: each node registers ``<node_id>._galaxy._tcp.local.`` (or, for a
node id that is not a clean DNS label, ``gx-<hash of id>``) with its advertise address (``host``), SRV port = gossip port, and TXT ``cluster``, ``id``,
``role``, ``version``, ``gossip``, ``http``, ``raft``.  It browses the same type; for
every service *added* or *updated* it resolves the record (usually answered from the
cache in well under a millisecond) and, if the TXT names our cluster and another node
id, calls ``on_peer(PeerSeen(addr, gossip_port, node_id, "mdns"))`` once per IPv4
address.  Removals are ignored: failure detection is gossip's job, not mDNS's.

Timing (measured in the feasibility notes): registration probes for ~1.2 s before the
name is ours and peers' browsers see it; a browser started after a registration sees
it within 20-120 ms (the RFC 6762 initial query delay).  ``start()`` therefore does not
wait for the probe: it starts browsing at once and registers in a background task.

Trust: TXT records come from anyone on the LAN.  Every field is validated (ids: 1..252
printable UTF-8 bytes, so ``id=<id>`` fits one TXT string; ports: 1..65535) and anything odd is
counted in ``stats`` and dropped; nothing a stranger sends raises into the event loop.
mDNS only gives address hints — the gossip handshake, authenticated by the cluster key,
is what admits a peer.

Stopping: cancel the browser and pending resolves, then unregister and *await the task
it returns* (otherwise the goodbye may never be sent and peers keep a stale record for
its TTL), then close.  Resolves in flight are bounded by ``RESOLVES_MAX``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from galaxy.discovery import PeerSeen

log = logging.getLogger(__name__)

SERVICE_TYPE = "_galaxy._tcp.local."
RESOLVE_TIMEOUT_MS = 3000        # a LAN answers in ms; a missing host should not pin a slot long
RESOLVES_MAX = 64                # concurrent resolves; more means a flood, and we shed it
ADDRESSES_MAX = 16               # addresses reported per service
TXT_ENTRY_MAX_BYTES = 255        # RFC 6763 §6.1: one TXT string is at most 255 bytes
LABEL_MAX_BYTES = 63             # a DNS label: the longest node id used as instance name as is
ID_MAX_BYTES = TXT_ENTRY_MAX_BYTES - len("id=")


def valid_node_id(value: object) -> bool:
    """Could ``value`` be a node id in a TXT record (non-empty, printable, fits one entry)?"""
    if not isinstance(value, str) or not value:
        return False
    return len(value.encode("utf-8")) <= ID_MAX_BYTES and value.isprintable()


def instance_name(node_id: str) -> str:
    """The DNS-SD instance label for a node: its id when that is a clean label."""
    if len(node_id.encode("utf-8")) <= LABEL_MAX_BYTES and "." not in node_id \
            and "\\" not in node_id and node_id.isprintable():
        return node_id
    return "gx-" + hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:20]


def _port(text: str | None) -> int | None:
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def _txt(props: dict[Any, Any]) -> dict[str, str] | None:
    """TXT properties as str -> str; None if any key or value is not clean UTF-8."""
    out: dict[str, str] = {}
    try:
        for k, v in props.items():
            key = k.decode("utf-8") if isinstance(k, bytes) else str(k)
            if v is None:
                continue
            out[key] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    except UnicodeDecodeError:
        return None
    return out


class MdnsDiscovery:
    def __init__(
        self,
        cluster: str,
        node_id: str,
        host: str,
        gossip_port: int,
        http_port: int,
        raft_port: int,
        role: str,
        version: str,
        on_peer: Callable[[PeerSeen], None],
        interfaces: Sequence[str] | None = None,
    ) -> None:
        if not valid_node_id(node_id):
            raise ValueError(f"node id {node_id!r} cannot be advertised over mDNS "
                             f"(1..{ID_MAX_BYTES} printable UTF-8 bytes)")
        addr = ipaddress.IPv4Address(host)          # ValueError for anything but IPv4
        if addr.is_unspecified or addr.is_multicast:
            raise ValueError(f"mDNS needs a concrete IPv4 advertise address, got {host}")
        for name, port in (("gossip", gossip_port), ("http", http_port), ("raft", raft_port)):
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} port must be in 1..65535 to be advertised, got {port}")
        txt = {"cluster": cluster, "id": node_id, "role": role, "version": version,
               "gossip": str(gossip_port), "http": str(http_port), "raft": str(raft_port)}
        for k, v in txt.items():
            if len(f"{k}={v}".encode("utf-8")) > TXT_ENTRY_MAX_BYTES:
                raise ValueError(f"TXT entry {k!r} longer than {TXT_ENTRY_MAX_BYTES} bytes")
        self._cluster = cluster
        self._node_id = node_id
        self._on_peer = on_peer
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._name = f"{instance_name(node_id)}.{SERVICE_TYPE}"
        # The SRV target must be a hostname; derive one that is always a valid label.
        server = f"gx-{hashlib.sha256(node_id.encode()).hexdigest()[:16]}.local."
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, self._name, port=gossip_port, properties=txt, server=server,
            addresses=[addr.packed],
        )
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._register_task: asyncio.Task[None] | None = None
        self._resolves: dict[str, asyncio.Task[None]] = {}
        self.registered = False
        self.stats: dict[str, int] = {
            "events": 0, "resolved": 0, "unresolved": 0, "peers": 0, "ignored_self": 0,
            "ignored_cluster": 0, "invalid": 0, "shed": 0, "errors": 0,
        }

    async def start(self) -> None:
        if self._aiozc is not None:
            raise RuntimeError("already started")
        ifaces: Any = InterfaceChoice.All if self._interfaces is None else self._interfaces
        self._aiozc = AsyncZeroconf(interfaces=ifaces, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._register_task = asyncio.create_task(self._register(), name="galaxy-mdns-register")

    async def wait_registered(self) -> bool:
        """Wait for the registration attempt to finish; True if the name is ours."""
        if self._register_task is not None:
            await asyncio.wait({self._register_task})
        return self.registered

    async def stop(self) -> None:
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        resolves = list(self._resolves.values())
        self._resolves.clear()
        for t in resolves:
            t.cancel()
        reg, self._register_task = self._register_task, None
        if reg is not None and not reg.done():
            reg.cancel()
        await asyncio.gather(*resolves, *([reg] if reg is not None else []), return_exceptions=True)
        if self.registered:
            try:
                goodbye = await aiozc.async_unregister_service(self._info)
                await goodbye                        # the goodbye is sent only when this is done
            except Exception:
                log.debug("mDNS unregister failed", exc_info=True)
            self.registered = False
        await aiozc.async_close()

    async def _register(self) -> None:
        assert self._aiozc is not None
        aiozc = self._aiozc
        try:
            announced = await aiozc.async_register_service(self._info)
            self.registered = True                   # probing done: the name is ours
            await announced
        except NonUniqueNameException:
            log.warning("mDNS name %s is taken by another node; browsing only", self._name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("mDNS registration failed; browsing only")

    def _on_change(self, zeroconf: Any, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """Browser callback (runs in the event loop, must not block or raise)."""
        try:
            if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
                return
            self.stats["events"] += 1
            if name.lower() == self._name.lower():
                self.stats["ignored_self"] += 1
                return
            if name in self._resolves:
                return                               # already resolving; it will see the update
            if len(self._resolves) >= RESOLVES_MAX:
                self.stats["shed"] += 1
                return
            task = asyncio.create_task(self._resolve(name), name="galaxy-mdns-resolve")
            self._resolves[name] = task
            task.add_done_callback(lambda t, n=name: self._resolve_done(n, t))
        except Exception:
            self.stats["errors"] += 1
            log.debug("mDNS browse event for %r failed", name, exc_info=True)

    def _resolve_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolves.get(name) is task:
            del self._resolves[name]

    async def _resolve(self, name: str) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
                self.stats["unresolved"] += 1
                return
            self.stats["resolved"] += 1
            self._consider(info)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["errors"] += 1
            log.debug("mDNS resolve of %r failed", name, exc_info=True)

    def _consider(self, info: AsyncServiceInfo) -> None:
        txt = _txt(info.properties or {})
        if txt is None:
            self.stats["invalid"] += 1
            return
        if txt.get("cluster") != self._cluster:
            self.stats["ignored_cluster"] += 1
            return
        peer_id = txt.get("id")
        gossip_port = _port(txt.get("gossip"))
        if not valid_node_id(peer_id) or gossip_port is None:
            self.stats["invalid"] += 1
            return
        assert isinstance(peer_id, str)
        if peer_id == self._node_id:
            self.stats["ignored_self"] += 1
            return
        hosts: list[str] = []
        for a in info.parsed_addresses(IPVersion.V4Only)[:ADDRESSES_MAX]:
            try:
                ip = ipaddress.IPv4Address(a)
            except ValueError:
                continue
            if not (ip.is_unspecified or ip.is_multicast):
                hosts.append(str(ip))
        if not hosts:
            self.stats["invalid"] += 1
            return
        for host in hosts:
            self.stats["peers"] += 1
            try:
                self._on_peer(PeerSeen(host, gossip_port, peer_id, "mdns"))
            except Exception:
                log.exception("on_peer failed for mDNS peer %s", peer_id)
