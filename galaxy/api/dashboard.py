"""``GET /``: the operator dashboard, one self-contained page served by every node.

Theory of operation
-------------------
The page is a Python string (HTML, CSS and JavaScript inline), so ``pip install .`` ships
it with no package data, there is no build step, and nothing is fetched from outside: no
CDN, no web font, no image (the favicon is an empty ``data:`` URL so the browser does not
ask for ``/favicon.ico``).  A Content-Security-Policy holding the hashes of the inline
script and style enforces that: the browser refuses any other script, style or
connection than the node's own API.

The script polls ``v1/status``, ``v1/members`` and ``v1/leader`` (and ``v1/tasks``, filtered
by the state the operator picked, once the node reports tasks) every ``POLL_MS`` with URLs
relative to the page, so it works against any node, also behind a reverse proxy under a
path prefix.  Clicking a task (or opening ``/#t-…``) shows its attempts and follows its
log: every ``LOG_POLL_MS`` the page asks ``v1/tasks/ID/logs?stream=S&attempt=N&offset=B``
for the bytes after the ``B`` it already has and appends them (a ``TextDecoder`` in stream
mode, so a character split between two answers is not garbled); it follows the newest
attempt unless the operator picked another, stops asking once the attempt has ended and
a read came back empty, and keeps at most ``LOG_CHARS_MAX`` characters.  The node that
serves the page forwards the read to the node that ran the attempt.  A running task's
cancel button needs two taps (the first only arms it for a few seconds).  It pauses while the
tab is hidden (phones), shows "unreachable" instead of stale numbers when the node stops
answering, and keeps the last ``HISTORY_MAX`` coordinator changes it saw — or shows the
node's own ``leader_history`` from ``/v1/status`` when the node reports one.  Every value
from the network reaches the DOM through ``textContent``, never as markup.

Sign-in: reads are open unless the cluster setting ``anonymous_read`` is false; every change
(cancel) needs a bearer token.  When a call answers 401 the page shows a small sign-in form
(name and password, ``POST v1/auth/token``); the token is kept in ``sessionStorage`` (gone
when the tab closes, never in a cookie, so no other site can ride on it) and sent as
``Authorization: Bearer`` with every call.  A token the node refuses is forgotten and the
form shown again; "sign out" forgets it at once.  The form never submits itself (CSP
``form-action 'none'``): the script posts the JSON.

``GET /`` negotiates: a browser (``Accept`` preferring ``text/html``) gets the page; an
API client (``curl``, ``*/*``, ``application/json``) gets a JSON index of the routes, so
every answer an API client sees is still JSON.

Test hooks (stable ids, used by tests/proc/test_dashboard.py): ``#leader-id``, ``#term``,
``#conn`` (``data-state`` = ``live`` | ``stale``), ``#members tbody tr[data-id]`` with
``data-state``, ``#member-count``; ``#tasks tbody tr[data-id]`` with ``data-state`` (cells
``td[data-label=…]``, ``.bar > span`` width and ``.pct``), ``#task-filter``, ``#tasks-empty``,
``#task-detail`` with ``#detail-id``, ``#detail-state``, ``#attempts``, ``#cancel-task``,
``#tab-stdout``/``#tab-stderr``, ``#log-stdout``/``#log-stderr`` and ``#log-note``; ``#signin``
(shown when a sign-in is needed) with ``#signin-form``, ``#signin-name``, ``#signin-password``,
``#signin-note``; ``#whoami`` and ``#signout``.
"""

from __future__ import annotations

import base64
import hashlib

from aiohttp import web

from galaxy.api.errors import check_query

POLL_MS = 1000        # one poll a second: live enough to watch a failover, negligible load
HISTORY_MAX = 20      # coordinator changes the page remembers
LOG_POLL_MS = 500     # a followed log: new lines within half a second, two small requests a second
LOG_CHARS_MAX = 200_000   # characters of one log the page keeps; past it the older half goes
TASKS_SHOWN_MAX = 100     # rows of the task table (newest first); the filter finds the others

