"""Teacher failures (issue: reliability, item 4), the parts that need no cluster: the bounded
retry loop, finding the stop reason inside Ray's exception wrappers, the fault-injection
switch. The end-to-end teacher death is run A of test_resume_e2e.py."""

from __future__ import annotations

import pytest
import ray

from tsdkd_plugin.host.faults import TrainingStoppedError, injected_faults, stop_reason
from tsdkd_plugin.host.trainer import RetriesExhausted, TeacherUnavailableError, first_line, get_with_retries


class FlakyTeacher:
    """`get` stand-in: fails the first `failures` attempts with `error`."""

    def __init__(self, failures, error):
        self.failures, self.error, self.calls, self.timeouts = failures, error, 0, []

    def submit(self):
        self.calls += 1
        return []  # no real refs: ray.cancel is never reached with an empty list

    def get(self, refs, timeout):
        self.timeouts.append(timeout)
        if self.calls <= self.failures:
            raise self.error
        return [["signals"]]


def test_a_transient_failure_is_retried():
    teacher = FlakyTeacher(1, ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready."))
    result = get_with_retries(teacher.submit, timeout_s=5, max_retries=2, what="teacher", get=teacher.get,
                              sleep=lambda s: None)
    assert result == [["signals"]] and teacher.calls == 2 and teacher.timeouts == [5, 5]


def test_retries_are_bounded():
    pauses = []
    teacher = FlakyTeacher(10, ray.exceptions.RayActorError())
    with pytest.raises(RetriesExhausted) as exhausted:
        get_with_retries(teacher.submit, timeout_s=0.5, max_retries=2, what="teacher", get=teacher.get,
                         sleep=pauses.append)
    assert teacher.calls == 3 and exhausted.value.attempts == 3
    assert pauses == [0.5, 0.5]  # the pause is capped by the timeout: total <= 3 x (timeout + pause)
    assert first_line(exhausted.value.last_error).startswith("RayActorError")


def test_other_errors_are_not_retried():
    teacher = FlakyTeacher(1, KeyError("bug"))
    with pytest.raises(KeyError):
        get_with_retries(teacher.submit, timeout_s=1, max_retries=3, what="teacher", get=teacher.get,
                         sleep=lambda s: None)
    assert teacher.calls == 1


def test_the_stop_reason_is_found_inside_nested_ray_errors():
    stopped = TeacherUnavailableError("TSD-KD stopped: the teacher group failed; rerun with --ckpt.load_enable")
    # As the driver sees it: the policy/teacher error re-raised by the trainer actor, wrapped twice.
    inner = ray.exceptions.RayTaskError("fit", "Traceback (most recent call last): ...", stopped).as_instanceof_cause()
    outer = ray.exceptions.RayTaskError("fit", "Traceback (most recent call last): ...", inner).as_instanceof_cause()
    found = stop_reason(outer)
    assert found is stopped and str(found).startswith("TSD-KD stopped:")
    assert stop_reason(ray.exceptions.RayTaskError("fit", "tb", ValueError("x")).as_instanceof_cause()) is None
    assert isinstance(found, TrainingStoppedError)


def test_fault_injection_is_off_by_default_and_rejects_typos(monkeypatch):
    monkeypatch.delenv("TSDKD_FAULT_INJECT", raising=False)
    assert injected_faults() == {}
    monkeypatch.setenv("TSDKD_FAULT_INJECT", "teacher_exit_at_call=3, nonfinite_teacher_from_call=5")
    assert injected_faults() == {"teacher_exit_at_call": 3, "nonfinite_teacher_from_call": 5}
    monkeypatch.setenv("TSDKD_FAULT_INJECT", "teacher_exit_at_cal=3")
    with pytest.raises(ValueError, match="unknown fault"):
        injected_faults()
