"""How far each peer's wall clock is from ours, estimated from the frames it sends anyway.

Theory of operation
-------------------
Every authenticated frame carries ``sent_ms``, the sender's wall clock when it encoded
the frame (``wire.Envelope``), and the receiver knows its own wall clock when it decoded
it.  One frame gives the sample ``sent_ms - received_wall_ms = skew - delay``, where
``skew`` is how far the peer's clock is ahead of ours and ``delay >= 0`` is the time the
frame spent in the sender's queue, on the network and in our event loop.  The delay only
ever makes a sample *smaller*, so the largest sample of a window is the one with the
least delay and the best estimate of ``skew``: NTP's minimum-delay filter, here with one
way only, so the estimate errs low by at most the smallest one-way delay of the window
(well under a millisecond on a LAN) and costs nothing: gossip sends several frames a
second to every peer.  A second frame arriving faster than the first cannot be mistaken
for a smaller delay: ``delay`` is never negative, whatever the network does.

A clock can be stepped (NTP, an operator), so old samples must age out: each peer keeps
the maximum of the current bucket and of the previous one, each ``bucket_ms`` long, and
the estimate is the larger of the two (a windowed maximum over ``bucket_ms`` to
``2 * bucket_ms``).  A peer unheard for ``2 * bucket_ms`` has no estimate.

Pure: time comes in as ``now_ms`` (monotonic, for the buckets); wall times are inputs.
Bounded: at most ``peers_max`` peers; the one heard least recently makes room.

Invariants (``_check``): ``len(peers) <= peers_max``; every peer's current bucket started
at or before the last ``now_ms`` seen.
"""

from __future__ import annotations

from dataclasses import dataclass

BUCKET_MS = 15_000           # an estimate spans 15-30 s of frames: dozens of samples on a LAN
PEERS_MAX = 4096             # far more than one mesh has members
_NO_SAMPLE = -(1 << 62)


@dataclass(slots=True)
class _Peer:
    bucket_start_ms: int
    current_ms: int           # max sample of the current bucket
    previous_ms: int | None   # max sample of the previous bucket (None: no frame in it)


class SkewEstimator:
    def __init__(self, *, bucket_ms: int = BUCKET_MS, peers_max: int = PEERS_MAX) -> None:
        if bucket_ms <= 0 or peers_max <= 0:
            raise ValueError("bucket_ms and peers_max must be positive")
        self.bucket_ms = bucket_ms
        self.peers_max = peers_max
        self._peers: dict[str, _Peer] = {}     # insertion order = least recently heard first

    def observe(self, now_ms: int, peer: str, sent_ms: int, received_wall_ms: int) -> None:
        """One authenticated frame from ``peer``, stamped ``sent_ms``, decoded at ``received_wall_ms``."""
        sample = sent_ms - received_wall_ms
        p = self._peers.pop(peer, None)
        if p is None:
            if len(self._peers) >= self.peers_max:
                del self._peers[next(iter(self._peers))]
            p = _Peer(now_ms, sample, None)
        else:
            self._roll(p, now_ms)
            p.current_ms = max(p.current_ms, sample)
        self._peers[peer] = p
        self._check(now_ms)

    def _roll(self, p: _Peer, now_ms: int) -> None:
        elapsed = now_ms - p.bucket_start_ms
        if elapsed < self.bucket_ms:
            return
        # one bucket on: the current becomes the previous; two or more: both are too old
        p.previous_ms = p.current_ms if elapsed < 2 * self.bucket_ms else None
        p.current_ms = _NO_SAMPLE               # below any sample; this frame's replaces it
        p.bucket_start_ms = now_ms

    def skew_ms(self, now_ms: int, peer: str) -> int | None:
        """How far ``peer``'s wall clock is ahead of ours (negative: behind); None if unknown."""
        p = self._peers.get(peer)
        if p is None:
            return None
        elapsed = now_ms - p.bucket_start_ms
        if elapsed >= 2 * self.bucket_ms:
            return None
        if elapsed >= self.bucket_ms:
            return p.current_ms
        return p.current_ms if p.previous_ms is None else max(p.current_ms, p.previous_ms)

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def __len__(self) -> int:
        return len(self._peers)

    def _check(self, now_ms: int) -> None:
        assert len(self._peers) <= self.peers_max
        last = self._peers[next(reversed(self._peers))]      # the one this step touched
        assert last.bucket_start_ms <= now_ms and last.current_ms > _NO_SAMPLE
