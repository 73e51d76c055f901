"""/metrics and the dashboard against a real 3-node loopback mesh, the dashboard in headless Chromium.

Both tests kill -9 the coordinator and watch what an operator would watch: the Prometheus
numbers of the survivors move (leader changes, term, members), and the page served by a
survivor shows the new coordinator without a reload, with a clean browser console.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (installed by
.ci/run) and selenium (the ``test`` extra).  In CI (``CI=true``) it must run; locally it
is skipped when they are missing.  One exception, CI included: a machine whose address
space is hard-capped (``ulimit -v``; 1 GiB on some CI machines, with no CAP_SYS_RESOURCE to
lift it) where chromedriver or Chromium dies of a signal at start.  Chromium's allocator,
Firefox's JS engine (2 GiB of code space) and WebKit's (a 4 GiB structure heap) all
reserve more than 1 GiB and die before the first page (measured: SIGTRAP, SIGSEGV,
SIGABRT).  There the browser tests are skipped with that reason, and the page's script is
at least parsed by Node (``test_dashboard_script_parses``).  Under a cap the browser
starts with, they run.  Screenshots go to ``$GALAXY_ARTIFACTS_DIR`` or to a
directory under pytest's temp dir; the path is printed and kept in the test's report.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import time
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from galaxy.config import Config
from tests.cluster import ADMIN_PASSWORD, Cluster, Proc

pytestmark = pytest.mark.timeout(180)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage",
                  # nothing may reach out: no updates, sync, translate, first-run pages
                  "--disable-component-update", "--disable-sync", "--disable-default-apps",
                  "--disable-extensions", "--no-first-run", "--no-default-browser-check",
                  "--disable-features=Translate,OptimizationHints,MediaRouter",
                  "--window-size=1280,900")
PHONE_WIDTH_PX, PHONE_HEIGHT_PX = 390, 844


@pytest.fixture
def cluster():
    with Cluster() as c:
        # the nodes refuse unknown GALAXY_* settings; this one is the test's own
        c.env.pop("GALAXY_ARTIFACTS_DIR", None)
        yield c


def start_three(cluster: Cluster) -> tuple[str, int]:
    a = cluster.add("a")
    cluster.add("b", join=[a.gossip_addr])
    cluster.add("c", join=[a.gossip_addr])
    for name in "abc":
        cluster.start(name)
    leader, term = cluster.wait_leader(timeout_s=30)

    def settled():
        views = [p.try_get("/v1/status") for p in cluster.running()]
        return all(v and len(v["voters"]) == 3 and v["members"]["alive"] == 3 for v in views)

    cluster.wait(settled, 30, "3 voters and 3 alive members on every node")
    return leader, term


def scrape(p: Proc) -> dict[str, dict[tuple, float]] | None:
    """name -> {sorted label items -> value}, parsed by prometheus-client's own parser."""
    import urllib.request
    try:
        with urllib.request.urlopen(p.url + "/metrics", timeout=1.0) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def val(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_metrics_move_when_the_coordinator_is_killed(cluster):
    leader, term = start_three(cluster)
    before = {}
    for p in cluster.running():
        # a voter counts the coordinator once its own Raft has heard from it (a moment after
        # gossip may already name it)
        s = cluster.wait(lambda p=p: (s := scrape(p)) and val(s, "galaxy_leader_changes_total") >= 1 and s,
                         15, f"{p.name} to observe the coordinator through Raft")
        assert val(s, "galaxy_members", state="alive") == 3
        assert val(s, "galaxy_raft_voters") == 3 and val(s, "galaxy_raft_voter") == 1
        assert val(s, "galaxy_coordinator_known") == 1
        assert val(s, "galaxy_is_coordinator") == (1 if p.name == leader else 0)
        assert val(s, "galaxy_raft_term") >= term
        (info,) = [dict(k) for k in s["galaxy_node_info"]]
        assert info["node"] == p.name and info["cluster"] == "galaxy" and info["role"] == "auto"
        assert val(s, "galaxy_wire_frames_dropped_total", reason="unauthenticated") == 0
        before[p.name] = s

    # gossip traffic shows up and grows (bytes too, once the runner counts them)
    survivor = next(p for p in cluster.running() if p.name != leader)
    first = before[survivor.name]

    def gossip_grew():
        s = scrape(survivor)
        return s if s and val(s, "galaxy_gossip_messages_received_total") > val(
            first, "galaxy_gossip_messages_received_total") and val(
            s, "galaxy_gossip_messages_sent_total") > val(first, "galaxy_gossip_messages_sent_total") else None

    grown = cluster.wait(gossip_grew, 10, "gossip message counters to grow")
    assert sum(grown["galaxy_swim_events_total"].values()) > 0, "the SWIM core's counters are exported"
    assert val(grown, "galaxy_wire_frames_accepted_total") > val(first, "galaxy_wire_frames_accepted_total")
    if val(first, "galaxy_gossip_bytes_received_total") > 0:
        assert val(grown, "galaxy_gossip_bytes_received_total") > val(first, "galaxy_gossip_bytes_received_total")
    # our own scrapes are timed by route
    assert val(grown, "galaxy_http_request_duration_seconds_count", route="/metrics") >= 1
    assert val(grown, "galaxy_http_requests_total", route="/v1/status", code="200") >= 1

    # kill -9 the coordinator: on the survivors, leader changes and the term go up
    cluster.kill9(leader)
    survivors = cluster.running()
    new_leader, new_term = cluster.wait_leader(timeout_s=20, procs=survivors, exclude=leader, min_term=term + 1)
    for p in survivors:
        def moved(p=p):
            s = scrape(p)
            if not s:
                return None
            ok = (val(s, "galaxy_leader_changes_total") > val(before[p.name], "galaxy_leader_changes_total")
                  and val(s, "galaxy_raft_term") >= new_term
                  and val(s, "galaxy_is_coordinator") == (1 if p.name == new_leader else 0)
                  and val(s, "galaxy_members", state="alive") == 2)
            return s if ok else None

        s = cluster.wait(moved, 20, f"{p.name}'s metrics to show the failover")
        assert val(s, "galaxy_members", state="suspect") + val(s, "galaxy_members", state="dead") == 1
        assert val(s, "galaxy_raft_term") > val(before[p.name], "galaxy_raft_term")


# --------------------------------------------------------------------------------- browser

@functools.cache
def _browser_dies_at_start() -> str | None:
    """Why the browser cannot start on this machine, or None.  Asked only under a hard
    ``RLIMIT_AS`` (``ulimit -v``): there, start chromedriver and Chromium once; if either
    dies of a signal before doing anything, no browser can run here (1 GiB on some CI
    machines: Chromium, Firefox and WebKit each reserve several GiB at start)."""
    import resource
    import subprocess
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard == resource.RLIM_INFINITY:
        return None
    for argv in ([CHROMEDRIVER, "--version"],
                 [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "about:blank"]):
        try:
            rc = subprocess.run(argv, capture_output=True, timeout=60, preexec_fn=_soft_as_hard).returncode
        except subprocess.TimeoutExpired:
            continue
        if rc < 0 or rc > 128:          # a signal (the shell wrapper reports 128 + signal)
            return (f"address space capped at {hard >> 20} MiB (a hard ulimit -v, no CAP_SYS_RESOURCE "
                    f"to lift it): {os.path.basename(argv[0])} dies of a signal at start")
    return None


def _soft_as_hard() -> None:
    """``RLIMIT_AS`` soft limit up to the hard one (no privilege needed)."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


@contextlib.contextmanager
def _soft_as_raised():
    """Processes started inside get the hard ``RLIMIT_AS``; this process keeps its own."""
    import resource
    old = resource.getrlimit(resource.RLIMIT_AS)
    try:
        _soft_as_hard()
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def _browser_or_skip():
    missing = [name for name, ok in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not ok]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test, but these are missing: {', '.join(missing)}")
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install chromium chromium-driver)")
    why = _browser_dies_at_start()
    if why:
        pytest.skip(why)


class Browser:
    """One headless Chromium under chromedriver; every process it started is ended by pid."""

    def __init__(self, root: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile_dir = os.path.join(root, "chromium-profile")
        os.makedirs(self.profile_dir)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={self.profile_dir}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=CHROMEDRIVER, log_output=os.path.join(root, "chromedriver.log"))
        with _soft_as_raised():       # chromedriver and the browser it starts inherit it
            self.driver = webdriver.Chrome(service=service, options=opts)
        self.driver.set_page_load_timeout(20)
        self.driver.set_script_timeout(10)
        self.console: list[dict] = []

    def read_console(self) -> list[dict]:
        self.console += self.driver.get_log("browser")
        return self.console

    def text(self, css: str) -> str:
        return self.driver.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : null;", css)

    def member_rows(self) -> dict[str, str]:
        return self.driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#members tbody tr')]"
            ".map(r => [r.dataset.id, r.dataset.state]));")

    def close(self) -> None:
        # Our browser's processes are the ones running with our own profile dir.
        pids = [p.pid for p in psutil.process_iter(["cmdline"])
                if any(self.profile_dir in arg for arg in (p.info["cmdline"] or ()))]
        driver_pid = getattr(getattr(self.driver.service, "process", None), "pid", None)
        with contextlib.suppress(Exception):
            self.driver.quit()
        for pid in [*pids, *([driver_pid] if driver_pid else [])]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def artifacts_dir(tmp_path_factory, request) -> str:
    path = os.environ.get("GALAXY_ARTIFACTS_DIR") or str(tmp_path_factory.mktemp("dashboard-artifacts"))
    os.makedirs(path, exist_ok=True)
    request.node.user_properties.append(("artifacts", path))
    print(f"\ndashboard screenshots: {path}")
    return path


def test_dashboard_in_headless_chromium(cluster, tmp_path, artifacts_dir):
    _browser_or_skip()
    leader, term = start_three(cluster)
    # Open the page on a survivor-to-be: after the kill it must keep polling its own node.
    page_node = next(p for p in cluster.running() if p.name != leader)
    browser = Browser(str(tmp_path))
    try:
        d = browser.driver
        d.get(page_node.url + "/")

        def shows_mesh():
            rows = browser.member_rows()
            return (rows == {"a": "alive", "b": "alive", "c": "alive"} and browser.text("#leader-id") == leader
                    and browser.text("#member-count") == "3" and rows)

        cluster.wait(shows_mesh, 20, "the page to list 3 alive members and the coordinator", poll_s=0.1)
        assert browser.text(f"#members tr[data-id='{leader}']").count("coordinator") == 1
        assert browser.text("#node-id") == page_node.name
        assert d.find_element("id", "conn").get_attribute("data-state") == "live"
        assert "No tasks yet" in browser.text("#tasks-empty")
        assert leader in browser.text("#leader-history")
        d.save_screenshot(os.path.join(artifacts_dir, "dashboard-3-nodes.png"))
        page_id = d.execute_script("return (window.__galaxyPage = window.__galaxyPage || Math.random());")

        cluster.kill9(leader)
        survivors = cluster.running()
        new_leader, new_term = cluster.wait_leader(timeout_s=20, procs=survivors, exclude=leader,
                                                   min_term=term + 1)

        def shows_failover():
            rows = browser.member_rows()
            return (browser.text("#leader-id") == new_leader and rows.get(leader) in ("suspect", "dead")
                    and browser.text("#term") == f"term {new_term}" and rows)

        cluster.wait(shows_failover, 20, "the page to show the new coordinator and the dead one", poll_s=0.1)
        assert d.execute_script("return window.__galaxyPage;") == page_id, "the page must not have reloaded"
        history = browser.text("#leader-history")
        assert new_leader in history and leader in history
        d.save_screenshot(os.path.join(artifacts_dir, "dashboard-after-failover.png"))

        # On a phone: no sideways scrolling, the tables become cards
        d.set_window_size(PHONE_WIDTH_PX, PHONE_HEIGHT_PX)
        cluster.wait(lambda: d.execute_script("return window.innerWidth;") <= PHONE_WIDTH_PX, 5, "phone width")
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px on a phone"
        assert d.execute_script(
            "return getComputedStyle(document.querySelector('#members thead')).display;") == "none"
        d.save_screenshot(os.path.join(artifacts_dir, "dashboard-phone.png"))

        errors = [e for e in browser.read_console() if e.get("level") in ("SEVERE", "ERROR")]
        assert not errors, f"browser console errors: {errors}"
        for name in ("dashboard-3-nodes.png", "dashboard-after-failover.png", "dashboard-phone.png"):
            assert os.path.getsize(os.path.join(artifacts_dir, name)) > 1000
    finally:
        browser.close()


class _PageTasks:
    """Real task documents (``galaxy.tasks.core`` transitions) behind the task routes' reads."""

    def __init__(self) -> None:
        from galaxy.tasks import core as tc
        evil = '<img src=x onerror="document.title=1">'
        now = 1_700_000_000_000

        def task(n: int, command: Any) -> Any:
            spec, _ = tc.parse_spec({"command": command})
            return tc.new_task(f"t-{n:016x}", spec, "alice", "n-1", now - n * 1000)
        running = tc.set_progress(tc.start(tc.schedule(task(1, ["sh", "-c", evil]), "n-1", 4, now), "n-1", 1, now),
                                  "n-1", 1, 40, now)
        done = tc.finish(tc.start(tc.schedule(task(2, evil), "n-2", 4, now), "n-2", 1, now), "n-2", 1,
                         tc.SUCCEEDED, 0, "", now)
        self.all = [running, done, task(3, ["true"])]
        self.waiting: dict[str, str] = {}

    def list(self, *, state: str = "", limit: int = 100, **_: Any) -> list:
        return [t for t in self.all if not state or t.state == state][:limit]

    def get(self, task_id: str) -> Any:
        return next((t for t in self.all if t.id == task_id), None)

    def counts(self) -> dict[str, int]:
        return {s: sum(t.state == s for t in self.all) for s in ("pending", "running", "succeeded")}


class _PageNode:
    """An edge fake for the page's other states: tasks, warnings, a node-kept leader history."""

    def __init__(self, anonymous_read: bool = True) -> None:
        from tests.unit.ledger_fake import FakeLedger
        # a real one: routes read their settings from it
        self.cfg = Config(http_body_max_bytes=4096, anonymous_read=anonymous_read)
        self.tasks = _PageTasks()
        self.ledger = FakeLedger()

    def status(self) -> dict:
        return {"node": {"id": "n-1", "role": "auto", "version": "0.1.0", "cluster": "lab"},
                "leader": self.leader(), "voters": ["n-1"],
                "members": {"alive": 1, "suspect": 0, "dead": 1, "left": 0},
                "tasks": {"pending": 1, "running": 1, "succeeded": 1},
                "ledger": {"applied_seq": 12, "hash": "ab" * 20, "total_supply": 5000, "pending": 2},
                "conflicts_resolved": 3, "raft": {"commit_index": 9},
                "warnings": ["no quorum: 1 of 3 voters reachable", "disk low: 2% free"],
                "leader_history": [{"term": 3, "leader": "n-0", "at_ms": 1_700_000_000_000},
                                   {"term": 4, "leader": "n-1", "at_ms": 1_700_000_060_000}]}

    def members(self) -> list:
        evil = '<img src=x onerror="document.title=1">'
        return [{"id": "n-1", "state": "alive", "role": "auto", "voter": True, "raft_state": "leader",
                 "resources": {"cpu": 4, "memory_mb": 8192, "gpu": 1, "free": {"cpu": 2.5, "memory_mb": 4096,
                                                                              "gpu": 1}},
                 "trust": "high", "last_heard": 0, "addr": "10.0.0.1:7946"},
                {"id": evil, "state": "dead", "role": "worker", "voter": False, "raft_state": "none",
                 "resources": {}, "trust": "low", "last_heard": 4000.0, "addr": evil}]

    def leader(self) -> dict:
        return {"leader": "n-1", "term": 4, "http": None}

    def healthy(self) -> bool:
        return True

    def ready(self) -> tuple[bool, str]:
        return True, ""


@pytest.mark.parametrize("anonymous_read", [True, False], ids=["open-reads", "signed-in-reads"])
def test_dashboard_renders_tasks_warnings_and_hostile_text(tmp_path, artifacts_dir, anonymous_read):
    """The page's paths a young mesh does not reach yet, against an edge fake served for real;
    with anonymous_read false the page first asks for a sign-in, then shows the same."""
    _browser_or_skip()
    import asyncio
    import threading

    from galaxy.api.app import make_app, serve
    from tests.unit.ledger_fake import ADMIN_PASSWORD as FAKE_ADMIN_PASSWORD

    node = _PageNode(anonymous_read)
    app = make_app(node)
    loop = asyncio.new_event_loop()
    runner, port = loop.run_until_complete(serve(app, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, name="page-server", daemon=True)
    thread.start()
    browser = Browser(str(tmp_path))
    try:
        d = browser.driver
        d.get(f"http://127.0.0.1:{port}/")
        if not anonymous_read:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not d.find_element("id", "signin").is_displayed():
                time.sleep(0.05)
            assert d.find_element("id", "conn").get_attribute("data-state") == "stale"
            assert "sign in" in browser.text("#conn") and browser.text("#member-count") == "…"
            assert d.find_elements("css selector", "#tasks tbody tr") == []
            sign_in_on_page(browser, "admin", FAKE_ADMIN_PASSWORD)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(d.find_elements("css selector", "#tasks tbody tr")) < 3:
            time.sleep(0.05)
        rows = d.execute_script(
            "return [...document.querySelectorAll('#tasks tbody tr')].map(r => [r.dataset.id,"
            " r.querySelector('.bar > span').style.width]);")
        assert rows == [["t-0000000000000001", "40%"], ["t-0000000000000002", "100%"], ["t-0000000000000003", "0%"]]
        assert d.find_element("id", "tasks-empty").is_displayed() is False
        assert browser.text("#task-total") == "3"
        warnings = browser.text("#warning-list")
        assert "no quorum" in warnings and "disk low" in warnings
        assert d.find_element("id", "warnings").is_displayed()
        history = browser.text("#leader-history")
        assert history.index("n-1") < history.index("n-0"), "newest first"
        assert "as the node recorded them" in browser.text("#history-src")
        assert "5000" in browser.text("#ledger") and "abababab" in browser.text("#ledger")
        # a hostile member id, command or owner is shown as text, never parsed as markup
        assert d.find_elements("css selector", "#members img") == []
        assert "<img" in browser.text("#members tbody")
        assert d.find_elements("css selector", "#tasks img") == []
        assert browser.text("#tasks tr[data-id='t-0000000000000001'] .cmd").startswith("sh -c \"<img")
        assert browser.text("#tasks tr[data-id='t-0000000000000002'] .cmd").startswith("<img")
        assert browser.text("#tasks tr[data-id='t-0000000000000002'] td[data-label=node]") == "n-2", "a finished task: its last node"
        assert browser.text("#tasks tr[data-id='t-0000000000000001'] .pct") == "40%"
        assert d.title.startswith("Galaxy")
        d.save_screenshot(os.path.join(artifacts_dir, f"dashboard-tasks-warnings-{anonymous_read}.png"))
        errors = [e for e in browser.read_console() if e.get("level") in ("SEVERE", "ERROR")
                  and not (not anonymous_read and "401 (Unauthorized)" in e.get("message", ""))]
        assert not errors, f"browser console errors: {errors}"
    finally:
        browser.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _post(p: Proc, path: str, body: Any = None) -> dict:
    """POST as the mesh's admin."""
    status, doc = p.call("POST", path, body)
    assert status in (200, 201, 202), (status, doc)
    return doc


def sign_in_on_page(browser: "Browser", name: str, password: str) -> None:
    """Fill in the page's sign-in form (shown after a 401) and wait for it to close."""
    d = browser.driver
    form = d.find_element("id", "signin")
    d.find_element("id", "signin-name").send_keys(name)
    d.find_element("id", "signin-password").send_keys(password)
    d.find_element("id", "signin-submit").click()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and form.is_displayed():
        time.sleep(0.05)
    assert not form.is_displayed(), browser.text("#signin-note")
    assert browser.text("#whoami") == f"signed in as {name}"


# Prints a line (and one on stderr) every 0.4 s for about 4 s, with progress; the markup must stay text.
TALKER = ('for i in 1 2 3 4 5 6 7 8 9 10; do echo "line $i <b>bold</b>"; echo "GALAXY_PROGRESS $((i * 10))"; '
          'echo "err $i" >&2; sleep 0.4; done')


def test_dashboard_follows_a_live_task(cluster, tmp_path, artifacts_dir):
    """A real task on a real mesh: the table shows it with progress, its log pane follows its
    output while it runs (the attempt may run on another node: the logs are forwarded), the
    filter and the cancel button work, and /metrics counted it."""
    _browser_or_skip()
    from selenium.webdriver.support.ui import Select

    start_three(cluster)
    page_node = cluster.procs["b"]
    browser = Browser(str(tmp_path))
    try:
        d = browser.driver
        d.get(page_node.url + "/")
        cluster.wait(lambda: browser.text("#member-count") == "3", 20, "the page to load", poll_s=0.1)

        _post(page_node, "/v1/accounts", {"name": "alice", "password": "alice-password", "role": "user"})
        task_id = _post(page_node, "/v1/tasks", {"command": TALKER, "resources": {"cpu": 0.1, "memory_mb": 64},
                                                 "owner": "alice"})["id"]
        row = f"#tasks tr[data-id='{task_id}']"

        def running_with_progress():
            width = d.execute_script("const b = document.querySelector(arguments[0] + ' .bar > span');"
                                     "return b ? b.style.width : null;", row)
            state = d.execute_script("const r = document.querySelector(arguments[0]);"
                                     "return r ? r.dataset.state : null;", row)
            return state == "running" and width not in (None, "0%") and width

        cluster.wait(running_with_progress, 20, "the table to show the task running with progress", poll_s=0.1)
        assert browser.text(row + " td[data-label=owner]") == "alice"
        assert browser.text(row + " .cmd").startswith("for i in 1 2 3")
        assert browser.text(row + " td[data-label=attempt]") == "1 of 3"
        d.find_element("css selector", row).click()

        def live_line():
            text = browser.text("#log-stdout") or ""
            return "line 2" in text and page_node.get(f"/v1/tasks/{task_id}")["state"] == "running" and text

        cluster.wait(live_line, 20, "the log pane to show lines while the task still runs", poll_s=0.1)
        assert browser.text("#detail-id") == task_id
        d.save_screenshot(os.path.join(artifacts_dir, "dashboard-task-live.png"))

        def finished():
            text = browser.text("#log-stdout") or ""
            return ("line 10 <b>bold</b>" in text and browser.text("#log-note") == "end of stdout"
                    and d.find_element("css selector", row).get_attribute("data-state") == "succeeded" and text)

        text = cluster.wait(finished, 30, "the log pane to show every line and the task to succeed", poll_s=0.1)
        assert [ln for ln in text.splitlines() if ln.startswith("line")] == [f"line {i} <b>bold</b>" for i in
                                                                            range(1, 11)], "each line once, in order"
        assert d.find_elements("css selector", "#log-stdout b") == [], "task output is text, never markup"
        assert browser.text(row + " .pct") == "100%" and browser.text(row + " td[data-label=exit]") == "0"
        task = page_node.get(f"/v1/tasks/{task_id}")
        attempts = d.execute_script("return [...document.querySelectorAll('#attempts tbody tr')]"
                                    ".map(r => r.querySelector('td[data-label=node]').textContent);")
        assert attempts == [task["attempts"][0]["node"]]
        assert d.find_element("id", "cancel-task").is_displayed() is False, "nothing to cancel once it ended"
        d.find_element("id", "tab-stderr").click()
        cluster.wait(lambda: "err 10" in (browser.text("#log-stderr") or ""), 10, "the stderr tab", poll_s=0.1)
        assert d.find_element("id", "log-stdout").is_displayed() is False

        # the filter asks the node for one state
        Select(d.find_element("id", "task-filter")).select_by_value("running")
        cluster.wait(lambda: browser.text("#tasks-empty") == "No running tasks.", 10, "an empty filter", poll_s=0.1)
        Select(d.find_element("id", "task-filter")).select_by_value("succeeded")
        cluster.wait(lambda: d.find_elements("css selector", row), 10, "the succeeded filter", poll_s=0.1)
        Select(d.find_element("id", "task-filter")).select_by_value("")

        # cancel a running task from its detail pane (two taps: the first only arms the button)
        sleeper = _post(page_node, "/v1/tasks", {"command": ["sleep", "60"],
                                                 "resources": {"cpu": 0.1, "memory_mb": 64}})["id"]
        sleeper_row = f"#tasks tr[data-id='{sleeper}'][data-state=running]"
        cluster.wait(lambda: d.find_elements("css selector", sleeper_row), 20, "the sleeper to run", poll_s=0.1)
        d.find_element("css selector", sleeper_row).click()
        button = d.find_element("id", "cancel-task")
        cluster.wait(lambda: button.is_displayed(), 10, "the cancel button", poll_s=0.1)
        button.click()
        assert page_node.get(f"/v1/tasks/{sleeper}")["state"] == "running", "one tap cancels nothing"
        # not signed in: the node refuses (401) and the page asks for a sign-in; nothing was cancelled
        assert d.find_element("id", "signin").is_displayed() is False
        button.click()
        cluster.wait(lambda: d.find_element("id", "signin").is_displayed(), 10, "the sign-in form", poll_s=0.1)
        assert "sign in to cancel" in browser.text("#signin-why")
        assert page_node.get(f"/v1/tasks/{sleeper}")["state"] == "running"
        d.save_screenshot(os.path.join(artifacts_dir, "dashboard-sign-in.png"))
        d.find_element("id", "signin-name").send_keys("admin")
        d.find_element("id", "signin-password").send_keys("not-the-password")
        d.find_element("id", "signin-submit").click()
        cluster.wait(lambda: "wrong name or password" in (browser.text("#signin-note") or ""), 10, "the refusal",
                     poll_s=0.1)
        d.find_element("id", "signin-name").clear()
        d.find_element("id", "signin-password").clear()
        sign_in_on_page(browser, "admin", ADMIN_PASSWORD)
        assert d.execute_script("return sessionStorage.getItem('galaxy_token')").startswith("gt1.")
        button.click()
        button.click()
        cluster.wait(lambda: page_node.get(f"/v1/tasks/{sleeper}")["state"] == "cancelled", 20, "the cancel")
        cluster.wait(lambda: "cancelled" in (browser.text("#detail-state") or ""), 10, "the pane to show it",
                     poll_s=0.1)
        d.save_screenshot(os.path.join(artifacts_dir, "dashboard-task-cancelled.png"))
        d.set_window_size(PHONE_WIDTH_PX, PHONE_HEIGHT_PX)
        cluster.wait(lambda: d.execute_script("return window.innerWidth;") <= PHONE_WIDTH_PX, 5, "phone width")
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px on a phone"
        d.execute_script("document.getElementById('task-detail').scrollIntoView();")
        d.save_screenshot(os.path.join(artifacts_dir, "dashboard-task-phone.png"))

        # the browser logs each refused call (401) as a console error; nothing else may be there
        errors = [e for e in browser.read_console() if e.get("level") in ("SEVERE", "ERROR")
                  and "401 (Unauthorized)" not in e.get("message", "")]
        assert not errors, f"browser console errors: {errors}"
    finally:
        browser.close()

    # /metrics: the accepting node counted two submissions; each first attempt was timed once in the mesh
    def counted():
        scrapes = {p.name: scrape(p) for p in cluster.running()}
        if not all(scrapes.values()) or not all(val(s, "galaxy_tasks", state="succeeded") == 1 and
                                                val(s, "galaxy_tasks", state="cancelled") == 1
                                                for s in scrapes.values()):
            return None
        return scrapes

    scrapes = cluster.wait(counted, 15, "every node's task gauges to converge")
    assert val(scrapes["b"], "galaxy_tasks_submitted_total") == 2
    assert sum(val(s, "galaxy_tasks_submitted_total") for s in scrapes.values()) == 2
    assert sum(val(s, "galaxy_tasks_started_total") for s in scrapes.values()) == 2
    for name in ("galaxy_task_schedule_latency_seconds", "galaxy_task_submit_to_running_seconds"):
        assert sum(val(s, name + "_count") for s in scrapes.values()) == 2, name
    assert all(val(s, "galaxy_executor_running") == 0 for s in scrapes.values())
    for name in ("dashboard-task-live.png", "dashboard-sign-in.png", "dashboard-task-cancelled.png",
                 "dashboard-task-phone.png"):
        assert os.path.getsize(os.path.join(artifacts_dir, name)) > 1000


def test_dashboard_script_parses(tmp_path):
    # Run everywhere, and all that is left of the browser tests where no browser can start
    # (a capped address space): the page's script must at least parse in a real JS engine.
    from galaxy.api.dashboard import _SCRIPT
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must parse the dashboard's script, but node is missing (apt-get install nodejs)")
        pytest.skip("node is not installed")
    src = tmp_path / "dashboard.js"
    src.write_text(_SCRIPT)
    import subprocess
    good = subprocess.run([node, "--check", str(src)], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    src.write_text(_SCRIPT + "\n}")                 # the check itself can fail
    bad = subprocess.run([node, "--check", str(src)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "SyntaxError" in bad.stderr
