"""Discovery across real network namespaces: mDNS and UDP broadcast between lab hosts.

Each lab host runs tests/netns/discover_probe.py, which prints every PeerSeen (and its
counters) as JSON lines; the test waits on those lines with deadlines, never sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from galaxy import wire
from tests.netlab import NetLab
from tests.netns.discover_probe import JUNK

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
DISCOVER_TIMEOUT_S = 15.0        # measured: mDNS ~1.2 s, broadcast < interval; 10x headroom
STOP_TIMEOUT_S = 10.0
INTERVAL_MS = 300


class Probe:
    """One discover_probe process on a lab host, its output parsed as it arrives."""

    def __init__(self, lab: NetLab, i: int, node_id: str, key: str, *flags: str,
                 cluster: str = "galaxy") -> None:
        self.i, self.node_id, self.host = i, node_id, lab.host_ip(i)
        argv = [sys.executable, "-m", "tests.netns.discover_probe", "--node-id", node_id,
                "--cluster", cluster, "--host", self.host, "--key", key,
                "--interval-ms", str(INTERVAL_MS), "--seed", str(i), *flags]
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = lab.popen(i, argv, cwd=REPO, env=env, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "garbage", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "eof"})
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait(self, pred: Callable[[list[dict[str, Any]]], bool], what: str,
             timeout_s: float = DISCOVER_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not pred(self.events):
                left = deadline - time.monotonic()
                if left <= 0 or (self.events and self.events[-1]["event"] == "eof"):
                    raise AssertionError(
                        f"host {self.i} ({self.node_id}): {what} not seen within {timeout_s}s\n"
                        f"last events: {self.events[-5:]}\nstderr: {''.join(self.stderr)[-3000:]}")
                self._cond.wait(left)

    def peers(self, source: str) -> set[tuple[str, str, int]]:
        with self._cond:
            return {(e["node_id"], e["host"], e["gossip_port"]) for e in self.events
                    if e["event"] == "peer" and e["source"] == source}

    def first_peer_ms(self, source: str) -> int | None:
        with self._cond:
            return next((e["t_ms"] for e in self.events
                         if e["event"] == "peer" and e["source"] == source), None)

    def status(self) -> dict[str, Any]:
        with self._cond:
            return next((e for e in reversed(self.events) if e["event"] in ("status", "stopped")), {})

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait for a clean exit; return the final counters."""
        self.proc.terminate()
        rc = self.proc.wait(timeout=STOP_TIMEOUT_S)
        for t in self._threads:
            t.join(timeout=STOP_TIMEOUT_S)
        assert rc == 0, f"host {self.i} exited {rc}: {''.join(self.stderr)[-3000:]}"
        final = self.status()
        assert final.get("event") == "stopped", self.events[-3:]
        return final


def _sees(peers: set[tuple[str, str, int]], source: str) -> Callable[[list[dict[str, Any]]], bool]:
    def pred(events: list[dict[str, Any]]) -> bool:
        seen = {(e["node_id"], e["host"], e["gossip_port"])
                for e in events if e["event"] == "peer" and e["source"] == source}
        return peers <= seen
    return pred


def _counter(section: str, name: str, at_least: int) -> Callable[[list[dict[str, Any]]], bool]:
    def pred(events: list[dict[str, Any]]) -> bool:
        return any(e["event"] == "status" and e[section].get(name, 0) >= at_least for e in events)
    return pred


def _expected(probes: list[Probe], me: Probe) -> set[tuple[str, str, int]]:
    return {(p.node_id, p.host, 7946) for p in probes if p is not me}


def _report(label: str, probes: list[Probe], source: str) -> None:
    firsts = [p.first_peer_ms(source) for p in probes]
    print(f"\n{label}: first PeerSeen ({source}) per host, ms after start(): {firsts}")


def _run_three(netlab: Callable[..., NetLab], flag: str, source: str) -> list[Probe]:
    lab = netlab(3)
    key = wire.generate_key()
    probes = [Probe(lab, i, f"node-{i}", key, flag) for i in lab.hosts]
    for p in probes:
        p.wait(_sees(_expected(probes, p), source), f"both other hosts via {source}")
    for p in probes:
        final = p.stop()
        assert p.peers(source) == _expected(probes, p)
        other = "broadcast" if source == "mdns" else "mdns"
        assert p.peers(other) == set(), f"{other} reported peers but was not started"
        assert final["codec"]["ok"] >= (1 if source == "broadcast" else 0)
    _report(source, probes, source)
    return probes