_STYLE = """
:root { --bg:#f6f7f9; --fg:#1c2026; --muted:#667085; --card:#fff; --line:#e3e6ea;
        --ok:#14804a; --warn:#b45309; --bad:#c0262d; --off:#8a8f98; --accent:#3056d3; }
@media (prefers-color-scheme: dark) {
  :root { --bg:#111418; --fg:#e7e9ec; --muted:#98a2b3; --card:#1a1e24; --line:#2b313a;
          --ok:#4ade80; --warn:#fbbf24; --bad:#f87171; --off:#8a8f98; --accent:#7aa2ff; }
}
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       background:var(--bg); color:var(--fg); }
header { display:flex; flex-wrap:wrap; gap:.5rem 1rem; align-items:baseline; padding:.75rem 1rem;
         border-bottom:1px solid var(--line); background:var(--card); position:sticky; top:0; z-index:1; }
header h1 { font-size:1.1rem; margin:0; }
header .sub { color:var(--muted); }
#conn { margin-left:auto; font-size:.85rem; }
#conn::before { content:""; display:inline-block; width:.6rem; height:.6rem; border-radius:50%;
                margin-right:.35rem; background:var(--off); }
#conn[data-state=live]::before { background:var(--ok); }
#conn[data-state=stale]::before { background:var(--bad); }
main { padding:1rem; max-width:1200px; margin:0 auto; display:grid; gap:1rem; }
.cards { display:grid; gap:1rem; grid-template-columns:repeat(auto-fit, minmax(180px, 1fr)); }
.card, section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:.75rem 1rem; }
.card h2, section h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.04em; color:var(--muted);
                       margin:0 0 .35rem; }
.big { font-size:1.35rem; font-weight:600; word-break:break-all; }
.muted { color:var(--muted); }
#warnings { display:none; border-left:4px solid var(--warn); }
#warnings.on { display:block; }
#warnings ul { margin:.25rem 0 0; padding-left:1.2rem; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:.4rem .5rem; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-size:.75rem; color:var(--muted); font-weight:600; }
.scroll { overflow-x:auto; }
.badge { display:inline-block; padding:0 .45rem; border-radius:999px; font-size:.78rem; border:1px solid; }
.s-alive, .s-succeeded, .s-running { color:var(--ok); }
.s-suspect, .s-pending, .s-scheduled { color:var(--warn); }
.s-dead, .s-failed, .s-timed_out { color:var(--bad); }
.s-left, .s-cancelled { color:var(--off); }
.star { color:var(--accent); font-weight:700; }
tr.dim td { opacity:.65; }
.bar { height:.5rem; background:var(--line); border-radius:4px; overflow:hidden; min-width:80px; }
.bar > span { display:block; height:100%; background:var(--accent); }
.empty { color:var(--muted); padding:.75rem 0; }
ol.history { margin:0; padding-left:1.2rem; }
dl.kv { display:grid; grid-template-columns:max-content 1fr; gap:.15rem .75rem; margin:0; }
dl.kv dt { color:var(--muted); }
dl.kv dd { margin:0; word-break:break-all; }
footer { padding:1rem; text-align:center; color:var(--muted); font-size:.8rem; }
.head { display:flex; flex-wrap:wrap; align-items:center; gap:.5rem 1rem; margin-bottom:.35rem; }
.head h2 { margin:0; }
.head .grow { margin-left:auto; }
select, button { font:inherit; color:inherit; background:var(--bg); border:1px solid var(--line);
                 border-radius:6px; padding:.3rem .6rem; }
button { cursor:pointer; }
button:disabled { opacity:.5; cursor:default; }
button.danger { color:var(--bad); border-color:var(--bad); }
#tasks tbody tr { cursor:pointer; }
#tasks tbody tr:hover td, #tasks tbody tr:focus td { background:var(--bg); }
#tasks tbody tr.sel td { background:var(--bg); box-shadow:inset 0 -2px 0 var(--accent); }
.prog { display:flex; align-items:center; gap:.4rem; }
.prog .bar { flex:1; }
.pct { font-variant-numeric:tabular-nums; min-width:2.6rem; text-align:right; color:var(--muted); }
#task-detail { scroll-margin-top:4.5rem; }     /* clear of the sticky header when scrolled to */
#detail-id { text-transform:none; letter-spacing:0; color:var(--fg); }
#tasks td[data-label=id] { white-space:nowrap; }
.cmd { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:.82rem; word-break:break-all; }
.tabs { display:flex; gap:.25rem; margin:.75rem 0 0; }
.tabs button[aria-selected=true] { border-color:var(--accent); color:var(--accent); font-weight:600; }
pre.log { margin:.35rem 0 0; padding:.5rem; background:var(--bg); border:1px solid var(--line); border-radius:6px;
          max-height:55vh; min-height:4rem; overflow:auto; white-space:pre-wrap; word-break:break-all;
          font:.8rem/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
#attempts tbody tr { cursor:pointer; }
#attempts tbody tr.sel td { background:var(--bg); }
footer a { color:inherit; }
#signin { border-left:4px solid var(--accent); scroll-margin-top:4.5rem; }
#signin form { display:flex; flex-wrap:wrap; gap:.5rem; align-items:center; }
#signin input { font:inherit; color:inherit; background:var(--bg); border:1px solid var(--line);
                border-radius:6px; padding:.3rem .5rem; min-width:0; }
#signin-note { color:var(--bad); }
#whoami { font-size:.85rem; }
#signout { font-size:.8rem; padding:.1rem .5rem; }
@media (max-width: 700px) {
  main { padding:.5rem; gap:.5rem; }
  .cards { grid-template-columns:1fr 1fr; gap:.5rem; }
  table.rwd thead { display:none; }
  table.rwd tr { display:block; border-bottom:1px solid var(--line); padding:.35rem 0; }
  table.rwd td { display:flex; justify-content:space-between; gap:1rem; border:0; padding:.15rem 0; }
  table.rwd td::before { content:attr(data-label); color:var(--muted); font-size:.75rem; }
  table.rwd td > * { min-width:0; text-align:right; }
  .prog { flex:1; max-width:60%; }
  pre.log { max-height:45vh; }
}
"""

