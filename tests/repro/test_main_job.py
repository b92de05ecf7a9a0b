"""The main job's budgets, input checks, cache refusal, flags and log handling (no training here;
the end-to-end smoke run is in test_smoke_job.py)."""

import json
import shutil
import sys

import pytest

from tsdkd_plugin.experiments import main_job
from tsdkd_plugin.experiments.budgets import BUDGETS, check_budget, with_difficulty_lengths
from tsdkd_plugin.experiments.flags import distill_flags, tsdkd_flags
from tsdkd_plugin.experiments.metrics import logged_rollouts, logged_samples, training_curve
from tsdkd_plugin.experiments.runner import StageCancelled, StageFailed, StepProgress, run_logged
from tsdkd_plugin.experiments.trained_models import base_model_dir, sft_cache_path
from tsdkd_plugin.testing import tree_digest
from tsdkd_plugin.toy.cache import MARKER_FILE


@pytest.mark.parametrize("name", list(BUDGETS))
def test_every_budget_fills_its_batches(name):
    budget = BUDGETS[name]
    check_budget(budget)
    d = budget.distill
    assert d.optimizer_steps == d.n_prompts * d.samples_per_prompt // d.train_batch_size >= 1
    assert budget.teacher.steps >= 1 and budget.student.steps >= 1


