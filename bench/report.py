"""Printing the tables and goals, and writing ``bench/results/latest.json``."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from bench.scenarios import Outcome
from bench.summary import Goal, Row

RESULTS = Path(__file__).resolve().parent / "results"

_COLUMNS = (
    ("target", "<", 34),
    ("conns", ">", 5),
    ("req/s median [min-max]", ">", 26),
    ("vs direct", ">", 9),
    ("vs nginx", ">", 8),
    ("p50", ">", 8),
    ("p99", ">", 8),
    ("+p50", ">", 8),
    ("CPU µs/req", ">", 10),
    ("RSS MiB", ">", 7),
    ("errors", ">", 6),
)


def _latency(us: float | None, signed: bool = False) -> str:
    if us is None:
        return "—"
    sign = "+" if signed and us >= 0 else ""
    if abs(us) < 1000:
        return f"{sign}{us:.0f}µs"
    return f"{sign}{us / 1000:.2f}ms"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _cells(row: Row) -> tuple[str, ...]:
    spread = f"{row.rps_median:,.0f} [{row.rps_min:,.0f}-{row.rps_max:,.0f}]"
    return (
        row.label,
        str(row.connections),
        spread,
        _ratio(row.vs_direct),
        _ratio(row.vs_nginx),
        _latency(row.p50_us),
        _latency(row.p99_us),
        _latency(row.added_p50_us, signed=True),
        "—" if row.cpu_us_per_request is None else f"{row.cpu_us_per_request:.1f}",
        "—" if row.rss_peak_bytes is None else f"{row.rss_peak_bytes / 2**20:.1f}",
        str(row.errors) + ("" if row.valid else " !"),
    )


def table(outcome: Outcome, rows: list[Row]) -> str:
    """One scenario as a fixed-width text table, with its notes underneath."""
    scenario = outcome.scenario
    lines = [f"== {scenario.name}: {scenario.title} — {scenario.method} {scenario.path}"]
    header = "  ".join(f"{name:{align}{width}}" for name, align, width in _COLUMNS)
    lines += [header, "-" * len(header)]
    previous = None
    for row in rows:
        if previous is not None and row.connections != previous:
            lines.append("")
        previous = row.connections
        cells = _cells(row)
        lines.append(
            "  ".join(
                f"{cell:{align}{width}}"
                for cell, (_, align, width) in zip(cells, _COLUMNS, strict=True)
            )
        )
    lines += [f"  note: {note}" for note in outcome.notes]
    if any(not row.valid for row in rows):
        lines.append("  ! more than 0.1 % of that row's requests failed: do not trust it")
    return "\n".join(lines)


def goals_table(goals: list[Goal]) -> str:
    width = max((len(g.goal) for g in goals), default=10)
    lines = ["== goals (issue 11), judged on this run"]
    for goal in goals:
        note = f"  ({goal.note})" if goal.note else ""
        lines.append(f"  {goal.verdict:<5}  {goal.goal:<{width}}  {goal.measured}{note}")
    return "\n".join(lines)


LEGEND = (
    "req/s: median over rounds [min-max]; vs direct / vs nginx: median of same-round ratios; "
    "p50/p99: median over rounds;\n+p50: latency added to direct's p50 (median of same-round "
    "differences); CPU µs/req: the proxy process's utime+stime\nover the run ÷ requests "
    "(nginx: master + worker); RSS: peak VmRSS sampled during the runs; errors: non-2xx "
    "answers + socket errors."
)


def document(
    meta: dict[str, object],
    results: dict[str, tuple[Outcome, list[Row]]],
    failures: dict[str, str],
    goals: list[Goal],
) -> dict[str, object]:
    """Everything of this run as one JSON-ready document (every run, not only medians)."""
    return {
        "meta": meta,
        "scenarios": {
            name: {
                "title": outcome.scenario.title,
                "method": outcome.scenario.method,
                "path": outcome.scenario.path,
                "targets": {key: t.describe() for key, t in outcome.targets.items()},
                "notes": outcome.notes,
                "rows": [row.as_dict() for row in rows],
                "runs": [run.as_dict() for run in outcome.runs],
            }
            for name, (outcome, rows) in results.items()
        },
        "failed": failures,
        "goals": [goal.as_dict() for goal in goals],
    }


def write(document: dict[str, object], directory: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``latest.json`` and a timestamped copy; return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dated = directory / f"bench-{stamp}.json"
    dated.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    latest = directory / "latest.json"
    shutil.copyfile(dated, latest)
    return latest, dated
