"""The comparison driver: method table, pair construction, teacher scoring, every ablation's
flags through the real CLI parser, and the report it writes (no training here)."""

import json

import pytest

from tsdkd_plugin.experiments import compare
from tsdkd_plugin.experiments.budgets import BUDGETS
from tsdkd_plugin.experiments.evaluate import teacher_scores
from tsdkd_plugin.experiments.flags import GRPO_FLAGS, distill_flags, tsdkd_flags
from tsdkd_plugin.experiments.methods import METHODS, parse_methods, ranked_pairs
from tsdkd_plugin.experiments.runner import JobError


def test_method_groups_and_unknown_names():
    assert parse_methods("all") == list(METHODS)
    assert parse_methods("tsdkd,gkd,tsdkd") == ["tsdkd", "gkd"]
    assert set(parse_methods("baselines")) == {"seqkd", "gkd", "grpo", "dpo", "tsdkd"}
    with pytest.raises(JobError, match="unknown method 'kd'; valid methods: seqkd, gkd"):
        parse_methods("tsdkd,kd")


def test_the_required_comparison_is_covered():
    runners = {m.runner for m in METHODS.values()}
    assert runners == {"seqkd", "tsdkd", "grpo", "dpo"}
    objectives = {name: dict(m.objective) for name, m in METHODS.items()}
    assert objectives["gkd"] == {"gate": "none", "indirect_weight": 0.0, "entropy_weight": 0.0}
    assert objectives["tsdkd"] == {}
    for term in ("direct_weight", "indirect_weight", "entropy_weight"):
        assert any(o == {term: 0.0} for o in objectives.values()), term
    assert {"gate": "hard"} in objectives.values()
    assert {"indirect_level": "sequence"} in objectives.values() and {"indirect_level": "both"} in objectives.values()
    assert {"listmle_form": "prefix"} in objectives.values()


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.runner == "tsdkd"])
def test_every_tsdkd_variant_is_a_valid_launch(name, tmp_path, toy_teacher_dir, toy_student_dir, arith_data_dir):
    """Each ablation's flags pass train_tsdkd's own checks (e.g. sequence ranking needs the
    micro batches to hold whole groups of samples)."""
    from tsdkd_plugin.cli.train_tsdkd import parse_args

    budget = BUDGETS["default"].distill
    flags = distill_flags(budget, student_dir=toy_student_dir, prompts_file=arith_data_dir / "prompts_train.jsonl",
                          output_dir=tmp_path / "m", seed=0)
    _, config = parse_args(flags + tsdkd_flags(METHODS[name].objective, teacher_dir=toy_teacher_dir))
    for field, value in METHODS[name].objective.items():
        assert getattr(config, field) == value


def test_grpo_flags_parse_with_upstream_train_ppo_ray(tmp_path, toy_student_dir, arith_data_dir):
    from tsdkd_plugin.host.upstream_cli import load_upstream_cli

    upstream = load_upstream_cli()
    budget = BUDGETS["default"].distill
    flags = distill_flags(budget, student_dir=toy_student_dir, prompts_file=arith_data_dir / "prompts_train.jsonl",
                          output_dir=tmp_path / "m", seed=0)
    flags += list(GRPO_FLAGS)
    args = upstream.finalize(upstream.build_parser().parse_args(flags))
    assert args.algo.advantage.estimator == "group_norm" and args.algo.kl.init_coef == 0


def test_ranked_pairs_best_against_worst():
    responses = ["a", "b", "c", "d"]
    scores = [-1.0, -0.1, -3.0, -2.0]
    assert ranked_pairs(responses, scores) == [("b", "c"), ("a", "d")]
    assert ranked_pairs(["same", "same", "x", "y"], [0.0, -1.0, -2.0, -3.0]) == [("same", "y"), ("same", "x")]
    assert ranked_pairs(["s", "s"], [0.0, -1.0]) == []


def test_teacher_scores_are_mean_response_log_likelihoods(toy_teacher_dir):
    import torch

    from tsdkd_plugin.experiments.evaluate import load_model_for_eval, render_prompt

    rows = [{"prompt": [{"role": "user", "content": "Q: 1+2=?"}]}, {"prompt": [{"role": "user", "content": "Q: 9-4=?"}]}]
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


def _fake_run(method, seed, accuracy):
    return {
        "method": method, "label": METHODS[method].label, "group": METHODS[method].group, "seed": seed,
        "evaluation": {"accuracy": accuracy, "n": 100, "correct": int(100 * accuracy),
                       "by_num_ops": {"2": {"n": 40, "correct": 20, "accuracy": 0.5},
                                      "3": {"n": 60, "correct": 10, "accuracy": accuracy / 2}}},
        "seconds": 120.0, "optimizer_steps": 32, "rollouts_planned": 8, "rollouts": 8,
        "samples_planned": 2048, "samples": 2048,
    }


def test_report_from_finished_runs_lists_what_is_missing(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for seed, acc in ((0, 0.30), (1, 0.34), (2, 0.32)):
        (results / f"tsdkd-seed{seed}.json").write_text(json.dumps(_fake_run("tsdkd", seed, acc)))
    (results / "gkd-seed0.json").write_text(json.dumps(_fake_run("gkd", 0, 0.25)))
    (results / "gkd-seed1.failed.json").write_text(json.dumps({"method": "gkd", "seed": 1, "error": "boom\nlog tail"}))

    class Options:
        argv = ["--seeds", "3", "--methods", "tsdkd,gkd"]
        seed_list = [0, 1, 2]
        difficulty = "easy"
        out = str(tmp_path / "out")

    written = compare.write_report(Options, BUDGETS["default"], {"teacher": 0.7, "initial student": 0.2},
                                   results, ["gkd", "tsdkd"], 3600.0)
    markdown = written["markdown"].read_text()
    assert "| TSD-KD | **32.0 ± 2.0** | 30.0, 34.0, 32.0 |" in markdown
    assert "gkd seed 1: boom" in markdown and "gkd seed 2: not run yet" in markdown
    assert "python -m tsdkd_plugin.experiments.compare --seeds 3 --methods tsdkd,gkd" in markdown
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(written["json"].read_text())["summary"]
    assert list(summary) == ["gkd", "tsdkd"]
    assert summary["tsdkd"]["mean"] == pytest.approx(0.32)


def test_a_run_that_missed_its_budget_is_redone():
    assert compare.budget_shortfall({"rollouts_planned": 8, "rollouts": 2, "samples_planned": 2048, "samples": 512}) == (
        "it logged 2 of its 8 rollouts"
    )
    assert compare.budget_shortfall({"rollouts_planned": 8, "rollouts": 8, "samples_planned": 2048,
                                     "samples": 1024}) == "it logged 1024 of its 2048 samples"
    assert compare.budget_shortfall({"rollouts_planned": 8, "rollouts": 8, "samples_planned": 2048,
                                     "samples": 2048}) is None
    # SFT and DPO runs plan no Ray rollouts: their steps are what their data gives.
    assert compare.budget_shortfall({"optimizer_steps": 30}) is None
