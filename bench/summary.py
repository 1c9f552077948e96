"""From runs to table rows (median and spread per target) and to the goals of issue 11.

Ratios are the median over rounds of same-round ratios (target req/s ÷ direct req/s in
the same round), so that slow drifts of a shared machine cancel out; the added p50 is
likewise the median of same-round differences. Latency percentiles and CPU per request
are medians over rounds; RSS is the peak over all rounds.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Literal

from bench.scenarios import Outcome, Run

RSS_GOAL_BYTES = 64_000_000  # "RSS under load <= 64 MB", read strictly (61.0 MiB)
ERROR_TOLERANCE = 0.001  # more non-2xx/socket errors than this share invalidates a row
NOISY_SPREAD = 0.5  # (max - min) / median of req/s across rounds above this: noisy
IMPLAUSIBLE_RATIO = 1.10  # a proxy this much faster than direct: the baseline was disturbed


@dataclass
class Row:
    """One target at one connection count, summarised over the rounds."""

    target: str
    label: str
    kind: str
    connections: int
    rounds: int
    rps_median: float
    rps_min: float
    rps_max: float
    vs_direct: float | None
    vs_nginx: float | None
    p50_us: float
    p99_us: float
    added_p50_us: float | None
    cpu_us_per_request: float | None
    rss_peak_bytes: int | None
    requests: int
    errors: int

    @property
    def error_share(self) -> float:
        return self.errors / self.requests if self.requests else 1.0

    @property
    def spread(self) -> float:
        return (self.rps_max - self.rps_min) / self.rps_median if self.rps_median else 0.0

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.error_share <= ERROR_TOLERANCE

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _same_round(runs: list[Run], reference: list[Run], combine: str) -> list[float]:
    by_round = {r.round: r for r in reference}
    values = []
    for run in runs:
        other = by_round.get(run.round)
        if other is None:
            continue
        if combine == "ratio" and other.result.rps:
            values.append(run.result.rps / other.result.rps)
        elif combine == "difference":
            values.append(run.result.p50_us - other.result.p50_us)
    return values


def summarize(outcome: Outcome) -> list[Row]:
    rows = []
    connections = sorted({run.connections for run in outcome.runs})
    for count in connections:
        at_count = [run for run in outcome.runs if run.connections == count]
        direct = [run for run in at_count if run.target == "direct"]
        nginx = [run for run in at_count if run.target == "nginx"]
        for key, target in outcome.targets.items():
            runs = [run for run in at_count if run.target == key]
            if not runs:
                continue
            rps = [run.result.rps for run in runs]
            cpu = [run.cpu_us_per_request for run in runs if run.cpu_us_per_request is not None]
            rss = [run.rss_peak_bytes for run in runs if run.rss_peak_bytes]
            rows.append(
                Row(
                    target=key,
                    label=target.label,
                    kind=target.kind,
                    connections=count,
                    rounds=len(runs),
                    rps_median=statistics.median(rps),
                    rps_min=min(rps),
                    rps_max=max(rps),
                    vs_direct=_median(_same_round(runs, direct, "ratio")),
                    vs_nginx=_median(_same_round(runs, nginx, "ratio")),
                    p50_us=statistics.median(run.result.p50_us for run in runs),
                    p99_us=statistics.median(run.result.p99_us for run in runs),
                    added_p50_us=_median(_same_round(runs, direct, "difference"))
                    if key != "direct"
                    else None,
                    cpu_us_per_request=_median(cpu),
                    rss_peak_bytes=max(rss) if rss else None,
                    requests=sum(run.result.requests for run in runs),
                    errors=sum(run.result.errors for run in runs),
                )
            )
    return rows


Verdict = Literal["PASS", "FAIL", "NOISY", "n/a"]


@dataclass
class Goal:
    """One target figure from issue 11, the measured value and the verdict."""

    goal: str
    measured: str
    verdict: Verdict
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _find(rows: list[Row], target: str, connections: int) -> Row | None:
    for row in rows:
        if row.target == target and row.connections == connections:
            return row
    return None


def _check(
    goal: str,
    row: Row | None,
    value: float | None,
    passes: bool,
    shown: str,
    inactive: set[str],
    baseline: Row | None = None,
    timing: bool = True,
) -> Goal:
    """The verdict on ``value`` of ``row``; ``baseline`` is direct's row for ratio goals;
    ``timing`` goals (throughput, latency) get a note when the rounds disagreed widely."""
    if row is None or value is None:
        return Goal(goal, "not measured", "n/a")
    notes = []
    verdict: Verdict = "PASS" if passes else "FAIL"
    for checked in (baseline, row):
        if timing and checked is not None and checked.spread > NOISY_SPREAD:
            notes.append(
                f"noisy: {checked.target} varied {checked.rps_min:,.0f}-{checked.rps_max:,.0f} "
                "req/s across rounds"
            )
    if baseline is not None and value > IMPLAUSIBLE_RATIO:
        verdict = "NOISY"
        notes.append("faster than direct: the direct baseline was disturbed, rerun when quiet")
    if not row.valid:
        verdict = "FAIL"
        notes.append(f"{row.errors} errors in {row.requests} requests: figure not trustworthy")
    if row.target in inactive:
        notes.append("a feature of this target looked inactive (see notes)")
    return Goal(goal, shown, verdict, "; ".join(notes))


def goals(
    results: dict[str, tuple[Outcome, list[Row]]], high: int, low: int, cpu_us: int = 1000
) -> list[Goal]:
    """The issue's goals, judged on the rows at ``high`` (32) and ``low`` (1) connections."""
    out: list[Goal] = []
    main = results.get("main", (None, []))[1]
    inactive = {
        note.split(":", 1)[0]
        for outcome, _ in results.values()
        for note in outcome.notes
        if "looks inactive" in note
    }

    def ratio(
        rows: list[Row], target: str, minimum: float, text: str, strict: bool = False
    ) -> None:
        row = _find(rows, target, high)
        value = row.vs_direct if row else None
        shown = f"{value:.2f} x direct" if value is not None else ""
        passes = value is not None and (value > minimum if strict else value >= minimum)
        direct = _find(rows, "direct", high)
        out.append(_check(text, row, value, passes, shown, inactive, direct))

    ratio(main, "all-features", 0.40, f"all features ≥ 0.40 x direct at {high} conns")
    ratio(main, "pass-through", 0.50, f"pass-through ≥ 0.50 x direct at {high} conns")
    for target in ("pass-through", "all-features"):
        row = _find(main, target, low)
        added = row.added_p50_us if row else None
        out.append(
            _check(
                f"{target}: p50 added ≤ 150 µs at {low} conn",
                row,
                added,
                added is not None and added <= 150,
                f"{added:+.0f} µs" if added is not None else "",
                inactive,
            )
        )
    row = _find(main, "pass-through", high)
    cpu = row.cpu_us_per_request if row else None
    out.append(
        _check(
            f"pass-through CPU ≤ 60 µs/request (at {high} conns)",
            row,
            cpu,
            cpu is not None and cpu <= 60,
            f"{cpu:.1f} µs/request" if cpu is not None else "",
            inactive,
            timing=False,
        )
    )
    redis = results.get("redis", (None, []))[1]
    # Under keyed POSTs a memory-store sidecar also holds every idempotency record it
    # stored (by design, bounded by store.max_entries, ~1.3 KiB each): that is state, not
    # overhead, so the keyed-POST line judges the sidecars whose records live in Redis.
    keyed_redis = [r for r in redis if r.target.endswith("redis")]
    for rows, load in ((main, "GET"), (keyed_redis, "keyed-POST (Redis store)")):
        sidecar_rows = [r for r in rows if r.kind == "sidecar" and r.rss_peak_bytes]
        worst = max(sidecar_rows, key=lambda r: r.rss_peak_bytes or 0, default=None)
        rss = worst.rss_peak_bytes if worst else None
        out.append(
            _check(
                f"sidecar RSS under {load} load ≤ 64 MB (= 61.0 MiB), worst sidecar",
                worst,
                rss,
                rss is not None and rss <= RSS_GOAL_BYTES,
                f"{rss / 2**20:.1f} MiB ({worst.target}, {worst.connections} conn)"
                if rss and worst
                else "",
                inactive,
                timing=False,
            )
        )
    ratio(redis, "keyed-redis", 0.25, f"keyed POSTs, redis store ≥ 0.25 x direct at {high} conns")
    cpu_rows = results.get("cpu", (None, []))[1]
    for target in ("pass-through", "all-features"):
        ratio(
            cpu_rows,
            target,
            0.90,
            f"{cpu_us / 1000:g} ms-CPU upstream: {target} costs < 10 % (> 0.90 x direct) "
            f"at {high} conns",
            strict=True,
        )
    return out
