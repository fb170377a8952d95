"""The data path's batched metrics flush into prometheus-client exactly as direct calls would.

:class:`server.metrics.Tally` adds to the push-latency histogram's buckets itself (prometheus-client
has no batch observe), so this pins that arithmetic against ``Histogram.observe`` of the installed
library version, bucket by bucket, including values exactly on a bucket bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from server import metrics


def _samples(hist: Histogram) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in hist.collect():
        for s in family.samples:
            if s.name.endswith(("_bucket", "_sum", "_count")):
                out[(s.name.rsplit("_", 1)[-1], s.labels.get("le", ""))] = s.value
    return out


def test_flushed_histogram_matches_observe() -> None:
    values = [0.0, 0.0004, 0.001, 0.0011, 0.0025, 0.004, 0.01, 0.3, 1.0, 9.99, 10.0, 42.0]
    reference = Histogram(
        "reference_seconds",
        "reference",
        buckets=metrics.PUSH_LATENCY._upper_bounds[:-1],
        registry=CollectorRegistry(),
    )
    for v in values:
        reference.observe(v)

    before = _samples(metrics.PUSH_LATENCY)
    tally = metrics.Tally()
    for v in values:
        tally.observe_push(v)
    tally.flush()
    after = _samples(metrics.PUSH_LATENCY)

    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    expected = _samples(reference)
    assert delta.keys() == expected.keys()
    for key, want in expected.items():
        assert abs(delta[key] - want) < 1e-9, (key, delta[key], want)
    assert expected[("count", "")] == len(values)  # the reference itself saw every value


def test_flush_moves_counters_and_resets() -> None:
    def sent(kind: str) -> float:
        return metrics.EVENTS_SENT.labels(kind)._value.get()

    tally = metrics.Tally()
    before_progress, before_conflated = sent("progress"), metrics.EVENTS_CONFLATED._value.get()
    tally.count_sent("progress")
    tally.count_sent("progress", 4)
    tally.conflated += 3
    assert sent("progress") == before_progress  # nothing reaches prometheus before a flush
    tally.flush()
    assert sent("progress") == before_progress + 5
    assert metrics.EVENTS_CONFLATED._value.get() == before_conflated + 3
    tally.flush()  # a second flush adds nothing
    assert sent("progress") == before_progress + 5
    assert tally.sent == {} and tally.conflated == 0 and not any(tally.push_counts)
