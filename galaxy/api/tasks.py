"""HTTP routes for tasks, their logs, input archives and draining (DESIGN.md section 3).

Theory of operation: thin, like ``app.py`` — parse and validate, call the node's
``TaskService`` (``node.tasks``), render.  Logs live on the node that ran the attempt: a
node that did not run it forwards the request to the one that did (``here=1`` marks a
forwarded request, so a forward never forwards again), streaming when ``follow=1``; the
forward carries the caller's ``Authorization`` header, so it is allowed exactly when the
caller would be.  Likewise only the coordinator plans, so only it knows why a pending task
waits: another node asks it (``GET /v1/tasks/ID?here=1``, within ``COORDINATOR_ASK_S``) and
shows its reason, or none when it does not answer in time; with no coordinator, or one that
is dead, has left or refuses the connection, it says that instead.

Who may call what is ``access.POLICY`` (checked before a handler runs); these handlers
refine it with the caller's account: a submitted task belongs to the caller (a body naming
another owner needs an admin), its price is held from that owner, and a user cancels only
its own tasks (an operator or admin any).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tarfile
import time
from typing import Any

import aiohttp
from aiohttp import web

from galaxy import auth
from galaxy.api import access
from galaxy.api.errors import ApiError, body_fields, check_query, echo
from galaxy.executor.core import output_cut
from galaxy.executor.runner import unpack_archive
from galaxy.gossip.docs_runner import NotReplicated
from galaxy.ledger.runner import LedgerError
from galaxy.tasks import core as tc
from galaxy.tasks.blobs import SHA256, BlobError
from galaxy.tasks.runner import TooManyTasks, Unavailable

LIST_LIMIT_MAX = 1000
LOG_CHUNK_BYTES = 1 << 16
FOLLOW_POLL_S = 0.2
COORDINATOR_ASK_S = 2.0       # asking the coordinator why a task waits: then shown without a reason
# Token buckets for POST /v1/tasks: per client address (cfg.submit_rate_per_s, cfg.submit_burst)
# and per account (cfg.submit_account_rate_per_s, cfg.submit_account_burst).
SUBMIT_LIMITER_KEY: web.AppKey[auth.RateLimiter] = web.AppKey("galaxy_submit_limiter", auth.RateLimiter)
SUBMIT_ACCOUNT_LIMITER_KEY: web.AppKey[auth.RateLimiter] = web.AppKey("galaxy_submit_account_limiter",
                                                                     auth.RateLimiter)


def _node(request: web.Request) -> Any:
    from galaxy.api.app import NODE_KEY
    return request.app[NODE_KEY]


def _json(body: Any, status: int = 200) -> web.Response:
    from galaxy.api.app import _json as render
    return render(body, status)


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["id"]
    if not tc.TASK_ID.match(task_id):
        raise ApiError(400, f"task id: {echo(task_id)} is not a task id (t- and 16 hex digits)")
    return task_id


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: must be a whole number, got {echo(raw)}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}: must be between {lo} and {hi}")
    return value


def _view(node: Any, t: tc.Task) -> dict:
    v = tc.view(t)
    if t.state == tc.PENDING and t.id in node.tasks.waiting:
        v["waiting"] = node.tasks.waiting[t.id]
    return v


def _take_submissions(request: web.Request, account: str, n: int) -> None:
    """Take ``n`` submissions (at most a burst) from the caller's address and account buckets; 429 if short."""
    now_ms = time.monotonic_ns() // 1_000_000
    for limiter, key, who, setting in (
            (SUBMIT_LIMITER_KEY, request.remote or "", f"from {request.remote}", "submit_rate_per_s"),
            (SUBMIT_ACCOUNT_LIMITER_KEY, account, f"by {account}", "submit_account_rate_per_s")):
        wait_s = request.app[limiter].take(key, now_ms, cost=n)
        if wait_s > 0:
            raise ApiError(429, f"too many submissions {who}: retry in {wait_s:.1f} s ({setting})",
                           headers={"Retry-After": auth.retry_after_header(wait_s)})


