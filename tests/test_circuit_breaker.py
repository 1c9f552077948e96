"""The circuit breaker state machine, driven by a controllable clock (no sleeping)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from proxy.config.schema import CircuitBreaker as BreakerConfig
from proxy.layers.circuit_breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    failure_kinds,
    failure_statuses,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Stands in for ``loop.call_later`` on the fake clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.timers: list[Timer] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock.now + delay, callback)
        self.timers.append(timer)
        return timer

    def run_due(self) -> None:
        for timer in list(self.timers):
            if not timer.cancelled and timer.when <= self.clock.now:
                self.timers.remove(timer)
                timer.callback()


_counter = 0


def make(
    clock: Clock, schedule: Scheduler | None = None, probe_timeout: float = 5.0, **settings: object
) -> CircuitBreaker:
    global _counter
    _counter += 1
    defaults: dict[str, object] = {
        "failure_threshold": 3,
        "success_threshold": 2,
        "open_timeout": 10.0,
        "half_open_max_requests": 2,
    }
    config = BreakerConfig(**{**defaults, **settings})
    return CircuitBreaker(
        config,
        upstream="unit",
        endpoint=f"http://breaker-{_counter}",
        probe_timeout=probe_timeout,
        clock=clock,
        wall_clock=lambda: 1_700_000_000.0,
        schedule=schedule,
    )


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        ticket = breaker.acquire()
        assert ticket is not None
        breaker.record(ticket, True)


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        ticket = breaker.acquire()
        assert ticket is not None
        breaker.record(ticket, False)


def trip(breaker: CircuitBreaker) -> None:
    fail(breaker, 3)
    assert breaker.state == OPEN


def test_consecutive_failures_open_the_circuit_and_a_success_resets_the_count() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker, 2)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_open_circuit_refuses_every_call_until_open_timeout_then_turns_half_open() -> None:
    clock = Clock()
    breaker = make(clock)
    trip(breaker)
    clock.advance(9.9)
    assert breaker.acquire() is None
    assert breaker.retry_after() == pytest.approx(0.1)
    assert breaker.state == OPEN
    clock.advance(0.1)
    assert breaker.state == HALF_OPEN
    assert breaker.retry_after() == 0.0


def test_half_open_admits_at_most_max_probes_and_the_rest_fail_fast() -> None:
    clock = Clock()
    breaker = make(clock, half_open_max_requests=2)
    trip(breaker)
    clock.advance(10)
    first, second = breaker.acquire(), breaker.acquire()
    assert first is not None and second is not None
    assert [breaker.acquire() for _ in range(50)] == [None] * 50
    assert breaker.retry_after() == 1.0  # probes decide soon
    assert breaker.snapshot()["probes_in_flight"] == 2


def test_success_threshold_successful_probes_close_the_circuit() -> None:
    clock = Clock()
    breaker = make(clock, half_open_max_requests=1, success_threshold=3)
    trip(breaker)
    clock.advance(10)
    for _ in range(2):
        ticket = breaker.acquire()
        assert ticket is not None
        assert breaker.acquire() is None  # one probe at a time
        breaker.record(ticket, False)
        assert breaker.state == HALF_OPEN
    succeed(breaker)
    assert breaker.state == CLOSED
    assert breaker.snapshot() == {
        "state": "closed",
        "failures": 0,
        "opened_at": None,
        "retry_after": 0,
        "probes_in_flight": 0,
    }


def test_a_failed_probe_reopens_for_a_full_open_timeout() -> None:
    clock = Clock()
    breaker = make(clock)
    trip(breaker)
    clock.advance(10)
    ok, bad = breaker.acquire(), breaker.acquire()
    assert ok is not None and bad is not None
    breaker.record(ok, False)
    breaker.record(bad, True)
    assert breaker.state == OPEN
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(9)
    assert breaker.acquire() is None
    clock.advance(1)
    assert breaker.acquire() is not None


def test_hung_half_open_probe_counts_as_failed_and_reopens_instead_of_sticking() -> None:
    clock = Clock()
    breaker = make(clock, half_open_max_requests=1, probe_timeout=2.0)
    trip(breaker)
    clock.advance(10)
    hung = breaker.acquire()
    assert hung is not None
    assert breaker.acquire() is None  # the only probe slot is taken...
    clock.advance(1.9)
    assert breaker.state == HALF_OPEN
    clock.advance(0.1)
    # ...but not forever: past the probe deadline the probe has failed.
    assert breaker.state == OPEN
    assert breaker.acquire() is None
    breaker.record(hung, False)  # its late success is ignored
    assert breaker.state == OPEN
    clock.advance(10)
    assert breaker.state == HALF_OPEN
    assert breaker.acquire() is not None


def test_hung_probe_reopens_on_the_scheduler_without_further_traffic() -> None:
    clock = Clock()
    scheduler = Scheduler(clock)
    breaker = make(clock, scheduler, half_open_max_requests=1, probe_timeout=2.0)
    gauge = ("sidecar_circuit_breaker_state", {"upstream": "unit", "endpoint": breaker.name[5:]})
    trip(breaker)
    assert REGISTRY.get_sample_value(*gauge) == 2
    clock.advance(10.01)
    scheduler.run_due()  # open -> half-open on time, no request needed
    assert breaker._state == HALF_OPEN
    assert REGISTRY.get_sample_value(*gauge) == 1
    assert breaker.acquire() is not None
    clock.advance(2.01)
    scheduler.run_due()  # the probe deadline passes: back to open
    assert breaker._state == OPEN
    assert REGISTRY.get_sample_value(*gauge) == 2


def test_results_from_before_a_transition_are_ignored() -> None:
    clock = Clock()
    breaker = make(clock, half_open_max_requests=1)
    slow_calls = [breaker.acquire() for _ in range(5)]  # admitted while closed
    trip(breaker)
    clock.advance(10)
    probe = breaker.acquire()
    assert probe is not None
    for ticket in slow_calls:  # they finish now, failing: not the probe's verdict
        assert ticket is not None
        breaker.record(ticket, True)
    assert breaker.state == HALF_OPEN
    breaker.record(probe, False)
    succeed(breaker)
    assert breaker.state == CLOSED
    # A failure admitted during an earlier closed period does not count in this one.
    stale = slow_calls[0]
    assert stale is not None
    breaker.record(stale, True)
    breaker.record(stale, True)
    fail(breaker, 2)
    assert breaker.state == CLOSED


def test_released_probe_frees_its_slot_without_a_verdict() -> None:
    clock = Clock()
    breaker = make(clock, half_open_max_requests=1)
    trip(breaker)
    clock.advance(10)
    probe = breaker.acquire()
    assert probe is not None
    breaker.release(probe)  # the client went away
    assert breaker.state == HALF_OPEN
    assert breaker.acquire() is not None


def test_failure_ratio_over_the_window_opens_once_min_requests_is_reached() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=None, failure_ratio=0.5, min_requests=10, window=10.0)
    for _ in range(4):  # alternating: never two failures in a row
        fail(breaker)
        succeed(breaker)
    fail(breaker)
    assert breaker.state == CLOSED  # 5 of 9 failed, but below min_requests
    fail(breaker)
    assert breaker.state == OPEN  # 6 of 10


def test_failure_ratio_forgets_calls_older_than_the_window() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=None, failure_ratio=0.5, min_requests=10, window=10.0)
    fail(breaker, 9)
    clock.advance(11)  # those failures slide out
    succeed(breaker, 6)
    fail(breaker, 4)
    assert breaker.state == CLOSED  # 4 of 10 in the window


def test_both_modes_at_once_open_on_whichever_trips_first() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=3, failure_ratio=0.4, min_requests=10)
    succeed(breaker, 5)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker)
    assert breaker.state == CLOSED  # 3 of 9: below min_requests
    fail(breaker)
    assert breaker.state == OPEN  # ratio: 4 of 10 failed, never 3 in a row
    clock.advance(10)
    probe = breaker.acquire()
    assert probe is not None
    breaker.record(probe, False)
    succeed(breaker)
    fail(breaker, 2)
    assert breaker.state == CLOSED  # the window started afresh
    fail(breaker)
    assert breaker.state == OPEN  # consecutive: 3 in a row


def test_failure_on_decides_what_counts() -> None:
    assert failure_statuses(["5xx"]) == frozenset(range(500, 600))
    assert failure_statuses(["502", "429", "reset"]) == {502, 429}
    assert failure_kinds(["connect-failure", "timeout"]) == {"connect-failure", "timeout"}
    assert failure_kinds(["5xx"]) == {"protocol"}  # a malformed answer is a 502
    clock = Clock()
    breaker = make(clock, failure_on=["connect-failure", "503"])
    assert breaker.fails_on_error("connect-failure")
    assert not breaker.fails_on_error("timeout")
    assert breaker.fails_on_status(503)
    assert not breaker.fails_on_status(500)
    assert not breaker.fails_on_status(200)


def test_disabled_breaker_never_opens() -> None:
    clock = Clock()
    breaker = make(clock, enabled=False)
    fail(breaker, 100)
    assert breaker.state == CLOSED
    assert breaker.acquire() is not None


def test_snapshot_reports_state_failures_and_time_to_half_open() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 2)
    assert breaker.snapshot()["failures"] == 2
    fail(breaker)
    clock.advance(2.5)
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["failures"] == 3  # what opened it
    assert snap["opened_at"] == 1_700_000_000.0
    assert snap["retry_after"] == 8  # ceil(7.5)


def test_transitions_are_counted_with_from_and_to_states() -> None:
    clock = Clock()
    breaker = make(clock, half_open_max_requests=1, success_threshold=1)
    endpoint = breaker.name[5:]

    def transitions(old: str, new: str) -> float:
        labels = {"upstream": "unit", "endpoint": endpoint, "from_state": old, "to_state": new}
        return REGISTRY.get_sample_value("sidecar_circuit_breaker_transitions_total", labels) or 0

    trip(breaker)
    clock.advance(10)
    succeed(breaker)
    assert transitions("closed", "open") == 1
    assert transitions("open", "half_open") == 1
    assert transitions("half_open", "closed") == 1


def test_closed_breaker_stops_touching_timers_and_metrics() -> None:
    clock = Clock()
    scheduler = Scheduler(clock)
    breaker = make(clock, scheduler)
    trip(breaker)
    assert scheduler.timers and not scheduler.timers[0].cancelled
    breaker.close()
    assert scheduler.timers[0].cancelled


def test_a_replaced_breaker_no_longer_drives_the_state_gauge() -> None:
    """After a reload the old breaker may still see in-flight results: the gauge shows
    the new one's state."""
    clock = Clock()
    config = BreakerConfig(failure_threshold=1, open_timeout=10.0)
    kwargs: dict = {"upstream": "unit", "endpoint": "http://reloaded", "probe_timeout": 5.0}
    old = CircuitBreaker(config, clock=clock, **kwargs)
    fail(old)
    gauge = ("sidecar_circuit_breaker_state", {"upstream": "unit", "endpoint": "http://reloaded"})
    assert REGISTRY.get_sample_value(*gauge) == 2
    new = CircuitBreaker(config, clock=clock, **kwargs)
    assert REGISTRY.get_sample_value(*gauge) == 0
    clock.advance(10)
    assert old.state == HALF_OPEN
    assert REGISTRY.get_sample_value(*gauge) == 0
    fail(new)
    assert REGISTRY.get_sample_value(*gauge) == 2
