"""Groups in a real headless Chromium: watchGroup and the React hook useGroupProgress follow
every task of a group, including tasks created after the watch started, until it is closed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from playwright.async_api import Route, expect

from server.demo import DEMO_USER
from tests.conftest import LiveServer, create_task
from tests.test_browser import (
    NODE_MODULES,
    REACT_SHIM,
    PageWatcher,
    browser,
    set_task,
    settings_overrides,
    web,
)

__all__ = ["browser", "settings_overrides", "web"]  # fixtures, imported for their registration

GROUP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8">
<script src="/vendor/react.production.min.js"></script>
<script src="/vendor/react-dom.production.min.js"></script>
<script type="importmap">{"imports": {"react": "/vendor/react-shim.js"}}</script>
<script type="module">
  import { createElement as h, useState } from "react";
  import { useGroupProgress } from "/static/react.js";
  const tokenResponse = await fetch("/demo/token");
  const { token } = await tokenResponse.json();
  function View({ groupId }) {
    const { tasks, results, isComplete, error, status } = useGroupProgress(groupId, token);
    const shown = Object.fromEntries(Object.entries(tasks).map(
      ([id, p]) => [id, [p.state, p.progress, p.metadata ?? null]]));
    return h("pre", { id: "out" }, JSON.stringify({
      tasks: shown, done: Object.keys(results).sort(), isComplete, error, status }));
  }
  function App() {
    const [shown, setShown] = useState(true);
    window.unmount = () => setShown(false);
    return shown ? h(View, { groupId: new URLSearchParams(location.search).get("group") }) : null;
  }
  ReactDOM.createRoot(document.getElementById("root")).render(h(App));
</script></head><body><div id="root"></div></body></html>
"""


async def serve_react(web: PageWatcher) -> None:
    umd = {
        "react.production.min.js": NODE_MODULES / "react" / "umd" / "react.production.min.js",
        "react-dom.production.min.js": NODE_MODULES
        / "react-dom"
        / "umd"
        / "react-dom.production.min.js",
    }
    for path in umd.values():
        assert path.exists(), f"{path} missing: run scripts/setup-browser.sh"

    async def serve_test_files(route: Route) -> None:
        name = route.request.url.rsplit("/", 1)[-1].split("?")[0]
        if name.startswith("group-test.html"):
            await route.fulfill(status=200, content_type="text/html", body=GROUP_PAGE)
        elif name == "react-shim.js":
            await route.fulfill(status=200, content_type="text/javascript", body=REACT_SHIM)
        else:
            await route.fulfill(
                status=200, content_type="text/javascript", body=umd[name].read_text()
            )

    await web.page.route("**/group-test.html*", serve_test_files)
    await web.page.route("**/vendor/*", serve_test_files)


async def test_react_group_hook_follows_new_tasks_until_closed(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    await serve_react(web)
    await create_task(sql, "gb1", owner=DEMO_USER, state="queued", group_id="batch")
    await web.page.goto(f"{server.url}/group-test.html?group=batch")
    out = web.page.locator("#out")

    async def rendered() -> dict[str, Any]:
        value: dict[str, Any] = json.loads(await out.text_content() or "null")
        return value

    await expect(out).to_contain_text('"status":"live"')
    await create_task(
        sql, "gb2", owner=DEMO_USER, state="queued", group_id="batch", metadata='{"file": "b.wav"}'
    )
    await expect(out).to_contain_text('"gb2":["queued",0,{"file":"b.wav"}]')
    await set_task(sql, "gb1", state="success", progress=100.0)
    await set_task(sql, "gb2", state="failed", error="bad input")
    await expect(out).to_contain_text('"done":["gb1","gb2"]')
    assert (await rendered())["isComplete"] is False  # the group is still open
    await sql.execute("UPDATE taskstream.groups SET closed_at = now() WHERE id = 'batch'")
    await expect(out).to_contain_text('"isComplete":true')
    assert await rendered() == {
        "tasks": {"gb1": ["success", 100, None], "gb2": ["failed", 0, {"file": "b.wav"}]},
        "done": ["gb1", "gb2"],
        "isComplete": True,
        "error": None,
        "status": "closed",
    }
    assert web.errors == []


async def test_watch_group_in_the_browser_not_found_and_unmount(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    await serve_react(web)
    await web.page.goto(f"{server.url}/group-test.html?group=nope")
    out = web.page.locator("#out")
    await expect(out).to_contain_text('"error":"Group not found"')
    await create_task(sql, "gu1", owner=DEMO_USER, group_id="open-batch")
    await web.page.goto(f"{server.url}/group-test.html?group=open-batch")
    await expect(out).to_contain_text('"status":"live"')
    assert server.runtime.broker.subscriber_count == 1
    await web.page.evaluate("window.unmount()")
    for _ in range(50):
        if server.runtime.broker.subscriber_count == 0:
            break
        await asyncio.sleep(0.05)
    assert server.runtime.broker.subscriber_count == 0
