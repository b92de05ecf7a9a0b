"""Teacher failures (issue: reliability, item 4), the parts that need no cluster: the bounded
retry loop, finding the stop reason inside Ray's exception wrappers, the fault-injection
switch. The end-to-end teacher death is run A of test_resume_e2e.py."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import ray
import torch

from tsdkd_plugin.host.faults import TrainingStoppedError, injected_faults, stop_reason
from tsdkd_plugin.host.teachers import TeacherUnavailableError
from tsdkd_plugin.host.teachers.ray_group import RetriesExhausted, first_line, get_with_retries


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


def test_a_deterministic_teacher_error_is_not_retried():
    """An exception raised by the teacher's own code comes back as RayTaskError(cause): a retry would
    raise it again, so it is raised at once; a lost connection inside the teacher is retried."""
    from tsdkd_plugin.host.faults import worker_error_line

    bug = ray.exceptions.RayTaskError("forward", "Traceback ...", ValueError("teacher logits have the wrong shape"))
    teacher = FlakyTeacher(1, bug.as_instanceof_cause())
    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        get_with_retries(teacher.submit, timeout_s=1, max_retries=3, what="teacher", get=teacher.get,
                         sleep=lambda s: None)
    assert teacher.calls == 1
    assert worker_error_line(raised.value) == "ValueError: teacher logits have the wrong shape"

    lost = ray.exceptions.RayTaskError("forward", "Traceback ...", ConnectionError("connection reset by peer"))
    teacher = FlakyTeacher(1, lost.as_instanceof_cause())
    assert get_with_retries(teacher.submit, timeout_s=1, max_retries=3, what="teacher", get=teacher.get,
                            sleep=lambda s: None) == [["signals"]]
    assert teacher.calls == 2


def ray_group_teacher(policy_answers, teacher_get, monkeypatch, max_retries=2):
    """A RayGroupTeacher over stand-in groups: the policy group answers `policy_answers` (per actor), the
    teacher group's results come from `teacher_get(refs, timeout)`."""
    from tsdkd_plugin.host.run_config import RunConfig, TeacherConfig
    from tsdkd_plugin.host.teachers import ray_group
    from tsdkd_plugin.objective import TSDKDConfig

    def get(refs, timeout=None):
        return policy_answers if refs == ["policy"] else teacher_get(refs, timeout)

    monkeypatch.setattr(ray, "get", get)  # the policy group's answers (teachers.base.run_on_policy_group)
    monkeypatch.setattr(ray_group, "get_with_retries", functools.partial(get_with_retries, get=get,
                                                                         sleep=lambda s: None))
    policy = SimpleNamespace(async_run_method_batch=lambda method_name, **batch: ["policy"])
    group = SimpleNamespace(async_run_method_batch=lambda method_name, **batch: [])  # no refs: ray.cancel never runs
    run = RunConfig(objective=TSDKDConfig(),
                    teacher=TeacherConfig("/models/teacher", timeout_s=30.0, max_retries=max_retries))
    return ray_group.RayGroupTeacher(policy, group, run, duplicate_factor=1, ckpt_path="/nonexistent/ckpt")


def step_samples(micro_batches=2):
    from tsdkd_plugin.host.teachers import StepSamples

    rows = [torch.ones(2, 5, dtype=torch.long)] * micro_batches
    return StepSamples(sequences=rows, action_mask=[torch.ones(2, 3)] * micro_batches, attention_mask=rows)


def test_the_ray_group_teacher_returns_one_dict_per_micro_batch_and_times_its_phases(monkeypatch):
    shipped = [{"sequence_scores": torch.tensor([-1.0, -2.0])}, {"sequence_scores": torch.tensor([-3.0, -4.0])}]
    teacher = ray_group_teacher([[torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4)]],
                                lambda refs, timeout: [shipped[:1], shipped[1:]], monkeypatch)
    times = {}
    assert teacher.signals(step_samples(), times) == shipped
    assert set(times) == {"tsdkd/time_student_candidates", "tsdkd/time_teacher_scoring"}


def test_the_ray_group_teacher_reports_a_teacher_error_at_once(monkeypatch):
    """An error raised by the teacher's own code becomes the run's one-sentence stop, with the teacher's
    own message and how to resume, after one attempt."""
    from tsdkd_plugin.host.teachers import TeacherFailedError

    calls = []

    def failing_get(refs, timeout):
        calls.append(timeout)
        raise ray.exceptions.RayTaskError("forward", "tb", ValueError("bad candidate ids")).as_instanceof_cause()

    teacher = ray_group_teacher([[torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4)]], failing_get, monkeypatch)
    with pytest.raises(TeacherFailedError) as stopped:
        teacher.signals(step_samples(), {})
    message = str(stopped.value)
    assert calls == [30.0], calls
    assert "--teacher.model_name_or_path /models/teacher" in message and "ValueError: bad candidate ids" in message
    assert "not retried" in message and message.startswith("TSD-KD stopped:") and stop_reason(stopped.value)


def test_the_ray_group_teacher_stops_after_its_retries(monkeypatch):
    from tsdkd_plugin.host.teachers import TeacherUnavailableError as Unavailable

    calls = []

    def dead_get(refs, timeout):
        calls.append(timeout)
        raise ray.exceptions.RayActorError()

    teacher = ray_group_teacher([[torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4)]], dead_get, monkeypatch,
                                max_retries=1)
    with pytest.raises(Unavailable) as stopped:
        teacher.signals(step_samples(), {})
    message = str(stopped.value)
    assert calls == [30.0, 30.0]
    assert "failed to return its signals 2 times (--teacher.max_retries 1, --teacher.timeout_s 30 each)" in message
    assert "RayActorError" in message and stop_reason(stopped.value)
