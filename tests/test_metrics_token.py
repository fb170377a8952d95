"""/metrics is open by default; with TASKSTREAM_METRICS_TOKEN it wants that bearer token."""

from __future__ import annotations

import secrets

import httpx
import pytest

from server.config import ConfigError, Settings
from tests.conftest import LiveServer

METRICS_TOKEN = secrets.token_urlsafe(32)


async def test_metrics_are_open_without_a_metrics_token(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.get(server.url + "/metrics")
    assert r.status_code == 200 and "taskstream_" in r.text


@pytest.mark.parametrize("settings_overrides", [{"metrics_token": METRICS_TOKEN}])
async def test_metrics_token_is_required_when_set(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    url = server.url + "/metrics"
    for headers in (
        {},
        {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": "Bearer é".encode()},
        {"Authorization": f"Bearer {server.token()}"},  # a user's JWT is not the metrics token
    ):
        r = await client.get(url, headers=headers)  # type: ignore[arg-type]
        assert r.status_code == 401, headers
        assert r.json() == {"error": "Metrics token required"}
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert METRICS_TOKEN not in r.text
    r = await client.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200 and "taskstream_" in r.text
    r = await client.get(url, headers={"Authorization": f"bearer  {METRICS_TOKEN}"})
    assert r.status_code == 200


@pytest.mark.parametrize("value", ["short", "a" * 15, "has a space in it ok", "ümlaut" * 4])
def test_a_weak_or_unsendable_metrics_token_is_refused_at_start(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TASKSTREAM_METRICS_TOKEN": value})
    assert value not in str(info.value)
    assert "TASKSTREAM_METRICS_TOKEN" in str(info.value)


def test_metrics_token_setting_is_read() -> None:
    assert Settings.from_env({}).metrics_token is None
    assert Settings.from_env({"TASKSTREAM_METRICS_TOKEN": METRICS_TOKEN}).metrics_token == (
        METRICS_TOKEN
    )
