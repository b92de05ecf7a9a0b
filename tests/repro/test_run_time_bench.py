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


def test_log_watch_notes_each_marker_once_when_it_first_appears(tmp_path):
    bench = load_bench()
    log = tmp_path / "train.log"
    watch = bench.LogWatch(log, time.monotonic())
    watch.start()
    time.sleep(0.4)  # the file does not exist yet
    log.write_text("2026 INFO worker.py -- Started a local Ray instance.\n")
    time.sleep(0.6)
    assert set(watch.seen) == {"ray_up"}
    with log.open("a") as handle:
        handle.write("Episode [1/1]:   0%|\n")
        handle.write("(EngineCore) init engine (profile, create kv cache, warmup model) took 9.3 s\n")
    watch.join(timeout=5)
    assert not watch.is_alive() and set(watch.seen) == set(bench.MARKERS)
    assert 0.3 < watch.seen["ray_up"] < watch.seen["loop_started"] <= watch.seen["engine_ready"]


def test_table_ratios_and_fixed_cost():
    bench = load_bench()
    measured = {
        "wall": 100.0,
        "ray_up": 10.0,
        "loop_started": 30.0,
        "engine_ready": 40.0,
        "engine_init": 9.0,
        "generation": [20.0, 2.0, 4.0, 3.0],
        "step_total": [25.0, 5.0, 7.0, 6.0],
        "rollouts": 4,
    }
    text = bench.table(measured)
    assert "First rollout / median later rollout: **6.7x** (20.0 s vs 3.0 s" in text
    # 100 s of wall minus 4 steady steps of 6 s (the later steps' median)
    assert "Fixed cost of a run (wall minus 4 steady steps): 76 s, 76%" in text
    # 30 s to the loop, 25 + 18 s of steps: 27 s after the last step
    assert "| after the last step (save the model, stop Ray) | 27.0 | 27% |" in text
