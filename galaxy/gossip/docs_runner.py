"""Asyncio adapter for replicated documents: UDP rumours and TCP push-pull anti-entropy.

Theory of operation: thin.  ``DocGossip`` (pure) says when to push which versions to
whom and when to sync with whom; ``Replica`` (pure) merges.  This module moves bytes:
DocUpdate frames over the gossip UDP socket (through ``GossipRunner.send``) and DocSync
frames over TCP on the same port number, each frame a 4-byte length then one
``wire`` frame.  Every change is persisted to the store before anything that depends on
it is sent (STYLE rule 2).  A session is bounded in rounds, bytes per frame and time;
a peer that breaks the protocol loses its connection and the error is counted.

*Group commit, off the loop.*  Versions written or merged are committed to the store
together, one transaction (one fsync) for everything persisted since the last commit
began, by one writer thread: the event loop keeps receiving, merging and batching while a
commit is in flight, and the next commit takes all of that at once.  Each persist gets a
sequence number and each key remembers the number of its latest persist until a commit
covering it completes.  The rule that makes this safe: *a frame carrying versions of a key
leaves the node only after the commit holding that key's latest persist completed*.
Every UDP frame goes through ``_send``, which sends at once when that holds and otherwise
queues the frame until the commit completes; a ``DocAck`` waits likewise for the keys it
acknowledges; a TCP frame and ``put_acked`` await the commit of everything persisted
before them; ``put(durable=True)`` (the default), ``delete`` and ``flush`` commit
synchronously (waiting for the commit in flight, then committing the rest on the
caller's thread).  Commits run in persist order on one thread, so a key's newer full set
of versions is never overwritten by an older one.

A write that must be durable on two nodes before it is acknowledged (a task submission,
DESIGN.md section 4) goes out as ``DocPut`` to one live peer at a time, resent to another
every ``ACK_RETRY_MS`` until a ``DocAck`` says a peer has persisted it; the receiver merges
it like a rumour (persisting first) and only then answers.  ``listeners`` hear about every
version that changed this replica, local or remote; they must only note it (they run
inside this adapter's step) and act later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import random
import struct
import threading
from collections.abc import Callable, Collection, Iterable
from typing import Any

from galaxy import wire
from galaxy.clock import Clock
from galaxy.gossip.docs import DocGossip, Peer, Push, Sync
from galaxy.gossip.replica import VID_BYTES, Doc, Replica, SyncError, frame_budget_bytes, pack_updates, to_wire
from galaxy.messages import DocAck, DocHave, DocPut, DocSync, DocUpdate, DocWire

log = logging.getLogger("galaxy.docs")

SESSION_ROUNDS_MAX = 400        # a new node catching up 100k docs needs ~100 rounds
SESSION_TIMEOUT_S = 60.0        # a whole session; a stuck peer frees the slot
READ_TIMEOUT_S = 5.0            # one frame
GC_INTERVAL_MS = 10_000         # tombstone collection and clock pruning
ACK_RETRY_MS = 100             # a DocPut unanswered this long goes to another peer too
ACKS_WAITING_MAX = 10_000       # DocPuts awaiting an answer at once
HAVE_VIDS_MAX = 1024            # version ids per DocHave (16 KiB)
PUT_OVERHEAD_BYTES = 32         # a DocPut's request id beside what a DocUpdate of the same versions takes
_LEN = struct.Struct(">I")


class _Writer:
    """One thread that runs commits in order (what a one-worker ThreadPoolExecutor does,
    without its per-submit bookkeeping: idle-thread accounting, work items, a lock)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="docs-commit", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:       # handed to whoever waits on the future
                fut.set_exception(e)
            else:
                fut.set_result(result)

    def shutdown(self, wait: bool = True) -> None:
        self._q.put(None)
        if wait:
            self._thread.join()


class NotReplicated(Exception):
    """No other live member acknowledged a write in time (it is on this node's disk only)."""


