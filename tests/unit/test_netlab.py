"""The NetLab fixture itself: connectivity, faults, teardown, stale-lab cleanup.

Needs root and iproute2 like the netns tests (skipped otherwise, failed under CI=true).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netlab as netlab_mod
from tests.netlab import NetLab, cleanup_stale

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 9999))
    s.settimeout(30)                    # bounded even if the test forgets us
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(64)
        s.sendto(data, addr)
""")
ECHO_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.05)
    ok = 0
    for _ in range(int(sys.argv[2])):
        s.sendto(b"x", (sys.argv[1], 9999))
        try:
            s.recv(64)
            ok += 1
        except OSError:
            pass
    print(ok)
""")


@pytest.fixture
def lab() -> Iterator[NetLab]:
    reason = netlab_mod.available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so these tests must run", pytrace=False)
        pytest.skip(reason)
    with NetLab(3) as lab:
        yield lab


def _serve(lab: NetLab, i: int) -> subprocess.Popen[str]:
    srv = lab.popen(i, [sys.executable, "-c", ECHO_SERVER, lab.host_ip(i)],
                    stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    return srv


def _echoes(lab: NetLab, src: int, dst: int, n: int = 10) -> int:
    out = lab.run(src, [sys.executable, "-c", ECHO_CLIENT, lab.host_ip(dst), str(n)], check=True)
    return int(out.stdout)


def _namespaces() -> set[str]:
    return set(netlab_mod._netns_list())


def test_layout_and_addresses(lab: NetLab) -> None:
    assert lab.hosts == range(1, 4)
    assert lab.host_ip(2) == f"10.77.{lab.subnet}.2"
    assert {lab.switch_ns, *(lab.ns(i) for i in lab.hosts)} <= _namespaces()
    assert all(len(name) <= 15 for name in ("br0", "p3", "eth0"))
    out = lab.run(1, ["ip", "-br", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert f"{lab.host_ip(1)}/24" in out
    assert "224.0.0.0/4" in lab.run(1, ["ip", "route"]).stdout
    assert "default" not in lab.run(1, ["ip", "route"]).stdout     # nothing leaves the lab
    with pytest.raises(IndexError):
        lab.host_ip(4)
    with pytest.raises(IndexError):
        lab.ns(0)


def test_cut_heal_loss(lab: NetLab) -> None:
    _serve(lab, 2)
    assert _echoes(lab, 1, 2) == 10
    lab.cut(2)
    assert _echoes(lab, 1, 2, 3) == 0
    assert _echoes(lab, 1, 3, 0) == 0                 # (client runs fine while cut)
    lab.heal(2)
    assert _echoes(lab, 1, 2) == 10
    tools = [t for t in ("nft", "iptables") if netlab_mod.shutil.which(t)]
    if not tools:
        pytest.skip("neither nft nor iptables installed")
    for tool in tools:
        lab.loss(2, 100, tool=tool)
        assert _echoes(lab, 1, 2, 3) == 0, tool
        lab.loss(2, 0, tool=tool)                     # replaces the rule
        assert _echoes(lab, 1, 2) == 10, tool
        lab.loss(2, 100, tool=tool)
        lab.unloss(2)
        assert _echoes(lab, 1, 2) == 10, tool
    with pytest.raises(ValueError):
        lab.loss(2, 101)


def test_two_labs_do_not_collide(lab: NetLab) -> None:
    with NetLab(2) as other:
        assert other.prefix != lab.prefix
        assert not {other.ns(1), other.switch_ns} & {lab.ns(1), lab.switch_ns}
    assert {lab.ns(1), lab.switch_ns} <= _namespaces()


def test_close_kills_processes_and_deletes_namespaces() -> None:
    if netlab_mod.available() is not None:
        pytest.skip(netlab_mod.available())
    lab = NetLab(2)
    names = {lab.switch_ns, lab.ns(1), lab.ns(2)}
    sleeper = lab.popen(1, ["sleep", "300"])
    # A grandchild that ignores SIGTERM: only SIGKILL gets it.
    stubborn = lab.popen(2, [sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             "print('ready', flush=True); time.sleep(300)"],
                         stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "ready"
    lab.close()
    assert sleeper.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert not names & _namespaces()
    lab.close()                                        # idempotent
    with pytest.raises(RuntimeError):
        lab.popen(1, ["true"])


CREATOR = textwrap.dedent("""
    import sys
    from tests.netlab import NetLab
    lab = NetLab(2)
    print(lab.switch_ns, lab.ns(1), lab.ns(2), flush=True)
    sys.stdin.read()                   # hold the lab until told (or killed)
    lab.close()
""")


def test_stale_labs_of_dead_creators_are_removed_live_ones_kept() -> None:
    if netlab_mod.available() is not None:
        pytest.skip(netlab_mod.available())

    def creator() -> tuple[subprocess.Popen[str], set[str]]:
        proc = subprocess.Popen([sys.executable, "-c", CREATOR], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        return proc, set(proc.stdout.readline().split())

    crashed, crashed_names = creator()
    alive, alive_names = creator()
    try:
        assert len(crashed_names) == 3 and crashed_names <= _namespaces()
        os.kill(crashed.pid, signal.SIGKILL)           # a crashed run: no teardown
        crashed.wait(timeout=10)
        assert crashed_names <= _namespaces()
        removed = cleanup_stale()
        assert set(removed) == crashed_names
        assert not crashed_names & _namespaces()
        assert alive_names <= _namespaces()            # a concurrent run keeps its lab
    finally:
        for proc in (crashed, alive):
            if proc.poll() is None:
                proc.communicate("", timeout=20)       # EOF on stdin: it closes its lab
        if crashed.poll() is None:
            crashed.kill()
        cleanup_stale()                                # whatever the failure left behind
    assert not alive_names & _namespaces()
