"""benchmarks/sft_columns_bench.py's bookkeeping: the time per step read from a train_sft log, the
command line of the lazy variant, and the table (the runs themselves are the benchmark's)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tsdkd_plugin.testing import load_script


@pytest.fixture(scope="module")
def bench():
    """The benchmark script, loaded once as a module."""
    return load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "sft_columns_bench.py", "sft_columns_bench")


def test_step_seconds_reads_the_last_completed_epoch_bar(bench):
    log = (
        "Train step of epoch 0:  50%|#####     | 75/150 [00:20<00:20,  3.7it/s]\r"
        "Train step of epoch 0: 100%|##########| 150/150 [00:30<00:00,  5.0it/s]\n"
        "Train step of epoch 1: 100%|##########| 150/150 [01:15<00:00,  2.0it/s, gpt_loss=0.5]\r"
    )
    assert bench.step_seconds(log) == pytest.approx(75 / 150)
    assert bench.step_seconds("Train step of epoch 0: 100%|#| 10/10 [1:00:05<00:00]") == pytest.approx(3605 / 10)
    with pytest.raises(ValueError, match="no completed 'Train step of epoch' bar"):
        bench.step_seconds(log.split("\r")[0])


def test_lazy_command_keeps_every_argument_and_turns_the_wrap_off(bench):
    command = [sys.executable, "-m", "tsdkd_plugin.host.cpu_launch", "--threads", "2", "openrlhf.cli.train_sft", "--x"]
    lazy = bench.lazy_command(command)
    assert lazy[0] == sys.executable and lazy[1] == "-c" and lazy[3:] == command[3:]
    assert "hold_columns_as_lists = lambda: []" in lazy[2]
    with pytest.raises(ValueError, match="not a cpu_launch command"):
        bench.lazy_command([sys.executable, "-m", "openrlhf.cli.train_sft"])


def test_table_reports_medians_ratios_and_whether_weights_match(bench):
    runs = {
        "lazy": [{"wall": 50.0, "step": 0.25, "weights": "a"}, {"wall": 46.0, "step": 0.23, "weights": "a"}],
        "lists": [{"wall": 40.0, "step": 0.2, "weights": "a"}, {"wall": 38.0, "step": 0.18, "weights": "a"}],
    }
    text = bench.table(runs, 150)
    assert "| lazy | 2 | 48.0 | 240 |" in text and "| lists | 2 | 39.0 | 190 |" in text
    assert "**1.26x** the time per step" in text and "1.23x the wall time of a 150-step run" in text
    assert "byte-identical: **yes**" in text
    runs["lists"][1]["weights"] = "b"
    assert "byte-identical: **NO**" in bench.table(runs, 150)
