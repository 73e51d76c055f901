"""``GET /metrics``: the node's state in Prometheus text format, read at scrape time.

Theory of operation
-------------------
Each HTTP app owns one ``CollectorRegistry`` (never prometheus-client's global one, so two
nodes in one process — tests, ``galaxy dev`` — cannot mix their numbers).  It holds two
kinds of metrics:

* ``NodeCollector`` — a custom collector with no state of its own.  Every scrape builds
  its families from one ``node.status()`` answer plus the gossip runner's counters, so a
  number on the page is exactly what the node says at that moment and nothing is
  double-booked.  Counters the node does not keep yet (task latencies, anti-entropy
  repairs, executor queues, gossip bytes) are exported as zero under their final names:
  dashboards and alerts written today keep working when the numbers arrive.
* ``HttpMetrics`` — the request-latency histogram and response counter by route, fed by
  an aiohttp middleware (``HttpMetrics.middleware``).

Invariants:

* Every label set is bounded: ``state`` and ``reason`` labels come from fixed tuples (plus
  whatever states the node itself reports), ``route`` is the route's *pattern*
  (``/v1/tasks/{id}``) or ``"unmatched"``, never a client-chosen path, and ``code`` is an
  HTTP status.  A client cannot grow the exposition by sending odd URLs.
* The names below are the contract with operators' dashboards and alerts: append only,
  never rename.  Counters end in ``_total``; times are seconds (Prometheus' base unit).
* A scrape reads the node once (``status()``), holds no lock the node uses, and does no
  I/O, so it costs about as much as ``GET /v1/status``.

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
wire_frames_accepted_total            counter  frames that passed the codec
wire_frames_dropped_total{reason}     counter  frames the codec refused, by wire.REASONS
                                               (unauthenticated, replayed, stale, ...)
vclock_conflicts_resolved_total       counter  concurrent updates merged by the lattice
tasks{state}                          gauge    tasks by state
task_schedule_latency_seconds         hist.    submit -> scheduled
task_submit_to_running_seconds        hist.    submit -> running
executor_running / executor_queued    gauge    tasks running / waiting on this node
ledger_applied_seq                    gauge    the last ledger entry applied here
ledger_pending                        gauge    entries accepted here, not yet sequenced
ledger_total_supply                   gauge    tokens in existence
warnings                              gauge    warnings /v1/status shows
http_request_duration_seconds{route}  hist.    server-side latency of every request
http_requests_total{route,code}       counter  responses by route and status code
====================================  =======  =================================================

Node interface read here (each optional part defaults to zero): ``status()`` (see
``galaxy.node.Node.status``; may be a coroutine function, the handler awaits it),
``gossip.stats`` (dict of counters; ``bytes_received``/``bytes_sent``/
``anti_entropy_repairs`` when the runner keeps them), and ``histograms()`` returning
``{"task_schedule_latency": H, "task_submit_to_running": H}`` with
``H = {"bounds_s": [..ascending..], "counts": [per bucket, len(bounds_s) + 1, the last
one above every bound], "sum_s": float}``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

# Fixed label values, so a family has the same series on every node from the start.
MEMBER_STATES = ("alive", "suspect", "dead", "left")
TASK_STATES = ("pending", "scheduled", "running", "succeeded", "failed", "timed_out", "cancelled")
WIRE_REASONS = ("too_large", "malformed", "version", "unknown_key", "unauthenticated",
                "foreign_cluster", "stale", "replayed", "unknown_type", "invalid")
GOSSIP_DROPS = (("decode", "dropped_decode"), ("type", "dropped_type"),
                ("send_buffer", "dropped_send_buffer"))
GOSSIP_ERRORS = (("encode", "encode_errors"), ("send", "send_errors"))
TASK_HISTOGRAMS = (
    ("task_schedule_latency", "Time from submit to scheduled, seconds."),
    ("task_submit_to_running", "Time from submit to running, seconds."),
)
# Task latencies span a quick LAN placement (ms) to a queue behind busy nodes (minutes).
TASK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# API handlers answer from memory in well under a millisecond; the top buckets catch a
# stalled event loop, and streaming routes (logs ?follow=1) land in +Inf.
HTTP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED_ROUTE = "unmatched"
ROUTE_LABELS_MAX = 256       # a route table this big is a bug; past it routes share one label
PREFIX = "galaxy_"


def _num(value: Any) -> float:
    """A finite float from whatever the node reported (missing, None, bool: 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    value = float(value)
    return value if math.isfinite(value) else 0.0


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=_num(value))


