"""The timer wheel behind upstream timeouts (``proxy/timers.py``)."""

from __future__ import annotations

import asyncio

import uvloop

from proxy.timers import TimerWheel, wheel_for


def run(coro):  # type: ignore[no-untyped-def]
    return uvloop.run(coro)


def test_timeout_fires_once_and_never_before_its_deadline() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        wheel = TimerWheel(loop)
        fired: list[float] = []
        deadline = loop.time() + 0.05
        wheel.call_later(0.05, lambda: fired.append(loop.time()))
        await asyncio.sleep(0.2)
        assert fired and fired[0] >= deadline
        return fired

    assert len(run(main())) == 1


def test_cancelled_timeout_never_fires_and_is_forgotten() -> None:
    async def main() -> None:
        wheel = TimerWheel(asyncio.get_running_loop())
        fired: list[str] = []
        timeout = wheel.call_later(0.02, fired.append, "cancelled")
        wheel.call_later(0.02, fired.append, "kept")
        timeout.cancel()
        timeout.cancel()  # twice is harmless
        await asyncio.sleep(0.1)
        assert fired == ["kept"]
        assert wheel.buckets == {}

    run(main())


def test_ticker_stops_when_nothing_is_pending_and_restarts_on_demand() -> None:
    async def main() -> None:
        wheel = TimerWheel(asyncio.get_running_loop())
        fired: list[int] = []
        wheel.call_later(0.01, fired.append, 1)
        await asyncio.sleep(0.1)
        assert wheel._ticker is None  # idle: no loop timer left running
        wheel.call_later(0.01, fired.append, 2)
        await asyncio.sleep(0.1)
        assert fired == [1, 2]

    run(main())


def test_a_failing_callback_does_not_stop_the_others() -> None:
    async def main() -> None:
        wheel = TimerWheel(asyncio.get_running_loop())
        fired: list[str] = []

        def boom() -> None:
            raise RuntimeError("boom")

        wheel.call_later(0.01, boom)
        wheel.call_later(0.01, fired.append, "same bucket")
        wheel.call_later(0.05, fired.append, "later")
        await asyncio.sleep(0.15)
        assert sorted(fired) == ["later", "same bucket"]

    run(main())


def test_each_loop_has_its_own_wheel() -> None:
    async def main() -> TimerWheel:
        loop = asyncio.get_running_loop()
        assert wheel_for(loop) is wheel_for(loop)
        return wheel_for(loop)

    assert run(main()) is not run(main())
