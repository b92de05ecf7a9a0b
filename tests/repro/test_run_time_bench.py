"""benchmarks/run_time_bench.py's bookkeeping: the log watch and the table's arithmetic (the run itself
is the benchmark's, not a test's)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "run_time_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("run_time_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_watch_notes_each_marker_when_it_first_appears(tmp_path):
    bench = load_bench()
    log = tmp_path / "train.log"
    watch = bench.LogWatch(log, time.monotonic())
    watch.start()
    time.sleep(0.4)  # the file does not exist yet
    log.write_text("2026 [WARNING] real_accelerator.py: Setting accelerator to CPU\n")
    time.sleep(0.6)
    assert watch.seen == {}
    with log.open("a") as handle:
        handle.write("2026 INFO worker.py -- Started a local Ray instance.\n")
    watch.join(timeout=5)
    assert not watch.is_alive() and set(watch.seen) == set(bench.MARKERS) == {"ray_up"}
    assert watch.seen["ray_up"] > 0.9


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
