"""Collect several evaluation JSONs (from `evaluate`) into a markdown table and a bar chart.

    python -m tsdkd_plugin.recipes_tools.compare results/*.json \\
        --baseline student-base --out-md results/comparison.md --out-png results/comparison.png

Rows are runs (in the order given), columns benchmarks (in first-seen order) plus their
unweighted average over the benchmarks that every run has. Scores are shown in percent; the
best run per column is in bold; with --baseline each cell also shows the change against that
run in points. A benchmark missing from a run is shown as "-" and left out of its average.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


class CompareError(ValueError):
    """An input file is missing, not an evaluation JSON, or two runs share a name."""


def load_runs(paths: Sequence[str]) -> list[dict]:
    runs, names = [], set()
    for path in paths:
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CompareError(f"{path} does not exist") from None
        except json.JSONDecodeError as error:
            raise CompareError(f"{path} is not valid JSON ({error.msg})") from None
        if not isinstance(report, dict) or not isinstance(report.get("benchmarks"), dict) or "run" not in report:
            raise CompareError(
                f"{path} is not an evaluation result (no 'run' and 'benchmarks'); write it with evaluate"
            )
        if report["run"] in names:
            raise CompareError(f"two results are named {report['run']!r}; rerun evaluate with distinct --name values")
        names.add(report["run"])
        runs.append(report)
    if not runs:
        raise CompareError("no result files given")
    return runs


def score_table(runs: Sequence[dict]) -> tuple:
    """(benchmark names, {run: {benchmark: score}}, names of benchmarks every run has)."""
    benchmarks: list[str] = []
    scores: dict[str, dict[str, float]] = {}
    for run in runs:
        row = {}
        for name, entry in run["benchmarks"].items():
            if entry.get("score") is None:
                continue
            if name not in benchmarks:
                benchmarks.append(name)
            row[name] = float(entry["score"])
        scores[run["run"]] = row
    common = [name for name in benchmarks if all(name in row for row in scores.values())]
    return benchmarks, scores, common


def average(row: dict[str, float], names: Sequence[str]) -> float | None:
    values = [row[name] for name in names if name in row]
    return sum(values) / len(values) if values else None


def markdown_table(runs: Sequence[dict], baseline: str | None = None) -> str:
    benchmarks, scores, common = score_table(runs)
    if baseline is not None and baseline not in scores:
        raise CompareError(f"--baseline {baseline!r} is none of the runs: {', '.join(scores)}")
    columns = benchmarks + ["average"]
    for row in scores.values():
        row["average"] = average(row, common)
    best = {
        column: max((row[column] for row in scores.values() if row.get(column) is not None), default=None)
        for column in columns
    }

    def cell(run: str, column: str) -> str:
        value = scores[run].get(column)
        if value is None:
            return "-"
        text = f"{100 * value:.1f}"
        if best[column] is not None and abs(value - best[column]) < 1e-12:
            text = f"**{text}**"
        if baseline is not None and run != baseline and scores[baseline].get(column) is not None:
            text += f" ({100 * (value - scores[baseline][column]):+.1f})"
        return text

    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for run in scores:
        lines.append(f"| {run} | " + " | ".join(cell(run, column) for column in columns) + " |")
    metrics = {}
    for run in runs:
        for name, entry in run["benchmarks"].items():
            metrics.setdefault(name, f"{entry.get('metric')}, {entry.get('num_fewshot')}-shot")
    notes = [
        f"Scores in percent (greedy decoding); average over the benchmarks every run has "
        f"({', '.join(common) or 'none'})."
    ]
    if baseline is not None:
        notes.append(f"In parentheses: change against {baseline} in points.")
    notes.append("Metrics: " + "; ".join(f"{name}: {metric}" for name, metric in metrics.items()) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot(runs: Sequence[dict], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes and CI
    import matplotlib.pyplot as plt

    benchmarks, scores, common = score_table(runs)
    columns = benchmarks + (["average"] if common else [])
    for row in scores.values():
        row["average"] = average(row, common)
    width = 0.8 / max(len(scores), 1)
    figure, axes = plt.subplots(figsize=(min(16.0, max(7.0, 0.9 * len(columns) + 3)), 4.5))
    for index, (run, row) in enumerate(scores.items()):
        xs = [position + (index - (len(scores) - 1) / 2) * width for position in range(len(columns))]
        heights = [100 * row[column] if row.get(column) is not None else 0.0 for column in columns]
        bars = axes.bar(xs, heights, width=width, label=run)
        for bar, column in zip(bars, columns, strict=True):
            if row.get(column) is None:
                bar.set_hatch("//")
                bar.set_alpha(0.2)
    axes.set_xticks(range(len(columns)))
    axes.set_xticklabels(columns, rotation=30, ha="right")
    axes.set_ylabel("score (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Greedy evaluation by benchmark")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars stay readable
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsdkd_plugin.recipes_tools.compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("results", nargs="+", help="JSON files written by tsdkd_plugin.recipes_tools.evaluate")
    parser.add_argument("--baseline", default=None, help="run name to show differences against")
    parser.add_argument("--out-md", default=None, help="markdown file (default: print to stdout)")
    parser.add_argument("--out-png", default=None, help="bar chart (PNG)")
    options = parser.parse_args(argv)
    try:
        runs = load_runs(options.results)
        table = markdown_table(runs, options.baseline)
    except CompareError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    if options.out_md:
        Path(options.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out_md).write_text(table, encoding="utf-8")
        print(f"wrote {options.out_md}", file=sys.stderr)
    else:
        print(table, end="")
    if options.out_png:
        plot(runs, options.out_png)
        print(f"wrote {options.out_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