def test_mdns_only_three_hosts_see_each_other(netlab: Callable[..., NetLab]) -> None:
    _run_three(netlab, "--mdns", "mdns")


def test_broadcast_only_three_hosts_see_each_other(netlab: Callable[..., NetLab]) -> None:
    probes = _run_three(netlab, "--broadcast", "broadcast")
    for p in probes:
        stats = p.status()
        assert stats["beacons"]["send_errors"] == 0
        assert stats["beacons"]["ignored_self"] >= 1        # our own beacon loops back: ignored


def test_strangers_are_ignored(netlab: Callable[..., NetLab]) -> None:
    """Hosts 1-3: cluster "galaxy", key K, mDNS + broadcast.  Host 4: same cluster name,
    another key, beacons only.  Host 5: another cluster name, mDNS only, plus services
    of our type and cluster whose TXT is malformed (see discover_probe.JUNK)."""
    lab = netlab(5)
    key, other_key = wire.generate_key(), wire.generate_key()
    members = [Probe(lab, i, f"node-{i}", key, "--mdns", "--broadcast") for i in (1, 2, 3)]
    wrong_key = Probe(lab, 4, "node-4", other_key, "--broadcast")
    wrong_cluster = Probe(lab, 5, "node-5", key, "--mdns", "--junk", cluster="elsewhere")
    wrong_cluster.wait(lambda ev: any(e["event"] == "junk_registered" for e in ev),
                       "junk services announced")

    for p in members:
        for source in ("mdns", "broadcast"):
            p.wait(_sees(_expected(members, p), source), f"both other members via {source}")
        # Positive evidence that the strangers reached us and were turned away:
        p.wait(_counter("codec", "unknown_key", 2), "host 4's beacons dropped as unknown_key")
        p.wait(_counter("mdns", "ignored_cluster", 1), "host 5's mDNS service ignored")
        p.wait(_counter("mdns", "invalid", len(JUNK)), "every junk service rejected")
    wrong_key.wait(_counter("codec", "unknown_key", 3), "members' beacons dropped by host 4")
    wrong_cluster.wait(_counter("mdns", "ignored_cluster", 3), "members' services ignored by host 5")

    finals = [p.stop() for p in members]
    stranger_ids = {"node-4", "node-5"}
    stranger_ips = {lab.host_ip(4), lab.host_ip(5)}
    for p, final in zip(members, finals):
        for source in ("mdns", "broadcast"):
            got = p.peers(source)
            assert got == _expected(members, p), (p.node_id, source, got)
            assert not {g[0] for g in got} & stranger_ids
            assert not {g[1] for g in got} & stranger_ips
        assert final["codec"]["unknown_key"] >= 2
        assert final["beacons"]["peers"] >= 2
        assert final["mdns"]["errors"] == 0
        assert "Traceback" not in "".join(p.stderr), "".join(p.stderr)[-3000:]
    # The strangers, in turn, saw none of the members.
    assert wrong_key.stop()["beacons"]["peers"] == 0
    assert wrong_key.peers("broadcast") == set()
    assert wrong_cluster.stop()["mdns"]["peers"] == 0
    assert wrong_cluster.peers("mdns") == set()
    _report("strangers", members, "mdns")
    _report("strangers", members, "broadcast")


def test_two_nodes_on_one_host_share_the_ports(netlab: Callable[..., NetLab]) -> None:
    """Two nodes on host 1 share the beacon port (SO_REUSEPORT) and mDNS port 5353; one has
    a node id that cannot be an mDNS instance label as is."""
    lab = netlab(2)
    key = wire.generate_key()
    probes = [Probe(lab, 1, "node-1a", key, "--mdns", "--broadcast"),
              Probe(lab, 1, "node.1b", key, "--mdns", "--broadcast"),   # not a DNS label
              Probe(lab, 2, "node-2", key, "--mdns", "--broadcast")]
    for p in probes:
        for source in ("mdns", "broadcast"):
            p.wait(_sees(_expected(probes, p), source), f"both other nodes via {source}")
    for p in probes:
        p.stop()
        for source in ("mdns", "broadcast"):
            assert p.peers(source) == _expected(probes, p), (p.node_id, source)
