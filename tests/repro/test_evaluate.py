"""Greedy evaluation: scoring by number of operations, generation order, the CLI's errors."""

import json
import subprocess
import sys

import pytest

from tsdkd_plugin.experiments.evaluate import (
    evaluate_model,
    generate_greedy,
    load_model_for_eval,
    load_prompt_rows,
    render_prompt,
    score_responses,
)
from tsdkd_plugin.toy.arith_task import generate_splits, prompt_row


def _rows():
    problems = generate_splits("easy", n_train=1, n_val=1, n_test=12, seed=0)["test"]
    return problems, [prompt_row(p) for p in problems]


def test_score_responses_counts_by_number_of_operations():
    problems, rows = _rows()
    # Right answers for the even rows, a wrong one for odd rows except the last, which never answers.
    responses = [p.solution if i % 2 == 0 else f"{p.steps[0]}. #### {p.answer + 1}" for i, p in enumerate(problems)]
    responses[-1] = "1+1=2; and then I forgot"
    correct, answered, buckets = score_responses(rows, responses)
    assert correct == sum(1 for i in range(len(problems)) if i % 2 == 0 and i != len(problems) - 1)
    assert answered == len(problems) - 1
    assert sum(b.n for b in buckets.values()) == len(problems)
    for ops, bucket in buckets.items():
        expected = [i for i, p in enumerate(problems) if p.num_ops == ops]
        assert bucket.n == len(expected)
        assert bucket.correct == sum(1 for i in expected if i % 2 == 0 and i != len(problems) - 1)


def test_score_responses_rejects_misaligned_inputs():
    _, rows = _rows()
    with pytest.raises(ValueError, match="rows but"):
        score_responses(rows, ["#### 1"])


def test_prompts_render_like_openrlhf_chat_prompts(toy_student_dir):
    _, rows = _rows()
    _, tokenizer = load_model_for_eval(toy_student_dir)
    text = render_prompt(tokenizer, rows[0]["prompt"])
    assert text == f"<|im_start|>user\n{rows[0]['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tokenizer, "Q: 1+2=? A:") == "Q: 1+2=? A:"


def test_generation_keeps_input_order_and_groups_samples(toy_student_dir):
    model, tokenizer = load_model_for_eval(toy_student_dir)
    _, rows = _rows()
    texts = [render_prompt(tokenizer, r["prompt"]) for r in rows[:5]]
    one_by_one = [generate_greedy(model, tokenizer, [t], max_new_tokens=6, progress=False)[0] for t in texts]
    # Batches are formed by length; results must still come back in input order.
    batched = generate_greedy(model, tokenizer, texts, max_new_tokens=6, batch_size=2, progress=False)
    assert batched == one_by_one
    sampled = generate_greedy(
        model, tokenizer, texts[:2], max_new_tokens=4, do_sample=True, num_return_sequences=3, progress=False
    )
    assert len(sampled) == 6


def test_evaluate_model_result_is_complete_and_serializable(toy_student_dir, arith_data_dir):
    result = evaluate_model(
        toy_student_dir, arith_data_dir / "prompts_test.jsonl", max_new_tokens=4, limit=6, progress=False
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["n"] == 6 and 0.0 <= data["accuracy"] <= 1.0
    assert sum(bucket["n"] for bucket in data["by_num_ops"].values()) == 6
    assert data["examples"] and data["examples"][0]["prompt"].startswith("<|im_start|>user")


def test_load_prompt_rows_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_prompt_rows(bad)


def test_cli_refuses_a_directory_without_a_model(tmp_path, arith_data_dir):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsdkd_plugin.experiments.evaluate",
            "--model",
            str(tmp_path),
            "--prompts",
            str(arith_data_dir / "prompts_test.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "not a saved HF model directory" in completed.stderr
    assert "Traceback" not in completed.stderr
