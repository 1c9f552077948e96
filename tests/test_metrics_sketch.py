"""The quantile sketch behind the JSON view's p50/p90/p95/p99: accuracy against exact
quantiles of known latency distributions, bounded memory, merging."""

from __future__ import annotations

import math
import random

import pytest

from proxy.sketch import QuantileSketch

QS = (0.5, 0.9, 0.95, 0.99, 0.999)


def exact(values: list[float], q: float) -> float:
    """The value of rank floor(q * (n - 1)): the rank the sketch promises to approximate."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def latencies(kind: str, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    if kind == "lognormal":  # typical API latency: median ~20 ms, long tail
        return [rng.lognormvariate(math.log(0.02), 0.8) for _ in range(n)]
    if kind == "bimodal":  # cache hits at ~0.3 ms, misses at ~120 ms
        return [
            rng.gauss(0.0003, 0.00005) if rng.random() < 0.7 else rng.gauss(0.12, 0.02)
            for _ in range(n)
        ]
    if kind == "pareto":  # heavy tail up to tens of seconds
        return [min(0.001 * rng.paretovariate(1.2), 60.0) for _ in range(n)]
    if kind == "uniform":
        return [rng.uniform(0.001, 2.0) for _ in range(n)]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["lognormal", "bimodal", "pareto", "uniform"])
def test_quantiles_are_within_one_percent_of_exact_values(kind: str) -> None:
    values = latencies(kind, 50_000, seed=7)
    sketch = QuantileSketch(relative_accuracy=0.01)
    for value in values:
        sketch.add(value)
    for q, estimate in zip(QS, sketch.quantiles(QS), strict=True):
        truth = exact(values, q)
        assert estimate is not None
        assert abs(estimate - truth) <= 0.01 * truth + 1e-12, (kind, q, estimate, truth)


def test_single_quantile_matches_batch_answer_and_edges_are_min_and_max() -> None:
    values = latencies("lognormal", 5_000, seed=3)
    sketch = QuantileSketch()
    for value in values:
        sketch.add(value)
    assert sketch.quantile(0.9) == sketch.quantiles((0.9,))[0]
    assert sketch.quantile(0.0) == pytest.approx(min(values), rel=0.01)
    assert sketch.quantile(1.0) == pytest.approx(max(values), rel=0.01)
    assert sketch.quantile(1.0) <= max(values)  # never above the largest value seen
    assert sketch.count == len(values)
    assert sketch.sum == pytest.approx(sum(values))


def test_empty_sketch_has_no_quantiles() -> None:
    assert QuantileSketch().quantiles((0.5, 0.99)) == [None, None]


def test_values_at_or_below_the_floor_count_as_zero() -> None:
    sketch = QuantileSketch(min_value=1e-6)
    for _ in range(60):
        sketch.add(0.0)
    for _ in range(40):
        sketch.add(0.5)
    assert sketch.quantile(0.5) == 0.0
    assert sketch.quantile(0.99) == pytest.approx(0.5, rel=0.01)


def test_memory_is_bounded_by_the_value_range_not_the_number_of_values() -> None:
    sketch = QuantileSketch(relative_accuracy=0.01)
    rng = random.Random(1)
    for _ in range(200_000):
        sketch.add(10 ** rng.uniform(-7, 6))  # 0.1 µs .. 11 days, clamped at 1 day
    # log(86400 / 1e-6) / log(1.0202) ~ 1268 bins, whatever the number of values.
    assert sketch.bin_count <= 1300
    assert sketch.count == 200_000


def test_merged_sketches_answer_like_one_sketch_over_all_values() -> None:
    a_values = latencies("lognormal", 10_000, seed=1)
    b_values = latencies("bimodal", 10_000, seed=2)
    a, b, both = QuantileSketch(), QuantileSketch(), QuantileSketch()
    for value in a_values:
        a.add(value)
        both.add(value)
    for value in b_values:
        b.add(value)
        both.add(value)
    a.merge(b)
    assert a.quantiles(QS) == both.quantiles(QS)
    for q, estimate in zip(QS, a.quantiles(QS), strict=True):
        truth = exact(a_values + b_values, q)
        assert abs(estimate - truth) <= 0.01 * truth + 1e-12


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        QuantileSketch(relative_accuracy=0)
    with pytest.raises(ValueError):
        QuantileSketch().quantile(1.5)
    with pytest.raises(ValueError):
        QuantileSketch(0.01).merge(QuantileSketch(0.02))
