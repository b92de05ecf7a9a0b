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


def innermost_error(error: BaseException) -> BaseException:
    """The exception a worker's own code raised, below Ray's wrappers (RayTaskError.cause, once
    per actor hop)."""
    seen = {id(error)}
    while isinstance(getattr(error, "cause", None), BaseException) and id(error.cause) not in seen:
        error = error.cause
        seen.add(id(error))
    return error


def _is_frame_line(line: str) -> bool:
    return line.startswith((" ", "\t", "Traceback", "File ")) or line.startswith("^")


def worker_error_line(error: BaseException, limit: int = 300) -> str:
    """The line a worker's traceback ends with ("ValueError: ..."), for a one-line report on the
    driver. For an exception Ray re-raised from a worker, that is the innermost cause's type and
    first message line; for Ray's own errors (an actor that died in its constructor, whose message
    embeds the worker's traceback), the last line of that traceback."""
    inner = innermost_error(error)
    text = str(inner).strip()
    if type(inner).__module__.startswith("ray.") or "Traceback (most recent call last)" in text:
        lines = [line.rstrip() for line in text.splitlines() if line.strip()]
        ending = [line for line in lines if not _is_frame_line(line)]
        line = ending[-1].strip() if ending else type(inner).__name__
    else:
        first = (text.splitlines() or [""])[0]
        line = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
