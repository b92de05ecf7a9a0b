"""The paper-like regime's initial student: one checkpoint of its SFT run, chosen on the validation
split for its accuracy relative to the teacher's (budgets.StudentSelection). No training here; the
smoke job (test_smoke_job.py) runs the real train_sft copies and the choice end to end."""

import json
from dataclasses import replace

import pytest

from tsdkd_plugin.experiments import evaluate, trained_models
from tsdkd_plugin.experiments.budgets import BUDGETS, StudentSelection, check_budget
from tsdkd_plugin.experiments.runner import JobError
from tsdkd_plugin.experiments.trained_models import (
    KEPT_CHECKPOINTS_DIR,
    choose_checkpoint,
    describe_choice,
    initial_student,
    select_initial_student,
    sft_cache_entry,
)


def test_the_checkpoint_nearest_the_target_ratio_is_chosen():
    accuracy = {1000: 0.30, 1025: 0.48, 1050: 0.61, 1075: 0.70, 1250: 0.75}
    # 0.675 x 0.9 = 0.6075: 1050 (0.61) is nearest.
    assert choose_checkpoint(accuracy, 0.9, 0.675) == 1050
    # A ratio above every checkpoint's: the best one; below every one's: the first.
    assert choose_checkpoint(accuracy, 0.9, 0.99) == 1250
    assert choose_checkpoint(accuracy, 0.9, 0.1) == 1000
    # Two at the same distance: the earlier step, whatever the dict's order.
    assert choose_checkpoint({20: 0.5, 10: 0.25}, 1.0, 0.375) == 10  # exact in binary: a true tie
    with pytest.raises(ValueError, match="no checkpoint"):
        choose_checkpoint({}, 0.9, 0.675)
    # A teacher at 0% (the smoke budget's): the least accurate copy.
    assert choose_checkpoint(accuracy, 0.0, 0.675) == 1000


def test_kept_checkpoints_change_the_student_key_and_only_that(tmp_path):
    budget = BUDGETS["paper-like"]
    selection = budget.student_selection
    kind, plain = sft_cache_entry(budget.student, "easy", tmp_path)
    _, kept = sft_cache_entry(budget.student, "easy", tmp_path, selection)
    # An entry without copies keeps the recipe (hence the key) it had before selections existed.
    assert "kept_checkpoints" not in plain
    assert kept == {**plain, "kept_checkpoints": {"every": selection.every, "first_step": selection.first_step}}
    assert trained_models.sft_cache_path(budget.student, "easy", tmp_path) != trained_models.sft_cache_path(
        budget.student, "easy", tmp_path, selection
    )
    assert kind == "toy-sft-student"


@pytest.mark.parametrize(
    "selection, bad",
    [
        (StudentSelection(every=0, first_step=2, target_ratio=0.675), "every 0"),
        (StudentSelection(every=1, first_step=5, target_ratio=0.675), "from step 5"),
        (StudentSelection(every=1, first_step=2, target_ratio=1.0), "target ratio 1.0"),
    ],
)
def test_a_bad_selection_is_refused_in_one_sentence(selection, bad):
    with pytest.raises(JobError, match="needs every >= 1, a first step in 1..4") as error:
        check_budget(replace(BUDGETS["smoke"], student_selection=selection))
    assert bad in str(error.value)


def _fake_run(tmp_path, steps=(2, 3), final=4):
    """A student entry as trained_model_dir leaves it: the final model plus kept copies."""
    entry = tmp_path / "toy-sft-student-x"
    (entry / "config.json").parent.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    for step in steps:
        copy = entry / KEPT_CHECKPOINTS_DIR / f"global_step{step}_hf"
        copy.mkdir(parents=True)
        (copy / "config.json").write_text("{}")
    # An incomplete copy (no config.json) is not a candidate.
    (entry / KEPT_CHECKPOINTS_DIR / "global_step1_hf").mkdir()
    return entry


def _fake_evaluation(monkeypatch, accuracy_by_name, calls):
    def fake(model_dir, prompts, **kwargs):
        calls.append(model_dir)
        name = model_dir.name
        return evaluate.EvalResult(
            model=str(model_dir),
            prompts=str(prompts),
            n=100,
            correct=round(100 * accuracy_by_name[name]),
            answered=100,
            by_num_ops={},
            seconds=0.0,
            examples=[],
        )

    monkeypatch.setattr(evaluate, "evaluate_model", fake)


def test_selection_evaluates_every_candidate_once_and_records_the_choice(tmp_path, monkeypatch):
    entry = _fake_run(tmp_path)
    calls = []
    _fake_evaluation(monkeypatch, {"global_step2_hf": 0.2, "global_step3_hf": 0.55, entry.name: 0.8}, calls)
    record_file = tmp_path / "run" / "student_selection.json"
    record_file.parent.mkdir()
    selection = StudentSelection(every=1, first_step=2, target_ratio=0.675)
    chosen, record = select_initial_student(
        entry, 4, selection, 0.9, tmp_path / "val.jsonl", record_file, max_new_tokens=8, batch_size=4
    )
    # 0.675 x 0.9 = 0.6075: step 3 (0.55) beats the final model (0.8).
    assert chosen == entry / KEPT_CHECKPOINTS_DIR / "global_step3_hf"
    assert record["chosen_step"] == 3 and record["chosen_val_accuracy"] == 0.55
    assert record["chosen_ratio"] == pytest.approx(0.55 / 0.9)
    assert [(c["step"], c["val_accuracy"]) for c in record["candidates"]] == [(2, 0.2), (3, 0.55), (4, 0.8)]
    assert json.loads(record_file.read_text()) == record
    assert len(calls) == 3
    # The one line the main job and the comparison print and report.
    assert describe_choice(record, 4) == "step 3 of 4: validation 55.0%, 0.61 of the teacher's 90.0% (aimed at 0.675)"
    assert "n/a of the teacher's 0.0%" in describe_choice(
        {**record, "teacher_val_accuracy": 0.0, "chosen_ratio": None}, 4
    )
    # A rerun reads the record; another teacher only moves the target, nothing is evaluated again.
    chosen, record = select_initial_student(
        entry, 4, selection, 1.2, tmp_path / "val.jsonl", record_file, max_new_tokens=8, batch_size=4
    )
    assert len(calls) == 3 and record["chosen_step"] == 4  # 0.675 x 1.2 = 0.81: 0.8 is nearest
    # Another build of the student (another directory): every candidate is measured again.
    other = _fake_run(tmp_path / "other")
    _fake_evaluation(monkeypatch, {"global_step2_hf": 0.6, "global_step3_hf": 0.7, other.name: 0.8}, calls)
    chosen, record = select_initial_student(
        other, 4, selection, 0.9, tmp_path / "val.jsonl", record_file, max_new_tokens=8, batch_size=4
    )
    assert len(calls) == 6 and record["chosen_step"] == 2
    assert {c["model"] for c in record["candidates"]} == {
        str(other / KEPT_CHECKPOINTS_DIR / "global_step2_hf"),
        str(other / KEPT_CHECKPOINTS_DIR / "global_step3_hf"),
        str(other),
    }


def test_a_budget_without_selection_keeps_its_final_model(tmp_path, monkeypatch):
    calls = []
    _fake_evaluation(monkeypatch, {}, calls)
    budget = BUDGETS["weak-student"]
    assert budget.student_selection is None
    assert initial_student(budget, tmp_path / "s", 0.9, tmp_path / "val", tmp_path / "r.json") == (tmp_path / "s", None)
    assert calls == [] and not (tmp_path / "r.json").exists()
