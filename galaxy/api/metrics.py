"""``GET /metrics``: the node's state in Prometheus text format, read at scrape time.

Theory of operation
-------------------
Each HTTP app owns one ``CollectorRegistry`` (never prometheus-client's global one, so two
nodes in one process — tests, ``galaxy dev`` — cannot mix their numbers) holding two
collectors:

* ``NodeCollector`` — no state of its own.  Every scrape builds its families from one
  ``node.status()`` answer plus the gossip runner's counters (``node_families``, a pure
  function), so a number on the page is exactly what the node says at that moment.
  Task latencies come from the task service's own histograms (``TaskService.histograms()``,
  fed by the node that writes each transition, so summed over a mesh every first attempt
  counts once) and the executor gauges from the task service too.  Counters the node does
  not keep yet (ledger) are exported as zero under their final names: dashboards and
  alerts written today keep working when the numbers arrive.
* ``HttpMetrics`` — request latency (histogram) and responses (counter) by route, fed by
  an aiohttp middleware.  It keeps plain bucket counts, not prometheus-client metric
  objects: the middleware runs on every request and must stay cheap.

Both describe their numbers as ``Family`` values.  A scrape in the classic text format —
what ``curl`` and most scrapers ask for — is written straight from those by
``encode_text`` (under a microsecond per sample, 4-5x faster than prometheus-client's
encoder, whose per-sample validation we do not need for names fixed in this file).  A
scraper that asks for OpenMetrics gets prometheus-client's own encoder over the registry,
which sees the same families through ``collect()``; the unit tests check that both say the
same thing and that the text parses with prometheus-client's parser.

Invariants:

* Every label set is bounded: ``state`` and ``reason`` labels come from fixed tuples (plus
  at most ``EXTRA_LABELS_MAX`` states the node itself reports), ``route`` is the route's
  *pattern* (``/v1/tasks/{id}``) or ``"unmatched"``, never a client-chosen path, and
  ``code`` is an HTTP status.  A client cannot grow the exposition by sending odd URLs.
* The names below are the contract with operators' dashboards and alerts: append only,
  never rename.  Counters end in ``_total``; times are seconds (Prometheus' base unit).
* A scrape reads the node once (``status()``), holds no lock the node uses and does no
  I/O.  Whatever the node reports (missing keys, None, NaN, strings) becomes 0, never a
  failed scrape.

Exported families (``galaxy_`` prefix):

====================================  =======  =================================================
name                                  type     meaning
====================================  =======  =================================================
node_info{node,version,cluster,role}  gauge    always 1; the labels say which node this is
uptime_seconds                        gauge    since this process started
members{state}                        gauge    members this node knows, by alive/suspect/dead/left
coordinator_known                     gauge    1 when this node knows a coordinator
is_coordinator                        gauge    1 on the coordinator
raft_term                             gauge    the term this node knows
raft_commit_index                     gauge    the Raft commit index (0 when not a voter)
raft_voters                           gauge    size of the voter set this node knows
raft_voter                            gauge    1 when this node runs Raft as a voter
raft_fsyncs_total                     counter  journal fsyncs
leader_changes_total                  counter  (term, leader) changes this node observed
gossip_messages_received_total        counter  gossip datagrams received (before decoding)
gossip_messages_sent_total            counter  gossip datagrams sent
gossip_bytes_received_total           counter  bytes of those datagrams (0 until the runner counts)
gossip_bytes_sent_total               counter  ditto, sent
gossip_dropped_total{reason}          counter  datagrams dropped: decode, type, send_buffer
gossip_errors_total{kind}             counter  encode / send errors
gossip_anti_entropy_repairs_total     counter  records repaired by anti-entropy
swim_events_total{event}              counter  the membership core's counters (probes,
                                               probes_failed, suspicions, refutations, ...)
wire_frames_accepted_total            counter  frames that passed the codec
wire_frames_dropped_total{reason}     counter  frames the codec refused, by wire.REASONS
                                               (unauthenticated, replayed, stale, ...)
vclock_conflicts_resolved_total       counter  concurrent updates merged by the lattice
tasks{state}                          gauge    tasks by state (the whole mesh as this node sees it)
tasks_submitted_total                 counter  submissions this node accepted and got acknowledged
tasks_scheduled_total                 counter  attempts this node placed as coordinator
tasks_started_total                   counter  attempts started on this node
tasks_finished_total                  counter  attempts that ended on this node
tasks_lost_total                      counter  attempts this coordinator gave up (node dead/left)
tasks_refenced_total                  counter  assignments re-issued under a newer term
tasks_fenced_out_total                counter  assignments this worker refused (older term)
tasks_stale_killed_total              counter  attempts killed here as no longer current
tasks_plans_total                     counter  scheduling passes this node ran as coordinator
scheduler_waiting                     gauge    pending tasks the coordinator could not place
task_schedule_latency_seconds         hist.    submit -> scheduled, first attempts placed here
task_submit_to_running_seconds        hist.    submit -> running, first attempts started here
executor_running                      gauge    tasks running on this node
executor_queued                       gauge    tasks assigned to this node, not started yet
ledger_applied_seq                    gauge    the last ledger entry applied here
ledger_pending                        gauge    entries accepted here, not yet sequenced
ledger_total_supply                   gauge    tokens in existence
warnings                              gauge    warnings /v1/status shows
http_request_duration_seconds{route}  hist.    server-side latency of every request
http_requests_total{route,code}       counter  responses by route and status code
====================================  =======  =================================================

Node interface read here (each part optional; what is missing reads as zero):
``status()`` (see ``galaxy.node.Node.status``; may be a coroutine function, the handler
awaits it) with ``members``, ``leader``, ``voters``, ``raft``, ``wire``, ``tasks``,
``ledger``, ``scheduler`` (``TaskService.stats`` and ``waiting``), ``executor``
(``{"running", "queued"}``; else read from ``tasks``), ``conflicts_resolved`` and
``warnings``; ``gossip.stats`` (dict of counters, with ``bytes_received``,
``bytes_sent`` and ``anti_entropy_repairs`` once the runner keeps them);
``membership.stats`` (the SWIM core's counters, exported under their own names); and
``histograms()`` returning ``{"task_schedule_latency": H, "task_submit_to_running": H}``
with ``H = {"bounds_s": [ascending], "counts": [per bucket, len(bounds_s) + 1, the last
above every bound], "sum_s": float}`` — or, when the node has no ``histograms()``, the
same from ``tasks.histograms()``; ``tasks.running_here()`` and ``tasks.list(state=
"scheduled", node=...)`` for the executor gauges when ``status()`` has none.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from galaxy.histogram import TASK_BUCKETS_S, Histogram
from galaxy.tasks.core import TASK_STATES

PREFIX = "galaxy_"
# Fixed label values, so a family has the same series on every node from the start.
MEMBER_STATES = ("alive", "suspect", "dead", "left")
WIRE_REASONS = ("too_large", "malformed", "version", "unknown_key", "unauthenticated",
                "foreign_cluster", "stale", "replayed", "unknown_type", "invalid")
GOSSIP_DROPS = (("decode", "dropped_decode"), ("type", "dropped_type"),
                ("send_buffer", "dropped_send_buffer"))
GOSSIP_ERRORS = (("encode", "encode_errors"), ("send", "send_errors"))
TASK_HISTOGRAMS = (
    ("task_schedule_latency", "Time from submit to scheduled, seconds."),
    ("task_submit_to_running", "Time from submit to running, seconds."),
)
EXTRA_LABELS_MAX = 16        # states a node reports beyond the fixed ones (a newer peer's)
SWIM_EVENTS_MAX = 64         # the membership core's counters; its code fixes the set
# The task service's counters (TaskService.stats), exported as tasks_<key>_total.
TASK_COUNTERS = (
    ("submitted", "Task submissions this node accepted and got acknowledged."),
    ("scheduled", "Task attempts this node placed as coordinator."),
    ("started", "Task attempts started on this node."),
    ("finished", "Task attempts that ended on this node."),
    ("lost", "Task attempts this coordinator gave up because their node died or left."),
    ("refenced", "Task assignments re-issued under a newer Raft term."),
    ("fenced_out", "Task assignments this worker refused as of an older Raft term."),
    ("stale_killed", "Task attempts killed here because they were no longer current."),
    ("plans", "Scheduling passes this node ran as coordinator."),
)
# API handlers answer from memory in well under a millisecond; the top buckets catch a
# stalled event loop, and streaming routes (logs ?follow=1) land in +Inf.
HTTP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED_ROUTE = "unmatched"
ROUTES_MAX = 256             # a route table this big is a bug; past it new routes share "unmatched"
CODES_PER_ROUTE_MAX = 32     # distinct status codes counted per route; the rest count as "other"
LABEL_CACHE_MAX = 4096       # rendered label sets kept between scrapes

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Family:
    """One metric family: ``name`` without ``_total``; samples carry their full names."""
    name: str
    kind: str                                   # "gauge" | "counter" | "histogram"
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


def _num(value: Any) -> float:
    """A finite float from whatever the node reported (missing, None, bool, NaN: 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    value = float(value)
    return value if math.isfinite(value) else 0.0


_le_cache: dict[tuple[float, ...], tuple[tuple[str, str], ...]] = {}


def _le_labels(bounds: tuple[float, ...]) -> tuple[tuple[str, str], ...]:
    """("le", bound) for every bound and +Inf; the same few bucket layouts recur every scrape."""
    les = _le_cache.get(bounds)
    if les is None:
        les = tuple(("le", repr(float(b))) for b in bounds) + (("le", "+Inf"),)
        if len(_le_cache) >= LABEL_CACHE_MAX:
            _le_cache.clear()
        _le_cache[bounds] = les
    return les


class _Builder:
    """Collects families for one scrape; names get the prefix and counters ``_total``."""

    def __init__(self) -> None:
        self.families: list[Family] = []

    def gauge(self, name: str, help: str, value: Any, labels: Labels = ()) -> None:
        self.families.append(Family(PREFIX + name, "gauge", help, [(PREFIX + name, labels, _num(value))]))

    def counter(self, name: str, help: str, value: Any) -> None:
        self.families.append(Family(PREFIX + name, "counter", help, [(PREFIX + name + "_total", (), _num(value))]))

    def by_label(self, kind: str, name: str, help: str, label: str, fixed: Iterable[str],
                 values: Mapping[str, Any], keys: Mapping[str, str] | None = None,
                 extra_max: int = EXTRA_LABELS_MAX) -> None:
        """One sample per fixed label value, plus (bounded) the others ``values`` has."""
        sample = PREFIX + name + ("_total" if kind == "counter" else "")
        fam = Family(PREFIX + name, kind, help)
        fixed = tuple(fixed)
        for v in fixed:
            fam.samples.append((sample, ((label, v),), _num(values.get(keys[v] if keys else v))))
        if keys is None:
            extra = sorted(k for k in values if isinstance(k, str) and k not in fixed)[:extra_max]
            for v in extra:
                fam.samples.append((sample, ((label, v),), _num(values[v])))
        self.families.append(fam)

    def histogram(self, name: str, help: str, bounds: tuple[float, ...], counts: list[float], sum_s: float,
                  labels: Labels = ()) -> Family:
        fam = Family(PREFIX + name, "histogram", help)
        _add_histogram(fam, labels, bounds, counts, sum_s)
        self.families.append(fam)
        return fam


def _add_histogram(fam: Family, labels: Labels, bounds: tuple[float, ...], counts: list[float],
                   sum_s: float) -> None:
    """Per-bucket ``counts`` (len(bounds) + 1) as Prometheus' cumulative buckets."""
    running = 0.0
    bucket = fam.name + "_bucket"
    append = fam.samples.append
    for le, n in zip(_le_labels(bounds), counts):
        running += n
        append((bucket, (*labels, le), running))
    fam.samples.append((fam.name + "_count", labels, running))
    fam.samples.append((fam.name + "_sum", labels, sum_s))


def _node_histogram(data: Any) -> tuple[tuple[float, ...], list[float], float]:
    """The node's bucket counts if well-formed, else an empty histogram (a node bug is not a failed scrape)."""
    if isinstance(data, Mapping):
        bounds = tuple(_num(b) for b in data.get("bounds_s", ()))
        counts = [_num(c) for c in data.get("counts", ())]
        if bounds and len(counts) == len(bounds) + 1 and list(bounds) == sorted(set(bounds)):
            return bounds, counts, _num(data.get("sum_s"))
    return TASK_BUCKETS_S, [0.0] * (len(TASK_BUCKETS_S) + 1), 0.0


def node_families(status: Mapping[str, Any], gossip: Mapping[str, Any], histograms: Mapping[str, Any],
                  swim: Mapping[str, Any] | None = None) -> list[Family]:
    """Every node family from one status answer, the gossip runner's and SWIM core's counters
    and the node's histograms."""
    def part(key: str) -> Mapping[str, Any]:
        value = status.get(key)
        return value if isinstance(value, Mapping) else {}

    me, leader, raft = part("node"), part("leader"), part("raft")
    b = _Builder()
    b.gauge("node_info", "This node; always 1.", 1,
            tuple((label, str(me.get(key, ""))) for label, key in
                  (("node", "id"), ("version", "version"), ("cluster", "cluster"), ("role", "role"))))
    b.gauge("uptime_seconds", "Seconds since this node started.", me.get("uptime_s"))

    # membership and the coordinator
    b.by_label("gauge", "members", "Members this node knows, by state.", "state", MEMBER_STATES, part("members"))
    leader_id = leader.get("leader")
    b.gauge("coordinator_known", "1 when this node knows a coordinator.", 1 if leader_id else 0)
    b.gauge("is_coordinator", "1 on the coordinator.", 1 if leader_id and leader_id == me.get("id") else 0)
    b.gauge("raft_term", "The Raft term this node knows.", leader.get("term"))
    b.gauge("raft_commit_index", "The Raft commit index (0 when not a voter).", raft.get("commit_index"))
    voters = status.get("voters")
    b.gauge("raft_voters", "Voters in the Raft group as this node knows it.",
            len(voters) if isinstance(voters, (list, tuple)) else 0)
    b.gauge("raft_voter", "1 when this node runs Raft as a voter.", 1 if raft.get("running") else 0)
    b.counter("raft_fsyncs", "Raft journal fsyncs.", raft.get("fsyncs"))
    b.counter("leader_changes", "Coordinator (term, leader) changes this node observed.", raft.get("leader_changes"))

    # gossip and the wire
    b.counter("gossip_messages_received", "Gossip datagrams received.", gossip.get("received"))
    b.counter("gossip_messages_sent", "Gossip datagrams sent.", gossip.get("sent"))
    b.counter("gossip_bytes_received", "Bytes of gossip datagrams received.", gossip.get("bytes_received"))
    b.counter("gossip_bytes_sent", "Bytes of gossip datagrams sent.", gossip.get("bytes_sent"))
    b.by_label("counter", "gossip_dropped", "Gossip datagrams dropped, by reason.", "reason",
               (label for label, _ in GOSSIP_DROPS), gossip, dict(GOSSIP_DROPS))
    b.by_label("counter", "gossip_errors", "Gossip encode and send errors.", "kind",
               (label for label, _ in GOSSIP_ERRORS), gossip, dict(GOSSIP_ERRORS))
    b.counter("gossip_anti_entropy_repairs", "Records repaired by anti-entropy.",
              gossip.get("anti_entropy_repairs", status.get("anti_entropy_repairs")))
    b.by_label("counter", "swim_events", "The SWIM membership core's counters, by event.", "event", (),
               swim or {}, extra_max=SWIM_EVENTS_MAX)
    wire = part("wire")
    b.counter("wire_frames_accepted", "Frames that passed the wire codec.", wire.get("ok"))
    b.by_label("counter", "wire_frames_dropped", "Frames the wire codec refused, by reason.", "reason",
               WIRE_REASONS, {k: v for k, v in wire.items() if k != "ok"})
    b.counter("vclock_conflicts_resolved", "Concurrent updates merged by the state lattice.",
              status.get("conflicts_resolved"))

    # tasks, executor, ledger
    b.by_label("gauge", "tasks", "Tasks by state.", "state", TASK_STATES, part("tasks"))
    scheduler = part("scheduler")
    for key, help in TASK_COUNTERS:
        b.counter(f"tasks_{key}", help, scheduler.get(key))
    b.gauge("scheduler_waiting", "Pending tasks the coordinator could not place yet.", scheduler.get("waiting"))
    for name, help in TASK_HISTOGRAMS:
        b.histogram(name + "_seconds", help, *_node_histogram(histograms.get(name)))
    executor = part("executor")
    b.gauge("executor_running", "Tasks running on this node.", executor.get("running"))
    b.gauge("executor_queued", "Tasks waiting to run on this node.", executor.get("queued"))
    ledger = part("ledger")
    b.gauge("ledger_applied_seq", "The last ledger entry applied on this node.", ledger.get("applied_seq"))
    b.gauge("ledger_pending", "Ledger entries accepted here, not yet sequenced.", ledger.get("pending"))
    b.gauge("ledger_total_supply", "Tokens in existence.", ledger.get("total_supply"))
    warnings = status.get("warnings")
    b.gauge("warnings", "Warnings /v1/status shows.", len(warnings) if isinstance(warnings, (list, tuple)) else 0)
    return b.families


def to_metrics(families: Iterable[Family]) -> Iterator[Metric]:
    """The families as prometheus-client ``Metric`` objects (for the registry's own encoders)."""
    for fam in families:
        metric = Metric(fam.name, fam.help, fam.kind)
        for name, labels, value in fam.samples:
            metric.add_sample(name, dict(labels), value)
        yield metric


class NodeCollector(Collector):
    """The node's families, built at scrape time from one ``status()`` answer."""

    def __init__(self, node: Any) -> None:
        self._node = node
        self._status: Mapping[str, Any] | None = None

    @contextlib.contextmanager
    def reading(self, status: Mapping[str, Any]) -> Iterator[None]:
        """Collect from ``status`` (already awaited by the handler) instead of calling the node."""
        self._status = status
        try:
            yield
        finally:
            self._status = None

    def families(self) -> list[Family]:
        node = self._node
        status = self._status if self._status is not None else node.status()
        gossip = getattr(getattr(node, "gossip", None), "stats", None)
        swim = getattr(getattr(node, "membership", None), "stats", None)
        tasks = getattr(node, "tasks", None)
        hist_fn = getattr(node, "histograms", None) or getattr(tasks, "histograms", None)
        histograms = hist_fn() if callable(hist_fn) else None
        status = status if isinstance(status, Mapping) else {}
        if "executor" not in status and hasattr(tasks, "running_here"):
            me = getattr(node, "node_id", "")
            queued = sum(1 for t in tasks.list(state="scheduled", node=me, limit=1 << 30) if t.node == me)
            status = {**status, "executor": {"running": len(tasks.running_here()), "queued": queued}}
        return node_families(status,
                             gossip if isinstance(gossip, Mapping) else {},
                             histograms if isinstance(histograms, Mapping) else {},
                             swim if isinstance(swim, Mapping) else {})

    def collect(self) -> Iterator[Metric]:
        return to_metrics(self.families())


@dataclass(slots=True)
class _RouteStats:
    latency: Histogram
    codes: dict[str, int] = field(default_factory=dict)


class HttpMetrics(Collector):
    """Request latency and responses by route; the app's middleware feeds it."""

    def __init__(self) -> None:
        self._routes: dict[str, _RouteStats] = {}

    def _route(self, request: web.Request) -> str:
        route = request.match_info.route
        resource = route.resource if route is not None else None
        if resource is None:
            return UNMATCHED_ROUTE
        canonical = resource.canonical
        if canonical in self._routes or len(self._routes) < ROUTES_MAX:
            return canonical
        return UNMATCHED_ROUTE

    def observe(self, route: str, status: int, seconds: float) -> None:
        stats = self._routes.get(route)
        if stats is None:
            stats = self._routes[route] = _RouteStats(Histogram(HTTP_BUCKETS_S))
        stats.latency.observe(seconds)
        code = str(status)
        if code not in stats.codes and len(stats.codes) >= CODES_PER_ROUTE_MAX:
            code = "other"
        stats.codes[code] = stats.codes.get(code, 0) + 1

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:        # redirects the error middleware passes on
            status = exc.status
            raise
        finally:
            self.observe(self._route(request), status, time.perf_counter() - start)

    def families(self) -> list[Family]:
        duration = Family(PREFIX + "http_request_duration_seconds", "histogram",
                          "Server-side HTTP request latency, seconds.")
        responses = Family(PREFIX + "http_requests", "counter", "HTTP responses by route and status code.")
        for route in sorted(self._routes):
            stats = self._routes[route]
            labels = (("route", route),)
            _add_histogram(duration, labels, stats.latency.bounds_s, stats.latency.counts, stats.latency.sum_s)
            for code in sorted(stats.codes):
                responses.samples.append((responses.name + "_total", (("route", route), ("code", code)),
                                          float(stats.codes[code])))
        return [duration, responses]

    def collect(self) -> Iterator[Metric]:
        return to_metrics(self.families())


# ------------------------------------------------------------------------- text format

_label_cache: dict[Labels, str] = {}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(labels: Labels) -> str:
    text = _label_cache.get(labels)
    if text is None:
        text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""
        if len(_label_cache) >= LABEL_CACHE_MAX:
            _label_cache.clear()
        _label_cache[labels] = text
    return text


def _value_text(v: float) -> str:
    if v.is_integer() and abs(v) < 1e15:
        return f"{v:.1f}"
    if math.isfinite(v):
        return repr(v)
    return "NaN" if v != v else ("+Inf" if v > 0 else "-Inf")


def encode_text(families: Iterable[Family]) -> bytes:
    """Prometheus text format 0.0.4 (what prometheus-client's ``generate_latest`` writes)."""
    out: list[str] = []
    for fam in families:
        name = fam.name + "_total" if fam.kind == "counter" else fam.name
        out.append(f"# HELP {name} {_escape(fam.help)}\n# TYPE {name} {fam.kind}\n")
        out.extend(f"{sample}{_label_text(labels)} {_value_text(value)}\n" for sample, labels, value in fam.samples)
    return "".join(out).encode()


TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exporter:
    """The app's registry with its two collectors, and the ``/metrics`` answer."""

    def __init__(self, node: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.node = NodeCollector(node)
        self.http = HttpMetrics()
        self.registry.register(self.node)
        self.registry.register(self.http)

    def render(self, accept: str, status: Mapping[str, Any]) -> web.Response:
        with self.node.reading(status):
            if "application/openmetrics-text" in accept:
                encoder, content_type = choose_encoder(accept)
                body = encoder(self.registry)
            else:
                body, content_type = encode_text([*self.node.families(), *self.http.families()]), TEXT_CONTENT_TYPE
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
