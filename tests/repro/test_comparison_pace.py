"""benchmarks/comparison_pace.py: which runs count as the same run twice, and the arithmetic of the ratio
and of the invocations' wall time (on run directories written here, not on real runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsdkd_plugin.testing import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "comparison_pace.py"


def load_bench():
    return load_script(BENCH, "comparison_pace")


def write_run(run_dir: Path, rel: str, method: str, seconds: float, accuracy: float) -> None:
    regime, _, stage, *_ = rel.split("/")
    path = run_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "regime": regime,
        "stage": stage,
        "method": method,
        "seconds": seconds,
        "evaluation": {"accuracy": accuracy},
    }
    path.write_text(json.dumps(record), encoding="utf-8")


def write_invocation(run_dir: Path, name: str, started: float, updated: float, building: float) -> None:
    path = run_dir / "invocations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": started, "updated": updated, "phases": {"building": building}}))


@pytest.fixture()
def two_comparisons(tmp_path):
    this, reference = tmp_path / "this", tmp_path / "reference"
    gkd = "paper-like/results/test/gkd/lr=0.0001--seed0.json"
    seqkd = "paper-like/results/tune/seqkd/lr=3e-05--seed100.json"
    grpo = "weak-student/results/test/grpo/lr=0.0001--seed1.json"
    write_run(this, gkd, "gkd", 300.0, 0.74)
    write_run(reference, gkd, "gkd", 200.0, 0.74)
    write_run(this, seqkd, "seqkd", 90.0, 0.70)
    write_run(reference, seqkd, "seqkd", 60.0, 0.70)
    write_run(this, grpo, "grpo", 1000.0, 0.31)  # re-drawn: scored otherwise, not the same run
    write_run(reference, grpo, "grpo", 100.0, 0.29)
    write_run(this, "weak-student/results/test/dpo/lr=3e-05--seed0.json", "dpo", 50.0, 0.25)  # only here
    failed = this / "paper-like/results/test/gkd/lr=0.0001--seed1.failed.json"
    failed.write_text(json.dumps({"error": "killed"}), encoding="utf-8")
    write_invocation(this, "a.json", 0.0, 3600.0, 360.0)
    write_invocation(this, "b.json", 10_000.0, 10_000.0 + 1800.0, 0.0)
    write_invocation(reference, "a.json", 0.0, 1800.0, 0.0)
    return this, reference


def test_same_runs_are_same_file_and_same_accuracy(two_comparisons):
    bench = load_bench()
    report = bench.pace(*two_comparisons)
    same = report["same_runs"]
    assert same["runs"] == 2
    assert same["left_out_scored_otherwise"] == 1
    assert same["ratio"] == pytest.approx((300.0 + 90.0) / (200.0 + 60.0))
    assert same["per_method"]["gkd"] == {"runs": 1, "ratio": pytest.approx(1.5)}
    assert same["per_method"]["seqkd"]["ratio"] == pytest.approx(1.5)
    assert "grpo" not in same["per_method"] and "dpo" not in same["per_method"]


def test_invocations_and_run_hours_are_summed(two_comparisons):
    bench = load_bench()
    this = bench.pace(*two_comparisons)["this"]
    assert this["invocations"] == 2
    assert this["wall_hours"] == pytest.approx(1.5)
    assert this["building_hours"] == pytest.approx(0.1)
    assert this["runs"] == 4  # the failed run's file is not a run
    assert this["run_hours"] == pytest.approx((300 + 90 + 1000 + 50) / 3600)
    assert this["wall_per_run_hour"] == pytest.approx((1.5 - 0.1) / this["run_hours"])
    assert this["by_stage"]["weak-student / test"] == {"runs": 2, "run_hours": pytest.approx(1050 / 3600)}


def test_main_prints_and_writes_json(two_comparisons, tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "pace.json"
    assert bench.main([str(p) for p in two_comparisons] + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio 1.50" in printed and "1 shared but scored otherwise" in printed
    assert json.loads(out.read_text())["same_runs"]["runs"] == 2


def test_a_directory_that_is_not_a_comparison_is_named(tmp_path):
    bench = load_bench()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty is not a comparison run directory"):
        bench.pace(tmp_path / "empty", tmp_path / "empty")
