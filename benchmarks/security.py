"""The cost of security: gossip frames with AES-GCM on vs off, and the HTTP API over HTTPS vs HTTP.

Usage: python benchmarks/security.py [--frames 20000] [--rounds 5] [--udp-seconds 3]
                                     [--requests 3000] [--concurrency 50]
                                     [--out benchmarks/results/security.json]

Everything is measured in one run, "on" and "off" taking turns round by round so that drift
of the machine hits both alike; codec and UDP rates are the median of the rounds.

* Codec (in process): typical gossip frames -- a SWIM ``Ping`` carrying 3 member records
  and a rumour, and a ``Spread`` of one record -- through ``wire.Codec.encode`` then
  ``decode`` (msgpack, field validation, replay cache, envelope).  "on" is the real codec
  (AES-256-GCM); "off" is the same Codec object with its cipher swapped for one that
  copies the plaintext and appends a 16-byte tag -- a benchmark-only stand-in, never
  reachable from node code.  Messages/s = frames encoded and decoded per second, one core.
* UDP (two processes): a sender process encodes frames and sends them over loopback to a
  receiver process that decodes every datagram, the path a node's gossip takes; messages/s
  = frames the receiver decoded per second over ``--udp-seconds``.  The sender paces at
  most ``--udp-rate`` frames/s so the socket buffer never overflows (drops are counted).
* HTTP: two real one-node meshes started by this script (``galaxy up``, tests/cluster.py),
  one plain and one with ``--tls auto``.  ``GET /v1/status`` with ``--concurrency``
  requests in flight on keep-alive connections (opened in a warm-up), the client pinning
  the node's certificate as peers do (``aiohttp.Fingerprint``): p50/p99 latency and
  requests/s.  Also one request per new connection (TCP + TLS handshake timed),
  ``--fresh`` of them, one at a time.

Target (the issue): encryption costs under 20 % throughput (messages/s and requests/s,
off/on - 1).  Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from benchmarks.api import load, summary  # noqa: E402
from benchmarks.stats import exit_on_sigterm, pct, write_json  # noqa: E402
from galaxy import tls, wire  # noqa: E402
from galaxy.messages import (ALIVE, SUSPECT, MemberRecord, Ping, RaftView, Resources,  # noqa: E402
                             Rumor, Spread)
from tests.cluster import Cluster  # noqa: E402

TARGET_COST_MAX = 0.20
TAG_BYTES = 16


class _PlainCipher:
    """AES-GCM's interface without the cryptography: the "encryption off" stand-in."""

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return data + bytes(TAG_BYTES)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return data[:-TAG_BYTES]


def make_codec(encrypted: bool, sender: str = "n-bench-sender") -> wire.Codec:
    key = wire.parse_key(BENCH_KEY)
    codec = wire.Codec("galaxy", [key], sender, frame_max_bytes=65_000, replay_window_ms=30_000)
    if not encrypted:
        plain = _PlainCipher()
        codec._ciphers = {kid: plain for kid in codec._ciphers}       # benchmark only: same pipeline, no AES
        codec._send_cipher = plain
    return codec


BENCH_KEY = wire.generate_key()


def sample_messages() -> list[Any]:
    def record(i: int) -> MemberRecord:
        return MemberRecord(
            id=f"n-{i:08x}", incarnation=3, heartbeat=1000 + i, state=ALIVE, host=f"10.0.0.{i}", gossip_port=7946,
            http_port=8000, raft_port=7947, role="auto", version="0.1.0", cluster="galaxy",
            started_ms=1_700_000_000_000, resources=Resources(8.0, 16384, 0, 6.5, 12000, 0, 0.5, 12.0, 14000),
            labels={"zone": "a"}, raft=RaftView(7, "n-00000001", ("n-00000001", "n-00000002", "n-00000003")),
            tls=bytes(range(32)))
    ping = Ping(seq=42, target="n-00000009", members=(record(1), record(2), record(3)),
                rumors=(Rumor("n-00000007", 2, SUSPECT, "n-00000004"),))
    return [ping, Spread((record(4),))]


def codec_rate(encrypted: bool, frames: int) -> dict:
    """Frames encoded and decoded per second by one Codec pair (one core)."""
    tx, rx = make_codec(encrypted), make_codec(encrypted, "n-bench-receiver")
    msgs = sample_messages()
    sizes = []
    t0 = time.perf_counter()
    for i in range(frames):
        wall_ms = int(time.time() * 1000)
        frame = tx.encode(msgs[i % len(msgs)], wall_ms)
        rx.decode(frame, wall_ms)
        if i < len(msgs):
            sizes.append(len(frame))
    wall = time.perf_counter() - t0
    return {"frames": frames, "seconds": round(wall, 3), "msgs_per_s": round(frames / wall),
            "us_per_msg": round(wall / frames * 1e6, 2), "frame_bytes": sizes}


