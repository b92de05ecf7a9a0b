"""Where the comparison's runs execute: one after another in this process, or `jobs` at a time in
worker processes (`python -m tsdkd_plugin.experiments.compare --jobs 2`).

Why side by side: on the 2-core machine one on-policy run keeps about 1.5 cores busy (its trainer,
teacher and vLLM engine wait on one another, each on one thread). Two 8-rollout TSD-KD runs side
by side finish 1.32x as fast as one after the other (benchmarks/SIDE_BY_SIDE.md), with the same
loss on every rollout: a run's threads are pinned per process (runner.child_env), so the load
beside it changes no result.

Why processes, not threads: a run's in-process torch work (evaluation, SeqKD's teacher sampling,
DPO's teacher scores) sets the process-wide torch thread count, which two threads in one process
would change under each other.

Stopping: Ctrl-C or SIGTERM in the comparison stops every worker, and each worker stops its run's
process group (runner.run_logged); a stopped run writes no result and no failure record, so a
rerun resumes it.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import TypeVar

from tsdkd_plugin.experiments.runner import exit_on_sigterm

T = TypeVar("T")
R = TypeVar("R")


class RunPoolStopped(RuntimeError):
    """No more runs are started: the comparison is stopping (another part of it failed or was interrupted)."""


class RunPool:
    """`call` runs a function in this process (jobs=1) or in one of `jobs` worker processes and
    waits for its result; `map` makes its calls from threads, so that independent sequences of runs
    (one method's tuning, then its test seeds) go on side by side, `jobs` runs at a time."""

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self._executor: Executor | None = None
        self._stopping = threading.Event()

    def __enter__(self) -> RunPool:
        if self.jobs > 1:
            # OpenMP reads this when a process loads it: the workers' in-process torch work must not
            # spin while another run's processes need the cores (runner.child_env says why).
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            self._executor = self._new_executor()
        return self

    def _new_executor(self) -> Executor:
        # spawn, not fork: the comparison's process has torch (and its OpenMP pool) loaded already.
        return ProcessPoolExecutor(
            self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=exit_on_sigterm
        )

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._executor is None:
            return
        if exc_type is not None:
            self.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None

    def stop(self) -> None:
        """Start no more runs and stop the running ones (SIGTERM to each worker: exit_on_sigterm turns
        it into SystemExit there, and run_logged stops its run's process group)."""
        self._stopping.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            for child in multiprocessing.active_children():
                child.terminate()

    def call(self, fn: Callable[..., R], /, *args, **kwargs) -> R:
        if self._stopping.is_set():
            raise RunPoolStopped("the comparison is stopping; no more runs are started")
        if self._executor is None:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """[fn(item) for item in items], in order; from one thread per item when jobs > 1. The first
        exception stops the pool (every run) and is raised."""
        items = list(items)
        if self._executor is None or len(items) < 2:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(len(items), thread_name_prefix="run-pool") as threads:
            futures = [threads.submit(fn, item) for item in items]
            try:
                # The first failure, whichever item it comes from, stops the others at once.
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for future in futures:
                    if future in done and future.exception() is not None:
                        raise future.exception()
                return [future.result() for future in futures]
            except BaseException:
                self.stop()
                raise
