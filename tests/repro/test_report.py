"""The main job's report: markdown table, PNG plots and JSON from a results dict."""

import json
from dataclasses import asdict

from tsdkd_plugin.experiments.budgets import BUDGETS
from tsdkd_plugin.experiments.report import main as report_main
from tsdkd_plugin.experiments.report import write_job_report


def _evaluation(accuracy):
    return {
        "accuracy": accuracy,
        "n": 50,
        "correct": int(50 * accuracy),
        "answered_rate": 1.0,
        "by_num_ops": {"2": {"n": 20, "correct": 10, "accuracy": 0.5}, "4": {"n": 30, "correct": 3, "accuracy": 0.1}},
    }


def _results():
    return {
        "command": ["python -m tsdkd_plugin.experiments.main_job", "--budget", "smoke"],
        "budget": asdict(BUDGETS["smoke"]),
        "options": {"difficulty": "easy", "seed": 0},
        "machine": {
            "cpu": "AMD EPYC",
            "cpu_count": 2,
            "device": "cpu",
            "torch": "2.13.0+cpu",
            "python": "3.11",
            "platform": "Linux",
            "load_average_1_5_15": [1.0, 2.0, 3.0],
        },
        "stages": {
            "teacher": {"seconds": 12.0, "note": "reused from the cache", "extra": {}},
            "tsdkd": {"seconds": 90.0, "note": "", "extra": {"command": ["python", "-m", "openrlhf.cli.train_tsdkd"]}},
        },
        "evaluations": {
            "teacher": _evaluation(0.7),
            "student (initial)": _evaluation(0.2),
            "student (TSD-KD)": _evaluation(0.3),
        },
        "training_curve": [
            {"global_step": 1, "reward": 0.1, "policy_loss": 2.0},
            {"global_step": 2, "reward": 0.2, "policy_loss": 1.5},
        ],
        "teacher_margin_ok": True,
        "wall_seconds": 300.0,
    }


def test_job_report_files(tmp_path):
    written = write_job_report(_results(), tmp_path)
    markdown = written["markdown"].read_text()
    assert "| student (TSD-KD) | **30.0%** (15/50) | 50.0% | 10.0% | 100.0% |" in markdown
    assert "+10.0 points" in markdown and "openrlhf.cli.train_tsdkd" in markdown
    assert "load average 1.0/2.0/3.0" in markdown
    for key in ("plot", "training_plot"):
        assert written[key].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(written["json"].read_text())["evaluations"]["teacher"]["accuracy"] == 0.7


def test_report_can_be_rewritten_from_its_json(tmp_path, capsys):
    write_job_report(_results(), tmp_path)
    (tmp_path / "report.md").unlink()
    assert report_main([str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "report.md").is_file()
