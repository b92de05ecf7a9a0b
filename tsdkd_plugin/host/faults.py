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
import functools
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

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


def _exception_lines(traceback_text: str):
    """The exception part of a traceback: from the first unindented line after the last frame."""
    lines = [line.rstrip() for line in traceback_text.splitlines()]
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    rest = lines[frames[-1] + 1 :] if frames else lines
    start = next((i for i, line in enumerate(rest) if line and not line[0].isspace() and line[0] != "^"), None)
    return [line.strip() for line in (rest[start:] if start is not None else rest[-1:]) if line.strip()]


def worker_error_line(error: BaseException, limit: int = 300) -> str:
    """The error a worker's traceback ends with ("ValueError: ..."), on one line, for the driver's
    report. For an exception Ray re-raised from a worker, the innermost cause's type and message;
    for an error whose message embeds the worker's traceback (Ray's ActorDiedError for an actor
    that failed in its constructor), that traceback's exception lines."""
    inner = innermost_error(error)
    text = str(inner).strip()
    if any(line.lstrip().startswith('File "') for line in text.splitlines()[1:]):  # a traceback inside
        line = " ".join(_exception_lines(text)) or type(inner).__name__
    else:
        message = " ".join(part.strip() for part in text.splitlines() if part.strip())
        line = f"{type(inner).__name__}: {message}" if message else type(inner).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# Which input a worker was reading when it failed: (actor class in Ray's error text, method or None
# for any, flag, the args attribute holding its value, what to check). Only start-up and saving are
# listed: an error while training is not caused by one flag.
WORKER_INPUTS = (
    ("RolloutRayActor", None, "--actor.model_name_or_path", "actor.model_name_or_path",
     "the vLLM engine could not load it: check that vLLM supports its architecture (config.json) and that it "
     "fits --vllm.gpu_memory_utilization"),
    ("TeacherModelActor", "init_model_from_pretrained", "--teacher.model_name_or_path", "teacher.model_name_or_path",
     "the teacher group could not load it"),
    ("TSDKDPolicyActorImpl", "init_model_from_pretrained", "--actor.model_name_or_path", "actor.model_name_or_path",
     "the policy group could not load it"),
    ("TSDKDTrainerImpl", "__init__", "--data.prompt_dataset", "data.prompt_dataset",
     "the trainer could not load the prompts"),
    ("TSDKDPolicyActorImpl", "save_model", "--ckpt.output_dir", "ckpt.output_dir", "the final model could not be saved"),
    ("TSDKDPolicyActorImpl", "save_checkpoint", "--ckpt.path", "ckpt.path", "a checkpoint could not be saved"),
)
RAY_TASK_HEADER = re.compile(r"ray::(\w+)\.(\w+)\(\)")


def failing_worker(error: BaseException) -> Optional[Tuple[str, str]]:
    """(actor class, method) of the innermost Ray worker call in `error`'s chain, or None."""
    chain = [error]
    while isinstance(getattr(chain[-1], "cause", None), BaseException) and chain[-1].cause not in chain:
        chain.append(chain[-1].cause)
    for current in reversed(chain):
        found = RAY_TASK_HEADER.search(str(current))
        if found:
            return found.group(1), found.group(2)
    return None


@dataclass(frozen=True)
class WorkerFailure:
    """What the driver prints when a Ray worker failed: one sentence, the worker's line beneath."""

    message: str
    input_flag: Optional[str]  # the flag whose input the worker could not use; None: not one input


def worker_failure_report(error: BaseException, args) -> Optional[WorkerFailure]:
    """One sentence naming the flag and file a failed Ray worker was reading, with the worker's
    last error line beneath it; None when `error` did not come from a Ray worker."""
    from tsdkd_plugin.host.checkpoint import LATEST_FILE, actor_checkpoint_dir, read_latest, resume_hint

    worker = failing_worker(error)
    if worker is None:
        return None
    actor, method = worker
    text = "\n".join(str(e) for e in (error, innermost_error(error)))
    beneath = f"\n  {actor}.{method}: {worker_error_line(error)}"
    if actor == "TSDKDPolicyActorImpl" and method == "init_model_from_pretrained":
        ckpt_dir = actor_checkpoint_dir(args.ckpt.path)
        tag = read_latest(ckpt_dir)
        if args.ckpt.load_enable and tag and ("load_checkpoint" in text or "load_ckpt" in text):
            return WorkerFailure(
                f"--ckpt.load_enable: DeepSpeed could not load the checkpoint {os.path.join(ckpt_dir, tag)}; write the "
                f"name of an earlier complete tag into {os.path.join(ckpt_dir, LATEST_FILE)}, or move {ckpt_dir} away "
                f"to start from step 0{beneath}", "--ckpt.load_enable")
        if args.teacher.placement == "colocate" and "load_causal_lm_for_scoring" in text:
            actor = "TeacherModelActor"
    for name, wanted_method, flag, dest, what in WORKER_INPUTS:
        if name == actor and wanted_method in (None, method):
            value = functools.reduce(getattr, dest.split("."), args)
            return WorkerFailure(f"{flag} {value!r}: {what} (the worker's error is below){beneath}", flag)
    return WorkerFailure(f"a Ray worker failed ({actor}.{method}) while training; its error is below; "
                         f"{resume_hint(args.ckpt.path)}{beneath}", None)


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
