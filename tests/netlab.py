"""NetLab: N Linux network namespaces on one private bridge, for multi-host tests.

Theory of operation: a lab is a *switch* namespace holding bridge ``br0`` (IGMP snooping,
STP and forward delay off, so multicast floods and ports forward at once) and N *host*
namespaces.  Host ``i`` (1-based) has a veth ``eth0`` with ``10.77.<subnet>.<i>/24`` plus
``lo`` and a ``224.0.0.0/4`` route; the veth's peer is port ``p<i>`` of ``br0``.  There is
no default route and the bridge is not in the root namespace, so lab traffic can reach
nothing but the lab, and the root namespace's firewall (``br_netfilter``) never sees it.

Names: every namespace is ``gxl<pid>x<k>sw`` or ``gxl<pid>x<k>h<i>`` (pid of the creating
process, ``k`` a per-process counter), so concurrent labs never collide; interface names
are namespace-local and short (``br0``, ``p<i>``, ``eth0``).  A lab whose creator died
(crash, kill -9) is *stale*: its creator pid is gone, or was reused by a process started
after the namespace was created.  Every new lab first removes stale labs — only those
matching this exact naming pattern.

Teardown (``close()``, also on errors in ``__init__`` and ``__exit__``): SIGTERM every
process in the lab's namespaces (pids from ``ip netns pids``), SIGKILL what is left after
a grace period, reap the ``Popen`` objects this lab created, delete the namespaces (the
veths and the bridge die with them).  ``close()`` is idempotent.

Faults: ``cut(i)``/``heal(i)`` take host i's bridge port down/up (a clean partition);
``loss(i, pct)``/``unloss(i)`` drop a random share of host i's inbound packets on eth0
(nft ``numgen random``; iptables ``-m statistic`` if nft is missing).  tc netem is not
available on the kernels we run on (see the feasibility notes), so latency must be
injected in user space.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

NS_PATTERN = re.compile(r"^gxl(\d+)x(\d+)(?:sw|h\d+)$")
NETNS_DIR = "/run/netns"
HOSTS_MAX = 250
TERM_GRACE_S = 2.0
KILL_GRACE_S = 3.0
LINK_READY_TIMEOUT_S = 5.0
POLL_S = 0.02
CMD_TIMEOUT_S = 30.0
LOSS_TABLE = "gxlab"           # nft table (inet family) holding the loss rule
LOSS_COMMENT = "gxlab-loss"    # iptables comment marking the loss rule

_counter = itertools.count()


def available() -> str | None:
    """None if labs can be built here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    if shutil.which("ip") is None:
        return "network-namespace tests need iproute2 ('ip' not on PATH)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit() and int(tok) != os.getpid()]


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _empty_namespaces(names: Sequence[str], procs: Sequence[subprocess.Popen[Any]]) -> None:
    """Kill every process in ``names`` (TERM, then KILL); reap our own children."""
    for sig, grace_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        deadline = time.monotonic() + grace_s
        while True:
            pids = [pid for ns in names for pid in _netns_pids(ns)]
            for p in procs:
                p.poll()                      # reap, so a dead child leaves the list
            if not pids:
                return
            _signal_all(pids, sig)
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
    left = [pid for ns in names for pid in _netns_pids(ns)]
    if left:
        log.warning("netlab: pids %s survived SIGKILL in %s", left, names)


def _owner_alive(pid: int, ns: str) -> bool:
    """Is the process that created namespace ``ns`` still running?"""
    try:
        created = os.stat(os.path.join(NETNS_DIR, ns)).st_mtime
    except OSError:
        created = None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])          # field 22 (starttime), counted after "comm)"
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        started = btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return False
    # A pid reused by a process younger than the namespace is not the creator.
    return created is None or started <= created + 1.0


