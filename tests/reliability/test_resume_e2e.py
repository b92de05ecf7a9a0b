"""A training run loses nothing: kill, resume, teacher death, NaN steps — end to end on CPU
(issue: reliability, items 3, 4 and 5; issue 16, exact resume with sampling and worker-side failures)
through the real command, `python -m openrlhf.cli.train_tsdkd`.

Three launches of the same command (tiny budget: 16 prompts, 4 steps of 4 prompts x 4 samples drawn
at --rollout.temperature 1.0, 16 new tokens, sequence-level ranking on, each step's 16 samples in 4
training micro-batches and 2 teacher calls; a checkpoint every step, --ckpt.load_enable always on):

A  uninterrupted reference, with TSDKD_FAULT_INJECT=teacher_exit_at_call=7: steps 1-3 train,
   then the teacher process dies in step 4 (its 7th forward call). Expected: non-zero exit, one
   error line naming the teacher and how to resume, `latest` -> global_step3, complete and loadable.
B  SIGKILL to the whole process group right after global_step1's checkpoint appears.
   Then a half-written global_step2 is planted (truncated file, `latest` untouched), as a kill
   during an upstream-style save would leave it.
B' the same command again (+ TSDKD_FAULT_INJECT=nonfinite_teacher_at_call=9): resumes from
   global_step1; its steps 2 and 3 equal A's — the same sampled responses (rollout reward and
   length), the same micro-batches, hence the same losses, within RESUME_TOLERANCE — and its step-3
   weight update equals A's (same optimizer state) within UPDATE_TOLERANCE; step 4's first
   micro-batch (its 9th training call) gets NaN teacher signals and is skipped
   (tsdkd/nonfinite_skipped = 1/4 of the step's samples, finite loss and weights, exit 0).

What makes sampling repeat after a resume (host/seeded_sampling.py, host/checkpoint.py): each
sample's vLLM seed comes from --train.seed, the prompt's position in the prompt stream (restored
from the checkpoint) and the sample's index; the step's samples are ordered by content, not by
vLLM's completion order; the driver's and the policy rank's RNG states (the replay buffer's shuffle
into micro-batches) are saved with the checkpoint and restored. fp32 throughout; what remains is
float addition order, hence the tolerances.

A and B run at the same time (separate private Ray clusters) to halve the wall time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tsdkd_plugin.testing import tensorboard_scalars

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 540
RESUME_TOLERANCE = 1e-4  # relative difference of step-3 losses (docs/reliability.md: measured values)
UPDATE_TOLERANCE = 1e-3  # relative difference of the step-3 weight update
# Runs A, B, B': sampled rollouts, several micro-batches per step (the last value of a flag wins).
SAMPLED_MICRO_BATCHES = ["--rollout.temperature", "1.0", "--rollout.micro_batch_size", "8",
                         "--train.micro_batch_size", "4"]
PROG = "python -m openrlhf.cli.train_tsdkd"


def command_args(student, teacher, prompts, out_dir):
    return [
        "--actor.model_name_or_path", str(student), "--teacher.model_name_or_path", str(teacher),
        "--teacher.placement", "separate", "--teacher.timeout_s", "120", "--teacher.max_retries", "1",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1", "--train.colocate_all",
        "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1", "--vllm.enforce_eager",
        "--vllm.gpu_memory_utilization", "0.5",
        "--data.prompt_dataset", str(prompts), "--data.input_key", "prompt", "--data.label_key", "answer",
        "--data.apply_chat_template", "--data.max_samples", "16", "--data.max_len", "96",
        "--rollout.batch_size", "4", "--rollout.n_samples_per_prompt", "4", "--rollout.micro_batch_size", "16",
        "--rollout.max_new_tokens", "16", "--rollout.temperature", "0",
        "--train.batch_size", "16", "--train.micro_batch_size", "16", "--train.max_epochs", "1",
        "--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--ds.attn_implementation", "sdpa",
        "--actor.adam.lr", "1e-3", "--actor.lr_warmup_ratio", "0",
        "--tsdkd.indirect_level", "both", "--teacher.sparse_top_k", "16",
        "--ckpt.path", str(out_dir / "ckpt"), "--ckpt.output_dir", str(out_dir / "model"),
        "--ckpt.save_steps", "1", "--ckpt.max_num", "2", "--ckpt.load_enable",
        "--logger.tensorboard_dir", str(out_dir / "tb"), "--logger.wandb.run_name", "reliability",
    ]


class Launch:
    """One run of the CLI in its own process group and its own private Ray directory."""

    def __init__(self, argv, log_file: Path, faults: str = ""):
        self.ray_dir = tempfile.mkdtemp(prefix="tsdkd_rel_", dir="/tmp")  # Ray socket paths must stay short
        env = {**os.environ, "TSDKD_RAY_TMPDIR": self.ray_dir, "TSDKD_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        env.pop("TSDKD_FAULT_INJECT", None)
        if faults:
            env["TSDKD_FAULT_INJECT"] = faults
        self.log_file = log_file
        self._log = open(log_file, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "openrlhf.cli.train_tsdkd", *argv], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group, then anything else that carries this run's private Ray
        directory in its environment (every process of this launch, and only those)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        marker = f"TSDKD_RAY_TMPDIR={self.ray_dir}".encode()
        for _ in range(3):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        os.kill(int(entry.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    continue
            time.sleep(0.5)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def tail(self, lines: int = 60) -> str:
        from tsdkd_plugin.testing import log_tail

        return log_tail(self.log_file, lines)


def wait_for_latest(ckpt_dir: Path, tag: str, launch: Launch, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (ckpt_dir / "latest").exists() and (ckpt_dir / "latest").read_text().strip() == tag:
            return
        if launch.proc.poll() is not None:
            raise AssertionError(f"run ended (exit {launch.proc.returncode}) before {tag}:\n{launch.tail()}")
        time.sleep(0.2)
    raise AssertionError(f"no {tag} checkpoint within {timeout}s:\n{launch.tail()}")


def model_weights(tag_dir: Path):
    import torch

    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["module"]


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def test_kill_resume_teacher_failure_and_nan_steps(tmp_path, toy_student_dir, toy_teacher_dir, arith_data_dir):
    import math

    import torch

    from tsdkd_plugin.host.checkpoint import checkpoint_problem

    prompts = arith_data_dir / "prompts_train.jsonl"
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    argv_a = command_args(toy_student_dir, toy_teacher_dir, prompts, dir_a) + SAMPLED_MICRO_BATCHES
    argv_b = command_args(toy_student_dir, toy_teacher_dir, prompts, dir_b) + SAMPLED_MICRO_BATCHES
    launches = []
    try:
        run_a = Launch(argv_a, tmp_path / "a.log", faults="teacher_exit_at_call=7")
        run_b = Launch(argv_b, tmp_path / "b.log")
        launches += [run_a, run_b]

        wait_for_latest(dir_b / "ckpt" / "_actor", "global_step1", run_b, RUN_TIMEOUT_S)
        run_b.kill()  # SIGKILL mid-training: step 2 is under way
        # A kill during an upstream-style save of step 2: a tag directory with a truncated file, no `latest` update.
        planted = dir_b / "ckpt" / "_actor" / "global_step2"
        planted.mkdir()
        (planted / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 truncated")

        run_resumed = Launch(argv_b, tmp_path / "b_resumed.log", faults="nonfinite_teacher_at_call=9")
        launches.append(run_resumed)
        code_a = run_a.wait(RUN_TIMEOUT_S)
        code_resumed = run_resumed.wait(RUN_TIMEOUT_S)
    finally:
        for launch in launches:
            launch.cleanup()

    # ---- A: the teacher died in step 4; the run stopped with one sentence, checkpoint intact.
    log_a = run_a.log_file.read_text(errors="replace")
    assert code_a != 0, f"run A should fail when its teacher dies:\n{run_a.tail()}"
    errors = [line for line in log_a.splitlines() if line.startswith(f"{PROG}: error:")]
    assert len(errors) == 1, f"expected one error line:\n{run_a.tail()}"
    assert "the teacher group" in errors[0] and "--teacher.max_retries 1" in errors[0], errors[0]
    assert "--ckpt.load_enable to resume from global_step3" in errors[0], errors[0]
    assert errors[0] in log_a.strip().splitlines()[-5:], f"the run must end with its error line:\n{run_a.tail()}"
    ckpt_a = dir_a / "ckpt" / "_actor"
    assert (ckpt_a / "latest").read_text() == "global_step3"
    assert checkpoint_problem(str(ckpt_a)) is None
    assert sorted(p.name for p in ckpt_a.iterdir() if p.is_dir()) == ["global_step2", "global_step3"]  # max_num 2

    # ---- B': resumed from global_step1, ignoring the planted half-written global_step2.
    log_resumed = run_resumed.log_file.read_text(errors="replace")
    assert code_resumed == 0, f"resumed run failed (exit {code_resumed}):\n{run_resumed.tail()}"
    assert "Global step 1:" not in log_resumed and "Global step 2:" in log_resumed, run_resumed.tail()
    scalars_a, scalars_b = tensorboard_scalars(dir_a / "tb"), tensorboard_scalars(dir_b / "tb")
    assert set(scalars_a["train/policy_loss"]) == {1, 2, 3}, scalars_a["train/policy_loss"]
    assert {2, 3, 4} <= set(scalars_b["train/policy_loss"]), scalars_b["train/policy_loss"]
    for step in (2, 3):  # the resumed run's first two steps
        for tag in ("train/rollout/reward_mean", "train/rollout/response_length_mean"):  # same prompts, same samples
            assert scalars_b[tag][step] == pytest.approx(scalars_a[tag][step], rel=RESUME_TOLERANCE), (step, tag)
        for tag in ("train/policy_loss", "train/tsdkd/loss_direct", "train/tsdkd/loss_indirect_token",
                    "train/tsdkd/loss_indirect_sequence", "train/tsdkd/loss_entropy"):
            a, b = scalars_a[tag][step], scalars_b[tag][step]
            print(f"step {step} {tag}: A={a!r} resumed={b!r} relative difference {relative_difference(a, b):.1e}")
            assert relative_difference(a, b) <= RESUME_TOLERANCE, (step, tag, a, b)

    # Same optimizer state: the resumed run's step-3 weights (two updates after the restored Adam moments
    # and schedule of global_step1) equal A's, measured against A's step-3 update itself: restarting Adam
    # (fresh moments, bias correction of step 1) would change it by O(1).
    ckpt_b = dir_b / "ckpt" / "_actor"
    before = model_weights(ckpt_a / "global_step2")
    after_a, after_b = model_weights(ckpt_a / "global_step3"), model_weights(ckpt_b / "global_step3")
    update_norm = sum(((after_a[k] - before[k]).float() ** 2).sum() for k in before) ** 0.5
    update_error = sum(((after_b[k] - after_a[k]).float() ** 2).sum() for k in before) ** 0.5 / update_norm
    print(f"step-3 update: |resumed - A| / |A| = {update_error.item():.2e} (|update| = {update_norm.item():.3g})")
    assert update_norm > 0 and update_error <= UPDATE_TOLERANCE
    assert sorted(p.name for p in ckpt_b.iterdir() if p.is_dir()) == ["global_step3", "global_step4"]
    assert (ckpt_b / "latest").read_text() == "global_step4"

    # Step 4's first micro-batch (training call 9 of this process) had NaN teacher signals: skipped, counted.
    assert scalars_b["train/tsdkd/nonfinite_skipped"][4] == pytest.approx(0.25)
    assert scalars_b["train/tsdkd/nonfinite_skipped"][3] == 0.0
    assert all(math.isfinite(v) for v in scalars_b["train/policy_loss"].values())
    assert all(torch.isfinite(w.float()).all() for w in model_weights(ckpt_b / "global_step4").values())
    for tag in ("train/tsdkd/empty_response_fraction", "train/tsdkd/no_eos_fraction"):
        assert 0.0 <= scalars_b[tag][3] <= 1.0, tag


def test_hung_teacher_repeated_nan_steps_and_a_model_vllm_cannot_load(tmp_path, toy_student_dir, toy_teacher_dir,
                                                                      arith_data_dir):
    """Three more launches of the same command, at the same time (separate private Ray clusters):

    C  the teacher's forward never returns in step 2 (teacher_hang_at_call=2). Each attempt is
       bounded by --teacher.timeout_s; the retry queues behind the hung call on the same actor, so
       it times out too, and the run stops with one sentence; global_step1 stays intact.
    D  every training step from the 2nd gets NaN teacher signals (nonfinite_teacher_from_call=2)
       with --tsdkd.max_nonfinite_steps 2: step 2's micro-batch is skipped (checkpoint global_step2),
       step 3's is the second in a row and stops the run with one sentence; weights stay finite.
    E  a student whose config.json names an architecture vLLM does not know (transformers loads it by
       model_type, so the preflight and the policy group accept it): the vLLM engine fails in its
       constructor, and the run ends with one sentence naming --actor.model_name_or_path and the
       directory, the engine's error line beneath it, no driver traceback, no checkpoint."""
    import json

    import torch

    from tsdkd_plugin.host.checkpoint import checkpoint_problem

    prompts = arith_data_dir / "prompts_train.jsonl"
    dir_c, dir_d, dir_e = tmp_path / "c", tmp_path / "d", tmp_path / "e"
    argv_c = command_args(toy_student_dir, toy_teacher_dir, prompts, dir_c)
    argv_c += ["--teacher.timeout_s", "20", "--teacher.max_retries", "1"]  # the last value of a flag wins
    argv_d = command_args(toy_student_dir, toy_teacher_dir, prompts, dir_d) + ["--tsdkd.max_nonfinite_steps", "2"]
    unknown_to_vllm = tmp_path / "student-unknown-to-vllm"
    shutil.copytree(toy_student_dir, unknown_to_vllm)
    config = json.loads((unknown_to_vllm / "config.json").read_text())
    (unknown_to_vllm / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    argv_e = command_args(unknown_to_vllm, toy_teacher_dir, prompts, dir_e)
    launches = []
    try:
        run_c = Launch(argv_c, tmp_path / "c.log", faults="teacher_hang_at_call=2")
        launches.append(run_c)
        run_d = Launch(argv_d, tmp_path / "d.log", faults="nonfinite_teacher_from_call=2")
        launches.append(run_d)
        run_e = Launch(argv_e, tmp_path / "e.log")
        launches.append(run_e)
        code_e = run_e.wait(RUN_TIMEOUT_S)
        code_c, code_d = run_c.wait(RUN_TIMEOUT_S), run_d.wait(RUN_TIMEOUT_S)
    finally:
        for launch in launches:
            launch.cleanup()

    def one_error_line(run, code):
        log = run.log_file.read_text(errors="replace")
        assert code != 0, f"the run should have stopped:\n{run.tail()}"
        errors = [line for line in log.splitlines() if line.startswith(f"{PROG}: error:")]
        assert len(errors) == 1, f"expected one error line:\n{run.tail()}"
        assert errors[0] in log.strip().splitlines()[-5:], f"the run must end with its error line:\n{run.tail()}"
        return log, errors[0]

    # ---- C: hung teacher
    log_c, error_c = one_error_line(run_c, code_c)
    assert "teacher forward call 2: hanging" in log_c, run_c.tail()
    assert "the teacher group" in error_c and "--teacher.timeout_s 20 each" in error_c, error_c
    assert "failed to return its signals 2 times" in error_c and "GetTimeoutError" in error_c, error_c
    assert "--ckpt.load_enable to resume from global_step1" in error_c, error_c
    ckpt_c = dir_c / "ckpt" / "_actor"
    assert (ckpt_c / "latest").read_text() == "global_step1" and checkpoint_problem(str(ckpt_c)) is None

    # ---- D: NaN teacher signals from step 2 on
    _, error_d = one_error_line(run_d, code_d)
    assert "2 consecutive micro-batches had a non-finite loss" in error_d, error_d
    assert "--ckpt.load_enable to resume from global_step2" in error_d, error_d
    ckpt_d = dir_d / "ckpt" / "_actor"
    assert (ckpt_d / "latest").read_text() == "global_step2" and checkpoint_problem(str(ckpt_d)) is None
    scalars_d = tensorboard_scalars(dir_d / "tb")
    assert scalars_d["train/tsdkd/nonfinite_skipped"][1] == 0.0 and scalars_d["train/tsdkd/nonfinite_skipped"][2] == 1.0
    assert all(torch.isfinite(w.float()).all() for w in model_weights(ckpt_d / "global_step2").values())

    # ---- E: a model vLLM cannot load after all
    log_e, error_e = one_error_line(run_e, code_e)
    lines_e = log_e.strip().splitlines()
    assert error_e == lines_e[-2], f"the sentence and the worker's line must end the log:\n{run_e.tail()}"
    assert error_e.startswith(f"{PROG}: error: --actor.model_name_or_path {str(unknown_to_vllm)!r}: the vLLM engine")
    assert lines_e[-1].startswith("  RolloutRayActor.__init__: ") and "FooForCausalLM" in lines_e[-1], lines_e[-1]
    assert not any(line.startswith("Traceback") for line in lines_e), "a driver traceback was printed"
    assert not (dir_e / "ckpt" / "_actor" / "latest").exists()
