"""The machine-readable result every bench prints last, and the table bench/run.py builds from them.

A bench ends with one line `BENCH_RESULT {"bench": ..., "rows": [...]}`; each row is one metric:
`metric`, `unit`, `ours`, `baseline` (None where a metric has only a goal), `goal` (text, e.g. "ratio ≤ 1.10")
and `met` (whether this run reached the goal; None when there is no goal). `ratio` is ours / baseline.
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = "BENCH_RESULT "


def row(
    metric: str, ours: float, baseline: float | None, unit: str, goal: str = "", met: bool | None = None
) -> dict[str, Any]:
    return {"metric": metric, "unit": unit, "ours": ours, "baseline": baseline, "goal": goal, "met": met}


def emit(bench: str, rows: list[dict[str, Any]]) -> None:
    """Print the bench's result line (after its human output)."""
    print(PREFIX + json.dumps({"bench": bench, "rows": rows}), flush=True)


def parse(output: str) -> dict[str, Any] | None:
    """The last result line of a bench's output, or None."""
    lines = [line for line in output.splitlines() if line.startswith(PREFIX)]
    return json.loads(lines[-1].removeprefix(PREFIX)) if lines else None


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    unit = f" {unit}" if unit else ""
    if isinstance(value, int):
        return f"{value}{unit}"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}{unit}"
    return (f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}") + unit


def table(results: list[dict[str, Any]], failures: dict[str, str] | None = None) -> str:
    """One text table over every bench's rows: bench, metric, ours, baseline, ratio, goal, met."""
    header = ("bench", "metric", "ours", "baseline", "ratio", "goal", "met")
    lines = []
    for result in results:
        for r in result["rows"]:
            ratio = "—" if not r.get("baseline") else f"{r['ours'] / r['baseline']:.3f}×"
            met = {True: "yes", False: "NO", None: ""}[r.get("met")]
            lines.append(
                (result["bench"], r["metric"], _number(r["ours"], r["unit"]), _number(r["baseline"], r["unit"]), ratio)
                + (r.get("goal", ""), met)
            )
    for bench, reason in (failures or {}).items():
        lines.append((bench, f"FAILED: {reason}", "", "", "", "", "NO"))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    render = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])