_SCRIPT = """
"use strict";
const POLL_MS = %(poll_ms)d, HISTORY_MAX = %(history_max)d, LOG_POLL_MS = %(log_poll_ms)d;
const LOG_CHARS_MAX = %(log_chars_max)d, TASKS_SHOWN_MAX = %(tasks_shown_max)d, CMD_CHARS_SHOWN = 120, CONFIRM_MS = 4000,
      LOG_RETRY_MS = 5000;
const TASK_STATES = ["pending", "scheduled", "running", "succeeded", "failed", "timed_out", "cancelled"];
const LIVE_STATES = ["pending", "scheduled", "running"], STREAMS = ["stdout", "stderr"];
const TASK_ID = /^t-[0-9a-f]{16}$/;
const seen = { history: [], last: null, timer: null, inflight: false, again: false, okAt: 0, skewMs: 0,
               filter: "", selected: null, task: null, armTimer: null };
const logs = { attempt: 0, pinned: false, tab: "stdout", timer: null, inflight: false, streams: {} };

function $(id) { return document.getElementById(id); }
function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "cls") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const kid of kids) node.append(kid);
  return node;
}
function cell(label, ...kids) { return el("td", { "data-label": label }, ...kids); }
function badge(state) { return el("span", { cls: "badge s-" + state, text: String(state) }); }
function fmtNum(x, digits) {
  if (typeof x !== "number" || !isFinite(x)) return "–";
  return Number.isInteger(x) ? String(x) : x.toFixed(digits === undefined ? 1 : digits);
}
function fmtMem(mb) {
  if (typeof mb !== "number") return "–";
  return mb >= 1024 ? (mb / 1024).toFixed(1) + " GiB" : Math.round(mb) + " MiB";
}
function fmtAgo(s) {
  if (typeof s !== "number") return "–";
  if (s < 1) return "now";
  if (s < 120) return Math.round(s) + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}
function fmtTime(ms) { return new Date(ms).toLocaleTimeString(); }
function setText(id, text) { const n = $(id); if (n.textContent !== text) n.textContent = text; }

// ---- sign-in: a bearer token in sessionStorage, sent with every call
const TOKEN_KEY = "galaxy_token", ACCOUNT_KEY = "galaxy_account";
function stored(k) { try { return sessionStorage.getItem(k); } catch (e) { return null; } }
function store(k, v) {
  try { if (v === null) sessionStorage.removeItem(k); else sessionStorage.setItem(k, v); } catch (e) { /* private mode */ }
}
function headers(extra) {
  const h = Object.assign({ "Accept": "application/json" }, extra || {});
  const t = stored(TOKEN_KEY);
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}
function renderWho() {
  const who = stored(ACCOUNT_KEY);
  setText("whoami", who ? "signed in as " + who : "");
  $("signout").hidden = !who;
}
// A 401: the token (if any) is no good; forget it and ask for a sign-in.  The node's own
// message is shown only for a token it refused (expired, revoked): the rest is for the CLI.
function needSignIn(what, why) {
  const had = !!stored(TOKEN_KEY);
  if (had) { store(TOKEN_KEY, null); store(ACCOUNT_KEY, null); renderWho(); }
  setText("signin-why", had && why ? what + " (" + why + ")" : what);
  if ($("signin").hidden) {                // newly shown: bring it into view, ready to type
    $("signin").hidden = false;
    $("signin").scrollIntoView({ block: "nearest" });
    $("signin-name").focus();
  }
}
async function readError(r) {
  try { const b = await r.json(); if (b && b.message) return String(b.message); } catch (e) { /* not JSON */ }
  return "HTTP " + r.status;
}
async function onSignIn(e) {
  e.preventDefault();                      // never a form submission: CSP allows none
  const name = $("signin-name").value.trim(), password = $("signin-password").value;
  setText("signin-note", "");
  $("signin-submit").disabled = true;
  try {
    const r = await fetch("v1/auth/token", { method: "POST", cache: "no-store",
      headers: { "Accept": "application/json", "Content-Type": "application/json" },
      body: JSON.stringify({ name: name, password: password }) });
    if (!r.ok) { setText("signin-note", await readError(r)); return; }
    const b = await r.json();
    store(TOKEN_KEY, String(b.token));
    store(ACCOUNT_KEY, String(b.account || name));
    $("signin-password").value = "";
    $("signin").hidden = true;
    renderWho();
    poll();
  } catch (err) {
    setText("signin-note", err && err.message ? err.message : "no answer");
  } finally {
    $("signin-submit").disabled = false;
  }
}
function signOut() {
  store(TOKEN_KEY, null);
  store(ACCOUNT_KEY, null);
  renderWho();
  poll();
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store", headers: headers() });
  if (r.status === 401) {
    needSignIn("this mesh shows its state to signed-in accounts only", await readError(r));
    throw new Error("sign in to see this mesh");
  }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function renderHeader(status) {
  const me = status.node || {};
  setText("node-id", me.id || "?");
  setText("cluster", me.cluster ? "cluster " + me.cluster : "");
  setText("version", "galaxy " + (me.version || "?"));
  document.title = "Galaxy · " + (me.cluster || "") + " · " + (me.id || "");
}

function renderLeader(leader, status) {
  setText("leader-id", leader.leader || "none");
  setText("term", "term " + fmtNum(leader.term));
  const voters = status.voters || [];
  setText("voters", voters.length ? voters.join(", ") : "none");
  const raft = status.raft || {};
  setText("commit", "commit index " + fmtNum(raft.commit_index));
  // Our own history: a change of (leader, term) as this page saw it.
  const key = (leader.leader || "") + "@" + leader.term;
  if (leader.leader && key !== seen.last) {
    seen.last = key;
    seen.history.unshift({ leader: leader.leader, term: leader.term, at_ms: Date.now() });
    seen.history.length = Math.min(seen.history.length, HISTORY_MAX);
  }
  const fromNode = Array.isArray(status.leader_history) ? status.leader_history.slice(-HISTORY_MAX).reverse() : null;
  const items = fromNode || seen.history;
  const list = $("leader-history");
  list.replaceChildren(...items.map((h) => el("li", {},
    el("strong", { text: String(h.leader) }), " term " + fmtNum(h.term),
    el("span", { cls: "muted", text: typeof h.at_ms === "number" ? " · " + fmtTime(h.at_ms) : "" }))));
  setText("history-src", fromNode ? "as the node recorded them" : "seen by this page since it opened");
}

function renderWarnings(status) {
  const w = Array.isArray(status.warnings) ? status.warnings : [];
  $("warnings").classList.toggle("on", w.length > 0);
  $("warning-list").replaceChildren(...w.map((t) => el("li", { text: String(t) })));
}

function renderMembers(members, status, leader) {
  const counts = status.members || {};
  const parts = Object.entries(counts).filter(([, n]) => n).map(([s, n]) => n + " " + s);
  setText("member-count", String(members.length));
  setText("member-states", parts.join(" · ") || "none");
  const me = (status.node || {}).id;
  const rows = members.slice().sort((a, b) => String(a.id).localeCompare(String(b.id))).map((m) => {
    const res = m.resources || {}, free = res.free || {};
    const idCell = cell("id", el("span", { text: String(m.id) }));
    if (m.id === leader.leader) idCell.append(" ", el("span", { cls: "star", text: "★ coordinator", title: "coordinator" }));
    if (m.id === me) idCell.append(" ", el("span", { cls: "muted", text: "(this node)" }));
    return el("tr", { "data-id": String(m.id), "data-state": String(m.state), cls: m.state === "alive" ? "" : "dim" },
      idCell,
      cell("state", badge(m.state)),
      cell("role", el("span", { text: String(m.role) + (m.voter ? " · voter" : "") })),
      // a member that stopped answering keeps its last gossiped Raft role: say it is old news
      cell("raft", el("span", { text: !m.raft_state || m.raft_state === "none" ? "–" :
        (m.state === "alive" ? "" : "was ") + String(m.raft_state) })),
      cell("cpu", el("span", { text: fmtNum(free.cpu) + " / " + fmtNum(res.cpu) })),
      cell("memory", el("span", { text: fmtMem(free.memory_mb) + " / " + fmtMem(res.memory_mb) })),
      cell("gpu", el("span", { text: fmtNum(free.gpu, 0) + " / " + fmtNum(res.gpu, 0) })),
      cell("trust", el("span", { text: String(m.trust || "–") })),
      cell("heard", el("span", { text: m.id === me ? "–" : fmtAgo(m.last_heard) })),
      cell("address", el("span", { text: String(m.addr || "") })));
  });
  $("members").tBodies[0].replaceChildren(...rows);
}

function taskNode(t) {
  if (t.node) return String(t.node);
  const a = Array.isArray(t.attempts) && t.attempts.length ? t.attempts[t.attempts.length - 1] : null;
  return a && a.node ? String(a.node) : "–";
}
function commandText(c) {
  if (Array.isArray(c)) {
    return c.map((x) => /^[A-Za-z0-9_@%%+=:,./-]+$/.test(String(x)) ? String(x) : JSON.stringify(String(x))).join(" ");
  }
  return c === undefined || c === null ? "" : String(c);
}
function progressCell(t) {
  const p = typeof t.progress === "number" && isFinite(t.progress) ? Math.max(0, Math.min(100, t.progress)) : null;
  const bar = el("div", { cls: "bar", title: p === null ? "no progress reported" : Math.round(p) + "%%" },
                 el("span", {}));
  bar.firstChild.style.width = (p === null ? 0 : p) + "%%";
  return el("div", { cls: "prog" }, bar, el("span", { cls: "pct", text: p === null ? "–" : Math.round(p) + "%%" }));
}
function fmtExit(code) { return code === null || code === undefined ? "–" : String(code); }
function fmtSec(s) { return typeof s === "number" && s > 0 ? fmtTime(s * 1000) : "–"; }
function stateBadge(t) {
  const b = badge(t.state);
  const cancelling = t.cancel_requested && LIVE_STATES.includes(t.state);
  return cancelling ? el("span", {}, b, el("span", { cls: "muted", text: " cancelling" })) : b;
}

function renderFilter(counts) {
  const sel = $("task-filter");
  if (sel.options.length === 1) for (const s of TASK_STATES) sel.append(el("option", { value: s, text: s }));
  for (const opt of sel.options) {
    if (!opt.value) continue;
    const text = opt.value + " (" + (typeof counts[opt.value] === "number" ? counts[opt.value] : 0) + ")";
    if (opt.textContent !== text) opt.textContent = text;
  }
}

function renderTasks(status, tasks) {
  const counts = status.tasks || {};
  const total = Object.values(counts).reduce((a, n) => a + (typeof n === "number" ? n : 0), 0);
  setText("task-total", String(total));
  setText("task-states", TASK_STATES.filter((s) => counts[s]).map((s) => counts[s] + " " + s).join(" · ") || "none yet");
  renderFilter(counts);
  const body = $("tasks").tBodies[0];
  if (!tasks || !tasks.length) {
    body.replaceChildren();
    $("tasks-empty").hidden = false;
    $("tasks-empty").textContent = !total ? "No tasks yet. Submit one with: galaxy submit -- python -c 'print(42)'" :
      tasks === null ? "tasks exist; this node does not list them yet" : "No " + seen.filter + " tasks.";
    return;
  }
  $("tasks-empty").hidden = true;
  const now = Date.now() + seen.skewMs;       // ages by the node's clock, not the phone's
  body.replaceChildren(...tasks.slice(0, TASKS_SHOWN_MAX).map((t) => {
    const cmd = commandText(t.command);
    return el("tr", { "data-id": String(t.id), "data-state": String(t.state), tabIndex: 0,
                      cls: t.id === seen.selected ? "sel" : "" },
      cell("id", el("span", { text: String(t.id) })),
      cell("state", stateBadge(t)),
      cell("node", el("span", { text: taskNode(t) })),
      cell("attempt", el("span", { text: fmtNum(t.attempt) +
        (typeof t.max_retries === "number" ? " of " + (t.max_retries + 1) : "") })),
      cell("progress", progressCell(t)),
      cell("exit", el("span", { text: fmtExit(t.exit_code) })),
      cell("owner", el("span", { text: String(t.owner || "–") })),
      cell("submitted", el("span", { text: typeof t.submitted_ms === "number" ?
        fmtAgo(Math.max(0, now - t.submitted_ms) / 1000) : "–" })),
      cell("command", el("span", { cls: "cmd", title: cmd, text: cmd.length > CMD_CHARS_SHOWN ?
        cmd.slice(0, CMD_CHARS_SHOWN - 1) + "…" : cmd })));
  }));
}

// ---- one task: attempts, live logs, cancel
function select(id) {
  if (!TASK_ID.test(id)) return;
  if (id !== seen.selected) {
    seen.selected = id;
    seen.task = null;
    setLogAttempt(0, false);
    for (const n of ["detail-state", "detail-node", "detail-command", "detail-reason"]) setText(n, "");
    $("attempts").tBodies[0].replaceChildren();
    $("cancel-task").hidden = true;
  }
  history.replaceState(null, "", "#" + id);
  for (const tr of $("tasks").tBodies[0].rows) tr.classList.toggle("sel", tr.dataset.id === id);
  setText("detail-id", id);
  $("task-detail").hidden = false;
  refreshDetail().then(pollLogs);
  scheduleLogs();
  $("task-detail").scrollIntoView({ block: "nearest" });
}

function closeDetail() {
  seen.selected = null;
  seen.task = null;
  setLogAttempt(0, false);
  $("task-detail").hidden = true;
  history.replaceState(null, "", location.pathname + location.search);
  for (const tr of $("tasks").tBodies[0].rows) tr.classList.remove("sel");
  scheduleLogs();
}

async function refreshDetail() {
  const id = seen.selected;
  if (!id) return;
  let t;
  try {
    t = await getJSON("v1/tasks/" + encodeURIComponent(id));
  } catch (e) {
    if (id === seen.selected) setText("log-note", e && e.message ? e.message : "no answer");
    return;
  }
  if (id === seen.selected) renderDetail(t);
}

function renderDetail(t) {
  seen.task = t;
  $("detail-state").replaceChildren(stateBadge(t));
  const node = taskNode(t);
  setText("detail-node", node === "–" ? "" : "on " + node);
  setText("detail-command", commandText(t.command));
  setText("detail-reason", t.reason ? String(t.reason) : "");
  const attempts = Array.isArray(t.attempts) ? t.attempts : [];
  // follow the newest attempt (a retry starts a new log) unless the user picked an older one
  if (!logs.pinned && logs.attempt !== attempts.length) setLogAttempt(attempts.length, false);
  $("attempts").tBodies[0].replaceChildren(...attempts.map((a) => el("tr",
    { "data-attempt": String(a.attempt), cls: a.attempt === logs.attempt ? "sel" : "", tabIndex: 0 },
    cell("attempt", el("span", { text: fmtNum(a.attempt) })),
    cell("node", el("span", { text: String(a.node || "–") })),
    cell("state", badge(a.state)),
    cell("term", el("span", { text: fmtNum(a.term) })),
    cell("started", el("span", { text: fmtSec(a.started_at) })),
    cell("ended", el("span", { text: fmtSec(a.ended_at) })),
    cell("exit", el("span", { text: fmtExit(a.exit_code) })),
    cell("reason", el("span", { text: String(a.reason || "") })))));
  const btn = $("cancel-task");
  const cancellable = LIVE_STATES.includes(t.state) && !t.cancel_requested;
  if (!cancellable) disarm(btn);
  btn.hidden = !cancellable;
}

function newStream() { return { offset: 0, chars: 0, decoder: new TextDecoder("utf-8"), done: false, retryAt: 0 }; }

function setLogAttempt(n, pinned) {
  logs.attempt = n;
  logs.pinned = pinned;
  logs.streams = { stdout: newStream(), stderr: newStream() };
  for (const s of STREAMS) $("log-" + s).replaceChildren();
  setText("log-note", n ? "" : "not started yet");
  for (const tr of $("attempts").tBodies[0].rows) tr.classList.toggle("sel", Number(tr.dataset.attempt) === n);
}

function showTab(stream) {
  logs.tab = stream;
  for (const s of STREAMS) {
    $("tab-" + s).setAttribute("aria-selected", String(s === stream));
    $("log-" + s).hidden = s !== stream;
  }
  pollLogs();
}

function attemptEnded(n) {
  const t = seen.task;
  const a = t && t.id === seen.selected && Array.isArray(t.attempts) ? t.attempts[n - 1] : null;
  return !!a && a.state !== "scheduled" && a.state !== "running";
}

function appendLog(pre, st, text) {
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
  pre.append(text);                        // a text node: output is never parsed as markup
  st.chars += text.length;
  if (st.chars > LOG_CHARS_MAX) {          // keep the newest half: a chatty task must not eat the phone's memory
    pre.textContent = "…" + pre.textContent.slice(-Math.floor(LOG_CHARS_MAX / 2));
    st.chars = pre.textContent.length;
  }
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

async function pollLogs() {
  const id = seen.selected, n = logs.attempt, stream = logs.tab, st = logs.streams[stream];
  if (!id || !n || st.done || logs.inflight || Date.now() < st.retryAt) return;
  const ended = attemptEnded(n);           // read before the fetch: what it returns then is all there is
  logs.inflight = true;
  try {
    const r = await fetch("v1/tasks/" + encodeURIComponent(id) + "/logs?stream=" + stream + "&attempt=" + n +
                          "&offset=" + st.offset, { cache: "no-store", headers: headers() });
    if (st !== logs.streams[stream] || id !== seen.selected) return;    // the user moved on meanwhile
    if (!r.ok) {
      const why = await readError(r);
      if (r.status === 401) needSignIn("sign in to read task logs", why);
      setText("log-note", why);
      st.retryAt = Date.now() + LOG_RETRY_MS;      // e.g. the node that ran it is down: ask again later
      return;
    }
    const buf = await r.arrayBuffer();
    if (st !== logs.streams[stream]) return;
    st.offset += buf.byteLength;
    // stream: a character split between two reads waits for its other bytes
    const text = st.decoder.decode(new Uint8Array(buf), { stream: true });
    if (text) appendLog($("log-" + stream), st, text);
    if (ended && !buf.byteLength) st.done = true;
    setText("log-note", st.done ? (st.offset ? "end of " + stream : "no " + stream + " output") :
      st.offset ? "live" : "waiting for output…");
  } catch (e) {
    setText("log-note", e && e.message ? e.message : "no answer");
  } finally {
    logs.inflight = false;
  }
}

function scheduleLogs() {
  clearInterval(logs.timer);
  logs.timer = null;
  if (!document.hidden && seen.selected) logs.timer = setInterval(pollLogs, LOG_POLL_MS);
}

function disarm(btn) {
  clearTimeout(seen.armTimer);
  delete btn.dataset.armed;
  btn.textContent = "cancel";
}

async function onCancel() {
  const btn = $("cancel-task"), id = seen.selected;
  if (!id) return;
  if (btn.dataset.armed !== "1") {         // a second tap confirms: a stray tap on a phone cancels nothing
    btn.dataset.armed = "1";
    btn.textContent = "tap again to cancel";
    seen.armTimer = setTimeout(() => disarm(btn), CONFIRM_MS);
    return;
  }
  disarm(btn);
  btn.disabled = true;
  try {
    const r = await fetch("v1/tasks/" + encodeURIComponent(id) + "/cancel",
                          { method: "POST", cache: "no-store", headers: headers() });
    let body = {};
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    if (r.status === 401) {
      needSignIn("sign in to cancel tasks", String(body.message || ""));
      setText("log-note", "sign in (above) to cancel");
    } else {
      setText("log-note", r.ok ? "cancel requested" : "cancel refused: " + String(body.message || "HTTP " + r.status));
    }
    if (r.ok && id === seen.selected && body && body.id === id) renderDetail(body);
  } catch (e) {
    setText("log-note", "cancel failed: " + (e && e.message ? e.message : "no answer"));
  } finally {
    btn.disabled = false;
  }
}

function renderLedger(status) {
  const l = status.ledger || {};
  const dl = $("ledger");
  const rows = [["applied seq", fmtNum(l.applied_seq)], ["total supply", fmtNum(l.total_supply)],
                ["pending", fmtNum(l.pending)], ["hash", l.hash ? String(l.hash).slice(0, 16) : "–"],
                ["conflicts resolved", fmtNum(status.conflicts_resolved)]];
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
}

function setConn(live, why) {
  const c = $("conn");
  c.dataset.state = live ? "live" : "stale";
  c.textContent = live ? "live · " + fmtTime(Date.now()) :
    "unreachable since " + fmtTime(seen.okAt || Date.now()) + (why ? " (" + why + ")" : "");
}

async function poll() {
  if (seen.inflight) { seen.again = true; return; }
  seen.inflight = true;
  try {
    const [status, members, leader] = await Promise.all(
      [getJSON("v1/status"), getJSON("v1/members"), getJSON("v1/leader")]);
    const me = status.node || {};
    if (typeof me.wall_ms === "number") seen.skewMs = me.wall_ms - Date.now();
    const total = Object.values(status.tasks || {}).reduce((a, n) => a + (typeof n === "number" ? n : 0), 0);
    let tasks = null;
    if (total > 0) {
      try {
        const doc = await getJSON("v1/tasks?limit=" + TASKS_SHOWN_MAX +
                                  (seen.filter ? "&state=" + encodeURIComponent(seen.filter) : ""));
        tasks = Array.isArray(doc) ? doc : doc.tasks;
      } catch (e) { tasks = null; }
    }
    if (seen.selected) await refreshDetail();
    renderHeader(status);
    renderWarnings(status);
    renderLeader(leader, status);
    renderMembers(members.members || [], status, leader);
    renderTasks(status, tasks);
    renderLedger(status);
    seen.okAt = Date.now();
    setConn(true);
  } catch (e) {
    setConn(false, e && e.message ? e.message : "no answer");
  } finally {
    seen.inflight = false;
    if (seen.again) { seen.again = false; poll(); }     // the filter changed while this poll ran
  }
}

function schedule() {
  clearInterval(seen.timer);
  seen.timer = null;
  if (!document.hidden) {
    poll();
    seen.timer = setInterval(poll, POLL_MS);
  }
}
function onRow(e, attr, act) {
  if (e.type === "keydown" && e.key !== "Enter" && e.key !== " ") return;
  const tr = e.target.closest("tr[" + attr + "]");
  if (!tr) return;
  if (e.type === "keydown") e.preventDefault();
  act(tr);
}
for (const type of ["click", "keydown"]) {
  $("tasks").tBodies[0].addEventListener(type, (e) => onRow(e, "data-id", (tr) => select(tr.dataset.id)));
  $("attempts").tBodies[0].addEventListener(type, (e) => onRow(e, "data-attempt", (tr) => {
    const n = Number(tr.dataset.attempt), last = seen.task && Array.isArray(seen.task.attempts) ?
      seen.task.attempts.length : n;
    if (n !== logs.attempt) { setLogAttempt(n, n !== last); pollLogs(); }
  }));
}
$("task-filter").addEventListener("change", (e) => { seen.filter = e.target.value; poll(); });
$("close-detail").addEventListener("click", closeDetail);
$("cancel-task").addEventListener("click", onCancel);
$("signin-form").addEventListener("submit", onSignIn);
$("signout").addEventListener("click", signOut);
renderWho();
for (const s of STREAMS) $("tab-" + s).addEventListener("click", () => showTab(s));
document.addEventListener("visibilitychange", () => { schedule(); scheduleLogs(); });
setLogAttempt(0, false);
schedule();
if (TASK_ID.test(location.hash.slice(1))) select(location.hash.slice(1));
""" % {"poll_ms": POLL_MS, "history_max": HISTORY_MAX, "log_poll_ms": LOG_POLL_MS, "log_chars_max": LOG_CHARS_MAX,
       "tasks_shown_max": TASKS_SHOWN_MAX}

