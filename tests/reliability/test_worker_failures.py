"""A Ray worker that fails on an input ends the run with one sentence on the driver naming the flag and
the file, with the worker's last error line beneath it (issue: reliability, worker-side failures).
The errors here are built as Ray builds them (RayTaskError with the worker's traceback, nested once per
actor hop); the end-to-end case (a model vLLM cannot load) is run E of test_resume_e2e.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from tsdkd_plugin.host.faults import failing_worker, worker_error_line, worker_failure_report

ARGS = SimpleNamespace(
    actor=SimpleNamespace(model_name_or_path="/models/student"),
    teacher=SimpleNamespace(model_name_or_path="/models/teacher", placement="separate"),
    data=SimpleNamespace(prompt_dataset="/data/prompts.jsonl"),
    ckpt=SimpleNamespace(path="/nonexistent/ckpt", output_dir="/out/model", load_enable=False),
)


def worker_error(actor_method: str, traceback_lines, cause: BaseException):
    """The RayTaskError the driver gets when `actor_method` raised `cause` in a worker."""
    traceback = "Traceback (most recent call last):\n" + "".join(f'  File "w.py", line 1, in {line}\n'
                                                                 for line in traceback_lines)
    traceback += f"{type(cause).__name__}: {cause}"
    return ray.exceptions.RayTaskError(actor_method.split(".")[-1], traceback, cause,
                                       proctitle=f"ray::{actor_method}").as_instanceof_cause()


def through_the_trainer(inner):
    """As the driver sees an error of a worker the trainer actor called: wrapped once more."""
    return worker_error("TSDKDTrainerImpl.fit", ["fit"], inner)


@pytest.mark.parametrize("actor_method, flag, value", [
    ("TeacherModelActor.init_model_from_pretrained", "--teacher.model_name_or_path", "/models/teacher"),
    ("TSDKDPolicyActorImpl.init_model_from_pretrained", "--actor.model_name_or_path", "/models/student"),
    ("TSDKDTrainerImpl.__init__", "--data.prompt_dataset", "/data/prompts.jsonl"),
    ("TSDKDPolicyActorImpl.save_model", "--ckpt.output_dir", "/out/model"),
])
def test_a_start_up_or_save_failure_names_the_flag_and_file(actor_method, flag, value):
    error = worker_error(actor_method, ["from_pretrained", "_load"], OSError("Unable to load weights from model.bin"))
    assert failing_worker(error) == tuple(actor_method.split("."))
    failure = worker_failure_report(error, ARGS)
    first, beneath = failure.message.split("\n")
    assert first.startswith(f"{flag} {value!r}: ") and failure.input_flag == flag
    assert beneath == f"  {actor_method}: OSError: Unable to load weights from model.bin"


def test_the_innermost_worker_is_blamed_through_nested_calls():
    inner = worker_error("TeacherModelActor.init_model_from_pretrained", ["load"], ValueError("bad config"))
    failure = worker_failure_report(through_the_trainer(inner), ARGS)
    assert failure.input_flag == "--teacher.model_name_or_path"
    assert failure.message.endswith("TeacherModelActor.init_model_from_pretrained: ValueError: bad config")


def test_a_checkpoint_deepspeed_cannot_load_names_the_tag(tmp_path):
    actor_dir = tmp_path / "ckpt" / "_actor"
    (actor_dir / "global_step2").mkdir(parents=True)
    (actor_dir / "latest").write_text("global_step2")
    args = SimpleNamespace(**{**vars(ARGS), "ckpt": SimpleNamespace(path=str(tmp_path / "ckpt"), output_dir="/o",
                                                                     load_enable=True)})
    error = worker_error("TSDKDPolicyActorImpl.init_model_from_pretrained",
                         ["init_model_from_pretrained", "load_ckpt", "load_checkpoint", "_load_checkpoint"],
                         KeyError("module"))
    failure = worker_failure_report(error, args)
    assert failure.input_flag == "--ckpt.load_enable"
    assert f"DeepSpeed could not load the checkpoint {actor_dir / 'global_step2'}" in failure.message
    assert failure.message.endswith("KeyError: 'module'")


def test_an_actor_that_died_in_its_constructor_is_reported_with_its_last_line():
    """Ray's ActorDiedError embeds the constructor's traceback in its message."""
    text = ("The actor died because of an error raised in its creation task, ray::RolloutRayActor.__init__() "
            "(pid=1, ip=1.2.3.4)\n  File \"vllm/engine.py\", line 9, in __init__\n    raise ValueError(...)\n"
            "ValueError: Model architectures ['FooForCausalLM'] are not supported for now.")
    error = type("ActorDiedError", (ray.exceptions.RayActorError,), {"__str__": lambda self: text})()
    failure = worker_failure_report(error, ARGS)
    assert failure.input_flag == "--actor.model_name_or_path" and "'/models/student'" in failure.message
    assert "vLLM engine could not load it" in failure.message
    assert failure.message.endswith("ValueError: Model architectures ['FooForCausalLM'] are not supported for now.")


def test_a_failure_while_training_is_not_blamed_on_an_input():
    error = through_the_trainer(worker_error("TSDKDPolicyActorImpl.fit", ["fit", "training_step"],
                                             RuntimeError("CUDA error: an illegal memory access")))
    failure = worker_failure_report(error, ARGS)
    assert failure.input_flag is None and failure.message.startswith("a Ray worker failed (TSDKDPolicyActorImpl.fit)")
    assert worker_error_line(error) == "RuntimeError: CUDA error: an illegal memory access"
    assert worker_failure_report(ValueError("a driver bug"), ARGS) is None
