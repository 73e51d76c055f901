"""The cluster's default task timeout: applied by the TaskService only when a submission names none."""

from __future__ import annotations

import dataclasses

from tests.unit.test_tasks_api import finished, solo  # noqa: F401 (the fixture)


async def test_default_timeout_applies_only_without_one(solo):  # noqa: F811
    node, client = solo
    node.tasks.cfg = node.cfg = dataclasses.replace(node.cfg, task_default_timeout_s=0.3)
    cmd = {"command": ["sleep", "30"], "resources": {"cpu": 0.1, "memory_mb": 16}, "max_retries": 0}
    t = await (await client.post("/v1/tasks", json=cmd)).json()
    assert t["timeout_s"] == 0.3
    explicit = await (await client.post("/v1/tasks", json={**cmd, "timeout_s": 0})).json()
    assert explicit["timeout_s"] == 0                      # 0 given: "no timeout", kept
    own = await (await client.post("/v1/tasks", json={**cmd, "timeout_s": 7})).json()
    assert own["timeout_s"] == 7
    assert (await finished(client, t["id"]))["state"] == "timed_out"
    for other in (explicit, own):
        await client.post(f"/v1/tasks/{other['id']}/cancel")
        await finished(client, other["id"])
