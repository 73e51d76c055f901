"""The `galaxy` CLI: `up` flag mapping, keygen, client commands against a real HTTP
server (make_app over a fake node), and `galaxy dev` supervising stub nodes.

Edge mocks only: `galaxy.node` is replaced by a fake module for `up` (no node starts),
and the client commands talk to a real aiohttp server serving a fake node.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy import cli, config, wire
from galaxy.api.app import make_app, serve
from galaxy.client import Client, ClientError, normalize_addr

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSI = "\x1b["


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("GALAXY_") or key == "NO_COLOR":
            monkeypatch.delenv(key)


@pytest.fixture
def fake_node_module(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace galaxy.node at the edge: run_node records the Config instead of running."""
    started: list[Any] = []
    mod = types.ModuleType("galaxy.node")

    def run_node(cfg: Any) -> int:
        started.append(cfg)
        return 0

    mod.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "galaxy.node", mod)
    return started


# ------------------------------------------------------------------------- galaxy up

def test_up_maps_every_flag_to_its_field(fake_node_module: list[Any], tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(wire.generate_key())
    rc = cli.main([
        "up", "--node-id", "n-7", "--role", "worker", "--cluster", "lab",
        "--bind", "127.0.0.1", "--advertise", "127.0.0.2",
        "--http-port", "0", "--gossip-port", "17946", "--raft-port", "17947",
        "--broadcast-port", "17021", "--data-dir", str(tmp_path / "data"),
        "--join", "10.77.0.1:7946", "--join", "10.77.0.2:7946,10.77.0.3:7946",
        "--cluster-key-file", str(key_file), "--token", "tok-123", "--voters", "5",
        "--no-mdns", "--no-broadcast", "--cpu", "2.5", "--memory", "1.5G", "--gpu", "1",
        "--label", "zone=a", "--label", "disk=ssd", "--owner", "alice",
        "--log-format", "json", "--log-level", "debug",
    ])
    assert rc == 0
    (cfg,) = fake_node_module
    assert (cfg.node_id, cfg.role, cfg.cluster) == ("n-7", "worker", "lab")
    assert (cfg.bind, cfg.advertise) == ("127.0.0.1", "127.0.0.2")
    assert (cfg.http_port, cfg.gossip_port, cfg.raft_port, cfg.broadcast_port) == (0, 17946, 17947, 17021)
    assert cfg.data_dir == str(tmp_path / "data")
    assert cfg.join == ("10.77.0.1:7946", "10.77.0.2:7946", "10.77.0.3:7946")
    assert cfg.cluster_key_file == str(key_file) and cfg.cluster_key is None
    assert cfg.token == "tok-123" and cfg.voters == 5
    assert cfg.mdns is False and cfg.broadcast is False
    assert (cfg.cpu, cfg.memory_mb, cfg.gpu) == (2.5, 1536, 1)
    assert cfg.labels == {"zone": "a", "disk": "ssd"}
    assert (cfg.owner, cfg.log_format, cfg.log_level) == ("alice", "json", "debug")


def test_up_absent_flags_leave_env_and_file_alone(fake_node_module: list[Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "galaxy.toml"
    toml.write_text('voters = 5\ncluster = "from-file"\nhttp_port = 9100\n')
    monkeypatch.setenv("GALAXY_HTTP_PORT", "9001")
    monkeypatch.setenv("GALAXY_DATA_DIR", str(tmp_path / "d"))
    assert cli.main(["up", "--config", str(toml)]) == 0
    assert cli.main(["up", "--config", str(toml), "--http-port", "9002", "--voters", "1"]) == 0
    first, second = fake_node_module
    assert (first.http_port, first.voters, first.cluster, first.mdns) == (9001, 5, "from-file", True)
    assert (second.http_port, second.voters) == (9002, 1)


def test_up_bad_value_exits_2_naming_the_key(fake_node_module: list[Any],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--http-port", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("galaxy: error: http_port:") and "--http-port" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["up", "--label", "no-equals-sign"]) == 2
    assert "labels" in capsys.readouterr().err
    assert cli.main(["up", "--memory", "lots"]) == 2
    assert "memory_mb" in capsys.readouterr().err
    assert fake_node_module == []                 # no node was started


def test_up_bad_env_is_a_config_error_too(fake_node_module: list[Any],
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GALAXY_VOTERS", "many")
    assert cli.main(["up"]) == 2
    assert "voters" in capsys.readouterr().err and fake_node_module == []


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["dev", "--nodes", "0"]) == 2
    assert cli.main(["dev", "--nodes", "1000"]) == 2
    assert cli.main(["--version"]) == 0
    assert "galaxy" in capsys.readouterr().out


# ------------------------------------------------------------------------- keygen

def test_keygen_prints_a_parseable_fresh_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen"]) == 0
    first = capsys.readouterr().out.strip()
    assert cli.main(["keygen"]) == 0
    second = capsys.readouterr().out.strip()
    assert len(wire.parse_key(first)) == 32 and first != second


# ------------------------------------------------------------------------- client commands

class FakeNode:
    def __init__(self) -> None:
        self.node_id = "n-1a2b3c4d5e6f7a8b"
        self.cfg = types.SimpleNamespace(http_body_max_bytes=1_048_576)
        self.boom = False
        self.no_leader = False

    def status(self) -> dict[str, Any]:
        if self.boom:
            raise RuntimeError("kaput")
        return {"node": {"id": self.node_id, "role": "auto", "version": "0.1.0",
                         "http": "http://127.0.0.1:8000", "cluster": "lab"},
                "leader": self.leader(), "voters": [self.node_id, "n-2", "n-3"],
                "members": {"alive": 2, "suspect": 1, "dead": 0, "left": 0},
                "tasks": {"pending": 4, "running": 1, "succeeded": 9},
                "ledger": {"applied_seq": 42, "hash": "f00d" * 8, "total_supply": 1000,
                           "pending": 1},
                "conflicts_resolved": 3, "warnings": ["1 member(s) suspect"]}

    def members(self) -> list[dict[str, Any]]:
        return [
            {"id": self.node_id, "state": "alive", "role": "auto", "addr": "127.0.0.1:7946",
             "incarnation": 1, "resources": {"cpu": 4.0, "memory_mb": 8192, "gpu": 0,
                                             "free": {"cpu": 3.5, "memory_mb": 6144, "gpu": 0}},
             "trust": "low", "last_heard": 0.0},
            {"id": "n-2", "state": "suspect", "role": "worker", "addr": "127.0.0.1:7956",
             "incarnation": 2, "resources": {"cpu": 2, "memory_mb": 512, "gpu": 1},
             "trust": "high", "last_heard": 1.3},
            {"id": "n-3", "state": "dead", "role": "standby", "addr": "127.0.0.1:7966",
             "incarnation": 5, "resources": {}, "trust": "low", "last_heard": 4000},
        ]

    def leader(self) -> dict[str, Any]:
        if self.no_leader:
            return {"leader": None, "term": 3, "http": None}
        return {"leader": self.node_id, "term": 7, "http": "http://127.0.0.1:8000"}

    def healthy(self) -> bool:
        return True

    def ready(self) -> tuple[bool, str]:
        return True, ""


@contextlib.contextmanager
def served(node: Any, ssl_context: Any = None) -> Iterator[str]:
    """make_app(node) served by a real aiohttp server in a thread (HTTPS with ``ssl_context``);
    yields its URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["runner"], box["port"] = loop.run_until_complete(
                serve(make_app(node), "127.0.0.1", 0, ssl_context=ssl_context))
        finally:
            started.set()
        loop.run_forever()
        loop.run_until_complete(box["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10) and "port" in box
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{box['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture
def api_server() -> Iterator[tuple[FakeNode, str]]:
    node = FakeNode()
    with served(node) as url:
        yield node, url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_members_table_lists_every_member(api_server: tuple[FakeNode, str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api_server
    assert cli.main(["members", "--addr", url]) == 0
    out = capsys.readouterr().out
    for member_id in (node.node_id, "n-2", "n-3"):
        assert member_id in out
    for text in ("alive", "suspect", "dead", "worker", "127.0.0.1:7956", "3.5/4", "6.0G/8.0G",
                 "0.0s ago", "1.3s ago", "67m ago"):
        assert text in out, text
    assert ANSI not in out                   # not a TTY: no colour codes


def test_status_and_leader_render(api_server: tuple[FakeNode, str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api_server
    assert cli.main(["status", "--addr", url]) == 0
    out = capsys.readouterr().out
    for text in (node.node_id, "term 7", "n-2", "2 alive", "1 suspect", "4 pending",
                 "applied seq 42", "total supply 1000", "3 resolved", "1 member(s) suspect"):
        assert text in out, text
    assert cli.main(["leader", "--addr", url]) == 0
    out = capsys.readouterr().out
    assert node.node_id in out and "term 7" in out
    node.no_leader = True
    assert cli.main(["leader", "--addr", url]) == 0
    assert "none" in capsys.readouterr().out


@pytest.mark.parametrize("command,path", [("status", "status"), ("members", "members"),
                                          ("leader", "leader")])
def test_json_flag_prints_the_raw_answer(api_server: tuple[FakeNode, str], command: str,
                                         path: str, capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api_server
    assert cli.main([command, "--addr", url, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = {"members": node.members()} if path == "members" else getattr(node, path)()
    assert got == expected


def test_addr_from_env(api_server: tuple[FakeNode, str], monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api_server
    monkeypatch.setenv("GALAXY_ADDR", url.removeprefix("http://"))   # scheme is optional
    assert cli.main(["leader", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["leader"] == node.node_id


def test_unreachable_node_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    for command in ("status", "members", "leader"):
        assert cli.main([command, "--addr", url]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (f"galaxy: cannot reach {url}: connection refused — is a node "
                                "running? (galaxy up / galaxy dev)\n")


def test_server_error_prints_the_servers_message(api_server: tuple[FakeNode, str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api_server
    node.boom = True
    assert cli.main(["status", "--addr", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("galaxy: internal error") and "HTTP 500 internal" in err
    assert "kaput" not in err


def test_bad_addr_and_non_galaxy_answers() -> None:
    with pytest.raises(ClientError, match="bad address"):
        normalize_addr("http://")
    with pytest.raises(ClientError, match="port"):
        normalize_addr("127.0.0.1:99999")
    assert normalize_addr("10.77.0.1:8000/") == "http://10.77.0.1:8000"
    with socket.socket() as srv:             # a TCP server that speaks garbage, not HTTP
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(ClientError, match="malformed HTTP"):
            Client(f"127.0.0.1:{srv.getsockname()[1]}", timeout_s=5).get("/v1/status")
        t.join(5)


def test_colours_follow_tty_and_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    data = {"members": FakeNode().members()}
    tty = Tty()
    cli.render_members(data, cli._console(tty))
    assert ANSI in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    tty = Tty()
    cli.render_members(data, cli._console(tty))
    colours = re.findall(r"\x1b\[[0-9;]*m", tty.getvalue())
    assert "n-2" in tty.getvalue()
    assert not [c for c in colours if re.search(r"[\[;](3[0-9]|9[0-7])[;m]", c)], colours


@pytest.mark.parametrize("value,expected", [
    (0.0, "0.0s ago"), (0.34, "0.3s ago"), (12, "12s ago"), (600, "10m ago"),
    (7200, "2h ago"), (None, "-"), (1_700_000_000_000 - 2500, "2.5s ago"),
    (1_700_000_000_000 + 5000, "0.0s ago"), ("never", "never"),
])
def test_last_heard_formatting(value: Any, expected: str) -> None:
    assert cli._ago(value, now_ms=1_700_000_000_000) == expected


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(
                         ["id", "state", "role", "addr", "incarnation", "resources", "free",
                          "cpu", "memory_mb", "gpu", "last_heard", "members", "node", "leader",
                          "term", "http", "voters", "tasks", "ledger", "hash", "warnings",
                          "conflicts_resolved", "trust", "task_memory_max_mb", "x"]), inner, max_size=6),
                     max_leaves=20)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=_json)
def test_renderers_never_crash_on_odd_answers(data: Any) -> None:
    out = io.StringIO()
    console = cli._console(out)
    cli.render_members(data, console)
    cli.render_members({"members": [data]}, console)
    cli.render_status(data, console)
    cli.render_leader(data, console)


# ------------------------------------------------------------------------- galaxy dev
#
# `galaxy dev` starts real `python -m galaxy up` processes.  A sitecustomize on the
# children's PYTHONPATH swaps galaxy.node for a stub that serves make_app(fake node) on
# the configured port, so these tests check the supervisor (ports, flags, env, readiness,
# crash reports, shutdown) without depending on the rest of the node.

STUB = textwrap.dedent('''
    import json, os, signal, sys, types

    def run_node(cfg):
        import asyncio
        from galaxy.api.app import make_app, serve

        class Fake:
            def __init__(self):
                self.cfg = cfg
            def status(self): return {"node": {"id": cfg.node_id}}
            def members(self): return []
            def leader(self): return {"leader": "dev-1", "term": 1, "http": None}
            def healthy(self): return True
            def ready(self): return (True, "")

        record = {"pid": os.getpid(), "argv": sys.argv,
                  "env": {k: v for k, v in os.environ.items() if k.startswith("GALAXY_")},
                  "cfg": {"node_id": cfg.node_id, "join": list(cfg.join),
                          "cluster": cfg.cluster, "http_port": cfg.http_port,
                          "gossip_port": cfg.gossip_port, "mdns": cfg.mdns,
                          "broadcast": cfg.broadcast, "bind": cfg.bind,
                          "gossip_interval_ms": cfg.gossip_interval_ms,
                          "beacon_interval_ms": cfg.beacon_interval_ms,
                          "has_key": cfg.cluster_key is not None}}
        with open(os.path.join(cfg.data_dir, "stub.json"), "w") as f:
            json.dump(record, f)
        if cfg.node_id == os.environ.get("GALAXY_TEST_CRASH"):
            print("boom: stub node crashed on purpose", flush=True)
            return 3

        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            runner, port = await serve(make_app(Fake()), cfg.bind, cfg.http_port)
            print(f"stub node {cfg.node_id} serving on {port}", flush=True)
            await stop.wait()
            await runner.cleanup()
            print("stub node stopped", flush=True)

        asyncio.run(main())
        return 0

    mod = types.ModuleType("galaxy.node")
    mod.run_node = run_node
    sys.modules["galaxy.node"] = mod
''')


class DevProcess:
    """`python -m galaxy dev ...` with its output read line by line, bounded in time."""

    def __init__(self, args: list[str], stub_dir: Path, extra_env: dict[str, str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_")}
        env.update(extra_env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(stub_dir)])
        self.proc = subprocess.Popen([sys.executable, "-m", "galaxy", "dev", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, env=env,
                                     cwd=stub_dir)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, needle: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(needle in line for line in self.lines):
            left = deadline - time.monotonic()
            assert left > 0, f"no {needle!r} in time; output:\n" + "\n".join(self.lines)
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"dev exited before {needle!r}:\n" + "\n".join(self.lines)
            self.lines.append(line)

    def stop(self, sig: int, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout_s)
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                   # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _pid_alive(p)]


@pytest.fixture
def stub_dir(tmp_path: Path) -> Path:
    d = tmp_path / "stub"
    d.mkdir()
    (d / "sitecustomize.py").write_text(STUB)
    return d


@pytest.mark.timeout(120)
def test_dev_starts_a_mesh_reports_a_crash_and_stops_cleanly(stub_dir: Path,
                                                             tmp_path: Path) -> None:
    data = tmp_path / "mesh"
    dev = DevProcess(["--nodes", "3", "--http-port", "0", "--data-dir", str(data),
                      "--cluster", "devtest", "--voters", "3", "--ready-timeout", "60"],
                     stub_dir, {"GALAXY_TEST_CRASH": "dev-3", "GALAXY_JOIN": "10.77.9.9:1",
                                "GALAXY_BEACON_INTERVAL_MS": "700"})
    child_pids: list[int] = []
    try:
        dev.wait_for("try: galaxy status")
        records = {}
        for i in (1, 2, 3):
            path = data / f"dev-{i}" / "stub.json"
            records[i] = json.loads(path.read_text())
            child_pids.append(records[i]["pid"])
        out = "\n".join(dev.lines)
        assert "dev-3 exited with status 3" in out
        assert "boom: stub node crashed on purpose" in out        # the log tail is shown
        assert "dev-1 ready" in out and "dev-2 ready" in out

        key = records[1]["env"]["GALAXY_CLUSTER_KEY"]
        wire.parse_key(key)
        assert (data / "cluster.key").read_text().strip() == key
        assert stat.S_IMODE((data / "cluster.key").stat().st_mode) == 0o600
        first_gossip = records[1]["cfg"]["gossip_port"]
        for i, rec in records.items():
            argv, cfg = rec["argv"], rec["cfg"]
            assert rec["env"]["GALAXY_CLUSTER_KEY"] == key and key not in " ".join(argv)
            assert cfg["node_id"] == f"dev-{i}" and cfg["cluster"] == "devtest"
            assert cfg["bind"] == "127.0.0.1" and cfg["has_key"]
            assert cfg["mdns"] is False and cfg["broadcast"] is False
            assert cfg["gossip_interval_ms"] == config.Config.local().gossip_interval_ms
            assert cfg["beacon_interval_ms"] == 700             # the user's env tweak wins
            assert cfg["join"] == ([] if i == 1 else [f"127.0.0.1:{first_gossip}"])
            assert f"http://127.0.0.1:{cfg['http_port']}" in out
            assert (data / f"dev-{i}" / "galaxy.log").exists()
        assert len({r["cfg"]["http_port"] for r in records.values()}) == 3

        first_url = f"http://127.0.0.1:{records[1]['cfg']['http_port']}"
        assert f"--addr {first_url}" in out
        assert Client(first_url, timeout_s=5).get("/readyz") == {"ready": True}

        assert dev.stop(signal.SIGTERM) == 0
        assert "stopped" in dev.lines[-1]
        assert _wait_dead(child_pids) == []
        for i in (1, 2):
            assert "stub node stopped" in (data / f"dev-{i}" / "galaxy.log").read_text()
        assert (data / "dev-1").is_dir()                        # a given dir is kept
    finally:
        dev.kill()
        for pid in _wait_dead(child_pids, timeout_s=0):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_dev_temp_dir_is_removed_on_ctrl_c(stub_dir: Path) -> None:
    dev = DevProcess(["--nodes", "1", "--http-port", "0"], stub_dir, {})
    child_pids: list[int] = []
    try:
        dev.wait_for("try: galaxy status")
        header = next(line for line in dev.lines if line.startswith("galaxy dev: starting"))
        root = Path(header.rsplit(" in ", 1)[1])
        assert root.is_dir()
        child_pids.append(json.loads((root / "dev-1" / "stub.json").read_text())["pid"])
        assert dev.stop(signal.SIGINT) == 0
        assert not root.exists()
        assert _wait_dead(child_pids) == []
    finally:
        dev.kill()
        for pid in _wait_dead(child_pids, timeout_s=0):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_dev_children_die_with_a_killed_supervisor(stub_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "mesh"
    dev = DevProcess(["--nodes", "2", "--http-port", "0", "--data-dir", str(data)],
                     stub_dir, {})
    child_pids: list[int] = []
    try:
        dev.wait_for("try: galaxy status")
        child_pids = [json.loads((data / f"dev-{i}" / "stub.json").read_text())["pid"]
                      for i in (1, 2)]
        dev.proc.kill()                                         # kill -9 the supervisor
        dev.proc.wait(10)
        assert _wait_dead(child_pids) == []
    finally:
        dev.kill()
        for pid in _wait_dead(child_pids, timeout_s=0):
            os.kill(pid, signal.SIGKILL)


def test_a_task_shows_its_whole_command_quoted_and_the_table_a_quoted_prefix() -> None:
    from rich.console import Console

    from galaxy import cli_tasks
    argv = ["sh", "-c", "for i in 1 2 3; do echo GALAXY_PROGRESS $((i*33)); sleep 1; done"]
    task = {"id": "t-0123456789abcdef", "state": "running", "node": "n1", "command": argv, "owner": "alice",
            "resources": {"cpu": 1, "memory_mb": 256, "gpu": 0}, "attempts": [], "submitted_ms": 0}
    out = io.StringIO()
    cli_tasks.render_task(task, Console(file=out, width=200, no_color=True))
    assert "sh -c 'for i in 1 2 3; do echo GALAXY_PROGRESS $((i*33)); sleep 1; done'" in out.getvalue()
    out = io.StringIO()
    cli_tasks.render_tasks({"tasks": [task], "next": ""}, Console(file=out, width=200, no_color=True))
    assert "sh -c 'for i in 1 2 3; do echo GALAXY_PROGRESS …" in out.getvalue()


def test_members_show_a_nodes_cap_on_a_tasks_memory() -> None:
    from rich.console import Console

    member = {"id": "n1", "state": "alive", "role": "auto", "addr": "10.0.0.1:7946", "incarnation": 1,
              "resources": {"cpu": 2, "memory_mb": 8192, "gpu": 0, "task_memory_max_mb": 1000,
                            "free": {"cpu": 2, "memory_mb": 8192, "gpu": 0}}}
    out = io.StringIO()
    cli.render_members({"members": [member, {**member, "id": "n2", "resources": {
        **member["resources"], "task_memory_max_mb": None}}]}, Console(file=out, width=200, no_color=True))
    rows = {line.split()[0]: line for line in out.getvalue().splitlines() if line.startswith("n")}
    assert "8.0G/8.0G ≤1000M" in rows["n1"] and "≤" not in rows["n2"]
