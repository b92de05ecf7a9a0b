"""How fast a comparison ran against another one on the same runs: the machine's pace, from the run files.

Not a test, and not a timing of its own: it reads two run directories of
`python -m tsdkd_plugin.experiments.compare` (each run's result file records the run's own wall
time, `seconds`; each invocation's record under `invocations/` the comparison's) and prints

- per run directory: the wall time of its invocations (builds apart and in all), the run-hours of
  its result files per regime and stage, and wall hours per run-hour;
- the runs both made: the same regime, stage, method, settings and seed (the same relative path of
  the result file) that also scored the same accuracy, i.e. the same computation twice (a run
  that is not deterministic, GRPO's, scores otherwise and is left out, and so is any run whose
  code changed its result), and the ratio of their recorded times, in all and per method.

When the two comparisons ran the same code at the same `--jobs` on the same kind of processor, that
ratio is how much faster one machine was than the other on that day: the figure that says whether a
difference in the comparison's wall time comes from its protocol or from the machine.

    .venv/bin/python benchmarks/comparison_pace.py RUN_DIR REFERENCE_RUN_DIR [--json OUT]
    e.g. benchmarks/comparison_pace.py runs/compare28fresh/run runs/compare26/run
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tsdkd_plugin.experiments.comparison import INVOCATIONS_DIR, read_invocations  # noqa: E402
from tsdkd_plugin.experiments.runner import BUILD_PHASE  # noqa: E402


def result_files(run_dir: Path) -> dict[str, dict]:
    """Relative path -> result record, for every finished run (failed runs' files left out)."""
    found = {}
    for path in sorted(run_dir.glob("*/results/*/*/*.json")):
        if path.name.endswith(".failed.json"):
            continue
        found[str(path.relative_to(run_dir))] = json.loads(path.read_text(encoding="utf-8"))
    return found


def invocation_hours(run_dir: Path) -> tuple[float, float, int]:
    """(wall hours in all, of which building teacher and students, number of invocations)."""
    records = read_invocations(run_dir)
    wall = sum(record["updated"] - record["started"] for record in records)
    building = sum((record.get("phases") or {}).get(BUILD_PHASE, 0.0) for record in records)
    return wall / 3600, building / 3600, len(records)


def summarize(run_dir: Path, results: dict[str, dict]) -> dict:
    by_stage: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for record in results.values():
        key = f"{record['regime']} / {record['stage']}"
        by_stage[key][0] += 1
        by_stage[key][1] += record["seconds"] / 3600
    wall, building, invocations = invocation_hours(run_dir)
    run_hours = sum(hours for _, hours in by_stage.values())
    return {
        "run_dir": str(run_dir),
        "invocations": invocations,
        "wall_hours": wall,
        "building_hours": building,
        "runs": len(results),
        "run_hours": run_hours,
        "wall_per_run_hour": (wall - building) / run_hours if run_hours else None,
        "by_stage": {key: {"runs": n, "run_hours": hours} for key, (n, hours) in sorted(by_stage.items())},
    }


def same_runs(results: dict[str, dict], reference: dict[str, dict]) -> dict:
    """The runs both directories made with the same outcome, and the ratio of their recorded times."""
    per_method: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])
    differing = 0
    for rel, record in results.items():
        other = reference.get(rel)
        if other is None:
            continue
        if record["evaluation"]["accuracy"] != other["evaluation"]["accuracy"]:
            differing += 1
            continue
        entry = per_method[record["method"]]
        entry[0] += 1
        entry[1] += record["seconds"]
        entry[2] += other["seconds"]
    runs = sum(n for n, _, _ in per_method.values())
    seconds = sum(s for _, s, _ in per_method.values())
    reference_seconds = sum(r for _, _, r in per_method.values())
    return {
        "runs": runs,
        "left_out_scored_otherwise": differing,
        "run_hours": seconds / 3600,
        "reference_run_hours": reference_seconds / 3600,
        "ratio": seconds / reference_seconds if reference_seconds else None,
        "per_method": {
            method: {"runs": n, "ratio": s / r if r else None} for method, (n, s, r) in sorted(per_method.items())
        },
    }


def pace(run_dir: Path, reference_dir: Path) -> dict:
    for path in (run_dir, reference_dir):
        if not (path / INVOCATIONS_DIR).is_dir() and not any(path.glob("*/results")):
            raise SystemExit(f"{path} is not a comparison run directory (no invocations/ or */results/ in it)")
    results, reference = result_files(run_dir), result_files(reference_dir)
    return {
        "this": summarize(run_dir, results),
        "reference": summarize(reference_dir, reference),
        "same_runs": same_runs(results, reference),
    }


def print_pace(report: dict) -> None:
    for name in ("this", "reference"):
        s = report[name]
        per = f"{s['wall_per_run_hour']:.3f}" if s["wall_per_run_hour"] is not None else "-"
        print(f"{name}: {s['run_dir']}")
        print(
            f"  {s['invocations']} invocation(s): {s['wall_hours']:.2f} h of wall, {s['building_hours']:.2f} h "
            f"building; {s['runs']} runs, {s['run_hours']:.2f} run-hours, {per} wall hours per run-hour"
        )
        for key, stage in s["by_stage"].items():
            print(f"    {key:<28} {stage['runs']:4d} runs  {stage['run_hours']:6.2f} run-hours")
    same = report["same_runs"]
    if not same["runs"]:
        print("no run made by both with the same outcome")
        return
    print(
        f"same runs (same file, same accuracy): {same['runs']} "
        f"({same['left_out_scored_otherwise']} shared but scored otherwise, left out): "
        f"{same['run_hours']:.2f} against {same['reference_run_hours']:.2f} run-hours, "
        f"ratio {same['ratio']:.2f}"
    )
    for method, entry in same["per_method"].items():
        print(f"    {method:<28} {entry['runs']:4d} runs  ratio {entry['ratio']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a comparison's --run-dir")
    parser.add_argument("reference_dir", type=Path, help="an earlier comparison's --run-dir to compare it with")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    options = parser.parse_args(argv)
    report = pace(options.run_dir, options.reference_dir)
    print_pace(report)
    if options.json:
        options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
