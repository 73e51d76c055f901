"""The asyncio edge of gossip membership: one UDP socket and one timer.

Theory of operation: ``GossipRunner`` owns a UDP socket bound to ``bind_host:port`` (port 0
picks a free one; ``port`` tells which) and a timer task.  It makes no protocol decisions:

* the timer sleeps until ``core.next_deadline_ms()`` (or until an input wakes it, since an
  input may move the deadline) and then calls ``core.tick(now_ms)``;
* every datagram goes through ``codec.decode(data, wall_ms)``; a ``wire.DecodeError``
  drops it (the codec counts it by reason: too large, malformed, unauthenticated, ...), a
  message that is not for membership (a beacon on the wrong port, a document message) is
  counted and dropped, and a membership message (``messages.SWIM_TYPES`` or the old
  ``Gossip``) goes to ``core.receive(now_ms, addr, msg)``;
* ``discovered()`` and ``update_self()`` pass straight through;
* the ``SendTo`` effects of every step are encoded with ``codec.encode(msg, wall_ms)`` (a
  fresh nonce each time) and sent in order; after every step the core's events are drained
  to ``on_events``.

The clocks are read once per event: monotonic ``now_ms`` for the core, wall ``wall_ms`` for
the wire.  Nothing a peer sends can raise into the event loop: decode errors are dropped
and send errors counted.  An exception from the core itself is a broken invariant (its
``_check()``): the runner logs it, stops (socket closed, timer ended) and reports it to
``on_fatal``, so the node stops instead of running on in a wrong state.

``stop(leave=True)`` sends the core's leave gossip twice, ``LEAVE_REPEAT_GAP_MS`` apart, so
one lost datagram does not turn a graceful stop into a failure on a peer, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from galaxy import wire
from galaxy.clock import Clock
from galaxy.gossip.membership import Membership, SendTo
from galaxy.messages import SWIM_TYPES, Gossip

log = logging.getLogger(__name__)

# The gap between the two copies of the leave gossip: longer than a burst of loss on a
# busy LAN or Wi-Fi, short enough not to hold up a shutdown.
LEAVE_REPEAT_GAP_MS = 50
# asyncio buffers datagrams the kernel would not take yet, without a limit; gossip is loss
# tolerant, so past this we drop instead (a few rounds of a large table).
SEND_BUFFER_MAX_BYTES = 4 * 1024 * 1024

Events = list[tuple[str, str, str]]
MEMBERSHIP_TYPES = frozenset((Gossip, *SWIM_TYPES))


class GossipRunner(asyncio.DatagramProtocol):
    def __init__(self, core: Membership, codec: wire.Codec, clock: Clock, bind_host: str,
                 port: int, on_events: Callable[[Events], Any] | None = None, *,
                 on_fatal: Callable[[BaseException], Any] | None = None,
                 on_message: Callable[[str, tuple[str, int], Any], Any] | None = None,
                 on_frame: Callable[[str, int, int], Any] | None = None) -> None:
        self._core = core
        # Every authenticated frame's (sender, sent_ms, our wall_ms): the node estimates clock skew.
        self._on_frame = on_frame
        # Frames of other layers on the gossip port (replicated documents): (sender, addr, msg).
        self._on_message = on_message
        self._codec = codec
        self._clock = clock
        self._bind_host = bind_host
        self._port = port
        self._on_events = on_events
        self._on_fatal = on_fatal
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self.stats: dict[str, int] = {
            "received": 0, "dropped_decode": 0, "dropped_type": 0, "sent": 0,
            "encode_errors": 0, "send_errors": 0, "dropped_send_buffer": 0,
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self._bind_host, self._port))
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.create_task(self._run_timer(), name="gossip-timer")

    @property
    def port(self) -> int:
        """The bound UDP port (the real one when started with port 0)."""
        if self._transport is None:
            return self._port
        return self._transport.get_extra_info("sockname")[1]

    async def stop(self, leave: bool = True) -> None:
        if self._stopped:
            return
        if leave and self._transport is not None and self.error is None:
            self._step(lambda now_ms: self._core.leave(now_ms))
            await asyncio.sleep(LEAVE_REPEAT_GAP_MS / 1000)
            # leave() is idempotent: the same records again, encoded with a fresh nonce
            # (the codec would drop a byte-identical frame as a replay).
            self._step(lambda now_ms: self._core.leave(now_ms))
        self._shutdown()
        if self._timer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    def _shutdown(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()

    # ---------------------------------------------------------------- inputs

    def discovered(self, host: str, port: int) -> None:
        self._step(lambda now_ms: self._core.discovered(now_ms, host, port))

    def update_self(self, **fields: Any) -> None:
        self._step(lambda now_ms: self._core.update_self(now_ms, **fields) or [])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._stopped:
            return
        self.stats["received"] += 1
        self.stats["bytes_received"] = self.stats.get("bytes_received", 0) + len(data)
        wall_ms = self._clock.wall_ms()
        try:
            env = self._codec.decode(data, wall_ms)
        except wire.DecodeError:
            self.stats["dropped_decode"] += 1   # by reason in codec.stats
            return
        if self._on_frame is not None:
            self._on_frame(env.sender, env.sent_ms, wall_ms)
        msg = env.msg
        src = (addr[0], addr[1])                # IPv6 addresses come with flow info and scope
        if type(msg) not in MEMBERSHIP_TYPES:
            if self._on_message is None:
                self.stats["dropped_type"] += 1
                return
            try:
                self._on_message(env.sender, src, msg)
            except Exception as exc:
                self._fail(exc)
            return
        self._step(lambda now_ms: self._core.receive(now_ms, src, msg))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier sends (port unreachable: a peer went away).
        self.stats["send_errors"] += 1
        log.debug("gossip socket error: %s", exc)

    # ---------------------------------------------------------------- the step

    def _step(self, call: Callable[[int], list[SendTo]]) -> None:
        """Run one core step at the current time, send its effects, report its events."""
        if self._stopped:
            return
        try:
            sends = call(self._clock.now_ms())
            events = self._core.events()
        except Exception as exc:
            self._fail(exc)
            return
        self._send(sends)
        if events and self._on_events is not None:
            try:
                self._on_events(events)
            except Exception:
                log.exception("on_events failed")
        self._wake.set()

    def send(self, host: str, port: int, msg: Any) -> None:
        """Send another layer's message (a DocUpdate) from the gossip socket."""
        self._send([SendTo(host, port, msg)])

    def _send(self, sends: list[SendTo]) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        wall_ms = self._clock.wall_ms()
        for s in sends:
            try:
                frame = self._codec.encode(s.msg, wall_ms)
            except wire.EncodeError as exc:
                self.stats["encode_errors"] += 1
                log.warning("gossip to %s:%d not sent: %s", s.host, s.port, exc)
                continue
            if self._transport.get_write_buffer_size() > SEND_BUFFER_MAX_BYTES:
                self.stats["dropped_send_buffer"] += 1
                continue
            try:
                self._transport.sendto(frame, (s.host, s.port))
            except (OSError, ValueError) as exc:   # an unresolvable name, a bad address
                self.stats["send_errors"] += 1
                log.debug("gossip to %s:%d failed: %s", s.host, s.port, exc)
                continue
            self.stats["sent"] += 1
            self.stats["bytes_sent"] = self.stats.get("bytes_sent", 0) + len(frame)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        log.critical("gossip membership broke an invariant; stopping gossip", exc_info=exc)
        self._shutdown()
        if self._on_fatal is not None:
            try:
                self._on_fatal(exc)
            except Exception:
                log.exception("on_fatal failed")

    async def _run_timer(self) -> None:
        while not self._stopped:
            now_ms = self._clock.now_ms()
            wait_ms = self._core.next_deadline_ms() - now_ms
            if wait_ms <= 0:
                self._step(self._core.tick)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_ms / 1000):
                    await self._wake.wait()
