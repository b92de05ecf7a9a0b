"""The comparison's runs side by side (--jobs): worker processes, every run once, each method's
runs in protocol order, and a stop that leaves nothing running."""

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tsdkd_plugin.experiments import compare, comparison
from tsdkd_plugin.experiments.run_pool import RunPool, RunPoolStopped

# The functions the workers run: importable by name there (spawn hands the workers this sys.path).
sys.path.insert(0, str(Path(__file__).parent))
from run_pool_workers import meet_in_worker, run_sleeper_in_worker


def test_two_jobs_run_side_by_side_in_worker_processes(tmp_path):
    with RunPool(2) as pool:
        pids = pool.map(lambda pair: pool.call(meet_in_worker, str(tmp_path), *pair), [("a", "b"), ("b", "a")])
    # Each call waited for the other to start: they ran at the same time, in two other processes.
    assert len(set(pids)) == 2 and os.getpid() not in pids


def test_one_job_runs_here_one_call_after_another(tmp_path):
    with RunPool(1) as pool:
        assert pool.map(lambda x: pool.call(os.getpid), [1, 2]) == [os.getpid()] * 2
        with pytest.raises(TimeoutError):  # b never starts beside a
            pool.call(meet_in_worker, str(tmp_path), "a", "b", timeout_s=0.5)


def test_a_failure_beside_a_run_stops_that_run_and_its_process_group(tmp_path):
    def item(kind):
        if kind == "run":
            return pool.call(run_sleeper_in_worker, str(tmp_path))
        while not (tmp_path / "sleeper.pid").exists():  # the other run's child is up
            time.sleep(0.05)
        raise ValueError("a bug beside the run")

    with pytest.raises(ValueError, match="a bug beside the run"):
        with RunPool(2) as pool:
            pool.map(item, ["run", "fail"])
    sleeper = int((tmp_path / "sleeper.pid").read_text())
    deadline = time.monotonic() + 30
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(sleeper), "the stopped run's child is still running"
    with pytest.raises(RunPoolStopped):
        pool.call(os.getpid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] if os.path.exists(f"/proc/{pid}") else "X"
    return status != "Z"


class ThreadRunPool(RunPool):
    """--jobs N with threads instead of processes, so the tests' fake runs (closures) can be used."""

    def _new_executor(self):
        return ThreadPoolExecutor(self.jobs)


def _fake_comparison(tmp_path, monkeypatch, models_not_built, jobs):
    run_dir = tmp_path / f"runs{jobs}"
    models_not_built(run_dir)
    runs, lock = [], threading.Lock()

    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        with lock:
            runs.append((stage, method, tuple(sorted(settings.items())), seed, kwargs.get("extra_objective")))
        time.sleep(0.01)
        accuracy = 0.7 if settings["lr"] == 1e-4 else 0.6
        if method == "tsdkd-weight-warmup":
            accuracy = 0.9  # a remedy that beats its parent on validation goes to test
        return {"evaluation": {"accuracy": accuracy}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    monkeypatch.setattr(compare, "RunPool", ThreadRunPool)
    argv = ["--regimes", "paper-like", "--methods", "gkd,seqkd,tsdkd-paper,tsdkd-hard-gate,tsdkd-weight-warmup"]
    argv += ["--grid-trials", "1", "--seeds", "2", "--jobs", str(jobs), "--run-dir", str(run_dir)]
    argv += ["--out", str(tmp_path / f"report{jobs}")]
    assert compare.main(argv) == 0
    return run_dir, runs


def test_side_by_side_pipelines_make_the_same_runs_in_each_methods_protocol_order(
    tmp_path, monkeypatch, models_not_built
):
    serial_dir, serial = _fake_comparison(tmp_path, monkeypatch, models_not_built, 1)
    parallel_dir, parallel = _fake_comparison(tmp_path, monkeypatch, models_not_built, 2)
    assert sorted(serial, key=repr) == sorted(parallel, key=repr)
    for runs in (serial, parallel):
        for method in ("gkd", "tsdkd-paper"):
            own = [r for r in runs if r[1] == method]
            # tuning first, then the test seeds at the chosen settings
            assert [r[0] for r in own] == ["tune"] * (len(own) - 2) + ["test"] * 2
        # At 32 steps SeqKD is tuned (the other regimes take its choice) but tested only in them.
        assert {r[0] for r in runs if r[1] == "seqkd"} == {"tune"}
        tuned_paper = max(i for i, r in enumerate(runs) if r[:2] == ("tune", "tsdkd-paper"))
        derived = [i for i, r in enumerate(runs) if r[1] in ("tsdkd-hard-gate", "tsdkd-weight-warmup")]
        assert min(derived) > tuned_paper  # ablations and remedies take the parent's chosen settings
    tested = {(r[1], r[3]) for r in parallel if r[0] == "test"}
    assert {m for m, _ in tested} == {"gkd", "tsdkd-paper", "tsdkd-hard-gate", "tsdkd-weight-warmup"}
    for run_dir in (serial_dir, parallel_dir):
        chosen = json.loads(comparison.chosen_settings_file(run_dir, "paper-like").read_text())
        assert sorted(chosen) == ["gkd", "seqkd", "tsdkd-paper"]
        (invocation,) = comparison.read_invocations(run_dir)
        assert invocation["outcome"] == "finished" and invocation["updated"] >= invocation["started"]
        assert 0 <= invocation["phases"]["building"] <= invocation["updated"] - invocation["started"]
    assert comparison.read_invocations(parallel_dir)[0]["jobs"] == 2


def test_a_stopped_comparison_records_its_invocation_as_interrupted(tmp_path):
    options = type("Options", (), {"jobs": 2, "argv": ["--jobs", "2"]})()
    with pytest.raises(KeyboardInterrupt):
        with comparison.record_invocation(tmp_path, options, heartbeat_s=0.05):
            time.sleep(0.2)
            raise KeyboardInterrupt
    (record,) = comparison.read_invocations(tmp_path)
    assert record["outcome"] == "interrupted" and record["argv"] == ["--jobs", "2"]
    assert record["updated"] - record["started"] >= 0.2


def test_bad_job_count_is_refused(capsys):
    assert compare.main(["--jobs", "0"]) == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