async def submit(request: web.Request) -> web.Response:
    check_query(request)
    node = _node(request)
    account, role = access.caller(request)
    # Before the body is read: a flood costs two bucket lookups per request, not a parse.
    _take_submissions(request, account, 1)
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body: must be a JSON object ({e.__class__.__name__})") from None
    _check_submission_shape(body)
    batch = "tasks" in body
    specs = body["tasks"] if batch and isinstance(body["tasks"], list) else [body]
    for i, spec in enumerate(specs):
        named = spec.get("owner") if isinstance(spec, dict) else None
        if not isinstance(named, str) or named in ("", account):
            continue
        if not access.has_role(role, "admin"):
            raise ApiError(403, f"a task owned by another account than {account} needs role admin "
                                f"(this account is {role}); leave owner out")
        # a typo would otherwise run (and list) tasks under a name no one can sign in as
        if node.ledger.account(named) is None:
            raise ApiError(400, f"{f'tasks[{i}].' if batch else ''}owner: no account {named!r:.80} on this mesh "
                                f"(open it first: galaxy account create {named!s:.80})", code="no_account")
    if batch and len(specs) > 1:
        _take_submissions(request, account, len(specs) - 1)    # a token per task (one was taken above)
    try:
        if batch:
            tasks, peers = await node.tasks.submit_many(body["tasks"], account)
            return _json({"tasks": [_view(node, t) for t in tasks], "acknowledged_by": peers}, 202)
        t, peer = await node.tasks.submit(body, account)
    except tc.SpecError as e:
        raise ApiError(400, str(e)) from None
    except TooManyTasks as e:
        raise ApiError(429, str(e), code="too_many_tasks") from None
    except Unavailable as e:
        raise ApiError(503, str(e), code="unavailable") from None
    except LedgerError as e:        # the price could not be held
        raise ApiError(e.status, f"price: {e.message}", code=e.code) from None
    except NotReplicated as e:
        raise ApiError(503, f"the task is stored on this node only and will still run, but was not "
                            f"acknowledged: {e}", code="not_replicated") from None
    return _json({**_view(node, t), "acknowledged_by": peer}, 202)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _check_submission_shape(body: Any) -> None:
    """The outer shape of ``POST /v1/tasks`` (one task, or ``{"tasks": [...]}`` alone), so a
    rejection names the field: the fields inside each task are ``tasks.core.parse_spec``'s."""
    if not isinstance(body, dict):
        raise ApiError(400, f'body: must be a JSON object (one task, or {{"tasks": [task, ...]}}), '
                            f"got {_json_type(body)}")
    if "tasks" not in body:
        return
    if len(body) > 1:
        extra = sorted(str(k) for k in body if k != "tasks")
        raise ApiError(400, f'{echo(extra[0])}: unknown field beside "tasks" (a batch is {{"tasks": '
                            f"[task, ...]}} alone; put the fields in each task)")
    if isinstance(body["tasks"], list):
        for i, spec in enumerate(body["tasks"]):
            if not isinstance(spec, dict):
                raise ApiError(400, f"tasks[{i}]: must be a JSON object (a task), got {_json_type(spec)}")


async def list_tasks(request: web.Request) -> web.Response:
    check_query(request, ("state", "owner", "node", "limit", "after"))
    q = request.query
    state = q.get("state", "")
    if state and state not in tc.TASK_STATES:
        raise ApiError(400, f"state: must be one of {', '.join(tc.TASK_STATES)}")
    after = q.get("after", "")
    if after and not tc.TASK_ID.match(after):
        raise ApiError(400, "after: must be a task id")
    for name in ("owner", "node"):
        if len(q.get(name, "")) > 128:
            raise ApiError(400, f"{name}: at most 128 characters")
    limit = _int_param(request, "limit", 100, 1, LIST_LIMIT_MAX)
    node = _node(request)
    if after and not node.tasks.knows(after):      # else the page would read as the end of the list
        raise ApiError(400, f"after: no task {after} on this node (forgotten since, or from another mesh): "
                            "list again without after")
    found = node.tasks.list(state=state, owner=q.get("owner", ""), node=q.get("node", ""), limit=limit + 1,
                            after=after)
    more = len(found) > limit
    items = [_view(node, t) for t in found[:limit]]
    return _json({"tasks": items, "next": items[-1]["id"] if more else None, "counts": node.tasks.counts()})


async def get_task(request: web.Request) -> web.Response:
    check_query(request, ("here",))
    node = _node(request)
    task_id = _task_id(request)
    t = node.tasks.get(task_id)
    if t is None:
        raise ApiError(404, f"no task {task_id}")
    v = _view(node, t)
    if t.state == tc.PENDING and "waiting" not in v and request.query.get("here") != "1":
        why = await _waiting_at_coordinator(request, node, task_id)
        if why:
            v["waiting"] = why
    return _json(v)


