"""A simulated datagram network: one event queue, one ``SimClock``, one seeded rng.

Theory of operation
-------------------
Nodes are sans-IO cores at addresses.  A node is anything with ``tick(now_ms)``,
``receive(now_ms, src, msg)`` and ``next_deadline_ms()``; its steps return effects, and
the network asks ``route(effect)`` which of them are datagrams and where they go
(``(dst_address, message)``, or ``None`` for an effect that is not a datagram, handed to
``on_effect``).  Messages are opaque: the network never looks inside them, so membership
and replicated documents can share it.

One heap holds every future event, ordered by ``(time, sequence number)``: datagrams in
flight and each node's next deadline.  The sequence number is global, so ties break in
the order things were scheduled and a run is a pure function of the seed and of the
calls made on the network.  ``run(duration_ms)`` pops events in order, moves the clock to
each one, steps the node, routes its effects and reschedules the node at its new
``next_deadline_ms()`` (an entry per deadline change; an entry that no longer matches the
node's current deadline is skipped when popped).

Faults, all decided with the network's rng when a datagram is sent:

* latency: uniform in ``latency_ms`` (inclusive), per link overridable (``set_link``);
* loss: a global rate, per-node inbound and outbound rates, per-link rates; each applies
  independently.  Messages for which ``lossless(msg)`` holds (frames of a simulated TCP
  stream, whose retransmissions turn loss into delay) are never lost at random, but
  partitions and crashes cut them like any other;
* partitions: ``partition(groups)`` puts addresses in groups; a datagram crosses no group
  border, checked when it would be delivered (a cable cut also loses what is in flight);
  addresses in no group are reachable only from other ungrouped addresses;
* crashes: a down node is never stepped, datagrams to it are lost; ``restart`` puts a new
  node object at the address (its old timers are void).

Observers: ``on_step(addr, node, effects)`` after every step (cross-step invariant checks,
event logs), ``on_send(src, dst, msg, size_bytes)`` for every datagram sent, counted in
bytes by ``size_of(msg)`` when given.

Invariants: the clock never goes back; only up nodes are stepped; each node has at most
one valid timer entry; at most ``flight_max`` datagrams are in flight (more is a runaway
protocol: ``SimOverload`` is raised rather than letting memory grow); a node's timer fires
at most ``SPIN_MAX`` times in a row at one instant (a deadline that stays in the past is
a busy loop in the real runner: ``SimOverload`` names the node).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from galaxy.clock import SimClock

Addr = Hashable
Route = Callable[[Any], "tuple[Addr, Any] | None"]

_DELIVER, _TIMER = 0, 1
SPIN_MAX = 1000       # timer steps of one node at one instant; a correct core needs a handful


class SimNode(Protocol):
    def tick(self, now_ms: int) -> Iterable[Any]: ...
    def receive(self, now_ms: int, src: Any, msg: Any) -> Iterable[Any]: ...
    def next_deadline_ms(self) -> int: ...


class SimOverload(RuntimeError):
    """More datagrams in flight than ``flight_max``."""


def host_port_route(effect: Any) -> tuple[Addr, Any] | None:
    """Effects with ``host``, ``port`` and ``msg`` (membership's ``SendTo``) are datagrams."""
    msg = getattr(effect, "msg", None)
    if msg is None:
        return None
    return (effect.host, effect.port), msg


@dataclass(slots=True)
class LinkFault:
    loss: float = 0.0
    latency_ms: tuple[int, int] | None = None


class SimNetwork:
    def __init__(self, seed: int, *, clock: SimClock | None = None, latency_ms: tuple[int, int] = (1, 5),
                 loss: float = 0.0, route: Route = host_port_route,
                 size_of: Callable[[Any], int] | None = None, flight_max: int = 2_000_000,
                 lossless: Callable[[Any], bool] | None = None) -> None:
        if not 0 <= latency_ms[0] <= latency_ms[1]:
            raise ValueError("latency_ms must be (low, high) with 0 <= low <= high")
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = clock or SimClock()
        self.latency_ms = latency_ms
        self.loss = loss
        self.route = route
        self.size_of = size_of
        self.flight_max = flight_max
        self.lossless = lossless
        self.nodes: dict[Addr, SimNode] = {}
        self.down: set[Addr] = set()
        self.on_step: Callable[[Addr, SimNode, list[Any]], None] | None = None
        self.on_send: Callable[[Addr, Addr, Any, int], None] | None = None
        self.on_effect: Callable[[Addr, Any], None] | None = None
        self.inbound_loss: dict[Addr, float] = {}
        self.outbound_loss: dict[Addr, float] = {}
        self.links: dict[tuple[Addr, Addr], LinkFault] = {}
        self._group_of: dict[Addr, int] = {}
        self._heap: list[tuple[int, int, int, Any, Any, Any]] = []
        self._seq = itertools.count()
        self._deadline: dict[Addr, tuple[int, int]] = {}     # addr -> (time, entry seq)
        self._in_flight = 0
        self._spin: dict[Addr, tuple[int, int]] = {}      # addr -> (time, timer steps at it)
        self.stats: dict[str, int] = {
            "sent": 0, "delivered": 0, "lost": 0, "partitioned": 0, "to_down": 0, "to_nowhere": 0,
            "bytes": 0, "steps": 0,
        }

    # ---------------------------------------------------------------- nodes

    @property
    def now_ms(self) -> int:
        return self.clock.now_ms()

    def add(self, addr: Addr, node: SimNode) -> None:
        """Put ``node`` at ``addr`` (replacing whatever was there) and schedule it."""
        self.nodes[addr] = node
        self.down.discard(addr)
        self._deadline.pop(addr, None)
        self._reschedule(addr)

    def crash(self, addr: Addr) -> None:
        """The node stops: it is never stepped again and receives nothing."""
        self.down.add(addr)
        self._deadline.pop(addr, None)

    restart = add   # a restart is a new node object at the same address

    def is_up(self, addr: Addr) -> bool:
        return addr in self.nodes and addr not in self.down

    def up(self) -> list[tuple[Addr, SimNode]]:
        return [(a, n) for a, n in self.nodes.items() if a not in self.down]

    def call(self, addr: Addr, step: Callable[[int], Iterable[Any] | None]) -> list[Any]:
        """Run ``step(now_ms)`` on the node at ``addr`` as a step of the run (an outside
        input such as ``discovered`` or ``update_self``): its effects are routed."""
        if not self.is_up(addr):
            raise ValueError(f"{addr!r} is not up")
        effects = list(step(self.now_ms) or ())
        self._after(addr, effects)
        return effects

    # ---------------------------------------------------------------- faults

    def partition(self, *groups: Iterable[Addr]) -> None:
        self._group_of = {a: g for g, members in enumerate(groups) for a in members}

    def heal(self) -> None:
        self._group_of = {}

    def set_link(self, src: Addr, dst: Addr, loss: float = 0.0, latency_ms: tuple[int, int] | None = None) -> None:
        self.links[(src, dst)] = LinkFault(loss, latency_ms)

    def _cut(self, src: Addr, dst: Addr) -> bool:
        groups = self._group_of
        return bool(groups) and groups.get(src, -1) != groups.get(dst, -1)

    # ---------------------------------------------------------------- running

    def send(self, src: Addr, dst: Addr, msg: Any) -> None:
        """Put one datagram on the wire (loss and latency decided now)."""
        rng = self.rng
        self.stats["sent"] += 1
        size = self.size_of(msg) if self.size_of is not None else 0
        self.stats["bytes"] += size
        if self.on_send is not None:
            self.on_send(src, dst, msg, size)
        link = self.links.get((src, dst)) if self.links else None
        if self.lossless is None or not self.lossless(msg):
            for p in (self.loss, self.outbound_loss.get(src, 0.0), self.inbound_loss.get(dst, 0.0),
                      link.loss if link else 0.0):
                if p and rng.random() < p:
                    self.stats["lost"] += 1
                    return
        lo, hi = link.latency_ms if link and link.latency_ms else self.latency_ms
        at = self.now_ms + (lo if lo == hi else rng.randint(lo, hi))
        if self._in_flight >= self.flight_max:
            raise SimOverload(f"seed={self.seed}: more than {self.flight_max} datagrams in flight")
        self._in_flight += 1
        heapq.heappush(self._heap, (at, next(self._seq), _DELIVER, src, dst, msg))

    def _after(self, addr: Addr, effects: list[Any]) -> None:
        node = self.nodes[addr]
        self.stats["steps"] += 1
        if self.on_step is not None:
            self.on_step(addr, node, effects)
        for e in effects:
            routed = self.route(e)
            if routed is None:
                if self.on_effect is not None:
                    self.on_effect(addr, e)
                continue
            dst, msg = routed
            self.send(addr, dst, msg)
        if addr not in self.down:
            self._reschedule(addr)

    def _reschedule(self, addr: Addr) -> None:
        d = self.nodes[addr].next_deadline_ms()
        cur = self._deadline.get(addr)
        if cur is None or cur[0] != d:
            seq = next(self._seq)
            self._deadline[addr] = (d, seq)
            heapq.heappush(self._heap, (d, seq, _TIMER, addr, None, None))

    def run(self, duration_ms: int) -> None:
        """Process every event up to ``now + duration_ms``; the clock ends there."""
        until = self.now_ms + duration_ms
        heap, clock, nodes, down = self._heap, self.clock, self.nodes, self.down
        while heap and heap[0][0] <= until:
            at, seq, kind, a, b, msg = heapq.heappop(heap)
            if at > clock.now_ms():
                clock.set(at)
            now = clock.now_ms()
            if kind == _DELIVER:
                self._in_flight -= 1
                src, dst = a, b
                if dst not in nodes:
                    self.stats["to_nowhere"] += 1
                    continue
                if dst in down:
                    self.stats["to_down"] += 1
                    continue
                if self._group_of and self._cut(src, dst):
                    self.stats["partitioned"] += 1
                    continue
                self.stats["delivered"] += 1
                effects = list(nodes[dst].receive(now, src, msg))
                self._after(dst, effects)
            else:
                addr = a
                if addr in down or self._deadline.get(addr) != (at, seq):
                    continue
                del self._deadline[addr]
                at_ms, n = self._spin.get(addr, (-1, 0))
                if at_ms == now:
                    if n >= SPIN_MAX:
                        raise SimOverload(f"seed={self.seed}: {addr!r} wakes again and again at {now} ms "
                                          f"(deadline {nodes[addr].next_deadline_ms()}): a busy loop")
                    self._spin[addr] = (now, n + 1)
                else:
                    self._spin[addr] = (now, 1)
                effects = list(nodes[addr].tick(now))
                self._after(addr, effects)
        if until > clock.now_ms():
            clock.set(until)

    def run_until(self, pred: Callable[[], bool], limit_ms: int, step_ms: int = 50, what: str = "the condition") -> int:
        """Run in ``step_ms`` slices until ``pred()``; return the simulated time it took.

        Fails naming the seed when ``limit_ms`` passes first.
        """
        start = self.now_ms
        while not pred():
            if self.now_ms - start >= limit_ms:
                raise AssertionError(f"seed={self.seed}: no {what} within {limit_ms} simulated ms")
            self.run(step_ms)
        return self.now_ms - start
