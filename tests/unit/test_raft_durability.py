"""A restarted voter must not vote twice in one term (the gap stock pysyncobj has).

A real hardened pysyncobj node C runs in a subprocess.  Two fake candidates speak
pysyncobj's wire protocol (encrypted with the cluster-derived key) and ask C for its vote
in the same term, with a kill -9 and restart of C in between.  With Galaxy's durable
journal the second request is refused; with stock behaviour (``safe=False``: memory
journal) it is granted -- two candidates could each win term 5.
"""

from __future__ import annotations

import base64
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest
from cryptography.fernet import Fernet

from tests.cluster import REPO, free_ports

NODE_SCRIPT = r"""
import os, sys, time
from galaxy.consensus.raft import HardenedSyncObj, make_conf
addr, others, journal, safe = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4] == "1"
# Long timeouts: C must stay a follower and only answer vote requests.
conf = make_conf(min_timeout_s=30, max_timeout_s=60, heartbeat_s=1, connection_retry_s=0.2, bind_addr=None)
obj = HardenedSyncObj(addr, others, conf, secret=bytes.fromhex(os.environ["SECRET"]), journal_file=journal,
                      may_campaign=False, safe=safe)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


class FakeCandidate:
    """Just enough of pysyncobj's TCP protocol to ask for one vote."""

    def __init__(self, secret: bytes, self_addr: str, target: tuple[str, int]) -> None:
        self.fernet = Fernet(base64.urlsafe_b64encode(secret))
        self.sock = socket.create_connection(target, timeout=5)
        self.buf = b""
        self.my_key = os.urandom(32)
        self.send_key: bytes | None = None
        self._send(self.my_key)
        their_prefix, their_key = self._recv()
        assert their_prefix == self.my_key
        self.send_key = their_key
        self._send(self_addr)

    def _send(self, msg) -> None:
        if self.send_key is not None:
            msg = (self.send_key, msg)
        data = self.fernet.encrypt_at_time(zlib.compress(pickle.dumps(msg), 3), int(time.monotonic()))
        self.sock.sendall(struct.pack("i", len(data)) + data)

    def _recv(self):
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack("i", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    data, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return pickle.loads(zlib.decompress(self.fernet.decrypt(data)))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def request_vote(self, term: int) -> bool:
        self._send({"type": "request_vote", "term": term, "last_log_index": 1, "last_log_term": 0})
        self.sock.settimeout(1.5)
        try:
            while True:
                reply = self._recv()
                if reply[1].get("type") == "response_vote" and reply[1].get("term") == term:
                    return True
        except (socket.timeout, TimeoutError):
            return False
        finally:
            self.sock.close()


def start_node(addr: str, others: list[str], journal: str, safe: bool, secret: bytes) -> subprocess.Popen:
    env = {**os.environ, "SECRET": secret.hex(), "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, addr, ",".join(others), journal, "1" if safe else "0"],
                         stdout=subprocess.PIPE, env=env)
    assert p.stdout.readline().strip() == b"ready"
    return p


def connect(secret: bytes, self_addr: str, port: int) -> FakeCandidate:
    deadline = time.monotonic() + 10
    while True:
        try:
            return FakeCandidate(secret, self_addr, ("127.0.0.1", port))
        except (ConnectionError, OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def votes_in_term_5_across_a_restart(tmp_path, safe: bool) -> tuple[bool, bool]:
    secret = os.urandom(32)
    # C gets the smallest address, so it only accepts connections and never dials out.
    pc, pa, pb = sorted(free_ports(3))
    c, a, b = (f"127.0.0.1:{p}" for p in (pc, pa, pb))
    journal = str(tmp_path / "journal")
    node = start_node(c, [a, b], journal, safe, secret)
    try:
        first = connect(secret, a, pc).request_vote(5)
        os.kill(node.pid, signal.SIGKILL)
        node.wait(timeout=10)
        node = start_node(c, [a, b], journal, safe, secret)
        second = connect(secret, b, pc).request_vote(5)
        return first, second
    finally:
        node.kill()
        node.wait(timeout=10)


def test_hardened_node_refuses_second_vote_in_same_term_after_kill9(tmp_path):
    first, second = votes_in_term_5_across_a_restart(tmp_path, safe=True)
    assert first is True
    assert second is False, "the restarted node voted twice in term 5"


def test_stock_pysyncobj_votes_twice_showing_the_test_can_fail(tmp_path):
    first, second = votes_in_term_5_across_a_restart(tmp_path, safe=False)
    assert (first, second) == (True, True)


def test_corrupt_vote_file_stops_the_node_instead_of_reading_term_zero(tmp_path):
    from galaxy.consensus.raft import DurableJournal, RaftStateError
    path = str(tmp_path / "journal")
    j = DurableJournal(path)
    j.add(b"\x00", 1, 0)
    j.setCurrentTerm(3, "x:1")
    j._destroy()
    with open(path + ".vote", "wb") as f:
        f.write(b'{"term": 3, "vot')      # torn write
    with pytest.raises(RaftStateError):
        DurableJournal(path)