async def _waiting_at_coordinator(request: web.Request, node: Any, task_id: str) -> str | None:
    """The coordinator's reason for leaving ``task_id`` pending; None if it has none or does
    not answer in time (with the caller's own ``Authorization``, as a log forward)."""
    leader = node.leader()
    if not leader["leader"]:
        return "no coordinator: nothing is placed until the voters elect one (galaxy status)"
    if leader["leader"] == node.node_id or not leader["http"]:
        return None
    gone = next((m["state"] for m in node.members() if m["id"] == leader["leader"]), None)
    if gone in ("dead", "left"):
        return (f"the coordinator {leader['leader']} {'has left the mesh' if gone == 'left' else 'is dead'}: "
                f"nothing is placed until the voters elect another (galaxy status)")
    url = f"{leader['http']}/v1/tasks/{task_id}"
    headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=COORDINATOR_ASK_S)) as session, \
                session.get(url, params={"here": "1"}, headers=headers, ssl=node.peers.ssl_for(url)) as r:
            doc = await r.json() if r.status == 200 else None
    except aiohttp.ClientConnectorError:
        return f"the coordinator {leader['leader']} does not answer (galaxy status)"
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
        return None
    why = doc.get("waiting") if isinstance(doc, dict) else None
    return why if isinstance(why, str) else None


async def cancel(request: web.Request) -> web.Response:
    check_query(request)
    node = _node(request)
    task_id = _task_id(request)
    await body_fields(request, (set(), set()), empty={})
    account, role = access.caller(request)
    t = node.tasks.get(task_id)
    if t is None:
        raise ApiError(404, f"no task {task_id}")
    if t.owner != account and not access.has_role(role, "operator"):
        raise ApiError(403, f"task {task_id} belongs to another account; cancelling it needs role operator "
                            f"(this account is {role})")
    try:
        t = node.tasks.cancel(task_id)
    except KeyError:
        raise ApiError(404, f"no task {task_id}") from None
    except tc.Refused as e:
        raise ApiError(409, str(e)) from None
    return _json(_view(node, t), 202)


async def logs(request: web.Request) -> web.StreamResponse:
    check_query(request, ("stream", "follow", "attempt", "offset", "here"))
    node = _node(request)
    task_id = _task_id(request)
    t = node.tasks.get(task_id)
    if t is None:
        raise ApiError(404, f"no task {task_id}")
    stream = request.query.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        raise ApiError(400, "stream: must be stdout or stderr")
    follow = request.query.get("follow", "0")
    if follow not in ("0", "1"):
        raise ApiError(400, "follow: must be 0 or 1")
    if not t.attempts:
        why = f"task {task_id} never ran ({t.reason or t.state})" if t.terminal else \
            f"task {task_id} has not run yet ({t.state})"
        raise ApiError(404, why, code="not_started")
    attempt = _int_param(request, "attempt", t.attempt, 1, t.attempt)
    offset = _int_param(request, "offset", 0, 0, 1 << 40)
    ran_on = t.attempts[attempt - 1].node
    if ran_on != node.node_id:
        if request.query.get("here") == "1":
            raise ApiError(404, f"attempt {attempt} of {task_id} did not run on this node")
        return await _forward(request, node, ran_on)
    path = node.tasks.executor.log_path(task_id, attempt, stream)
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Galaxy-Node": node.node_id,
               "X-Galaxy-Attempt": str(attempt)}
    ran = node.tasks.executor.get(task_id, attempt)
    res = ran.result if ran is not None else None
    if res is not None and res.truncated:
        # An ended attempt whose output went past the cap: was this stream's middle dropped?
        kept = res.stdout_bytes if stream == "stdout" else res.stderr_bytes
        if output_cut(kept, node.tasks.cfg.task_output_bytes_max):
            headers[tc.TRUNCATED_HEADER] = str(kept)
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    while True:
        chunk = _read_from(path, offset)
        if chunk:
            offset += len(chunk)
            await resp.write(chunk)
        elif follow == "1" and _running_here(node, task_id, attempt):
            await asyncio.sleep(FOLLOW_POLL_S)
        elif not _read_from(path, offset):     # it may have written its last bytes meanwhile
            break
    await resp.write_eof()
    return resp


def _running_here(node: Any, task_id: str, attempt: int) -> bool:
    a = node.tasks.executor.get(task_id, attempt)
    if a is not None:
        return not a.done
    t = node.tasks.get(task_id)      # assigned here but not started yet
    return t is not None and t.attempt == attempt and t.node == node.node_id and not t.terminal


