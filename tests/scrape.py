"""Read a real ``/metrics`` page over HTTP into ``{(sample name, sorted labels): value}``."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient, base_url: str) -> Samples:
    r = await client.get(f"{base_url}/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it has not been exported yet (a labelled child never used)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
