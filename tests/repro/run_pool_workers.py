"""Functions that tests/repro/test_run_pool.py runs in RunPool's worker processes (a module of its
own: a spawned worker imports it by name, from the sys.path the test gives it)."""

import os
from pathlib import Path


def meet_in_worker(folder: str, me: str, other: str, timeout_s: float = 60.0) -> int:
    """Mark `me` in `folder`, wait until `other` is marked too, return this process's pid. Two calls
    return only when they ran at the same time; one after the other, the first times out."""
    import time

    (Path(folder) / me).touch()
    deadline = time.monotonic() + timeout_s
    while not (Path(folder) / other).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{me}: {other} never started beside it")
        time.sleep(0.05)
    return os.getpid()


def run_sleeper_in_worker(folder: str) -> None:
    """Run a long child through runner.run_logged (its own process group, as every training run),
    its pid in folder/sleeper.pid."""
    from tsdkd_plugin.experiments.runner import run_logged

    pid_file = Path(folder) / "sleeper.pid"
    run_logged(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 300"], Path(folder) / "sleeper.log", desc="sleeper")
