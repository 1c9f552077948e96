"""The retry budget and its sliding window, on a controllable clock."""

from __future__ import annotations

import random

from proxy.config.schema import RetryBudget as BudgetConfig
from proxy.layers.retry_budget import RetryBudget
from proxy.layers.window import SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_keeps_totals_and_expires_old_buckets() -> None:
    window = SlidingWindow(10.0, buckets=10)
    window.add(100.0, 1, 0)
    window.add(104.5, 2, 1)
    assert window.totals(105.0) == (3, 1)
    assert window.totals(110.9) == (2, 1)  # the bucket of t=100 slid out
    assert window.totals(113.9) == (2, 1)
    assert window.totals(114.0) == (0, 0)  # and that of t=104.5
    window.add(200.0, 5, 5)  # a long gap clears everything at once
    assert window.totals(200.0) == (5, 5)


def test_min_per_second_allows_retries_without_any_requests() -> None:
    clock = Clock()
    budget = RetryBudget(BudgetConfig(ratio=0.2, min_per_second=2, window=5.0), clock)
    assert [budget.withdraw() for _ in range(11)] == [True] * 10 + [False]


def test_retries_are_limited_to_ratio_of_recent_requests() -> None:
    clock = Clock()
    budget = RetryBudget(BudgetConfig(ratio=0.2, min_per_second=0, window=10.0), clock)
    for _ in range(100):
        budget.deposit()
    assert [budget.withdraw() for _ in range(21)] == [True] * 20 + [False]
    budget.deposit()
    budget.deposit()
    budget.deposit()
    budget.deposit()
    budget.deposit()
    assert budget.withdraw()  # 105 requests allow 21 retries
    assert not budget.withdraw()


def test_deposits_expire_after_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(BudgetConfig(ratio=1.0, min_per_second=0, window=2.0), clock)
    for _ in range(10):
        budget.deposit()
    clock.now += 2.5
    assert not budget.withdraw()
    budget.deposit()
    assert budget.withdraw()
    assert budget.balance() == 0


def test_budget_bounds_upstream_load_under_steady_total_failure() -> None:
    """Every attempt fails, every request would make 3 attempts: the budget caps the
    extra load at ``ratio`` of requests plus ``min_per_second`` per second."""
    clock = Clock()
    ratio, floor, window = 0.2, 1.0, 10.0
    budget = RetryBudget(BudgetConfig(ratio=ratio, min_per_second=floor, window=window), clock)
    rng = random.Random(7)
    requests = attempts = 0
    duration = 120.0
    start = clock.now
    while clock.now - start < duration:
        clock.now += rng.expovariate(50.0)  # ~50 requests/s, Poisson arrivals
        requests += 1
        attempts += 1
        budget.deposit()
        for _ in range(2):
            if not budget.withdraw():
                break
            attempts += 1
    assert attempts <= requests * (1 + ratio) + floor * (duration + window)
    assert attempts >= requests * (1 + ratio) * 0.9  # and the budget is actually usable
