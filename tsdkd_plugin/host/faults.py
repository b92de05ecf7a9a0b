"""How a run stops on a fault, and test-only fault injection.

`TrainingStoppedError` is what a Ray worker raises when the run cannot go on (the
teacher group stopped answering, or too many non-finite losses in a row). Its
message is one sentence saying what failed and how to resume; the CLI finds it
inside Ray's exception wrappers (`stop_reason`) and prints only that sentence.

Fault injection is for tests only. It is off unless the environment variable
TSDKD_FAULT_INJECT is set (Ray workers of a local cluster inherit the driver's
environment), e.g. TSDKD_FAULT_INJECT="teacher_exit_at_call=3". Calls are counted
per process, from 1:

    teacher_exit_at_call=N         TeacherModelActor.forward: the process exits (like an OOM kill) at call N
    teacher_hang_at_call=N         TeacherModelActor.forward: call N never returns (a hung teacher)
    nonfinite_teacher_at_call=N    policy training step N gets NaN teacher signals
    nonfinite_teacher_from_call=N  ... every training step from N on

docs/reliability.md lists what each produced.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from typing import Dict, Optional

FAULT_INJECT_ENV = "TSDKD_FAULT_INJECT"
KNOWN_FAULTS = (
    "teacher_exit_at_call",
    "teacher_hang_at_call",
    "nonfinite_teacher_at_call",
    "nonfinite_teacher_from_call",
)
# Exit status of an injected teacher crash; any non-zero status reads as a dead actor to Ray.
INJECTED_EXIT_STATUS = 17


class TrainingStoppedError(RuntimeError):
    """The run cannot continue; str(error) says what failed and how to resume.

    Constructed with the message only, so it survives pickling across Ray processes."""


def stop_reason(error: BaseException) -> Optional[TrainingStoppedError]:
    """The TrainingStoppedError behind `error`, or None.

    Ray re-raises a worker's exception as RayTaskError (a subclass of both RayTaskError and
    the original class, whose str() is a whole traceback), nested once per actor hop; the
    original exception is its `.cause`. Walk `.cause`/`__cause__`/`__context__` down to it."""
    seen = set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, TrainingStoppedError) and not isinstance(cause, BaseException):
            return current
        pending += [cause if isinstance(cause, BaseException) else None, current.__cause__, current.__context__]
    return None


def injected_faults() -> Dict[str, int]:
    """{fault: call number} from TSDKD_FAULT_INJECT; a typo raises, so a test cannot pass by injecting nothing."""
    spec = os.environ.get(FAULT_INJECT_ENV, "").strip()
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in KNOWN_FAULTS or not value.strip().isdigit():
            raise ValueError(f"{FAULT_INJECT_ENV}: unknown fault {item!r}; known: {', '.join(KNOWN_FAULTS)} (=N)")
        faults[name] = int(value)
    return faults


_calls = collections.Counter()


def _next_call(site: str) -> int:
    _calls[site] += 1
    return _calls[site]


def inject_teacher_forward_fault() -> None:
    """Called first thing in TeacherModelActor.forward; does nothing unless a teacher fault is injected."""
    faults = injected_faults()
    if not faults:
        return
    call = _next_call("teacher_forward")
    if faults.get("teacher_exit_at_call") == call:
        sys.stderr.write(f"[{FAULT_INJECT_ENV}] teacher forward call {call}: exiting the teacher process\n")
        sys.stderr.flush()
        os._exit(INJECTED_EXIT_STATUS)
    if faults.get("teacher_hang_at_call") == call:
        sys.stderr.write(f"[{FAULT_INJECT_ENV}] teacher forward call {call}: hanging\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)


def inject_nonfinite_teacher() -> bool:
    """Called once per policy training step: True when this step's teacher signals must be NaN."""
    faults = injected_faults()
    if not faults:
        return False
    call = _next_call("actor_training_step")
    start = faults.get("nonfinite_teacher_from_call")
    return faults.get("nonfinite_teacher_at_call") == call or (start is not None and call >= start)
