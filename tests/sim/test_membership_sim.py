"""Seeded whole-mesh simulations of SWIM membership (galaxy.sim): one process, one event queue.

Every run is a pure function of its seed (checked below); a failure names the seed, and
``GALAXY_SIM_SEEDS=N`` sets how many seeds the swarm test runs (default 200; ~0.1 s each).

Swarm run per seed: 20-40 nodes, 0/5/10 % loss, LAN-ish latencies.
* Safety under loss: one node crashes; every survivor holds it dead within
  ``detection_bound_ms`` (``degraded`` under loss), and no other node is declared dead.
* A partition splits the mesh for a while (both sides may declare the other dead), then
  heals with the loss gone and the crashed node restarted (a higher incarnation): every
  live node converges to the same membership (everyone alive, the same record versions).
Plus a few 1,000-node runs: convergence, dissemination, crash detection, 10 % loss, and a
group cut off and healed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import time

import pytest

from galaxy.config import Config
from galaxy.gossip.membership import detection_bound_ms, suspicion_timeouts
from galaxy.messages import ALIVE, DEAD, SUSPECT, RaftView
from galaxy.sim import MeshSim, nid

SEEDS = int(os.environ.get("GALAXY_SIM_SEEDS", "200"))
CFG = Config.sim()
LAN = Config.lan()


def swarm(seed: int) -> MeshSim:
    """The swarm scenario (asserting as it goes); returns the converged simulation."""
    rng = random.Random(seed)
    n = rng.randint(20, 40)
    loss = rng.choice([0.0, 0.05, 0.10])
    latency = rng.choice([(1, 5), (1, 20), (5, 40)])
    sim = MeshSim(seed, CFG, latency_ms=latency, loss=loss)
    sim.start_mesh(n, snapshot=rng.random() < 0.7)
    sim.run(rng.randint(500, 2_000))
    assert not [e for e in sim.events if e[4] == DEAD], f"seed={seed}: a death before any fault"

    # Safety under loss: a crash is found, nobody else dies.
    victim = rng.randrange(n)
    sim.crash(victim)
    t0 = sim.now_ms
    sim.run_until(lambda: sim.all_see([nid(victim)], DEAD), detection_bound_ms(CFG, n, degraded=loss > 0),
                  step_ms=100, what=f"n={n} loss={loss}: crashed {nid(victim)} dead everywhere")
    sim.run(rng.randint(0, 1_500))
    false = [e for e in sim.events if e[4] == DEAD and e[2] != nid(victim)]
    assert not false, f"seed={seed}: n={n} loss={loss}: healthy nodes declared dead: {false[:3]}"

    # A partition, then the liveness phase: healed, no loss, the victim back.
    survivors = [i for i in range(n) if i != victim]
    cut = set(rng.sample(survivors, rng.randint(1, len(survivors) // 2)))
    sim.partition(cut, [i for i in range(n) if i not in cut])
    t_cut = sim.now_ms
    sim.run(rng.randint(2_000, 8_000))
    # Inside each side, nobody was declared dead by a node that could reach it.
    side = {nid(i): (i in cut) for i in range(n)}
    inside = [e for e in sim.events if e[0] > t_cut and e[4] == DEAD and e[2] != nid(victim)
              and side[e[1]] == side[e[2]]]
    assert not inside, f"seed={seed}: n={n} loss={loss} cut={len(cut)}: died inside a side: {inside[:3]}"
    sim.heal()
    sim.net.loss = 0.0
    sim.start(victim, incarnation=2, seeds=[rng.choice(survivors)])
    sim.run_until(sim.converged, CFG.seed_retry_max_ms + detection_bound_ms(CFG, n, degraded=True), step_ms=200,
                  what=f"n={n} cut={len(cut)}: convergence after the heal")
    sim.check_all()
    assert t0 < sim.now_ms
    return sim


@pytest.mark.parametrize("seed", range(SEEDS))
def test_swarm(seed: int) -> None:
    swarm(seed)


def _transcript(sim: MeshSim) -> str:
    h = hashlib.sha256()
    for e in sim.events:
        h.update(repr(e).encode())
    for m in sim.up():
        h.update(repr(sorted(m.stats.items())).encode())
        h.update(repr([(v.record, v.state, v.last_heard_ms) for v in m.members()]).encode())
    h.update(repr(sorted(sim.net.stats.items())).encode())
    return h.hexdigest()


def test_same_seed_same_run() -> None:
    a, b, c = swarm(7), swarm(7), swarm(8)
    assert _transcript(a) == _transcript(b)
    assert _transcript(a) != _transcript(c)


# ------------------------------------------------------------------------ 1,000 nodes

N = 1000


@pytest.fixture(scope="module")
def thousand() -> MeshSim:
    sim = MeshSim(1000, LAN)
    sim.record_events = False       # counts are kept; a million event tuples are not needed
    sim.start_mesh(N)
    return sim


def test_thousand_nodes_disseminate_detect_and_converge(thousand: MeshSim) -> None:
    sim = thousand
    started = time.monotonic()
    sim.run(3_000)
    assert sim.converged()
    # One update reaches all 1,000 within a few gossip rounds.
    sim.call(0, lambda now: sim.node(0).update_self(now, raft=RaftView(term=9, leader=nid(0))))
    took_ms = sim.run_until(lambda: all(m.get(nid(0)).record.raft.term == 9 for m in sim.up()), 5_000, step_ms=20)
    assert took_ms <= 4 * LAN.gossip_interval_ms, took_ms
    # Three crashes: dead at every survivor, typically within a probe cycle's start plus
    # the suspicion's min (the documented bound is far looser).
    dead = [nid(i) for i in (11, 500, 999)]
    for i in (11, 500, 999):
        sim.crash(i)
    took_ms = sim.run_until(lambda: sim.all_see(dead, DEAD), detection_bound_ms(LAN, N), step_ms=250)
    min_ms, _, _ = suspicion_timeouts(LAN, N)
    assert took_ms <= min_ms + 10 * LAN.probe_interval_ms, took_ms
    for m in sim.up():
        assert sim.alive_count(m.me().id) == N - 4, m.me().id
    sim.check_all()
    assert time.monotonic() - started < 60   # ~5 s on an idle core


def test_thousand_nodes_lose_a_group_and_get_it_back(thousand: MeshSim) -> None:
    sim = thousand
    up = sim.up_ids()
    cut = up[-10:]
    rest = up[:-10]
    sim.partition(cut, rest)
    gone = [nid(i) for i in cut]
    sim.run_until(lambda: sim.all_see(gone, DEAD, [sim.node(i) for i in rest]), detection_bound_ms(LAN, N),
                  step_ms=250, what="the cut group dead on the majority side")
    sim.heal()
    took_ms = sim.run_until(sim.converged, LAN.seed_retry_max_ms + detection_bound_ms(LAN, N), step_ms=250,
                            what="convergence after the heal")
    # A suspicion the cut-off group still holds ends within its max_ms: refuted when its
    # turn to be probed comes (each node's health score is up after the cut, so its probes
    # are slow), or it runs out and the "dead" reaches the live member, which refutes.
    assert took_ms <= LAN.seed_retry_max_ms + suspicion_timeouts(LAN, N)[1], took_ms
    sim.check_all()


def test_thousand_nodes_at_ten_percent_loss_kill_nobody() -> None:
    sim = MeshSim(1001, LAN, loss=0.10)
    sim.start_mesh(N)
    sim.run(10_000)
    assert not [e for e in sim.events if e[4] == DEAD]
    suspected = {e[2] for e in sim.events if e[4] == SUSPECT}
    assert len(suspected) < N // 10, len(suspected)        # a few, refuted in time
    sim.net.loss = 0.0
    sim.run_until(sim.converged, 30_000, step_ms=500)
    assert all(v.state == ALIVE for v in sim.node(0).members())