class DocsRunner:
    def __init__(self, *, replica: Replica, core: DocGossip, store: Any, udp_codec: wire.Codec,
                 tcp_codec: wire.Codec, clock: Clock, send_udp: Callable[[str, int, Any], None],
                 live_peers: Callable[[], list[Peer]], cluster: str, frame_max_bytes: int,
                 on_fatal: Callable[[BaseException], Any] | None = None) -> None:
        self.replica = replica
        self._core = core
        self._store = store
        self._udp_codec = udp_codec
        self._codec = tcp_codec
        self._clock = clock
        self._send_udp = send_udp
        self._live_peers = live_peers
        self._cluster = cluster
        self._frame_max_bytes = frame_max_bytes
        self._on_fatal = on_fatal
        self._server: asyncio.AbstractServer | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._syncing: set[str] = set()
        self._next_gc_ms = 0
        self._acks: dict[int, asyncio.Future] = {}
        self._haves: dict[tuple[str, int], list[bytes]] = {}     # address -> version ids to tell it we hold
        self._have_handle: asyncio.Handle | None = None
        self._unsynced: dict[tuple[str, str], list[DocWire]] = {}   # key -> its full set of versions
        # An anti-entropy session with a peer has completed since start: this replica holds
        # whatever the peer held then (e.g. a restarted node has heard of writes made while it was down)
        self.synced = False
        self._seq = 0                        # persists so far (each _persist call is one)
        self._committed_seq = 0              # every persist up to this one is committed
        self._key_seq: dict[tuple[str, str], int] = {}   # key -> its latest persist, while uncommitted
        self._writer: _Writer | None = None
        self._inflight: concurrent.futures.Future | None = None     # the commit the writer runs now
        self._inflight_seq = 0
        self._inflight_keys: list[tuple[str, str]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_waiters: list[tuple[int, asyncio.Future]] = []    # (persist seq, future)
        self._after_flush: list[tuple[int, str, int, Any]] = []     # (persist seq, frame): wait for the commit
        self._rng = random.Random()           # request ids need only be unique per sender
        self.listeners: list[Callable[[list[Doc]], None]] = []
        self.stats = {"updates_in": 0, "updates_bad": 0, "syncs_out": 0, "syncs_in": 0, "sync_errors": 0,
                      "repairs": 0, "tcp_bytes_in": 0, "tcp_bytes_out": 0,
                      "puts_out": 0, "puts_in": 0, "acks_in": 0, "acks_timed_out": 0, "commits": 0,
                      "versions_committed": 0, "haves_out": 0, "haves_in": 0}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, bind_host: str, port: int) -> None:
        self.replica.restore(self._clock.wall_ms(), self._store.load_docs())
        self._writer = _Writer()
        self._server = await asyncio.start_server(self._serve, bind_host, port, reuse_address=True)
        self._task = asyncio.create_task(self._loop(), name="docs")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._have_handle is not None:
            self._have_handle.cancel()
            self._have_handle = None
        with contextlib.suppress(Exception):      # a failed store was reported when it failed
            self.flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def reconfigure(self, cfg: Any) -> None:
        """New cluster-wide gossip settings: handed to the core (the runner reads none)."""
        self._core.reconfigure(cfg)

    @property
    def pending(self) -> int:
        """Versions still being rumoured."""
        return self._core.pending

    # ------------------------------------------------------------------ writes and rumours
    def put(self, doc_type: str, key: str, value: Any, *, durable: bool = True) -> Doc:
        """Write a new version.  ``durable``: committed when this returns; else by the end of
        this turn of the loop, and before any frame leaves the node."""
        doc = self._local(self.replica.put(self._clock.wall_ms(), doc_type, key, value))
        if durable:
            self.flush()
        return doc

    def delete(self, doc_type: str, key: str, *, absent: bool = False) -> Doc | None:
        doc = self.replica.delete(self._clock.wall_ms(), doc_type, key, absent=absent)
        if doc is None:
            return None
        self._local(doc)
        self.flush()
        return doc

    def interested(self, doc_type: str, members: Callable[[Doc], Collection[str] | None]) -> None:
        """Who must hear a new version of ``doc_type`` at once (``DocGossip.interest``): its
        pushes and DocPuts go to them first, the rounds bring it to the others later."""
        self._core.interest[doc_type] = members

    def _local(self, doc: Doc, sent_ms: int = -1) -> Doc:
        self._persist([doc])
        self._core.changed([doc], len(self._live_peers()) + 1, sent_ms=sent_ms)
        self._wake.set()
        self._tell([doc])
        return doc

    def _tell(self, docs: list[Doc]) -> None:
        for listener in self.listeners:
            listener(docs)

    async def put_acked(self, doc_type: str, key: str, value: Any, *, timeout_ms: int,
                        peers_max: int = 5) -> tuple[Doc, str | None]:
        """Write, then wait until one other live member has persisted it.

        Returns ``(doc, peer id)``, or ``(doc, None)`` when this node has no live peer.
        Raises ``NotReplicated`` after ``timeout_ms`` with no answer (the write stays here
        and spreads by gossip as any other).
        """
        docs, peers = await self.put_many_acked(doc_type, [(key, value)], timeout_ms=timeout_ms,
                                                peers_max=peers_max)
        return docs[0], (peers[0] if peers else None)

    async def put_many_acked(self, doc_type: str, items: list[tuple[str, Any]], *, timeout_ms: int,
                             peers_max: int = 5) -> tuple[list[Doc], list[str]]:
        """Write every ``(key, value)`` (one commit), then wait until other live members have
        persisted all of them: one DocPut per frame's worth of versions, each acknowledged
        by some peer.  Returns the docs and the peers that acknowledged (none without a live
        peer); ``NotReplicated`` as ``put_acked``.
        """
        # For a type with an interest, the DocPut is these versions' first push (no eager one
        # besides), to the members that must hear them first (the coordinator, for a task).
        want = self._core.interest.get(doc_type)
        sent_ms = self._clock.now_ms() if want is not None else -1
        docs = [self._local(self.replica.put(self._clock.wall_ms(), doc_type, key, value), sent_ms)
                for key, value in items]
        await self._flushed(max(self._key_seq.get((doc_type, k), 0) for k, _ in items))   # one fsync
        peers = self._live_peers()
        if not peers:
            return docs, []
        first = (want(docs[0]) or ()) if want is not None else ()
        versions = [v for k, _ in items for v in self.replica.versions(doc_type, k)]
        frames = pack_updates(versions, self._frame_max_bytes - PUT_OVERHEAD_BYTES, self.replica.node_id,
                              self._cluster)
        if len(self._acks) + len(frames) > ACKS_WAITING_MAX:
            raise NotReplicated(f"{len(self._acks)} writes are already waiting for an acknowledgement")
        self._rng.shuffle(peers)
        peers.sort(key=lambda p: p.id not in first)
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                got = await asyncio.gather(*(self._replicate(f.docs, peers[:peers_max]) for f in frames))
        except TimeoutError:
            self.stats["acks_timed_out"] += 1
            raise NotReplicated(f"no other member acknowledged within {timeout_ms} ms") from None
        for f, peer in zip(frames, got):
            self._core.heard(peer, f.docs)        # it holds them: the rounds leave it out
        return docs, sorted(set(got))

    async def _replicate(self, versions: tuple[DocWire, ...], peers: list[Peer]) -> str:
        """Send one DocPut (its content committed) to a peer, and to the next every
        ACK_RETRY_MS, until one answers; returns who did."""
        req_id = self._rng.getrandbits(62)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._acks[req_id] = fut
        msg = DocPut(req_id=req_id, docs=versions)
        try:
            for peer in itertools.cycle(peers):
                self.stats["puts_out"] += 1
                self._send_udp(peer.host, peer.port, msg)     # its content is committed
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(fut), ACK_RETRY_MS / 1000)
        finally:
            self._acks.pop(req_id, None)
        raise AssertionError("unreachable")

    def on_put(self, sender: str, addr: tuple[str, int], msg: DocPut) -> None:
        """A DocPut arrived: merge and persist like a rumour, then acknowledge."""
        self.stats["puts_in"] += 1
        if self.on_update(sender, DocUpdate(docs=msg.docs), addr):
            # merged now, or earlier but perhaps not committed yet: either way after that commit
            self._send(addr[0], addr[1], DocAck(req_id=msg.req_id), self._needs(msg.docs))

    def on_ack(self, sender: str, msg: DocAck) -> None:
        fut = self._acks.get(msg.req_id)
        if fut is not None and not fut.done():
            self.stats["acks_in"] += 1
            fut.set_result(sender)

    def on_update(self, sender: str, msg: DocUpdate, addr: tuple[str, int] | None = None) -> bool:
        """A DocUpdate arrived on the gossip UDP socket (from ``addr``: told what we now hold);
        False if it was refused."""
        self.stats["updates_in"] += 1
        held: list[bytes] = []
        try:
            changed = self.replica.merge(self._clock.wall_ms(), msg.docs, src=sender, held=held)
        except (ValueError, SyncError) as e:
            self.stats["updates_bad"] += 1
            log.debug("bad DocUpdate from %s: %s", sender, e)
            return False
        self._changed(changed, sender, msg.docs)
        self._core.heard(sender, msg.docs, msg.also)
        if addr is not None and held:
            self._have(addr, held)
        return True

    def _have(self, addr: tuple[str, int], vids: list[bytes]) -> None:
        """Tell ``addr`` we hold these versions: one DocHave per sender per
        ``DocGossip.answer_delay_ms`` at most (under a burst, a datagram and its decoding
        saved per commit per sender)."""
        self._haves.setdefault(addr, []).extend(vids)
        if self._have_handle is None:
            self._have_handle = asyncio.get_running_loop().call_later(self._core.answer_delay_ms() / 1000,
                                                                      self._send_haves)

    def _send_haves(self) -> None:
        self._have_handle = None
        haves, self._haves = self._haves, {}
        # as many ids as a frame holds (its envelope, names and the field's own header aside)
        budget = frame_budget_bytes(self._frame_max_bytes, self.replica.node_id, self._cluster) - 16
        per = max(1, min(HAVE_VIDS_MAX, budget // VID_BYTES))
        for (host, port), vids in haves.items():
            for i in range(0, len(vids), per):
                self.stats["haves_out"] += 1
                # after the commit holding them, as any frame about versions (persist before send)
                self._send(host, port, DocHave(vids=b"".join(vids[i:i + per])), self._seq)

    def on_have(self, sender: str, msg: DocHave) -> None:
        v = msg.vids
        if len(v) % VID_BYTES:
            self.stats["updates_bad"] += 1
            return
        self.stats["haves_in"] += 1
        self._core.acked(sender, (v[i:i + VID_BYTES] for i in range(0, len(v), VID_BYTES)))

    def _changed(self, changed: list[Doc], sender: str | None = None, sent: Iterable[Any] = ()) -> None:
        """``sent``: the versions ``sender`` gave us (their rumours leave it out)."""
        if changed:
            self._persist(changed)
            self._core.changed(changed, len(self._live_peers()) + 1, src=sender, sent=sent)
            self._wake.set()
            self._tell(changed)

    def _persist(self, docs: Iterable[Doc]) -> None:
        fresh: dict[tuple[str, str], list[DocWire]] = {}
        for d in docs:
            fresh.setdefault((d.doc_type, d.key), []).append(to_wire(d))
        self._seq += 1
        for k in fresh:
            self._key_seq[k] = self._seq
        self._unsynced.update(fresh)        # a key's newer full set replaces its older one
        self._schedule_flush()

    def _needs(self, docs: Iterable[Any]) -> int:
        """The persist that must be committed before ``docs`` (versions) may leave the node."""
        ks = self._key_seq
        return max((ks.get((d.doc_type, d.key), 0) for d in docs), default=0) if ks else 0

    def _schedule_flush(self) -> None:
        # At the end of this turn, so that the turn's writes share the commit; while one is
        # in flight, its completion starts the next.
        if self._flush_handle is None and self._inflight is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._begin_commit)

    def _begin_commit(self) -> None:
        """Hand everything persisted so far to the writer thread (one transaction)."""
        self._flush_handle = None
        if self._inflight is not None or not self._unsynced:
            return
        if self._writer is None:            # not started (or stopping): commit here
            self._flush_soon()
            return
        rows = [r for rs in self._unsynced.values() for r in rs]
        self._inflight_keys = list(self._unsynced)
        self._unsynced = {}
        self._inflight_seq = self._seq
        fut = self._inflight = self._writer.submit(self._store.put_docs, rows)
        loop = asyncio.get_running_loop()
        self.stats["versions_committed"] += len(rows)

        def done(f: concurrent.futures.Future) -> None:      # on the writer thread
            with contextlib.suppress(RuntimeError):          # the loop is closed: nothing to tell
                loop.call_soon_threadsafe(self._commit_done, f)
        fut.add_done_callback(done)

    def _commit_done(self, fut: concurrent.futures.Future) -> None:
        if fut is not self._inflight:
            return              # a synchronous flush() already waited for it
        try:
            self._settle_inflight()
        except Exception as exc:
            self._commit_failed(exc)
            return
        if self._unsynced:
            self._schedule_flush()

    def _commit_failed(self, exc: Exception) -> None:
        # the store failed: nothing may be acknowledged any more
        log.exception("committing documents failed", exc_info=exc)
        if self._on_fatal is not None:
            self._on_fatal(exc)

    def _settle_inflight(self) -> None:
        fut, self._inflight = self._inflight, None
        assert fut is not None
        fut.result()                    # raises what the commit raised
        self._committed(self._inflight_seq, self._inflight_keys)

    def _committed(self, seq: int, keys: Iterable[tuple[str, str]]) -> None:
        """Persists up to ``seq`` are on disk: release what waited for them."""
        self.stats["commits"] += 1
        self._committed_seq = max(self._committed_seq, seq)
        done = self._committed_seq
        ks = self._key_seq
        for k in keys:
            if ks.get(k, done + 1) <= done:
                del ks[k]
        if self._flush_waiters:
            waiting = []
            for need, f in self._flush_waiters:
                if need > done:
                    waiting.append((need, f))
                elif not f.done():
                    f.set_result(None)
            self._flush_waiters = waiting
        if self._after_flush:
            later = []
            for need, host, port, msg in self._after_flush:
                if need > done:
                    later.append((need, host, port, msg))
                else:
                    self._send_udp(host, port, msg)
            self._after_flush = later

    def _flush_soon(self) -> None:
        try:
            self.flush()
        except Exception as exc:
            self._commit_failed(exc)

    def flush(self) -> None:
        """Commit everything written or merged so far, on this thread once the commit in
        flight (if any) has completed, then send the frames that waited for it."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._inflight is not None:
            concurrent.futures.wait([self._inflight])
            self._settle_inflight()
        if self._unsynced:
            rows = [r for rs in self._unsynced.values() for r in rs]
            keys, self._unsynced = list(self._unsynced), {}
            self._store.put_docs(rows)
            self.stats["versions_committed"] += len(rows)
            self._committed(self._seq, keys)

    async def _flushed(self, need: int | None = None) -> None:
        """Return once persist ``need`` (default: every persist so far) is committed."""
        need = self._seq if need is None else need
        if need <= self._committed_seq:
            return
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((need, fut))
        self._schedule_flush()
        await fut

    def _send(self, host: str, port: int, msg: Any, need: int | None = None) -> None:
        """Send ``msg`` once the versions it carries are committed (at once if they are)."""
        need = self._needs(getattr(msg, "docs", ())) if need is None else need
        if need <= self._committed_seq:
            self._send_udp(host, port, msg)
        else:
            self._after_flush.append((need, host, port, msg))
            self._schedule_flush()

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        # A flag, not only cancellation: asyncio.wait_for (3.11) may swallow a cancel that
        # lands as the event fires, and the loop would then wait on for ever.
        while not self._stopping:
            try:
                now_ms = self._clock.now_ms()
                for effect in self._core.tick(now_ms, self._live_peers()):
                    match effect:
                        case Push(peer, docs, also):
                            for msg in pack_updates(docs, self._frame_max_bytes, self.replica.node_id,
                                                    self._cluster, also):
                                self._send(peer.host, peer.port, msg)
                        case Sync(peer):
                            if peer.id not in self._syncing:
                                asyncio.create_task(self._sync(peer))
                if now_ms >= self._next_gc_ms:
                    self._next_gc_ms = now_ms + GC_INTERVAL_MS
                    self._gc()
                delay_s = max(0.0, (self._core.next_deadline_ms() - self._clock.now_ms()) / 1000)
            except Exception as exc:   # a broken invariant: stop the node
                log.exception("document gossip failed")
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                return
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(delay_s, 1.0))

    def _gc(self) -> None:
        live = [p.id for p in self._live_peers()] + [self.replica.node_id]
        collected = self.replica.gc(self._clock.wall_ms(), live)
        if collected.docs:
            self._persist(collected.docs)
        if collected.removed:
            self.flush()              # a batched row of a removed key must not come back after it
            self._store.delete_docs(collected.removed)

    # ------------------------------------------------------------------ TCP anti-entropy
    async def _sync(self, peer: Peer) -> None:
        self._syncing.add(peer.id)
        self.stats["syncs_out"] += 1
        writer = None
        try:
            async with asyncio.timeout(SESSION_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(peer.host, peer.port)
                session = self.replica.sync(peer.id, frame_max_bytes=self._codec_frame_budget(),
                                            cluster=self._cluster)
                msg: DocSync | None = session.start()
                rounds = 0
                while msg is not None and rounds < SESSION_ROUNDS_MAX:
                    rounds += 1
                    await self._write(writer, msg)
                    sender, reply = await self._read(reader)
                    step = session.step(self._clock.wall_ms(), reply)
                    self._repaired(step.changed)
                    msg = step.reply
                self.synced = self.synced or msg is None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, wire.DecodeError, SyncError,
                ValueError) as e:
            self.stats["sync_errors"] += 1
            log.debug("anti-entropy with %s failed: %s", peer.id, e)
        finally:
            self._syncing.discard(peer.id)
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["syncs_in"] += 1
        session = None
        try:
            async with asyncio.timeout(SESSION_TIMEOUT_S):
                for _ in range(SESSION_ROUNDS_MAX):
                    try:
                        sender, msg = await self._read(reader)
                    except asyncio.IncompleteReadError:
                        self.synced = self.synced or session is not None
                        return       # the initiator is done
                    if session is None:
                        session = self.replica.sync(sender, frame_max_bytes=self._codec_frame_budget(),
                                                    cluster=self._cluster)
                    step = session.step(self._clock.wall_ms(), msg)
                    self._repaired(step.changed)
                    await self._write(writer, step.reply or DocSync())
        except (OSError, asyncio.TimeoutError, wire.DecodeError, SyncError, ValueError) as e:
            self.stats["sync_errors"] += 1
            log.debug("anti-entropy session failed: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _repaired(self, changed: list[Doc]) -> None:
        if changed:
            self.stats["repairs"] += len(changed)
            self._changed(changed)

    def _codec_frame_budget(self) -> int:
        return self._codec.frame_max_bytes

    async def _write(self, writer: asyncio.StreamWriter, msg: DocSync) -> None:
        await self._flushed()
        frame = self._codec.encode(msg, self._clock.wall_ms())
        writer.write(_LEN.pack(len(frame)) + frame)
        self.stats["tcp_bytes_out"] += len(frame) + _LEN.size
        await writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> tuple[str, DocSync]:
        head = await asyncio.wait_for(reader.readexactly(_LEN.size), READ_TIMEOUT_S)
        (n,) = _LEN.unpack(head)
        if n > self._codec.frame_max_bytes:
            raise wire.DecodeError("too_large", f"{n} bytes")
        frame = await asyncio.wait_for(reader.readexactly(n), READ_TIMEOUT_S)
        self.stats["tcp_bytes_in"] += n + _LEN.size
        env = self._codec.decode(frame, self._clock.wall_ms())
        if not isinstance(env.msg, DocSync):
            raise wire.DecodeError("invalid", "expected DocSync")
        return env.sender, env.msg