def cleanup_stale() -> list[str]:
    """Delete labs of this naming scheme whose creating process is gone; return their names."""
    stale: dict[str, list[str]] = {}
    for ns in _netns_list():
        m = NS_PATTERN.match(ns)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _owner_alive(pid, ns):
            continue
        stale.setdefault(f"gxl{m.group(1)}x{m.group(2)}", []).append(ns)
    removed: list[str] = []
    for names in stale.values():
        _empty_namespaces(names, [])
        for ns in sorted(names, key=lambda n: n.endswith("sw")):   # hosts first, switch last
            if _ip("netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
    if removed:
        log.info("netlab: removed stale namespaces %s", removed)
    return removed


class NetLab:
    """``with NetLab(3) as lab: lab.popen(1, [...])`` — hosts are numbered 1..n."""

    def __init__(self, n: int, subnet: int | None = None) -> None:
        if not 1 <= n <= HOSTS_MAX:
            raise ValueError(f"n must be in 1..{HOSTS_MAX}, got {n}")
        reason = available()
        if reason is not None:
            raise RuntimeError(reason)
        k = next(_counter)
        self.n = n
        self.prefix = f"gxl{os.getpid()}x{k}"
        self.subnet = subnet if subnet is not None else 1 + (os.getpid() + k) % 254
        if not 0 <= self.subnet <= 255:
            raise ValueError(f"subnet must be in 0..255, got {self.subnet}")
        self.switch_ns = f"{self.prefix}sw"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._loss_backend: dict[int, str] = {}
        self._closed = False
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- construction -------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)

    def _build(self) -> None:
        sw = self.switch_ns
        self._add_ns(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "type", "bridge",
            "mcast_snooping", "0", "stp_state", "0", "forward_delay", "0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i in self.hosts:
            ns = self.ns(i)
            self._add_ns(ns)
            # Created directly across namespaces: the names never exist in the root namespace.
            _ip("link", "add", f"p{i}", "netns", sw, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", sw, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.host_ip(i)}/24", "brd", "+", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        for i in self.hosts:
            self._wait_port_forwarding(i)

    def _port_forwarding(self, i: int) -> bool:
        out = _ip("-n", self.switch_ns, "-j", "-d", "link", "show", "dev", f"p{i}", check=False).stdout
        try:
            link = json.loads(out)[0]
        except (ValueError, IndexError):
            return False
        state = link.get("linkinfo", {}).get("info_slave_data", {}).get("state")
        return link.get("operstate") == "UP" and state == "forwarding"

    def _wait_port_forwarding(self, i: int) -> None:
        deadline = time.monotonic() + LINK_READY_TIMEOUT_S
        while not self._port_forwarding(i):
            if time.monotonic() > deadline:
                raise RuntimeError(f"netlab: bridge port p{i} not forwarding after {LINK_READY_TIMEOUT_S}s")
            time.sleep(POLL_S)

    # ---- addressing ---------------------------------------------------------------------

    @property
    def hosts(self) -> range:
        return range(1, self.n + 1)

    def _check(self, i: int) -> None:
        if i not in self.hosts:
            raise IndexError(f"host {i} not in 1..{self.n}")

    def ns(self, i: int) -> str:
        self._check(i)
        return f"{self.prefix}h{i}"

    def host_ip(self, i: int) -> str:
        self._check(i)
        return f"10.77.{self.subnet}.{i}"

    @property
    def broadcast_ip(self) -> str:
        return f"10.77.{self.subnet}.255"

    # ---- processes ----------------------------------------------------------------------

    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run on host i (for asyncio subprocesses and the like)."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on host i; the lab kills and reaps it on close()."""
        if self._closed:
            raise RuntimeError("netlab is closed")
        proc = subprocess.Popen(self.argv(i, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", CMD_TIMEOUT_S)
        return subprocess.run(self.argv(i, argv), **kw)

    # ---- faults -------------------------------------------------------------------------

    def cut(self, i: int) -> None:
        """Partition host i from everyone (its bridge port goes down)."""
        self._check(i)
        _ip("-n", self.switch_ns, "link", "set", f"p{i}", "down")

    def heal(self, i: int) -> None:
        self._check(i)
        _ip("-n", self.switch_ns, "link", "set", f"p{i}", "up")
        self._wait_port_forwarding(i)

    def loss(self, i: int, pct: float, tool: str | None = None) -> None:
        """Drop ``pct`` percent (0..100, two decimals) of host i's inbound packets on eth0.

        ``tool`` forces "nft" or "iptables"; by default nft if installed, else iptables.
        """
        if not 0 <= pct <= 100:
            raise ValueError(f"pct must be in 0..100, got {pct}")
        if tool not in (None, "nft", "iptables"):
            raise ValueError(f"tool must be None, 'nft' or 'iptables', got {tool!r}")
        self.unloss(i)
        ns = self.ns(i)
        if tool is None:
            tool = "nft" if shutil.which("nft") else "iptables" if shutil.which("iptables") else None
        if tool == "nft":
            basis = round(pct * 100)               # out of 10000; nft wants it below the modulus
            match = "" if basis >= 10000 else f"numgen random mod 10000 < {basis} "
            for cmd in (
                f"add table inet {LOSS_TABLE}",
                f"add chain inet {LOSS_TABLE} in {{ type filter hook input priority 0; policy accept; }}",
                f'add rule inet {LOSS_TABLE} in iifname "eth0" {match}drop',
            ):
                self._checked(["ip", "netns", "exec", ns, "nft", cmd])
            self._loss_backend[i] = "nft"
        elif tool == "iptables":
            self._checked(["ip", "netns", "exec", ns, "iptables", *self._ipt_rule("-A", pct)])
            self._loss_backend[i] = f"iptables:{pct}"
        else:
            raise RuntimeError("netlab.loss needs nft or iptables (apt-get install nftables iptables)")

    def unloss(self, i: int) -> None:
        ns = self.ns(i)
        backend = self._loss_backend.pop(i, None)
        if backend == "nft":
            self._checked(["ip", "netns", "exec", ns, "nft", f"delete table inet {LOSS_TABLE}"])
        elif backend is not None:
            pct = float(backend.split(":", 1)[1])
            self._checked(["ip", "netns", "exec", ns, "iptables", *self._ipt_rule("-D", pct)])

    @staticmethod
    def _ipt_rule(op: str, pct: float) -> list[str]:
        return [op, "INPUT", "-i", "eth0", "-m", "comment", "--comment", LOSS_COMMENT,
                "-m", "statistic", "--mode", "random", "--probability", f"{pct / 100:.4f}", "-j", "DROP"]

    @staticmethod
    def _checked(argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")

    # ---- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _empty_namespaces(self._created, self._procs)
        finally:
            for proc in self._procs:
                try:
                    proc.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    # Still alive outside the namespace accounting (e.g. `ip` not yet exec'd).
                    proc.kill()
                    proc.wait(timeout=KILL_GRACE_S)
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
            for ns in reversed(self._created):              # hosts first, switch last
                res = _ip("netns", "del", ns, check=False)
                if res.returncode != 0:
                    log.warning("netlab: could not delete %s: %s", ns, res.stderr.strip())
            self._created.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetLab({self.n}, prefix={self.prefix!r}, subnet=10.77.{self.subnet}.0/24)"
