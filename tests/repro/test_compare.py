"""The comparison: method table, every run's flags through the real parsers, pair construction,
teacher scoring, the tuning protocol and the report it writes (no training here)."""

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from tsdkd_plugin.experiments import compare, comparison, methods
from tsdkd_plugin.experiments import report as report_module
from tsdkd_plugin.experiments.budgets import BUDGETS
from tsdkd_plugin.experiments.evaluate import teacher_scores
from tsdkd_plugin.experiments.flags import distill_flags, grpo_flags, tsdkd_flags
from tsdkd_plugin.experiments.methods import METHODS, TUNED_METHODS, parse_methods, ranked_pairs
from tsdkd_plugin.experiments.protocol import LR_GRID, TUNING_SEED
from tsdkd_plugin.experiments.report import remedies_markdown, write_comparison_report
from tsdkd_plugin.experiments.runner import JobError
from tsdkd_plugin.objective import PRESETS, TSDKDConfig
from tsdkd_plugin.toy import arith_task


def test_method_groups_and_unknown_names():
    assert parse_methods("all") == list(METHODS)
    assert parse_methods("gkd,seqkd,gkd") == ["gkd", "seqkd"]
    assert set(parse_methods("baselines")) == {"seqkd", "gkd", "grpo", "dpo"}
    assert set(parse_methods("tuned")) == {"seqkd", "gkd", "grpo", "dpo", "tsdkd-paper", "tsdkd-reference"}
    with pytest.raises(JobError, match="unknown method 'kd'; valid methods: seqkd, gkd"):
        parse_methods("gkd,kd")


def test_the_required_comparison_is_covered():
    assert {m.runner for m in METHODS.values()} == {"seqkd", "tsdkd", "grpo", "dpo"}
    assert METHODS["gkd"].objective == {"gate": "none", "indirect_weight": 0.0, "entropy_weight": 0.0}
    assert METHODS["tsdkd-paper"].objective == {"preset": "paper"}
    assert METHODS["tsdkd-reference"].objective == {"preset": "reference"}
    # The paper's ablation ladder, at the paper preset's tuned settings.
    ladder = {m.name: dict(m.objective) for m in METHODS.values() if m.derived_from == "tsdkd-paper"}
    assert ladder["tsdkd-gated-jsd-only"] == {"indirect_weight": 0.0, "entropy_weight": 0.0}
    assert ladder["tsdkd-no-entropy"] == {"entropy_weight": 0.0}
    assert ladder["tsdkd-no-indirect"] == {"indirect_weight": 0.0}
    assert ladder["tsdkd-prefix"] == {"listmle_form": "prefix"}


def test_an_ablation_switches_its_part_off_on_top_of_the_tuned_settings():
    tuned = {"lr": 3e-4, "indirect_weight": 0.01}
    assert METHODS["tsdkd-no-indirect"].objective_for(tuned) == {"preset": "paper", "indirect_weight": 0.0}
    assert METHODS["tsdkd-no-entropy"].objective_for(tuned) == {
        "preset": "paper",
        "indirect_weight": 0.01,
        "entropy_weight": 0.0,
    }
    assert METHODS["gkd"].objective_for({"lr": 1e-4, "beta": 0.5}) == {**METHODS["gkd"].objective, "beta": 0.5}


def test_every_tuned_method_gets_the_same_number_of_trials():
    counts = {name: len(LR_GRID) + len(METHODS[name].grid) for name in TUNED_METHODS}
    assert len(set(counts.values())) == 1, counts


def _tsdkd_launches():
    for name, method in METHODS.items():
        if method.runner != "tsdkd":
            continue
        for overrides in ({}, *method.grid):
            yield pytest.param(name, overrides, id=f"{name}-{comparison.settings_key(overrides) or 'default'}")


@pytest.mark.parametrize("name, overrides", list(_tsdkd_launches()))
def test_every_tsdkd_run_is_a_valid_launch(name, overrides, tmp_path, toy_teacher_dir, toy_student_dir, arith_data_dir):
    """Each method's and each trial's --tsdkd.* flags pass train_tsdkd's own parser and checks."""
    from tsdkd_plugin.cli.train_tsdkd import parse_args

    budget = BUDGETS["paper-like"].distill
    flags = distill_flags(
        budget,
        student_dir=toy_student_dir,
        prompts_file=arith_data_dir / "prompts_train.jsonl",
        output_dir=tmp_path / "m",
        seed=0,
    )
    objective = METHODS[name].objective_for({"lr": 1e-4, **overrides})
    _, run = parse_args(flags + tsdkd_flags(objective, teacher_dir=toy_teacher_dir))
    preset = objective.get("preset")
    expected = {**(PRESETS[preset] if preset else {}), **{k: v for k, v in objective.items() if k != "preset"}}
    for field, value in expected.items():
        assert getattr(run.objective, field) == value, field


@pytest.mark.parametrize("estimator", ["group_norm"] + [g["estimator"] for g in METHODS["grpo"].grid])
def test_grpo_flags_parse_with_upstream_train_ppo_ray(estimator, tmp_path, toy_student_dir, arith_data_dir):
    from tsdkd_plugin.host.upstream_cli import load_upstream_cli

    upstream = load_upstream_cli()
    budget = BUDGETS["paper-like"].distill
    flags = distill_flags(
        budget,
        student_dir=toy_student_dir,
        prompts_file=arith_data_dir / "prompts_train.jsonl",
        output_dir=tmp_path / "m",
        seed=0,
    )
    flags += grpo_flags(estimator)
    args = upstream.finalize(upstream.build_parser().parse_args(flags))
    assert args.algo.advantage.estimator == estimator and args.algo.kl.init_coef == 0
    # Every on-policy toy run's vLLM engine runs eagerly (no per-run graph compile).
    assert args.vllm.enforce_eager is True


