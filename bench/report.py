"""Timing, statistics and the printed table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def cpu_ms(fn: Callable[[], object]) -> float:
    """CPU milliseconds this process spent in ``fn``, all its threads: the work itself,
    which a busy neighbour on a shared machine does not stretch as it does wall time."""
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1000


def interleaved(
    runs: int, *fns: Callable[[], object], timer: Callable[[Callable[[], object]], float] = timed_ms
) -> list[list[float]]:
    """Milliseconds of each function, alternating them so a noisy neighbour hits all alike."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, times in zip(fns, samples, strict=True):
            times.append(timer(fn))
    return samples


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class Row:
    """One figure: ours, and where it has one, the baseline measured in the same run."""

    section: str
    name: str
    unit: str
    values: list[float]
    baseline: list[float] | None = None
    target: float | None = None  # a bound on the ratio to the baseline, or on the median
    target_is_ratio: bool = True
    target_is_minimum: bool = False  # the bound is a floor, not a ceiling
    note: str = ""
    median: float = field(init=False)
    p95: float = field(init=False)

    def __post_init__(self) -> None:
        self.values = [float(v) for v in self.values]  # plain floats: JSON, not numpy
        self.baseline = self.baseline and [float(v) for v in self.baseline]
        self.median = statistics.median(self.values)
        self.p95 = p95(self.values)

    @property
    def baseline_median(self) -> float | None:
        return statistics.median(self.baseline) if self.baseline else None

    @property
    def ratio(self) -> float | None:
        base = self.baseline_median
        return self.median / base if base else None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ratio if self.target_is_ratio else self.median
        if value is None:
            return False
        return value >= self.target if self.target_is_minimum else value <= self.target

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "runs": len(self.values),
            "baseline_median": self.baseline_median,
            "ratio": self.ratio,
            "met": self.met,
        }


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"


def table(rows: list[Row]) -> str:
    header = ("figure", "unit", "median", "p95", "runs", "baseline", "ratio", "target", "")
    lines = [header]
    for row in rows:
        target = "-"
        if row.target is not None:
            bound = "≥" if row.target_is_minimum else "≤"
            unit = "×" if row.target_is_ratio else f" {row.unit}"
            target = f"{bound} {row.target:.3g}{unit}"
        verdict = {True: "met", False: "MISSED", None: ""}[row.met]
        lines.append(
            (
                f"{row.section}: {row.name}",
                row.unit,
                _num(row.median),
                _num(row.p95),
                str(len(row.values)),
                _num(row.baseline_median),
                "-" if row.ratio is None else f"{row.ratio:.3f}",
                target,
                f"{verdict} {row.note}".strip(),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def compare(rows: list[dict], old_rows: list[dict]) -> str:
    """Each figure next to the same figure of an earlier run."""
    old = {(r["section"], r["name"]): r for r in old_rows}
    lines = []
    for row in rows:
        before = old.get((row["section"], row["name"]))
        if before:
            change = (row["median"] / before["median"] - 1) * 100 if before["median"] else 0
            lines.append(
                f"{row['section']}: {row['name']}: {_num(before['median'])} → "
                f"{_num(row['median'])} {row['unit']} ({change:+.0f} %)"
            )
    return "\n".join(lines)
