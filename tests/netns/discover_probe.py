"""Discovery-only probe for netns tests: prints every PeerSeen as a JSON line.

Run on a lab host: ``python -m tests.netns.discover_probe --node-id n1 --host 10.77.x.1
--mdns --broadcast --key gk1-...``.  Lines on stdout (``t_ms`` = ms since discovery
start() was called; ``startup_ms`` in "started" = interpreter start to that point):

    {"event": "started", "t_ms": 0, "startup_ms": ...}
    {"event": "peer", "t_ms": ..., "host": ..., "gossip_port": ..., "node_id": ..., "source": ...}
    {"event": "status", "t_ms": ..., "registered": ..., "mdns": {...}, "beacons": {...}, "codec": {...}}
    {"event": "stopped", ...same fields as status}

``--junk`` also registers, with a bare AsyncZeroconf, services of our type whose TXT a
member must reject (bad port, bad or missing id, non-UTF-8); "junk_registered" is
printed once they are announced.

"status" is printed whenever a counter changes (checked every STATUS_EVERY_MS).  The
probe stops cleanly on SIGTERM/SIGINT or when stdin closes (its test went away).
"""

from __future__ import annotations

import time

T0 = time.monotonic()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from galaxy import wire  # noqa: E402
from galaxy.clock import SystemClock  # noqa: E402
from galaxy.discovery import PeerSeen  # noqa: E402
from galaxy.discovery.broadcast import BroadcastBeacons  # noqa: E402
from galaxy.discovery.mdns import MdnsDiscovery  # noqa: E402

STATUS_EVERY_MS = 50

# (instance, TXT) pairs that a member of cluster "galaxy" must drop as invalid.
JUNK = [
    ("junk-port", {"cluster": "galaxy", "id": "junk-port", "gossip": "99999"}),
    ("junk-port-text", {"cluster": "galaxy", "id": "junk-pt", "gossip": "+79"}),
    ("junk-id", {"cluster": "galaxy", "id": "", "gossip": "7946"}),
    ("junk-ctrl", {"cluster": "galaxy", "id": "bad\x07id", "gossip": "7946"}),
    ("junk-noid", {"cluster": "galaxy", "gossip": "7946"}),
    ("junk-utf8", {b"cluster": b"galaxy", b"id": b"\xff\xfe", b"gossip": b"7946"}),
]


async def register_junk(host: str) -> tuple[Any, list[Any]]:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    from galaxy.discovery.mdns import SERVICE_TYPE

    aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    infos = [AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=7946, properties=txt,
                              server=f"{name}.local.", parsed_addresses=[host])
             for name, txt in JUNK]
    tasks = [await aiozc.async_register_service(info) for info in infos]
    await asyncio.gather(*tasks)
    return aiozc, infos


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    def on_stdin() -> None:
        if not sys.stdin.buffer.read1(4096):
            loop.remove_reader(sys.stdin.fileno())
            done.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)

    clock = SystemClock()
    codec = wire.Codec(args.cluster, [wire.parse_key(args.key)], sender=args.node_id)
    start = time.monotonic()

    def t_ms() -> int:
        return round((time.monotonic() - start) * 1000)

    def on_peer(p: PeerSeen) -> None:
        emit({"event": "peer", "t_ms": t_ms(), "host": p.host, "gossip_port": p.gossip_port,
              "node_id": p.node_id, "source": p.source})

    mdns = beacons = None
    if args.mdns:
        mdns = MdnsDiscovery(args.cluster, args.node_id, args.host, args.gossip_port,
                             args.gossip_port + 1, args.gossip_port + 2, "auto", "test", on_peer)
    if args.broadcast:
        beacons = BroadcastBeacons(codec, clock, args.cluster, args.node_id, args.host,
                                   args.gossip_port, args.beacon_port, args.interval_ms, on_peer,
                                   random.Random(args.seed))

    def status(event: str) -> dict[str, Any]:
        return {"event": event, "t_ms": t_ms(),
                "registered": bool(mdns and mdns.registered),
                "mdns": dict(mdns.stats) if mdns else {},
                "beacons": dict(beacons.stats) if beacons else {},
                "codec": dict(codec.stats)}

    emit({"event": "started", "t_ms": 0, "startup_ms": round((start - T0) * 1000)})
    if mdns:
        await mdns.start()
    if beacons:
        await beacons.start()
    junk = None
    if args.junk:
        junk = await register_junk(args.host)
        emit({"event": "junk_registered", "t_ms": t_ms()})
    last: dict[str, Any] = {}
    while not done.is_set():
        now = status("status")
        key = {k: v for k, v in now.items() if k != "t_ms"}
        if key != last:
            emit(now)
            last = key
        try:
            await asyncio.wait_for(done.wait(), STATUS_EVERY_MS / 1000)
        except TimeoutError:
            pass
    if beacons:
        await beacons.stop()
    if mdns:
        await mdns.stop()
    if junk:
        aiozc, infos = junk
        for info in infos:
            await (await aiozc.async_unregister_service(info))
        await aiozc.async_close()
    emit(status("stopped"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--cluster", default="galaxy")
    p.add_argument("--host", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--gossip-port", type=int, default=7946)
    p.add_argument("--beacon-port", type=int, default=37021)
    p.add_argument("--interval-ms", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mdns", action="store_true")
    p.add_argument("--broadcast", action="store_true")
    p.add_argument("--junk", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
