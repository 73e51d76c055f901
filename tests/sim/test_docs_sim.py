"""Seeded whole-mesh simulations of replicated documents (galaxy.sim.docs): every node runs
membership, a replica and doc gossip on one simulated network.

Every run is a pure function of its seed (checked below); a failure names the seed, and
``GALAXY_SIM_SEEDS=N`` sets how many seeds the swarm runs (default 100, ~0.1 s each).

Swarm run per seed (6-16 nodes, 0/5/10 % loss, LAN-ish latencies, clocks a little apart):
* a few documents are written and spread, to be deleted later;
* safety phase, ~10 s of a random schedule: writes of shared keys on many nodes at once
  (siblings), writes of keys of their own, deletes, crashes (some right after a write
  that nobody else has heard of yet), restarts from what the node had persisted, and
  partitions that come and go; in half the seeds tombstones are collected during the run;
* liveness phase: heal, no loss, every crashed node back.  Then all live nodes serve the
  same documents (winner values and version sets), no acknowledged write is lost unless
  a causally newer version replaced it, every version served was written by someone,
  and a deleted document stays deleted everywhere.
Plus one 1,000-node run at 5 % loss: concurrent writes, a crash and a restart from disk,
writes on both sides of a cut group, heal, and every node serves the same documents.
"""

from __future__ import annotations

import os
import random

import pytest

from galaxy.clock import Order
from galaxy.config import Config
from galaxy.gossip.membership import detection_bound_ms
from galaxy.gossip.docs_runner import GC_INTERVAL_MS
from galaxy.gossip.replica import Doc
from galaxy.sim import nid
from galaxy.sim.docs import KV, DocSim

SEEDS = int(os.environ.get("GALAXY_SIM_SEEDS", "100"))
CFG = Config.sim()
LAN = Config.lan()
SHORT_GRACE_MS = 20_000       # tombstones collected (and ghosts forgotten) within a run
DOWN_MS_MAX = 8_000           # < the grace: a node away for less gets every delete back
# Liveness: membership converges (a restarted node's seed retry plus detection), then
# documents by anti-entropy, which runs every push_pull_interval_ms on every node.
LIVENESS_MS = CFG.seed_retry_max_ms + detection_bound_ms(CFG, 16, degraded=True) + 3 * CFG.push_pull_interval_ms


class History:
    """Every acknowledged write and delete of the run."""

    def __init__(self) -> None:
        self.writes: dict[str, list[Doc]] = {}
        self.deleted: set[str] = set()      # keys whose last operation is a delete

    def wrote(self, doc: Doc | None) -> None:
        if doc is not None:
            self.writes.setdefault(doc.key, []).append(doc)
            if doc.deleted:
                self.deleted.add(doc.key)
            else:
                self.deleted.discard(doc.key)


def check_outcome(sim: DocSim, hist: History, seed: int) -> None:
    """Every live node serves the same documents, and the right ones."""
    nodes = sim.doc_nodes()
    views = [sim.view(n) for n in nodes]
    for n, v in zip(nodes, views):
        assert v == views[0], f"seed={seed}: {n.id} serves other documents than {nodes[0].id}"
    r = nodes[0].replica
    for key, docs in hist.writes.items():
        if key in hist.deleted:
            for n in nodes:
                assert n.replica.get(KV, key) is None, f"seed={seed}: {key} deleted but {n.id} serves it"
            continue
        finals = r.versions(KV, key)
        assert finals, f"seed={seed}: {key} lost"
        vids = {d.vid for d in docs}
        assert all(f.vid in vids for f in finals), f"seed={seed}: {key} holds a version nobody wrote"
        for d in docs:
            assert any(f.vid == d.vid or f.vc.compare(d.vc) is Order.AFTER for f in finals), \
                f"seed={seed}: {key}: the write {d.value!r} by {d.origin} was lost"


