"""Evaluation through lm-evaluation-harness on CPU (HF backend; the vLLM-CPU engine in the slow
test) with the tiny toy student and local task files, then the comparison table and plot.
recipes/eval/evaluate_runs.sh itself runs in test_recipes_on_a_ray_cluster.py, on the models the
recipes trained there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

try:
    import lm_eval  # noqa: F401
except ImportError as missing:  # fail loudly: a skipped evaluation test would hide a broken set-up
    raise ImportError("the evaluation tests need lm-evaluation-harness: pip install -e '.[eval]'") from missing

from tsdkd_plugin.recipes_tools import compare, evaluate, local_tasks

QUIZ = [
    {"question": "Which is a planet?", "choices": ["Mars", "Sirius"], "label": 0},
    {"question": "Water boils at sea level at?", "choices": ["50 C", "100 C"], "label": 1},
    {"question": "Two plus two?", "choices": ["4", "5", "6"], "label": 0},
]


def write_arith_task(out: Path, num_problems: int) -> None:
    """The toy arithmetic task's test split as a local generation task, the way the docs do it:
    the task files' chat prompts, the user turn's text as the question."""
    from tsdkd_plugin.toy.arith_task import write_task_files

    files = write_task_files(out / "arith", n_train=1, n_val=1, n_test=num_problems)
    assert local_tasks.main(["generation", "--name", "tsdkd_arith", "--data", str(files["prompts_test"]),
                             "--question-key", "prompt", "--prompt-template", "{{prompt[0].content}}",
                             "--max-gen-toks", "96", "--out-dir", str(out)]) == 0


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local generation task (the toy arithmetic test split) and a local multiple-choice task."""
    out = tmp_path_factory.mktemp("tasks")
    write_arith_task(out, num_problems=4)
    quiz = out / "quiz.jsonl"
    quiz.write_text("".join(json.dumps(row) + "\n" for row in QUIZ), encoding="utf-8")
    assert local_tasks.main(["multiple-choice", "--name", "tiny_quiz", "--data", str(quiz), "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def task_manager(task_dir):
    return evaluate.task_manager_for(str(task_dir))  # the same cached index the command uses


def test_the_papers_ten_benchmarks_are_lm_eval_tasks_with_its_settings(task_manager):
    resolved = evaluate.resolve_benchmarks(list(evaluate.DEFAULT_BENCHMARKS), task_manager)
    assert {name: b.task for name, b in resolved.items()} == {
        "gsm8k": "gsm8k", "gsm_plus": "gsm_plus", "math": "minerva_math", "mbpp": "mbpp", "sciq": "sciq",
        "mmlu_stem": "mmlu_stem", "mmlu_pro_math": "mmlu_pro_math", "bbh_cot": "bbh_cot_fewshot",
        "ifeval": "ifeval", "musr": "leaderboard_musr"}
    # each is a task or a group of tasks (not a tag, which lm_eval would expand differently)
    for benchmark in resolved.values():
        assert benchmark.task in task_manager.all_subtasks or benchmark.task in task_manager.all_groups, benchmark.task
    assert resolved["math"].num_fewshot == 4 and resolved["mbpp"].num_fewshot == 3
    assert resolved["mmlu_stem"].num_fewshot == 5
    assert resolved["ifeval"].num_fewshot == 0 and resolved["musr"].num_fewshot == 0
    # IFEval's own generation budget (long-answer instructions) is kept when --max-gen-toks is lower
    assert resolved["ifeval"].min_gen_toks == 1280
    # Local task files are found through --include-path, like any lm_eval task name.
    assert evaluate.resolve_benchmarks(["tsdkd_arith", "tiny_quiz"], task_manager)["tiny_quiz"].task == "tiny_quiz"
    with pytest.raises(evaluate.EvaluationError, match="unknown benchmark.*gsm9k.*--include-path"):
        evaluate.resolve_benchmarks(["gsm8k", "gsm9k"], task_manager)


def test_code_executing_benchmarks_need_explicit_permission(task_manager):
    resolved = evaluate.resolve_benchmarks(["mbpp", "gsm8k"], task_manager)
    with pytest.raises(evaluate.EvaluationError, match="mbpp.*--allow-code-execution"):
        evaluate.check_code_execution(resolved, allowed=False)
    assert evaluate.check_code_execution(resolved, allowed=True) is True


def test_bad_model_directory_fails_before_loading(tmp_path, task_dir, capsys):
    code = evaluate.main(["--model", str(tmp_path / "missing"), "--backend", "hf", "--include-path", str(task_dir),
                          "--benchmarks", "tiny_quiz", "--out", str(tmp_path / "r.json")])
    assert code == 2 and "is not a model directory" in capsys.readouterr().err


def run_evaluation(model_dir, task_dir, out: Path, backend: str, name: str):
    argv = ["--model", str(model_dir), "--name", name, "--backend", backend, "--dtype", "float32",
            "--include-path", str(task_dir), "--benchmarks", "tsdkd_arith,tiny_quiz", "--max-gen-toks", "24",
            "--out", str(out), "--log-samples", str(out.parent / "samples")]
    if backend == "hf":
        argv += ["--device", "cpu", "--batch-size", "4"]
    else:
        argv += ["--max-model-len", "512"]
    assert evaluate.main(argv) == 0
    return json.loads(out.read_text())


def check_report(report, name, backend):
    assert report["run"] == name and report["backend"] == backend and report["settings"]["greedy"] is True
    arith, quiz = report["benchmarks"]["tsdkd_arith"], report["benchmarks"]["tiny_quiz"]
    assert arith["metric"] == "exact_match,strict-match" and arith["samples"] == 4 and arith["num_fewshot"] == 0
    assert quiz["metric"] == "acc,none" and quiz["samples"] == len(QUIZ)
    for entry in (arith, quiz):
        assert 0.0 <= entry["score"] <= 1.0 and all("," in key for key in entry["metrics"])


@pytest.fixture(scope="module")
def hf_report(toy_student_dir, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "toy-student.json"
    return out, run_evaluation(toy_student_dir, task_dir, out, "hf", "toy-student")


def test_hf_backend_evaluates_the_toy_student_on_local_tasks(hf_report):
    out, report = hf_report
    check_report(report, "toy-student", "hf")
    # An untrained 0.2M-parameter student writes no `#### n`: zero on arithmetic, as it should.
    assert report["benchmarks"]["tsdkd_arith"]["score"] == 0.0
    samples = (out.parent / "samples" / "toy-student.tsdkd_arith.jsonl").read_text().splitlines()
    first = json.loads(samples[0])
    assert first["arguments"][0][0].startswith("<|im_start|>user\nQ: ")  # chat template applied
    assert first["arguments"][0][1]["do_sample"] is False and first["arguments"][0][1]["max_gen_toks"] == 24


@pytest.mark.slow
def test_vllm_backend_runs_the_same_command_on_the_cpu_engine(toy_student_dir, task_dir, tmp_path, hf_report):
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    report = run_evaluation(toy_student_dir, task_dir, tmp_path / "toy-student-vllm.json", "vllm", "toy-student-vllm")
    check_report(report, "toy-student-vllm", "vllm")
    # Greedy decoding and log-likelihoods agree across backends on the same model.
    _, hf = hf_report
    for name in ("tsdkd_arith", "tiny_quiz"):
        assert report["benchmarks"][name]["score"] == pytest.approx(hf["benchmarks"][name]["score"])


# --------------------------------------------------------------------------- comparison


def fake_report(run: str, scores: dict) -> dict:
    return {"run": run, "model": f"/ckpt/{run}", "backend": "vllm", "benchmarks": {
        name: {"task": name, "num_fewshot": 5, "metric": "exact_match,flexible-extract", "score": score}
        for name, score in scores.items()}}


def test_compare_writes_table_and_plot(tmp_path, hf_report):
    paths = []
    for run, scores in (("student-base", {"gsm8k": 0.60, "math": 0.30, "sciq": 0.90}),
                        ("tsdkd", {"gsm8k": 0.70, "math": 0.35, "sciq": 0.91}),
                        ("grpo", {"gsm8k": 0.66, "math": 0.36})):  # sciq missing
        path = tmp_path / f"{run}.json"
        path.write_text(json.dumps(fake_report(run, scores)))
        paths.append(str(path))
    md, png = tmp_path / "comparison.md", tmp_path / "comparison.png"
    assert compare.main([*paths, "--baseline", "student-base", "--out-md", str(md), "--out-png", str(png)]) == 0
    table = md.read_text()
    lines = table.splitlines()
    assert lines[0] == "| run | gsm8k | math | sciq | average |"
    assert lines[3] == "| tsdkd | **70.0** (+10.0) | 35.0 (+5.0) | **91.0** (+1.0) | **52.5** (+7.5) |"
    assert lines[4] == "| grpo | 66.0 (+6.0) | **36.0** (+6.0) | - | 51.0 (+6.0) |"
    assert "average over the benchmarks every run has (gsm8k, math)" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # A real evaluation file (from lm_eval) goes in the same table.
    real, _ = hf_report
    assert compare.main([str(real), paths[0], "--out-md", str(md)]) == 0
    row = next(line for line in md.read_text().splitlines() if line.startswith("| toy-student |"))
    # Only run with the local tasks: best there; nothing in common with student-base: no average.
    assert row.startswith("| toy-student | **0.0** | **") and row.endswith("| - | - | - | - |")


def test_compare_rejects_foreign_or_duplicate_results(tmp_path, capsys):
    one = tmp_path / "a.json"
    one.write_text(json.dumps(fake_report("same", {"gsm8k": 0.5})))
    other = tmp_path / "b.json"
    other.write_text(json.dumps(fake_report("same", {"gsm8k": 0.6})))
    assert compare.main([str(one), str(other)]) == 2
    assert "two results are named 'same'" in capsys.readouterr().err
    foreign = tmp_path / "c.json"
    foreign.write_text(json.dumps({"results": {}}))
    assert compare.main([str(foreign)]) == 2
    assert "is not an evaluation result" in capsys.readouterr().err
    assert compare.main([str(one), "--baseline", "nobody"]) == 2
    assert "--baseline 'nobody' is none of the runs" in capsys.readouterr().err