# ---------------------------------------------------------------------------- UDP between two processes

def _receiver(encrypted: bool, port_box: Any, done: Any, result: Any, seconds: float) -> None:
    codec = make_codec(encrypted, "n-bench-receiver")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    port_box.put(sock.getsockname()[1])
    ok = bad = 0
    first = last = None
    while not done.is_set():
        try:
            data = sock.recv(65_535)
        except socket.timeout:
            continue
        now = time.perf_counter()
        first = first if first is not None else now
        try:
            codec.decode(data, int(time.time() * 1000))
            ok += 1
            last = now
        except wire.DecodeError:
            bad += 1
    sock.close()
    span = (last - first) if first is not None and last is not None and last > first else 0.0
    result.put({"decoded": ok, "rejected": bad, "seconds": round(span, 3),
                "msgs_per_s": round(ok / span) if span else 0})


def udp_rate(encrypted: bool, seconds: float, rate_max: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    port_box, result, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    rx = ctx.Process(target=_receiver, args=(encrypted, port_box, done, result, seconds), daemon=True)
    rx.start()
    try:
        port = port_box.get(timeout=10)
        codec, msgs = make_codec(encrypted), sample_messages()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent = 0
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            if sent > rate_max * elapsed:          # pace: never overrun the receiver's buffer
                time.sleep(0.0005)
                continue
            sock.sendto(codec.encode(msgs[sent % len(msgs)], int(time.time() * 1000)), ("127.0.0.1", port))
            sent += 1
        sock.close()
        time.sleep(0.3)                            # the receiver drains its buffer
        done.set()
        out = result.get(timeout=10)
    finally:
        done.set()
        rx.join(10)
        if rx.is_alive():
            rx.kill()
            rx.join()
    out["sent"] = sent
    out["lost"] = sent - out["decoded"] - out["rejected"]
    return out


# ---------------------------------------------------------------------------- HTTP

def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def http_runs(targets: dict[str, tuple[str, Any, int]], args: argparse.Namespace) -> dict[str, dict]:
    cpu = {t: 0.0 for t in targets}
    samples: dict[str, list[float]] = {t: [] for t in targets}
    walls = {t: 0.0 for t in targets}
    errors = {t: 0 for t in targets}
    fresh: dict[str, list[float]] = {t: [] for t in targets}
    for r in range(args.rounds):
        for name, (url, ssl, pid) in targets.items():
            connector = aiohttp.TCPConnector(limit=args.concurrency, ssl=ssl)
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=30)) as session:
                await load(session, url, max(args.concurrency * 4, 200), args.concurrency)      # warm-up
                cpu0 = _cpu_s(pid)
                lat, wall, err = await load(session, url, args.requests, args.concurrency)
                cpu[name] += _cpu_s(pid) - cpu0
            samples[name] += lat
            walls[name] += wall
            errors[name] += err
            connector = aiohttp.TCPConnector(force_close=True, ssl=ssl)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(args.fresh // args.rounds):
                    t0 = time.perf_counter()
                    async with session.get(url) as resp:
                        await resp.read()
                    fresh[name].append(time.perf_counter() - t0)
            print(f"  http round {r + 1}/{args.rounds} {name}: p99 {pct(lat, 99) * 1000:.2f} ms, "
                  f"{len(lat) / wall:.0f} req/s", flush=True)
    out = {}
    for name in targets:
        out[name] = summary(samples[name], walls[name], errors[name])
        out[name]["server_cpu_us_per_req"] = round(cpu[name] / max(1, len(samples[name])) * 1e6, 1)
        ms = [x * 1000 for x in fresh[name]]
        out[name]["new_connection_p50_ms"] = round(pct(ms, 50), 3)
        out[name]["new_connection_p99_ms"] = round(pct(ms, 99), 3)
    return out


def cost(off: float, on: float) -> float:
    """Throughput lost to encryption: off/on - 1 (0.25 = plain does 25 % more)."""
    return round(off / on - 1, 3) if on else float("inf")


def verdict(c: float) -> str:
    return "ok" if c < TARGET_COST_MAX else "MISSED"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20_000, help="codec frames per mode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--udp-seconds", type=float, default=3.0, help="per mode per round; 0 skips UDP")
    ap.add_argument("--udp-rate", type=int, default=100_000, help="sender pace cap, frames/s")
    ap.add_argument("--requests", type=int, default=3000, help="timed HTTP requests per mode per round")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--fresh", type=int, default=150, help="requests on new connections per mode (all rounds)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "security.json"))
    args = ap.parse_args()

    result: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                          "platform": platform.platform()},
                              "params": vars(args), "target_cost_max": TARGET_COST_MAX}

    print("codec: encode + decode of gossip frames (one core)")
    codec = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off"):
            codec[mode].append(codec_rate(mode == "on", args.frames))
        print(f"  round {r + 1}: on {codec['on'][-1]['msgs_per_s']} msg/s, off {codec['off'][-1]['msgs_per_s']}",
              flush=True)
    codec_med = {m: statistics.median(x["msgs_per_s"] for x in runs) for m, runs in codec.items()}
    result["codec"] = {"rounds": codec, "median_msgs_per_s": codec_med,
                       "cost": cost(codec_med["off"], codec_med["on"])}

    if args.udp_seconds > 0:
        print("udp: sender process -> receiver process on loopback, every frame decoded")
        udp = {"on": [], "off": []}
        for r in range(args.rounds):
            for mode in ("on", "off"):
                udp[mode].append(udp_rate(mode == "on", args.udp_seconds, args.udp_rate))
            print(f"  round {r + 1}: on {udp['on'][-1]['msgs_per_s']} msg/s, off {udp['off'][-1]['msgs_per_s']}",
                  flush=True)
        udp_med = {m: statistics.median(x["msgs_per_s"] for x in runs) for m, runs in udp.items()}
        result["udp"] = {"rounds": udp, "median_msgs_per_s": udp_med, "cost": cost(udp_med["off"], udp_med["on"])}

    print("http: GET /v1/status of a real node, https vs http")
    with Cluster() as cluster:
        plain = cluster.add("plain")
        secure = cluster.add("tls", extra=["--tls", "auto"])
        for p in (plain, secure):
            cluster.start(p.name)
        cluster.wait(lambda: all((p.try_get("/readyz") or {}).get("ready") for p in (plain, secure)) or None, 60,
                     "both nodes ready")
        fp = tls.parse_fingerprint(secure.get("/v1/members")["members"][0]["tls_fingerprint"])
        targets = {"http": (plain.url + "/v1/status", True, plain.popen.pid),
                   "https": (secure.url + "/v1/status", aiohttp.Fingerprint(fp), secure.popen.pid)}
        try:
            import uvloop        # as the node runs, and as benchmarks/api.py's client does
            http = uvloop.run(http_runs(targets, args))
        except ImportError:
            http = asyncio.run(http_runs(targets, args))
    result["http"] = {**http, "cost_rps": cost(http["http"]["rps"], http["https"]["rps"]),
                      "cost_server_cpu": cost(http["https"]["server_cpu_us_per_req"],
                                              http["http"]["server_cpu_us_per_req"]),
                      "p50_ratio": round(http["https"]["p50_ms"] / http["http"]["p50_ms"], 2),
                      "p99_ratio": round(http["https"]["p99_ms"] / http["http"]["p99_ms"], 2)}

    print("\nthe cost of security (off = no encryption; cost = off/on - 1; target < 20 %)")
    print(f"{'measure':<34} {'on':>10} {'off':>10} {'cost':>8}  verdict")
    rows = [("codec msgs/s (encode+decode)", codec_med["on"], codec_med["off"], result["codec"]["cost"])]
    if "udp" in result:
        rows.append(("UDP msgs/s (2 processes)", result["udp"]["median_msgs_per_s"]["on"],
                     result["udp"]["median_msgs_per_s"]["off"], result["udp"]["cost"]))
    rows.append(("HTTP /v1/status req/s", http["https"]["rps"], http["http"]["rps"], result["http"]["cost_rps"]))
    # CPU per request is a cost, not a throughput: its "cost" is on/off - 1 (the server's share of req/s lost)
    rows.append(("HTTP server CPU us/req", http["https"]["server_cpu_us_per_req"],
                 http["http"]["server_cpu_us_per_req"], result["http"]["cost_server_cpu"]))
    for name, on, off, c in rows:
        print(f"{name:<34} {on:>10.0f} {off:>10.0f} {c * 100:>7.1f}%  {verdict(c)}")
    print(f"\n{'HTTP /v1/status latency':<34} {'https':>10} {'http':>10} {'ratio':>8}")
    for key in ("p50_ms", "p99_ms", "new_connection_p50_ms", "new_connection_p99_ms"):
        a, b = http["https"][key], http["http"][key]
        print(f"{key:<34} {a:>10.2f} {b:>10.2f} {a / b:>8.2f}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