def test_the_two_regimes_differ_only_in_the_initial_student():
    from tsdkd_plugin.toy.models import get_model_recipe

    paper, weak = BUDGETS["paper-like"], BUDGETS["weak-student"]
    assert paper.teacher == weak.teacher and paper.distill == weak.distill
    assert (paper.n_val, paper.n_test, paper.difficulty) == (weak.n_val, weak.n_test, weak.difficulty)
    assert paper.student != weak.student
    assert main_job.build_arg_parser().parse_args([]).budget == "paper-like"

    def block_weights(name):  # attention + MLP weights per model, embeddings left out
        r = get_model_recipe(name)
        return r.num_hidden_layers * (4 + 3 * r.intermediate_multiple) * r.hidden_size**2

    for budget in (paper, weak):  # the student is the smaller model in both
        assert block_weights(budget.student.model) < block_weights(budget.teacher.model)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "sudoku"], "unknown task 'sudoku'; valid tasks: arith"),
        (["--difficulty", "extreme"], "unknown difficulty 'extreme'; valid difficulties: easy, medium, hard"),
        (
            ["--budget", "huge"],
            "unknown budget 'huge'; valid budgets: smoke, paper-like, weak-student, paper-like-long",
        ),
        (["--n-prompts", "4"], "has 4 rows, fewer than the batch size 8"),
        (["--n-test", "0"], "--n-test must be a positive integer"),
        (["--run-dir", "/tmp/a,b"], "--run-dir /tmp/a,b: OpenRLHF's --data.dataset reads ',' and '@'"),
    ],
)
def test_bad_input_is_one_sentence_and_touches_nothing(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    status = main_job.main(["--budget", "smoke", "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "c"), *argv])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists() and not (tmp_path / "c").exists()


def test_cached_teacher_with_another_tokenizer_is_refused_and_left_alone(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    budget = BUDGETS["smoke"]
    recipe = with_difficulty_lengths(budget, "easy").teacher
    entry = sft_cache_path(recipe, "easy", cache_dir)
    kind, key = entry.name.rsplit("-", 1)
    # A complete-looking cache entry (marker and all) whose tokenizer maps two tokens differently.
    base = base_model_dir(recipe.model, cache_dir)
    shutil.copytree(base, entry)
    (entry / MARKER_FILE).write_text(json.dumps({"kind": kind, "key": key}))
    tokenizer_json = entry / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tokenizer_json.write_text(json.dumps(data))
    before = tree_digest(entry)

    status = main_job.main(["--budget", "smoke", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"refusing the cached teacher at {entry}" in err and "tokenizer does not match" in err
    assert "left untouched" in err and "Traceback" not in err
    assert tree_digest(entry) == before


def test_tsdkd_flags_parse_with_the_real_cli(tmp_path, toy_teacher_dir, toy_student_dir, arith_data_dir):
    from tsdkd_plugin.cli.train_tsdkd import parse_args

    budget = BUDGETS["paper-like"].distill
    flags = distill_flags(
        budget,
        student_dir=toy_student_dir,
        prompts_file=arith_data_dir / "prompts_train.jsonl",
        output_dir=tmp_path / "model",
        seed=3,
    )
    flags += tsdkd_flags({"gate": "hard", "indirect_level": "both", "entropy_weight": 0.0}, teacher_dir=toy_teacher_dir)
    args, run = parse_args(flags)
    config = run.objective
    assert (config.gate, config.indirect_level, config.entropy_weight) == ("hard", "both", 0.0)
    assert args.rollout.n_samples_per_prompt == budget.samples_per_prompt
    assert args.train.batch_size == budget.train_batch_size and args.train.seed == 3
    assert args.ds.param_dtype == "fp32" and args.teacher.placement == "colocate"
    assert [url.endswith("tsdkd_plugin/toy/reward_func.py") for url in args.reward.remote_url] == [True]


def test_step_progress_reads_openrlhf_output():
    sft = StepProgress(None, "epoch_bar", epochs=2)
    assert sft.position("Train step of epoch 1:  40%|####      | 20/50 [00:10<00:15, 2.0it/s, gpt_loss=1]") == 70
    assert sft.total == 100
    assert sft.position("Train epoch:   0%|          | 0/2") is None
    ray = StepProgress(8, "global_step")
    assert ray.position("(TSDKDTrainerImpl pid=1) INFO ppo_trainer.py:551] ✨ Global step 3: {'reward': 0.5}") == 3


def test_training_curve_reads_tensorboard_events(tmp_path):
    """Per-step metrics come from the events the trainers write (OpenRLHF's TensorboardLogger logs
    `train/<name>` at each global step), by name, in step order."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb" / "run_1"))
    for step, (reward, loss) in ((2, (0.5, 1.25)), (1, (0.25, 1.5))):
        writer.add_scalar("train/reward", reward, step)
        writer.add_scalar("train/tsdkd/loss_direct", loss, step)
        writer.add_scalar("train/rollout/num_samples", 64.0, step)
    writer.add_scalar("eval/eval_pass1", 0.9, 2)  # not a training metric
    writer.close()
    curve = training_curve(tmp_path / "tb")
    assert curve == [
        {"global_step": 1, "reward": 0.25, "tsdkd/loss_direct": 1.5, "rollout/num_samples": 64.0},
        {"global_step": 2, "reward": 0.5, "tsdkd/loss_direct": 1.25, "rollout/num_samples": 64.0},
    ]
    assert logged_rollouts(curve) == 2 and logged_samples(curve) == 128
    assert training_curve(tmp_path / "nothing-here") == []


def test_failed_command_names_its_log_and_shows_its_end(tmp_path):
    script = "import sys; print('step one'); print('the real error', file=sys.stderr); sys.exit(3)"
    with pytest.raises(StageFailed) as info:
        run_logged([sys.executable, "-c", script], tmp_path / "x.log", desc="stage x")
    message = str(info.value)
    assert message.startswith(f"stage x exited with status 3; its log is {tmp_path / 'x.log'}")
    assert "the real error" in message and info.value.exit_status == 1


def test_command_past_its_limit_is_stopped(tmp_path):
    with pytest.raises(StageFailed, match="ran past its 2 s limit"):
        run_logged(
            [sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"],
            tmp_path / "slow.log",
            desc="slow stage",
            timeout_s=2,
        )


def test_command_is_stopped_when_a_stage_beside_it_fails(tmp_path):
    import threading
    import time

    event = threading.Event()
    cancel = threading.Timer(1.0, event.set)
    cancel.start()
    started = time.time()
    with pytest.raises(StageCancelled, match="stopped because a stage beside it failed"):
        run_logged(
            [sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"],
            tmp_path / "beside.log",
            desc="beside",
            cancel=event,
        )
    assert time.time() - started < 30  # not the child's 60 s


def test_successful_command_is_logged(tmp_path):
    result = run_logged([sys.executable, "-c", "print('hello')"], tmp_path / "ok.log", desc="ok")
    assert result.returncode == 0 and "hello" in (tmp_path / "ok.log").read_text()


def _comparison_file(tmp_path, teacher, student):
    from dataclasses import asdict

    budget = BUDGETS["paper-like"]
    summary = {"gkd": {"accuracies": {"0": 0.75, "1": 0.76}, "mean": 0.755, "low": 0.70, "high": 0.81}}
    data = {
        "machine": {"cpu": "Intel(R) Xeon(R) Processor"},
        "regimes": {
            "paper-like": {
                "budget": asdict(budget),
                "references": {
                    "teacher test greedy": {"accuracy": teacher},
                    "student test greedy": {"accuracy": student},
                },
            }
        },
        "summaries": {"paper-like": summary},
    }
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(data))
    return path


def test_the_verdict_quotes_the_comparison_only_for_the_same_teacher_and_student(tmp_path):
    results = {
        "evaluations": {
            "teacher": {"accuracy": 0.884},
            "student (initial)": {"accuracy": 0.712},
            "student (TSD-KD)": {"accuracy": 0.730},
        }
    }
    budget = BUDGETS["paper-like"]
    same = main_job.verdict_sentence(results, {"lr": 3e-5}, budget, _comparison_file(tmp_path, 0.884, 0.712))
    assert same.startswith("TSD-KD took the student from 71.2% to 73.0% (+1.8 points, closing 10% of its gap")
    assert "GKD reaches 75.5% [95% CI 70.0, 81.0] over 2 seeds" in same
    # The comparison's TSD-KD: quoted as "these settings" only when they are the job's, else named.
    for settings, expected in (
        ({"lr": 3e-5}, "where TSD-KD at these settings gets 72.0% and differs from GKD by -3.5 points [-5.0, -2.0]"),
        ({"lr": 1e-4}, "where TSD-KD at the settings it chose on validation (lr 3e-05) gets 72.0%"),
    ):
        path = _comparison_file(tmp_path, 0.884, 0.712)
        data = json.loads(path.read_text())
        data["summaries"]["paper-like"]["tsdkd-paper"] = {
            "settings": {"lr": 3e-5},
            "mean": 0.72,
            "difference": {"mean": -0.035, "low": -0.05, "high": -0.02},
        }
        path.write_text(json.dumps(data))
        assert expected in main_job.verdict_sentence(results, settings, budget, path)
    # The same recipe built on another kind of processor: other models, so the comparison does not apply.
    results["evaluations"]["teacher"]["accuracy"] = 0.808
    other = main_job.verdict_sentence(results, {"lr": 3e-5}, budget, _comparison_file(tmp_path, 0.884, 0.712))
    assert "GKD reaches" not in other
    assert "started from other models (teacher 88.4%, initial student 71.2% on this test split, built on Intel" in other
    # A comparison whose student was chosen by another rule (or, before selections, not chosen) is another budget.
    results["evaluations"]["teacher"]["accuracy"] = 0.884
    path = _comparison_file(tmp_path, 0.884, 0.712)
    data = json.loads(path.read_text())
    del data["regimes"]["paper-like"]["budget"]["student_selection"]
    path.write_text(json.dumps(data))
    assert "the comparison has no GKD result for this budget" in main_job.verdict_sentence(
        results, {"lr": 3e-5}, budget, path
    )


def test_teacher_and_student_are_built_side_by_side(tmp_path, monkeypatch):
    import threading
    from dataclasses import replace

    from tsdkd_plugin.experiments import trained_models

    together = threading.Barrier(2, timeout=30)  # broken unless both builds run at the same time
    work_dirs, selections = {}, {}

    stopped = []

    def fake_build(recipe, difficulty, cache_dir, *, work_dir, timeout_s, verbose=False, selection=None, cancel):
        work_dirs[recipe.role] = work_dir
        selections[recipe.role] = selection
        together.wait()
        if recipe.role == "student" and fail:
            raise StageFailed("train_sft student failed; log: log")
        if recipe.role == "teacher" and fail:
            assert cancel.wait(timeout=30), "the teacher's build was not stopped"
            stopped.append("teacher")
            raise StageCancelled("train_sft teacher was stopped")
        return tmp_path / recipe.role, True

    monkeypatch.setattr(trained_models, "trained_model_dir", fake_build)
    monkeypatch.setattr(trained_models, "base_model_dir", lambda model, cache_dir: tmp_path / model)
    budget = replace(BUDGETS["smoke"], student_selection=None)
    fail = False
    built = trained_models.build_teacher_and_student(budget, "easy", tmp_path, tmp_path / "run" / "logs")
    assert {role: value[:2] for role, value in built.items()} == {
        "teacher": (tmp_path / "teacher", True),
        "student": (tmp_path / "student", True),
    }
    # Each build logs into its own directory (their datasets caches never meet).
    assert work_dirs == {
        "teacher": tmp_path / "run" / "logs" / "teacher",
        "student": tmp_path / "run" / "logs" / "student",
    }
    assert selections == {"teacher": None, "student": None}
    fail = True
    together.reset()
    with pytest.raises(StageFailed) as error:
        trained_models.build_teacher_and_student(budget, "easy", tmp_path, tmp_path / "run" / "logs")
    # The student's failure stopped the teacher's build (which waited for that), and is what is raised.
    assert not isinstance(error.value, StageCancelled) and "train_sft student failed" in str(error.value)
    assert stopped == ["teacher"]
    # With a student selection, only the student keeps checkpoints, and the call needs the validation split.
    fail = False
    together.reset()
    evaluated = {}
    monkeypatch.setattr(
        trained_models, "evaluate_candidates", lambda candidates, prompts, record, **kw: evaluated.update(candidates)
    )
    smoke = BUDGETS["smoke"]
    with pytest.raises(ValueError, match="prompts_val and selection_record"):
        trained_models.build_teacher_and_student(smoke, "easy", tmp_path, tmp_path / "logs")
    trained_models.build_teacher_and_student(
        smoke, "easy", tmp_path, tmp_path / "logs", prompts_val=tmp_path / "val", selection_record=tmp_path / "r"
    )
    assert selections == {"teacher": None, "student": smoke.student_selection}
    assert evaluated == {smoke.student.steps: tmp_path / "student"}  # no kept copies in the fake entry
