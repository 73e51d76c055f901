"""Discovery: where other nodes of this cluster might be listening.

Theory of operation: three sources give *address hints* only — mDNS (``mdns.py``), UDP
broadcast beacons (``broadcast.py``) and static seed addresses (``seeds.py``).  Each hint
becomes one ``PeerSeen`` handed to an ``on_peer`` callback; the gossip handshake,
authenticated by the cluster key in ``wire.py``, is what actually admits a peer.  So a
hint may be stale, duplicated or wrong, and consumers must treat ``on_peer`` as
idempotent and cheap.  Sources never raise into the event loop because of what a
stranger put on the network.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("mdns", "broadcast", "seed")


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """A node of our cluster may be listening for gossip at ``host:gossip_port``."""

    host: str
    gossip_port: int
    node_id: str | None        # None when the source cannot know it (seeds)
    source: str                # one of SOURCES


__all__ = ["PeerSeen", "SOURCES"]