def _counter(name: str, doc: str, value: Any) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=_num(value))


def _by_label(family: GaugeMetricFamily | CounterMetricFamily, fixed: tuple[str, ...],
              values: Mapping[str, Any], extra_max: int = 16) -> GaugeMetricFamily | CounterMetricFamily:
    """One sample per fixed label value, plus (bounded) any others the node reports."""
    for key in fixed:
        family.add_metric([key], _num(values.get(key)))
    extra = sorted(k for k in values if k not in fixed and isinstance(k, str))
    for key in extra[:extra_max]:
        family.add_metric([key], _num(values[key]))
    return family


def _histogram(name: str, doc: str, data: Any) -> HistogramMetricFamily:
    """A histogram family from the node's bucket counts; an empty one when it has none."""
    bounds: tuple[float, ...] = TASK_BUCKETS_S
    counts: list[float] = [0.0] * (len(bounds) + 1)
    sum_s = 0.0
    if isinstance(data, Mapping):
        got_bounds = tuple(_num(b) for b in data.get("bounds_s", ()))
        got_counts = [_num(c) for c in data.get("counts", ())]
        if got_bounds and len(got_counts) == len(got_bounds) + 1 and list(got_bounds) == sorted(set(got_bounds)):
            bounds, counts, sum_s = got_bounds, got_counts, _num(data.get("sum_s"))
    buckets = []
    running = 0.0
    for bound, count in zip((*bounds, math.inf), counts):
        running += count
        buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
    return HistogramMetricFamily(PREFIX + name + "_seconds", doc, buckets=buckets, sum_value=sum_s)


