"""Static seed addresses, retried with capped exponential backoff until joined.

Theory of operation: the user gives ``--join HOST:PORT[,...]``.  ``SeedBackoff`` is a pure
schedule (no clock, no I/O): the runner asks ``due(now_ms)`` which seeds to contact now
and sleeps until ``next_deadline_ms()``.  A seed is due at once the first time; after
its n-th attempt it is due again after a delay drawn uniformly from
``[max(min_ms, 0.8*b), min(max_ms, 1.2*b)]`` with ``b = min(max_ms, min_ms * 2**(n-1))``,
so retries spread out (no thundering herd after a coordinator restart) and never wait
longer than ``max_ms``.  ``joined(host, port)`` retires a seed; ``reset()`` makes every
seed due again from scratch (the node found itself alone).

Invariants: every returned delay lies in ``[min_ms, max_ms]``; a joined seed is never
returned by ``due``; the seed list is deduplicated and bounded by ``SEEDS_MAX``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:                  # the core stays free of the random module at run time
    from random import Random

SEEDS_MAX = 256            # a seed list is typed by a human; more is a config mistake
ATTEMPT_EXP_MAX = 40       # 2**40 * min_ms overflows any sane max_ms; stop doubling there
JITTER_LOW, JITTER_HIGH = 0.8, 1.2
DUE_NOW_MS = -(2**63)      # next_deadline_ms() when a seed was never tried: before any now_ms


def parse_addr(entry: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` allowed); ValueError names the bad entry."""
    text = entry.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError(f"seed {entry!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"seed {entry!r}: bad IPv6 address {host!r}") from None
    elif ":" in host:
        raise ValueError(f"seed {entry!r}: write an IPv6 host as [ADDR]:PORT")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"seed {entry!r}: port must be an integer in 1..65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"seed {entry!r}: port must be an integer in 1..65535")
    if any(c.isspace() for c in host):
        raise ValueError(f"seed {entry!r}: bad host {host!r}")
    return host, port


@dataclass(slots=True)
class _Seed:
    addr: tuple[str, int]
    attempts: int = 0
    next_ms: int | None = None     # None: due now (never tried since construction/reset)
    joined: bool = False


class SeedBackoff:
    def __init__(self, addrs: Sequence[str], min_ms: int, max_ms: int, rng: Random) -> None:
        if isinstance(addrs, str):
            raise TypeError("addrs must be a sequence of 'HOST:PORT' strings, not one string")
        if not 0 < min_ms <= max_ms:
            raise ValueError(f"need 0 < min_ms <= max_ms, got {min_ms}, {max_ms}")
        seen: dict[tuple[str, int], _Seed] = {}
        for entry in addrs:
            addr = parse_addr(entry)
            seen.setdefault(addr, _Seed(addr))
        if len(seen) > SEEDS_MAX:
            raise ValueError(f"at most {SEEDS_MAX} seeds, got {len(seen)}")
        self._seeds = list(seen.values())
        self._min_ms = min_ms
        self._max_ms = max_ms
        self._rng = rng

    @property
    def seeds(self) -> tuple[tuple[str, int], ...]:
        return tuple(s.addr for s in self._seeds)

    @property
    def pending(self) -> tuple[tuple[str, int], ...]:
        """Seeds not yet joined."""
        return tuple(s.addr for s in self._seeds if not s.joined)

    def due(self, now_ms: int) -> list[tuple[str, int]]:
        """Seeds to contact now; each returned seed is scheduled for its next retry."""
        out: list[tuple[str, int]] = []
        for s in self._seeds:
            if s.joined or (s.next_ms is not None and s.next_ms > now_ms):
                continue
            s.attempts += 1
            s.next_ms = now_ms + self._delay_ms(s.attempts)
            out.append(s.addr)
        return out

    def next_deadline_ms(self) -> int | None:
        """When ``due`` next returns something (a past value: now); None if all joined."""
        waiting = [s.next_ms for s in self._seeds if not s.joined]
        if not waiting:
            return None
        if any(t is None for t in waiting):
            return DUE_NOW_MS
        return min(t for t in waiting if t is not None)

    def joined(self, host: str, port: int) -> None:
        """Stop retrying ``host:port``; unknown addresses are ignored (joined elsewhere)."""
        for s in self._seeds:
            if s.addr == (host, port):
                s.joined = True

    def reset(self) -> None:
        """Retry every seed from scratch, due at once."""
        for s in self._seeds:
            s.attempts, s.next_ms, s.joined = 0, None, False

    def _delay_ms(self, attempts: int) -> int:
        base = min(self._max_ms, self._min_ms * 2 ** min(attempts - 1, ATTEMPT_EXP_MAX))
        low = max(self._min_ms, JITTER_LOW * base)
        high = min(self._max_ms, JITTER_HIGH * base)
        delay = round(self._rng.uniform(low, high))
        return min(self._max_ms, max(self._min_ms, delay))
