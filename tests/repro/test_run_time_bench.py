"""benchmarks/run_time_bench.py's bookkeeping: the Ray start-up time read from the log and the
table's arithmetic (the run itself is the benchmark's, not a test's)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tsdkd_plugin.testing import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "run_time_bench.py"


def load_bench():
    return load_script(BENCH, "run_time_bench")


def test_ray_up_time_is_the_driver_lines_own_timestamp():
    bench = load_bench()
    log = (
        "[2026-12-06 13:59:03,100] [WARNING] [real_accelerator.py:199:get_accelerator] Setting accelerator to CPU\n"
        "(RolloutRayActor pid=1) INFO 12-06 13:59:20 agent.py:199] Started a local Ray instance.\n"
        "2026-12-06 13:59:07,540\tINFO worker.py:2012 -- Started a local Ray instance.\n"
    )
    expected = time.mktime((2026, 12, 6, 13, 59, 7, 0, 0, -1)) + 0.54
    assert abs(bench.ray_up_time(log) - expected) < 1e-6
    with pytest.raises(SystemExit, match="no 'Started a local Ray instance' line"):
        bench.ray_up_time(log.splitlines()[0])


def test_table_ratios_and_fixed_cost():
    bench = load_bench()
    measured = {
        "wall": 100.0,
        "ray_up": 10.0,
        "loop_start": 30.0,  # the first step began 30 s in and took 25 s
        "loop_end": 72.0,  # the last one ended 72 s in: 17 s for the 3 later steps
        "engine_init": 9.0,
        "generation": [20.0, 2.0, 4.0, 3.0],
        "step_total": [25.0, 5.0, 7.0, 6.0],
        "rollouts": 4,
    }
    text = bench.table(measured)
    assert "| Ray up -> first step starts (actors, models, DeepSpeed) | 20.0 | 20% |" in text
    assert "| later steps (3), in all | 17.0 | 17% |" in text
    assert "| after the last step (save the model, stop Ray) | 28.0 | 28% |" in text
    assert "First rollout / median later rollout: **6.7x** (20.0 s vs 3.0 s" in text
    # 100 s of wall minus 4 steady steps of 6 s (the later steps' median)
    assert "Fixed cost of a run (wall minus 4 steady steps): 76 s, 76%" in text


def test_benchmark_report_header(tmp_path):
    from tsdkd_plugin.testing import write_benchmark_report

    path = tmp_path / "RUN_TIME.md"
    write_benchmark_report(path, "A title", "run_time_bench.py", ["--rollouts", "8"], {"Models": "m"}, "| a |")
    lines = path.read_text().splitlines()
    assert lines[0] == "# A title" and lines[1] == ""
    assert lines[2] == "Command: `python benchmarks/run_time_bench.py --rollouts 8`  "
    assert lines[3].startswith("Machine: ") and lines[3].endswith("CPU only  ")
    assert lines[4] == "Models: m  " and lines[5].startswith("Date: 20")
    assert lines[6:] == ["", "| a |"]