class NodeCollector(Collector):
    """Builds the node's families at scrape time from one ``status()`` answer."""

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

    def collect(self) -> Iterator[Metric]:
        node = self._node
        status = self._status if self._status is not None else node.status()
        me = status.get("node") or {}
        leader = status.get("leader") or {}
        raft = status.get("raft") or {}
        gossip = getattr(getattr(node, "gossip", None), "stats", None) or {}

        info = GaugeMetricFamily(PREFIX + "node_info", "This node; always 1.",
                                 labels=["node", "version", "cluster", "role"])
        info.add_metric([str(me.get(k, "")) for k in ("id", "version", "cluster", "role")], 1.0)
        yield info
        yield _gauge("uptime_seconds", "Seconds since this node started.", me.get("uptime_s"))

        # membership and the coordinator
        yield _by_label(GaugeMetricFamily(PREFIX + "members", "Members this node knows, by state.",
                                          labels=["state"]), MEMBER_STATES, status.get("members") or {})
        yield _gauge("coordinator_known", "1 when this node knows a coordinator.",
                     1 if leader.get("leader") else 0)
        yield _gauge("is_coordinator", "1 on the coordinator.",
                     1 if leader.get("leader") and leader.get("leader") == me.get("id") else 0)
        yield _gauge("raft_term", "The Raft term this node knows.", leader.get("term"))
        yield _gauge("raft_commit_index", "The Raft commit index (0 when not a voter).", raft.get("commit_index"))
        yield _gauge("raft_voters", "Voters in the Raft group as this node knows it.", len(status.get("voters") or ()))
        yield _gauge("raft_voter", "1 when this node runs Raft as a voter.", 1 if raft.get("running") else 0)
        yield _counter("raft_fsyncs", "Raft journal fsyncs.", raft.get("fsyncs"))
        yield _counter("leader_changes", "Coordinator (term, leader) changes this node observed.",
                       raft.get("leader_changes"))

        # gossip and the wire
        yield _counter("gossip_messages_received", "Gossip datagrams received.", gossip.get("received"))
        yield _counter("gossip_messages_sent", "Gossip datagrams sent.", gossip.get("sent"))
        yield _counter("gossip_bytes_received", "Bytes of gossip datagrams received.", gossip.get("bytes_received"))
        yield _counter("gossip_bytes_sent", "Bytes of gossip datagrams sent.", gossip.get("bytes_sent"))
        drops = CounterMetricFamily(PREFIX + "gossip_dropped", "Gossip datagrams dropped, by reason.",
                                    labels=["reason"])
        for label, key in GOSSIP_DROPS:
            drops.add_metric([label], _num(gossip.get(key)))
        yield drops
        errors = CounterMetricFamily(PREFIX + "gossip_errors", "Gossip encode and send errors.", labels=["kind"])
        for label, key in GOSSIP_ERRORS:
            errors.add_metric([label], _num(gossip.get(key)))
        yield errors
        yield _counter("gossip_anti_entropy_repairs", "Records repaired by anti-entropy.",
                       gossip.get("anti_entropy_repairs", status.get("anti_entropy_repairs")))
        wire = status.get("wire") or {}
        yield _counter("wire_frames_accepted", "Frames that passed the wire codec.", wire.get("ok"))
        yield _by_label(CounterMetricFamily(PREFIX + "wire_frames_dropped",
                                            "Frames the wire codec refused, by reason.", labels=["reason"]),
                        WIRE_REASONS, {k: v for k, v in wire.items() if k != "ok"})
        yield _counter("vclock_conflicts_resolved", "Concurrent updates merged by the state lattice.",
                       status.get("conflicts_resolved"))

        # tasks, executor, ledger
        yield _by_label(GaugeMetricFamily(PREFIX + "tasks", "Tasks by state.", labels=["state"]),
                        TASK_STATES, status.get("tasks") or {})
        hist_fn = getattr(node, "histograms", None)
        histograms = hist_fn() if callable(hist_fn) else {}
        for name, doc in TASK_HISTOGRAMS:
            yield _histogram(name, doc, histograms.get(name) if isinstance(histograms, Mapping) else None)
        executor = status.get("executor") or {}
        yield _gauge("executor_running", "Tasks running on this node.", executor.get("running"))
        yield _gauge("executor_queued", "Tasks waiting to run on this node.", executor.get("queued"))
        ledger = status.get("ledger") or {}
        yield _gauge("ledger_applied_seq", "The last ledger entry applied on this node.", ledger.get("applied_seq"))
        yield _gauge("ledger_pending", "Ledger entries accepted here, not yet sequenced.", ledger.get("pending"))
        yield _gauge("ledger_total_supply", "Tokens in existence.", ledger.get("total_supply"))
        yield _gauge("warnings", "Warnings /v1/status shows.", len(status.get("warnings") or ()))


class HttpMetrics:
    """Request latency and response counts by route, in a registry of the app's own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(PREFIX + "http_request_duration_seconds",
                                  "Server-side HTTP request latency, seconds.", ["route"],
                                  buckets=HTTP_BUCKETS_S, registry=registry)
        self.responses = Counter(PREFIX + "http_requests", "HTTP responses by route and status code.",
                                 ["route", "code"], registry=registry)
        # labels() takes a lock and hashes a tuple; a dict per route keeps the hot path lean
        self._children: dict[str, Any] = {}

    def _route(self, request: web.Request) -> str:
        route = request.match_info.route
        resource = route.resource if route is not None else None
        if resource is None:
            return UNMATCHED_ROUTE
        canonical = resource.canonical
        if canonical in self._children or len(self._children) < ROUTE_LABELS_MAX:
            return canonical
        return UNMATCHED_ROUTE

    def observe(self, route: str, status: int, seconds: float) -> None:
        child = self._children.get(route)
        if child is None:
            child = self._children[route] = self.duration.labels(route)
        child.observe(seconds)
        self.responses.labels(route, str(status)).inc()

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


def render(request: web.Request, registry: CollectorRegistry, collector: NodeCollector,
                 status: Mapping[str, Any]) -> web.Response:
    """The exposition for ``registry``, in the format the scraper asked for."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    with collector.reading(status):
        body = encoder(registry)
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