class _TrainerReached(Exception):
    pass


@pytest.mark.parametrize("name", ["seqkd", "dpo"])
def test_every_offline_trial_names_a_data_file_upstream_loads(name, tmp_path, monkeypatch, toy_student_dir):
    """SeqKD's and DPO's trials write their data file into a run directory whose name holds a comma
    ("lr=3e-05,teacher_temperature=0.7--seed100"); OpenRLHF's blending_datasets splits --data.dataset
    on commas, so the flag must still name the file it wrote (this once failed every grid trial)."""
    from openrlhf.datasets.utils import blending_datasets

    method = METHODS[name]
    rows = [{arith_task.PROMPT_KEY: f"{i} + 1 = ?", arith_task.LABEL_KEY: str(i + 1)} for i in range(4)]
    budget = BUDGETS["paper-like"]
    distill = replace(budget.distill, n_prompts=4, samples_per_prompt=2, train_batch_size=4, micro_batch_size=4)
    ctx = methods.RunContext(
        budget=replace(budget, distill=distill),
        teacher_dir=toy_student_dir,
        student_dir=toy_student_dir,
        prompts_file=tmp_path / "prompts.jsonl",
        prompt_rows=rows,
        timeout_s=60,
        verbose=False,
    )
    monkeypatch.setattr(
        methods,
        "sample_responses",
        lambda _m, r, n, *a, **k: [[f"#### {i}{j}" for j in range(n)] for i in range(len(r))],
    )
    monkeypatch.setattr(methods, "teacher_scores", lambda _m, r, groups: [list(range(len(g))) for g in groups])
    loaded = []

    def trainer(module, args, steps, stage_dir, ctx, desc):
        value = args[args.index("--data.dataset") + 1]
        monkeypatch.chdir(stage_dir)  # where _run_offline_trainer runs the trainer
        data = blending_datasets(value, strategy=SimpleNamespace(print=lambda *a: None, is_rank_0=lambda: True))
        loaded.append((value, len(data)))
        raise _TrainerReached

    monkeypatch.setattr(methods, "_run_offline_trainer", trainer)
    for overrides in method.grid:
        settings = {"lr": 3e-5, **overrides}
        stage_dir = tmp_path / "runs" / f"{comparison.settings_key(settings)}--seed100"
        assert "," in stage_dir.name
        with pytest.raises(_TrainerReached):
            methods.run_method(method, settings, 100, ctx, stage_dir)
    assert len(loaded) == len(method.grid) and all(count > 0 for _, count in loaded), loaded


def test_a_data_path_upstream_would_split_is_refused_with_its_name():
    from tsdkd_plugin.experiments.flags import dataset_flag_value

    assert dataset_flag_value(Path("/runs/a/data.jsonl")) == "/runs/a/data.jsonl"
    for bad in ("/runs/lr=1,b=2/data.jsonl", "/runs/x@y/data.jsonl"):
        with pytest.raises(ValueError, match=f"data file {bad} has a ',' or '@' in its path"):
            dataset_flag_value(Path(bad))


def test_ranked_pairs_best_against_worst():
    responses = ["a", "b", "c", "d"]
    scores = [-1.0, -0.1, -3.0, -2.0]
    assert ranked_pairs(responses, scores) == [("b", "c"), ("a", "d")]
    assert ranked_pairs(["same", "same", "x", "y"], [0.0, -1.0, -2.0, -3.0]) == [("same", "y"), ("same", "x")]
    assert ranked_pairs(["s", "s"], [0.0, -1.0]) == []


def test_teacher_scores_are_mean_response_log_likelihoods(toy_teacher_dir):
    import torch

    from tsdkd_plugin.experiments.evaluate import load_model_for_eval, render_prompt

    rows = [
        {"prompt": [{"role": "user", "content": "Q: 1+2=?"}]},
        {"prompt": [{"role": "user", "content": "Q: 9-4=?"}]},
    ]
    responses = [["1+2=3. #### 3", "#### 4"], ["9-4=5. #### 5", "9-4=5. #### 5 and more words"]]
    scores = teacher_scores(toy_teacher_dir, rows, responses, batch_size=3)
    assert [len(s) for s in scores] == [2, 2]
    model, tokenizer = load_model_for_eval(toy_teacher_dir)
    prompt = render_prompt(tokenizer, rows[1]["prompt"])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + responses[1][1] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1, : len(tokenizer)]
    logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert scores[1][1] == pytest.approx(float(logprobs[len(prompt_ids) - 1 :].mean()), abs=1e-5)


def test_settings_keys_are_stable_and_lr_first():
    assert comparison.settings_key({"beta": 0.5, "lr": 1e-4}) == "lr=0.0001,beta=0.5"
    assert comparison.settings_key({"lr": 3e-5, "estimator": "rloo"}) == "lr=3e-05,estimator=rloo"


def _state(tmp_path, regime):
    return comparison.RegimeState(regime=comparison.REGIMES[regime], budget=BUDGETS[regime], root=tmp_path / regime)