def doc_swarm(seed: int) -> tuple[DocSim, History]:
    rng = random.Random(seed)
    n = rng.randint(6, 16)
    loss = rng.choice([0.0, 0.05, 0.10])
    latency = rng.choice([(1, 5), (1, 20), (5, 40)])
    grace = rng.choice([SHORT_GRACE_MS, 86_400_000])
    sim = DocSim(seed, CFG, latency_ms=latency, loss=loss, tombstone_grace_ms=grace)
    sim.start_mesh(n, snapshot=rng.random() < 0.7)
    hist = History()

    doomed = [f"doomed/{j}" for j in range(3)]
    for k in doomed:
        hist.wrote(sim.write(rng.randrange(n), k, "old"))
    sim.run_until(sim.docs_converged, 30_000, what="the first documents everywhere")

    # Safety phase: a random schedule of writes, deletes, crashes, restarts and cuts.
    down: dict[int, int] = {}           # node -> when it crashed
    serial = 0
    for _ in range(rng.randint(15, 30)):
        up = sim.up_ids()
        roll = rng.random()
        if roll < 0.35:                 # the same keys on several nodes at once: siblings
            key = f"shared/{rng.randrange(3)}"
            for i in rng.sample(up, min(len(up), rng.randint(1, 3))):
                serial += 1
                hist.wrote(sim.write(i, key, {"by": nid(i), "n": serial}))
        elif roll < 0.55:
            serial += 1
            i = rng.choice(up)
            hist.wrote(sim.write(i, f"own/{serial}", serial))
        elif roll < 0.65:
            key = rng.choice(doomed)
            hist.wrote(sim.delete(rng.choice(up), key))
        elif roll < 0.78 and len(down) < n // 3:
            i = rng.choice(up)
            if rng.random() < 0.5:      # a write nobody has heard of yet: only its disk has it
                serial += 1
                hist.wrote(sim.write(i, f"own/{serial}", serial))
            sim.crash(i)
            down[i] = sim.now_ms
        elif roll < 0.88 and down:
            i = rng.choice(sorted(down))
            del down[i]
            sim.restart(i, seeds=[rng.choice(up)])
        elif roll < 0.95:
            everyone = list(range(n))
            cut = set(rng.sample(everyone, rng.randint(1, n // 2)))
            sim.partition(cut, [i for i in everyone if i not in cut])
        else:
            sim.heal()
        sim.run(rng.randint(100, 800))
        for i, t in list(down.items()):          # nobody stays away longer than the grace
            if sim.now_ms - t > DOWN_MS_MAX:
                del down[i]
                sim.restart(i, seeds=[rng.choice(sim.up_ids())])

    # Liveness phase.
    sim.heal()
    sim.net.loss = 0.0
    up = sim.up_ids()
    for i in sorted(down):
        sim.restart(i, seeds=[rng.choice(up)])
    sim.run_until(sim.settled, LIVENESS_MS, step_ms=250, what=f"n={n} loss={loss}: documents converged")
    sim.check_all()
    check_outcome(sim, hist, seed)
    if grace == SHORT_GRACE_MS:         # tombstones collected, ghosts forgotten: nothing comes back
        sim.run(2 * grace + 2 * GC_INTERVAL_MS)
        assert sim.settled(), f"seed={seed}: documents diverged after tombstone collection"
        check_outcome(sim, hist, seed)
    return sim, hist


@pytest.mark.parametrize("seed", range(SEEDS))
def test_doc_swarm(seed: int) -> None:
    doc_swarm(seed)


def test_same_seed_same_run() -> None:
    a, b, c = doc_swarm(11)[0], doc_swarm(11)[0], doc_swarm(12)[0]
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_a_write_only_the_crashed_disk_holds_spreads_after_the_restart() -> None:
    sim = DocSim(5, CFG, loss=0.05)
    sim.start_mesh(8)
    sim.run(500)
    doc = sim.write(3, "lonely", "only on n-0003's disk")
    sim.crash(3)                                 # at the same instant: no rumour left the node
    sim.run(5_000)
    assert all(n.replica.get(KV, "lonely") is None for n in sim.doc_nodes())
    assert sim.stores[3].rows[(KV, "lonely")]
    sim.restart(3, seeds=[0])
    sim.run_until(lambda: all(n.replica.get(KV, "lonely") == doc for n in sim.doc_nodes()), 30_000,
                  what="the restored write everywhere")


@pytest.mark.parametrize("away_ms", [SHORT_GRACE_MS // 2, SHORT_GRACE_MS * 3 // 2])
def test_a_delete_reaches_a_node_that_was_down(away_ms: int) -> None:
    # Away for less than the grace: the others still hold the tombstone.  For longer (up to
    # twice the grace): they collected it and hold a ghost, whose tombstones go to a peer
    # that shows an older version (this once resurrected the document everywhere).
    sim = DocSim(6, CFG, tombstone_grace_ms=SHORT_GRACE_MS)
    sim.start_mesh(6)
    sim.write(0, "k", "v")
    sim.run_until(sim.docs_converged, 10_000)
    sim.crash(5)
    sim.run(3_000)
    sim.delete(1, "k")
    sim.run(away_ms)
    collected = [n.replica.stats["tombstones_collected"] for n in sim.doc_nodes()]
    assert collected == [int(away_ms > SHORT_GRACE_MS)] * 5
    assert sim.stores[5].rows[(KV, "k")][0].deleted is False   # it went down holding the value
    sim.restart(5, seeds=[0])
    sim.run_until(sim.settled, LIVENESS_MS, what="the delete at the restarted node")
    sim.run(2 * SHORT_GRACE_MS)                                 # every ghost forgotten
    assert sim.settled()
    assert all(n.replica.get(KV, "k") is None for n in sim.doc_nodes())


# ------------------------------------------------------------------------ 1,000 nodes

N = 1000


@pytest.mark.timeout(600)
def test_thousand_nodes_converge_on_documents() -> None:
    # At 5 % loss: concurrent writes of one key; then a group cut off while both sides
    # write one key and the big side deletes one, and a crash right after a write only
    # the crashed disk holds; heal, and restart from that disk.
    sim = DocSim(1000, LAN, loss=0.05, tombstone_grace_ms=SHORT_GRACE_MS)
    sim.record_events = False
    sim.start_mesh(N)
    sim.run(1_000)
    hist = History()
    for i in (0, 250, 500, 750):
        hist.wrote(sim.write(i, f"own/{i}", i))
    for i in (1, 2, 3):
        hist.wrote(sim.write(i, "shared", i))
    hist.wrote(sim.write(999, "doomed", "old"))
    took_ms = sim.run_until(sim.docs_converged, 5_000, step_ms=50, what="the first writes on all 1,000")
    assert took_ms <= 8 * LAN.gossip_interval_ms, took_ms
    assert len(sim.doc_node(500).replica.versions(KV, "shared")) == 3

    cut = list(range(990, N))
    sim.partition(cut, range(990))
    hist.wrote(sim.write(995, "shared", "minority"))
    hist.wrote(sim.write(5, "shared", "majority"))
    hist.wrote(sim.delete(10, "doomed"))
    hist.wrote(sim.write(42, "own/42", 42))
    sim.crash(42)                                   # at once: no rumour left the node
    sim.run(1_500)
    sim.heal()
    sim.restart(42, seeds=[0])
    # Bounded by the restarted node's rejoin (seed retry, then its record spreading); the
    # documents themselves follow within a few rounds of the heal.
    sim.run_until(sim.settled, 15_000, step_ms=100, what="1,000 nodes converged after the heal")
    check_outcome(sim, hist, 1000)
    assert len(sim.doc_node(0).replica.versions(KV, "shared")) == 2     # both sides' writes, as siblings
    sim.check_all()