def _read_from(path: Any, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(LOG_CHUNK_BYTES)
    except FileNotFoundError:
        return b""


async def _forward(request: web.Request, node: Any, ran_on: str) -> web.StreamResponse:
    member = next((m for m in node.members() if m["id"] == ran_on), None)
    if member is None or member["state"] not in ("alive", "suspect"):
        state = member["state"] if member else ""
        which = {"dead": "which is dead", "left": "which has left the mesh", "": "which is no longer a member"}
        raise ApiError(502, f"the attempt ran on {ran_on}, {which.get(state, 'which is ' + state)}: "
                            f"its logs are not reachable", code="node_unreachable")
    params = {**request.query, "here": "1"}
    url = f"{member['http']}{request.path}"
    headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, params=params, headers=headers, ssl=node.peers.ssl_for(url)) as r:
            if r.status != 200:
                body = await r.read()
                return web.Response(status=r.status, body=body, content_type="application/json")
            resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                               "X-Galaxy-Node": ran_on,
                                               "X-Galaxy-Attempt": r.headers.get("X-Galaxy-Attempt", ""),
                                               **({tc.TRUNCATED_HEADER: r.headers[tc.TRUNCATED_HEADER]}
                                                  if tc.TRUNCATED_HEADER in r.headers else {})})
            await resp.prepare(request)
            async for chunk in r.content.iter_chunked(LOG_CHUNK_BYTES):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    except (aiohttp.ClientError, OSError) as e:
        raise ApiError(502, f"could not reach {ran_on} for the logs: {e.__class__.__name__}",
                       code="node_unreachable") from None


async def put_blob(request: web.Request) -> web.Response:
    check_query(request)
    node = _node(request)
    try:
        sha = await node.tasks.blobs.put(request.content.iter_chunked(LOG_CHUNK_BYTES))
    except BlobError as e:
        raise ApiError(413, f"input archive: {e}") from None
    path = node.tasks.blobs.path(sha)
    # Refused now rather than by every attempt of the tasks that name it: what the worker
    # checks before it unpacks (every member's header: no path out of the work dir, no
    # device, the members' count and size)
    why = ("not a .tar or .tar.gz archive (empty or unreadable)"
           if not await asyncio.to_thread(tarfile.is_tarfile, path) else
           await asyncio.to_thread(unpack_archive, path, None))
    if why:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ApiError(400, f"input archive: {why.removeprefix('input archive: ')}")
    return _json({"sha256": sha, "bytes": os.path.getsize(path)}, 201)


async def get_blob(request: web.Request) -> web.StreamResponse:
    check_query(request)
    node = _node(request)
    sha = request.match_info["sha"]
    if not SHA256.match(sha):
        raise ApiError(400, "sha256: must be 64 lower-case hex digits")
    if not node.tasks.blobs.has(sha):
        raise ApiError(404, f"no input archive {sha} on this node")
    return web.FileResponse(node.tasks.blobs.path(sha))


async def drain(request: web.Request) -> web.Response:
    check_query(request)
    node = _node(request)
    node_id = request.match_info["node"]
    known = {m["id"]: m for m in node.members()}
    if node_id not in known:
        raise ApiError(404, f"no member {echo(node_id)}")
    # required: draining makes the node leave, never by default (true drains it, false undoes it)
    body = await body_fields(request, ({"draining"}, set()), empty={})
    if not isinstance(body["draining"], bool):
        raise ApiError(400, f"draining: must be true or false, got {_json_type(body['draining'])}")
    draining = body["draining"]
    node.tasks.drain(node_id, draining)
    return _json({"node": node_id, "draining": draining}, 202)


def add_routes(app: web.Application) -> None:
    from galaxy.api.app import NODE_KEY
    cfg = app[NODE_KEY].cfg
    app[SUBMIT_LIMITER_KEY] = auth.RateLimiter(cfg.submit_rate_per_s, cfg.submit_burst)
    app[SUBMIT_ACCOUNT_LIMITER_KEY] = auth.RateLimiter(cfg.submit_account_rate_per_s, cfg.submit_account_burst)
    app.router.add_post("/v1/tasks", submit)
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_get("/v1/tasks/{id}", get_task)
    app.router.add_get("/v1/tasks/{id}/logs", logs)
    app.router.add_post("/v1/tasks/{id}/cancel", cancel)
    app.router.add_post("/v1/blobs", put_blob)
    app.router.add_get("/v1/blobs/{sha}", get_blob)
    app.router.add_post("/v1/nodes/{node}/drain", drain)