def test_tuning_tries_the_lr_grid_then_the_methods_grid_at_the_best_lr(tmp_path, monkeypatch):
    calls = []
    accuracy = {1e-4: 0.60, 3e-5: 0.55, 3e-4: 0.60, "beta=0": 0.58, "beta=0.5": 0.62, "beta=1": 0.62}

    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        calls.append((stage, method, dict(settings), seed, split))
        key = f"beta={settings['beta']:g}" if "beta" in settings else settings["lr"]
        return {"evaluation": {"accuracy": accuracy[key]}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    result = comparison.tune_method(_state(tmp_path, "paper-like"), None, "gkd", {})
    assert [c[2] for c in calls] == [{"lr": lr} for lr in LR_GRID] + [
        {"lr": 1e-4, "beta": 0.0},
        {"lr": 1e-4, "beta": 0.5},
        {"lr": 1e-4, "beta": 1.0},
        # beta 0.5 moved the choice: the rates next to 1e-4, at beta 0.5
        {"lr": 3e-5, "beta": 0.5},
        {"lr": 3e-4, "beta": 0.5},
    ]
    assert all(c[0] == "tune" and c[3] == TUNING_SEED and c[4] == "val" for c in calls)
    # Ties go to the earlier trial: lr 1e-4 before 3e-4, beta 0.5 before beta 1 (and its re-checks).
    assert result["chosen"] == {"lr": 1e-4, "beta": 0.5} and result["chosen_val_accuracy"] == 0.62
    assert len(result["trials"]) == len(LR_GRID) + len(METHODS["gkd"].grid) + 2


def test_a_rate_next_to_the_chosen_one_can_win_the_recheck_and_an_unmoved_choice_gets_none(tmp_path, monkeypatch):
    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        weak = settings.get("entropy_weight") == 0.01
        table = {3e-5: 0.70, 1e-4: 0.65, 3e-4: 0.5} if not weak else {3e-5: 0.72, 1e-4: 0.76, 3e-4: 0.4}
        return {"evaluation": {"accuracy": table[settings["lr"]] - (0.01 if "num_candidates" in settings else 0)}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    result = comparison.tune_method(_state(tmp_path, "paper-like"), None, "tsdkd-paper", {})
    weak = {"indirect_weight": 0.001, "entropy_weight": 0.01}
    # 3e-5 is the first rate of the default grid: only its right-hand neighbour exists.
    assert [t["settings"] for t in result["trials"]][-1:] == [{"lr": 1e-4, **weak}]
    assert result["chosen"] == {"lr": 1e-4, **weak} and result["chosen_val_accuracy"] == 0.76

    flat = comparison.tune_method(_state(tmp_path, "paper-like"), None, "seqkd", {})
    assert len(flat["trials"]) == len(LR_GRID) + len(METHODS["seqkd"].grid)  # nothing moved: no re-check


@pytest.mark.parametrize("grid_trials", [0, 2])
def test_a_shorter_grid_keeps_the_same_first_entries_for_every_method(grid_trials, tmp_path, monkeypatch):
    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        return {"evaluation": {"accuracy": 0.5}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    for name in ("gkd", "seqkd", "tsdkd-paper"):
        result = comparison.tune_method(_state(tmp_path, "paper-like"), None, name, {}, grid_trials)
        assert [t["settings"] for t in result["trials"]] == [{"lr": lr} for lr in LR_GRID] + [
            {"lr": LR_GRID[0], **overrides} for overrides in METHODS[name].grid[:grid_trials]
        ]


def test_a_negative_grid_trial_count_is_refused(capsys):
    assert compare.main(["--grid-trials", "-1", "--report-only"]) != 0
    assert "--grid-trials must be 0 or more, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--run-dir", "--cache-dir"])
def test_a_work_directory_upstream_would_split_is_refused_before_anything_is_built(
    option, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(comparison, "prepare_regime", lambda *a: pytest.fail("models built before the check"))
    assert compare.main([option, str(tmp_path / "a,b")]) == 2
    assert f"{option} {tmp_path / 'a,b'}: OpenRLHF's --data.dataset reads ','" in capsys.readouterr().err
    assert not (tmp_path / "a,b").exists()


def test_a_missing_restore_file_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(comparison, "prepare_regime", lambda *a: pytest.fail("models built before the check"))
    argv = ["--restore-from", str(tmp_path / "nope.json"), "--run-dir", str(tmp_path / "runs")]
    assert compare.main(argv) != 0
    assert f"--restore-from: no such file {tmp_path / 'nope.json'}" in capsys.readouterr().err


def test_another_lr_grid_is_used_for_every_method(tmp_path, monkeypatch):
    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        return {"evaluation": {"accuracy": 0.5}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    lr_grid = compare.parse_lr_grid("3e-5, 1e-4")
    assert lr_grid == (3e-5, 1e-4)
    for name in ("gkd", "seqkd", "tsdkd-paper"):
        result = comparison.tune_method(_state(tmp_path, "paper-like"), None, name, {}, 0, lr_grid)
        assert [t["settings"] for t in result["trials"]] == [{"lr": 3e-5}, {"lr": 1e-4}]


@pytest.mark.parametrize("text", ["", "1e-4,-1", "fast"])
def test_a_bad_lr_grid_is_refused(text):
    with pytest.raises(JobError, match="--lr-grid must be comma-separated positive learning rates"):
        compare.parse_lr_grid(text)


def test_an_lr_only_regime_keeps_the_inherited_settings_and_a_failed_trial_never_wins(tmp_path, monkeypatch):
    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        return None if settings["lr"] == 3e-4 else {"evaluation": {"accuracy": 0.1 if settings["lr"] == 1e-4 else 0.0}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    result = comparison.tune_method(_state(tmp_path, "weak-student"), None, "gkd", {"gkd": {"lr": 3e-4, "beta": 0.5}})
    assert [t["settings"] for t in result["trials"]] == [{"lr": lr, "beta": 0.5} for lr in LR_GRID]
    assert [t["failed"] for t in result["trials"]] == [False, False, True]
    assert result["chosen"] == {"lr": 1e-4, "beta": 0.5}


@pytest.mark.parametrize(
    "centre, window",
    [
        (1e-5, [1e-5, 3e-5, 1e-4]),  # at the grid's low end: moved inwards, still three rates
        (3e-5, [1e-5, 3e-5, 1e-4]),
        (1e-4, [3e-5, 1e-4, 3e-4]),
        (3e-4, [3e-5, 1e-4, 3e-4]),
        (2e-4, [3e-5, 1e-4, 3e-4]),  # not on the grid: around the nearest rate (log scale)
    ],
)
def test_an_inherited_rate_is_tried_with_its_neighbours_on_the_grid(centre, window):
    assert comparison.lr_window((3e-4, 1e-5, 1e-4, 3e-5), centre) == window  # the grid's order does not matter
    assert comparison.lr_window((3e-5, 1e-4), centre) == [3e-5, 1e-4]  # a grid no longer than the window: all of it


def test_an_lr_regime_tries_the_same_number_of_rates_around_each_methods_inherited_choice(tmp_path, monkeypatch):
    calls = []

    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        calls.append((method, settings["lr"]))
        return {"evaluation": {"accuracy": 0.5}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    grid = (1e-5, 3e-5, 1e-4, 3e-4)
    inherited = {"gkd": {"lr": 1e-4, "beta": 0.5}, "dpo": {"lr": 3e-5, "dpo_beta": 0.3}, "seqkd": {"lr": 3e-4}}
    for name in inherited:
        comparison.tune_method(_state(tmp_path, "paper-like-long"), None, name, inherited, None, grid)
    assert calls == [
        ("gkd", 3e-5),
        ("gkd", 1e-4),
        ("gkd", 3e-4),
        ("dpo", 1e-5),
        ("dpo", 3e-5),
        ("dpo", 1e-4),
        ("seqkd", 3e-5),
        ("seqkd", 1e-4),
        ("seqkd", 3e-4),
    ]


def test_the_32_step_regime_tests_gkd_and_the_paper_preset_with_its_derived_methods(tmp_path):
    paper_like, long = comparison.REGIMES["paper-like"], comparison.REGIMES["paper-like-long"]
    assert [m for m in TUNED_METHODS if paper_like.tests(m)] == ["gkd", "tsdkd-paper"]
    assert all(long.tests(m) and comparison.REGIMES["weak-student"].tests(m) for m in TUNED_METHODS)
    tuning = {m: {"chosen": {"lr": 1e-4}, "chosen_val_accuracy": 0.5} for m in TUNED_METHODS}
    assert comparison.goes_to_test("tsdkd-no-entropy", paper_like, tuning, {}) is True
    # An ablation follows its parent: a regime that did not test the paper preset would not test it either.
    untested_parent = replace(paper_like, tested=("gkd",))
    assert comparison.goes_to_test("tsdkd-no-entropy", untested_parent, tuning, {}) is False

    # Runs of a method the regime no longer tests, and validation runs outside the protocol's trials,
    # stay on disk but are not results of the comparison.
    run_dir = tmp_path / "runs"
    root = run_dir / "paper-like"
    for method in ("gkd", "seqkd"):
        path = root / "results" / "test" / method / "lr=0.0001--seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_fake_run(method, 0, 0.5)))
        for lr in ("0.0001", "1e-05"):
            tune = root / "results" / "tune" / method / f"lr={lr}--seed{TUNING_SEED}.json"
            tune.parent.mkdir(parents=True, exist_ok=True)
            tune.write_text(json.dumps({**_fake_run(method, TUNING_SEED, 0.5, {"lr": float(lr)}), "stage": "tune"}))
    chosen = {
        m: {"trials": [{"settings": {"lr": 1e-4}, "val_accuracy": 0.5, "failed": False}], "chosen": {"lr": 1e-4}}
        for m in ("gkd", "seqkd")
    }
    (root / "chosen.json").write_text(json.dumps(chosen))
    options = SimpleNamespace(run_dir=str(run_dir), seed_list=[0], grid_trials=None, lr_grid=LR_GRID)
    entry = comparison.collect(options, ["paper-like"], ["gkd", "seqkd"], 1.0, ["c"])["regimes"]["paper-like"]
    assert [run["method"] for run in entry["test_runs"]] == ["gkd"]
    assert entry["superseded_test_runs"] == ["paper-like/results/test/seqkd/lr=0.0001--seed0.json"]
    assert sorted((run["method"], run["settings"]["lr"]) for run in entry["tuning_runs"]) == [
        ("gkd", 1e-4),
        ("seqkd", 1e-4),
    ]
    assert entry["unused_tuning_runs"] == 2 and entry["missing"] == []


def _fake_run(method, seed, accuracy, settings=None):
    return {
        "regime": "paper-like",
        "stage": "test",
        "method": method,
        "label": METHODS[method].label,
        "group": METHODS[method].group,
        "seed": seed,
        "split": "test",
        "settings": settings or {"lr": 1e-4},
        "evaluation": {
            "accuracy": accuracy,
            "n": 100,
            "correct": int(100 * accuracy),
            "by_num_ops": {"2": {"n": 40, "correct": 20, "accuracy": 0.5}},
        },
        "seconds": 120.0,
        "optimizer_steps": 32,
        "rollouts_planned": 8,
        "rollouts": 8,
        "samples_planned": 2048,
        "samples": 2048,
        "samples_trained": 2048,
        "training_curve": [
            {"global_step": 1, "reward": 0.5, "tsdkd/loss": 1.0, "tsdkd/diag_grad_norm_jsd": 0.1},
            {"global_step": 2, "reward": 0.6, "tsdkd/loss": 0.9, "tsdkd/diag_grad_norm_jsd": 0.2},
        ],
    }


def test_report_from_run_files(tmp_path):
    """The report is built from the run files alone: CIs, paired differences against GKD, the
    tuning table, the curves, and what is missing or failed."""
    run_dir = tmp_path / "runs"
    root = run_dir / "paper-like"
    accuracies = {"gkd": [0.50, 0.52, 0.54], "tsdkd-paper": [0.55, 0.56, 0.60]}
    for method, values in accuracies.items():
        for seed, acc in enumerate(values):
            path = root / "results" / "test" / method / f"lr=0.0001--seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_fake_run(method, seed, acc)))
    failed = root / "results" / "test" / "seqkd" / "lr=0.0001--seed1.failed.json"
    failed.parent.mkdir(parents=True)
    failed.write_text(json.dumps({"method": "seqkd", "settings": {"lr": 1e-4}, "seed": 1, "error": "boom\ntail"}))
    tune = root / "results" / "tune" / "gkd" / f"lr=0.0001--seed{TUNING_SEED}.json"
    tune.parent.mkdir(parents=True)
    tune.write_text(
        json.dumps(
            {
                **_fake_run("gkd", TUNING_SEED, 0.5),
                "stage": "tune",
                "validation_curve": [{"samples": 1024, "accuracy": 0.45, "answered": 1.0}],
            }
        )
    )
    # A tuning run of a method this report does not cover: on disk, not counted in the compute table.
    other = root / "results" / "tune" / "grpo" / f"lr=0.0001--seed{TUNING_SEED}.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({**_fake_run("grpo", TUNING_SEED, 0.4), "stage": "tune"}))
    (root / "references.json").write_text(
        json.dumps(
            {
                f"{role} {split} {kind}": {"accuracy": acc, "answered": 0.99, "n": 100}
                for role, acc in (("teacher", 0.8), ("student", 0.56))
                for split, kind in (("val", "greedy"), ("test", "greedy"), ("val", "sampled"))
            }
        )
    )
    (root / "chosen.json").write_text(
        json.dumps(
            {
                "gkd": {
                    "trials": [{"settings": {"lr": 1e-4}, "val_accuracy": 0.5, "failed": False}],
                    "chosen": {"lr": 1e-4},
                    "chosen_val_accuracy": 0.5,
                }
            }
        )
    )
    assert comparison.chosen_settings_file(run_dir, "paper-like") == root / "chosen.json"

    options = SimpleNamespace(run_dir=str(run_dir), seed_list=[0, 1, 2], grid_trials=None, lr_grid=LR_GRID)
    data = comparison.collect(
        options,
        ["paper-like"],
        ["seqkd", "gkd", "tsdkd-paper"],
        60.0,
        [compare.PROG, "--regimes", "paper-like", "--seeds", "3"],
    )
    written = write_comparison_report(data, tmp_path / "out")
    markdown = written["markdown"].read_text()
    # mean 57.0, sd 2.65, t(0.975, 2) = 4.303: half width 6.57
    assert "| TSD-KD (paper preset) | lr 0.0001 | **57.0** [50.4, 63.6] | 55.0, 56.0, 60.0 |" in markdown
    # differences +5, +4, +6: mean +5.0, sd 1, half width 2.48
    assert "+5.0 [+2.5, +7.5] | +5.0, +4.0, +6.0 |" in markdown
    assert "Initial student / teacher on test: **0.70**" in markdown
    assert "The student starts at" in markdown  # the regime's description, capitals kept:
    assert "Qwen2.5-1.5B starts at 0.71 of its 14B teacher's on GSM8K" in markdown
    assert "seqkd lr 0.0001 seed 1: boom" in markdown
    # SeqKD is tuned at 32 steps but tested only at 96 (paper-like-long): its missing seeds are not expected here.
    assert not [m for m in data["regimes"]["paper-like"]["missing"] if m.startswith("seqkd")]
    assert "python -m tsdkd_plugin.experiments.compare --regimes paper-like --seeds 3" in markdown
    assert "the learning rate, then the method's own grid at the best one" in markdown
    # Compute: 1 tuning run and 6 test runs of 120 s each (the failed one has no result file): 840 s.
    assert "| paper-like | 1 | 6 | 0.23 |" in markdown and "| all | 7 runs | | 0.23 |" in markdown
    data["grid_trials"] = 0
    assert (
        "the learning rate, then none of the method's own grid"
        in write_comparison_report(data, tmp_path / "out0")["markdown"].read_text()
    )
    for key in ("paper-like test", "paper-like curves", "paper-like diagnostics"):
        assert Path(written[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    summary = json.loads(written["json"].read_text())["summaries"]["paper-like"]
    assert summary["tsdkd-paper"]["result_files"][0] == "paper-like/results/test/tsdkd-paper/lr=0.0001--seed0.json"

    # An ablation is expected on test only once its parent was tuned in this run (chosen.json).
    def missing_ablation_seeds():
        data = comparison.collect(options, ["paper-like"], ["gkd", "tsdkd-paper", "tsdkd-no-entropy"], 1.0, ["c"])
        return [m for m in data["regimes"]["paper-like"]["missing"] if m.startswith("tsdkd-no-entropy")]

    assert missing_ablation_seeds() == []
    chosen = json.loads((root / "chosen.json").read_text())
    chosen["tsdkd-paper"] = {**chosen["gkd"], "chosen": {"lr": 1e-4}}
    (root / "chosen.json").write_text(json.dumps(chosen))
    assert missing_ablation_seeds() == [f"tsdkd-no-entropy seed {seed}" for seed in (0, 1, 2)]


def test_test_runs_at_settings_a_method_no_longer_has_are_left_out(tmp_path):
    """A comparison resumed after its tuning changed (a longer grid, a re-check) keeps the earlier
    test runs on disk; only those at each method's chosen settings are its results."""
    run_dir = tmp_path / "runs"
    root = run_dir / "paper-like"
    for settings, accuracy in (({"lr": 1e-4}, 0.40), ({"lr": 1e-4, "beta": 0.5}, 0.70)):
        for seed in (0, 1):
            name = f"{comparison.settings_key(settings)}--seed{seed}.json"
            path = root / "results" / "test" / "gkd" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_fake_run("gkd", seed, accuracy, settings)))
    tuning = {"gkd": {"trials": [], "chosen": {"lr": 1e-4, "beta": 0.5}, "chosen_val_accuracy": 0.7}}
    (root / "chosen.json").write_text(json.dumps(tuning))
    options = SimpleNamespace(run_dir=str(run_dir), seed_list=[0, 1], grid_trials=None, lr_grid=LR_GRID)
    data = comparison.collect(options, ["paper-like"], ["gkd"], 1.0, ["c"])
    regime = data["regimes"]["paper-like"]
    assert [(r["settings"], r["evaluation"]["accuracy"]) for r in regime["test_runs"]] == [
        ({"lr": 1e-4, "beta": 0.5}, 0.70)
    ] * 2
    assert sorted(regime["superseded_test_runs"]) == [
        "paper-like/results/test/gkd/lr=0.0001--seed0.json",
        "paper-like/results/test/gkd/lr=0.0001--seed1.json",
    ]
    markdown = write_comparison_report(data, tmp_path / "out")["markdown"].read_text()
    assert "| GKD (JSD, all tokens) | lr 0.0001, beta 0.5 | **70.0** [70.0, 70.0] | 70.0, 70.0 |" in markdown
    assert "2 earlier test runs at settings a method no longer has" in markdown


def test_a_run_that_missed_its_budget_is_not_a_result():
    assert comparison.budget_shortfall(
        {"rollouts_planned": 8, "rollouts": 2, "samples_planned": 2048, "samples": 512}
    ) == ("it logged 2 of its 8 rollouts")
    assert (
        comparison.budget_shortfall({"rollouts_planned": 8, "rollouts": 8, "samples_planned": 2048, "samples": 1024})
        == "it logged 1024 of its 2048 samples"
    )
    assert (
        comparison.budget_shortfall({"rollouts_planned": 8, "rollouts": 8, "samples_planned": 2048, "samples": 2048})
        is None
    )
    # SFT and DPO runs plan no Ray rollouts: their steps are what their data gives.
    assert comparison.budget_shortfall({"optimizer_steps": 30}) is None


def _references(teacher_test):
    keys = ("teacher val greedy", "teacher test greedy", "student val greedy", "student test greedy")
    refs = {key: {"accuracy": 0.7, "answered": 1.0, "n": 500} for key in keys}
    refs["teacher test greedy"]["accuracy"] = teacher_test
    return refs


def _report_with_runs(tmp_path, teacher_test):
    tuning = {**_fake_run("gkd", 100, 0.77, {"lr": 3e-5}), "stage": "tune", "split": "val"}
    test = {**_fake_run("gkd", 0, 0.76, {"lr": 3e-5}), "result_file": "paper-like/results/test/gkd/x.json"}
    report = tmp_path / "comparison.json"
    report.write_text(
        json.dumps(
            {
                "regimes": {
                    "paper-like": {
                        "references": _references(teacher_test),
                        "tuning_runs": [tuning],
                        "test_runs": [test],
                    }
                },
                "invocations": [{"started": 1000.0, "updated": 4600.0, "outcome": "interrupted", "jobs": 2}],
            }
        )
    )
    return report


def test_restore_writes_the_recorded_runs_back_where_a_resumed_comparison_reads_them(tmp_path):
    state = _state(tmp_path, "paper-like")
    state.references = _references(0.884)
    report = _report_with_runs(tmp_path, 0.884)
    assert comparison.restore_runs(state, report) == 2
    restored = json.loads(state.result_file("test", "gkd", "lr=3e-05--seed0").read_text())
    assert restored["evaluation"]["accuracy"] == 0.76 and restored["restored_from"] == str(report)
    assert "result_file" not in restored
    assert json.loads(state.result_file("tune", "gkd", "lr=3e-05--seed100").read_text())["split"] == "val"
    # A second restore keeps what is there (a rerun's own result is never overwritten).
    assert comparison.restore_runs(state, report) == 0
    # The earlier invocation's time comes back with the runs, once.
    (invocation,) = comparison.read_invocations(tmp_path)
    assert invocation["started"] == 1000.0 and invocation["restored_from"] == str(report)


def test_restore_refuses_runs_that_started_from_other_models(tmp_path):
    state = _state(tmp_path, "paper-like")
    state.references = _references(0.880)
    with pytest.raises(
        JobError, match="teacher test greedy accuracy recorded there is 0.884, the model built here scores 0.88"
    ):
        comparison.restore_runs(state, _report_with_runs(tmp_path, 0.884))
    assert not (tmp_path / "paper-like" / "results").exists()
    assert comparison.read_invocations(tmp_path) == []  # nor the refused report's time
    with pytest.raises(JobError, match="--restore-from: no such file"):
        comparison.restore_runs(state, tmp_path / "missing.json")


def test_a_regime_the_stopped_comparison_had_not_begun_restores_nothing(tmp_path):
    # A comparison stopped during its first regime reports the later ones with no models and no runs:
    # resuming it must go on to build and run them, not refuse the file.
    report = _report_with_runs(tmp_path, 0.884)
    data = json.loads(report.read_text())
    data["regimes"]["paper-like-long"] = {"references": {}, "tuning_runs": [], "test_runs": []}
    report.write_text(json.dumps(data))
    for regime in ("paper-like-long", "weak-student"):
        state = _state(tmp_path, regime)
        state.references = _references(0.5)
        assert comparison.restore_runs(state, report) == 0
        assert not state.root.exists()
    (tmp_path / "not-a-report.json").write_text("[1, 2]")
    with pytest.raises(JobError, match="is not a comparison.json"):
        comparison.restore_runs(_state(tmp_path, "paper-like"), tmp_path / "not-a-report.json")


def test_restored_invocations_keep_the_time_of_a_comparison_resumed_elsewhere(tmp_path):
    earlier = {"started": 1000.0, "updated": 1000.0 + 2 * 3600, "outcome": "interrupted", "jobs": 2, "hardware": "a"}
    report = tmp_path / "comparison.json"
    report.write_text(json.dumps({"regimes": {}, "invocations": [earlier]}))
    run_dir = tmp_path / "run"
    options = SimpleNamespace(jobs=2, argv=["--jobs", "2"])
    with comparison.record_invocation(run_dir, options) as add_phase_seconds:
        add_phase_seconds("building", 0.25 * 3600)
        add_phase_seconds("building", 0.25 * 3600)
    assert comparison.restore_invocations(run_dir, report) == 1
    assert comparison.restore_invocations(run_dir, report) == 0  # once only
    first, second = comparison.read_invocations(run_dir)  # oldest first, whatever the file names
    assert first["started"] == 1000.0 and first["restored_from"] == str(report)
    assert "restored_from" not in second and second["phases"] == {"building": 1800.0}
    text = "\n".join(report_module.invocations_markdown([first, second]))
    assert "**2.00 h** over 2 recorded invocations" in text  # the restored two hours, plus ~0 s here
    assert "1 of them ran on an earlier machine" in text
    assert f"| 1970-01-01 00:16 | 2.00 |  | 2 | interrupted | a | {report} |" in text
    assert "| 0.00 | 0.50 | 2 | finished |" in text  # its own time is ~0 s; the building counted to it
    assert "took 0.50 h of it in the 1 invocations that recorded it" in text


def test_remedies_are_opt_in_options_on_top_of_the_paper_preset():
    remedies = {m.name: m for m in METHODS.values() if m.group == "remedy"}
    assert set(parse_methods("remedies")) == set(remedies) and len(remedies) == 3
    assert {m.derived_from for m in remedies.values()} == {"tsdkd-paper"}
    # A remedy keeps the parent's tuned knobs but not its tuned weights: it runs at the paper's.
    tuned = {"lr": 3e-5, "entropy_weight": 0.01, "indirect_weight": 0.001, "num_candidates": 5}
    assert METHODS["tsdkd-grad-balanced"].objective_for(tuned) == {
        "preset": "paper",
        "num_candidates": 5,
        "indirect_weight": 0.1,
        "entropy_weight": 1.0,
        "term_balance": "grad_norm",
    }
    assert METHODS["tsdkd-weight-warmup"].objective_for(tuned)["entropy_weight"] == 1.0
    defaults = TSDKDConfig()
    assert methods.PAPER_WEIGHTS == {
        "indirect_weight": defaults.indirect_weight,
        "entropy_weight": defaults.entropy_weight,
    }
    # The default runs the paper's ladder; the other design choices are one group name away.
    assert parse_methods("ablations") == ["tsdkd-gated-jsd-only", "tsdkd-no-entropy", "tsdkd-no-indirect"]
    assert set(parse_methods("design-ablations")) == {"tsdkd-hard-gate", "tsdkd-sequence", "tsdkd-prefix"}
    assert set(parse_methods("ablations,design-ablations")) == {
        m.name for m in METHODS.values() if m.group == "ablation"
    }


@pytest.mark.parametrize(
    "outcome, to_test",
    [(0.75, True), (0.736, False), (0.70, False), (None, False)],
    ids=["beats", "ties", "worse", "failed"],
)
def test_a_remedy_reaches_the_test_split_only_by_beating_its_parent_on_validation(
    outcome, to_test, tmp_path, monkeypatch
):
    calls = []

    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        calls.append((stage, method, dict(settings), seed, split))
        return None if outcome is None else {"evaluation": {"accuracy": outcome}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    parent = {"chosen": {"lr": 3e-5, "entropy_weight": 0.1}, "chosen_val_accuracy": 0.736}
    state = _state(tmp_path, "paper-like")
    result = comparison.try_remedy(state, None, "tsdkd-listmle-normalized", parent)
    assert calls == [("tune", "tsdkd-listmle-normalized", parent["chosen"], TUNING_SEED, "val")]
    assert result["to_test"] is to_test and result["failed"] is (outcome is None)
    regime = comparison.REGIMES["paper-like"]
    tuning = {"tsdkd-paper": parent}
    remedies = {"tsdkd-listmle-normalized": result}
    assert comparison.goes_to_test("tsdkd-listmle-normalized", regime, tuning, remedies) is to_test
    assert comparison.goes_to_test("tsdkd-grad-balanced", regime, tuning, remedies) is False  # never tried
    assert comparison.goes_to_test("tsdkd-hard-gate", regime, tuning, remedies) is True  # an ablation
    assert comparison.goes_to_test("tsdkd-hard-gate", comparison.REGIMES["weak-student"], tuning, remedies) is False

    remedies_md = "\n".join(
        remedies_markdown(
            remedies,
            {
                "methods_doc": {
                    "tsdkd-paper": {"label": "TSD-KD (paper preset)"},
                    "tsdkd-listmle-normalized": {"objective": dict(METHODS["tsdkd-listmle-normalized"].objective)},
                }
            },
        )
    )
    # The settings column says what the remedy ran at: the parent's lr, the paper's entropy weight.
    assert "| lr 3e-05, entropy_weight 1 |" in remedies_md
    assert "one more validation trial of TSD-KD (paper preset) (1 in all)" in remedies_md
    assert f"| {'yes' if to_test else 'no'} |" in remedies_md
    assert "--tsdkd.listmle_normalize True` |" in remedies_md


def test_a_remedys_test_runs_report_the_weights_they_ran_at():
    from tsdkd_plugin.experiments.report import summarize_test_runs

    settings = {"lr": 3e-5, "entropy_weight": 0.01, "indirect_weight": 0.001}
    runs = [
        {
            "method": "tsdkd-grad-balanced",
            "seed": seed,
            "settings": settings,
            "objective": METHODS["tsdkd-grad-balanced"].objective_for(settings),
            "evaluation": {"accuracy": 0.7 + seed / 100},
        }
        for seed in (0, 1)
    ]
    summary = summarize_test_runs(runs, "gkd")["tsdkd-grad-balanced"]
    assert summary["settings"] == {"lr": 3e-5, "entropy_weight": 1.0, "indirect_weight": 0.1}


def test_the_long_regime_tunes_the_learning_rate_at_its_budget_with_the_paper_like_choice_and_a_denser_curve(
    tmp_path, monkeypatch
):
    calls = []

    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        calls.append((method, dict(settings), split, kwargs["checkpoints"]))
        return {"evaluation": {"accuracy": 0.8 if settings["lr"] == 3e-5 else 0.7}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    chosen = {"gkd": {"lr": 1e-4, "beta": 0.5}}
    result = comparison.tune_method(_state(tmp_path, "paper-like-long"), None, "gkd", chosen, 3)
    # The same learning-rate grid as every regime, GKD's beta as chosen at 32 steps, 12 points on each curve;
    # the method's own grid is not run again.
    assert calls == [("gkd", {"lr": lr, "beta": 0.5}, "val", 12) for lr in LR_GRID]
    assert result["chosen"] == {"lr": 3e-5, "beta": 0.5}
    long, short = BUDGETS["paper-like-long"], BUDGETS["paper-like"]
    assert long.distill.optimizer_steps == 3 * short.distill.optimizer_steps
    assert (long.teacher, long.student, long.student_selection) == (
        short.teacher,
        short.student,
        short.student_selection,
    )
    assert (long.n_val, long.n_test, long.difficulty) == (short.n_val, short.n_test, short.difficulty)


def test_the_long_regime_needs_its_methods_tuned_in_the_paper_like_one_before_building_anything(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(comparison, "prepare_regime", lambda *a: pytest.fail("models built before the check"))
    run_dir = tmp_path / "runs"
    argv = ["--regimes", "paper-like-long", "--methods", "gkd,seqkd", "--run-dir", str(run_dir)]
    assert compare.main(argv) == 2
    assert (
        "takes its non-LR settings from the paper-like regime, which has not been tuned yet" in capsys.readouterr().err
    )
    comparison.chosen_settings_file(run_dir, "paper-like").parent.mkdir(parents=True)
    comparison.chosen_settings_file(run_dir, "paper-like").write_text(json.dumps({"gkd": {"chosen": {"lr": 1e-4}}}))
    assert compare.main(argv) == 2
    assert "which has not tuned seqkd: run it there first" in capsys.readouterr().err


def test_a_comparison_extended_one_method_at_a_time_keeps_every_methods_choice(tmp_path, monkeypatch, models_not_built):
    """chosen.json and remedies.json are per method: an invocation that tunes only some methods adds
    theirs and keeps the others' (it used to overwrite the file, so the report lost the earlier
    methods' choices and counted their test runs at superseded settings, and the long regime could
    not find them)."""
    run_dir = tmp_path / "runs"
    models_not_built(run_dir)

    def fake_run(state, ctx, stage, method, settings, seed, split, **kwargs):
        return {"evaluation": {"accuracy": 0.7 if settings["lr"] == 1e-4 else 0.6}}

    monkeypatch.setattr(comparison, "run_and_evaluate", fake_run)
    common = ["--regimes", "paper-like", "--stop-after", "tune", "--grid-trials", "0", "--run-dir", str(run_dir)]
    common += ["--out", str(tmp_path / "report")]  # the default is the published benchmarks/toy_results
    assert compare.main([*common, "--methods", "gkd,tsdkd-paper,tsdkd-weight-warmup"]) == 0
    assert compare.main([*common, "--methods", "seqkd,tsdkd-paper,tsdkd-grad-balanced"]) == 0
    chosen = json.loads(comparison.chosen_settings_file(run_dir, "paper-like").read_text())
    assert sorted(chosen) == ["gkd", "seqkd", "tsdkd-paper"]
    assert all(entry["chosen"] == {"lr": 1e-4} for entry in chosen.values())
    remedies = json.loads(comparison.remedies_file(run_dir / "paper-like").read_text())
    assert sorted(remedies) == ["tsdkd-grad-balanced", "tsdkd-weight-warmup"]

    # The long regime finds every method the paper-like one has tuned, whichever invocation tuned it:
    # past the inherited-settings check, it goes on to build the models.
    class BuildingModels(Exception):
        pass

    def building(*args):
        raise BuildingModels

    monkeypatch.setattr(comparison, "prepare_regime", building)
    with pytest.raises(BuildingModels):
        compare.main(["--regimes", "paper-like-long", "--methods", "gkd,seqkd", *common[-4:]])
