"""`python -m tsdkd_plugin.experiments.calibrate --summarize`: curves from several runs (and from an
earlier summary) gathered into one table and plot, each row naming the processor it ran on."""

import json

from tsdkd_plugin.experiments.calibrate import main


def _curve(steps, cpu, **extra):
    return {
        "recipe": {"model": "student-3layer-narrow", "lr": 0.002},
        "steps": steps[-1],
        "machine": {"cpu": cpu},
        "curve": [
            {"step": s, "greedy_accuracy": s / 4000, "sampled_accuracy": s / 8000, "sampled_answered": 1.0}
            for s in steps
        ],
        **extra,
    }


def test_summary_names_each_runs_processor_and_keeps_earlier_run_files(tmp_path):
    runs = tmp_path / "runs"
    (runs / "amd").mkdir(parents=True)
    (runs / "amd" / "curve.json").write_text(json.dumps(_curve([1000, 2000], "AMD EPYC")))
    (runs / "intel").mkdir()
    # Gathered back from an earlier calibration.json: its own run file is kept.
    (runs / "intel" / "curve.json").write_text(
        json.dumps(_curve([1175], "Intel(R) Xeon(R) Processor", file="runs/calibration/x/curve.json"))
    )
    assert main(["--summarize", str(runs), "--report-dir", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "calibration.md").read_text()
    assert "| amd | AMD EPYC | student-3layer-narrow | 0.002 | 2000 | 1000 | 25.0% | 12.5% | 100.0% |" in table
    assert "| intel | Intel(R) Xeon(R) Processor | student-3layer-narrow | 0.002 | 1175 | 1175 | 29.4% |" in table
    files = {
        run["name"]: run["file"] for run in json.loads((tmp_path / "out" / "calibration.json").read_text())["runs"]
    }
    assert files == {"amd": str(runs / "amd" / "curve.json"), "intel": "runs/calibration/x/curve.json"}
    assert (tmp_path / "out" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