_BODY = """
<header>
  <h1>Galaxy</h1><span class="sub" id="cluster"></span>
  <span class="sub">node <strong id="node-id">…</strong></span>
  <span id="conn" data-state="connecting">connecting…</span>
  <span class="sub" id="whoami"></span><button id="signout" type="button" hidden>sign out</button>
</header>
<main>
  <section id="signin" hidden><h2>Sign in</h2>
    <div class="muted" id="signin-why"></div>
    <form id="signin-form" autocomplete="on">
      <input id="signin-name" name="username" autocomplete="username" placeholder="account" required maxlength="32">
      <input id="signin-password" name="password" type="password" autocomplete="current-password"
             placeholder="password" required maxlength="1024">
      <button id="signin-submit" type="submit">sign in</button>
      <span id="signin-note"></span>
    </form></section>
  <section id="warnings"><h2>Warnings</h2><ul id="warning-list"></ul></section>
  <div class="cards">
    <div class="card"><h2>Coordinator</h2><div class="big" id="leader-id">…</div>
      <div class="muted"><span id="term"></span> · <span id="commit"></span></div></div>
    <div class="card"><h2>Members</h2><div class="big" id="member-count">…</div>
      <div class="muted" id="member-states"></div></div>
    <div class="card"><h2>Tasks</h2><div class="big" id="task-total">…</div>
      <div class="muted" id="task-states"></div></div>
    <div class="card"><h2>Voters</h2><div id="voters">…</div></div>
  </div>
  <section><h2>Members</h2><div class="scroll">
    <table id="members" class="rwd"><thead><tr><th>id</th><th>state</th><th>role</th><th>raft</th>
      <th>cpu free/total</th><th>memory free/total</th><th>gpu</th><th>trust</th><th>heard</th><th>address</th>
    </tr></thead><tbody></tbody></table></div></section>
  <section id="task-section"><div class="head"><h2>Tasks</h2>
    <label class="grow muted">state <select id="task-filter"><option value="">all</option></select></label></div>
    <div class="scroll">
    <table id="tasks" class="rwd"><thead><tr><th>id</th><th>state</th><th>node</th><th>attempt</th>
      <th>progress</th><th>exit</th><th>owner</th><th>submitted</th><th>command</th>
    </tr></thead><tbody></tbody></table></div><div class="empty" id="tasks-empty">…</div></section>
  <section id="task-detail" hidden>
    <div class="head"><h2>Task <span id="detail-id"></span></h2><span id="detail-state"></span>
      <span class="muted" id="detail-node"></span>
      <span class="grow"></span>
      <button id="cancel-task" class="danger" type="button" hidden>cancel</button>
      <button id="close-detail" type="button" aria-label="close">✕</button></div>
    <div class="cmd" id="detail-command"></div>
    <div class="muted" id="detail-reason"></div>
    <div class="scroll"><table id="attempts" class="rwd"><thead><tr><th>attempt</th><th>node</th><th>state</th>
      <th>term</th><th>started</th><th>ended</th><th>exit</th><th>reason</th></tr></thead><tbody></tbody></table></div>
    <div class="tabs" role="tablist">
      <button type="button" role="tab" id="tab-stdout" data-stream="stdout" aria-selected="true">stdout</button>
      <button type="button" role="tab" id="tab-stderr" data-stream="stderr" aria-selected="false">stderr</button>
      <span class="muted" id="log-note"></span></div>
    <pre class="log" id="log-stdout" data-stream="stdout"></pre>
    <pre class="log" id="log-stderr" data-stream="stderr" hidden></pre>
  </section>
  <div class="cards">
    <section><h2>Ledger</h2><dl class="kv" id="ledger"></dl></section>
    <section><h2>Recent coordinator changes</h2><ol class="history" id="leader-history"></ol>
      <div class="muted" id="history-src"></div></section>
  </div>
</main>
<footer><span id="version"></span> · <a href="v1/status">status JSON</a> · <a href="metrics">metrics</a></footer>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<title>Galaxy</title>\n<link rel=\"icon\" href=\"data:,\">\n"
        f"<style>{_STYLE}</style>\n</head><body>{_BODY}<script>{_SCRIPT}</script>\n</body></html>\n")
PAGE_BYTES = PAGE.encode()

# Only this page's own script and style run, and it may talk only to the node that served it.
CSP = "; ".join([
    "default-src 'none'",
    f"script-src {_csp_hash(_SCRIPT)}",
    f"style-src {_csp_hash(_STYLE)}",
    "connect-src 'self'",
    "img-src data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Vary": "Accept",
}


def _quality(accept: str, wanted: str) -> float:
    """The q-value ``accept`` gives ``wanted`` exactly (not through a wildcard); 0 if absent."""
    for part in accept.split(",")[:32]:             # bounded: a header is client input
        fields = [f.strip() for f in part.split(";")]
        if fields[0].lower() != wanted:
            continue
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    return 0.0
                return q if 0.0 <= q <= 1.0 else 0.0
        return 1.0
    return 0.0


def wants_html(accept: str) -> bool:
    """True for a browser: it names text/html, and not below application/json."""
    html = _quality(accept, "text/html")
    return html > 0 and html >= _quality(accept, "application/json")


async def index(request: web.Request) -> web.Response:
    check_query(request)
    if wants_html(request.headers.get("Accept", "")):
        return web.Response(body=PAGE_BYTES, content_type="text/html", charset="utf-8", headers=HEADERS)
    routes = sorted({f"{r.method} {r.resource.canonical}" for r in request.app.router.routes()
                     if r.method != "HEAD" and r.resource is not None})
    return web.json_response({"dashboard": "open this URL in a browser", "routes": routes},
                             headers={"Vary": "Accept"})
