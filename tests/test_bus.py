"""The NATS fan-out bus end to end: real server processes in bus mode, a real three-node NATS
cluster, real SSE clients, and chaos while tasks run to their final states.

Each scenario runs three instances (instance i first connects to node i), two clients per task
spread over them, a writer that moves every task through many versions and then to a final
state, and one fault in the middle: the relay instance is killed, the NATS node the relay uses
is killed, or every NATS node is stopped and started again. Clients follow their stream like
EventSource does (reconnect with Last-Event-ID, to the next instance when theirs is gone). Every
client must end on its task's final state and version, with versions strictly increasing: no
lost terminal state, no duplicate, no reordering.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from httpx_sse import EventSource

from server.auth import issue_token
from server.stream.relay import relay_lock_key
from tests.conftest import SECRET, create_task
from tests.natscluster import NatsCluster
from tests.scrape import scrape, value
from tests.test_nginx import Proc, _start_instance, _wait

pytestmark = pytest.mark.timeout(120)


def bus_env(cluster: NatsCluster, first: int, prefix: str) -> dict[str, str]:
    # One node each: nats-py learns the others from the cluster (and fails over to them).
    return {
        "TASKSTREAM_NATS_URL": cluster.urls[first],
        "TASKSTREAM_NATS_SUBJECT_PREFIX": prefix,
        "TASKSTREAM_LISTENER_CHECK": "0.5",
        "TASKSTREAM_FALLBACK_POLL": "0.5",
    }


@dataclass
class Fleet:
    workdir: Path
    prefix: str
    procs: list[Proc] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.proc.returncode is None]

    def logs(self) -> str:
        return "".join(p.output() for p in self.procs)


@contextlib.asynccontextmanager
async def fleet(
    database_url: str, cluster: NatsCluster, n: int, **overrides: str
) -> AsyncIterator[Fleet]:
    f = Fleet(Path(tempfile.mkdtemp(prefix="taskstream-bus-test-")), f"ts{secrets.token_hex(4)}")
    try:
        for i in range(n):
            env = bus_env(cluster, i % len(cluster.nodes), f.prefix) | overrides
            p, url = await _start_instance(f.workdir, f"i{i}", database_url, **env)
            f.procs.append(p)
            f.urls.append(url)
        yield f
    finally:
        for p in f.procs:
            await p.stop()
        shutil.rmtree(f.workdir, ignore_errors=True)


async def metric(client: httpx.AsyncClient, url: str, name: str, **labels: str) -> float:
    return value(await scrape(client, url), name, **labels)


async def relays(client: httpx.AsyncClient, f: Fleet) -> list[int]:
    out = []
    for i in f.live():
        with contextlib.suppress(httpx.HTTPError):
            if await metric(client, f.urls[i], "taskstream_bus_relay") == 1:
                out.append(i)
    return out


async def one_relay(client: httpx.AsyncClient, f: Fleet, timeout: float = 15) -> int:
    found: list[int] = []

    async def exactly_one() -> bool:
        found[:] = await relays(client, f)
        return len(found) == 1

    await _wait(exactly_one, "exactly one relay", timeout)
    return found[0]


@dataclass
class Follower:
    """Follows one task like EventSource: reconnects with Last-Event-ID, moving to the next
    instance when its own is gone."""

    task_id: str
    token: str
    start: int
    versions: list[int] = field(default_factory=list)
    final: str | None = None
    connects: int = 0

    async def run(self, client: httpx.AsyncClient, f: Fleet) -> None:
        last_id: str | None = None
        k = self.start
        while self.final is None:
            live = f.live()
            base = f.urls[live[k % len(live)]] if live else f.urls[0]
            headers = {"Authorization": f"Bearer {self.token}"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            self.connects += 1
            try:
                url = f"{base}/api/v1/sse/tasks/{self.task_id}/progress"
                async with client.stream("GET", url, headers=headers) as r:
                    if r.status_code == 204:
                        self.final = "(resumed after the end)"
                        return
                    if r.status_code == 200:
                        async for ev in EventSource(r).aiter_sse():
                            if ev.event == "progress":
                                self.versions.append(int(ev.id))
                                last_id = ev.id
                            elif ev.event == "complete":
                                self.final = ev.json()["state"]
                                return
            except httpx.HTTPError:
                pass
            k += 1  # as a load balancer would send a reconnect elsewhere
            await asyncio.sleep(0.1)


async def _write_rounds(sql: asyncpg.Connection, ids: list[str], rounds: int) -> None:
    for _ in range(rounds):
        await sql.execute(
            "UPDATE taskstream.tasks SET progress = LEAST(progress + 1, 99) WHERE id = ANY($1)",
            ids,
        )
        await asyncio.sleep(0.03)


async def _finish(sql: asyncpg.Connection, ids: list[str]) -> None:
    for i, tid in enumerate(ids):
        state = ("success", "failed", "cancelled")[i % 3]
        await sql.execute(
            "UPDATE taskstream.tasks SET state = $2, progress = 100 WHERE id = $1", tid, state
        )


@pytest.mark.parametrize("fault", ["kill_relay", "kill_relay_nats_node", "restart_all_nats"])
async def test_no_final_state_is_lost_through_bus_faults(
    database_url: str, sql: asyncpg.Connection, nats_cluster: NatsCluster, fault: str
) -> None:
    n_tasks = 12
    ids = [f"job.{i} x" for i in range(n_tasks)]  # dots and spaces: subjects must encode them
    token = issue_token(SECRET, "alice", ttl=300)
    for tid in ids:
        await create_task(sql, tid, state="running")
    async with (
        fleet(database_url, nats_cluster, 3) as f,
        httpx.AsyncClient(
            timeout=httpx.Timeout(10, read=30), limits=httpx.Limits(max_connections=200)
        ) as client,
        httpx.AsyncClient(timeout=5) as direct,
    ):
        relay = await one_relay(direct, f)
        followers = [Follower(tid, token, start=i + j) for i, tid in enumerate(ids) for j in (0, 1)]
        runs = [asyncio.create_task(fl.run(client, f)) for fl in followers]
        try:
            await _wait(lambda: all(fl.versions[:1] == [1] for fl in followers), "snapshots")
            await _write_rounds(sql, ids, 5)

            if fault == "kill_relay":
                # The test queues for the relay's lock, so that it, not another instance, gets
                # it when the relay dies: a window with no relay at all, for as long as we like.
                holder = await asyncpg.connect(database_url)
                try:
                    key = relay_lock_key(f.prefix)
                    queued = asyncio.create_task(
                        holder.fetchval("SELECT pg_advisory_lock($1)", key)
                    )
                    await asyncio.sleep(0.3)
                    assert not queued.done()
                    await f.procs[relay].stop(signal.SIGKILL)
                    await asyncio.wait_for(queued, 10)
                    # Committed while no relay listens: the next relay's epoch recovers them.
                    await _write_rounds(sql, ids, 5)
                    await _finish(sql, ids[: n_tasks // 2])
                    await asyncio.sleep(0.5)
                finally:
                    await holder.close()
                new = await one_relay(direct, f)
                assert new != relay
            elif fault == "kill_relay_nats_node":
                nats_cluster.nodes[relay].kill()
                await _write_rounds(sql, ids, 5)
                await _finish(sql, ids[: n_tasks // 2])
                assert await one_relay(direct, f) == relay  # PostgreSQL was never lost
            else:
                for node in nats_cluster.nodes:
                    node.kill()
                await _write_rounds(sql, ids, 5)
                await _finish(sql, ids[: n_tasks // 2])  # while NATS is down altogether

                async def unready() -> bool:
                    r = await direct.get(f"{f.urls[0]}/readyz")
                    return r.status_code == 503 and "NATS connection is down" in r.text

                await _wait(unready, "/readyz to say NATS is down")
                assert await metric(direct, f.urls[0], "taskstream_bus_connected") == 0
                for node in nats_cluster.nodes:
                    node.start()
                nats_cluster.wait_meshed()

                async def ready() -> bool:
                    return (await direct.get(f"{f.urls[0]}/readyz")).status_code == 200

                await _wait(ready, "/readyz back to 200")

            await _write_rounds(sql, ids[n_tasks // 2 :], 5)
            await _finish(sql, ids[n_tasks // 2 :])
            await asyncio.wait_for(asyncio.gather(*runs), 30)
        finally:
            for t in runs:
                t.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

        finals = dict(await sql.fetch("SELECT id, state FROM taskstream.tasks"))
        versions = dict(await sql.fetch("SELECT id, version FROM taskstream.tasks"))
        for fl in followers:
            assert fl.final == finals[fl.task_id], fl
            assert fl.versions[-1] == versions[fl.task_id], fl
            assert fl.versions == sorted(set(fl.versions)), fl  # no repeat, no reordering
        # Every instance that lived through it resynced at least once on the bus.
        for i in f.live():
            resyncs = await scrape(direct, f.urls[i])
            total = sum(
                v for (name, _l), v in resyncs.items() if name == "taskstream_bus_resyncs_total"
            )
            assert total >= 1, (i, fault)
        assert token not in f.logs()
